"""Benchmarks on the shapes world (``fiberbench bench quality|invariance|perf``).

- :mod:`.quality`: feature match, validity, diversity and time per method, judged by the oracle;
- :mod:`.invariance`: does a sampler recover the true (intervention) invariances of the toy extractors;
- :mod:`.perf`: seconds per sample and memory by batch size and steps;
- :mod:`.report`: the plain-text tables the CLI prints.
"""
from typing import Any

from . import invariance
from .invariance import run_invariance_bench
from .perf import bench_perf
from .quality import bench_quality, data_diversity, diversity, pairwise_l2
from .report import format_table

__all__ = ["bench_invariance", "bench_perf", "bench_quality", "data_diversity", "diversity", "format_table",
           "invariance", "pairwise_l2", "run_invariance_bench"]


def bench_invariance(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """The ground-truth invariance benchmark at its default settings (see :mod:`.invariance`)."""
    return run_invariance_bench(quick=quick, seed=seed)
