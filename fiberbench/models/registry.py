"""Spec strings -> models. One registry for extractors, priors and CLIP scorers.

Spec grammar: ``<source>/<name>[@<layer>]``

==================== ==================================================== ======================
source               name                                                 gives
==================== ==================================================== ======================
``toy``              a shipped toy model (``shape-resnet``, …)             any kind
``timm``             any timm model name (``resnet50.a1_in1k``)            Extractor
``open_clip``        ``<arch>:<pretrained>`` or ``hf-hub:<repo>``          Extractor / ClipModel
``hf``               a transformers vision model repo or folder           Extractor
``torch``            ``<python.module:callable>`` returning nn.Module      Extractor
``diffusers``        a pipeline folder or hub id                          Prior
``mix``              ``<w>*<spec>+<w>*<spec>`` (weighted mixture)          Extractor
``guided-diffusion`` a published ADM checkpoint name                      Prior
                     (``256x256_diffusion_uncond``, ``256x256_diffusion``,
                     … read from ``$FIBERBENCH_GUIDED_DIFFUSION`` or
                     ``~/.cache/fiberbench/guided-diffusion``), or a file
                     ``<path>.pt[?<published name>&<flag>=<value>&…]``
==================== ==================================================== ======================

``hf/`` also takes Qwen2-VL / Qwen2.5-VL repos or folders: their vision tower (``@mean`` of the merged
patch tokens by default; see :mod:`fiberbench.models.qwen_vl`).

``@layer`` (extractors only): ``logits``, ``pre_logits`` or a module name.

Each source is one module in :mod:`fiberbench.models.sources` holding a :class:`ModelSource` subclass
decorated with :func:`register_source`; the loaders here dispatch through :data:`SOURCES` and never ask
which source they hold. A new source is one new file plus its import line in ``sources/__init__.py``.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import torch
from torch import nn

from ..checks import show
from ..errors import ConfigError, close_matches
from .hubcache import hub_cache_dir

KINDS = ("extractor", "prior", "clip", "oracle", "conditional")

# Known-good real specs (weights from the local Hugging Face cache; pre-download with `hf download <repo>`).
# "size" counts the parameters of what fiberbench runs (prior: denoiser + VAE; text encoders run once at load).
REAL_MODELS: list[dict[str, str]] = [
    {"spec": "timm/resnet50.a1_in1k", "kind": "extractor", "size": "25.6 M",
     "for": "ImageNet classifier (SING Table 1 ResNet50); 224 px, crop 0.95"},
    {"spec": "timm/efficientnet_b0.ra_in1k", "kind": "extractor", "size": "5.3 M",
     "for": "ImageNet classifier (SING: EfficientNet), small and fast; 224 px"},
    {"spec": "timm/resnext101_32x8d.tv_in1k", "kind": "extractor", "size": "88.8 M",
     "for": "ImageNet classifier (SING Table 1 ResNeXt101); 224 px"},
    {"spec": "timm/vit_small_patch16_224.dino", "kind": "extractor", "size": "21.7 M",
     "for": "self-supervised DINO ViT-S/16 (SING: DINO-ViT); no head, @logits is the 384-d embedding"},
    {"spec": "timm/vit_small_patch14_dinov2.lvd142m", "kind": "extractor", "size": "22.1 M",
     "for": "self-supervised DINOv2 ViT-S/14; note: 518 px input (slow on CPU)"},
    {"spec": "hf/facebook/dinov2-small", "kind": "extractor", "size": "22.1 M",
     "for": "DINOv2 ViT-S/14 via transformers; @pooled = CLS token, 224 px crop"},
    {"spec": "hf/Qwen/Qwen2-VL-2B-Instruct", "kind": "extractor", "size": "675 M (vision tower; 2.2 B at load)",
     "for": "Qwen2-VL's vision tower (the fiber paper's situs-inversus audit); @mean of the merged patch tokens"},
    {"spec": "open_clip/ViT-B-32:laion2b_s34b_b79k", "kind": "clip", "size": "151 M (image 88 M)",
     "for": "CLIP scorer for natural images; also an image-tower extractor"},
    {"spec": "open_clip/hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "kind": "clip",
     "size": "196 M (image 86 M)", "for": "medical CLIP scorer (X-ray, CT, pathology); PubMedBERT text tower"},
    {"spec": "diffusers/google/ddpm-cifar10-32", "kind": "prior", "size": "35.7 M",
     "for": "pixel DDPM, 32x32 natural images (CIFAR-10); CPU-friendly"},
    {"spec": "diffusers/google/ddpm-ema-church-256", "kind": "prior", "size": "114 M",
     "for": "pixel DDPM, 256x256 churches (LSUN)"},
    {"spec": "diffusers/CompVis/ldm-celebahq-256", "kind": "prior", "size": "274 M + VQ-VAE 55 M",
     "for": "latent DDPM on a VQ-f4 autoencoder, 256x256 faces"},
    {"spec": "diffusers/facebook/DiT-XL-2-256", "kind": "prior", "size": "675 M + VAE 84 M",
     "for": "class-conditional ImageNet 256 latent DiT (class_label=, default unconditional)"},
    {"spec": "diffusers/stabilityai/stable-diffusion-2-1-base", "kind": "prior", "size": "866 M + VAE 84 M",
     "for": "latent SD 2.1, 512 px, empty prompt (prompt= optional); text encoder 340 M at load"},
    {"spec": "guided-diffusion/256x256_diffusion_uncond", "kind": "prior", "size": "552.8 M",
     "for": "OpenAI ADM, unconditional ImageNet 256 (the fiber paper's ImageNet prior); learned variance, "
            "ancestral steps; a .pt file, not on the hub (see guided-diffusion/ in the table above)"},
    {"spec": "guided-diffusion/256x256_diffusion", "kind": "prior", "size": "553.8 M",
     "for": "OpenAI ADM, class-conditional ImageNet 256 (class_label= required)"},
    {"spec": "diffusers/stabilityai/stable-diffusion-3-medium-diffusers", "kind": "prior", "size": "2.0 B + VAE 84 M",
     "for": "flow-matching MMDiT (SD3), 1024 px; gated licence; drop_t5=True skips the 4.7 B T5 encoder"},
]


@dataclass(frozen=True)
class Spec:
    source: str
    name: str
    layer: str | None = None

    def __str__(self) -> str:
        return f"{self.source}/{self.name}" + (f"@{self.layer}" if self.layer else "")


class ModelSource:
    """One place models come from (a hub library, the toy folder, a user's module).

    Subclasses set ``name`` and ``kinds`` and implement the loaders of those kinds; the registry calls
    them with the parsed :class:`Spec`. ``check`` rejects a spec cheaply, before anything is loaded;
    ``checksum`` names the weights behind a spec for the results store.
    """

    name: str = ""
    kinds: tuple[str, ...] = ()
    split_layer: bool = True  # a trailing '@layer' names the layer (a mixture's parts carry their own)

    def load_extractor(self, spec: Spec, device: str, **kwargs: Any) -> nn.Module:
        raise NotImplementedError

    def load_prior(self, spec: Spec, device: str, **kwargs: Any) -> nn.Module:
        raise NotImplementedError

    def load_clip(self, spec: Spec, device: str, **kwargs: Any) -> nn.Module:
        raise NotImplementedError

    def check(self, spec: Spec, kind: str) -> None:
        """Raise ``ConfigError`` if ``spec`` cannot name a model of ``kind`` (no model is loaded).

        Local facts only, so a load with other arguments (``cache_dir=``, ``pretrained=False``) is never
        refused: names, layer names (against module names built on the meta device), local paths, modules.
        """
        if kind not in self.kinds:
            raise ConfigError(wrong_kind(spec, kind, self.kinds))

    def check_available(self, spec: Spec, kind: str) -> None:
        """Raise ``ConfigError`` if loading ``spec`` as given (no extra arguments) cannot find what it needs
        offline: hub weights or configs neither in a local folder nor in the local hub cache while the hub
        is offline (``HF_HUB_OFFLINE``). Online, a missing file is downloaded at load, so nothing is refused."""

    def checksum(self, spec: Spec) -> str | None:
        """``"sha256:<hex>"`` of the weights behind ``spec``, or ``None`` where they cannot be found."""
        return None

    def specs(self) -> list[tuple[str, str]]:
        """``(spec, kind)`` of every model this source lists by itself (the toy folder); hub sources list none."""
        return []

    def canonical(self, spec: Spec, kind: str) -> str:
        """The spec string a loaded model of ``kind`` reports (e.g. with its default ``@layer``)."""
        return str(spec)

    def defaults(self, spec: Spec) -> dict[str, Any]:
        """A prior's recommended sampling settings, read without loading it: ``{"preset": name}`` for guided
        methods and ``{"sampling": {...}}`` for its own (unguided) sampler; loaded priors carry the same in
        their ``card``."""
        return {}


SOURCES: dict[str, ModelSource] = {}


def register_source(cls: type[ModelSource]) -> type[ModelSource]:
    """Class decorator: add one instance of ``cls`` to :data:`SOURCES` under ``cls.name``."""
    if not cls.name or cls.name in SOURCES:
        raise ValueError(f"model source name {cls.name!r} is empty or taken")
    SOURCES[cls.name] = cls()
    return cls


KIND_WORDS = {"extractor": "feature extractor", "prior": "prior", "clip": "CLIP model", "oracle": "oracle",
              "conditional": "feature-conditioned generator"}
KIND_EXAMPLES = {"extractor": "toy/shape-resnet@logits", "prior": "toy/prior-fm", "clip": "toy/clip",
                 "oracle": "toy/oracle", "conditional": "toy/cond-fm-shape-resnet"}


def wrong_kind(spec: Spec, kind: str, kinds: tuple[str, ...]) -> str:
    """The message for a spec whose source gives no model of ``kind``."""
    givers = ", ".join(name for name, src in SOURCES.items() if kind in src.kinds)
    return (f"{str(spec)!r} names a {spec.source} model, which is not a {KIND_WORDS[kind]} "
            f"({kind}s come from {givers}; e.g. {KIND_EXAMPLES[kind]!r})")


def parse_spec(spec: str) -> Spec:
    """``"timm/resnet50@pre_logits"`` -> ``Spec("timm", "resnet50", "pre_logits")``; ``ConfigError`` if malformed."""
    names = tuple(SOURCES)
    if not isinstance(spec, str) or "/" not in spec:
        raise ConfigError(f"model spec {spec!r} must look like '<source>/<name>[@layer]' with source in {names}; "
                          f"e.g. 'toy/shape-resnet@logits'. Known: {list_models()[:8]} …")
    source, rest = spec.split("/", 1)
    if source not in SOURCES:
        hint = close_matches(source, names)
        raise ConfigError(f"unknown model source {source!r} in {spec!r}; sources: {names}"
                          + (f"; did you mean {hint[0]!r}?" if hint else ""))
    layer = None
    if "@" in rest and SOURCES[source].split_layer:
        rest, layer = rest.rsplit("@", 1)
        if not layer:
            raise ConfigError(f"empty layer after '@' in {spec!r}")
    if not rest:
        raise ConfigError(f"empty model name in {spec!r}")
    return Spec(source, rest, layer)


def check_spec(spec: str, kind: str) -> Spec:
    """Parse ``spec`` and check, without loading anything, that it can name a model of ``kind``."""
    s = parse_spec(spec)
    SOURCES[s.source].check(s, kind)
    return s


def check_available(spec: str, kind: str) -> Spec:
    """:func:`check_spec`, plus what a load of ``spec`` with no extra arguments needs from the hub: refused
    up front when it is not in the local cache and the hub is offline (:meth:`ModelSource.check_available`)."""
    s = check_spec(spec, kind)
    SOURCES[s.source].check_available(s, kind)
    return s


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set: hub files can come only from the local cache."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def not_downloaded(spec: str, repo: str, what: str = "weights") -> ConfigError:
    """The error for a hub ``repo`` whose ``what`` is not in the local cache while the hub is offline."""
    return ConfigError(f"cannot use {spec!r}: the {what} of hub repo {repo!r} are not downloaded (not in the local "
                       f"Hugging Face cache {hub_cache_dir()}, and HF_HUB_OFFLINE is set). Check the name; download "
                       f"it on a machine with network (`hf download {repo}`), or pass a local folder instead")


def looks_like_path(name: str) -> bool:
    """Whether a spec's name is meant as a file-system path (absolute, ``./``, ``../``, ``~``) or names one
    that exists, rather than a hub id or a library's model name."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


BUILTIN_LAYERS = ("logits", "pre_logits", "embed")  # layers every Extractor takes besides module names
_MODULE_NAMES: dict[Hashable, tuple[str, ...]] = {}


def meta_module_names(key: Hashable, build: Callable[[], nn.Module]) -> tuple[str, ...]:
    """The sub-module names of the model ``build()`` makes, built on the meta device (no weights, no memory),
    cached under ``key`` (which must change when the architecture can)."""
    if key not in _MODULE_NAMES:
        with torch.device("meta"):
            model = build()
        _MODULE_NAMES[key] = tuple(name for name, _ in model.named_modules() if name)
    return _MODULE_NAMES[key]


def check_layer(spec: str, layer: str, names: Sequence[str], builtin: Sequence[str] = BUILTIN_LAYERS) -> None:
    """``ConfigError`` listing the valid layers unless ``layer`` is one of ``builtin`` or a module name."""
    if layer in builtin or layer in names:
        return
    hint = close_matches(layer[:200], names)
    raise ConfigError(f"layer {show(layer, typed=False)} not found in {spec}; valid: {', '.join(builtin)} or a module "
                      f"name such as {list(names[:12])}{' …' if len(names) > 12 else ''}"
                      + (f"; did you mean {hint}?" if hint else ""))


def list_models(pattern: str = "*", kind: str | None = None, real: bool = False) -> list[str]:
    """Spec strings the registry knows, toy models first; ``pattern`` is a shell wildcard.

    ``kind`` filters by ``extractor``, ``prior``, ``clip``, ``oracle`` or ``conditional`` (a trained
    feature-conditioned generator, loaded with :func:`load_prior` and sampled with ``method="conditional"``);
    ``real=True`` adds the curated hub models of :data:`REAL_MODELS`.
    """
    out = [entry for src in SOURCES.values() for entry in src.specs()]
    if real:
        out += [(m["spec"], m["kind"]) for m in REAL_MODELS]
    return [s for s, k in out if fnmatch.fnmatch(s, pattern) and (kind is None or k == kind)]


def _load(kind: str, spec: str, device: str, kwargs: dict[str, Any], method: Callable[[ModelSource], Callable]):
    s = check_spec(spec, kind)
    return method(SOURCES[s.source])(s, device, **kwargs)


def load_extractor(spec: str, device: str = "cpu", **kwargs: Any):
    """An :class:`~fiberbench.models.extractor.Extractor` from a spec string (see module docstring)."""
    return _load("extractor", spec, device, kwargs, lambda src: src.load_extractor)


def load_prior(spec: str, device: str = "cpu", **kwargs: Any):
    """A :class:`~fiberbench.models.prior.Prior` from a spec string (``toy/prior-fm``, ``diffusers/<repo or dir>``)."""
    return _load("prior", spec, device, kwargs, lambda src: src.load_prior)


def load_clip(spec: str = "toy/clip", device: str = "cpu", **kwargs: Any):
    """A :class:`~fiberbench.models.clip.ClipModel` (``toy/clip`` or any ``open_clip/...`` spec)."""
    return _load("clip", spec, device, kwargs, lambda src: src.load_clip)


def weights_checksum(spec: str) -> str | None:
    """Checksum of the weights behind a model spec, ``"sha256:<hex>"``; ``None`` if they cannot be found.

    ``toy/<name>``: the shipped ``<name>.safetensors``. ``diffusers/<dir>``, ``hf/<dir>``: every file of the
    local folder. Hub ids (``timm/…``, ``open_clip/hf-hub:…``, ``hf/<repo>``, ``diffusers/<repo>``): the weight
    file in the local Hugging Face cache, if it is there. ``torch/…`` and uncached hub ids give ``None``
    (the key then rests on the spec string alone; recorded as such in the run config).
    """
    s = parse_spec(spec)
    return SOURCES[s.source].checksum(s)


def prior_defaults(spec: str) -> dict[str, Any]:
    """:meth:`ModelSource.defaults` of a prior spec (nothing is loaded)."""
    s = parse_spec(spec)
    return SOURCES[s.source].defaults(s)


def canonical_spec(spec: str, kind: str) -> str:
    """Spec string as the loaded model reports it (toy extractors get their default ``@layer``)."""
    s = parse_spec(spec)
    return SOURCES[s.source].canonical(s, kind)
