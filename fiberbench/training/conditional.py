"""Training the trained baseline ``toy/cond-fm-shape-resnet`` (see :mod:`fiberbench.baselines.conditional`)."""
from __future__ import annotations

import hashlib
import json
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..analysis.toy_scores import oracle_fiber_metrics
from ..baselines.conditional import EXTRACTOR, LAYERS, NAME, SPEC, as_prior, sample_conditional
from ..errors import ConfigError
from ..models import Extractor, FeatureConditionedPrior, load_extractor, load_prior
from ..seeds import CONDITIONAL_EVAL_SEED, FEATURE_STATS_SEED, TRAIN_SEED_BASE
from ..toy import balanced_references, cards, load_oracle
from ..toy.nets import FeatureConditionedFlow, build_unet
from .loop import StepFn, TrainLoop, env, world_batch


def card_template(unet_cfg: dict, dims: dict[str, int], hidden: int, shift: float) -> dict[str, Any]:
    """The card of ``toy/cond-fm-shape-resnet`` before training (architecture, scheduler, data range)."""
    return {
        "name": NAME, "spec": SPEC, "kind": "conditional",
        "description": "Flow-matching generator of the shapes world conditioned on toy/shape-resnet's features "
                       "(logits or pre-logits), trained with the flow loss plus a fiber-loss term: the trained "
                       "baseline (RCDM family) of the ground-truth invariance benchmark",
        "architecture": {"library": "fiberbench", "class": "FeatureConditionedFlow",
                         "config": {"unet": {**unet_cfg, "class_embed_type": "identity"},
                                    "condition": {"extractor": EXTRACTOR, "dims": dims, "hidden": hidden,
                                                  "standardised": "per-dimension mean/std of the features of "
                                                                  "fresh renders (stored as buffers)",
                                                  "null": "zero embedding (condition dropout / CFG)"}}},
        "data_range": [-1.0, 1.0],
        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler",
                      "config": {"num_train_timesteps": 1000, "shift": shift}},
        "prediction_type": "flow",
    }


def feature_stats(ext, n: int = 2048, seed: int = FEATURE_STATS_SEED) -> tuple[dict, dict]:
    """Per-dimension mean/std of both layers on fresh renders (training seeds: ``>= 10**6``)."""
    x, _ = world_batch(n, seed)
    with torch.no_grad():
        pre = torch.cat([ext.pre_logits(c) for c in x.split(256)]).float()
        logits = ext.classifier()(pre)
    mean = {"logits": logits.mean(0), "pre_logits": pre.mean(0)}
    std = {"logits": logits.std(0).clamp_min(1e-3), "pre_logits": pre.std(0).clamp_min(1e-3)}
    return mean, std


