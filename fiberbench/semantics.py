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


# --------------------------------------------------------------------------- vocabularies

Vocabulary = dict  # group -> {label: [prompt, ...]}

TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "a {}."]

TOY_VOCAB: Vocabulary = {
    "shape": {s: [f"a photo of a {s}.", f"a {s}.", f"a picture of a {s}."]
              for s in ["circle", "square", "triangle", "arrow"]},
    "color": {c: [f"a photo of a {c} shape.", f"a {c} shape.", f"something {c}."]
              for c in ["red", "green", "blue", "yellow", "magenta", "cyan"]},
    "background": {b: [f"a shape on a {b} background.", f"a photo with a {b} background.", f"on a {b} background."]
                   for b in ["black", "gray", "white"]},
    "mirror": {"right": ["an arrow pointing right.", "a shape pointing right."],
               "left": ["an arrow pointing left.", "a shape pointing left."]},
    "size": {w: [f"a {w} shape.", f"a photo of a {w} shape."] for w in ["small", "medium", "large"]},
}
# how a toy vocabulary label maps to the world's factor value (for agreement with the oracle)
TOY_LABEL_TO_FACTOR = {"mirror": {"right": False, "left": True}}


def make_vocab(concepts, templates: list[str] | None = None, group: str = "concept") -> Vocabulary:
    """An open vocabulary from plain concepts: ``["a dog", "a cat"]`` or ``{"animal": ["dog", "cat"]}``.

    Each concept is expanded with ``templates`` (open_clip's zero-shot style,
    default :data:`TEMPLATES`) and the prompt embeddings are averaged.
    """
    templates = templates or TEMPLATES
    if isinstance(concepts, dict):
        return {g: make_vocab(c, templates, g)[g] for g, c in concepts.items()}
    if isinstance(concepts, str) or not concepts:
        raise ConfigError(f"concepts must be a non-empty list of strings (or a dict of lists), got {concepts!r}")
    return {group: {c: [t.format(c) for t in templates] for c in concepts}}


def class_embeddings(clip: ClipModel, labels: dict[str, list[str]]) -> torch.Tensor:
    """``[K,D]`` unit-norm class embeddings: the mean of each label's prompt embeddings, renormalised."""
    embs = [F.normalize(clip.embed_texts(list(prompts)).mean(0), dim=-1) for prompts in labels.values()]
    return torch.stack(embs)


def zero_shot(clip: ClipModel, images: torch.Tensor, labels: dict[str, list[str]] | list[str],
              image_embeddings: torch.Tensor | None = None, temperature: float | None = None):
    """Zero-shot classification of ``images`` ([N,3,H,W] in [0,1]) among ``labels``.

    Returns a DataFrame with ``label`` (argmax), ``prob`` (its softmax probability at the
    model's logit scale) and one ``p_<label>`` column per label.
    """
    import pandas as pd

    if isinstance(labels, (list, tuple)):
        labels = make_vocab(list(labels))["concept"]
    cls = class_embeddings(clip, labels)
    img = image_embeddings if image_embeddings is not None else clip.embed_images(images)
    scale = temperature or float(clip.model.logit_scale.exp()) if hasattr(clip.model, "logit_scale") else 100.0
    probs = (scale * img.to(cls.device) @ cls.T).softmax(-1).cpu()
    names = list(labels)
    idx = probs.argmax(-1)
    df = pd.DataFrame({"label": [names[i] for i in idx.tolist()], "prob": probs.max(-1).values.numpy()})
    for j, nm in enumerate(names):
        df[f"p_{nm}"] = probs[:, j].numpy()
    return df
