"""Plain-text tables of benchmark results (what ``fiberbench bench`` prints without ``--json``)."""
from __future__ import annotations

from typing import Any

import numpy as np


def format_table(out: dict[str, Any]) -> str:
    """Plain-text table of a bench result: one row per method.

    The quality columns come first; the invariance benchmark's ``recovery_auroc``, ``rank_correlation``,
    ``rank_correlation_ceiling``, ``pairs_estimated`` and ``training_seconds`` follow when some method has
    them. A column no method has is left out; a method without a value (or with ``None``, e.g. the AUROC of
    a method with no valid sample) shows ``-``. Perf results (``{"rows": [...]}``) print as their dict.
    """
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
