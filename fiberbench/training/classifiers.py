"""Training the toy classifiers (supervised, with augmentation) and the SimCLR encoder (self-supervised)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..seeds import TRAIN_SEED_BASE
from ..toy.nets import build_timm, resnet_config, vit_config
from ..toy.world import FACTORS, factor_index, render, sample_factors
from .loop import TrainLoop, env


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
    cfg = resnet_config(n_cls) if spec["arch"] == "resnet" else vit_config(n_cls)
    return {
        "name": name, "spec": f"toy/{name}", "kind": "classifier", "description": spec["description"],
        "architecture": {"library": "timm", "config": cfg},
        "target": spec["target"], "classes": list(map(str, FACTORS[spec["target"]])),
        "augment": spec["augment"], "input": {"size": 32, "range": [0, 1], "mean": [0.5] * 3, "std": [0.5] * 3},
    }


def train_classifier(name: str, *, steps: int = 1500, batch: int = 128, lr: float = 2e-3, seed: int = 0,
                     bias: dict | None = None, root: Path | None = None,
                     log: Callable[[str], None] = print) -> dict:
    """Train a toy classifier on fresh renders; augmentation by resampling nuisance factors.

    ``bias`` (see :func:`~fiberbench.toy.sample_factors`) pairs factors in the training world. Returns the card.
    """
    torch.manual_seed(seed)
    card = classifier_card(name)
    target = card["target"]
    net = build_timm(card["architecture"]["config"])
    loop = TrainLoop(name, net, lr=lr, schedule="onecycle", weight_decay=0.05, max_steps=steps, root=root, log=log)

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        f = sample_factors(batch, TRAIN_SEED_BASE + 7919 * (seed + 1) + step, bias=bias)
        f = _augment(f, card["augment"], TRAIN_SEED_BASE + step)
        x = (render(f) - 0.5) / 0.5
        y = torch.from_numpy(factor_index(f, target))
        return F.cross_entropy(net(x), y, label_smoothing=0.05), {}

    def training(lp: TrainLoop, final: bool) -> dict[str, Any]:
        return {"steps": lp.step, "batch": batch, "optimizer": "AdamW + OneCycle", "lr": lr,
                "label_smoothing": 0.05, "seed": seed, "seconds": round(lp.seconds(), 1),
                "data": f"fresh renders every step, {lp.step * batch} images in all",
                "bias": bias, "env": env()}

    return loop.run(step_fn, card, training)


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
        "architecture": {"library": "timm", "config": resnet_config(spec["embed_dim"])},
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
    """Train a toy SimCLR encoder on fresh scenes; each step renders two views per scene (``ENCODERS[name]``).

    A batch is ``batch`` scenes, ``2 * batch`` images. Returns the card.
    """
    torch.manual_seed(seed)
    card = encoder_card(name)
    net = build_timm(card["architecture"]["config"])
    loop = TrainLoop(name, net, lr=lr, schedule="onecycle", weight_decay=0.05, max_steps=steps, log_every=50,
                     root=root, log=log)

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        f = sample_factors(batch, TRAIN_SEED_BASE + 3_000_000 + 7919 * seed + step)
        views = [_augment(f, card["augment"], TRAIN_SEED_BASE + 3_500_000 + 2 * step + v) for v in (0, 1)]
        x = (render(pd.concat(views, ignore_index=True)) - 0.5) / 0.5
        return nt_xent(net(x), temperature), {}

    def training(lp: TrainLoop, final: bool) -> dict[str, Any]:
        return {"steps": lp.step, "batch": batch, "views": 2, "objective": "SimCLR NT-Xent (InfoNCE)",
                "temperature": temperature, "optimizer": "AdamW + OneCycle", "lr": lr, "seed": seed,
                "seconds": round(lp.seconds(), 1), "final_loss": lp.recent("loss", 50),
                "data": f"fresh scenes every step, {lp.step * batch} scenes x 2 views in all",
                "env": env()}

    return loop.run(step_fn, card, training)
