"""What every toy model's training shares: fresh renders, the learning-rate schedules, EMA, the training loop.

Everything trains on *fresh renders every step* from :func:`~fiberbench.toy.sample_factors` with seeds at
or above :data:`~fiberbench.seeds.TRAIN_SEED_BASE`, which never overlap the evaluation seeds, so every
metric in a card is measured on images the model has never seen.

:class:`TrainLoop` is the one training loop: a ``train_*`` function builds its network and card, defines the
loss of one step (``step_fn(step) -> (loss, logs)``) and the card's ``training`` section, and the loop does
the rest (optimiser, schedule, gradient clipping, EMA, stop conditions, logging, saving).
"""
from __future__ import annotations

import contextlib
import copy
import math
import platform
import time
from pathlib import Path
from typing import Any, Callable

import diffusers
import numpy as np
import timm
import torch
from torch import nn

from ..seeds import TRAIN_SEED_BASE
from ..toy import cards, render, sample_factors

StepFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]
"""``step_fn(step) -> (scalar loss with a graph, {name: float} extra values to log)``."""

TrainingFn = Callable[["TrainLoop", bool], dict[str, Any]]
"""``training(loop, final) -> the card's "training" section`` (read at every save)."""

SCHEDULES = ("warmup", "cosine", "onecycle")
STOP_CHECK_EVERY = 25  # steps between looks for the stop file
EMA_WARM_STEP = 10 ** 6  # EMA step of a resumed run: its decay warm-up is long over


def env() -> dict[str, Any]:
    """The software a model was trained with (recorded in its card)."""
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


