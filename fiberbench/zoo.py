"""Spec strings -> models. One registry for extractors, priors and CLIP scorers.

Spec grammar: ``<source>/<name>[@<layer>]``

================ ================================================ ======================
source           name                                             gives
================ ================================================ ======================
``toy``          a shipped toy model (``shape-resnet``, …)         any kind
``timm``         any timm model name (``resnet50.a1_in1k``)        Extractor
``open_clip``    ``<arch>:<pretrained>`` or ``hf-hub:<repo>``      Extractor / ClipModel
``hf``           a transformers vision model repo or folder        Extractor
``torch``        ``<python.module:callable>`` returning nn.Module  Extractor
``diffusers``    a pipeline folder or hub id                      Prior
================ ================================================ ======================

``@layer`` (extractors only): ``logits``, ``pre_logits`` or a module name.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, close_matches

SOURCES = ("toy", "timm", "open_clip", "hf", "torch", "diffusers")

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


def parse_spec(spec: str) -> Spec:
    """``"timm/resnet50@pre_logits"`` -> ``Spec("timm", "resnet50", "pre_logits")``; ``ConfigError`` if malformed."""
    if not isinstance(spec, str) or "/" not in spec:
        raise ConfigError(f"model spec {spec!r} must look like '<source>/<name>[@layer]' with source in {SOURCES}; "
                          f"e.g. 'toy/shape-resnet@logits'. Known: {list_models()[:8]} …")
    source, rest = spec.split("/", 1)
    if source not in SOURCES:
        hint = close_matches(source, SOURCES)
        raise ConfigError(f"unknown model source {source!r} in {spec!r}; sources: {SOURCES}"
                          + (f"; did you mean {hint[0]!r}?" if hint else ""))
    layer = None
    if "@" in rest:
        rest, layer = rest.rsplit("@", 1)
        if not layer:
            raise ConfigError(f"empty layer after '@' in {spec!r}")
    if not rest:
        raise ConfigError(f"empty model name in {spec!r}")
    return Spec(source, rest, layer)


def _toy_kind(name: str) -> str | None:
    from .toy import models as M

    try:
        return M.read_card(name).get("kind")
    except ConfigError:
        return None


def list_models(pattern: str = "*", kind: str | None = None, real: bool = False) -> list[str]:
    """Spec strings the registry knows, toy models first; ``pattern`` is a shell wildcard.

    ``kind`` filters by ``extractor``, ``prior``, ``clip`` or ``oracle``;
    ``real=True`` adds the curated hub models of :data:`REAL_MODELS`.
    """
    from .toy import models as M

    out: list[tuple[str, str]] = []
    for name in M.available():
        k = _toy_kind(name)
        if k in ("classifier", "encoder"):
            out.append((f"toy/{name}", "extractor"))
            layers = M.read_card(name).get("layers", ["logits", "pre_logits"])
            out += [(f"toy/{name}@{layer}", "extractor") for layer in layers]
        elif k in ("flow", "diffusion"):
            out.append((f"toy/{name}", "prior"))
        elif k == "clip":
            out.append((f"toy/{name}", "clip"))
        elif k == "oracle":
            out.append((f"toy/{name}", "oracle"))
    if real:
        out += [(m["spec"], m["kind"]) for m in REAL_MODELS]
    return [s for s, k in out if fnmatch.fnmatch(s, pattern) and (kind is None or k == kind)]


def _unknown_toy(name: str, kind: str) -> ConfigError:
    known = list_models(kind=kind)
    hint = close_matches(f"toy/{name}", known)
    return ConfigError(f"unknown {kind} 'toy/{name}'; available: {known}" + (f"; did you mean {hint}?" if hint else ""))


def load_extractor(spec: str, device: str = "cpu", **kwargs: Any):
    """An :class:`~fiberbench.extractors.Extractor` from a spec string (see module docstring)."""
    from . import extractors as E

    s = parse_spec(spec)
    if s.source == "toy":
        if _toy_kind(s.name) not in ("classifier", "encoder"):
            raise _unknown_toy(s.name, "extractor")
        return E.load_toy_extractor(s.name, s.layer, device=device)
    if s.source == "timm":
        return E.load_timm_extractor(s.name, s.layer, device=device, **kwargs)
    if s.source == "open_clip":
        from .hub import load_open_clip_extractor
        return load_open_clip_extractor(s.name, s.layer, device=device, **kwargs)
    if s.source == "hf":
        from .hub import load_hf_extractor
        return load_hf_extractor(s.name, s.layer, device=device, **kwargs)
    if s.source == "torch":
        from .hub import load_torch_extractor
        return load_torch_extractor(s.name, s.layer, device=device, **kwargs)
    raise ConfigError(f"{spec!r} names a {s.source} model, which is not a feature extractor "
                      f"(extractors come from toy, timm, open_clip, hf, torch)")


def load_prior(spec: str, device: str = "cpu", **kwargs: Any):
    """A :class:`~fiberbench.priors.Prior` from a spec string (``toy/prior-fm``, ``diffusers/<repo or dir>``)."""
    from . import priors as P

    s = parse_spec(spec)
    if s.layer:
        raise ConfigError(f"priors take no '@layer' ({spec!r})")
    if s.source == "toy":
        if _toy_kind(s.name) not in ("flow", "diffusion"):
            raise _unknown_toy(s.name, "prior")
        return P.load_toy_prior(s.name, device=device)
    if s.source == "diffusers":
        return P.load_diffusers_prior(s.name, spec=spec, device=device, **kwargs)
    raise ConfigError(f"{spec!r} is not a prior; priors come from toy/ or diffusers/ (e.g. 'toy/prior-fm')")


def load_clip(spec: str = "toy/clip", device: str = "cpu", **kwargs: Any):
    """A :class:`~fiberbench.semantics.ClipModel` (``toy/clip`` or any ``open_clip/...`` spec)."""
    from . import semantics as S

    s = parse_spec(spec)
    if s.source == "toy":
        if _toy_kind(s.name) != "clip":
            raise _unknown_toy(s.name, "clip")
        return S.load_toy_clip(s.name, device=device)
    if s.source == "open_clip":
        from .hub import load_open_clip
        return load_open_clip(s.name, device=device, **kwargs)
    raise ConfigError(f"{spec!r} is not a CLIP model; use 'toy/clip' or 'open_clip/<arch>:<pretrained>'")
