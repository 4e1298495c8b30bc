"""Measure the toy models against their bars, on fresh seeds (never the training seeds).

Each ``eval_*`` returns a flat dict of metrics; ``fiberbench train-toy`` writes
it into the model's card under ``metrics`` together with the evaluation
settings, so a test can re-measure and compare. The evaluations here need only
the world and the model under test; the prior's and the toy CLIP's, which sample
or score, are in :mod:`fiberbench.training.evaluate`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..seeds import CARD_EVAL_SEED
from .oracle import make_junk
from .world import CHIRAL, CONTINUOUS, DISCRETE, FACTORS, factor_index, intervene, render, sample_factors

EVAL_SEED = CARD_EVAL_SEED


def _batched(fn, x: torch.Tensor, bs: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(c) for c in x.split(bs)])


def eval_oracle(oracle, n: int = 2000, seed: int = EVAL_SEED, n_junk: int = 1000) -> dict[str, Any]:
    """Accuracy per discrete factor (mirror: on chiral shapes only), R^2 per continuous one, junk judged valid."""
    f = sample_factors(n, seed)
    pred = oracle.predict(render(f))
    out: dict[str, Any] = {}
    for name in DISCRETE:
        sel = f["shape"].isin(CHIRAL).to_numpy() if name == "mirror" else np.ones(n, bool)
        out[f"acc_{name}"] = float((pred[name].to_numpy()[sel] == f[name].to_numpy()[sel]).mean())
    for name in CONTINUOUS:
        y, p = f[name].to_numpy(), pred[name].to_numpy()
        out[f"r2_{name}"] = float(1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    out["valid_clean"] = float(pred["valid"].mean())
    junk, colour_only = make_junk(n_junk, np.random.default_rng(seed))
    jp = oracle.predict(junk)
    out["valid_junk"] = float(jp["valid"].mean())
    out["eval"] = {"n": n, "seed": seed, "n_junk": n_junk}
    return out


def eval_classifier(extractor, target: str, n: int = 2000, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Accuracy on fresh renders, and how much the logits move under single-factor interventions.

    ``logit_change_<factor>`` = mean ||f(x') - f(x)|| / mean ||f(x) - f(x_other)|| where x' differs
    from x in that factor only and x_other is an independent render (1 = as much as a full resample).
    """
    f = sample_factors(n, seed)
    x = render(f)
    logits = _batched(extractor, x)
    acc = float((logits.argmax(-1).numpy() == factor_index(f, target)).mean())
    out: dict[str, Any] = {f"acc_{target}": acc}
    base = (logits - _batched(extractor, render(sample_factors(n, seed + 1)))).norm(dim=-1).mean()
    for name in FACTORS:
        g = f[f["shape"].isin(CHIRAL)] if name == "mirror" else f
        xi = render(intervene(g, name, seed=seed + 2))
        li = logits[torch.from_numpy(g.index.to_numpy().copy())]
        out[f"logit_change_{name}"] = float((_batched(extractor, xi) - li).norm(dim=-1).mean() / base)
    out["eval"] = {"n": n, "seed": seed}
    return out


def eval_encoder(extractor, n: int = 2000, seed: int = EVAL_SEED) -> dict[str, Any]:
    """How much an encoder's features move under single-factor interventions (no labels to score).

    ``feature_change_<factor>`` as ``logit_change_<factor>`` of :func:`eval_classifier` (1 = as much as a
    full resample; mirror on chiral shapes only), and ``true_invariance_<factor> = clip(1 - change, 0, 1)``
    (the intervention measure of :mod:`fiberbench.bench.invariance`).
    """
    f = sample_factors(n, seed)
    feats = _batched(extractor, render(f))
    base = (feats - _batched(extractor, render(sample_factors(n, seed + 1)))).norm(dim=-1).mean()
    out: dict[str, Any] = {}
    for name in FACTORS:
        g = f[f["shape"].isin(CHIRAL)] if name == "mirror" else f
        moved = _batched(extractor, render(intervene(g, name, seed=seed + 2)))
        rows = torch.as_tensor(np.array(g.index), dtype=torch.long)
        change = float((moved - feats[rows]).norm(dim=-1).mean() / base)
        out[f"feature_change_{name}"] = change
        out[f"true_invariance_{name}"] = float(np.clip(1 - change, 0, 1))
    out["eval"] = {"n": n, "seed": seed}
    return out


