"""Head vs backbone: the invariance a classifier's linear head adds to what its pre-logits already ignore.

For one classifier, sample the fibers of ``@logits`` and of ``@pre_logits`` through the same references (same
seeds) and measure how often each factor (toy oracle) or concept group (CLIP vocabulary) changes inside them.
``logits = W h + b`` is a function of the pre-logits ``h``, so every ``@pre_logits`` fiber lies inside the
``@logits`` fiber of the same reference: a factor can only change *more* often in the ``@logits`` fibers. The
difference is what the head's null space adds: content the backbone still carries and the head discards.

On the shapes world the answer is known: :func:`head_invariance_truth` intervenes on one factor of fresh
renders and measures how far the features move at both layers (:func:`~fiberbench.analysis.shortcut.intervention`,
relative to an independent render); :func:`sign_agreement` compares the signs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .. import plots
from ..errors import ConfigError, InputError
from ..models import load_extractor
from ..sampling import FiberResult, sample_fiber
from .nullspace import predicted_classes
from .shortcut import FACTORS_JUDGED, intervention, retention
from .stats import bootstrap_mean

__all__ = ["LAYERS", "HeadBackbone", "layer_pair", "head_vs_backbone", "change_table", "head_invariance_truth",
           "sign_agreement", "head_backbone_plot"]

LAYERS = ("logits", "pre_logits")
ALL = "all"  # the class label of rows pooled over every class


def layer_pair(extractor) -> dict[str, Any]:
    """``{"logits": ..., "pre_logits": ...}`` from a spec string (any ``@layer`` suffix is replaced) or a pair
    of loaded extractors ``(at logits, at pre_logits)``."""
    if isinstance(extractor, str):
        base = extractor.rsplit("@", 1)[0] if "@" in extractor else extractor
        return {layer: load_extractor(f"{base}@{layer}") for layer in LAYERS}
    if isinstance(extractor, (tuple, list)) and len(extractor) == 2:
        pair = dict(zip(LAYERS, extractor))
        for layer, ext in pair.items():
            if getattr(ext, "layer", layer) != layer:
                raise ConfigError(f"the pair must be (extractor @logits, extractor @pre_logits); "
                                  f"got {getattr(ext, 'spec', type(ext).__name__)} in the {layer} slot")
        return pair
    raise ConfigError(f"head_vs_backbone needs a spec string or a pair (logits, pre_logits) of extractors, got "
                      f"{type(extractor).__name__}")


@dataclass
class HeadBackbone:
    """What :func:`head_vs_backbone` measured.

    Attributes:
        changes: one row per (layer, reference, factor): ``layer, extractor, reference, class, factor,
            reference_value, n, change`` (fraction of the fiber's samples whose factor differs from the
            reference's, in [0,1]) and ``chance`` (the same fraction under independent draws of the factor).
        table: per class (and ``"all"``) and factor, long format: ``class, factor, statistic`` (``logits``,
            ``pre_logits``, ``difference`` = logits - pre_logits, paired by reference), ``mean, ci_low,
            ci_high`` (bootstrap over references), ``n_references``.
        results: the two :class:`~fiberbench.sampling.FiberResult` (``{"logits": ..., "pre_logits": ...}``).
    """

    changes: pd.DataFrame
    table: pd.DataFrame
    results: dict[str, FiberResult]
    info: dict[str, Any] = field(default_factory=dict)

    def plot(self, **kw):
        """:func:`head_backbone_plot` of :attr:`table`."""
        return head_backbone_plot(self.table, **kw)


def reference_classes(extractor, references: torch.Tensor, classes: Sequence[Any] | None) -> list[str]:
    """The class of each reference: ``classes`` if given, else the ``@logits`` extractor's prediction."""
    if classes is not None:
        if len(classes) != len(references):
            raise InputError(f"classes must give one class per reference ({len(references)}), got {len(classes)}")
        return [str(c) for c in classes]
    with torch.no_grad():
        return predicted_classes(extractor, extractor(references).float())


def head_vs_backbone(prior, extractor, references: torch.Tensor, judge, *, factors: Sequence[str] = FACTORS_JUDGED,
                     reference_labels: pd.DataFrame | None = None, classes: Sequence[Any] | None = None,
                     vocab: Mapping[str, Any] | None = None, n: int = 4, seed: int = 0, n_boot: int = 1000,
                     progress: bool = False, **sampling: Any) -> HeadBackbone:
    """Change rates per factor in fibers of ``@logits`` and of ``@pre_logits`` of one classifier, per class.

    Args:
        prior: a loaded Prior (or spec).
        extractor: a spec (``"toy/shape-resnet"``; the layer suffix is replaced) or a pair of extractors
            ``(at logits, at pre_logits)``.
        references: ``[B,3,H,W]`` in [0,1].
        judge: the toy oracle (factors) or a ClipModel (vocabulary groups; ``vocab``, default ``TOY_VOCAB``):
            see :func:`~fiberbench.analysis.shortcut.retention`.
        reference_labels: the references' true factor values (default: the judge's labels of the references).
        classes: a class per reference (default: the classifier's prediction).
        n: samples per reference and layer; seed: shared by both layers (paired draws).
        **sampling: :func:`~fiberbench.sampling.sample_fiber` options (``steps``, ``preset``, ``method``, …).

    Returns:
        :class:`HeadBackbone` with the tidy per-reference ``changes`` and the per-class ``table``.
    """
    pair = layer_pair(extractor)
    cls = reference_classes(pair["logits"], references, classes)
    results, frames = {}, []
    for layer, ext in pair.items():
        res = sample_fiber(prior, ext, references, n=n, seed=seed, progress=progress, **sampling)
        results[layer] = res
        ret = retention(res, judge, factors, vocab=vocab, reference_labels=reference_labels)
        ret["change"] = 1.0 - ret["retention"]
        ret["chance"] = 1.0 - ret["chance"]
        ret["layer"] = layer
        ret["class"] = [cls[i] for i in ret["reference"]]
        frames.append(ret[["layer", "extractor", "reference", "class", "factor", "reference_value", "n", "change",
                           "chance"]])
    changes = pd.concat(frames, ignore_index=True)
    specs = {k: getattr(v, "spec", None) for k, v in pair.items()}
    return HeadBackbone(changes=changes, table=change_table(changes, n_boot=n_boot, seed=seed), results=results,
                        info={"n": n, "seed": seed, "extractors": specs})


def change_table(changes: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per class (and pooled, class ``"all"``) and factor: mean change rate at each layer and their paired
    difference (logits - pre_logits) with percentile bootstrap CIs over references."""
    wide = changes.pivot_table(index=["reference", "class", "factor"], columns="layer", values="change").reset_index()
    missing = [layer for layer in LAYERS if layer not in wide.columns]
    if missing:
        raise InputError(f"change_table needs both layers; missing {missing}")
    wide["difference"] = wide["logits"] - wide["pre_logits"]
    pooled = wide.assign(**{"class": ALL})
    rows = []
    for (c, f), g in pd.concat([wide, pooled]).groupby(["class", "factor"], sort=True):
        for stat in ("logits", "pre_logits", "difference"):
            mean, lo, hi = bootstrap_mean(g[stat].to_numpy(float), n_boot=n_boot, seed=seed)
            rows.append((c, f, stat, mean, lo, hi, int(g[stat].notna().sum())))
    return pd.DataFrame(rows, columns=["class", "factor", "statistic", "mean", "ci_low", "ci_high", "n_references"])


def head_invariance_truth(extractor, factors: Sequence[str] = FACTORS_JUDGED, n: int = 500,
                          seed: int = 0) -> pd.DataFrame:
    """The ground truth on the shapes world: interventions on one factor measured at both layers.

    ``change_<layer>`` is :func:`~fiberbench.analysis.shortcut.intervention`'s ``E||f(x') - f(x)|| / E||f(x)
    - f(x_other)||`` (0: blind to the factor, ~1: as sensitive as to a new image), so the two layers are on
    one scale; ``invariance_<layer> = clip(1 - change, 0, 1)`` as the invariance benchmark's truth (a change
    above 1, e.g. shape moving the logits more than a random image does, is no less invariance than 1).
    ``head_added = invariance_logits - invariance_pre_logits``: > 0 where the head discards variation of the
    factor that the pre-logits carry (fibers of ``@logits`` should change it more often).

    Returns:
        One row per factor: ``factor, change_logits, change_pre_logits, invariance_logits,
        invariance_pre_logits, head_added, n``.
    """
    pair = layer_pair(extractor)
    per = {layer: intervention(ext, factors, n=n, seed=seed).set_index("factor") for layer, ext in pair.items()}
    out = pd.DataFrame({"factor": list(factors),
                        "change_logits": [float(per["logits"].loc[f, "change"]) for f in factors],
                        "change_pre_logits": [float(per["pre_logits"].loc[f, "change"]) for f in factors],
                        "n": [int(per["logits"].loc[f, "n"]) for f in factors]})
    for layer in LAYERS:
        out[f"invariance_{layer}"] = (1.0 - out[f"change_{layer}"]).clip(0.0, 1.0)
    out["head_added"] = out["invariance_logits"] - out["invariance_pre_logits"]
    return out[["factor", "change_logits", "change_pre_logits", "invariance_logits", "invariance_pre_logits",
                "head_added", "n"]]


def sign_agreement(table: pd.DataFrame, truth: pd.DataFrame, *, cls: str = ALL, margin: float = 0.1) -> pd.DataFrame:
    """Per factor: does the fibers' difference (logits - pre_logits change rate) have the sign of the truth?

    A factor is ``decisive`` when the truth's ``head_added`` exceeds ``margin`` in size: below it the two
    layers are about equally invariant (toy shape-resnet: colour 0.97 vs 0.91, where fiber change rates sit at
    chance at both layers and no sample size settles a sign). ``agrees`` compares ``sign(difference)`` with
    ``sign(head_added)`` for decisive factors and, for the others, says the fibers found no clear difference
    either (their CI holds 0). ``ci_excludes_zero`` says whether the fibers' bootstrap CI settles the sign.

    Returns:
        One row per factor: ``factor, difference, ci_low, ci_high, head_added, decisive, agrees,
        ci_excludes_zero``.
    """
    if not margin >= 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    d = table[(table["class"] == cls) & (table["statistic"] == "difference")].set_index("factor")
    t = truth.set_index("factor")
    rows = []
    for f in [f for f in t.index if f in d.index]:
        diff, lo, hi = (float(d.loc[f, k]) for k in ("mean", "ci_low", "ci_high"))
        added = float(t.loc[f, "head_added"])
        decisive, settled = abs(added) > margin, bool(lo > 0 or hi < 0)
        agrees = bool(np.sign(diff) == np.sign(added) != 0) if decisive else not settled
        rows.append((f, diff, lo, hi, added, decisive, agrees, settled))
    return pd.DataFrame(rows, columns=["factor", "difference", "ci_low", "ci_high", "head_added", "decisive",
                                       "agrees", "ci_excludes_zero"])


def head_backbone_plot(table: pd.DataFrame, *, title: str | None = None, save_to=None, **save_kw):
    """Bars per factor, one panel per class: change rate in fibers of ``@logits``, of ``@pre_logits`` and their
    difference, with 95% CIs (:func:`~fiberbench.plots.bars`)."""
    return plots.bars(table, "factor", "mean", color="statistic", facet="class", lo="ci_low", hi="ci_high",
                      title=title or "change inside fibers: logits vs pre-logits (difference = what the head adds)",
                      y_title="change rate", save_to=save_to, **save_kw)
