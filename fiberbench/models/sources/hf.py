"""``hf/<repo or folder>``: a ``transformers`` vision model as an extractor.

DINOv2, ViT, ConvNeXt, CLIP/SigLIP image towers…, with the preprocessing of their own image-processor
config made differentiable; Qwen2-VL / Qwen2.5-VL repos give their vision tower, whose patch inputs are made
in torch (:mod:`fiberbench.models.qwen_vl`). ``transformers`` is an optional dependency
(``pip install fiberbench[hf]``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from ...errors import ConfigError
from ..extractor import Extractor
from ..hubcache import (
    HUB_WEIGHT_FILES,
    cached_hub_file,
    is_missing_weights,
    local_or_cached_checksum,
    weights_unavailable,
)
from ..qwen_vl import QWEN_LAYERS, QWEN_VL_TYPES, QwenVisionBody, processor_settings, vision_tower
from ..registry import (
    ModelSource,
    Spec,
    check_layer,
    hub_offline,
    looks_like_path,
    meta_module_names,
    not_downloaded,
    register_source,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@register_source
class HfSource(ModelSource):
    name = "hf"
    kinds = ("extractor",)

    def check(self, spec: Spec, kind: str) -> None:
        """A folder must exist and hold ``config.json``; anything else must be a valid hub repo id; a module-name
        ``@layer`` is checked against the model built from a local (or cached) config on the meta device."""
        super().check(spec, kind)
        if looks_like_path(spec.name):
            folder = Path(spec.name).expanduser()
            if not (folder / "config.json").is_file():
                raise ConfigError(f"'hf/{spec.name}': " + (f"no config.json in folder {folder}; a transformers "
                                  f"save_pretrained folder holds one" if folder.is_dir() else f"no folder {folder}"))
        else:
            try:
                validate_repo_id(spec.name)
            except HFValidationError as e:
                raise ConfigError(f"'hf/{spec.name}' is neither a folder nor a hub repo id ('<owner>/<name>'): "
                                  f"{str(e).splitlines()[0][:200]}") from None
        if spec.layer and spec.layer not in HF_LAYERS:
            names = hf_module_names(spec.name)
            if names is not None:
                check_layer(f"hf/{spec.name}", spec.layer, names, builtin=HF_LAYERS)

    def check_available(self, spec: Spec, kind: str) -> None:
        """Offline, a hub id's ``config.json`` must be in the local hub cache."""
        if hub_offline() and not looks_like_path(spec.name) and cached_hub_file(spec.name, ("config.json",)) is None:
            raise not_downloaded(f"hf/{spec.name}", spec.name, what="config and weights")

    def load_extractor(self, spec: Spec, device: str, **kwargs: Any) -> Extractor:
        return load_hf_extractor(spec.name, spec.layer, device=device, **kwargs)

    def checksum(self, spec: Spec) -> str | None:
        return local_or_cached_checksum(spec.name, HUB_WEIGHT_FILES)


def hf_module_names(name: str) -> tuple[str, ...] | None:
    """Module names of ``AutoModel`` for a folder's or a cached hub repo's config, built on the meta device;
    ``None`` when the config is not here, needs remote code, or is a Qwen-VL repo (its tower's layers are
    checked by the loader)."""
    local = Path(name).expanduser()
    config_file = local / "config.json" if local.is_dir() else cached_hub_file(name, ("config.json",))
    if config_file is None or not Path(config_file).is_file():
        return None
    import transformers  # noqa: PLC0415 - optional dependency (the [hf] extra), needed only for hf/ layer checks

    try:
        config = transformers.AutoConfig.from_pretrained(str(Path(config_file).parent), local_files_only=True)
        if getattr(config, "model_type", None) in QWEN_VL_TYPES:
            return None
        stamp = Path(config_file).stat().st_mtime_ns
        return meta_module_names(("hf", str(config_file), stamp), lambda: transformers.AutoModel.from_config(config))
    except Exception:  # noqa: BLE001 - remote code, an unknown model type …: the loader says what is wrong
        return None



_PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}


