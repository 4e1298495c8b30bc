"""Loading models from hubs: the real-model zoo adapters behind ``open_clip/``, ``hf/`` and ``torch/`` specs.

- ``open_clip/<arch>:<pretrained>``, ``open_clip/hf-hub:<repo>``, ``open_clip/local-dir:<folder>``
  (or a plain folder holding ``open_clip_config.json``): a :class:`~fiberbench.semantics.ClipModel`
  scorer or the image tower as an :class:`~fiberbench.extractors.Extractor`;
- ``hf/<repo or folder>``: a ``transformers`` vision model (DINOv2, ViT, ConvNeXt, CLIP/SigLIP image
  towers…) with the preprocessing of its own image-processor config, made differentiable;
- ``torch/<python.module:callable>``: a user's own ``nn.Module``.

Weights are read from the local Hugging Face cache or a folder; safetensors are
preferred, pickles only through ``torch.load(weights_only=True)``, and
``trust_remote_code`` is off unless the caller passes it. When weights are
missing (no network, not pre-downloaded) the error is one :class:`ConfigError`
naming the spec, the cache folder and the ``hf download`` command.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import ConfigError, close_matches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- hub errors

def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The Hugging Face hub cache folder in use (``cache_dir`` if given, else ``$HF_HUB_CACHE``)."""
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


