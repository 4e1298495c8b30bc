"""Invariance statistics per class and per model: means with bootstrap confidence intervals.

Input frames are tidy (one row per sample, per fiber or per image); output
frames are *long*: one row per (group, statistic) with ``mean``, ``ci_low``,
``ci_high``, ``n`` — what ``plotly.express.bar(df, x="class", y="mean",
error_y=..., color="statistic", facet_col="extractor")`` wants.

Keep this module a set of small, independent functions: other statistics
(e.g. retention curves) are added beside :func:`per_class`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import ConfigError, InputError

__all__ = ["per_class", "bootstrap_mean", "ID_COLUMNS"]

# numeric columns that identify rows or record settings, never statistics to average
ID_COLUMNS = frozenset({
    "reference", "sample", "sample_seed", "seed", "steps", "n", "image", "index", "run", "step",
    "norm_bound", "n_samples", "n_boot",
})


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                   clusters: np.ndarray | None = None) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile bootstrap CI ``(mean, low, high)``.

    With ``clusters`` (one label per value) whole clusters are resampled (e.g. all
    samples of one reference together), which is the honest CI when rows within a
    cluster are correlated. NaNs are dropped. One value: CI = (mean, mean).
    """
    v = np.asarray(values, dtype=float)
    keep = np.isfinite(v)
    v = v[keep]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size == 1 or n_boot < 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    alpha = (1.0 - ci) / 2
    if clusters is None:
        idx = rng.integers(0, v.size, size=(n_boot, v.size))
        boots = v[idx].mean(1)
    else:
        lab = np.asarray(clusters)[keep]
        _, inv = np.unique(lab, return_inverse=True)
        sums = np.bincount(inv, weights=v)
        counts = np.bincount(inv).astype(float)
        k = sums.size
        if k == 1:
            return mean, mean, mean
        idx = rng.integers(0, k, size=(n_boot, k))
        boots = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return mean, float(lo), float(hi)


def per_class(frame: pd.DataFrame, by: Sequence[str] | str = ("extractor", "class"),
              stats: Sequence[str] | None = None, *, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
              cluster: str | None = None) -> pd.DataFrame:
    """Mean and bootstrap CI of every invariance statistic, per group.

    Args:
        frame: tidy frame, one row per observation (sample, fiber or image).
        by: grouping columns (``["extractor", "class"]``; ``["extractor"]`` for model level).
        stats: columns to summarise; default every numeric (or boolean) column that is
            not a grouping column and not an id/setting column (:data:`ID_COLUMNS`,
            ``hp_*``).
        n_boot, ci, seed: percentile bootstrap of the mean (seeded: reproducible).
        cluster: optional column whose values are resampled as whole clusters
            (e.g. ``"reference"`` for per-sample rows of several fibers).

    Returns:
        Long frame with the ``by`` columns, ``statistic``, ``mean``, ``ci_low``,
        ``ci_high``, ``n`` (non-NaN observations), ``n_clusters`` (when clustered),
        sorted by group and statistic.
    """
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"per_class needs a pandas DataFrame, got {type(frame).__name__}")
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in by if c not in frame.columns]
    if missing:
        raise ConfigError(f"grouping column(s) {missing} not in the frame; columns: {list(frame.columns)}")
    if cluster is not None and cluster not in frame.columns:
        raise ConfigError(f"cluster column {cluster!r} not in the frame; columns: {list(frame.columns)}")
    if not 0.0 < ci < 1.0:
        raise ConfigError(f"ci must lie in (0, 1), got {ci}")
    if stats is None:
        stats = [c for c in frame.columns
                 if c not in by and c != cluster and c not in ID_COLUMNS and not str(c).startswith("hp_")
                 and (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))]
    else:
        stats = list(stats)
        bad = [c for c in stats if c not in frame.columns]
        if bad:
            raise ConfigError(f"statistic column(s) {bad} not in the frame; columns: {list(frame.columns)}")
    cols = by + ["statistic", "mean", "ci_low", "ci_high", "n"] + (["n_clusters"] if cluster else [])
    if not stats or frame.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for key, g in frame.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        cl = g[cluster].to_numpy() if cluster else None
        for s in stats:
            v = pd.to_numeric(g[s], errors="coerce").astype(float).to_numpy()
            mean, lo, hi = bootstrap_mean(v, n_boot=n_boot, ci=ci, seed=seed, clusters=cl)
            row = list(key) + [s, mean, lo, hi, int(np.isfinite(v).sum())]
            if cluster:
                row.append(int(pd.Series(cl[np.isfinite(v)]).nunique()))
            rows.append(row)
    return pd.DataFrame(rows, columns=cols)
