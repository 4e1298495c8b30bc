"""CLIP space: embed images and texts, and say in words what changed inside a fiber."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, InputError


class ClipModel(nn.Module):
    """An open_clip model with its own preprocessing and tokenizer.

    ``embed_images(images [N,3,H,W] in [0,1]) -> [N,D]`` unit norm;
    ``embed_texts(list[str]) -> [M,D]`` unit norm (cached per string).
    Preprocessing (size, mean, std, interpolation) is recorded in
    ``self.preprocess_cfg`` and applied differentiably: a bare weights path
    cannot silently change it.
    """

    def __init__(self, model: nn.Module, tokenizer, *, spec: str, preprocess_cfg: dict[str, Any],
                 card: dict[str, Any] | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        self.preprocess_cfg = dict(preprocess_cfg)
        size = preprocess_cfg["size"]
        self.size = size if isinstance(size, int) else int(size[-1])
        self.register_buffer("mean", torch.tensor(preprocess_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(preprocess_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.card = card or {}
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images -> model input: resize the short side and centre-crop to ``size`` (as open_clip), normalise."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"{self.spec}: expected images [N,3,H,W] in [0,1], got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):
            mode = self.preprocess_cfg.get("interpolation", "bicubic")
            mode = mode if mode in ("bilinear", "bicubic", "nearest") else "bicubic"
            scale = self.size / min(h, w)
            nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False if mode != "nearest" else None,
                              antialias=mode != "nearest" and scale < 1)
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            x = x[..., top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std

    def embed_images(self, images: torch.Tensor, batch_size: int = 256, grad: bool = False) -> torch.Tensor:
        """Unit-norm image embeddings ``[N,D]`` of images ``[N,3,H,W]`` in [0,1]."""
        outs = []
        with torch.set_grad_enabled(grad):
            for chunk in images.split(batch_size):
                outs.append(F.normalize(self.model.encode_image(self.preprocess(chunk)).float(), dim=-1))
        return torch.cat(outs) if outs else torch.zeros(0, self.embed_dim)

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return proj.shape[-1]
        return int(self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1])

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unit-norm text embeddings ``[M,D]`` (cached per string)."""
        if isinstance(texts, str):
            texts = [texts]
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        for i in range(0, len(missing), batch_size):
            chunk = missing[i:i + batch_size]
            emb = F.normalize(self.model.encode_text(self.tokenizer(chunk).to(self.device)).float(), dim=-1)
            for t, e in zip(chunk, emb):
                self._text_cache[t] = e.cpu()
        if not texts:
            return torch.zeros(0, self.embed_dim)
        return torch.stack([self._text_cache[t] for t in texts]).to(self.device)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, size={self.size}"


def toy_tokenizer(context_length: int):
    """open_clip's own BPE tokenizer (bundled vocabulary: no download) at the toy context length."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def load_toy_clip(name: str = "clip", device="cpu") -> ClipModel:
    """The shipped ``toy/clip`` (open_clip ``CLIP`` from the card's config)."""
    from .toy import models as M

    module, card = M.load_toy_module(name)
    cfg = card["architecture"]["config"]
    inp = card["input"]
    return ClipModel(module, toy_tokenizer(cfg["text_cfg"]["context_length"]), spec=f"toy/{name}",
                     preprocess_cfg={"size": inp["size"], "mean": inp["mean"], "std": inp["std"],
                                     "interpolation": "bicubic"}, card=card).to(device)


def _open_clip_parts(name: str, device="cpu", pretrained: str | None = None, **kwargs):
    """``(model, tokenizer, preprocess_cfg, spec)`` for ``<arch>:<pretrained>`` or ``hf-hub:<repo>``."""
    import open_clip

    if name.startswith("hf-hub:"):
        arch, tag = name, None
    elif ":" in name:
        arch, tag = name.split(":", 1)
    else:
        arch, tag = name, pretrained
    tag = pretrained or tag
    try:
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=tag, device=device, **kwargs)
    except RuntimeError as e:
        msg = str(e)
        if "Unknown model" in msg or "not found" in msg.lower():
            hint = [m for m in open_clip.list_models() if arch.lower().split("-")[0] in m.lower()][:8]
            raise ConfigError(f"open_clip model {name!r}: {msg}; similar architectures: {hint}") from e
        raise ConfigError(f"cannot load open_clip/{name}: {msg}. Without network, pre-download the weights "
                          f"(`huggingface-cli download <repo>`, cache ~/.cache/huggingface/hub) or pass a local "
                          f"file as pretrained.") from e
    except Exception as e:  # noqa: BLE001 - hub/network errors
        raise ConfigError(f"cannot load open_clip/{name}: {type(e).__name__}: {e}. Without network, pre-download "
                          f"the weights (`huggingface-cli download <repo>`, cache ~/.cache/huggingface/hub) or "
                          f"pass a local file as pretrained.") from e
    tokenizer = open_clip.get_tokenizer(arch)
    pcfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = pcfg.get("size", model.visual.image_size)
    cfg = {"size": size if isinstance(size, int) else int(size[-1]),
           "mean": list(pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
           "std": list(pcfg.get("std", open_clip.OPENAI_DATASET_STD)),
           "interpolation": pcfg.get("interpolation", "bicubic"),
           "resize_mode": pcfg.get("resize_mode", "shortest")}
    return model, tokenizer, cfg, f"open_clip/{name}"


def load_open_clip(name: str, device="cpu", **kwargs) -> ClipModel:
    """Any open_clip model as a CLIP scorer (``ViT-B-32:laion2b_s34b_b79k``, ``hf-hub:…``, or ``<arch>`` + ``pretrained=<file>``)."""
    model, tok, cfg, spec = _open_clip_parts(name, device=device, **kwargs)
    return ClipModel(model, tok, spec=spec, preprocess_cfg=cfg).to(device)


def load_open_clip_extractor(name: str, layer: str | None, device="cpu", **kwargs):
    """The image tower of an open_clip model as an Extractor (unit-norm-free image embedding)."""
    from .extractors import Extractor

    model, _, cfg, spec = _open_clip_parts(name, device=device, **kwargs)
    layer = layer or "embed"

    def embed(m, x):
        return m.encode_image(x)

    return Extractor(model, spec=f"{spec}@{layer}", layer=layer, input_size=cfg["size"], mean=cfg["mean"],
                     std=cfg["std"], interpolation="bicubic",
                     forward_fn=embed if layer == "embed" else None).to(device)
