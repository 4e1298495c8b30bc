"""The vision tower of Qwen2-VL / Qwen2.5-VL as an extractor body, with its processor's patching done in torch.

The tower does not take ``pixel_values [N,3,H,W]``: Qwen's image processor resizes each image to a multiple
of ``patch_size * merge_size`` (28 px; "smart resize": aspect kept, pixel count within ``[min_pixels,
max_pixels]``), normalises it, repeats it ``temporal_patch_size`` times along time and cuts it into
flattened patches ``[N * gh * gw, 3 * T * p * p]``, ordered so that each ``merge x merge`` group of patches
is contiguous (the tower's patch merger fuses each group into one token). The tower is then called as
``visual(patches, grid_thw=[[1, gh, gw]] * N)``. :class:`QwenVisionBody` does the same differentiably on
normalised ``[N,3,H,W]`` tensors (the :class:`~fiberbench.models.extractor.Extractor` normalises), so
gradients reach the image. ``transformers`` is not imported here: the tower comes in already loaded.

Layers (``hf/<repo>@<layer>``): ``mean`` (default; the mean over an image's merged patch tokens, the
fiber paper's phi for Qwen2-VL), ``tokens`` (all merged tokens, flattened; fixed size for a fixed input
size), ``hidden_mean`` (the mean of the last block's tokens, before the merger) and ``blocks.<i>`` (the
mean of block i's output tokens).
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
QWEN_LAYERS = ("mean", "tokens", "hidden_mean", "blocks.<i>")


def smart_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The side lengths Qwen's processor resizes an image of ``height x width`` to: each rounded to a multiple of
    ``factor``, then scaled (aspect kept) into ``[min_pixels, max_pixels]`` pixels if outside."""
    if max(height, width) / min(height, width) > 200:
        raise ConfigError(f"Qwen vision tower: aspect ratio {max(height, width) / min(height, width):.0f} > 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def patchify(x: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images ``[N,C,H,W]`` (H, W multiples of ``patch * merge``) -> ``(patches [N*gh*gw, C*T*p*p],
    grid_thw [N,3])`` in the processor's order: merge groups, then the patches of a group row-major, each
    patch flattened as (channel, time, row, column) with the image repeated over the T time steps."""
    n, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    p = x.reshape(n, c, gh // merge, merge, patch, gw // merge, merge, patch)
    p = p.permute(0, 2, 5, 3, 6, 1, 4, 7)  # n, gh/m, gw/m, m, m, c, p, p
    p = p.unsqueeze(6).expand(*p.shape[:6], temporal, patch, patch)
    grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long, device=x.device)
    return p.reshape(n * gh * gw, c * temporal * patch * patch), grid


class QwenVisionBody(nn.Module):
    """A Qwen2(-.5)-VL vision tower on normalised images ``[N,3,H,W]`` -> features ``[N,D]`` of one layer.

    ``patch``/``merge``/``temporal``/``min_pixels``/``max_pixels`` are the image processor's; ``interpolation``
    its resampling (bicubic), done with antialiasing as the processor's torchvision backend does.
    """

    def __init__(self, visual: nn.Module, *, patch: int, merge: int, temporal: int, min_pixels: int,
                 max_pixels: int, interpolation: str = "bicubic"):
        super().__init__()
        self.visual = visual
        self.patch, self.merge, self.temporal = patch, merge, temporal
        self.min_pixels, self.max_pixels, self.interpolation = min_pixels, max_pixels, interpolation

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """``[N,3,H,W]`` -> ``[N,3,H',W']`` at the processor's smart size (unchanged if already there)."""
        size = smart_size(*x.shape[-2:], self.patch * self.merge, self.min_pixels, self.max_pixels)
        if size == tuple(x.shape[-2:]):
            return x
        return F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)

    def forward(self, x: torch.Tensor, layer: str = "mean") -> torch.Tensor:
        x = self.resize(x)
        n = x.shape[0]
        patches, grid = patchify(x, self.patch, self.merge, self.temporal)
        hooked: list[torch.Tensor] = []

        def capture(mod: nn.Module, inputs: tuple, output: Any) -> None:
            # the merger's input is the last block's tokens; a block's output may be a tuple
            hooked.append(inputs[0] if layer == "hidden_mean" else output[0] if isinstance(output, tuple) else output)

        module = self.hooked_module(layer)
        handle = module.register_forward_hook(capture) if module is not None else None
        try:
            out = self.visual(patches, grid_thw=grid)
        finally:
            if handle is not None:
                handle.remove()
        if hooked:
            return hooked[0].reshape(n, -1, hooked[0].shape[-1]).mean(1)
        merged = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4.x | 5.x
        tokens = merged.reshape(n, -1, merged.shape[-1])
        return tokens.mean(1) if layer == "mean" else tokens.flatten(1)

    def hooked_module(self, layer: str) -> nn.Module | None:
        """The module whose tokens a layer reads (``None`` for ``mean`` / ``tokens``, the tower's output)."""
        if layer in ("mean", "tokens"):
            return None
        if layer == "hidden_mean":
            return self.visual.merger
        m = re.fullmatch(r"blocks\.(\d+)", layer)
        if m and int(m.group(1)) < len(self.visual.blocks):
            return self.visual.blocks[int(m.group(1))]
        raise ConfigError(f"unknown layer {layer!r} of a Qwen vision tower; use one of {QWEN_LAYERS} "
                          f"(i < {len(self.visual.blocks)})")


def vision_tower(model: nn.Module) -> nn.Module:
    """The ``visual`` module of a Qwen2(-.5)-VL model (on the top-level class in transformers 4.x, on the inner
    ``model`` from 5.0)."""
    for holder in (model, getattr(model, "model", None)):
        tower = getattr(holder, "visual", None)
        if tower is not None:
            return tower
    raise ConfigError(f"{type(model).__name__} has no Qwen vision tower ('visual')")


def processor_settings(processor: Any, vision_config: Any) -> dict[str, Any]:
    """Patch, merge and time sizes, pixel bounds, mean/std and resampling of a Qwen image processor (the vision
    config's and Qwen's defaults where there is none)."""
    size = getattr(processor, "size", None)

    def get(key: str):
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    def first(*values):
        return next(v for v in values if v is not None)

    return dict(
        patch=int(first(getattr(processor, "patch_size", None), getattr(vision_config, "patch_size", None), 14)),
        merge=int(first(getattr(processor, "merge_size", None), getattr(vision_config, "spatial_merge_size", None), 2)),
        temporal=int(first(getattr(processor, "temporal_patch_size", None),
                           getattr(vision_config, "temporal_patch_size", None), 2)),
        min_pixels=int(first(getattr(processor, "min_pixels", None), get("shortest_edge"), 56 * 56)),
        max_pixels=int(first(getattr(processor, "max_pixels", None), get("longest_edge"), 28 * 28 * 1280)),
        mean=list(first(getattr(processor, "image_mean", None), (0.48145466, 0.4578275, 0.40821073))),
        std=list(first(getattr(processor, "image_std", None), (0.26862954, 0.26130258, 0.27577711))))
