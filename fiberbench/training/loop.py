"""What every toy model's training shares: fresh renders, warm-up, EMA, the environment record.

Everything trains on *fresh renders every step* from :func:`~fiberbench.toy.sample_factors` with seeds at
or above :data:`~fiberbench.seeds.TRAIN_SEED_BASE`, which never overlap the evaluation seeds, so every
metric in a card is measured on images the model has never seen.
"""
from __future__ import annotations

import copy
import math
import platform
from typing import Any

import diffusers
import timm
import torch
from torch import nn

from ..seeds import TRAIN_SEED_BASE
from ..toy import render, sample_factors


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


def warmup_step(opt, net, loss, step: int, lr: float, warmup: int, ema, ema_step: int) -> None:
    """One AdamW step of a diffusion-style loop: warm-up lr, backward, grad-clip 1, step, EMA update."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, lr, warmup)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    ema.update(net, ema_step)


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
