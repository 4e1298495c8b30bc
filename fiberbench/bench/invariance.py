"""Ground-truth invariance benchmark: does a fiber sampler find the *true* invariances?

The shapes world (:mod:`fiberbench.toy.world`) knows every factor of every
image, so the invariances of an extractor can be measured exactly, and a fiber
sampler can be scored by how well the factors that vary inside its fibers
match them (``fiberbench bench invariance``).

Definitions
-----------
**True invariance** of extractor ``f`` to factor ``k`` is the **fiber truth**
(:mod:`fiberbench.bench.fiber_truth`): the same statistic the estimate below
computes, on exact samples of each reference's fiber (world scenes kept by
rejection when ``cos(f(x), f(x_ref)) >= 1 - DELTA``, the tolerance
``feature_match`` uses). It is what an exact fiber sampler converges to, so it
is what ``recovery_auroc`` and ``rank_correlation`` score against. Pairs with
``true >= 0.8`` are *invariant*, pairs with ``true <= 0.2`` *sensitive*; the
rest are partial and enter only the rank correlation.

Beside it, per pair, two intervention measures (``x`` a fresh render, ``x'``
the same scene with only ``k`` changed by :func:`fiberbench.toy.intervene`,
``x''`` an independent render; ``mirror`` on chiral shapes only):

- ``intervention = clip(1 - E||f(x') - f(x)|| / E||f(x'') - f(x)||, 0, 1)``:
  how *far* the features move, a graded quantity a fiber does not measure;
- ``t_delta = P[cos(f(x'), f(x)) >= 1 - DELTA]``: whether a one-factor change
  stays on the fiber, the fiber truth when one factor at a time is free.

**Estimated invariance** of a method (what its fibers say): for every
reference, the method draws ``n`` fiber samples; the oracle judges them
(:func:`fiberbench.toy.load_oracle`); per fiber and factor

- discrete factors (shape, colour, background, mirror): the plug-in entropy of
  the factor's oracle label among the fiber's samples divided by the *expected*
  plug-in entropy of the same number of draws from the prior's label
  distribution (size-matched: 4 samples can show at most 2 bits however free
  the factor is, so the ratio compares like with like;
  :func:`fiberbench.analysis.semantics.expected_plugin_entropy`);
- continuous factors (size, x, y): the fiber's sample variance of the oracle's
  regressed value (``ddof=1``, unbiased for any size) divided by its variance
  under the prior.

"The prior" is the data distribution the toy priors were trained on, seen
through the same judge: the oracle's labels of fresh renders. The per-factor
estimate is the mean of the per-fiber ratios weighted by their sample counts
(≈ 1: the factor varies inside fibers as freely as in the world, i.e. the
sampler says "invariant"; 0: fibers keep it fixed, "sensitive"). It is computed
on **oracle-valid samples only** (a junk image's labels say nothing about a
factor; fibers with fewer than ``min_samples`` (3) valid samples are skipped;
the counts are reported per pair); the same numbers on all samples are reported
beside them (``*_all_samples``). ``mirror`` uses only the samples the oracle
calls chiral.

Per method the benchmark reports ``recovery_auroc`` (AUROC of the estimate for
separating invariant from sensitive pairs; 0.5 = chance, 1 = perfect),
``rank_correlation`` (Spearman between estimated and true over every
extractor x factor pair with an estimate), ``feature_match`` (fraction of
samples with cosine >= 0.95 to the reference's features, as
:func:`fiberbench.analysis.toy_scores.oracle_fiber_metrics`), ``validity`` (oracle), ``seconds_per_sample``,
``training_seconds`` and the per-pair table.

The trained baseline, ``method: "conditional"`` (:mod:`fiberbench.baselines.conditional`):
a flow-matching generator conditioned on ``toy/shape-resnet``'s logits or
pre-logits, trained with a fiber-loss term. It exists only for the extractors it
was trained for; for every other extractor its ``per_extractor`` entry says
``"not trained for this extractor"`` and it contributes no pair. Its
``training_seconds`` is its training wall time (the training-free methods
report 0; both start from the same prior). Because it covers fewer pairs, every
method also gets ``on_conditional_extractors``: its scores on the same
extractors only.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import torch
from scipy.stats import spearmanr

from .. import plots
from ..baselines.conditional import NAME as CONDITIONAL_MODEL
from ..baselines.conditional import SPEC as CONDITIONAL_SPEC
from ..baselines.conditional import trained_for
from ..errors import ConfigError, InputError
from ..models import check_spec, load_extractor, load_prior
from ..sampling import METHODS, PRESETS, SAMPLERS, sample_fiber
from ..seeds import INVARIANCE_SEED_BASE
from ..toy import (
    CHIRAL,
    FACTORS,
    balanced_references,
    intervene,
    load_oracle,
    render,
    sample_factors,
)
from ..toy.cards import available
from .estimate import estimate_ci, estimated_invariance, fiber_factor_stats
from .fiber_truth import DELTA, POOL_SIZE, TRUTH_SAMPLES, TruthResult, compute_truth, intervention_t_delta

__all__ = [
    "EXTRACTORS", "INVARIANT", "SENSITIVE", "INVARIANCE_SEED_BASE", "intervention_set", "true_invariance",
    "balanced_references", "fiber_factor_stats", "estimated_invariance", "estimate_ci", "recovery_auroc",
    "rank_correlation", "rank_correlation_ceiling", "score_method", "invariance_figure", "run_invariance_bench",
    "compute_truth", "GRADED_EXTRACTORS",
]

# Mixtures of an extractor with the toy CLIP tower (``mix/`` specs): each leaves colour, background, size,
# position and mirror partly free, so the truth spreads over (0, 1) instead of two clusters near 0 and 1. With
# these five the ideal estimator's Spearman at 12 x 8 is 0.968 (5th percentile 0.950; the five plain
# extractors plus three mixtures: 0.942), measured on the shipped truth (docs/invariance_bench.md).
GRADED_EXTRACTORS = ("mix/0.79*toy/shape-resnet@logits+0.21*toy/clip@embed",
                     "mix/0.75*toy/shape-resnet@logits+0.25*toy/clip@embed",
                     "mix/0.71*toy/shape-resnet@logits+0.29*toy/clip@embed",
                     "mix/0.7*toy/simclr-resnet@embed+0.3*toy/clip@embed",
                     "mix/0.5*toy/shape-resnet@pre_logits+0.5*toy/clip@embed")
EXTRACTORS = ("toy/shape-resnet@logits", "toy/shape-resnet@pre_logits", "toy/color-vit@logits",
              "toy/simclr-resnet@embed", "toy/clip@embed") + GRADED_EXTRACTORS
# computed fiber truths are kept here between runs (the default settings' ship in data/bench/fiber_truth.json)
DEFAULT_TRUTH_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fiberbench" / \
    "fiber_truth.json"
INVARIANT = 0.8   # true score >= this: the extractor is invariant to the factor
SENSITIVE = 0.2   # true score <= this: the extractor is sensitive to it


# --------------------------------------------------------------------------- ground truth

def intervention_set(n: int, seed: int = 0) -> dict[str, Any]:
    """Renders for the intervention measure (deterministic per ``seed``).

    Returns ``{"x": [n,3,32,32], "other": [n,3,32,32]`` (independent renders), ``"factors"``: DataFrame,
    ``"changed": {factor: (rows [m] int64, images [m,3,32,32])}``}: for each factor the rows of ``x``
    it applies to (``mirror``: chiral shapes only) and their renders with only that factor changed.
    All images in [0, 1].
    """
    if n < 2:
        raise ConfigError(f"the intervention measure needs n >= 2 references, got {n}")
    base = INVARIANCE_SEED_BASE + 1000 * seed
    f = sample_factors(n, base)
    changed = {}
    for k, name in enumerate(FACTORS):
        rows = np.flatnonzero(f["shape"].isin(CHIRAL).to_numpy()) if name == "mirror" else np.arange(n)
        g = f.iloc[rows].reset_index(drop=True)
        changed[name] = (rows, render(intervene(g, name, seed=base + 10 + k)))
    return {"x": render(f), "other": render(sample_factors(n, base + 1)), "factors": f, "changed": changed}


@torch.no_grad()
def _features(extractor, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([extractor(c).float() for c in images.split(batch_size)])


def true_invariance(extractors: Mapping[str, Any], n: int = 512, seed: int = 0,
                    data: dict[str, Any] | None = None) -> pd.DataFrame:
    """True invariance of each extractor to each world factor, by intervention.

    Args:
        extractors: ``{spec: Extractor}`` (images ``[N,3,32,32]`` in [0,1] -> ``[N,D]``).
        n: references (``mirror`` uses the ~n/4 chiral ones).
        data: a precomputed :func:`intervention_set` (else built from ``n`` and ``seed``).

    Returns:
        One row per (extractor, factor): ``n`` (pairs), ``change_intervention`` = E||f(x') - f(x)||,
        ``change_resample`` = E||f(x'') - f(x)|| over the same rows, ``ratio`` (their quotient, >= 0),
        ``true_invariance = clip(1 - ratio, 0, 1)`` and ``t_delta`` (the fraction of interventions that keep
        ``cos(f(x'), f(x)) >= 0.95``, :func:`~fiberbench.bench.fiber_truth.intervention_t_delta`).
    """
    data = data or intervention_set(n, seed)
    rows = []
    for spec, ext in extractors.items():
        t_delta = intervention_t_delta(ext, data)
        fx = _features(ext, data["x"])
        fo = _features(ext, data["other"])
        resample = (fo - fx).norm(dim=-1)
        for name, (idx, imgs) in data["changed"].items():
            idx_t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
            if len(idx_t) == 0:
                rows.append((spec, name, 0, np.nan, np.nan, np.nan, np.nan, np.nan))
                continue
            move = (_features(ext, imgs) - fx[idx_t]).norm(dim=-1).mean()
            base = resample[idx_t].mean()
            ratio = float(move / base) if float(base) > 0 else np.nan
            rows.append((spec, name, len(idx_t), float(move), float(base), ratio, float(np.clip(1 - ratio, 0, 1)),
                         t_delta[name]))
    return pd.DataFrame(rows, columns=["extractor", "factor", "n", "change_intervention", "change_resample",
                                       "ratio", "true_invariance", "t_delta"])


# --------------------------------------------------------------------------- what a method estimates

def _prior_labels(oracle, n: int = 1024, seed: int = 0) -> pd.DataFrame:
    """The oracle's judgement of ``n`` fresh renders: the world distribution through the same judge."""
    return oracle.predict(render(sample_factors(n, INVARIANCE_SEED_BASE + 900 + 1000 * seed)))


# --------------------------------------------------------------------------- scores

def recovery_auroc(true: Sequence[float], estimated: Sequence[float], *, invariant: float = INVARIANT,
                   sensitive: float = SENSITIVE) -> float:
    """AUROC of ``estimated`` telling invariant pairs (true >= ``invariant``) from sensitive ones (<= ``sensitive``).

    Mann-Whitney form with ties counted 1/2: the probability that a random invariant pair gets a higher
    estimate than a random sensitive one. Pairs with a NaN estimate or a partial true score are left
    out; NaN when either class is empty. In [0, 1].
    """
    t = np.asarray(true, float)
    e = np.asarray(estimated, float)
    ok = np.isfinite(t) & np.isfinite(e)
    pos, neg = e[ok & (t >= invariant)], e[ok & (t <= sensitive)]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def rank_correlation(true: Sequence[float], estimated: Sequence[float]) -> float:
    """Spearman correlation (ties averaged) over pairs where both are finite; NaN if < 3 pairs or constant."""
    t = np.asarray(true, float)
    e = np.asarray(estimated, float)
    ok = np.isfinite(t) & np.isfinite(e)
    if ok.sum() < 3 or np.ptp(t[ok]) == 0 or np.ptp(e[ok]) == 0:
        return float("nan")
    return float(spearmanr(t[ok], e[ok]).statistic)


def rank_correlation_ceiling(true: Sequence[float], estimated: Sequence[float] | None = None, *,
                             invariant: float = INVARIANT) -> float:
    """Spearman of an *ideal* fiber estimator against ``true``: the best a fiber sampler can score here.

    A fiber is a set of images whose features match the reference's within a tolerance; every factor
    whose change keeps the features inside it is free in the fiber. The ideal estimator therefore
    reports the true score on every pair below ``invariant`` (it sees exactly how much a partial or
    sensitive factor is pinned) and full freedom, 1.0, tied, on every invariant pair (a factor that
    moves the features by 3 % or by 13 % of a full resample is equally free inside the fiber). Its
    Spearman is below 1 whenever the invariant pairs' true scores differ: the within-group order is
    the extractor's feature geometry, which fiber membership does not see. Pairs where ``estimated``
    (if given) is NaN are left out, so a method's ceiling is over the pairs it estimated. In [-1, 1].
    """
    t = np.asarray(true, float)
    ok = np.isfinite(t)
    if estimated is not None:
        ok &= np.isfinite(np.asarray(estimated, float))
    ideal = np.where(t >= invariant, 1.0, t)
    return rank_correlation(t[ok], ideal[ok])


def score_method(pairs: pd.DataFrame, truth: TruthResult | None = None) -> dict[str, Any]:
    """The headline numbers of one method's pair table (columns ``true_invariance`` = the fiber truth,
    ``estimated``, ``estimated_all_samples``, and where present ``intervention`` / ``t_delta``): AUROC and
    Spearman on valid samples and on all samples, Spearman against the other truths, counts, and the ideal
    estimator's Spearman over the pairs this method estimated (``rank_correlation_ceiling``, from ``truth``)."""
    t = pairs["true_invariance"].to_numpy(float)
    e = pairs["estimated"].to_numpy(float)
    ea = pairs["estimated_all_samples"].to_numpy(float)
    cls = np.where(t >= INVARIANT, "invariant", np.where(t <= SENSITIVE, "sensitive", "partial"))
    out = {
        "recovery_auroc": recovery_auroc(t, e),
        "rank_correlation": rank_correlation(t, e),
        "rank_correlation_ceiling": float("nan"),
        "recovery_auroc_all_samples": recovery_auroc(t, ea),
        "rank_correlation_all_samples": rank_correlation(t, ea),
        "pairs": int(len(pairs)),
        "pairs_estimated": int(np.isfinite(e).sum()),
        "pairs_invariant": int((cls == "invariant").sum()),
        "pairs_sensitive": int((cls == "sensitive").sum()),
    }
    if truth is not None and len(pairs):
        ceiling = truth.ceiling(pairs[np.isfinite(e)])
        out["rank_correlation_ceiling"] = ceiling["median"]
        out["rank_correlation_ceiling_p05_p95"] = [ceiling["p05"], ceiling["p95"]]
    for other in ("intervention", "t_delta"):
        if other in pairs:
            o = pairs[other].to_numpy(float)
            out[f"rank_correlation_{other}"] = rank_correlation(o, e)
    if "intervention" in pairs:
        out["rank_correlation_intervention_ceiling"] = rank_correlation_ceiling(
            pairs["intervention"].to_numpy(float), e)
    if "ci_misses_truth" in pairs:
        out["pairs_ci_misses_truth"] = int(pairs["ci_misses_truth"].fillna(False).astype(bool).sum())
    return out


# --------------------------------------------------------------------------- figure

def invariance_figure(pairs: pd.DataFrame, *, title: str = "estimated vs true invariance per extractor x factor"):
    """Plotly scatter, one panel per method: the fiber truth (x) vs the method's estimate (y).

    ``pairs``: long frame with ``method, extractor, factor, true_invariance, estimated`` (and, when present,
    ``ci_low, ci_high``: the estimate's bootstrap CI, drawn as error bars, and ``ci_misses_truth``: such pairs
    get an open marker). Shaded bands mark the sensitive (<= 0.2) and invariant (>= 0.8) ranges of the truth;
    the dashed line is y = x.
    """
    need = {"method", "extractor", "factor", "true_invariance", "estimated"}
    if need - set(pairs.columns):
        raise InputError(f"pairs frame lacks columns {sorted(need - set(pairs.columns))}")
    df = pairs.copy()
    df["extractor"] = df["extractor"].str.replace("toy/", "", regex=False)
    methods = list(dict.fromkeys(df["method"]))
    kw: dict[str, Any] = {"symbol": "extractor"}
    if {"ci_low", "ci_high"} <= set(df.columns):
        df["ci_plus"] = (df["ci_high"] - df["estimated"]).clip(lower=0)
        df["ci_minus"] = (df["estimated"] - df["ci_low"]).clip(lower=0)
        kw = {"error_y": "ci_plus", "error_y_minus": "ci_minus"}
        if "ci_misses_truth" in df:
            df["CI"] = np.where(df["ci_misses_truth"].fillna(False).astype(bool), "misses the truth", "covers it")
            kw.update(symbol="CI", symbol_map={"misses the truth": "circle-open", "covers it": "circle"})
    hover = [c for c in ("extractor", "factor", "fibers", "samples", "intervention", "t_delta") if c in df]
    fig = px.scatter(df, x="true_invariance", y="estimated", color="factor", facet_col="method",
                     facet_col_wrap=min(3, len(methods)), category_orders={"method": methods}, hover_data=hover,
                     title=title, range_x=[-0.05, 1.05], **kw)
    ymax = float(np.nanmax(np.r_[df["estimated"].to_numpy(float), 1.0])) * 1.05 + 0.05
    fig.update_yaxes(range=[-0.05, ymax], title_text="")
    fig.update_yaxes(title_text="estimated", col=1)  # facet axes share it: once per row, at the left
    fig.update_xaxes(title_text="fiber truth")
    for band in ((-0.05, SENSITIVE), (INVARIANT, 1.05)):
        fig.add_vrect(x0=band[0], x1=band[1], fillcolor="gray", opacity=0.12, line_width=0, row="all", col="all")
    fig.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line=dict(dash="dash", color="gray", width=1),
                  row="all", col="all")
    fig.update_traces(marker=dict(size=9, line=dict(width=1)))
    fig.update_layout(width=1100, height=380 * ((len(methods) + 2) // 3) + 80, template="plotly_white",
                      legend=dict(font=dict(size=10)))
    return fig


def save_report_figure(fig, out_dir: Path, name: str) -> dict[str, Any]:
    """Write ``fig`` as ``<name>.html`` (plotly) and ``<name>.png`` (offline export) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    html = out_dir / f"{name}.html"
    fig.write_html(str(html), include_plotlyjs="cdn")
    info: dict[str, Any] = {"html": str(html)}
    try:
        res = plots.save_figure(fig, out_dir / f"{name}.png")
        info.update(png=str(res["path"]), png_engine=res["engine"], png_fallback_reason=res["fallback_reason"])
    except Exception as e:  # noqa: BLE001 - the HTML is the primary output; say why the PNG is missing
        info.update(png=None, png_error=f"{type(e).__name__}: {e}")
    return info


# --------------------------------------------------------------------------- the benchmark

# The key setting of each method. ndtm: the toy preset (what sample_fiber uses on the toy priors by default);
# the trained baseline with classifier-free guidance 2.0 (chosen on its card's seeds); the rest at their defaults.
SETTINGS = {
    "ndtm": {"preset": "toy"},
    "dps": {},
    "metamer": {},
    "unguided": {},
    "conditional": {"guidance": 2.0},
}
DEFAULT_METHODS = ("ndtm", "dps", "metamer", "unguided")
CONDITIONAL = "conditional"
NOT_TRAINED = "not trained for this extractor"
_PAIR_COLUMNS = ["method", "extractor", "factor", "true_invariance", "intervention", "t_delta", "estimated",
                 "ci_low", "ci_high", "ci_misses_truth", "fibers", "samples", "estimated_all_samples", "samples_all"]


def run_invariance_bench(quick: bool = False, seed: int = 0, *,
                         methods: Sequence[str] | None = None,
                         extractors: Sequence[str] | None = None, prior: Any = "toy/prior-fm",
                         references: int | None = None, n: int | None = None, steps: int | None = None,
                         truth_n: int | None = None, prior_n: int = 1024,
                         settings: Mapping[str, Mapping[str, Any]] | None = None,
                         save_to: str | Path | None = "out/bench", min_samples: int = 3,
                         progress: bool = False, pool_size: int = POOL_SIZE, truth_samples: int = TRUTH_SAMPLES,
                         truth_cache: str | Path | None = DEFAULT_TRUTH_CACHE) -> dict[str, Any]:
    """Score fiber samplers against the true invariances of the toy extractors.

    Args:
        quick: 8 references x 4 samples, 256 intervention references (default 12 x 8, 1000).
        seed: one seed for references, interventions and samples; outputs other than timings are
            identical per seed.
        methods: registered sampler names (training-free ones and/or ``"conditional"``, the trained
            baseline); each runs with ``SETTINGS[method]`` updated by ``settings[method]``. Default: ndtm,
            dps, metamer, unguided, plus conditional when its model is shipped.
        extractors: spec strings (default :data:`EXTRACTORS`, skipping toy models not shipped yet).
        prior: a spec string or a loaded :class:`~fiberbench.models.prior.Prior`.
        references, n, steps, truth_n: override the sizes (``steps`` default: the toy preset's).
        prior_n: fresh renders judged by the oracle as the prior's label distribution.
        save_to: folder for ``invariance.html`` / ``invariance.png`` (``None``: no figure).
        pool_size, truth_samples: the world pool and the exact fiber draws per reference behind the fiber
            truth (:mod:`fiberbench.bench.fiber_truth`); ``truth_cache``: the JSON file that keeps computed
            truths (the default settings' truths ship in ``data/bench/fiber_truth.json``).

    Returns:
        ``{method: {"recovery_auroc", "rank_correlation", "rank_correlation_ceiling", …, "feature_match",
        "validity", "seconds_per_sample", "per_extractor": [...], "table": [one dict per extractor x factor
        pair], "settings", "run"}}`` (strict JSON: a missing value is ``None``; ``run`` holds the sizes, the
        truths and the figure paths).
    """
    methods = _check_methods(methods)
    settings = {m: {**SETTINGS.get(m, {}), **dict((settings or {}).get(m, {}))} for m in methods}
    extractors = list(extractors) if extractors is not None else _shipped(EXTRACTORS)
    if not extractors:
        raise ConfigError("no extractor to benchmark (are the toy models in data/models?)")
    B, n = references or (8 if quick else 12), n or (4 if quick else 8)
    truth_n = truth_n or (256 if quick else 1000)
    steps = steps or PRESETS["toy"]["steps"]
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    bench = _prepare(extractors, B, n, seed, truth_n, prior_n, min_samples, progress, pool_size, truth_samples,
                     truth_cache)
    t_truth = time.perf_counter() - t_start
    p = load_prior(prior) if isinstance(prior, str) else prior
    cond_prior = load_prior(CONDITIONAL_SPEC) if CONDITIONAL in methods else None
    out: dict[str, Any] = {}
    all_pairs = []
    for method in methods:
        kw = {"steps": steps, **settings[method]}
        out[method], table = _run_method(bench, method, cond_prior if method == CONDITIONAL else p, kw)
        all_pairs.append(table)
    if cond_prior is not None:
        _add_conditional_subset_scores(out, cond_prior.card)
    run = {"references": B, "n": n, "steps": steps, "truth_n": truth_n, "prior_n": prior_n,
           "prior": prior if isinstance(prior, str) else getattr(prior, "spec", type(prior).__name__),
           "seed": seed, "extractors": list(extractors),
           "reference_seed": INVARIANCE_SEED_BASE + 500 + 1000 * seed,
           "intervention_seed": INVARIANCE_SEED_BASE + 1000 * seed, "min_samples": min_samples,
           "thresholds": {"invariant": INVARIANT, "sensitive": SENSITIVE},
           "truth_seconds": t_truth, "true_invariance": bench.truth.to_dict(orient="records"),
           "fiber_truth": bench.fiber_truth.to_dict(orient="records"),
           "fiber_truth_settings": {"pool_size": pool_size, "truth_samples": truth_samples, "delta": DELTA,
                                    "kept_per_reference": bench.truth_result.kept},
           "rank_correlation_ceiling": bench.truth_result.ceiling()}
    if save_to is not None:
        fig = invariance_figure(pd.concat([t for t in all_pairs if len(t)], ignore_index=True))
        run["figure"] = save_report_figure(fig, Path(save_to), "invariance" + ("_quick" if quick else ""))
    run["seconds"] = time.perf_counter() - t_start
    for m in out.values():
        m["run"] = run
    return _json_safe(out)


def _shipped(specs: Sequence[str]) -> list[str]:
    """The specs whose models are all here (a toy model not shipped yet drops its extractors)."""
    out = []
    for spec in specs:
        try:
            check_spec(spec, "extractor")
        except ConfigError:
            continue
        out.append(spec)
    return out


def _prepare(extractors: Sequence[str], B: int, n: int, seed: int, truth_n: int, prior_n: int, min_samples: int,
             progress: bool, pool_size: int, truth_samples: int, truth_cache) -> _Bench:
    """Load the extractors and the oracle; the references; the intervention truths and the fiber truth."""
    exts = {spec: load_extractor(spec) for spec in extractors}
    truth = true_invariance(exts, n=truth_n, seed=seed)
    refs = balanced_references(B, seed)
    fiber = compute_truth(exts, refs[0], INVARIANCE_SEED_BASE + 500 + 1000 * seed, n, pool_size=pool_size,
                          truth_samples=truth_samples, seed=seed,
                          cache=Path(truth_cache) if truth_cache is not None else None,
                          log=print if progress else None)
    oracle = load_oracle()
    return _Bench(truth=truth, fiber_truth=fiber.frame, truth_result=fiber, exts=exts, oracle=oracle, refs=refs,
                  n=n, seed=seed, prior_labels=_prior_labels(oracle, n=prior_n, seed=seed),
                  min_samples=min_samples, progress=progress)


def _check_methods(methods: Sequence[str] | None) -> tuple[str, ...]:
    """The methods to run (default: the training-free ones, plus the trained baseline when it is shipped)."""
    if methods is None:
        return DEFAULT_METHODS + ((CONDITIONAL,) if CONDITIONAL_MODEL in available() else ())
    bad = [m for m in methods if m not in SAMPLERS]
    if bad:
        raise ConfigError(f"unknown method(s) {bad}; choose from {list(METHODS) + [CONDITIONAL]}")
    if CONDITIONAL in methods and CONDITIONAL_MODEL not in available():
        raise ConfigError(f"method 'conditional' needs the trained model {CONDITIONAL_SPEC} in data/models "
                          f"(train it with fiberbench.training.conditional.train_conditional)")
    return tuple(methods)


@dataclass
class _Bench:
    """What every method of one benchmark run is scored against."""

    truth: pd.DataFrame  # intervention score and T_delta (true_invariance)
    fiber_truth: pd.DataFrame  # the fiber truth (fiber_truth.compute_truth)
    truth_result: TruthResult
    exts: dict[str, Any]
    oracle: Any
    refs: tuple[torch.Tensor, pd.DataFrame]  # (images [B,3,32,32] in [0,1], their factors)
    n: int
    seed: int
    prior_labels: pd.DataFrame
    min_samples: int
    progress: bool


def _run_method(bench: _Bench, method: str, prior, kw: dict[str, Any]) -> tuple[dict[str, Any], pd.DataFrame]:
    """One method on every extractor: its scores (per extractor and overall) and its pair table."""
    refs, ref_factors = bench.refs
    B, n = refs.shape[0], bench.n
    per_ext, pairs, secs_total, samples_total = [], [], 0.0, 0
    for spec, ext in bench.exts.items():
        if SAMPLERS[method].trained and not trained_for(prior.card, spec):
            per_ext.append({"extractor": spec, "status": NOT_TRAINED})
            continue
        t0 = time.perf_counter()
        res = sample_fiber(prior, ext, refs, n=n, method=method, seed=bench.seed, progress=bench.progress,
                           batch_size=64, **kw)
        secs = time.perf_counter() - t0
        secs_total += secs
        samples_total += B * n
        pred = bench.oracle.predict(res.images)
        pred["fiber"] = np.repeat(np.arange(B), n)
        pairs += _pairs(bench, method, spec, pred)
        per_ext.append({"extractor": spec, "feature_match": float((res.cosine >= 0.95).float().mean()),
                        "mean_cosine": float(res.cosine.mean()), "validity": float(pred["valid"].mean()),
                        "shape_kept": float((pred["shape"].to_numpy()
                                             == np.repeat(ref_factors["shape"].to_numpy(), n)).mean()),
                        "seconds_per_sample": secs / (B * n)})
    table = pd.DataFrame(pairs, columns=_PAIR_COLUMNS)
    m = score_method(table, bench.truth_result)
    scored = [e for e in per_ext if "feature_match" in e]
    m["feature_match"] = float(np.mean([e["feature_match"] for e in scored])) if scored else float("nan")
    m["validity"] = float(np.mean([e["validity"] for e in scored])) if scored else float("nan")
    m["seconds_per_sample"] = secs_total / samples_total if samples_total else float("nan")
    m.update(_training_info(method, prior))
    m["per_extractor"] = per_ext
    m["table"] = table.drop(columns="method").to_dict(orient="records")
    m["settings"] = {k: v for k, v in kw.items()}
    return m, table


def _pairs(bench: _Bench, method: str, spec: str, pred: pd.DataFrame) -> list[dict[str, Any]]:
    """The extractor x factor rows of one method on one extractor: the estimate on valid samples with its
    bootstrap CI, the estimate on all samples, and the three truths."""
    stats = fiber_factor_stats(pred, bench.prior_labels, min_samples=bench.min_samples, seed=bench.seed)
    est = estimated_invariance(stats).merge(estimate_ci(stats, seed=bench.seed), on="factor")
    est_all = estimated_invariance(fiber_factor_stats(pred, bench.prior_labels, only_valid=False,
                                                      min_samples=bench.min_samples, seed=bench.seed))
    fiber = bench.fiber_truth[bench.fiber_truth["extractor"] == spec].set_index("factor")
    tr = bench.truth[bench.truth["extractor"] == spec].set_index("factor")
    rows = []
    for row, row_all in zip(est.itertuples(index=False), est_all.itertuples(index=False)):
        truth = float(fiber.loc[row.factor, "fiber_truth"])
        lo, hi = float(row.ci_low), float(row.ci_high)
        misses = bool(np.isfinite(lo) and np.isfinite(truth) and not lo - 1e-9 <= truth <= hi + 1e-9)
        rows.append({"method": method, "extractor": spec, "factor": row.factor, "true_invariance": truth,
                     "intervention": float(tr.loc[row.factor, "true_invariance"]),
                     "t_delta": float(tr.loc[row.factor, "t_delta"]), "estimated": float(row.estimated),
                     "ci_low": lo, "ci_high": hi, "ci_misses_truth": misses, "fibers": int(row.fibers),
                     "samples": int(row.samples), "estimated_all_samples": float(row_all.estimated),
                     "samples_all": int(row_all.samples)})
    return rows


def _training_info(method: str, prior) -> dict[str, Any]:
    """``training_seconds`` of a method: the trained model's training wall time, 0 for training-free ones
    (all start from the same toy prior, whose training is not counted for either)."""
    if not SAMPLERS[method].trained:
        return {"training_seconds": 0.0}
    card = prior.card
    tr = card["training"]
    cond = card["architecture"]["config"]["condition"]
    return {"training_seconds": float(tr["seconds"]),
            "training": {"model": card["spec"], "steps": tr["steps"], "seconds": tr["seconds"],
                         "trained_for": [f"{cond['extractor']}@{layer}" for layer in cond["dims"]],
                         "initialised_from": card.get("initialised_from")}}


def _add_conditional_subset_scores(out: dict[str, Any], card: dict[str, Any]) -> None:
    """Every method's scores on the extractors the conditional model covers (``on_conditional_extractors``)."""
    for m in out.values():
        table = pd.DataFrame(m["table"], columns=_PAIR_COLUMNS[1:])
        keep = [trained_for(card, spec) for spec in table["extractor"]]
        sub = table[keep]
        exts = [e for e in m["per_extractor"] if "feature_match" in e and trained_for(card, e["extractor"])]
        s = score_method(sub)
        m["on_conditional_extractors"] = {
            "extractors": sorted(set(sub["extractor"])),
            "recovery_auroc": s["recovery_auroc"], "rank_correlation": s["rank_correlation"],
            "pairs_estimated": s["pairs_estimated"],
            "feature_match": float(np.mean([e["feature_match"] for e in exts])) if exts else float("nan"),
            "validity": float(np.mean([e["validity"] for e in exts])) if exts else float("nan"),
            "shape_kept": float(np.mean([e["shape_kept"] for e in exts])) if exts else float("nan"),
        }


def _json_safe(obj):
    """NaN -> None (strict JSON has no NaN: a missing estimate prints as null)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