def lr_at(step: int, base: float, warmup: int) -> float:
    """Linear warm-up of the learning rate over ``warmup`` steps, then ``base``."""
    return base * min(1.0, (step + 1) / warmup)


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``base`` to 0 at step ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class TrainLoop:
    """The training loop of every toy model (AdamW, one process, CPU).

    Args:
        name: the model's name: its files are ``<root>/<name>.safetensors`` / ``.json``, and
            ``touch <root>/<name>.stop`` ends the run cleanly at the next multiple of 25 steps.
        net: the network being trained (in place).
        lr, schedule, warmup: peak learning rate and its schedule: ``"warmup"`` (linear over ``warmup`` steps,
            then constant), ``"cosine"`` (linear warm-up, then cosine to 0 at ``max_steps``) or ``"onecycle"``
            (torch's ``OneCycleLR`` over ``max_steps``, 10 % rising).
        weight_decay, param_groups: AdamW's decoupled weight decay; ``param_groups`` (each with its own decay)
            replaces ``net.parameters()``.
        grad_clip: global gradient-norm limit (``None``: no clipping).
        ema_decay: keep an :class:`EMA` of the weights and save it instead of ``net`` (``None``: no EMA).
        ema_warm: a resumed run: the EMA decay starts at its full value.
        bf16: what :meth:`autocast` does (CPU bf16 autocast; the master weights stay fp32).
        max_steps, minutes: the run ends at step ``max_steps`` or, without it, after ``minutes`` of wall time.
        start_step, seconds_before: a resumed run's first step and the seconds of the runs before it (its
            budget in ``minutes`` is its own; the card's seconds add both).
        save_every: also save weights and card every ``save_every`` steps (``None``: at the end only).
        half: save float tensors as fp16.
        log_every: steps between log lines (means over the last ``log_every`` steps).
    """

    def __init__(self, name: str, net: nn.Module, *, lr: float, schedule: str, warmup: int = 0,
                 weight_decay: float = 0.0, param_groups: list[dict[str, Any]] | None = None,
                 grad_clip: float | None = 1.0, ema_decay: float | None = None, ema_warm: bool = False,
                 bf16: bool = False, max_steps: int | None = None, minutes: float | None = None,
                 start_step: int = 0, seconds_before: float = 0.0, save_every: int | None = None,
                 half: bool = False, log_every: int = 100, root: Path | None = None,
                 log: Callable[[str], None] = print):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
        if max_steps is None and (minutes is None or schedule != "warmup"):
            raise ValueError(f"schedule {schedule!r} needs max_steps; 'warmup' needs max_steps or minutes")
        self.name, self.net, self.root, self.log = name, net, root, log
        self.lr, self.schedule, self.warmup, self.grad_clip = lr, schedule, warmup, grad_clip
        self.bf16, self.max_steps, self.minutes = bf16, max_steps, minutes
        self.save_every, self.half, self.log_every = save_every, half, log_every
        self.opt = torch.optim.AdamW(param_groups or net.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = (torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=lr, total_steps=max_steps,
                                                              pct_start=0.1) if schedule == "onecycle" else None)
        self.ema = EMA(net, ema_decay) if ema_decay is not None else None
        self.ema_warm = ema_warm
        self.step = start_step
        self.seconds_before = seconds_before
        self.started = time.time()
        self.history: dict[str, list[float]] = {"loss": []}

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward passes' autocast context (bf16 on CPU when the loop was built with ``bf16``)."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    def seconds(self) -> float:
        """Wall time of this run and the runs it resumed, in seconds."""
        return self.seconds_before + time.time() - self.started

    def recent(self, key: str, n: int, nan: bool = False) -> float | None:
        """Mean of the last ``n`` values of ``key`` (``nan``: ignoring NaN); ``None`` before the first step."""
        values = self.history.get(key, [])[-n:]
        if not values:
            return None
        return float(np.nanmean(values) if nan else np.mean(values))

    def run(self, step_fn: StepFn, card: dict[str, Any], training: TrainingFn,
            after_step: Callable[[], None] | None = None) -> dict[str, Any]:
        """Train until a stop condition, saving every ``save_every`` steps and at the end; returns ``card``.

        ``after_step`` runs after each optimiser (and EMA) step, e.g. to clamp a parameter into its range.
        """
        self.started = time.time()
        self.net.train()
        while not self._should_stop():
            if self.schedule in ("warmup", "cosine"):
                lr = (lr_at(self.step, self.lr, self.warmup) if self.schedule == "warmup"
                      else cosine_lr(self.step, self.max_steps, self.lr, self.warmup))
                for g in self.opt.param_groups:
                    g["lr"] = lr
            loss, logs = step_fn(self.step)
            self._update(loss)
            if after_step is not None:
                after_step()
            for key, value in {"loss": loss.item(), **logs}.items():
                self.history.setdefault(key, []).append(value)
            self.step += 1
            if self.step % self.log_every == 0:
                means = " ".join(f"{k} {np.nanmean(v[-self.log_every:]):.4f}" for k, v in self.history.items())
                self.log(f"[{self.name}] step {self.step} {means} {self.seconds():.0f}s")
            if self.save_every and self.step % self.save_every == 0:
                self.save(card, training, final=False)
        self.save(card, training, final=True)
        return card

    def _should_stop(self) -> bool:
        if self.max_steps is not None:
            if self.step >= self.max_steps:
                return True
        elif time.time() - self.started > self.minutes * 60:
            return True
        stop_file = (self.root or cards.models_dir()) / f"{self.name}.stop"
        if self.step % STOP_CHECK_EVERY == 0 and stop_file.exists():
            stop_file.unlink()
            self.log(f"[{self.name}] stop file found at step {self.step}")
            return True
        return False

    def _update(self, loss: torch.Tensor) -> None:
        """Backward, clip, AdamW step, scheduler step, EMA update."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.opt.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.net, EMA_WARM_STEP if self.ema_warm else self.step)

    def save(self, card: dict[str, Any], training: TrainingFn, final: bool) -> None:
        """Fill ``card``'s training section and parameter count; write the weights (the EMA's if any) and card."""
        card["training"] = training(self, final)
        card["parameters"] = cards.count_params(self.net)
        module = self.ema.shadow if self.ema is not None else self.net.eval()
        cards.save_weights(self.name, module, self.root, half=self.half)
        cards.write_card(self.name, card, self.root)
        if not final:
            self.net.train()
