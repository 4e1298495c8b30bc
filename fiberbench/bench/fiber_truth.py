"""The fiber truth: what an *exact* fiber sampler reports, drawn by rejection from the shapes world.

A fiber sampler is asked for images ``x`` of the world with ``cos(f(x), f(x_ref)) >= 1 - delta``. On the
toy world such images can be drawn exactly, without any prior or guidance: render a large pool of scenes
from the world distribution and keep those whose features lie within ``delta`` of the reference's (plain
rejection sampling; the kept scenes *are* samples of the fiber under the data distribution). Feeding them to
the same statistic the benchmark computes from a method's samples
(:func:`fiberbench.bench.invariance.fiber_factor_stats`: per factor, how freely it varies inside the fiber
relative to the world) gives the value an ideal sampler converges to: the **fiber truth** of each
extractor x factor pair. A method is scored by how well its estimates rank like it.

The same rejection draws, at the benchmark's own sample counts, are the *ideal estimator*: its rank
correlation with the truth (:func:`ideal_ceiling`) is the best any sampler can score with so few samples.

Beside it :func:`intervention_t_delta` gives ``T_delta(k) = P[cos(f(x'), f(x)) >= 1 - delta]``, the chance that
changing only factor ``k`` of a world scene keeps its features on the fiber. It is what the fiber truth
becomes when one factor at a time is free; when several factors share the tolerance (a mixture of a
classifier with the CLIP tower leaves colour, background, size and position all partly free), each one
moves less inside the fiber than it could alone, and the fiber truth is the lower, correct value.

The pool's features are the slow part (a few minutes for 100 000 scenes and the benchmark's extractors on
two cores); :func:`fiber_truth` keeps its results in a JSON cache keyed by everything they depend on (the
weights' checksums, the references, the pool, ``delta``), and ``data/bench/fiber_truth.json`` ships the
default settings' tables.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from ..errors import ConfigError
from ..identity import content_key
from ..models import weights_checksum
from ..models.sources.mix import MixtureExtractor
from ..seeds import INVARIANCE_SEED_BASE
from ..toy import FACTORS, render, sample_factors
from .estimate import estimated_invariance, fiber_factor_stats

DELTA = 0.05  # on the fiber: cosine >= 1 - DELTA, the tolerance of feature_match
POOL_SIZE = 100_000  # world scenes drawn once; the rarest fibers of the benchmark keep >= 16 of them
POOL_SEED = INVARIANCE_SEED_BASE + 700
TRUTH_SAMPLES = 256  # exact fiber samples per reference behind the truth (fewer where fewer are kept)
MIN_TRUTH_SAMPLES = 8
FORMAT = 1  # bump when the truth's definition changes: old cache entries are then ignored
SHIPPED = Path(__file__).resolve().parents[2] / "data" / "bench" / "fiber_truth.json"


def world_pool(size: int = POOL_SIZE, seed: int = POOL_SEED) -> pd.DataFrame:
    """``size`` scenes of the world distribution (factor rows; rendered only chunk by chunk)."""
    return sample_factors(size, seed)


def base_parts(extractor) -> list[Any]:
    """The plain extractors behind ``extractor`` (a mixture's parts, else itself)."""
    return list(extractor.parts) if isinstance(extractor, MixtureExtractor) else [extractor]


@torch.no_grad()
def pool_features(extractors: Sequence[Any], pool: pd.DataFrame, memo: dict[str, torch.Tensor] | None = None,
                  chunk: int = 5000) -> dict[str, torch.Tensor]:
    """Unit-norm features ``[len(pool), D]`` (float32) of the pool's renders, per extractor spec.

    Each chunk of the pool is rendered once for all extractors; a mixture combines its parts' features (as
    :class:`~fiberbench.models.sources.mix.MixtureExtractor` does); ``memo`` (spec -> features) is reused.
    """
    memo = {} if memo is None else memo
    bases = {getattr(b, "spec", str(id(b))): b for e in extractors for b in base_parts(e)}
    todo = {spec: b for spec, b in bases.items() if spec not in memo}
    outs: dict[str, list[torch.Tensor]] = {spec: [] for spec in todo}
    for start in range(0, len(pool) if todo else 0, chunk):
        x = render(pool.iloc[start:start + chunk].reset_index(drop=True))
        for spec, b in todo.items():
            outs[spec].append(F.normalize(b(x.to(b.device)).float().cpu(), dim=-1))
    memo.update({spec: torch.cat(v) for spec, v in outs.items()})
    result = {}
    for e in extractors:
        if isinstance(e, MixtureExtractor):
            result[e.spec] = torch.cat([s * memo[p.spec] for s, p in zip(e.scales.cpu(), e.parts)], dim=-1)
        else:
            result[e.spec] = memo[getattr(e, "spec", str(id(e)))]
    return result


def exact_fibers(ref_feats: torch.Tensor, pool_feats: torch.Tensor, delta: float = DELTA) -> list[np.ndarray]:
    """Per reference, the pool rows on its fiber: ``cos >= 1 - delta`` (``ref_feats [B,D]``, any norm)."""
    refs = F.normalize(ref_feats.float().cpu(), dim=-1)
    return [np.flatnonzero((pool_feats @ r >= 1 - delta).numpy()) for r in refs]


def factor_frame(factors: pd.DataFrame, fibers: Sequence[np.ndarray]) -> pd.DataFrame:
    """Samples frame for :func:`~fiberbench.bench.invariance.fiber_factor_stats` from exact fiber draws: the
    true factors of the drawn scenes, ``valid`` True (they are renders), ``fiber`` = the reference index."""
    parts = [factors.iloc[idx].assign(fiber=i) for i, idx in enumerate(fibers) if len(idx)]
    if not parts:
        return pd.DataFrame(columns=[*FACTORS, "valid", "fiber"])
    return pd.concat(parts, ignore_index=True).assign(valid=True)


def intervention_t_delta(extractor, data: Mapping[str, Any], delta: float = DELTA) -> dict[str, float]:
    """``T_delta(k)`` per factor: the fraction of single-factor interventions of
    :func:`~fiberbench.bench.invariance.intervention_set` that keep ``cos(f(x'), f(x)) >= 1 - delta``."""
    with torch.no_grad():
        fx = torch.cat([extractor(c).float() for c in data["x"].split(256)])
        out = {}
        for name, (idx, imgs) in data["changed"].items():
            if len(idx) == 0:
                out[name] = float("nan")
                continue
            fk = torch.cat([extractor(c).float() for c in imgs.split(256)])
            cos = F.cosine_similarity(fk, fx[torch.as_tensor(np.asarray(idx))], dim=-1)
            out[name] = float((cos >= 1 - delta).float().mean())
    return out


def cache_key(spec: str, ref_seed: int, references: int, settings: Mapping[str, Any]) -> str:
    """What a truth table depends on: the extractor's weights, the references, the pool and the definition."""
    return content_key({"spec": spec, "weights": weights_checksum(spec), "ref_seed": ref_seed,
                        "references": references, "format": FORMAT, **settings})


def read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_cache(path: Path, entries: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    old = read_cache(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**old, **entries}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def estimate_from_draws(factors: pd.DataFrame, fibers: Sequence[np.ndarray], prior: pd.DataFrame, seed: int,
                        min_samples: int = 3) -> dict[str, float]:
    """The benchmark's per-factor estimate from exact fiber draws (rows of ``factors``), as for a method."""
    stats = fiber_factor_stats(factor_frame(factors, fibers), prior, min_samples=min_samples, seed=seed)
    est = estimated_invariance(stats)
    return {r.factor: float(r.estimated) for r in est.itertuples(index=False)}


def ideal_estimates(factors: pd.DataFrame, fibers: Sequence[np.ndarray], prior: pd.DataFrame, n: int,
                    rng: np.random.Generator, seed: int) -> dict[str, float]:
    """The benchmark's estimate from ``n`` exact draws per fiber (fibers with fewer than ``n`` kept scenes are
    left out, as a sampler's fiber with too few valid samples is)."""
    picks = [rng.choice(idx, n, replace=False) if len(idx) >= n else np.array([], int) for idx in fibers]
    return estimate_from_draws(factors, picks, prior, seed)


def ideal_ceiling(truth: pd.DataFrame, draws: Sequence[pd.DataFrame]) -> dict[str, float]:
    """Spearman of ideal estimates (one frame ``extractor, factor, estimated`` per draw) with ``truth``
    (``extractor, factor, fiber_truth``): median and 5th / 95th percentile over the draws."""
    rhos = []
    for est in draws:
        m = truth.merge(est, on=["extractor", "factor"])
        ok = np.isfinite(m["fiber_truth"].to_numpy(float)) & np.isfinite(m["estimated"].to_numpy(float))
        if ok.sum() >= 3:
            rhos.append(float(spearmanr(m.loc[ok, "fiber_truth"], m.loc[ok, "estimated"]).statistic))
    if not rhos:
        return {"median": float("nan"), "p05": float("nan"), "p95": float("nan"), "draws": 0}
    return {"median": float(np.median(rhos)), "p05": float(np.percentile(rhos, 5)),
            "p95": float(np.percentile(rhos, 95)), "draws": len(rhos)}


def check_settings(pool_size: int, truth_samples: int, delta: float) -> None:
    if not (isinstance(pool_size, int) and pool_size >= 100):
        raise ConfigError(f"pool_size must be an integer >= 100, got {pool_size!r}")
    if not (isinstance(truth_samples, int) and truth_samples >= MIN_TRUTH_SAMPLES):
        raise ConfigError(f"truth_samples must be an integer >= {MIN_TRUTH_SAMPLES}, got {truth_samples!r}")
    if not (0 < delta < 2):
        raise ConfigError(f"delta must be in (0, 2), got {delta!r}")


__all__ = ["DELTA", "POOL_SIZE", "POOL_SEED", "TRUTH_SAMPLES", "SHIPPED", "world_pool", "pool_features",
           "exact_fibers", "factor_frame", "intervention_t_delta", "cache_key", "read_cache", "write_cache",
           "ideal_estimates", "ideal_ceiling", "check_settings", "compute_truth", "TruthResult"]


class TruthResult:
    """The fiber truth of a benchmark run: ``frame`` (``extractor, factor, fiber_truth, truth_samples``, one row
    per pair) and ``ideal`` (``{spec: [{factor: estimate} per ideal draw]}``) for :meth:`ceiling`."""

    def __init__(self, frame: pd.DataFrame, ideal: dict[str, list[dict[str, float]]], kept: dict[str, list[int]]):
        self.frame, self.ideal, self.kept = frame, ideal, kept

    def ceiling(self, pairs: pd.DataFrame | None = None) -> dict[str, float]:
        """The ideal estimator's Spearman with the truth over ``pairs`` (``extractor, factor``; default all)."""
        truth = self.frame if pairs is None else self.frame.merge(pairs[["extractor", "factor"]].drop_duplicates())
        draws = len(next(iter(self.ideal.values()), []))
        frames = [pd.DataFrame([(spec, k, v) for spec, runs in self.ideal.items() for k, v in runs[d].items()],
                               columns=["extractor", "factor", "estimated"]) for d in range(draws)]
        return ideal_ceiling(truth, frames)


def compute_truth(extractors: Mapping[str, Any], refs: torch.Tensor, ref_seed: int, n: int, *,
                  pool_size: int = POOL_SIZE, truth_samples: int = TRUTH_SAMPLES, delta: float = DELTA,
                  draws: int = 50, seed: int = 0, cache: str | Path | None = None,
                  shipped: str | Path | None = SHIPPED, log=None,
                  memo: dict[str, torch.Tensor] | None = None) -> TruthResult:
    """The fiber truth of every extractor over the references ``refs`` ``[B,3,32,32]`` in [0,1] (identified by
    ``ref_seed`` and ``B`` for the cache), and ``draws`` ideal estimates at ``n`` samples per fiber.

    Entries already in ``shipped`` or ``cache`` (JSON, keyed by :func:`cache_key`) are reused; the others are
    computed on a world pool of ``pool_size`` scenes and written to ``cache``; ``memo`` keeps the pool's features
    between calls (spec -> ``[pool_size, D]``).
    """
    check_settings(pool_size, truth_samples, delta)
    cache = Path(cache) if cache is not None else None
    shipped = Path(shipped) if shipped is not None else None
    settings = {"pool_size": pool_size, "pool_seed": POOL_SEED, "truth_samples": truth_samples, "delta": delta,
                "n": n, "draws": draws, "seed": seed}
    known = {**(read_cache(shipped) if shipped else {}), **(read_cache(cache) if cache else {})}
    keys = {spec: cache_key(spec, ref_seed, refs.shape[0], settings) for spec in extractors}
    todo = [spec for spec in extractors if keys[spec] not in known]
    if todo:
        fresh = _compute(extractors, todo, refs, n, settings, log, memo)
        known.update({keys[spec]: entry for spec, entry in fresh.items()})
        if cache is not None:
            write_cache(cache, {keys[spec]: entry for spec, entry in fresh.items()})
    rows, ideal, kept = [], {}, {}
    for spec in extractors:
        entry = known[keys[spec]]
        rows += [(spec, k, entry["truth"].get(k, float("nan")), entry["samples"].get(k, 0)) for k in FACTORS]
        ideal[spec], kept[spec] = entry["ideal"], entry["kept"]
    frame = pd.DataFrame(rows, columns=["extractor", "factor", "fiber_truth", "truth_samples"])
    return TruthResult(frame, ideal, kept)


def _compute(extractors: Mapping[str, Any], todo: Sequence[str], refs: torch.Tensor, n: int,
             settings: Mapping[str, Any], log, memo: dict[str, torch.Tensor] | None) -> dict[str, dict[str, Any]]:
    pool = world_pool(settings["pool_size"])
    prior = pool.iloc[:4096].assign(valid=True)  # the world distribution the ratios are relative to
    if log:
        log(f"fiber truth of {list(todo)}: features of {len(pool)} world scenes")
    feats = pool_features([extractors[spec] for spec in todo], pool, memo)
    out = {}
    for spec in todo:
        ext = extractors[spec]
        with torch.no_grad():
            ref_feats = ext(refs.to(ext.device)).float().cpu()
        fibers = exact_fibers(ref_feats, feats[spec], settings["delta"])
        rng = np.random.default_rng(settings["seed"])
        capped = [idx[:settings["truth_samples"]] for idx in fibers]  # the pool is i.i.d.: the first ones
        usable = [idx if len(idx) >= MIN_TRUTH_SAMPLES else np.array([], int) for idx in capped]
        truth = estimate_from_draws(pool, usable, prior, settings["seed"])
        stats = fiber_factor_stats(factor_frame(pool, usable), prior, seed=settings["seed"])
        samples = stats.groupby("factor")["n"].sum().to_dict() if len(stats) else {}
        ideal = [ideal_estimates(pool, fibers, prior, n, rng, settings["seed"]) for _ in range(settings["draws"])]
        out[spec] = {"truth": truth, "samples": {k: int(v) for k, v in samples.items()}, "ideal": ideal,
                     "kept": [int(len(idx)) for idx in fibers]}
    return out