_HUB_ERROR_NAMES = ("LocalEntryNotFoundError", "EntryNotFoundError", "RepositoryNotFoundError",
                    "RevisionNotFoundError", "OfflineModeIsEnabled", "HfHubHTTPError", "GatedRepoError",
                    "ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "Timeout")
_HUB_ERROR_WORDS = ("local cache", "cached", "couldn't connect", "could not connect", "offline",
                    "failed to download", "does not appear to have", "not found on the hub", "connection",
                    "no such file", "not a local folder", "is not a valid model identifier", "snapshot")


def is_missing_weights(err: BaseException) -> bool:
    """True when ``err`` (or an exception it was raised from) says the weights are not available locally."""
    seen = 0
    e: BaseException | None = err
    while e is not None and seen < 8:
        if type(e).__name__ in _HUB_ERROR_NAMES or any(type(c).__name__ in _HUB_ERROR_NAMES for c in type(e).__mro__):
            return True
        msg = str(e).lower()
        if isinstance(e, (OSError, RuntimeError, ValueError)) and any(w in msg for w in _HUB_ERROR_WORDS):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def weights_unavailable(spec: str, repo: str, err: BaseException, cache_dir=None) -> ConfigError:
    """One readable error for weights that are neither in a folder nor in the local hub cache."""
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    return ConfigError(
        f"cannot load {spec}: the weights of {repo!r} are not in the local Hugging Face cache "
        f"({hub_cache_dir(cache_dir)}){' and HF_HUB_OFFLINE is set' if offline else ' and the hub is unreachable'}. "
        f"Pre-download them on a machine with network: `hf download {repo}` (huggingface_hub < 1.0: "
        f"`huggingface-cli download {repo}`), copy the cache folder here (or set HF_HUB_CACHE / pass cache_dir=), "
        f"or pass a local folder instead of the hub id. [{type(err).__name__}: {first}]")


# --------------------------------------------------------------------------- open_clip

def _open_clip_name(name: str, pretrained: str | None) -> tuple[str, str | None, str]:
    """``(model_name for open_clip, pretrained tag or file, hub repo for error messages)``."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return name, pretrained, name.split(":", 1)[1]
    if Path(name).is_dir():
        return f"local-dir:{name}", pretrained, name
    if ":" in name:
        arch, tag = name.split(":", 1)
        return arch, pretrained or tag, f"{arch} ({tag})"
    return name, pretrained, name


def _open_clip_parts(name: str, device="cpu", pretrained: str | None = None, cache_dir=None, **kwargs):
    """``(model, tokenizer, preprocess_cfg, spec)`` for ``<arch>:<pretrained>``, ``hf-hub:<repo>`` or a folder."""
    import open_clip

    arch, tag, repo = _open_clip_name(name, pretrained)
    spec = f"open_clip/{name}"
    if arch.startswith("local-dir:") and not (Path(arch.split(":", 1)[1]) / "open_clip_config.json").exists():
        raise ConfigError(f"{spec}: folder {arch.split(':', 1)[1]} has no open_clip_config.json")
    if not arch.startswith(("hf-hub:", "local-dir:")) and arch not in open_clip.list_models():
        hint = close_matches(arch, open_clip.list_models())
        raise ConfigError(f"unknown open_clip architecture {arch!r} in {spec!r}; similar: {hint} "
                          f"(see open_clip.list_pretrained())")
    try:
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=tag, device=device,
                                                            cache_dir=cache_dir, **kwargs)
        tokenizer = open_clip.get_tokenizer(arch, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - hub/network errors: one readable message
        if is_missing_weights(e) and not arch.startswith("local-dir:"):
            hub_repo = repo
            if tag and not arch.startswith(("hf-hub:", "local-dir:")):
                cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
                hub_repo = cfg.get("hf_hub", "").rstrip("/") or repo
            raise weights_unavailable(spec, hub_repo, e, cache_dir) from None
        raise ConfigError(f"cannot load {spec}: {type(e).__name__}: {e}") from e
    pcfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = pcfg.get("size", model.visual.image_size)
    cfg = {"size": size if isinstance(size, int) else int(size[-1]),
           "mean": list(pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
           "std": list(pcfg.get("std", open_clip.OPENAI_DATASET_STD)),
           "interpolation": pcfg.get("interpolation", "bicubic"),
           "resize_mode": pcfg.get("resize_mode", "shortest")}
    return model, tokenizer, cfg, spec


def load_open_clip(name: str, device="cpu", **kwargs):
    """Any open_clip model as a CLIP scorer.

    ``name``: ``ViT-B-32:laion2b_s34b_b79k``, ``hf-hub:<repo>`` (e.g. BiomedCLIP),
    ``local-dir:<folder>`` / a folder, or ``<arch>`` with ``pretrained=<tag or file>``.
    Extra kwargs go to ``open_clip.create_model_and_transforms`` (``cache_dir``, ``precision``…).
    Returns a :class:`~fiberbench.semantics.ClipModel` whose ``preprocess_cfg`` records
    size, mean, std, interpolation and resize mode.
    """
    model, tok, cfg, spec = _open_clip_parts(name, device=device, **kwargs)
    from .semantics import ClipModel

    return ClipModel(model, tok, spec=spec, preprocess_cfg=cfg).to(device)


def _encode_image(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.encode_image(x)


def load_open_clip_extractor(name: str, layer: str | None, device="cpu", **kwargs):
    """The image tower of an open_clip model as an Extractor.

    ``layer``: ``embed`` (default; the image embedding, *not* unit-normalised) or a
    module name such as ``visual.transformer.resblocks.3`` (captured with a forward
    hook while ``encode_image`` runs). Preprocessing: the model's own (short-side
    resize + centre crop or squash, bicubic, its mean/std), inside the graph.
    """
    from .extractors import Extractor

    model, _, cfg, spec = _open_clip_parts(name, device=device, **kwargs)
    layer = layer or "embed"
    if layer == "logits":
        layer = "embed"
    resize = "squash" if cfg["resize_mode"] == "squash" else "shortest"
    return Extractor(model, spec=f"{spec}@{layer}", layer=layer, input_size=cfg["size"], mean=cfg["mean"],
                     std=cfg["std"], interpolation=cfg["interpolation"], resize=resize, resize_size=cfg["size"],
                     runner=_encode_image, card={"preprocess_cfg": cfg}).to(device)


# --------------------------------------------------------------------------- Hugging Face transformers

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
    import transformers

    from .extractors import Extractor

    spec = f"hf/{name}"
    common = dict(cache_dir=cache_dir, revision=revision, trust_remote_code=trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(name, **common)
    except Exception as e:  # noqa: BLE001
        if is_missing_weights(e) and not Path(name).exists():
            raise weights_unavailable(spec, name, e, cache_dir) from None
        raise ConfigError(f"cannot read the transformers config of {spec}: {type(e).__name__}: {e}") from e
    archs = list(getattr(config, "architectures", None) or [])
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


# --------------------------------------------------------------------------- a user's own torch module

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
    from .extractors import Extractor
    from .io import load_state_dict

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
