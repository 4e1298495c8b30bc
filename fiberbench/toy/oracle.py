"""The oracle: a multi-head factor predictor that judges samples of the shapes world.

It is trained *without* augmentation on clean renders and *with junk* (noise,
smooth blobs, blends of two renders, heavily noised renders, off-palette and
two-tone shapes) whose discrete targets are uniform, so that it says "no" to
images that are not clean renders: a sample is **valid** when the oracle's
top probability is at least 0.9 for both shape and colour.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import InputError
from .cards import load_toy_module
from .nets import VALID_CONF, OracleNet
from .world import BACKGROUNDS_RGB, COLORS_RGB, CONTINUOUS, DISCRETE, FACTORS, render, sample_factors


class Oracle:
    """Judge of the shapes world: ``predict(images) -> DataFrame``."""

    def __init__(self, net: OracleNet, card: dict[str, Any] | None = None, device: str | torch.device = "cpu"):
        self.net = net.to(device).eval().requires_grad_(False)
        self.card = card or {}
        self.device = torch.device(device)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> pd.DataFrame:
        """Judge images ``[N,3,32,32]`` in [0,1].

        Returns one row per image: for each discrete factor its predicted value
        (spelled as in ``FACTORS``) and ``<factor>_conf`` (the predicted class's
        probability); ``size``, ``x``, ``y`` regressed; ``valid`` = shape and
        colour confidences both >= 0.9. ``mirror`` is meaningful only where the
        predicted shape is chiral (for symmetric shapes its confidence is ~0.5).
        """
        if images.ndim != 4 or images.shape[1:] != (3, 32, 32):
            raise InputError(f"the oracle judges [N,3,32,32] images in [0,1]; got shape {tuple(images.shape)}")
        cols: dict[str, list] = {}
        for chunk in images.split(batch_size):
            out = self.net(chunk.float().to(self.device).clamp(0, 1))
            for name in DISCRETE:
                p = out[name].softmax(-1)
                conf, idx = p.max(-1)
                cols.setdefault(name, []).extend(FACTORS[name][i] for i in idx.tolist())
                cols.setdefault(f"{name}_conf", []).extend(conf.tolist())
            reg = out["regress"].cpu()
            for j, name in enumerate(CONTINUOUS):
                cols.setdefault(name, []).extend(reg[:, j].tolist())
        df = pd.DataFrame(cols)
        df["valid"] = (df["shape_conf"] >= VALID_CONF) & (df["color_conf"] >= VALID_CONF)
        return df

    def valid(self, images: torch.Tensor) -> np.ndarray:
        """Boolean array: which images are clean shapes (shape and colour confidence >= 0.9)."""
        return self.predict(images)["valid"].to_numpy()

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw head outputs (differentiable)."""
        return self.net(images.to(self.device))


def load_oracle(device: str | torch.device = "cpu", root: Path | None = None) -> Oracle:
    """The shipped oracle (``data/models/oracle.safetensors``)."""
    net, card = load_toy_module("oracle", root)
    return Oracle(net, card, device)


# --------------------------------------------------------------------------- junk

def make_junk(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` junk images in [0,1] and a bool mask ``colour_only`` (True: only the colour is junk).

    Kinds: uniform noise, smooth blobs, blends of two renders, heavily noised
    renders (sigma >= 0.3), off-palette shapes and two-tone shapes.
    """
    kinds = rng.integers(0, 6, n)
    imgs = torch.empty(n, 3, 32, 32)
    colour_only = torch.zeros(n, dtype=torch.bool)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    for k in range(6):
        sel = np.flatnonzero(kinds == k)
        m = len(sel)
        if m == 0:
            continue
        if k == 0:
            x = torch.rand(m, 3, 32, 32, generator=g)
        elif k == 1:
            res = int(rng.integers(2, 9))
            x = F.interpolate(torch.rand(m, 3, res, res, generator=g), size=32, mode="bicubic",
                              align_corners=False).clamp(0, 1)
        elif k == 2:
            a = render(sample_factors(m, int(rng.integers(1 << 30))))
            b = render(sample_factors(m, int(rng.integers(1 << 30))))
            w = torch.from_numpy(rng.uniform(0.3, 0.7, (m, 1, 1, 1))).float()
            x = w * a + (1 - w) * b
        elif k == 3:
            a = render(sample_factors(m, int(rng.integers(1 << 30))))
            s = torch.from_numpy(rng.uniform(0.3, 1.0, (m, 1, 1, 1))).float()
            x = (a + s * torch.randn(a.shape, generator=g)).clamp(0, 1)
        else:
            f = sample_factors(m, int(rng.integers(1 << 30)))
            fg = render(f.assign(background="black")) - 0.05  # 0 on the background, colour on the shape
            mask = (fg.abs().amax(1, keepdim=True) > 0.02).float() * _coverage(f)
            bg = render(f.assign(color="red")) * (1 - mask)
            if k == 4:  # off-palette: a random colour far from every palette colour
                col = _off_palette(m, rng)
                x = bg + mask * col.view(m, 3, 1, 1)
            else:  # two-tone: the shape split between two palette colours
                f2 = f.copy()
                f2["color"] = [FACTORS["color"][(FACTORS["color"].index(c) + int(rng.integers(1, 6))) % 6]
                               for c in f["color"]]
                c1 = render(f.assign(background="black")) * mask
                c2 = render(f2.assign(background="black")) * mask
                split = (torch.arange(32).view(1, 1, 32, 1) < torch.from_numpy(
                    rng.integers(10, 22, (m, 1, 1, 1)))).float()
                if rng.random() < 0.5:
                    split = split.transpose(2, 3)
                x = bg + split * c1 + (1 - split) * c2
            colour_only[sel] = True
        imgs[sel] = x.clamp(0, 1)
    return imgs, colour_only


def _coverage(f: pd.DataFrame) -> torch.Tensor:
    """Anti-aliased coverage [N,1,32,32] of each row's shape."""
    on = render(f.assign(background="black", color="red"))[:, :1]
    return ((on - 0.05) / (0.90 - 0.05)).clamp(0, 1)


def _off_palette(m: int, rng: np.random.Generator) -> torch.Tensor:

    pal = np.array(list(COLORS_RGB.values()) + list(BACKGROUNDS_RGB.values()))
    out = []
    while len(out) < m:
        c = rng.uniform(0, 1, 3)
        if np.min(np.linalg.norm(pal - c, axis=1)) > 0.35:
            out.append(c)
    return torch.tensor(np.array(out), dtype=torch.float32)