def hf_preprocess_cfg(processor) -> dict[str, Any]:
    """A transformers image processor -> ``{input_size, resize, resize_size, mean, std, interpolation}``.

    Handles ``size={"shortest_edge": s}`` (+ centre crop ``crop_size``, or ConvNeXt's
    ``crop_pct``) and ``size={"height": h, "width": w}`` (squash, + optional crop).
    """
    def as_dict(d):
        if d is None or isinstance(d, int):
            return d
        if hasattr(d, "keys"):
            d = {k: d[k] for k in d.keys()}
        else:  # transformers 5 SizeDict (a dataclass)
            d = {k: getattr(d, k) for k in ("shortest_edge", "height", "width", "longest_edge") if hasattr(d, k)}
        return {k: v for k, v in d.items() if v is not None}

    def side(d, what):
        if d is None:
            return None
        if isinstance(d, int):
            return d
        if "shortest_edge" in d:
            return int(d["shortest_edge"])
        h, w = d.get("height"), d.get("width")
        if h is None or h != w:
            raise ConfigError(f"image processor {what} {d} is not a square size; fiberbench extractors use "
                              f"square inputs (pass input_size= to override)")
        return int(h)

    size_d = as_dict(getattr(processor, "size", None))
    crop = as_dict(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    s = side(size_d, "size")
    c = side(crop, "crop_size")
    shortest = isinstance(size_d, dict) and "shortest_edge" in size_d
    resample = getattr(processor, "resample", 2)
    interp = _PIL_RESAMPLE.get(int(resample), "bilinear") if resample is not None else "bilinear"
    crop_pct = getattr(processor, "crop_pct", None)
    if shortest and crop_pct and c is None and s < 384:  # ConvNeXt: resize to s / crop_pct, crop s
        out = dict(input_size=s, resize="shortest", resize_size=int(s / crop_pct))
    elif c is not None:
        out = dict(input_size=c, resize="shortest" if shortest else "squash", resize_size=s)
    elif shortest:
        out = dict(input_size=s, resize="shortest", resize_size=s)
    else:
        out = dict(input_size=s, resize="squash", resize_size=None)
    norm = getattr(processor, "do_normalize", True)
    out["mean"] = list(getattr(processor, "image_mean", None) or IMAGENET_MEAN) if norm else [0.0] * 3
    out["std"] = list(getattr(processor, "image_std", None) or IMAGENET_STD) if norm else [1.0] * 3
    out["interpolation"] = interp
    return out


def _hf_output(layer: str, spec: str):
    """forward_fn for the named output of a transformers model."""
    def pick(out):
        if isinstance(out, torch.Tensor):
            return out
        if layer == "logits":
            return out.logits
        if layer == "pooled":
            p = getattr(out, "pooler_output", None)
            if p is None:
                raise ConfigError(f"{spec}: this model has no pooler output; use @cls, @mean or @last")
            return p
        h = out.last_hidden_state
        if layer == "cls":
            return h[:, 0] if h.ndim == 3 else h.mean(dim=(-2, -1))
        if layer == "mean":
            return h[:, 1:].mean(1) if h.ndim == 3 else h.mean(dim=(-2, -1))
        return h  # "last"

    def fwd(m, x):
        if layer == "embed":
            out = m.get_image_features(pixel_values=x)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        return pick(m(pixel_values=x))
    return fwd


HF_LAYERS = ("pooled", "cls", "mean", "last", "logits", "embed")


def load_hf_extractor(name: str, layer: str | None, device="cpu", *, cache_dir=None, revision: str | None = None,
                      trust_remote_code: bool = False, input_size: int | None = None,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **model_kwargs):
    """A ``transformers`` vision model (hub id in the local cache, or a ``save_pretrained`` folder) as an Extractor.

    ``layer``: ``pooled`` (``pooler_output``; DINOv2: the layer-normed CLS token), ``cls``
    (``last_hidden_state[:, 0]``), ``mean`` (mean of the patch tokens), ``last`` (all tokens,
    flattened), ``logits`` (``*ForImageClassification``), ``embed`` (``get_image_features`` of
    CLIP/SigLIP-style models) or any module name (forward hook). Default: ``logits`` for
    classifiers, ``embed`` for CLIP-style models, else ``pooled`` (or ``cls`` without a pooler).
    Preprocessing comes from the folder's ``preprocessor_config.json`` (resize, centre crop,
    mean, std, resample), done differentiably on [0,1] images of any size.
    """
    import transformers  # noqa: PLC0415 - optional dependency (the [hf] extra), needed only for hf/ specs

    spec = f"hf/{name}"
    common = dict(cache_dir=cache_dir, revision=revision, trust_remote_code=trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(name, **common)
    except Exception as e:  # noqa: BLE001
        if is_missing_weights(e) and not Path(name).exists():
            raise weights_unavailable(spec, name, e, cache_dir) from None
        raise ConfigError(f"cannot read the transformers config of {spec}: {type(e).__name__}: {e}") from e
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "model_type", None) in QWEN_VL_TYPES:
        return load_qwen_vl_extractor(name, layer, config, device=device, common=common, **model_kwargs)
    is_classifier = any(a.endswith("ForImageClassification") for a in archs)
    try:
        if layer == "logits" or (layer is None and is_classifier):
            if not is_classifier:
                raise ConfigError(f"{spec} is not an image classifier (architectures {archs}); "
                                  f"use one of {HF_LAYERS[:4]} or a module name")
            model = transformers.AutoModelForImageClassification.from_pretrained(name, use_safetensors=None,
                                                                                 **common, **model_kwargs)
        else:
            model = transformers.AutoModel.from_pretrained(name, use_safetensors=None, **common, **model_kwargs)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        if is_missing_weights(e) and not Path(name).exists():
            raise weights_unavailable(spec, name, e, cache_dir) from None
        raise ConfigError(f"cannot load {spec}: {type(e).__name__}: {e}") from e
    has_image_features = hasattr(model, "get_image_features")
    if layer is None:
        layer = "logits" if is_classifier else "embed" if has_image_features else "pooled"
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name, **common)
        pcfg = hf_preprocess_cfg(processor)
        source = type(processor).__name__
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - no preprocessor_config.json: the config's image size, ImageNet stats
        vis = getattr(config, "vision_config", config)
        pcfg = dict(input_size=int(getattr(vis, "image_size", 224)), resize="squash", resize_size=None,
                    mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), interpolation="bicubic")
        source = "default (no preprocessor_config.json)"
    if input_size is not None:
        pcfg.update(input_size=int(input_size), resize="squash", resize_size=None)
    if mean is not None:
        pcfg["mean"] = list(mean)
    if std is not None:
        pcfg["std"] = list(std)
    named = layer in HF_LAYERS
    runner = (lambda m, x: m.get_image_features(pixel_values=x)) if has_image_features else \
        (lambda m, x: m(pixel_values=x))
    classes = None
    id2label = getattr(model.config, "id2label", None)
    if is_classifier and id2label:
        classes = [id2label[i] for i in sorted(id2label)]
    if layer == "pooled" and not _has_pooler(model, pcfg["input_size"]):
        layer = "cls"
    ex = Extractor(model, spec=f"{spec}@{layer}", layer=layer, input_size=pcfg["input_size"],
                   mean=pcfg["mean"], std=pcfg["std"], interpolation=pcfg["interpolation"], resize=pcfg["resize"],
                   resize_size=pcfg["resize_size"], forward_fn=_hf_output(layer, spec) if named else None,
                   runner=runner, classes=classes,
                   card={"architectures": archs, "preprocessing": {**pcfg, "source": source}})
    return ex.to(device)


