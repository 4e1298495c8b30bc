"""``bench perf``: seconds per sample and peak memory per method, batch size and step count."""
from __future__ import annotations

import resource
import time
from typing import Any

from ..models import load_extractor, load_prior
from ..sampling import sample_fiber
from ..seeds import QUALITY_SEED_BASE
from ..toy import references


def bench_perf(quick: bool = False, batch_sizes=(1, 8, 32), step_counts=(25, 50, 100),
               methods=("unguided", "ndtm", "dps", "metamer")) -> dict[str, Any]:
    """Seconds per sample and peak memory per method, batch size and step count (toy prior + shape-resnet)."""
    if quick:
        batch_sizes, step_counts = (1, 8), (25,)
    p = load_prior("toy/prior-fm")
    f = load_extractor("toy/shape-resnet@logits")
    refs, _ = references(1, seed=QUALITY_SEED_BASE)
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
