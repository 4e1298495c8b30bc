"""Training code of the tiny toy models (``fiberbench train-toy``).

Everything trains on *fresh renders every step* from :func:`sample_factors`
with seeds that never overlap the evaluation seeds (training uses seeds
``>= 10**6``; evaluation and tests use small seeds), so every metric in a card
is measured on images the model has never seen.
"""
from __future__ import annotations

import copy
import math
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import models as M
from .world import DISCRETE, FACTORS, factor_index, render, sample_factors

TRAIN_SEED_BASE = 10 ** 6


def _env() -> dict[str, Any]:
    import diffusers
    import timm

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "device": "cpu"}


class EMA:
    """Exponential moving average of a module's parameters (what keeps the priors' classes balanced)."""

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up of the decay, as in diffusers' EMAModel
        for e, p in zip(self.shadow.parameters(), module.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.shadow.buffers(), module.buffers()):
            e.copy_(b)


def world_batch(n: int, seed: int, bias: dict | None = None):
    """``(images [n,3,32,32] in [0,1], factors DataFrame)`` from training seed ``seed``."""
    f = sample_factors(n, TRAIN_SEED_BASE + seed, bias=bias)
    return render(f), f


def _lr_at(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup)


def _warmup_step(opt, net, loss, step: int, lr: float, warmup: int, ema, ema_step: int) -> None:
    """One AdamW step of a diffusion-style loop: warm-up lr, backward, grad-clip 1, step, EMA update."""
    for g in opt.param_groups:
        g["lr"] = _lr_at(step, lr, warmup)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    ema.update(net, ema_step)


# --------------------------------------------------------------------------- priors

LOWFREQ_SNR_CAP = 2000.0  # 1/SNR at tau ~985 (cosine schedule); above it the pooled x0 target is mostly noise


def ddpm_loss(pred: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor, snr_weight_max: float | None = None,
              lowfreq_weight: float = 0.0) -> torch.Tensor:
    """The DDPM training loss of one batch (see :func:`train_prior`).

    ``pred``, ``eps``: ``[B,3,H,W]`` predicted and true noise; ``abar``: ``[B]`` the samples'
    cumulative alphas. Plain epsilon MSE, optionally weighted per sample by
    ``clip(1 / SNR, 1, snr_weight_max)``, plus ``lowfreq_weight * min(1 / SNR, LOWFREQ_SNR_CAP)``
    times the MSE of the 8x8-pooled error (the x0 error of the image's low frequencies).
    """
    per_sample = (pred - eps).pow(2).mean(dim=(1, 2, 3))
    inv_snr = (1 - abar) / abar
    if snr_weight_max:
        per_sample = inv_snr.clamp(1.0, float(snr_weight_max)) * per_sample
    loss = per_sample.mean()
    if lowfreq_weight:
        pooled = F.avg_pool2d(pred - eps, 8).pow(2).mean(dim=(1, 2, 3))
        loss = loss + lowfreq_weight * (inv_snr.clamp(max=LOWFREQ_SNR_CAP) * pooled).mean()
    return loss


# The DDPM prior's own sampler (the unguided sampler's hyper-parameters; docs/performance.md, fifth stop):
# - eta 1 (ancestral) below tau 925: at 20 steps deterministic DDIM of this epsilon model smears the layout
#   (valid 0.53 on 256 samples, shift-3 grid, eta 0 throughout);
# - deterministic (eta 0) above tau 925 on the shift-3 grid: the background (a global 3-way choice) is decided
#   at tau ~925-995, which the trailing grid's first step (t 999 -> 949) jumps across (gray 0.6 of samples);
# - x0 not clamped to [-1, 1] in tau 250-995: there this network's x0 estimate has a per-pixel error (residual sd
#   0.30 at tau 950, 0.16 for prior-fm) that clamping to [-1, 1] turns into a pull of black and white toward gray;
# - but clamped to [-2, 2] there: with no clamp at all, a few far-out x0 values leave grain in 9 % of the samples
#   (residual_noise > 0.02; 1.8 % with the [-2, 2] limit, 0 with [-1.5, 1.5] at a larger gray excess).
# Those numbers were measured on the 7.5k-step network of the earlier recipe (2048 samples: background TV 0.070,
# 0.25 with the trailing grid and eta 1 throughout, 0.029 with no limit; valid 0.958; grainy 0.021). The shipped
# network (2000 steps from prior-fm with clip(1/SNR, 1, 50) weighting, the recipe below) with this sampler, 2048
# samples: valid 0.930, grainy 0.041, background TV 0.057, size TV 0.093, tv_max 0.093.
DDPM_SAMPLING = {"eta": 1.0, "deterministic_above_tau": 925.0, "grid_shift": 3.0, "unclamped_tau": [250.0, 995.0],
                 "unclamped_limit": 2.0}


