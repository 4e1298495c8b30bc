"""Architectures, cards and weight files of the tiny toy models.

Every shipped model is two files in ``data/models/``: ``<name>.safetensors``
(weights, no pickle) and ``<name>.json`` (the *card*: architecture config,
training config, seed, data, measured metrics, training time). The card is
data: ``build_module(card)`` turns it back into the ``nn.Module``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, close_matches

TOY_NAMES = ["prior-fm", "prior-ddpm", "shape-resnet", "color-vit", "oracle", "clip", "shortcut-resnet", "simclr-resnet"]


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
    from safetensors.torch import save_file

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
    from safetensors.torch import load_file

    path = weights_path(name, root)
    if not path.exists():
        raise ConfigError(f"weights of toy model {name!r} not found at {path}")
    state = load_file(str(path))
    ref = module.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
    module.load_state_dict(state, strict=True)
    return module


# --------------------------------------------------------------------------- architectures

def unet_config() -> dict[str, Any]:
    """The ~1.1 M parameter ``UNet2DModel`` of both toy priors (attention only at 8x8)."""
    return dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=[32, 64, 64],
        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        attention_head_dim=32, norm_num_groups=16,
    )


def resnet_config(num_classes: int) -> dict[str, Any]:
    """A tiny timm ResNet (BasicBlock, one block a stage) for 32x32 inputs."""
    return dict(model_name="resnet18", num_classes=num_classes, layers=[1, 1, 1, 1],
                channels=[32, 64, 128, 128], stem_width=32)


def vit_config(num_classes: int) -> dict[str, Any]:
    """A tiny timm ViT with 4x4 patches on 32x32 inputs."""
    return dict(model_name="vit_tiny_patch16_224", num_classes=num_classes, img_size=32, patch_size=4,
                embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0)


def clip_config() -> dict[str, Any]:
    """open_clip custom config of ``toy/clip`` (same schema as open_clip's ``model_configs/*.json``)."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 4, "head_width": 32, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3, "mlp_ratio": 2.0},
    }


def build_timm(cfg: dict[str, Any]) -> nn.Module:
    import timm

    cfg = dict(cfg)
    name = cfg.pop("model_name")
    for k in ("layers", "channels"):
        if k in cfg:
            cfg[k] = tuple(cfg[k])
    return timm.create_model(name, pretrained=False, **cfg)


def build_unet(cfg: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**cfg)


def build_clip(cfg: dict[str, Any]) -> nn.Module:
    from open_clip.model import CLIP

    return CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])


def build_module(card: dict[str, Any]) -> nn.Module:
    """Instantiate the architecture a card describes (random weights)."""
    arch = card["architecture"]
    kind = arch["library"]
    if kind == "diffusers":
        return build_unet(arch["config"])
    if kind == "timm":
        return build_timm(arch["config"])
    if kind == "open_clip":
        return build_clip(arch["config"])
    if kind == "fiberbench":
        from .oracle import OracleNet
        return OracleNet(**arch["config"])
    raise ConfigError(f"card of {card.get('name')!r} names unknown library {kind!r}")


def load_toy_module(name: str, root: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build a toy model from its card and load its weights. Returns ``(module.eval(), card)``."""
    card = read_card(name, root)
    module = build_module(card)
    load_weights(name, module, root)
    return module.eval(), card


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cards_markdown(root: Path | None = None) -> str:
    """A Markdown table of every shipped toy model: what it is, size, training time and measured metrics."""
    lines = ["| spec | kind | parameters | training | metrics (fresh seeds) |", "|---|---|---|---|---|"]
    for name in available(root):
        card = read_card(name, root)
        tr = card.get("training", {})
        metrics = {k: v for k, v in card.get("metrics", {}).items() if isinstance(v, (int, float))}
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        steps = tr.get("steps")
        lines.append(f"| `{card.get('spec')}` | {card.get('kind')} | {card.get('parameters', 0) / 1e6:.2f} M | "
                     f"{steps} steps, {tr.get('seconds', 0) / 60:.0f} min | {shown} |")
    return "\n".join(lines) + "\n"