def _has_pooler(model: nn.Module, size: int) -> bool:
    """Whether a transformers vision model returns a ``pooler_output`` (one tiny forward pass to find out)."""
    p = next(model.parameters())
    with torch.no_grad():
        out = model(pixel_values=torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    return getattr(out, "pooler_output", None) is not None


def load_qwen_vl_extractor(name: str, layer: str | None, config, *, device: str = "cpu", common: dict[str, Any],
                           **model_kwargs) -> Extractor:
    """The vision tower of a Qwen2-VL / Qwen2.5-VL repo or folder as an Extractor (layers: :data:`QWEN_LAYERS`).

    Images ``[N,3,H,W]`` in [0,1] are normalised with the processor's mean/std, resized to its smart size
    (multiples of 28 px, aspect kept), patched as its processor does and run through ``visual(patches,
    grid_thw=...)`` (:class:`~fiberbench.models.qwen_vl.QwenVisionBody`). The whole model is loaded (its class
    from ``architectures``) and all but the tower dropped; ``model_kwargs`` go to ``from_pretrained`` (e.g.
    ``dtype=``).
    """
    import transformers  # noqa: PLC0415 - optional dependency (the [hf] extra), needed only for hf/ specs

    spec = f"hf/{name}"
    layer = layer or "mean"
    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    try:
        model = (cls or transformers.AutoModel).from_pretrained(name, use_safetensors=None, **common, **model_kwargs)
        processor = transformers.AutoImageProcessor.from_pretrained(name, **common)
    except Exception as e:  # noqa: BLE001
        if is_missing_weights(e) and not Path(name).exists():
            raise weights_unavailable(spec, name, e, common.get("cache_dir")) from None
        raise ConfigError(f"cannot load {spec}: {type(e).__name__}: {e}") from e
    tower = vision_tower(model)
    del model  # the language model is never run
    pcfg = processor_settings(processor, getattr(config, "vision_config", None))
    body = QwenVisionBody(tower, patch=pcfg["patch"], merge=pcfg["merge"], temporal=pcfg["temporal"],
                          min_pixels=pcfg["min_pixels"], max_pixels=pcfg["max_pixels"])
    body.hooked_module(layer)  # an unknown layer fails here, before any image
    ex = Extractor(body, spec=f"{spec}@{layer}", layer=layer, input_size=None, mean=pcfg["mean"], std=pcfg["std"],
                   forward_fn=lambda m, x: m(x, layer),
                   card={"architectures": archs, "vision_tower": type(tower).__name__, "layers": list(QWEN_LAYERS),
                         "preprocessing": {**pcfg, "resize": "smart (processor)", "interpolation": "bicubic",
                                           "source": type(processor).__name__}})
    return ex.to(device)