# How the shipped priors were trained: the runs recorded in their cards (``training.resumed_at_steps``,
# ``lr_by_run``, ``steps``), each run resuming from the previous run's EMA weights with a fresh optimiser
# (the runs were time-limited; here each ends at its recorded step). ``fiberbench train-toy`` replays them.
# prior-fm's card records one warm-up length (the last run's); it is used for every run. Cards written
# since also keep each run's own warm-up (and weighting) in ``training.runs``.
PRIOR_RECIPES: dict[str, list[dict[str, Any]]] = {
    "prior-fm": [dict(until=500, lr=2e-3, warmup=100), dict(until=5706, lr=2e-3, warmup=100),
                 dict(until=9576, lr=2e-3, warmup=100), dict(until=12503, lr=1e-3, warmup=100)],
    # one run from prior-fm's weights with the epsilon MSE weighted by clip(1/SNR, 1, 50): the flow loss weights
    # the x0 error at high noise about so (plain epsilon MSE gave too many small shapes, size TV 0.116, and
    # more training did not change it; docs/performance.md, eighth stop)
    "prior-ddpm": [dict(until=2000, lr=1e-3, warmup=200, snr_weight_max=50.0, init_from="prior-fm")],
}


def train_prior_recipe(name: str, root: Path | None = None, quick: bool = False,
                       log: Callable[[str], None] = print) -> dict:
    """Train ``prior-fm`` or ``prior-ddpm`` from scratch by replaying :data:`PRIOR_RECIPES` (``quick``: 2 steps
    per run, a smoke test of the sequence). Returns the final card."""
    kind = "fm" if name == "prior-fm" else "ddpm"
    card: dict = {}
    done = 0
    for i, run in enumerate(PRIOR_RECIPES[name]):
        run = dict(run)
        source = run.get("init_from")
        if source and not M.weights_path(source, root).exists():
            raise ConfigError(f"{name} starts from {source}, which is not in {root or M.models_dir()}: train {source} first")
        until = done + 2 if quick else run["until"]
        del run["until"]
        card = train_prior(kind, max_steps=until, resume=i > 0, root=root, log=log, **run)
        done = until
    return card


def prior_card(kind: str) -> dict[str, Any]:
    """A fresh card for ``prior-fm`` (flow matching) or ``prior-ddpm`` (DDPM, eps-prediction)."""
    base = {
        "architecture": {"library": "diffusers", "class": "UNet2DModel", "config": M.unet_config()},
        "data_range": [-1.0, 1.0],
    }
    if kind == "fm":
        base.update(name="prior-fm", spec="toy/prior-fm", kind="flow",
                    description="Rectified-flow prior of the shapes world (velocity v = noise - x0, "
                                "x_t = (1 - sigma) x0 + sigma noise, timestep = 1000 sigma)",
                    # shift 3 (as SD3) spends more of the few Euler steps at high noise, where the
                    # background (a global, 3-way choice) is decided: at 20 steps, shift 1 over-produces
                    # the mean (gray) background (TV 0.28 vs 0.055 with shift 3, measured on 256 samples)
                    scheduler={"class": "FlowMatchEulerDiscreteScheduler",
                               "config": {"num_train_timesteps": 1000, "shift": 3.0}},
                    prediction_type="flow")
    elif kind == "ddpm":
        base.update(name="prior-ddpm", spec="toy/prior-ddpm", kind="diffusion",
                    description="DDPM prior of the shapes world (epsilon prediction, cosine schedule)",
                    scheduler={"class": "DDPMScheduler",
                               "config": {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                                          "prediction_type": "epsilon", "clip_sample": True,
                                          "clip_sample_range": 1.0}},
                    prediction_type="epsilon",
                    sampling=dict(DDPM_SAMPLING))
    else:
        raise ValueError(f"unknown prior kind {kind!r}; use 'fm' or 'ddpm'")
    return base


