"""A CLIP model behind one interface: unit-norm image and text embeddings, preprocessing recorded.

Any open_clip model (``open_clip/...`` specs) or the shipped ``toy/clip`` becomes a :class:`ClipModel`;
scoring (:mod:`fiberbench.analysis.semantics`) and SING (:mod:`fiberbench.analysis.nullspace`) only use
its ``embed_images`` / ``embed_texts``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


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
