"""Training the oracle: clean renders without augmentation plus junk with uniform targets."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..seeds import TRAIN_SEED_BASE
from ..toy import cards
from ..toy.nets import HEADS, VALID_CONF, OracleNet
from ..toy.oracle import make_junk
from ..toy.world import CHIRAL, CONTINUOUS, DISCRETE, FACTORS, factor_index, render, sample_factors
from .loop import env


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
                                f"{steps * batch} images in all", "env": env()}
    card["parameters"] = cards.count_params(net)
    cards.save_weights("oracle", net.eval(), root)
    cards.write_card("oracle", card, root)
    return card
