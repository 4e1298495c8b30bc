"""``open_clip/...``: any open_clip model as a CLIP scorer, or its image tower as an extractor.

Names: ``<arch>:<pretrained>``, ``hf-hub:<repo>`` (e.g. BiomedCLIP), ``local-dir:<folder>`` or a plain
folder holding ``open_clip_config.json``. Weights come from the local Hugging Face cache or the folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from ...errors import ConfigError, close_matches
from ...identity import file_sha256
from ..clip import ClipModel
from ..extractor import Extractor
from ..hubcache import (
    HUB_WEIGHT_FILES,
    cached_hub_file,
    is_missing_weights,
    local_or_cached_checksum,
    weights_unavailable,
)
from ..registry import ModelSource, Spec, register_source


@register_source
class OpenClipSource(ModelSource):
    name = "open_clip"
    kinds = ("extractor", "clip")

    def load_extractor(self, spec: Spec, device: str, **kwargs: Any) -> Extractor:
        return load_open_clip_extractor(spec.name, spec.layer, device=device, **kwargs)

    def load_clip(self, spec: Spec, device: str, **kwargs: Any) -> ClipModel:
        return load_open_clip(spec.name, device=device, **kwargs)

    def checksum(self, spec: Spec) -> str | None:
        name = spec.name
        folder = name.split(":", 1)[1] if name.startswith("local-dir:") else name
        if Path(folder).is_dir():
            return local_or_cached_checksum(folder, HUB_WEIGHT_FILES)
        if name.startswith("hf-hub:"):
            hit = cached_hub_file(name[len("hf-hub:"):], HUB_WEIGHT_FILES)
            return "sha256:" + file_sha256(hit) if hit else None
        pretrained = name.split(":", 1)[1] if ":" in name else ""
        return "sha256:" + file_sha256(pretrained) if pretrained and Path(pretrained).is_file() else None



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
    model, _, cfg, spec = _open_clip_parts(name, device=device, **kwargs)
    layer = layer or "embed"
    if layer == "logits":
        layer = "embed"
    resize = "squash" if cfg["resize_mode"] == "squash" else "shortest"
    return Extractor(model, spec=f"{spec}@{layer}", layer=layer, input_size=cfg["size"], mean=cfg["mean"],
                     std=cfg["std"], interpolation=cfg["interpolation"], resize=resize, resize_size=cfg["size"],
                     runner=_encode_image, card={"preprocess_cfg": cfg}).to(device)
