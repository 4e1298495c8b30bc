"""The architectures of the toy models: small configs and the builders that turn a card back into a module.

The toy priors are diffusers ``UNet2DModel``s, the classifiers and encoders timm ResNets and ViTs, the toy
CLIP an open_clip ``CLIP`` with a custom config, and the oracle this package's own :class:`OracleNet`.
"""
from __future__ import annotations

from typing import Any

import timm
import torch
from diffusers import UNet2DModel
from open_clip.model import CLIP
from torch import nn

from ..errors import ConfigError
from .world import CONTINUOUS, DISCRETE, FACTORS

VALID_CONF = 0.9
HEADS = {name: len(FACTORS[name]) for name in DISCRETE}


class OracleNet(nn.Module):
    """Conv trunk that keeps a 4x4 map (so position survives), then one head per factor.

    Input ``[N,3,32,32]`` in [0,1]; output dict: discrete factor -> logits
    ``[N,K]``, ``"regress"`` -> ``[N,3]`` (size, x, y in the factors' units).
    """

    def __init__(self, width: int = 32, hidden: int = 256):
        super().__init__()
        w = width

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.trunk = nn.Sequential(block(3, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
                                   block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 2))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in HEADS.items()})
        self.regress = nn.Linear(hidden, len(CONTINUOUS))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc(self.trunk((x - 0.5) / 0.5))
        out = {k: head(h) for k, head in self.heads.items()}
        out["regress"] = self.regress(h)
        return out


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
        "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 4, "head_width": 32,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3, "mlp_ratio": 2.0},
    }


def build_timm(cfg: dict[str, Any]) -> nn.Module:
    """A timm model from a card's ``architecture.config`` (random weights)."""
    cfg = dict(cfg)
    name = cfg.pop("model_name")
    for k in ("layers", "channels"):
        if k in cfg:
            cfg[k] = tuple(cfg[k])
    return timm.create_model(name, pretrained=False, **cfg)


def build_unet(cfg: dict[str, Any]) -> nn.Module:
    """A diffusers ``UNet2DModel`` from a card's ``architecture.config`` (random weights)."""
    return UNet2DModel(**cfg)


def build_clip(cfg: dict[str, Any]) -> nn.Module:
    """An open_clip ``CLIP`` from a card's ``architecture.config`` (random weights)."""
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
    if kind == "fiberbench" and arch.get("class") == "FeatureConditionedFlow":
        cfg = arch["config"]
        cond = cfg["condition"]
        return FeatureConditionedFlow(build_unet(cfg["unet"]), {k: int(v) for k, v in cond["dims"].items()},
                                      hidden=int(cond["hidden"]))
    if kind == "fiberbench":
        return OracleNet(**arch["config"])
    raise ConfigError(f"card of {card.get('name')!r} names unknown library {kind!r}")


class FeatureConditionedFlow(nn.Module):
    """Velocity network ``v(x_t, t | h)``: a ``UNet2DModel`` whose time embedding gets ``proj[layer](h)`` added.

    Args:
        unet: a ``UNet2DModel`` built with ``class_embed_type="identity"``.
        dims: ``{layer: feature dimension}`` of the conditioning layers.
        hidden: width of each projection MLP.
        feature_mean, feature_std: ``{layer: [D]}`` standardisation of the features (measured on renders).
    """

    def __init__(self, unet: nn.Module, dims: dict[str, int], hidden: int = 256,
                 feature_mean: dict[str, torch.Tensor] | None = None,
                 feature_std: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if getattr(unet.config, "class_embed_type", None) != "identity":
            raise ConfigError("the conditional UNet needs class_embed_type='identity'")
        self.unet = unet
        self.layers = list(dims)
        width = unet.time_embedding.linear_2.out_features
        self.proj = nn.ModuleDict()
        for layer, d in dims.items():
            mlp = nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, width))
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)
            self.proj[layer] = mlp
            mean = (feature_mean or {}).get(layer, torch.zeros(d))
            std = (feature_std or {}).get(layer, torch.ones(d))
            self.register_buffer(f"mean_{layer}", torch.as_tensor(mean, dtype=torch.float32).clone())
            self.register_buffer(f"std_{layer}", torch.as_tensor(std, dtype=torch.float32).clone())
        self.width = width

    def embed(self, feats: torch.Tensor, layer: str, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Condition embedding ``[N, width]``; rows with ``keep`` False get the null (zero) embedding."""
        if layer not in self.proj:
            raise ConfigError(f"the conditional model was trained on layers {self.layers}, not {layer!r}")
        z = (feats.float() - getattr(self, f"mean_{layer}")) / getattr(self, f"std_{layer}")
        e = self.proj[layer](z)
        if keep is not None:
            e = e * keep.to(e.dtype).view(-1, 1)
        return e

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        """Velocity at ``x_t [N,3,32,32]`` (range [-1,1]), model time ``t [N]`` (= 1000 sigma); ``emb`` from
        :meth:`embed` (``None``: unconditional)."""
        if emb is None:
            emb = x_t.new_zeros(x_t.shape[0], self.width)
        return self.unet(x_t, t, class_labels=emb).sample
