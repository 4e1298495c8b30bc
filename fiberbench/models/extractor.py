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

from ..errors import ConfigError, InputError, close_matches


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
        resize: ``"squash"`` (resize both sides) or ``"shortest"`` (short side, aspect kept).
        resize_size: side to resize to before a centre crop to ``input_size`` (``None``: no crop,
            squash straight to ``input_size``).
        runner: optional ``fn(model, x)`` that runs the network for ``logits``/``embed`` and for
            module hooks (e.g. ``m.encode_image(x)`` for CLIP); default ``model(x)``.
    """

    def __init__(self, model: nn.Module, *, spec: str, layer: str = "logits", input_size: int | None = None,
                 mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                 interpolation: str = "bilinear",
                 forward_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                 card: dict[str, Any] | None = None, classes: list[str] | None = None, resize: str = "squash",
                 resize_size: int | None = None, runner: Callable[[nn.Module, torch.Tensor], Any] | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.spec, self.layer, self.input_size, self.interpolation = spec, layer, input_size, interpolation
        if resize not in ("squash", "shortest"):
            raise ConfigError(f"{spec}: resize must be 'squash' or 'shortest', got {resize!r}")
        # resize="squash" + resize_size=None is the plain square resize; otherwise resize (the short
        # side to resize_size for "shortest", both sides for "squash") then centre-crop input_size,
        # as timm / open_clip / transformers eval transforms do.
        self.resize, self.resize_size = resize, resize_size
        self.runner = runner
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
        if self.input_size is not None and (self.resize != "squash" or self.resize_size is not None):
            return (self._resize_crop(x) - self.mean) / self.std
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=self.interpolation,
                              align_corners=False, antialias=self.interpolation in ("bilinear", "bicubic")
                              and x.shape[-1] > self.input_size)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[N, D]`` of images ``[N,3,H,W]`` in [0,1]."""
        x = self.preprocess(images)
        run = self.runner or (lambda m, inp: m(inp))
        if self.forward_fn is not None:
            out = self.forward_fn(self.model, x)
        elif self.layer in ("logits", "embed"):
            out = run(self.model, x)
        elif self.layer == "pre_logits":
            out = self.pre_logits(x, preprocessed=True)
        else:
            self._hooked = None
            run(self.model, x)
            out, self._hooked = self._hooked, None
            if out is None:
                raise ConfigError(f"{self.spec}: module {self.layer!r} was not run by the forward pass "
                                  f"(e.g. a text-tower module of a CLIP image extractor)")
        return out.flatten(1).float()

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """Resize (short side or both sides) to ``resize_size``, then centre-crop ``input_size`` (torchvision's
        rounding)."""
        size = self.input_size
        rs = self.resize_size or size
        h, w = x.shape[-2:]
        if self.resize == "shortest":
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(rs * long / short)
            nh, nw = (rs, new_long) if h <= w else (new_long, rs)
        else:
            nh, nw = rs, rs
        if (nh, nw) != (h, w):
            mode = self.interpolation if self.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
            x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=None if mode == "nearest" else False,
                              antialias=mode != "nearest")
        if (nh, nw) != (size, size):
            if nh < size or nw < size:  # as torchvision's CenterCrop: pad with zeros
                ph, pw = max(size - nh, 0), max(size - nw, 0)
                x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
                nh, nw = x.shape[-2:]
            top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
            x = x[..., top:top + size, left:left + size]
        return x

    def pre_logits(self, images: torch.Tensor, preprocessed: bool = False) -> torch.Tensor:
        """Input of the classifier head ``[N, D]`` (timm models)."""
        x = images if preprocessed else self.preprocess(images)
        m = self.model
        if not hasattr(m, "forward_head"):
            raise ConfigError(f"{self.spec} has no classifier head; use @logits or a module name")
        return m.forward_head(m.forward_features(x), pre_logits=True).flatten(1)

    def classifier(self) -> nn.Linear:
        """The final linear layer as an ``nn.Linear`` (for SING), ``weight [C, D]`` acting on :meth:`pre_logits`.

        Found for timm models whose ``get_classifier()`` is an ``nn.Linear`` (ResNets, ViTs, a linear probe
        installed with :meth:`set_linear_head`) or a 1x1 ``nn.Conv2d`` (BiT / ``resnetv2_*`` heads, applied to
        pooled ``[N,D,1,1]`` features: the same map, returned as an equivalent ``nn.Linear`` sharing its weights).
        ``ConfigError`` for a model without a head (DINO ViTs: install a probe) or with a non-linear one.
        """
        m = self.model
        head = m.get_classifier() if hasattr(m, "get_classifier") else None
        if isinstance(head, nn.Linear):
            return head
        if isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1) and head.stride == (1, 1) \
                and head.padding in ((0, 0), "valid") and head.groups == 1:
            lin = nn.Linear(head.in_channels, head.out_channels, bias=head.bias is not None,
                            device=head.weight.device, dtype=head.weight.dtype)
            lin.weight = nn.Parameter(head.weight.detach().flatten(1), requires_grad=False)
            if head.bias is not None:
                lin.bias = nn.Parameter(head.bias.detach(), requires_grad=False)
            return lin.eval()
        if head is None or isinstance(head, nn.Identity):
            raise ConfigError(f"{self.spec} has no classifier head (a self-supervised backbone such as a DINO ViT): "
                              f"install a linear probe, e.g. load it with linear_probe=<file with weight [C,D] and "
                              f"bias [C]> (fiberbench.nullspace.fit_linear_probe fits one)")
        raise ConfigError(f"{self.spec}: the classifier head is not a single linear layer ({type(head).__name__})")

    def set_linear_head(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Extractor":
        """Install a linear probe ``logits = weight @ pre_logits + bias`` as the model's head (timm models).

        Args:
            weight: ``[C, D]`` with ``D`` the width of :meth:`pre_logits`; bias: ``[C]`` (default zeros).

        The head replaces the model's own (``reset_classifier(C)``), frozen and on the model's device, so
        ``@logits`` returns the probe's logits and :meth:`classifier` finds it. Returns ``self``.
        """
        m = self.model
        if not hasattr(m, "reset_classifier") or not hasattr(m, "num_features"):
            raise ConfigError(f"{self.spec}: only timm models (reset_classifier) take a linear probe")
        weight = torch.as_tensor(weight).detach()
        c = weight.shape[0] if weight.ndim == 2 else 0
        bias = torch.zeros(c) if bias is None else torch.as_tensor(bias).detach()
        d = int(getattr(m, "head_hidden_size", None) or m.num_features)
        if weight.ndim != 2 or weight.shape[1] != d or bias.shape != (c,) or c == 0:
            raise ConfigError(f"{self.spec}: a linear probe needs weight [C,{d}] and bias [C]; got "
                              f"{tuple(weight.shape)} and {tuple(bias.shape)}")
        m.reset_classifier(c)
        head = m.get_classifier()
        if not isinstance(head, nn.Linear) or head.in_features != d:
            raise ConfigError(f"{self.spec}: reset_classifier({c}) gave {type(head).__name__}, not a Linear on {d}")
        ref = next(m.parameters())
        with torch.no_grad():
            head.weight.copy_(weight.to(ref.device, ref.dtype))
            head.bias.copy_(bias.to(ref.device, ref.dtype))
        head.requires_grad_(False).eval()
        return self

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, layer={self.layer!r}, input_size={self.input_size}"
