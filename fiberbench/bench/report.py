"""Plain-text tables of benchmark results (what ``fiberbench bench`` prints without ``--json``)."""
from __future__ import annotations

from typing import Any

import numpy as np


def format_table(out: dict[str, Any]) -> str:
    """Plain-text table of a bench result: one row per method.

    The quality columns come first; the invariance benchmark's ``recovery_auroc``, ``rank_correlation``,
    ``rank_correlation_ceiling``, ``pairs_estimated`` and ``training_seconds`` follow when some method has
    them. A column no method has is left out; a method without a value (or with ``None``, e.g. the AUROC of
    a method with no valid sample) shows ``-``. A perf result (``"benchmark": "perf"``) prints as
    :func:`format_perf`; other entries that are no method print as their dict.
    """
    if out.get("benchmark") == "perf":
        return format_perf(out)
    base = ["feature_match", "validity", "diversity", "shape_kept", "color_changed", "seconds_per_sample",
            "overhead_vs_unguided"]
    extra = ["recovery_auroc", "rank_correlation", "rank_correlation_ceiling", "pairs_estimated", "training_seconds"]
    methods = {k: m for k, m in out.items() if isinstance(m, dict) and "rows" not in m}
    keys = [k for k in base + extra if k in base[:2] or any(k in m for m in methods.values())]
    w = max([10] + [len(k) + 2 for k in keys])
    name_w = max([10] + [len(str(k)) + 1 for k in out])

    def cell(v) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            return f"{'-':>{w}}"
        return f"{v:>{w}d}" if isinstance(v, int) else f"{v:>{w}.3f}"

    lines = [f"{'method':<{name_w}}" + "".join(f"{k:>{w}}" for k in keys)]
    for method, m in out.items():
        if method not in methods:
            lines.append(f"{method:<{name_w}} {m}")
            continue
        lines.append(f"{method:<{name_w}}" + "".join(cell(m.get(k)) for k in keys))
    return "\n".join(lines)


# perf columns: (header, width, value of a row); the split is in % of the sampling loop's wall time
PERF_SPLIT = (("prior_f%", ("prior_forward",)), ("prior_b%", ("prior_backward",)),
              ("decode%", ("decode_forward", "decode_backward")), ("ext_f%", ("extractor_forward",)),
              ("ext_b%", ("extractor_backward",)), ("optim%", ("optimiser",)), ("other%", ("other",)))


def format_perf(out: dict[str, Any]) -> str:
    """Plain-text table of ``bench perf``: two header lines (command, date, threads, load; models and batch), then
    one row per run: method, preset label, seconds per sample, the floor and the ratio, evaluations per sample
    (denoiser / extractor), the split in % of the wall time (decode forward + backward together), the residual
    (wall - sum of the split) in %, and the peak memory growth from step ``memory_step`` on in MiB."""
    def load(v) -> str:
        return "-" if not v else "/".join(f"{x:.1f}" for x in v)

    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"# {out.get('command', '?')}  {out.get('date', '?')}  torch {out.get('torch', '?')}, "
             f"{out.get('threads', '?')} thread(s); load (1/5/15 min) {load(out.get('loadavg_start'))} at start, "
             f"{load(out.get('loadavg_end'))} at end",
             f"# {out.get('prior', '?')} + {out.get('extractor', '?')}, batch {out.get('batch', '?')}; floor = "
             f"unavoidable network calls at their median time on the batch; split in % of the sampling loop",
             ""]
    heads = ["method", "preset", "s/sample", "floor", "ratio", "evals", *(h for h, _ in PERF_SPLIT), "resid%",
             "mem+MiB"]
    rows = []
    for r in out.get("runs", []):
        frac = r.get("split_fraction", {})
        mem = (r.get("memory") or {}).get("growth_mib")
        rows.append([r["method"], str(r.get("label") or r.get("preset")), num(r.get("seconds_per_sample"), ".3f"),
                     num(r.get("floor_seconds_per_sample"), ".3f"), num(r.get("ratio_to_floor"), ".2f"),
                     f"{r.get('denoiser_evals_per_sample', '-')}/{r.get('extractor_evals_per_sample', '-')}"]
                    + [f"{100 * sum(frac.get(k, 0.0) for k in keys):.1f}" for _, keys in PERF_SPLIT]
                    + [num(100 * r["residual_fraction"] if "residual_fraction" in r else None, ".1f"),
                       num(mem, ".1f")])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(heads)]
    fmt = ["<" if i < 2 else ">" for i in range(len(heads))]
    for row in [heads, *rows]:
        lines.append("  ".join(f"{c:{a}{w}}" for c, a, w in zip(row, fmt, widths)).rstrip())
    return "\n".join(lines)