def paired_values(first: str, second: str, values) -> list:
    """The ``second``-factor value paired with each ``first``-factor value under a ``sample_factors`` bias.

    ``bias={"pair": (first, second), "strength": s}`` pairs value ``i`` of ``first`` with value
    ``i mod len(FACTORS[second])`` of ``second`` (shape -> colour: circle-red, square-green,
    triangle-blue, arrow-yellow).
    """
    a, b = FACTORS[first], FACTORS[second]
    return [b[a.index(v) % len(b)] for v in values]


def pairing_factors(n: int, seed: int, pair: tuple[str, str] = ("shape", "color"), holds: bool = True) -> pd.DataFrame:
    """Fresh factor rows where the bias pairing holds (``holds=True``) or is broken.

    Broken: ``second`` takes the value paired with *another* value of ``first`` (for shape -> colour:
    a red square, a green circle, ...), so a model that reads the cue is pointed at a wrong class.
    Other factors are uniform; deterministic per ``seed``.
    """
    first, second = pair
    f = sample_factors(n, seed)
    if holds:
        f[second] = paired_values(first, second, f[first])
        return f
    rng = np.random.default_rng(seed + 1)
    a = FACTORS[first]
    others = [[v for v in a if v != own] for own in f[first]]
    wrong = [o[rng.integers(len(o))] for o in others]
    f[second] = paired_values(first, second, wrong)
    return f


def eval_shortcut(extractor, target: str = "shape", cue: str = "color", n: int = 2000,
                  seed: int = EVAL_SEED) -> dict[str, Any]:
    """How strongly a ``target`` classifier leans on the ``cue`` it was paired with in training.

    Returns ``acc_<target>_paired`` (fresh renders where the pairing holds), ``acc_<target>_broken``
    (cue swapped to another class's cue), their difference ``shortcut_gap`` (0 = no shortcut,
    1 = the cue alone decides) and ``follows_cue_broken``: the fraction of broken renders classified
    as the class whose cue they show. All in [0, 1] (gap in [-1, 1]).
    """
    out: dict[str, Any] = {}
    for holds, tag in ((True, "paired"), (False, "broken")):
        f = pairing_factors(n, seed + (0 if holds else 3), (target, cue), holds)
        pred = _batched(extractor, render(f)).argmax(-1).numpy()
        out[f"acc_{target}_{tag}"] = float((pred == factor_index(f, target)).mean())
        if not holds:
            # the class whose paired cue is shown (cue value j belongs to target value j when j < len(target))
            cue_cls = np.array([FACTORS[cue].index(c) for c in f[cue]]) % len(FACTORS[target])
            out["follows_cue_broken"] = float((pred == cue_cls).mean())
    out["shortcut_gap"] = out[f"acc_{target}_paired"] - out[f"acc_{target}_broken"]
    out["shortcut_eval"] = {"n": n, "seed": seed, "pair": [target, cue]}
    return out


def total_variation(a: pd.Series, b: pd.Series, values=None, bins: int | None = None) -> float:
    """TV distance between the empirical distributions of two columns (binned if continuous)."""
    if bins is not None:
        lo, hi = values
        edges = np.linspace(lo, hi, bins + 1)
        pa = np.histogram(np.clip(a, lo, hi), edges)[0] / len(a)
        pb = np.histogram(np.clip(b, lo, hi), edges)[0] / len(b)
    else:
        pa = a.value_counts(normalize=True).reindex(values, fill_value=0).to_numpy()
        pb = b.value_counts(normalize=True).reindex(values, fill_value=0).to_numpy()
    return float(0.5 * np.abs(pa - pb).sum())


NOISY_LEVEL = 0.02  # residual_noise of Gaussian grain of sd 0.03 (8/255); 512 fresh renders: median 0.0013, max 0.0032


def residual_noise(images: torch.Tensor) -> torch.Tensor:
    """Per-image grain left in samples: mean |x - median3x3(x)|, images ``[N,3,H,W]`` in [0, 1] -> ``[N]``.

    The world's images are flat colour regions with anti-aliased edges, so a 3x3 median barely changes
    them (renders: <= 0.0032); noise a sampler failed to remove is what it takes away.
    """
    pad = F.pad(images, (1, 1, 1, 1), mode="replicate")
    med = pad.unfold(2, 3, 1).unfold(3, 3, 1).reshape(*images.shape, 9).median(-1).values
    return (images - med).abs().mean(dim=(1, 2, 3))
