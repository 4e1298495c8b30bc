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

from .. import toy
from ..analysis.toy_scores import oracle_fiber_metrics
from ..models import load_extractor, load_prior
from ..sampling import PRESETS, sample_fiber
from ..seeds import DATA_DIVERSITY_SEED, QUALITY_SEED_BASE
from ..toy import load_oracle, render, sample_factors


def pairwise_l2(x: torch.Tensor) -> float:
    """Mean L2 distance over distinct pairs of ``x`` ``[k,...]``."""
    flat = x.flatten(1)
    d = torch.cdist(flat, flat)
    k = flat.shape[0]
    return float(d.sum() / (k * (k - 1)))


def diversity(images: torch.Tensor, n: int, data_scale: float) -> float:
    """Mean within-fiber pairwise L2 (over fibers of ``n`` samples) relative to ``data_scale``."""
    fibers = images.split(n)
    return float(np.mean([pairwise_l2(f) for f in fibers])) / data_scale


def data_diversity(k: int = 256, seed: int = DATA_DIVERSITY_SEED) -> float:
    """Mean pairwise L2 between independent renders (the data's diversity)."""
    return pairwise_l2(render(sample_factors(k, QUALITY_SEED_BASE + seed)))


def bench_quality(quick: bool = False, seed: int = 0, methods=("unguided", "ndtm", "dps", "metamer"),
                  extractor: str = "toy/shape-resnet@logits", prior: str = "toy/prior-fm",
                  settings: dict[str, dict] | None = None, references: int | None = None,
                  n: int | None = None) -> dict[str, Any]:
    """Run every method on the same references and seeds; return ``{method: metrics}``."""
    torch.manual_seed(seed)
    B = references or 32
    n = n or (2 if quick else 8)  # quick: 32 x 2 samples per method, under 3 min on 2 cores
    refs, factors = toy.references(B, seed=QUALITY_SEED_BASE + seed)
    p = load_prior(prior)
    f = load_extractor(extractor)
    oracle = load_oracle()
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
        m = oracle_fiber_metrics(res, oracle, factors)
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