def train_prior(kind: str = "fm", *, minutes: float = 30.0, max_steps: int | None = None, batch: int = 64,
                lr: float = 2e-3, warmup: int = 200, ema_decay: float = 0.999, seed: int = 0,
                save_every: int = 500, bf16: bool = True, root: Path | None = None, resume: bool = False,
                init_from: str | None = None, high_noise: float = 0.0, snr_weight_max: float | None = None,
                lowfreq_weight: float = 0.0, log: Callable[[str], None] = print) -> dict:
    """Train a toy prior; save EMA weights + card every ``save_every`` steps and at the end.

    ``bf16`` runs forward/backward under CPU bf16 autocast (fp32 master and
    EMA weights): 1.7x faster per step on this machine's AVX512-BF16 cores.
    ``init_from`` starts from another toy model's weights (same architecture),
    e.g. the DDPM prior from the flow prior: the network already knows the
    world; only its output (epsilon instead of velocity) and time embedding
    must adapt. ``resume`` continues from the saved (EMA) weights and step count of an
    interrupted run (the optimiser restarts with a fresh warm-up); the card's
    ``seconds`` then adds both runs' wall time, while ``minutes`` is the budget of this run.

    DDPM only, high-noise emphasis: ``high_noise`` is the fraction of each batch whose
    timesteps are drawn from the noisiest tenth (t >= 0.9 T) instead of uniformly, and
    ``snr_weight_max`` weights each sample's epsilon MSE by ``clip(1 / SNR(t), 1, max)``.
    The epsilon loss is the x0 loss times SNR, so at high noise, where a global
    choice such as the background is made, plain epsilon MSE barely trains the model;
    both options put training signal there. ``lowfreq_weight`` (lambda) adds
    ``lambda * min(1 / SNR, LOWFREQ_SNR_CAP) * |pool8(eps_hat - eps)|^2``: the x0 error of
    the 8x8-pooled image (its low frequencies: the background level, the shape's place),
    weighted as an x0 loss, without the per-pixel x0 noise that 1/SNR weighting of the
    whole image amplifies. Its minimiser is the same posterior mean, so it changes the
    emphasis, not the target. Each run's settings go to the card's ``training.runs``.

    Returns the card (training section filled; metrics are added by evaluation).
    """
    from diffusers import DDPMScheduler

    if kind != "ddpm" and (high_noise or snr_weight_max or lowfreq_weight):
        raise ConfigError("high_noise, snr_weight_max and lowfreq_weight apply to the DDPM prior only")
    if not 0.0 <= high_noise <= 1.0:
        raise ConfigError(f"high_noise must be a fraction in [0, 1], got {high_noise!r}")
    if lowfreq_weight < 0:
        raise ConfigError(f"lowfreq_weight must be >= 0, got {lowfreq_weight!r}")
    torch.manual_seed(seed)
    card = prior_card(kind)
    name = card["name"]
    net = M.build_unet(card["architecture"]["config"])
    ema = EMA(net, ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    ddpm = DDPMScheduler(**card["scheduler"]["config"]) if kind == "ddpm" else None
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    run_start = t0  # the time budget is this run's; t0 moves back by earlier runs' seconds on resume
    step, losses = 0, []
    resumed = []
    lr_by_run = [lr]
    run_settings = {"lr": lr, "warmup": warmup, "bf16": bf16, "high_noise": high_noise,
                    "snr_weight_max": snr_weight_max}
    if lowfreq_weight:
        run_settings["lowfreq_weight"] = lowfreq_weight
    runs = [run_settings]
    if init_from is not None:
        src = M.read_card(init_from, root)
        M.load_weights(init_from, net, root)
        ema = EMA(net, ema_decay)
        card["initialised_from"] = {"model": init_from, "steps": src.get("training", {}).get("steps"),
                                    "seconds": src.get("training", {}).get("seconds")}
        log(f"[{name}] initialised from {init_from}")
    if resume and M.weights_path(name, root).exists():
        old_card = M.read_card(name, root)
        if "initialised_from" in old_card and "initialised_from" not in card:  # keep where the weights began
            card["initialised_from"] = old_card["initialised_from"]
        old = old_card.get("training", {})
        M.load_weights(name, net, root)
        ema = EMA(net, ema_decay)
        step = int(old.get("steps", 0))
        t0 -= float(old.get("seconds", 0.0))
        resumed = list(old.get("resumed_at_steps", [])) + [step]
        lr_by_run = list(old.get("lr_by_run", [old.get("lr", lr)] * len(resumed))) + [lr]
        runs = [dict(r) for r in old.get("runs", [])] + [dict(run_settings, start_step=step)]
        gen.manual_seed(seed + step)
        log(f"[{name}] resumed at step {step}")

    def save(final: bool):
        card["training"] = {
            "objective": "flow matching (velocity MSE)" if kind == "fm" else "DDPM epsilon MSE" + (
                ", weighted by clip(1/SNR, 1, snr_weight_max) in the runs that set it (training.runs)"
                if any(r.get("snr_weight_max") for r in runs) else ""),
            "batch": batch, "optimizer": "AdamW", "lr": lr, "warmup_steps": warmup, "grad_clip": 1.0,
            "ema_decay": ema_decay, "autocast": "bf16" if bf16 else None, "steps": step, "seed": seed,
            "seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-200:])) if losses else None,
            "data": f"fresh renders every step: sample_factors(batch, {TRAIN_SEED_BASE} + step), "
                    f"{step * batch} images in all",
            "env": _env(), "finished": final, "resumed_at_steps": resumed,
            "lr_by_run": lr_by_run, "runs": runs,
        }
        card["parameters"] = M.count_params(net)
        M.save_weights(name, ema.shadow, root)
        M.write_card(name, card, root)

    while True:
        if max_steps is not None and step >= max_steps:
            break
        if max_steps is None and time.time() - run_start > minutes * 60:
            break
        stop_file = (root or M.models_dir()) / f"{name}.stop"
        if step % 100 == 0 and stop_file.exists():  # `touch data/models/<name>.stop` ends a run cleanly
            stop_file.unlink()
            log(f"[{name}] stop file found at step {step}")
            break
        x0, _ = world_batch(batch, step)
        x0 = x0 * 2 - 1
        noise = torch.randn(x0.shape, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if kind == "fm":
                sigma = torch.rand(batch, generator=gen)
                xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
                target = noise - x0
                pred = net(xt, sigma * 1000).sample
            else:
                T = ddpm.config.num_train_timesteps
                t = torch.randint(0, T, (batch,), generator=gen)
                n_high = int(round(high_noise * batch))
                if n_high:
                    t[:n_high] = torch.randint(int(0.9 * T), T, (n_high,), generator=gen)
                xt = ddpm.add_noise(x0, noise, t)
                target = noise
                pred = net(xt, t).sample
        if kind == "ddpm":
            loss = ddpm_loss(pred.float(), target, ddpm.alphas_cumprod[t], snr_weight_max, lowfreq_weight)
        else:
            loss = F.mse_loss(pred.float(), target)
        _warmup_step(opt, net, loss, step, lr, warmup, ema,
                     step if not resumed else 10 ** 6)  # resumed: EMA decay already warm
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            log(f"[{name}] step {step} loss {np.mean(losses[-100:]):.4f} {time.time() - t0:.0f}s")
        if step % save_every == 0:
            save(False)
    save(True)
    return card


# --------------------------------------------------------------------------- classifiers

def _augment(f, factor_names: list[str], seed: int):
    """Resample the listed factors of a factor table (augmentation = intervention on nuisance factors)."""
    rng = np.random.default_rng(seed)
    f = f.copy()
    for name in factor_names:
        allowed = FACTORS[name]
        if isinstance(allowed, list):
            f[name] = [allowed[i] for i in rng.integers(0, len(allowed), len(f))]
        else:
            f[name] = rng.uniform(allowed[0], allowed[1], len(f))
    f["mirror"] = f["mirror"].astype(bool)
    return f


CLASSIFIERS: dict[str, dict[str, Any]] = {
    "shape-resnet": {"target": "shape", "arch": "resnet",
                     "augment": ["color", "background", "mirror"],
                     "description": "timm ResNet shape classifier; colour, background and mirror are "
                                    "resampled every step, so it is invariant to them by construction"},
    "color-vit": {"target": "color", "arch": "vit",
                  "augment": ["shape", "x", "y", "mirror"],
                  "description": "timm ViT (4x4 patches) colour classifier; shape, position and mirror "
                                 "are resampled every step, so it is invariant to them by construction"},
    # the shortcut lesson (notebook 07): same architecture as shape-resnet, plain ERM on a world where
    # colour is paired with shape (circle-red, square-green, triangle-blue, arrow-yellow), no augmentation
    "shortcut-resnet": {"target": "shape", "arch": "resnet", "augment": [],
                        "bias": {"pair": ["shape", "color"], "strength": 0.99}, "steps": 300,
                        "description": "timm ResNet shape classifier trained WITHOUT augmentation on a biased "
                                       "world where each shape comes in its own colour 99% of the time; "
                                       "it learns the colour shortcut (see metrics acc_shape_paired/broken)"},
}


def classifier_card(name: str) -> dict[str, Any]:
    spec = CLASSIFIERS[name]
    n_cls = len(FACTORS[spec["target"]])
    cfg = M.resnet_config(n_cls) if spec["arch"] == "resnet" else M.vit_config(n_cls)
    return {
        "name": name, "spec": f"toy/{name}", "kind": "classifier", "description": spec["description"],
        "architecture": {"library": "timm", "config": cfg},
        "target": spec["target"], "classes": list(map(str, FACTORS[spec["target"]])),
        "augment": spec["augment"], "input": {"size": 32, "range": [0, 1], "mean": [0.5] * 3, "std": [0.5] * 3},
    }


def train_classifier(name: str, *, steps: int = 1500, batch: int = 128, lr: float = 2e-3, seed: int = 0,
                     bias: dict | None = None, root: Path | None = None,
                     log: Callable[[str], None] = print) -> dict:
    """Train a toy classifier on fresh renders; augmentation by resampling nuisance factors."""
    torch.manual_seed(seed)
    card = classifier_card(name)
    target = card["target"]
    net = M.build_timm(card["architecture"]["config"])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    net.train()
    for step in range(steps):
        f = sample_factors(batch, TRAIN_SEED_BASE + 7919 * (seed + 1) + step, bias=bias)
        f = _augment(f, card["augment"], TRAIN_SEED_BASE + step)
        x = (render(f) - 0.5) / 0.5
        y = torch.from_numpy(factor_index(f, target))
        loss = F.cross_entropy(net(x), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"[{name}] step {step + 1} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    card["training"] = {"steps": steps, "batch": batch, "optimizer": "AdamW + OneCycle", "lr": lr,
                        "label_smoothing": 0.05, "seed": seed, "seconds": round(time.time() - t0, 1),
                        "data": f"fresh renders every step, {steps * batch} images in all",
                        "bias": bias, "env": _env()}
    card["parameters"] = M.count_params(net)
    M.save_weights(name, net.eval(), root)
    M.write_card(name, card, root)
    return card


# --------------------------------------------------------------------------- self-supervised encoder

# Augmentation in this world is exact: a "view" is a re-render with some factors resampled. Colour jitter
# and crops become resampling colour, size and position; shape, background and mirror are shared by the two
# views, so a contrastive encoder must keep them and may drop the rest -- a *partial* invariance (a classifier
# would not do: all factors are independent and uniform, so any shape classifier ignores every other factor).
ENCODERS: dict[str, dict[str, Any]] = {
    "simclr-resnet": {"arch": "resnet", "embed_dim": 64, "augment": ["color", "size", "x", "y"], "steps": 600,
                      "description": "timm ResNet (shape-resnet's architecture) trained self-supervised with "
                                     "SimCLR's InfoNCE, no labels: the two views of a scene are re-renders with "
                                     "colour, size and position resampled (exact colour jitter and crops), so it "
                                     "is invariant to those by construction and keeps shape, background and "
                                     "mirror; @embed is the 64-d projection, @pre_logits the 128-d pooled trunk"},
}


def encoder_card(name: str) -> dict[str, Any]:
    spec = ENCODERS[name]
    return {
        "name": name, "spec": f"toy/{name}", "kind": "encoder", "description": spec["description"],
        "architecture": {"library": "timm", "config": M.resnet_config(spec["embed_dim"])},
        "augment": spec["augment"], "layers": ["embed", "pre_logits"], "default_layer": "embed",
        "input": {"size": 32, "range": [0, 1], "mean": [0.5] * 3, "std": [0.5] * 3},
    }


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss on ``z [2B, D]`` whose rows ``i`` and ``i + B`` are the two views of one scene."""
    b = z.shape[0] // 2
    z = F.normalize(z.float(), dim=-1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(sim, target)


def train_encoder(name: str, *, steps: int = 600, batch: int = 128, lr: float = 2e-3, temperature: float = 0.2,
                  seed: int = 0, root: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Train a toy SimCLR encoder on fresh scenes; each step renders two views per scene (``ENCODERS[name]``)."""
    torch.manual_seed(seed)
    card = encoder_card(name)
    net = M.build_timm(card["architecture"]["config"])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    losses = []
    net.train()
    for step in range(steps):
        f = sample_factors(batch, TRAIN_SEED_BASE + 3_000_000 + 7919 * seed + step)
        views = [_augment(f, card["augment"], TRAIN_SEED_BASE + 3_500_000 + 2 * step + v) for v in (0, 1)]
        x = (render(pd.concat(views, ignore_index=True)) - 0.5) / 0.5
        loss = nt_xent(net(x), temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"[{name}] step {step + 1} loss {np.mean(losses[-50:]):.4f} {time.time() - t0:.0f}s")
    card["training"] = {"steps": steps, "batch": batch, "views": 2, "objective": "SimCLR NT-Xent (InfoNCE)",
                        "temperature": temperature, "optimizer": "AdamW + OneCycle", "lr": lr, "seed": seed,
                        "seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-50:])),
                        "data": f"fresh scenes every step, {steps * batch} scenes x 2 views in all",
                        "env": _env()}
    card["parameters"] = M.count_params(net)
    M.save_weights(name, net.eval(), root)
    M.write_card(name, card, root)
    return card


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --------------------------------------------------------------------------- toy CLIP

def clip_card() -> dict[str, Any]:
    return {"name": "clip", "spec": "toy/clip", "kind": "clip",
            "description": "open_clip CLIP (custom config: ViT 4x4 patches + 3-layer text transformer, open_clip's "
                           "own BPE tokenizer), contrastive on renders and captions made from their factors",
            "architecture": {"library": "open_clip", "class": "CLIP", "config": M.clip_config()},
            "input": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}


def _captions_with_facts(f, rng: np.random.Generator) -> tuple[list[str], list[dict[str, Any]]]:
    """One caption per row, full or partial, plus the facts each caption asserts."""
    from ..semantics import TOY_VOCAB
    from .world import CHIRAL, _pos_words, _size_word, caption

    full = caption(f)
    caps, facts = [], []
    for k, row in enumerate(f.itertuples(index=False)):
        kind = rng.integers(0, 9)
        size_w = _size_word(row.size)
        if kind <= 2:
            caps.append(full[k])
            fact = {"shape": row.shape, "color": row.color, "background": row.background, "size_w": size_w,
                    "pos": _pos_words(row.x, row.y)}
            if row.shape in CHIRAL:
                fact["mirror"] = bool(row.mirror)
        elif kind == 3:
            caps.append(str(rng.choice(TOY_VOCAB["color"][row.color]))); fact = {"color": row.color}
        elif kind == 4:
            caps.append(str(rng.choice(TOY_VOCAB["shape"][row.shape]))); fact = {"shape": row.shape}
        elif kind == 5:
            caps.append(str(rng.choice(TOY_VOCAB["background"][row.background]))); fact = {"background": row.background}
        elif kind == 6:
            caps.append(f"a {row.color} {row.shape}."); fact = {"color": row.color, "shape": row.shape}
        elif kind == 7:
            caps.append(str(rng.choice(TOY_VOCAB["size"][size_w]))); fact = {"size_w": size_w}
        else:
            if row.shape in CHIRAL:
                d = "left" if row.mirror else "right"
                caps.append(str(rng.choice(TOY_VOCAB["mirror"][d]))); fact = {"shape": row.shape, "mirror": bool(row.mirror)}
            else:
                caps.append(f"a {row.shape} on a {row.background} background.")
                fact = {"shape": row.shape, "background": row.background}
        facts.append(fact)
    return caps, facts


def _match_matrix(f, facts: list[dict[str, Any]]) -> torch.Tensor:
    """``[N_img, N_cap]``: 1 where image i satisfies every fact caption j asserts (known positives)."""
    from .world import _pos_words, _size_word

    cols = {"shape": f["shape"].to_numpy(), "color": f["color"].to_numpy(),
            "background": f["background"].to_numpy(), "mirror": f["mirror"].to_numpy().astype(bool),
            "size_w": np.array([_size_word(v) for v in f["size"]]),
            "pos": np.array([_pos_words(x, y) for x, y in zip(f["x"], f["y"])])}
    n = len(f)
    match = np.ones((n, len(facts)), dtype=bool)
    for j, fact in enumerate(facts):
        for key, val in fact.items():
            match[:, j] &= cols[key] == val
    return torch.from_numpy(match.astype(np.float32))


def train_clip(*, steps: int = 2500, batch: int = 256, lr: float = 1e-3, seed: int = 0, root: Path | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Contrastive training with *known positives*: a caption is a positive for every image it truthfully describes."""
    from ..semantics import toy_tokenizer

    torch.manual_seed(seed)
    rng = np.random.default_rng(TRAIN_SEED_BASE + 99 + seed)
    card = clip_card()
    cfg = card["architecture"]["config"]
    net = M.build_clip(cfg)
    tok = toy_tokenizer(cfg["text_cfg"]["context_length"])
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in net.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    t0 = time.time()
    net.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, 100)
        f = sample_factors(batch, TRAIN_SEED_BASE + 500_000 + step)
        x = (render(f) - 0.5) / 0.5
        caps, facts = _captions_with_facts(f, rng)
        match = _match_matrix(f, facts)
        img = F.normalize(net.encode_image(x), dim=-1)
        txt = F.normalize(net.encode_text(tok(caps)), dim=-1)
        logits = net.logit_scale.exp() * img @ txt.T
        li = -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        lt = -(match / match.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
        loss = (li + lt) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            net.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % 100 == 0:
            log(f"[clip] step {step + 1} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    card["training"] = {"steps": steps, "batch": batch, "lr": lr, "schedule": "cosine, 100 warm-up", "seed": seed,
                        "objective": "symmetric InfoNCE with known positives (match matrix from factors)",
                        "seconds": round(time.time() - t0, 1),
                        "data": f"fresh renders + captions every step, {steps * batch} pairs in all", "env": _env()}
    card["parameters"] = M.count_params(net)
    M.save_weights("clip", net.eval(), root, half=True)
    M.write_card("clip", card, root)
    return card


def train_all(only: list[str] | None = None, quick: bool = False, minutes: float | None = None,
              log: Callable[[str], None] = print) -> None:
    """Train (and measure) the toy models; ``only`` restricts to some names.

    Order: the oracle first (it judges the priors), then classifiers, CLIP and the priors.
    ``quick`` runs a few steps into a temporary folder (a smoke test that never overwrites).
    """
    import tempfile

    from .evaluate import record
    from .oracle import train_oracle

    names = only or ["oracle", "shape-resnet", "color-vit", "clip", "prior-fm", "prior-ddpm", "shortcut-resnet", "simclr-resnet"]
    unknown = set(names) - set(M.TOY_NAMES)
    if unknown:
        from ..errors import ConfigError
        raise ConfigError(f"unknown toy model(s) {sorted(unknown)}; choose from {M.TOY_NAMES}")
    root = Path(tempfile.mkdtemp(prefix="fiberbench-quick-")) if quick else None
    for name in names:
        log(f"== {name}")
        if name == "oracle":
            train_oracle(steps=20 if quick else 2000, root=root, log=log)
        elif name in CLASSIFIERS:
            train_classifier(name, steps=20 if quick else CLASSIFIERS[name].get("steps", 1500),
                             bias=CLASSIFIERS[name].get("bias"), root=root, log=log)
        elif name in ENCODERS:
            train_encoder(name, steps=20 if quick else ENCODERS[name].get("steps", 600), root=root, log=log)
        elif name == "clip":
            train_clip(steps=20 if quick else 2500, root=root, log=log)
        elif name in ("prior-fm", "prior-ddpm") and minutes and not quick:  # a time budget instead of the recipe
            train_prior("fm" if name == "prior-fm" else "ddpm", minutes=minutes, root=root, log=log)
        elif name in ("prior-fm", "prior-ddpm"):
            train_prior_recipe(name, root=root, quick=quick, log=log)
        if not quick:
            log(f"   metrics: {record(name)}")
    if quick:
        log(f"quick run written to {root}")
