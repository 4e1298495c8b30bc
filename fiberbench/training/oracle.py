"""Training the oracle: clean renders without augmentation plus junk with uniform targets."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..seeds import TRAIN_SEED_BASE
from ..toy.nets import HEADS, VALID_CONF, OracleNet
from ..toy.oracle import make_junk
from ..toy.world import CHIRAL, CONTINUOUS, DISCRETE, FACTORS, factor_index, render, sample_factors
from .loop import TrainLoop, env


def oracle_card() -> dict[str, Any]:
    return {"name": "oracle", "spec": "toy/oracle", "kind": "oracle",
            "description": "Multi-head factor predictor (judge only). Trained on clean renders without "
                           "augmentation plus junk with uniform targets; valid = shape and colour "
                           f"confidence >= {VALID_CONF}.",
            "architecture": {"library": "fiberbench", "class": "OracleNet", "config": {"width": 32, "hidden": 256}},
            "heads": {k: list(map(str, FACTORS[k])) for k in DISCRETE} | {"regress": CONTINUOUS}}


def oracle_loss(out: dict[str, torch.Tensor], f, n_junk: int, colour_only: torch.Tensor) -> torch.Tensor:
    """The oracle's loss on a batch of ``len(f)`` clean renders followed by ``n_junk`` junk images.

    ``out``: the heads' outputs (``[B, classes]`` logits per discrete factor, ``"regress"`` ``[B, len(CONTINUOUS)]``);
    ``colour_only`` ``[n_junk]`` bool marks junk that is a clean shape with junk colour. Discrete heads:
    cross-entropy to smoothed one-hot targets (uniform on junk); continuous factors: 10 x MSE scaled to [0, 1].
    """
    lo = torch.tensor([FACTORS[c][0] for c in CONTINUOUS])
    hi = torch.tensor([FACTORS[c][1] for c in CONTINUOUS])
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
    reg_p = (out["regress"][:len(f)] - lo) / (hi - lo)
    return loss + 10 * F.mse_loss(reg_p, reg_t)


def train_oracle(*, steps: int = 2500, batch: int = 128, junk_frac: float = 0.3, lr: float = 2e-3, seed: int = 0,
                 root: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Train the oracle on fresh renders + junk (``junk_frac`` of each batch); save weights and card."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(TRAIN_SEED_BASE + seed)
    card = oracle_card()
    net = OracleNet(**card["architecture"]["config"])
    loop = TrainLoop("oracle", net, lr=lr, schedule="onecycle", weight_decay=0.01, max_steps=steps, root=root,
                     log=log)
    n_junk = int(batch * junk_frac)

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        f = sample_factors(batch - n_junk, TRAIN_SEED_BASE + 31 * step + seed)
        clean = render(f)
        clean = (clean + rng.uniform(0, 0.04) * torch.randn_like(clean)).clamp(0, 1)
        junk, colour_only = make_junk(n_junk, rng)
        return oracle_loss(net(torch.cat([clean, junk])), f, n_junk, colour_only), {}

    def training(lp: TrainLoop, final: bool) -> dict[str, Any]:
        return {"steps": lp.step, "batch": batch, "junk_fraction": junk_frac, "lr": lr, "seed": seed,
                "optimizer": "AdamW + OneCycle", "seconds": round(lp.seconds(), 1),
                "data": f"fresh renders every step (+ {n_junk} junk a batch), "
                        f"{lp.step * batch} images in all", "env": env()}

    return loop.run(step_fn, card, training)
