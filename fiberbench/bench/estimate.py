"""What a method's fibers say about each factor: how freely it varies inside them, relative to the world.

For every fiber and factor (:func:`fiber_factor_stats`): discrete factors (shape, colour, background,
mirror) use the plug-in entropy of the factor's labels among the fiber's samples over the *expected* plug-in
entropy of as many draws from the world (size-matched: 4 samples can show at most 2 bits however free the
factor is); continuous factors (size, x, y) the fiber's sample variance over the world's. Per factor the
estimate is the mean of the per-fiber ratios weighted by their sample counts (:func:`estimated_invariance`),
with a bootstrap CI over fibers (:func:`estimate_ci`): about 1 = as free as in the world, 0 = pinned.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..analysis.semantics import entropy_bits, expected_plugin_entropy
from ..errors import ConfigError, InputError
from ..toy import CHIRAL, CONTINUOUS, DISCRETE, FACTORS


def fiber_factor_stats(samples: pd.DataFrame, prior: pd.DataFrame, *, only_valid: bool = True,
                       min_samples: int = 3, n_mc: int = 4000, seed: int = 0) -> pd.DataFrame:
    """Per fiber and factor: how freely the factor varies inside the fiber relative to the prior.

    Args:
        samples: oracle frame of the fiber samples (``fiberbench.toy.load_oracle().predict``: one column
            per factor, ``valid``) plus a ``fiber`` column naming each sample's fiber.
        prior: oracle frame of the prior's samples (the reference distribution), same columns.
        only_valid: use only samples (and prior rows) with ``valid`` True.
        min_samples: fibers with fewer usable samples for a factor are skipped (an entropy or a
            variance needs at least 2; 2 samples give a very noisy ratio).

    Returns:
        One row per (fiber, factor) with ``n`` usable samples: ``statistic`` (``entropy_ratio`` |
        ``variance_ratio``), ``value`` (the fiber's entropy in bits / variance), ``baseline`` (the
        expected plug-in entropy of ``n`` prior draws / the prior's variance) and ``ratio`` = value /
        baseline (>= 0; ≈1 the factor is as free as in the prior, 0 it is fixed).
    """
    need = set(FACTORS) | {"fiber"} | ({"valid"} if only_valid else set())
    missing = need - set(samples.columns)
    if missing:
        raise InputError(f"samples frame lacks columns {sorted(missing)} (an oracle frame plus 'fiber')")
    missing = (set(FACTORS) | ({"valid"} if only_valid else set())) - set(prior.columns)
    if missing:
        raise InputError(f"prior frame lacks columns {sorted(missing)} (an oracle frame)")
    if min_samples < 2:
        raise ConfigError(f"min_samples must be >= 2, got {min_samples}")
    s = samples[samples["valid"].astype(bool)] if only_valid else samples
    p = prior[prior["valid"].astype(bool)] if only_valid else prior
    if len(p) < 2:
        raise InputError(f"the prior frame has {len(p)} usable rows; need >= 2")
    chiral_s = s["shape"].isin(CHIRAL)
    chiral_p = p["shape"].isin(CHIRAL)
    prior_p = {}
    for name in DISCRETE:
        col = p.loc[chiral_p, name] if name == "mirror" else p[name]
        prior_p[name] = col.value_counts().reindex(FACTORS[name], fill_value=0).to_numpy(float)
    prior_var = {name: float(p[name].var(ddof=1)) for name in CONTINUOUS}
    cache: dict[tuple[str, int], float] = {}
    rows = []
    for fiber, g in s.groupby("fiber", sort=True):
        for name in FACTORS:
            col = g.loc[chiral_s.loc[g.index], name] if name == "mirror" else g[name]
            m = len(col)
            if m < min_samples:
                continue
            if name in DISCRETE:
                counts = col.value_counts().reindex(FACTORS[name], fill_value=0).to_numpy(float)
                if (name, m) not in cache:
                    cache[(name, m)] = expected_plugin_entropy(prior_p[name], m, n_mc, seed) \
                        if prior_p[name].sum() > 0 else np.nan
                value = entropy_bits(counts[counts > 0] / counts.sum())
                baseline, stat = cache[(name, m)], "entropy_ratio"
            else:
                value, baseline, stat = float(col.var(ddof=1)), prior_var[name], "variance_ratio"
            ratio = value / baseline if baseline and baseline > 0 else np.nan
            rows.append((fiber, name, m, stat, value, baseline, ratio))
    return pd.DataFrame(rows, columns=["fiber", "factor", "n", "statistic", "value", "baseline", "ratio"])


def estimated_invariance(stats: pd.DataFrame) -> pd.DataFrame:
    """Per factor: ``estimated`` = mean per-fiber ratio weighted by the fiber's usable samples (small fibers
    give noisy ratios), ``fibers`` and ``samples`` it rests on.

    Factors with no usable fiber get ``estimated = NaN`` and ``fibers = 0``.
    """
    if stats.empty:
        agg = pd.DataFrame(columns=["estimated", "fibers", "samples"])
    else:
        ok = stats[np.isfinite(stats["ratio"].to_numpy(float))].assign(w=lambda d: d["ratio"] * d["n"])
        agg = ok.groupby("factor").agg(wsum=("w", "sum"), fibers=("ratio", "count"), samples=("n", "sum"))
        agg["estimated"] = agg["wsum"] / agg["samples"]
        agg = agg[["estimated", "fibers", "samples"]]
    agg = agg.reindex(list(FACTORS))
    agg["fibers"] = agg["fibers"].fillna(0).astype(int)
    agg["samples"] = agg["samples"].fillna(0).astype(int)
    return agg.rename_axis("factor").reset_index()


def estimate_ci(stats: pd.DataFrame, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per factor: percentile bootstrap CI of :func:`estimated_invariance`'s ``estimated``, fibers resampled
    with replacement (the fibers are the independent units). Columns ``factor, ci_low, ci_high``; NaN where
    a factor has fewer than two usable fibers."""
    rng = np.random.default_rng(seed)
    rows = []
    for name in FACTORS:
        g = stats[(stats["factor"] == name) & np.isfinite(stats["ratio"].to_numpy(float))]
        if len(g) < 2:
            rows.append((name, float("nan"), float("nan")))
            continue
        r, w = g["ratio"].to_numpy(float), g["n"].to_numpy(float)
        idx = rng.integers(0, len(g), size=(n_boot, len(g)))
        boot = (r[idx] * w[idx]).sum(1) / w[idx].sum(1)
        lo, hi = np.percentile(boot, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
        rows.append((name, float(lo), float(hi)))
    return pd.DataFrame(rows, columns=["factor", "ci_low", "ci_high"])
