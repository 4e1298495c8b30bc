"""Card metrics of the toy models that sample or score: the priors, the toy CLIP, and ``measure``/``record``.

The pure evaluations (oracle, classifiers, encoder, shortcut) are in :mod:`fiberbench.toy.evaluate`;
these need the sampler or the CLIP scorer, so they live above both.
"""
from __future__ import annotations

from typing import Any

import torch

from ..analysis.semantics import zero_shot
from ..errors import ConfigError
from ..models import Extractor, load_clip, load_extractor, load_prior
from ..sampling import sample_fiber
from ..toy.cards import read_card, write_card
from ..toy.evaluate import (
    EVAL_SEED,
    NOISY_LEVEL,
    eval_classifier,
    eval_encoder,
    eval_oracle,
    eval_shortcut,
    residual_noise,
    total_variation,
)
from ..toy.oracle import load_oracle
from ..toy.vocab import TOY_VOCAB
from ..toy.world import CHIRAL, CONTINUOUS, DISCRETE, FACTORS, render, sample_factors

# the bars' ">= 2 000 images": at 512, mirror (chiral shapes only, ~128 per side) has a TV noise floor near 0.1
PRIOR_EVAL_N = 2048


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
    noise.append(total_variation(data[data["shape"].isin(CHIRAL)]["mirror"],
                                 other[other["shape"].isin(CHIRAL)]["mirror"], FACTORS["mirror"]))
    noise += [total_variation(data[c], other[c], FACTORS[c], bins=5) for c in CONTINUOUS]
    out["tv_noise_max"] = max(noise)
    out["seconds_per_sample"] = res.config["seconds_per_sample"]
    out["eval"] = {"n": n, "steps": steps, "seed": seed,
                   "sampler": "unguided, " + (", ".join(f"{k}={v}" for k, v in sampling.items())
                                              + " (the card's sampling)" if sampling else "eta=0 (DDIM / Euler)")}
    return out


def eval_clip(clip, n: int = 2000, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Zero-shot accuracy for shape, colour and background with prompts like "a photo of a red shape"."""
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
    card = read_card(name, root)
    kind = card["kind"]
    if kind == "oracle":
        return eval_oracle(load_oracle(root=root))
    if kind == "encoder":
        return eval_encoder(load_extractor(f"toy/{name}"))
    if kind == "classifier":
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
    raise ConfigError(f"no evaluation for kind {kind!r}")


def record(name: str, root=None) -> dict[str, Any]:
    """Measure ``name`` and store the metrics in its card."""
    metrics = measure(name, root)
    card = read_card(name, root)
    card["metrics"] = metrics
    write_card(name, card, root)
    return metrics
