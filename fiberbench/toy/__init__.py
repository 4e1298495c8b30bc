"""The embedded shapes world and its tiny models (see :mod:`fiberbench.toy.world`)."""
from .world import (  # noqa: F401
    BACKGROUNDS_RGB, CHIRAL, COLORS_RGB, CONTINUOUS, DISCRETE, FACTORS, IMAGE_SIZE,
    as_frame, caption, factor_index, intervene, render, sample_factors, validate_factors,
)


def load_oracle(device="cpu"):
    """The shipped factor oracle (``toy/oracle``): ``.predict(images) -> DataFrame``."""
    from .oracle import load_oracle as _load
    return _load(device=device)


def train_all(*args, **kwargs):
    """Train and measure the toy models (see :func:`fiberbench.toy.train.train_all`)."""
    from .train import train_all as _train_all
    return _train_all(*args, **kwargs)


def references(n: int, seed: int = 0, **fixed):
    """``(images [n,3,32,32] in [0,1], factors DataFrame)`` of fresh references; ``fixed`` pins factors."""
    f = sample_factors(n, seed)
    for k, v in fixed.items():
        f[k] = v
    return render(f), validate_factors(f)
