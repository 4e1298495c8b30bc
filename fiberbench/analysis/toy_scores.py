"""Scores on the shapes world: the oracle's judgement in the same frames CLIP scoring produces.

The oracle knows every factor, so :func:`score_fiber_oracle` is the ground-truth twin of
:func:`fiberbench.analysis.semantics.score_fiber`: same columns, the oracle's labels instead of CLIP's.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..models.clip import ClipModel
from ..seeds import LABEL_PRIOR_SEED
from ..toy import references
from ..toy.oracle import load_oracle
from ..toy.vocab import Vocabulary
from ..toy.world import CHIRAL, FACTORS, size_word
from .semantics import fiber_ids, label_prior, with_changes

# the oracle's factor values spelled like TOY_VOCAB's labels
ORACLE_GROUPS = ["shape", "color", "background", "size", "mirror"]


def oracle_labels(oracle, images: torch.Tensor) -> pd.DataFrame:
    """The toy oracle's judgement as ``<group>_label`` / ``<group>_prob`` columns matching :data:`TOY_VOCAB`.

    ``size`` is the regressed size binned into thirds (small / medium / large, as
    in the world's captions; prob = NaN); ``mirror`` is ``left``/``right`` where the
    predicted shape is chiral and missing (NA) elsewhere, where it is invisible.
    Also carries ``valid`` (the oracle's validity call).
    """
    p = oracle.predict(images)
    out = {}
    for g in ("shape", "color", "background"):
        out[f"{g}_label"] = p[g].astype(str).to_numpy(object)
        out[f"{g}_prob"] = p[f"{g}_conf"].to_numpy(float)
    lo, hi = FACTORS["size"]
    out["size_label"] = np.array([size_word(min(max(v, lo), hi)) for v in p["size"]], object)
    out["size_prob"] = np.full(len(p), np.nan)
    chiral = p["shape"].isin(CHIRAL).to_numpy()
    out["mirror_label"] = np.array([("left" if m else "right") if c else None for m, c in zip(p["mirror"], chiral)],
                                   object)
    out["mirror_prob"] = np.where(chiral, p["mirror_conf"].to_numpy(float), np.nan)
    df = pd.DataFrame(out)
    df["valid"] = p["valid"].to_numpy()
    return df


def score_fiber_oracle(result, oracle=None, *, classes: Sequence[str] | None = None,
                       groups: Sequence[str] = tuple(ORACLE_GROUPS)) -> pd.DataFrame:
    """Ground truth twin of :func:`score_fiber` on the toy world: the oracle's labels instead of CLIP's.

    Same columns (without ``clip_angle``/``clip_cosine``), plus ``valid`` per sample.
    """
    if oracle is None:
        oracle = load_oracle()
    ids = fiber_ids(result)
    labels, ref_labels = oracle_labels(oracle, result.images), oracle_labels(oracle, result.reference)
    df = with_changes(ids, labels, ref_labels, list(groups), classes, result.n)
    df["valid"] = labels["valid"].to_numpy()
    return df


def toy_label_prior(clip: ClipModel, vocab: Vocabulary | None = None, n: int = 1024,
                    seed: int = LABEL_PRIOR_SEED) -> pd.DataFrame:
    """:func:`label_prior` on ``n`` fresh renders of the shapes world (the toy priors' training distribution)."""
    images, _ = references(n, seed)
    return label_prior(clip, images, vocab)


def oracle_fiber_metrics(result, oracle, factors: pd.DataFrame) -> dict[str, float]:
    """Oracle-based metrics of one FiberResult whose references have ``factors``: ``feature_match`` (cosine
    >= 0.95), ``validity``, ``shape_kept``, ``color_changed`` and ``mean_cosine``, each in [0, 1]."""
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
