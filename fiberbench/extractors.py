"""Feature extractors: any vision model as ``f(images in [0,1]) -> [N, D]``, differentiable.

An :class:`Extractor` owns its preprocessing (resize to the model's input
size, normalise with its mean/std) *inside the graph*, so gradients reach the
[0,1] image, and it picks which features to return:

- ``logits``: the model's output;
- ``pre_logits``: the input of the classifier head (timm ``forward_head(pre_logits=True)``);
- ``<module.path>``: any named sub-module, captured with a forward hook and flattened.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, InputError, close_matches


class Extractor(nn.Module):
    """A frozen feature extractor on images ``[N,3,H,W]`` in [0,1] -> features ``[N,D]``.

    Args:
        model: the wrapped network (weights frozen, eval mode).
        spec: the spec string it was loaded from (recorded in every result).
        layer: ``"logits"``, ``"pre_logits"``, ``"embed"`` (for models whose
            output is already the embedding) or a named sub-module.
        input_size: side the model expects (``None``: any size, no resize).
        mean, std: per-channel normalisation applied after resizing.
        forward_fn: optional ``fn(model, x) -> features`` overriding the layer logic.
    """

    def __init__(self, model: nn.Module, *, spec: str, layer: str = "logits", input_size: int | None = None,
                 mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                 interpolation: str = "bilinear", forward_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                 card: dict[str, Any] | None = None, classes: list[str] | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.spec, self.layer, self.input_size, self.interpolation = spec, layer, input_size, interpolation
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.forward_fn = forward_fn
        self.card = card or {}
        self.classes = classes
        self._hooked: torch.Tensor | None = None
        if layer not in ("logits", "pre_logits", "embed") and forward_fn is None:
            modules = dict(model.named_modules())
            if layer not in modules:
                names = [n for n in modules if n]
                hint = close_matches(layer, names)
                raise ConfigError(
                    f"layer {layer!r} not found in {spec}; valid: logits, pre_logits or a module name such as "
                    f"{names[:12]}{' …' if len(names) > 12 else ''}" + (f"; did you mean {hint}?" if hint else ""))
            modules[layer].register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        self._hooked = output[0] if isinstance(output, (tuple, list)) else output

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images -> the model's input (resized, normalised), differentiably."""
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"{self.spec}: expected images [N,3,H,W] in [0,1], got shape {tuple(images.shape)}")
        x = images.to(self.mean.dtype)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=self.interpolation,
                              align_corners=False, antialias=self.interpolation in ("bilinear", "bicubic")
                              and x.shape[-1] > self.input_size)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[N, D]`` of images ``[N,3,H,W]`` in [0,1]."""
        x = self.preprocess(images)
        if self.forward_fn is not None:
            out = self.forward_fn(self.model, x)
        elif self.layer in ("logits", "embed"):
            out = self.model(x)
        elif self.layer == "pre_logits":
            out = self.pre_logits(x, preprocessed=True)
        else:
            self._hooked = None
            self.model(x)
            out, self._hooked = self._hooked, None
        return out.flatten(1).float()

    def pre_logits(self, images: torch.Tensor, preprocessed: bool = False) -> torch.Tensor:
        """Input of the classifier head ``[N, D]`` (timm models)."""
        x = images if preprocessed else self.preprocess(images)
        m = self.model
        if not hasattr(m, "forward_head"):
            raise ConfigError(f"{self.spec} has no classifier head; use @logits or a module name")
        return m.forward_head(m.forward_features(x), pre_logits=True).flatten(1)

    def classifier(self) -> nn.Linear:
        """The final linear layer (for SING), ``weight [C, D]``."""
        m = self.model
        head = m.get_classifier() if hasattr(m, "get_classifier") else None
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"{self.spec}: the classifier head is not a single nn.Linear ({type(head).__name__})")
        return head

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, layer={self.layer!r}, input_size={self.input_size}"


def load_toy_extractor(name: str, layer: str | None, device="cpu") -> Extractor:
    """A shipped toy classifier (``toy/shape-resnet``, ``toy/color-vit``, …); default layer ``logits``."""
    from .toy import models as M

    module, card = M.load_toy_module(name)
    if card.get("kind") not in ("classifier", "encoder"):
        raise ConfigError(f"toy/{name} is a {card.get('kind')}, not a feature extractor; "
                          f"extractors: {[f'toy/{n}' for n in M.available() if M.read_card(n).get('kind') in ('classifier', 'encoder')]}")
    inp = card.get("input", {})
    layer = layer or card.get("default_layer", "logits")
    spec = f"toy/{name}@{layer}"
    return Extractor(module, spec=spec, layer=layer, input_size=inp.get("size", 32), mean=inp.get("mean", [0.5] * 3),
                     std=inp.get("std", [0.5] * 3), card=card, classes=card.get("classes")).to(device)


def load_timm_extractor(name: str, layer: str | None, device="cpu", pretrained: bool = True,
                        checkpoint: str | None = None, **kwargs) -> Extractor:
    """Any timm model; preprocessing from its ``pretrained_cfg`` (input size, mean, std, interpolation)."""
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except RuntimeError as e:
        raise ConfigError(f"timm model {name!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - hub/network errors: one readable message
        if "Unknown model" in str(e):
            hint = timm.list_models(f"*{name.split('.')[0]}*")[:8]
            raise ConfigError(f"unknown timm model {name!r}; similar: {hint}") from e
        raise ConfigError(
            f"cannot load weights for timm/{name}: {type(e).__name__}: {e}. Without network, pre-download with "
            f"`huggingface-cli download timm/{name}` (cache: ~/.cache/huggingface/hub) or pass checkpoint=") from e
    if checkpoint is not None:
        from .io import load_state_dict
        model.load_state_dict(load_state_dict(checkpoint))
    cfg = model.pretrained_cfg or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    layer = layer or "logits"
    return Extractor(model, spec=f"timm/{name}@{layer}", layer=layer, input_size=size,
                     mean=cfg.get("mean", (0.485, 0.456, 0.406)), std=cfg.get("std", (0.229, 0.224, 0.225)),
                     interpolation="bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
                     card={"pretrained_cfg": {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, tuple, list))}}
                     ).to(device)
