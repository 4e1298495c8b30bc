"""The embedded shapes world and its tiny models (see :mod:`fiberbench.toy.world`)."""
from .world import (  # noqa: F401
    BACKGROUNDS_RGB, CHIRAL, COLORS_RGB, CONTINUOUS, DISCRETE, FACTORS, IMAGE_SIZE,
    as_frame, caption, factor_index, intervene, render, sample_factors, validate_factors,
)


def load_oracle(device="cpu"):
    """The shipped factor oracle (``toy/oracle``): ``.predict(images) -> DataFrame``."""
    from .oracle import load_oracle as _load
    return _load(device=device)
