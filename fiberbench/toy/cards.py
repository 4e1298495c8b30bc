"""Cards and weight files of the tiny toy models.

Every shipped model is two files in ``data/models/``: ``<name>.safetensors``
(weights, no pickle) and ``<name>.json`` (the *card*: architecture config,
training config, seed, data, measured metrics, training time). The card is
data: :func:`fiberbench.toy.nets.build_module` turns it back into the ``nn.Module``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError, close_matches
from .nets import build_module

TOY_NAMES = ["prior-fm", "prior-ddpm", "shape-resnet", "color-vit", "oracle", "clip", "shortcut-resnet",
             "simclr-resnet"]


def models_dir() -> Path:
    """Folder of the shipped toy models (``$FIBERBENCH_MODELS`` overrides it)."""
    env = os.environ.get("FIBERBENCH_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "data" / "models"


def card_path(name: str, root: Path | None = None) -> Path:
    return (root or models_dir()) / f"{name}.json"


def weights_path(name: str, root: Path | None = None) -> Path:
    return (root or models_dir()) / f"{name}.safetensors"


def available(root: Path | None = None) -> list[str]:
    """Names of toy models whose card and weights are both present."""
    root = root or models_dir()
    return [n for n in _all_names(root) if card_path(n, root).exists() and weights_path(n, root).exists()]


def _all_names(root: Path) -> list[str]:
    extra = sorted(p.stem for p in root.glob("*.json") if p.stem not in TOY_NAMES and not p.stem.endswith(".scheduler"))
    return TOY_NAMES + extra


def read_card(name: str, root: Path | None = None) -> dict[str, Any]:
    """The JSON card of toy model ``name``; ``ConfigError`` listing known names if absent."""
    path = card_path(name, root)
    if not path.exists():
        known = available(root)
        hint = close_matches(name, known)
        raise ConfigError(
            f"no toy model {name!r} in {path.parent}; available: {known}"
            + (f"; did you mean {hint}?" if hint else "")
            + " (train it with `fiberbench train-toy --only NAME`)")
    return json.loads(path.read_text())


def write_card(name: str, card: dict[str, Any], root: Path | None = None) -> Path:
    """Write a card atomically (temp file + rename)."""
    path = card_path(name, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def save_weights(name: str, module: nn.Module, root: Path | None = None, *, half: bool = False) -> Path:
    """Save a state dict as safetensors (atomically); ``half`` stores float tensors as fp16."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    path = weights_path(name, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return path


def load_weights(name: str, module: nn.Module, root: Path | None = None) -> nn.Module:
    """Load safetensors weights into ``module`` (strict; cast to the module's dtypes)."""
    path = weights_path(name, root)
    if not path.exists():
        raise ConfigError(f"weights of toy model {name!r} not found at {path}")
    state = load_file(str(path))
    ref = module.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
    module.load_state_dict(state, strict=True)
    return module


def load_toy_module(name: str, root: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build a toy model from its card and load its weights. Returns ``(module.eval(), card)``."""
    card = read_card(name, root)
    module = build_module(card)
    load_weights(name, module, root)
    return module.eval(), card


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
