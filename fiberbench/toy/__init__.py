"""The embedded shapes world: factors, rendering, the tiny models' cards and nets, and the oracle.

See :mod:`fiberbench.toy.world` for the factors. Everything here is below the model registry: the toy
models are loaded through ``fiberbench.load_*("toy/<name>")`` like any other source.
"""
import pandas as pd
import torch

from ..errors import ConfigError
from ..seeds import INVARIANCE_SEED_BASE
from .oracle import Oracle, load_oracle
from .world import (
    BACKGROUNDS_RGB,
    CHIRAL,
    COLORS_RGB,
    CONTINUOUS,
    DISCRETE,
    FACTORS,
    IMAGE_SIZE,
    as_frame,
    caption,
    factor_index,
    intervene,
    render,
    sample_factors,
    validate_factors,
)

__all__ = ["BACKGROUNDS_RGB", "CHIRAL", "COLORS_RGB", "CONTINUOUS", "DISCRETE", "FACTORS", "IMAGE_SIZE", "Oracle",
           "as_frame", "caption", "factor_index", "intervene", "load_oracle", "references", "render",
           "sample_factors", "validate_factors", "balanced_references"]


def references(n: int, seed: int = 0, **fixed) -> tuple[torch.Tensor, pd.DataFrame]:
    """``(images [n,3,32,32] in [0,1], factors DataFrame)`` of fresh references; ``fixed`` pins factors."""
    f = sample_factors(n, seed)
    for k, v in fixed.items():
        f[k] = v
    return render(f), validate_factors(f)


def balanced_references(count: int, seed: int = 0) -> tuple[torch.Tensor, pd.DataFrame]:
    """``count`` fresh references with the shapes cycled (so every shape, the chiral one too, has fibers).

    The invariance benchmark's references (seeds from :data:`~fiberbench.seeds.INVARIANCE_SEED_BASE`).
    Returns ``(images [count,3,32,32] in [0,1], factors)``; other factors uniform; deterministic per seed.
    """
    if count < 1:
        raise ConfigError(f"references must be >= 1, got {count}")
    f = sample_factors(count, INVARIANCE_SEED_BASE + 500 + 1000 * seed)
    shapes = FACTORS["shape"]
    f["shape"] = [shapes[i % len(shapes)] for i in range(count)]
    f = validate_factors(f)
    return render(f), f
