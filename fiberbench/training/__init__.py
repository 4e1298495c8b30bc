"""Training code of the tiny toy models (``fiberbench train-toy``), and the card metrics they record.

One module per family (:mod:`.priors`, :mod:`.classifiers`, :mod:`.clip`, :mod:`.oracle`, and the trained
baseline in :mod:`.conditional`), sharing :mod:`.loop`; :mod:`.evaluate` measures a model against its bar
and writes the numbers into its card.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..toy.cards import TOY_NAMES
from .classifiers import CLASSIFIERS, ENCODERS, train_classifier, train_encoder
from .clip import train_clip
from .evaluate import measure, record
from .oracle import train_oracle
from .priors import DDPM_SAMPLING, PRIOR_RECIPES, train_prior, train_prior_recipe

__all__ = ["CLASSIFIERS", "DDPM_SAMPLING", "ENCODERS", "PRIOR_RECIPES", "measure", "record", "train_all",
           "train_classifier", "train_clip", "train_encoder", "train_oracle", "train_prior", "train_prior_recipe"]


def train_all(only: list[str] | None = None, quick: bool = False, minutes: float | None = None,
              log: Callable[[str], None] = print) -> None:
    """Train (and measure) the toy models; ``only`` restricts to some names.

    Order: the oracle first (it judges the priors), then classifiers, CLIP and the priors.
    ``quick`` runs a few steps into a temporary folder (a smoke test that never overwrites).
    """
    names = only or ["oracle", "shape-resnet", "color-vit", "clip", "prior-fm", "prior-ddpm", "shortcut-resnet",
                     "simclr-resnet"]
    unknown = set(names) - set(TOY_NAMES)
    if unknown:
        raise ConfigError(f"unknown toy model(s) {sorted(unknown)}; choose from {TOY_NAMES}")
    root = Path(tempfile.mkdtemp(prefix="fiberbench-quick-")) if quick else None
    for name in names:
        log(f"== {name}")
        if name == "oracle":
            train_oracle(steps=20 if quick else 2000, root=root, log=log)
        elif name in CLASSIFIERS:
            train_classifier(name, steps=20 if quick else CLASSIFIERS[name].get("steps", 1500),
                             bias=CLASSIFIERS[name].get("bias"), root=root, log=log)
        elif name in ENCODERS:
            train_encoder(name, steps=20 if quick else ENCODERS[name].get("steps", 600), root=root, log=log)
        elif name == "clip":
            train_clip(steps=20 if quick else 2500, root=root, log=log)
        elif name in ("prior-fm", "prior-ddpm") and minutes and not quick:  # a time budget instead of the recipe
            train_prior("fm" if name == "prior-fm" else "ddpm", minutes=minutes, root=root, log=log)
        elif name in ("prior-fm", "prior-ddpm"):
            train_prior_recipe(name, root=root, quick=quick, log=log)
        if not quick:
            log(f"   metrics: {record(name)}")
    if quick:
        log(f"quick run written to {root}")
