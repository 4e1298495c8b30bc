"""Training the two toy priors: rectified flow (``prior-fm``) and DDPM (``prior-ddpm``), and their recipes."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..errors import ConfigError
from ..seeds import TRAIN_SEED_BASE
from ..toy import cards
from ..toy.nets import build_unet, unet_config
from .loop import StepFn, TrainLoop, env, world_batch

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


# The DDPM prior's own sampler (the unguided sampler's hyper-parameters; each knob's probes: docs/models.md):
# - eta 1 (ancestral) below tau 925: at 20 steps deterministic DDIM of this epsilon model smears the layout
#   (valid 0.53 on 256 samples, shift-3 grid, eta 0 throughout);
# - deterministic (eta 0) above tau 925 on the shift-3 grid: the background (a global 3-way choice) is decided
#   at tau ~925-995, which the trailing grid's first step (t 999 -> 949) jumps across (gray 0.6 of samples);
# - x0 not clamped to [-1, 1] in tau 250-995: there this network's x0 estimate has a per-pixel error (residual sd
#   0.30 at tau 950, 0.16 for prior-fm) that clamping to [-1, 1] turns into a pull of black and white toward gray;
# - but clamped to [-2, 2] there: with no clamp at all, a few far-out x0 values leave grain in 9 % of the samples
#   (residual_noise > 0.02; 1.8 % with the [-2, 2] limit, 0 with [-1.5, 1.5] at a larger gray excess).
# Those numbers were measured on a 7.5k-step network trained with plain epsilon MSE (2048 samples: background
# TV 0.070, 0.25 with the trailing grid and eta 1 throughout, 0.029 with no limit; valid 0.958; grainy 0.021). The
# shipped network (2000 steps from prior-fm with clip(1/SNR, 1, 50) weighting, the recipe below) with this sampler,
# 2048 samples: valid 0.930, grainy 0.041, background TV 0.057, size TV 0.093, tv_max 0.093.
DDPM_SAMPLING = {"eta": 1.0, "deterministic_above_tau": 925.0, "grid_shift": 3.0, "unclamped_tau": [250.0, 995.0],
                 "unclamped_limit": 2.0}


# How the shipped priors were trained: the runs recorded in their cards (``training.resumed_at_steps``,
# ``lr_by_run``, ``steps``), each run resuming from the previous run's EMA weights with a fresh optimiser
# (the runs were time-limited; here each ends at its recorded step). ``fiberbench train-toy`` replays them.
# prior-fm's card records one warm-up length (the last run's); it is used for every run. prior-ddpm's card
# also keeps each run's own warm-up (and weighting) in ``training.runs``.
PRIOR_RECIPES: dict[str, list[dict[str, Any]]] = {
    "prior-fm": [dict(until=500, lr=2e-3, warmup=100), dict(until=5706, lr=2e-3, warmup=100),
                 dict(until=9576, lr=2e-3, warmup=100), dict(until=12503, lr=1e-3, warmup=100)],
    # one run from prior-fm's weights with the epsilon MSE weighted by clip(1/SNR, 1, 50): the flow loss weights
    # the x0 error at high noise about so (plain epsilon MSE gave too many small shapes, size TV 0.116, and
    # more training did not change it; docs/performance.md)
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
        if source and not cards.weights_path(source, root).exists():
            raise ConfigError(f"{name} starts from {source}, which is not in {root or cards.models_dir()}: "
                              f"train {source} first")
        until = done + 2 if quick else run["until"]
        del run["until"]
        card = train_prior(kind, max_steps=until, resume=i > 0, root=root, log=log, **run)
        done = until
    return card


def prior_card(kind: str) -> dict[str, Any]:
    """A fresh card for ``prior-fm`` (flow matching) or ``prior-ddpm`` (DDPM, eps-prediction)."""
    base = {
        "architecture": {"library": "diffusers", "class": "UNet2DModel", "config": unet_config()},
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
    ``touch <root>/prior-<kind>.stop`` ends a run cleanly at the next multiple of 25 steps.

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
    check_prior_options(kind, high_noise, snr_weight_max, lowfreq_weight)
    torch.manual_seed(seed)
    card = prior_card(kind)
    net = build_unet(card["architecture"]["config"])
    run = {"lr": lr, "warmup": warmup, "bf16": bf16, "high_noise": high_noise, "snr_weight_max": snr_weight_max}
    if lowfreq_weight:
        run["lowfreq_weight"] = lowfreq_weight
    step, seconds, record = start_prior(card, net, run, init_from=init_from, resume=resume, root=root, log=log)
    loop = TrainLoop(card["name"], net, lr=lr, schedule="warmup", warmup=warmup, ema_decay=ema_decay,
                     ema_warm=bool(record["resumed_at_steps"]), bf16=bf16, max_steps=max_steps, minutes=minutes,
                     start_step=step, seconds_before=seconds, save_every=save_every, root=root, log=log)
    ddpm = DDPMScheduler(**card["scheduler"]["config"]) if kind == "ddpm" else None
    gen = torch.Generator().manual_seed(seed + step)  # a resumed run does not replay the first run's noise
    step_fn = prior_step(net, loop, gen, batch, ddpm, high_noise, snr_weight_max, lowfreq_weight)
    settings = {"batch": batch, "lr": lr, "warmup": warmup, "ema_decay": ema_decay, "bf16": bf16, "seed": seed}
    return loop.run(step_fn, card, partial(prior_training, kind, settings, record))


def check_prior_options(kind: str, high_noise: float, snr_weight_max: float | None, lowfreq_weight: float) -> None:
    """``ConfigError`` unless the high-noise options fit the prior (see :func:`train_prior`)."""
    if kind != "ddpm" and (high_noise or snr_weight_max or lowfreq_weight):
        raise ConfigError("high_noise, snr_weight_max and lowfreq_weight apply to the DDPM prior only")
    if not 0.0 <= high_noise <= 1.0:
        raise ConfigError(f"high_noise must be a fraction in [0, 1], got {high_noise!r}")
    if lowfreq_weight < 0:
        raise ConfigError(f"lowfreq_weight must be >= 0, got {lowfreq_weight!r}")


def start_prior(card: dict[str, Any], net: torch.nn.Module, run: dict[str, Any], *, init_from: str | None,
                resume: bool, root: Path | None, log: Callable[[str], None]) -> tuple[int, float, dict[str, list]]:
    """Load the weights a prior run starts from into ``net`` and note where they came from in ``card``.

    ``run``: this run's settings. Returns ``(first step, seconds of the runs before, record)`` where ``record``
    holds the card's ``resumed_at_steps``, ``lr_by_run`` and ``runs`` including this run.
    """
    name = card["name"]
    record: dict[str, list] = {"resumed_at_steps": [], "lr_by_run": [run["lr"]], "runs": [run]}
    if init_from is not None:
        src = cards.read_card(init_from, root)
        cards.load_weights(init_from, net, root)
        card["initialised_from"] = {"model": init_from, "steps": src.get("training", {}).get("steps"),
                                    "seconds": src.get("training", {}).get("seconds")}
        log(f"[{name}] initialised from {init_from}")
    if not (resume and cards.weights_path(name, root).exists()):
        return 0, 0.0, record
    old_card = cards.read_card(name, root)
    if "initialised_from" in old_card and "initialised_from" not in card:  # keep where the weights began
        card["initialised_from"] = old_card["initialised_from"]
    old = old_card.get("training", {})
    cards.load_weights(name, net, root)
    step = int(old.get("steps", 0))
    resumed = list(old.get("resumed_at_steps", [])) + [step]
    record = {"resumed_at_steps": resumed,
              "lr_by_run": list(old.get("lr_by_run", [old.get("lr", run["lr"])] * len(resumed))) + [run["lr"]],
              "runs": [dict(r) for r in old.get("runs", [])] + [dict(run, start_step=step)]}
    log(f"[{name}] resumed at step {step}")
    return step, float(old.get("seconds", 0.0)), record


def prior_step(net: torch.nn.Module, loop: TrainLoop, gen: torch.Generator, batch: int,
               ddpm: DDPMScheduler | None, high_noise: float, snr_weight_max: float | None,
               lowfreq_weight: float) -> StepFn:
    """The loss of one step of the flow prior (``ddpm=None``) or the DDPM prior on ``batch`` fresh renders.

    Flow: ``x_t = (1 - sigma) x0 + sigma noise`` with ``sigma ~ U[0, 1)``, velocity target ``noise - x0``;
    DDPM: ``t`` uniform (the first ``high_noise`` of the batch from the noisiest tenth), :func:`ddpm_loss`.
    Every draw comes from ``gen``: noise first, then sigma or t.
    """
    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0, _ = world_batch(batch, step)
        x0 = x0 * 2 - 1
        noise = torch.randn(x0.shape, generator=gen)
        with loop.autocast():
            if ddpm is None:
                sigma = torch.rand(batch, generator=gen)
                xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
                pred = net(xt, sigma * 1000).sample
            else:
                T = ddpm.config.num_train_timesteps
                t = torch.randint(0, T, (batch,), generator=gen)
                n_high = int(round(high_noise * batch))
                if n_high:
                    t[:n_high] = torch.randint(int(0.9 * T), T, (n_high,), generator=gen)
                pred = net(ddpm.add_noise(x0, noise, t), t).sample
        if ddpm is None:
            return F.mse_loss(pred.float(), noise - x0), {}
        return ddpm_loss(pred.float(), noise, ddpm.alphas_cumprod[t], snr_weight_max, lowfreq_weight), {}

    return step_fn


def prior_training(kind: str, settings: dict[str, Any], record: dict[str, list], loop: TrainLoop,
                   final: bool) -> dict[str, Any]:
    """The ``training`` section of a prior's card (``settings``: batch, lr, warmup, ema_decay, bf16, seed)."""
    weighted = any(r.get("snr_weight_max") for r in record["runs"])
    objective = ("flow matching (velocity MSE)" if kind == "fm" else "DDPM epsilon MSE" + (
        ", weighted by clip(1/SNR, 1, snr_weight_max) in the runs that set it (training.runs)" if weighted else ""))
    return {
        "objective": objective, "batch": settings["batch"], "optimizer": "AdamW", "lr": settings["lr"],
        "warmup_steps": settings["warmup"], "grad_clip": 1.0, "ema_decay": settings["ema_decay"],
        "autocast": "bf16" if settings["bf16"] else None, "steps": loop.step, "seed": settings["seed"],
        "seconds": round(loop.seconds(), 1), "final_loss": loop.recent("loss", 200),
        "data": f"fresh renders every step: sample_factors(batch, {TRAIN_SEED_BASE} + step), "
                f"{loop.step * settings['batch']} images in all",
        "env": env(), "finished": final, **record,
    }