def train_conditional(*, minutes: float = 22.0, max_steps: int | None = None, batch: int = 64, lr: float = 1e-3,
                      warmup: int = 100, ema_decay: float = 0.999, seed: int = 0, fiber_lambda: float = 0.1,
                      fiber_max_sigma: float = 0.8, cond_dropout: float = 0.1, hidden: int = 256,
                      shift: float = 3.0, init_weights: str | Path | None = None,
                      init_card: str | Path | None = None, save_every: int = 250, bf16: bool = True,
                      root: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``toy/cond-fm-shape-resnet``; save EMA weights + card every ``save_every`` steps and at the end.

    Args:
        minutes: wall-time budget (ignored when ``max_steps`` is given); ``touch <root>/cond-fm-shape-resnet.stop``
            ends the run cleanly at the next multiple of 25 steps.
        fiber_lambda: weight of the fiber-loss term ``(1 - sigma) (1 - cos(f(x0_hat), f(x0)))`` in the chosen layer.
        fiber_max_sigma: the term applies to conditioned samples with ``sigma < fiber_max_sigma``.
        cond_dropout: fraction of samples trained with the null condition (for classifier-free guidance).
        init_weights / init_card: a copy of ``toy/prior-fm``'s safetensors and card to start from (default: the
            shipped ones; the flow prior may be retraining in the background, so pass a copy).
        shift: the scheduler shift written to the card (sampling only; training draws sigma uniformly).

    Returns the card (training section filled; :func:`evaluate_conditional` adds metrics).
    """
    torch.manual_seed(seed)
    ext = load_extractor(f"{EXTRACTOR}@pre_logits")
    head = ext.classifier()
    dims = {"logits": head.out_features, "pre_logits": head.in_features}
    mean, std = feature_stats(ext)
    init_weights = Path(init_weights) if init_weights else cards.weights_path("prior-fm")
    init_card = Path(init_card) if init_card else cards.card_path("prior-fm")
    src = json.loads(Path(init_card).read_text())
    card = card_template(src["architecture"]["config"], dims, hidden, shift)
    net = FeatureConditionedFlow(build_unet(card["architecture"]["config"]["unet"]), dims, hidden, mean, std)
    missing, unexpected = net.unet.load_state_dict(load_file(str(init_weights)), strict=False)
    if missing or unexpected:
        raise ConfigError(f"prior weights do not fit the conditional UNet: missing {missing}, unexpected {unexpected}")
    card["initialised_from"] = {"model": "toy/prior-fm", "steps": src.get("training", {}).get("steps"),
                                "seconds": src.get("training", {}).get("seconds"),
                                "sha256": hashlib.sha256(Path(init_weights).read_bytes()).hexdigest()}
    loop = TrainLoop(NAME, net, lr=lr, schedule="warmup", warmup=warmup, ema_decay=ema_decay, bf16=bf16,
                     max_steps=max_steps, minutes=minutes, save_every=save_every, log_every=25, root=root, log=log)
    gen = torch.Generator().manual_seed(seed)
    step_fn = conditional_step(net, ext, loop, gen, batch, fiber_lambda, fiber_max_sigma, cond_dropout)
    settings = {"fiber_lambda": fiber_lambda, "fiber_max_sigma": fiber_max_sigma, "cond_dropout": cond_dropout,
                "batch": batch, "lr": lr, "warmup": warmup, "ema_decay": ema_decay, "bf16": bf16, "seed": seed}
    return loop.run(step_fn, card, partial(conditional_training, settings, list(dims)))


def conditional_step(net: FeatureConditionedFlow, ext: Extractor, loop: TrainLoop, gen: torch.Generator, batch: int,
                     fiber_lambda: float, fiber_max_sigma: float, cond_dropout: float) -> StepFn:
    """The loss of one step on ``batch`` fresh renders: the flow loss, plus the fiber term (see
    :func:`train_conditional`); logs ``flow`` and ``fiber`` (mean ``1 - cos`` of the selected rows, NaN if none).

    Every draw comes from ``gen``: noise, sigma, the layer per sample, the condition dropout.
    """
    head = ext.classifier()

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        img, _ = world_batch(batch, 2_000_000 + step)  # seeds disjoint from the prior's training stream
        with torch.no_grad():
            pre = ext.pre_logits(img).float()
            feats = {"logits": head(pre), "pre_logits": pre}
        x0 = img * 2 - 1
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(batch, generator=gen)
        which = torch.rand(batch, generator=gen) < 0.5  # True: logits, False: pre_logits
        keep = torch.rand(batch, generator=gen) >= cond_dropout
        s4 = sigma.view(-1, 1, 1, 1)
        xt = (1 - s4) * x0 + s4 * noise
        with loop.autocast():
            emb = torch.where(which.view(-1, 1), net.embed(feats["logits"], "logits", keep),
                              net.embed(feats["pre_logits"], "pre_logits", keep))
            pred = net(xt, sigma * 1000, emb).float()
        flow = F.mse_loss(pred, noise - x0)
        sel = keep & (sigma < fiber_max_sigma)
        if fiber_lambda <= 0 or not bool(sel.any()):
            return flow, {"flow": flow.item(), "fiber": float("nan")}
        # the fiber term on the predicted clean image x0_hat = x_t - sigma v, in fp32 (outside autocast)
        im = ((xt[sel] - s4[sel] * pred[sel] + 1) / 2).clamp(0, 1)
        p_hat = ext.pre_logits(im).float()
        cos = torch.where(which[sel], F.cosine_similarity(head(p_hat), feats["logits"][sel], dim=-1),
                          F.cosine_similarity(p_hat, feats["pre_logits"][sel], dim=-1))
        fib = ((1 - sigma[sel]) * (1 - cos)).sum() / batch  # over the whole batch: rows outside count 0
        return flow + fiber_lambda * fib, {"flow": flow.item(), "fiber": float((1 - cos).detach().mean())}

    return step_fn


def conditional_training(settings: dict[str, Any], layers: list[str], loop: TrainLoop,
                         final: bool) -> dict[str, Any]:
    """The ``training`` section of the card (``settings``: the hyper-parameters of :func:`train_conditional`)."""
    return {
        "objective": "flow matching (velocity MSE) + fiber_lambda * mean over the batch of (1 - sigma) * "
                     "(1 - cos(f(x0_hat), f(x0))) for conditioned samples with sigma < fiber_max_sigma "
                     "(others 0), x0_hat = x_t - sigma v, cosine in the sample's conditioning layer",
        "fiber_weight": "(1 - sigma) for sigma < fiber_max_sigma, 0 above",
        "extractor": EXTRACTOR, "condition_layers": layers, "layer_choice": "uniform per sample",
        "fiber_lambda": settings["fiber_lambda"], "fiber_max_sigma": settings["fiber_max_sigma"],
        "cond_dropout": settings["cond_dropout"], "batch": settings["batch"], "optimizer": "AdamW",
        "lr": settings["lr"], "warmup_steps": settings["warmup"], "grad_clip": 1.0,
        "ema_decay": settings["ema_decay"], "autocast": "bf16" if settings["bf16"] else None, "steps": loop.step,
        "seed": settings["seed"], "seconds": round(loop.seconds(), 1),
        "final_loss": loop.recent("loss", 200), "final_flow_loss": loop.recent("flow", 200),
        "final_fiber_loss": loop.recent("fiber", 200, nan=True),
        "data": f"fresh renders every step: sample_factors(batch, {TRAIN_SEED_BASE} + 2000000 + step), "
                f"{loop.step * settings['batch']} images in all",
        "env": env(), "finished": final,
    }


# --------------------------------------------------------------------------- evaluation (the card's metrics)

def evaluate_conditional(model: FeatureConditionedPrior | FeatureConditionedFlow | None = None, *,
                         references: int = 16, n: int = 8, steps: int = 20, seed: int = CONDITIONAL_EVAL_SEED,
                         guidance: float | None = None) -> dict[str, Any]:
    """Card metrics on fresh references (shapes cycled): per conditioning layer ``feature_match`` (cosine >= 0.95),
    ``mean_cosine``, ``validity`` (oracle), ``shape_kept`` and ``color_changed``; and the same model with the
    null condition (``unconditional_*``: what the conditioning buys). ``guidance=None``: the card's default."""
    model = load_prior(SPEC) if model is None else as_prior(model)
    if guidance is None:
        guidance = float(model.card.get("sampling_default", {}).get("guidance", 1.0))
    oracle = load_oracle()
    refs, factors = balanced_references(references, seed=seed)
    out: dict[str, Any] = {}
    for layer in LAYERS:
        ext = load_extractor(f"{EXTRACTOR}@{layer}")
        t0 = time.perf_counter()
        res = sample_conditional(model, ext, refs, n=n, steps=steps, seed=seed, guidance=guidance)
        secs = time.perf_counter() - t0
        m = oracle_fiber_metrics(res, oracle, factors)
        for k, v in m.items():
            out[f"{layer}_{k}"] = v
        out[f"{layer}_seconds_per_sample"] = secs / (references * n)
        un = sample_conditional(model, ext, refs, n=n, steps=steps, seed=seed, condition=False)
        mu = oracle_fiber_metrics(un, oracle, factors)
        for k in ("feature_match", "validity", "shape_kept"):
            out[f"{layer}_unconditional_{k}"] = mu[k]
    out["eval"] = {"references": references, "n": n, "steps": steps, "seed": seed, "guidance": guidance,
                   "references_from": "toy.balanced_references (shapes cycled)"}
    return out
