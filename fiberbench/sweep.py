"""Headless sweeps, at their public import path (code: :mod:`fiberbench.runs.sweep`).

``python -m fiberbench.sweep bench`` measures sweep throughput (see :func:`fiberbench.cli.sweep_main`).
"""
from .checks import (
    MAX_JOBS,
    MAX_N,
    MAX_REFERENCES,
    MAX_STEPS,
)
from .runs.sweep import (
    IMAGE_SUFFIXES,
    LOADS,
    MODEL_CACHE_SIZE,
    TOP_KEYS,
    Job,
    SweepSummary,
    benchmark,
    clear_model_cache,
    expand,
    format_benchmark,
    load_config,
    run_job,
    run_sweep,
    start_ray,
)

__all__ = ["benchmark", "clear_model_cache", "expand", "format_benchmark", "IMAGE_SUFFIXES", "Job",
           "load_config", "LOADS", "MAX_JOBS", "MAX_N", "MAX_REFERENCES", "MAX_STEPS", "MODEL_CACHE_SIZE",
           "run_job", "run_sweep", "start_ray", "SweepSummary", "TOP_KEYS"]

if __name__ == "__main__":
    from .cli import sweep_main

    raise SystemExit(sweep_main())
