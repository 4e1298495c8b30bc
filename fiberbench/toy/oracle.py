"""The oracle: a multi-head factor predictor that judges samples of the shapes world.

It is trained *without* augmentation on clean renders and *with junk* (noise,
smooth blobs, blends of two renders, heavily noised renders, off-palette and
two-tone shapes) whose discrete targets are uniform, so that it says "no" to
images that are not clean renders: a sample is **valid** when the oracle's
top probability is at least 0.9 for both shape and colour.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import models as M
from .world import CHIRAL, CONTINUOUS, DISCRETE, FACTORS, factor_index, render, sample_factors

VALID_CONF = 0.9
HEADS = {name: len(FACTORS[name]) for name in DISCRETE}


class OracleNet(nn.Module):
    """Conv trunk that keeps a 4x4 map (so position survives), then one head per factor.

    Input ``[N,3,32,32]`` in [0,1]; output dict: discrete factor -> logits
    ``[N,K]``, ``"regress"`` -> ``[N,3]`` (size, x, y in the factors' units).
    """

    def __init__(self, width: int = 32, hidden: int = 256):
        super().__init__()
        w = width

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.trunk = nn.Sequential(block(3, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
                                   block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 2))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in HEADS.items()})
        self.regress = nn.Linear(hidden, len(CONTINUOUS))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc(self.trunk((x - 0.5) / 0.5))
        out = {k: head(h) for k, head in self.heads.items()}
        out["regress"] = self.regress(h)
        return out


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
            from ..errors import InputError
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
    net, card = M.load_toy_module("oracle", root)
    return Oracle(net, card, device)


# --------------------------------------------------------------------------- junk & training

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
    from .world import BACKGROUNDS_RGB, COLORS_RGB

    pal = np.array(list(COLORS_RGB.values()) + list(BACKGROUNDS_RGB.values()))
    out = []
    while len(out) < m:
        c = rng.uniform(0, 1, 3)
        if np.min(np.linalg.norm(pal - c, axis=1)) > 0.35:
            out.append(c)
    return torch.tensor(np.array(out), dtype=torch.float32)


def oracle_card() -> dict[str, Any]:
    return {"name": "oracle", "spec": "toy/oracle", "kind": "oracle",
            "description": "Multi-head factor predictor (judge only). Trained on clean renders without "
                           "augmentation plus junk with uniform targets; valid = shape and colour "
                           f"confidence >= {VALID_CONF}.",
            "architecture": {"library": "fiberbench", "class": "OracleNet", "config": {"width": 32, "hidden": 256}},
            "heads": {k: list(map(str, FACTORS[k])) for k in DISCRETE} | {"regress": CONTINUOUS}}


def train_oracle(*, steps: int = 2500, batch: int = 128, junk_frac: float = 0.3, lr: float = 2e-3, seed: int = 0,
                 root: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Train the oracle on fresh renders + junk; save weights and card."""
    from .train import TRAIN_SEED_BASE, _env

    torch.manual_seed(seed)
    rng = np.random.default_rng(TRAIN_SEED_BASE + seed)
    card = oracle_card()
    net = OracleNet(**card["architecture"]["config"])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    lo = torch.tensor([FACTORS[c][0] for c in CONTINUOUS])
    hi = torch.tensor([FACTORS[c][1] for c in CONTINUOUS])
    n_junk = int(batch * junk_frac)
    t0 = time.time()
    net.train()
    for step in range(steps):
        f = sample_factors(batch - n_junk, TRAIN_SEED_BASE + 31 * step + seed)
        clean = render(f)
        clean = (clean + rng.uniform(0, 0.04) * torch.randn_like(clean)).clamp(0, 1)
        junk, colour_only = make_junk(n_junk, rng)
        x = torch.cat([clean, junk])
        out = net(x)
        nc = len(f)
        loss = 0.0
        for name in DISCRETE:
            logp = out[name].log_softmax(-1)
            y = torch.from_numpy(factor_index(f, name))
            tgt = F.one_hot(y, HEADS[name]).float() * 0.98 + 0.02 / HEADS[name]
            if name == "mirror":  # defined only for chiral shapes; uniform elsewhere
                chiral = torch.from_numpy(f["shape"].isin(CHIRAL).to_numpy())
                tgt[~chiral] = 1.0 / HEADS[name]
            junk_tgt = torch.full((n_junk, HEADS[name]), 1.0 / HEADS[name])
            # off-palette / two-tone images are clean shapes with junk colour: keep the other targets
            if name != "color":
                junk_tgt[colour_only] = torch.nan
            tgt_all = torch.cat([tgt, junk_tgt])
            ok = ~tgt_all.isnan().any(-1)
            loss = loss + -(tgt_all[ok] * logp[ok]).sum(-1).mean()
        reg_t = (torch.tensor(f[CONTINUOUS].to_numpy(), dtype=torch.float32) - lo) / (hi - lo)
        reg_p = (out["regress"][:nc] - lo) / (hi - lo)
        loss = loss + 10 * F.mse_loss(reg_p, reg_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"[oracle] step {step + 1} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    card["training"] = {"steps": steps, "batch": batch, "junk_fraction": junk_frac, "lr": lr, "seed": seed,
                        "optimizer": "AdamW + OneCycle", "seconds": round(time.time() - t0, 1),
                        "data": f"fresh renders every step (+ {n_junk} junk a batch), "
                                f"{steps * batch} images in all", "env": _env()}
    card["parameters"] = M.count_params(net)
    M.save_weights("oracle", net.eval(), root)
    M.write_card("oracle", card, root)
    return card
