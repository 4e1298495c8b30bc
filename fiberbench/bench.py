"""Benchmarks on the shapes world (``fiberbench bench quality|invariance|perf``).

``quality``: for each method, fibers of ``toy/shape-resnet@logits`` under
``toy/prior-fm`` for fresh references, judged by the oracle. Prints one JSON
object keyed by method with ``feature_match`` (fraction of samples whose
features have cosine >= 0.95 with the reference's), ``validity`` (oracle:
shape and colour confidence >= 0.9), ``diversity`` (mean pairwise pixel L2
inside a fiber / the same between independent renders), ``shape_kept`` and
``color_changed`` (oracle), ``seconds_per_sample`` and ``overhead_vs_unguided``
(time ratio to unguided sampling with the same prior and steps, same run).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

QUALITY_SEED_BASE = 50_000  # references come from seeds never used in training (>= 10**6) or the cards (12345)


def _pairwise_l2(x: torch.Tensor) -> float:
    """Mean L2 distance over distinct pairs of ``x`` ``[k,...]``."""
    flat = x.flatten(1)
    d = torch.cdist(flat, flat)
    k = flat.shape[0]
    return float(d.sum() / (k * (k - 1)))


def diversity(images: torch.Tensor, n: int, data_scale: float) -> float:
    """Mean within-fiber pairwise L2 (over fibers of ``n`` samples) relative to ``data_scale``."""
    fibers = images.split(n)
    return float(np.mean([_pairwise_l2(f) for f in fibers])) / data_scale


def data_diversity(k: int = 256, seed: int = 777) -> float:
    """Mean pairwise L2 between independent renders (the data's diversity)."""
    from .toy import render, sample_factors

    return _pairwise_l2(render(sample_factors(k, QUALITY_SEED_BASE + seed)))


def judge(result, oracle, factors) -> dict[str, float]:
    """Oracle-based metrics of one FiberResult whose references have ``factors``."""
    pred = oracle.predict(result.images)
    n = result.n
    ref_shape = np.repeat(factors["shape"].to_numpy(), n)
    ref_color = np.repeat(factors["color"].to_numpy(), n)
    valid = pred["valid"].to_numpy()
    return {
        "feature_match": float((result.cosine >= 0.95).float().mean()),
        "validity": float(valid.mean()),
        "shape_kept": float((pred["shape"].to_numpy() == ref_shape).mean()),
        "color_changed": float((pred["color"].to_numpy() != ref_color).mean()),
        "mean_cosine": float(result.cosine.mean()),
    }


def bench_quality(quick: bool = False, seed: int = 0, methods=("unguided", "ndtm", "dps", "metamer"),
                  extractor: str = "toy/shape-resnet@logits", prior: str = "toy/prior-fm",
                  settings: dict[str, dict] | None = None, references: int | None = None,
                  n: int | None = None) -> dict[str, Any]:
    """Run every method on the same references and seeds; return ``{method: metrics}``."""
    from . import load_extractor, load_prior, toy
    from .sampling import PRESETS, sample_fiber

    torch.manual_seed(seed)
    B = references or 32
    n = n or (2 if quick else 8)  # quick: 32 x 2 samples per method, under 3 min on 2 cores
    refs, factors = toy.references(B, seed=QUALITY_SEED_BASE + seed)
    p = load_prior(prior)
    f = load_extractor(extractor)
    oracle = toy.load_oracle()
    scale = data_diversity()
    steps = PRESETS["toy"]["steps"]
    settings = settings or {}
    out: dict[str, Any] = {}
    for method in methods:
        kw = dict(settings.get(method, {}))
        if method == "ndtm":
            kw.setdefault("preset", "toy")
        kw.setdefault("steps", steps)
        t0 = time.perf_counter()
        res = sample_fiber(p, f, refs, n=n, method=method, seed=seed, progress=False, batch_size=64, **kw)
        secs = time.perf_counter() - t0
        m = judge(res, oracle, factors)
        m["diversity"] = diversity(res.images, n, scale)
        m["seconds_per_sample"] = secs / (B * n)
        m["denoiser_evals_per_sample"] = res.config["denoiser_evals_per_sample"]
        m["extractor_evals_per_sample"] = res.config["extractor_evals_per_sample"]
        m["steps"] = res.config["steps"]
        m["settings"] = {k: v for k, v in kw.items()}
        out[method] = m
    if "unguided" in out:
        base = out["unguided"]["seconds_per_sample"]
        for m in out.values():
            m["overhead_vs_unguided"] = m["seconds_per_sample"] / base
    out_meta = {"references": B, "n": n, "extractor": extractor, "prior": prior, "seed": seed,
                "reference_seed": QUALITY_SEED_BASE + seed}
    for m in out.values():
        m["run"] = out_meta
    return out


def bench_invariance(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Ground-truth invariance benchmark (see :mod:`fiberbench.groundtruth`)."""
    from .groundtruth import run_invariance_bench

    return run_invariance_bench(quick=quick, seed=seed)


def bench_perf(quick: bool = False, batch_sizes=(1, 8, 32), step_counts=(25, 50, 100),
               methods=("unguided", "ndtm", "dps", "metamer")) -> dict[str, Any]:
    """Seconds per sample and peak memory per method, batch size and step count (toy prior + shape-resnet)."""
    import resource

    from . import load_extractor, load_prior, toy
    from .sampling import sample_fiber

    if quick:
        batch_sizes, step_counts = (1, 8), (25,)
    p = load_prior("toy/prior-fm")
    f = load_extractor("toy/shape-resnet@logits")
    refs, _ = toy.references(1, seed=QUALITY_SEED_BASE)
    out: dict[str, Any] = {}
    for method in methods:
        rows = []
        for bs in batch_sizes:
            for steps in step_counts:
                kw = {"preset": "toy"} if method == "ndtm" else {}
                t0 = time.perf_counter()
                res = sample_fiber(p, f, refs, n=bs, method=method, steps=steps, progress=False, batch_size=bs, **kw)
                secs = time.perf_counter() - t0
                rows.append({"batch": bs, "steps": steps, "seconds_per_sample": secs / bs,
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                             "denoiser_evals_per_sample": res.config["denoiser_evals_per_sample"]})
        out[method] = {"rows": rows}
    if "unguided" in out:
        for method, v in out.items():
            for r, b in zip(v["rows"], out["unguided"]["rows"]):
                r["overhead_vs_unguided"] = r["seconds_per_sample"] / b["seconds_per_sample"]
    return out


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
