"""``mix/<w>*<spec>+<w>*<spec>…``: a weighted mixture of extractors, whose invariances are graded.

The features of a mixture are the parts' features, each normalised to unit length and scaled by
``sqrt(w_i / sum w)``, concatenated; so a mixture's features have unit norm and its cosine similarity is
the ``w``-weighted mean of its parts' cosine similarities::

    cos_mix(x, y) = sum_i w_i cos_i(x, y) / sum_i w_i

A factor that one part ignores and another sees is then neither free nor pinned in the mixture's fiber: the
fiber admits a change of it only while the other part's cosine stays high enough, so a family of weights
spreads the true invariance over (0, 1). Example: ``mix/0.75*toy/shape-resnet@logits+0.25*toy/clip@embed``.
Weights are positive numbers (their scale does not matter); parts are any extractor specs.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...identity import sha256_hex
from ..registry import ModelSource, Spec, canonical_spec, check_spec, load_extractor, register_source, weights_checksum

PART = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*(\S+?)\s*$")


def parse_parts(name: str) -> list[tuple[float, str]]:
    """``"0.75*toy/a@logits+0.25*toy/b@embed"`` -> ``[(0.75, "toy/a@logits"), (0.25, "toy/b@embed")]``."""
    parts = []
    for chunk in name.split("+"):
        m = PART.match(chunk)
        if not m:
            raise ConfigError(f"mixture part {chunk!r} in 'mix/{name}' must look like '<weight>*<extractor spec>', "
                              f"e.g. 'mix/0.75*toy/shape-resnet@logits+0.25*toy/clip@embed'")
        w = float(m.group(1))
        if not (math.isfinite(w) and w > 0):
            raise ConfigError(f"mixture weight {m.group(1)!r} in 'mix/{name}' must be a finite number > 0")
        parts.append((w, m.group(2)))
    if len(parts) < 2:
        raise ConfigError(f"'mix/{name}' needs at least two parts joined by '+'")
    return parts


class MixtureExtractor(nn.Module):
    """Images ``[N,3,H,W]`` in [0,1] -> ``[N, sum D_i]``: unit-normalised part features scaled by ``sqrt(w_i / W)``."""

    def __init__(self, parts: list[tuple[float, nn.Module]], spec: str):
        super().__init__()
        total = sum(w for w, _ in parts)
        self.parts = nn.ModuleList([ext for _, ext in parts])
        self.register_buffer("scales", torch.tensor([math.sqrt(w / total) for w, _ in parts]), persistent=False)
        self.spec = spec
        self.layer = "mix"
        self.card = {"parts": [{"weight": w, "spec": getattr(ext, "spec", "?")} for w, ext in parts]}
        self.classes = None

    @property
    def device(self) -> torch.device:
        return self.scales.device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = [s * F.normalize(ext(images).float(), dim=-1) for s, ext in zip(self.scales, self.parts)]
        return torch.cat(feats, dim=-1)


@register_source
class MixSource(ModelSource):
    name = "mix"
    kinds = ("extractor",)
    split_layer = False  # the parts carry their own '@layer'

    def check(self, spec: Spec, kind: str) -> None:
        super().check(spec, kind)
        for _, part in parse_parts(spec.name):
            if part.startswith("mix/"):
                raise ConfigError(f"a mixture's parts cannot be mixtures themselves ({part!r})")
            check_spec(part, "extractor")

    def load_extractor(self, spec: Spec, device: str, **kwargs: Any) -> MixtureExtractor:
        parts = [(w, load_extractor(part, device=device, **kwargs)) for w, part in parse_parts(spec.name)]
        return MixtureExtractor(parts, spec=self.canonical(spec, "extractor")).to(device)

    def checksum(self, spec: Spec) -> str | None:
        sums = [(w, weights_checksum(part)) for w, part in parse_parts(spec.name)]
        if any(c is None for _, c in sums):
            return None
        return "sha256:" + sha256_hex("".join(f"{w!r}:{c}\n" for w, c in sums).encode())

    def canonical(self, spec: Spec, kind: str) -> str:
        return "mix/" + "+".join(f"{w:g}*{canonical_spec(part, 'extractor')}" for w, part in parse_parts(spec.name))
