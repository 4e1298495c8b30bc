"""Measure the toy models against their bars, on fresh seeds (never the training seeds).

Each ``eval_*`` returns a flat dict of metrics; ``fiberbench train-toy`` writes
it into the model's card under ``metrics`` together with the evaluation
settings, so a test can re-measure and compare.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .world import CHIRAL, CONTINUOUS, DISCRETE, FACTORS, factor_index, intervene, render, sample_factors

EVAL_SEED = 12345


def _batched(fn, x: torch.Tensor, bs: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(c) for c in x.split(bs)])


def eval_oracle(oracle, n: int = 2000, seed: int = EVAL_SEED, n_junk: int = 1000) -> dict[str, Any]:
    """Accuracy per discrete factor (mirror: on chiral shapes only), R^2 per continuous one, junk judged valid."""
    from .oracle import make_junk

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
    (:mod:`fiberbench.groundtruth`).
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


PRIOR_EVAL_N = 2048  # the bars' ">= 2 000 images": at 512, mirror (chiral shapes only, ~128 per side) has a TV noise floor near 0.1


def eval_prior(prior, oracle, n: int = PRIOR_EVAL_N, steps: int = 20, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Unconditional samples judged by the oracle: valid fraction and per-factor TV to the data;
    ``noisy``: the fraction of samples with visible grain (:func:`residual_noise` > ``NOISY_LEVEL``).

    The prior samples with its card's ``sampling`` settings: the unguided sampler's hyper-parameters
    (none: deterministic DDIM / Euler on the prior's own grid; the DDPM prior's card sets the
    ancestral sampler, eta 1, below tau 925 on a shift-3 grid, with x0 clamped to [-2, 2] instead of
    [-1, 1] in tau 250-995).
    The data side is the oracle's judgement of ``n`` fresh renders, so both sides
    pass through the same judge. Mirror is compared on chiral shapes only.
    ``tv_noise_max`` is the same statistic between two independent sets of ``n``
    fresh renders: the sampling-noise floor the TVs should be read against.
    """
    from ..sampling import sample_fiber
    from ..extractors import Extractor

    dummy = Extractor(torch.nn.Flatten(), spec="none/identity", layer="embed")
    ref = torch.zeros(1, 3, 32, 32)
    sampling = dict((getattr(prior, "card", None) or {}).get("sampling") or {})
    res = sample_fiber(prior, dummy, ref, n=n, method="unguided", steps=steps, seed=seed, progress=False,
                       batch_size=128, **sampling)
    pred = oracle.predict(res.images)
    data = oracle.predict(render(sample_factors(n, seed + 7)))
    out: dict[str, Any] = {"valid": float(pred["valid"].mean()),
                           "noisy": float((residual_noise(res.images) > NOISY_LEVEL).float().mean())}
    for name in DISCRETE:
        a, b = pred, data
        if name == "mirror":
            a, b = pred[pred["shape"].isin(CHIRAL)], data[data["shape"].isin(CHIRAL)]
        out[f"tv_{name}"] = total_variation(a[name], b[name], FACTORS[name])
    for name in CONTINUOUS:
        out[f"tv_{name}"] = total_variation(pred[name], data[name], FACTORS[name], bins=5)
    out["tv_max"] = max(v for k, v in out.items() if k.startswith("tv_"))
    other = oracle.predict(render(sample_factors(n, seed + 8)))
    noise = [total_variation(data[c], other[c], FACTORS[c]) for c in DISCRETE if c != "mirror"]
    noise.append(total_variation(data[data["shape"].isin(CHIRAL)]["mirror"], other[other["shape"].isin(CHIRAL)]["mirror"],
                                 FACTORS["mirror"]))
    noise += [total_variation(data[c], other[c], FACTORS[c], bins=5) for c in CONTINUOUS]
    out["tv_noise_max"] = max(noise)
    out["seconds_per_sample"] = res.config["seconds_per_sample"]
    out["eval"] = {"n": n, "steps": steps, "seed": seed,
                   "sampler": "unguided, " + (", ".join(f"{k}={v}" for k, v in sampling.items())
                                              + " (the card's sampling)" if sampling else "eta=0 (DDIM / Euler)")}
    return out


def eval_clip(clip, n: int = 2000, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Zero-shot accuracy for shape, colour and background with prompts like "a photo of a red shape"."""
    from ..semantics import TOY_VOCAB, zero_shot

    f = sample_factors(n, seed)
    x = render(f)
    out: dict[str, Any] = {}
    for group in ("shape", "color", "background"):
        pred = zero_shot(clip, x, TOY_VOCAB[group])
        out[f"zeroshot_{group}"] = float((pred["label"].to_numpy() == f[group].to_numpy()).mean())
    out["eval"] = {"n": n, "seed": seed}
    return out


def measure(name: str, root=None) -> dict[str, Any]:
    """Evaluate shipped toy model ``name`` with the settings of the bars (fresh seeds)."""
    from ..zoo import load_clip, load_extractor, load_prior
    from . import models as M
    from .oracle import load_oracle

    card = M.read_card(name, root)
    kind = card["kind"]
    if kind == "oracle":
        return eval_oracle(load_oracle(root=root))
    if kind == "encoder":
        return eval_encoder(load_extractor(f"toy/{name}"))
    if kind in ("classifier", "encoder"):
        ext = load_extractor(f"toy/{name}@logits")
        out = eval_classifier(ext, card["target"])
        bias = (card.get("training") or {}).get("bias")
        if bias:  # trained on a biased world: measure the shortcut too
            first, second = bias.get("pair", ("shape", "color"))
            cue = second if first == card["target"] else first
            out.update(eval_shortcut(ext, card["target"], cue))
        return out
    if kind in ("flow", "diffusion"):
        return eval_prior(load_prior(f"toy/{name}"), load_oracle(root=root))
    if kind == "clip":
        return eval_clip(load_clip(f"toy/{name}"))
    raise ValueError(f"no evaluation for kind {kind!r}")


def record(name: str, root=None) -> dict[str, Any]:
    """Measure ``name`` and store the metrics in its card."""
    from . import models as M

    metrics = measure(name, root)
    card = M.read_card(name, root)
    card["metrics"] = metrics
    M.write_card(name, card, root)
    return metrics
