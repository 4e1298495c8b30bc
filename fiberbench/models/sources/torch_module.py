"""``torch/<python.module:callable>``: a user's own ``nn.Module`` as an extractor."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any, Sequence

from torch import nn

from ...errors import ConfigError, close_matches
from ...io import load_state_dict
from ..extractor import Extractor
from ..registry import ModelSource, Spec, register_source


@register_source
class TorchModuleSource(ModelSource):
    name = "torch"
    kinds = ("extractor",)

    def check(self, spec: Spec, kind: str) -> None:
        """The ``module:callable`` form, that the module can be found (its parent packages are imported, the
        module itself only by the loader), and the callable when the module is already imported."""
        super().check(spec, kind)
        mod_name, _, attr = spec.name.partition(":")
        if not mod_name or not attr:
            raise ConfigError(f"{str(spec)!r}: expected 'torch/<python.module>:<callable>', "
                              f"e.g. 'torch/mypkg.models:build'")
        try:
            found = importlib.util.find_spec(mod_name)
        except Exception as e:  # noqa: BLE001 - a parent package that is missing or fails to import
            raise ConfigError(f"torch/{spec.name}: cannot import module {mod_name!r} "
                              f"({type(e).__name__}: {str(e)[:200]}); is it on sys.path / installed?") from None
        if found is None:
            raise ConfigError(f"torch/{spec.name}: cannot import module {mod_name!r}: no such module; is it on "
                              f"sys.path / installed?")
        obj = sys.modules.get(mod_name)
        for part in attr.split(".") if obj is not None else ():
            if not hasattr(obj, part):
                public = [n for n in dir(sys.modules[mod_name]) if not n.startswith("_")]
                hint = close_matches(part, public)
                raise ConfigError(f"torch/{spec.name}: {mod_name!r} has no attribute {attr!r}"
                                  + (f"; did you mean {hint}?" if hint else f"; it defines {public[:12]}"))
            obj = getattr(obj, part)

    def load_extractor(self, spec: Spec, device: str, **kwargs: Any) -> Extractor:
        return load_torch_extractor(spec.name, spec.layer, device=device, **kwargs)



def load_torch_extractor(name: str, layer: str | None, device="cpu", *, input_size: int | None = None,
                         mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                         interpolation: str = "bilinear", resize: str = "squash", resize_size: int | None = None,
                         checkpoint: str | None = None, model_kwargs: dict[str, Any] | None = None,
                         classes: list[str] | None = None):
    """``torch/<python.module:callable>``: a user's own ``nn.Module`` as an Extractor.

    ``callable`` is an ``nn.Module`` instance, an ``nn.Module`` class or a factory
    function; classes and factories are called with ``model_kwargs``. ``checkpoint``
    (``.safetensors``, or a plain state dict read with ``weights_only=True``) is loaded
    strictly. The module sees ``(images - mean) / std`` after an optional resize to
    ``input_size`` (default: no resize, identity normalisation). ``layer``: ``logits``
    (the module's output, default), ``pre_logits`` (timm-style heads) or a module name.
    """
    spec = f"torch/{name}"
    if ":" not in name:
        raise ConfigError(f"{spec!r}: expected 'torch/<python.module>:<callable>', e.g. 'torch/mypkg.models:build'")
    mod_name, attr = name.split(":", 1)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"{spec}: cannot import module {mod_name!r} ({e}); is it on sys.path / installed?") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_")]
            hint = close_matches(part, public)
            raise ConfigError(f"{spec}: {mod_name!r} has no attribute {attr!r}"
                              + (f"; did you mean {hint}?" if hint else f"; it defines {public[:12]}"))
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        model = obj(**(model_kwargs or {}))
    else:
        raise ConfigError(f"{spec}: {attr!r} is a {type(obj).__name__}, not an nn.Module or a callable returning one")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec}: {attr}(...) returned a {type(model).__name__}, not an nn.Module")
    if checkpoint is not None:
        try:
            model.load_state_dict(load_state_dict(checkpoint))
        except RuntimeError as e:
            raise ConfigError(f"{spec}: checkpoint {checkpoint} does not fit the module: {str(e)[:500]}") from e
    layer = layer or "logits"
    return Extractor(model, spec=f"{spec}@{layer}", layer=layer, input_size=input_size, mean=mean, std=std,
                     interpolation=interpolation, resize=resize, resize_size=resize_size, classes=classes,
                     card={"module": mod_name, "callable": attr, "checkpoint": checkpoint}).to(device)
