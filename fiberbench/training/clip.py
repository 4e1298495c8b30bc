"""Training the toy CLIP: contrastive on renders and captions made from their factors."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..seeds import TRAIN_SEED_BASE
from ..toy.nets import build_clip, clip_config
from ..toy.vocab import TOY_VOCAB, toy_tokenizer
from ..toy.world import CHIRAL, caption, position_words, render, sample_factors, size_word
from .loop import TrainLoop, env


def clip_card() -> dict[str, Any]:
    return {"name": "clip", "spec": "toy/clip", "kind": "clip",
            "description": "open_clip CLIP (custom config: ViT 4x4 patches + 3-layer text transformer, open_clip's "
                           "own BPE tokenizer), contrastive on renders and captions made from their factors",
            "architecture": {"library": "open_clip", "class": "CLIP", "config": clip_config()},
            "input": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}


def _captions_with_facts(f, rng: np.random.Generator) -> tuple[list[str], list[dict[str, Any]]]:
    """One caption per row, full or partial, plus the facts each caption asserts."""
    full = caption(f)
    caps, facts = [], []
    for k, row in enumerate(f.itertuples(index=False)):
        kind = rng.integers(0, 9)
        size_w = size_word(row.size)
        if kind <= 2:
            caps.append(full[k])
            fact = {"shape": row.shape, "color": row.color, "background": row.background, "size_w": size_w,
                    "pos": position_words(row.x, row.y)}
            if row.shape in CHIRAL:
                fact["mirror"] = bool(row.mirror)
        elif kind == 3:
            caps.append(str(rng.choice(TOY_VOCAB["color"][row.color])))
            fact = {"color": row.color}
        elif kind == 4:
            caps.append(str(rng.choice(TOY_VOCAB["shape"][row.shape])))
            fact = {"shape": row.shape}
        elif kind == 5:
            caps.append(str(rng.choice(TOY_VOCAB["background"][row.background])))
            fact = {"background": row.background}
        elif kind == 6:
            caps.append(f"a {row.color} {row.shape}.")
            fact = {"color": row.color, "shape": row.shape}
        elif kind == 7:
            caps.append(str(rng.choice(TOY_VOCAB["size"][size_w])))
            fact = {"size_w": size_w}
        else:
            if row.shape in CHIRAL:
                d = "left" if row.mirror else "right"
                caps.append(str(rng.choice(TOY_VOCAB["mirror"][d])))
                fact = {"shape": row.shape, "mirror": bool(row.mirror)}
            else:
                caps.append(f"a {row.shape} on a {row.background} background.")
                fact = {"shape": row.shape, "background": row.background}
        facts.append(fact)
    return caps, facts


def _match_matrix(f, facts: list[dict[str, Any]]) -> torch.Tensor:
    """``[N_img, N_cap]``: 1 where image i satisfies every fact caption j asserts (known positives)."""
    cols = {"shape": f["shape"].to_numpy(), "color": f["color"].to_numpy(),
            "background": f["background"].to_numpy(), "mirror": f["mirror"].to_numpy().astype(bool),
            "size_w": np.array([size_word(v) for v in f["size"]]),
            "pos": np.array([position_words(x, y) for x, y in zip(f["x"], f["y"])])}
    n = len(f)
    match = np.ones((n, len(facts)), dtype=bool)
    for j, fact in enumerate(facts):
        for key, val in fact.items():
            match[:, j] &= cols[key] == val
    return torch.from_numpy(match.astype(np.float32))


def train_clip(*, steps: int = 2500, batch: int = 256, lr: float = 1e-3, seed: int = 0, root: Path | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Contrastive training with *known positives*: a caption is a positive for every image it truthfully describes.

    A batch is ``batch`` renders with one caption each; the weights are saved as fp16. Returns the card.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(TRAIN_SEED_BASE + 99 + seed)
    card = clip_card()
    cfg = card["architecture"]["config"]
    net = build_clip(cfg)
    tok = toy_tokenizer(cfg["text_cfg"]["context_length"])
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in net.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    loop = TrainLoop("clip", net, lr=lr, schedule="cosine", warmup=100, param_groups=groups, max_steps=steps,
                     half=True, root=root, log=log)

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        f = sample_factors(batch, TRAIN_SEED_BASE + 500_000 + step)
        x = (render(f) - 0.5) / 0.5
        caps, facts = _captions_with_facts(f, rng)
        match = _match_matrix(f, facts)
        img = F.normalize(net.encode_image(x), dim=-1)
        txt = F.normalize(net.encode_text(tok(caps)), dim=-1)
        logits = net.logit_scale.exp() * img @ txt.T
        li = -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        lt = -(match / match.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
        return (li + lt) / 2, {}

    @torch.no_grad()
    def clamp_temperature() -> None:  # as CLIP: a logit scale above 100 destabilises training
        net.logit_scale.clamp_(0, math.log(100))

    def training(lp: TrainLoop, final: bool) -> dict[str, Any]:
        return {"steps": lp.step, "batch": batch, "lr": lr, "schedule": "cosine, 100 warm-up", "seed": seed,
                "objective": "symmetric InfoNCE with known positives (match matrix from factors)",
                "seconds": round(lp.seconds(), 1),
                "data": f"fresh renders + captions every step, {lp.step * batch} pairs in all", "env": env()}

    return loop.run(step_fn, card, training, after_step=clamp_temperature)
