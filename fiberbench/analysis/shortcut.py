"""The shortcut audit: does a classifier read the object, or a cue that merely came with it?

A classifier trained where a nuisance cue goes with the label (the fiber paper's
Section 4.4, coloured MNIST with ERM vs IRM) may learn the cue. Its fibers show
it: the samples keep the cue and let the real object change. On the shapes world
``toy/shortcut-resnet`` (trained on ``sample_factors(..., bias={"pair": ("shape",
"color"), "strength": 0.99})``, no augmentation) is such a model; ``toy/shape-resnet``
(colour resampled every step) is its honest twin.

Read-outs, all tidy frames:

- :func:`retention` — per reference and factor, the fraction of fiber samples
  whose factor equals the reference's, judged by the oracle or by CLIP (so the
  same statistic works on real models with a CLIP vocabulary);
  :func:`retention_summary` averages it per model with bootstrap CIs.
- :func:`intervention` — the ground truth: change one factor of a render, watch
  the features move (what ``toy.evaluate.eval_classifier`` calls ``logit_change``).
- :func:`label_agreement` — the paper's own read-out: how often the fiber samples'
  colour agrees with the colour that goes with the reference's label, against the
  same agreement under the prior (a colour-blind model's fibers match the prior;
  a model that encodes colour drags the agreement towards its references').
- :func:`retention_plot`, :func:`fiber_gallery` and :func:`describe` (a sentence).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .. import plots
from ..errors import ConfigError, InputError
from ..toy.evaluate import paired_values
from ..toy.vocab import TOY_VOCAB
from ..toy.world import CHIRAL, FACTORS, intervene, render, sample_factors
from .semantics import clip_labels, fiber_ids
from .stats import bootstrap_mean
from .toy_scores import ORACLE_GROUPS, oracle_labels

__all__ = ["judge_labels", "retention", "retention_summary", "intervention", "label_agreement",
           "retention_plot", "fiber_gallery", "describe", "FACTORS_JUDGED"]

# the factors both judges (oracle and toy CLIP vocabulary) name with the same labels
FACTORS_JUDGED = ("shape", "color", "background")


# --------------------------------------------------------------------------- judging

def _is_oracle(judge) -> bool:
    return hasattr(judge, "predict") and hasattr(judge, "net")


def _is_clip(judge) -> bool:
    return hasattr(judge, "embed_images") and hasattr(judge, "embed_texts")


def judge_labels(judge, images: torch.Tensor, factors: Sequence[str] = FACTORS_JUDGED,
                 vocab: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Label every image with ``judge``: one ``<factor>_label`` column per factor, and ``valid`` for the oracle.

    Args:
        judge: the toy oracle (``fiberbench.toy.load_oracle()``) or a
            :class:`~fiberbench.semantics.ClipModel` (zero-shot over ``vocab``).
        images: ``[N,3,H,W]`` in [0,1].
        factors: factor names (oracle) or vocabulary groups (CLIP).
        vocab: CLIP vocabulary ``{group: {label: [prompts]}}`` (default ``TOY_VOCAB``); ignored for the oracle.

    Returns:
        DataFrame with N rows: ``<factor>_label`` (strings) and ``valid`` (bool; all True for CLIP,
        which has no notion of validity).
    """
    factors = list(factors)
    if _is_oracle(judge):
        lab = oracle_labels(judge, images)
        missing = [f for f in factors if f"{f}_label" not in lab.columns]
        if missing:
            raise ConfigError(f"the oracle does not judge {missing}; it judges {ORACLE_GROUPS}")
        return lab[[f"{f}_label" for f in factors] + ["valid"]].reset_index(drop=True)
    if _is_clip(judge):
        vocab = TOY_VOCAB if vocab is None else vocab
        missing = [f for f in factors if f not in vocab]
        if missing:
            raise ConfigError(f"the CLIP vocabulary has no group(s) {missing}; groups: {list(vocab)}")
        lab = clip_labels(judge, images, {f: vocab[f] for f in factors})
        out = lab[[f"{f}_label" for f in factors]].reset_index(drop=True)
        out["valid"] = True
        return out
    raise InputError(f"judge must be the toy oracle or a ClipModel, got {type(judge).__name__}")


def _chance(factor: str, value, prior: pd.DataFrame | None, vocab) -> float:
    """Probability that a draw from the prior's label distribution equals ``value``."""
    if prior is not None:
        sel = prior[(prior["group"] == factor) & (prior["label"].astype(str) == str(value))]
        return float(sel["p"].sum())
    values = FACTORS.get(factor) if vocab is None or factor not in vocab else list(vocab[factor])
    return 1.0 / len(values) if isinstance(values, list) and values else float("nan")


def retention(result, judge, factors: Sequence[str] = FACTORS_JUDGED, *, vocab: Mapping[str, Any] | None = None,
              only_valid: bool = False, valid: Sequence[bool] | np.ndarray | None = None,
              reference_labels: pd.DataFrame | None = None, prior: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per reference and factor: the fraction of fiber samples whose factor equals the reference's.

    A model that *sees* a factor keeps it in its fibers (retention near 1); a model blind to it
    lets it vary as the prior does (retention near the chance level ``chance``).

    Args:
        result: a :class:`~fiberbench.sampling.FiberResult` (``images [B*n,3,H,W]``, reference-major).
        judge: the toy oracle or a :class:`~fiberbench.semantics.ClipModel` (see :func:`judge_labels`).
        factors: factors (oracle) / vocabulary groups (CLIP) to measure.
        vocab: CLIP vocabulary (default ``TOY_VOCAB``).
        only_valid: count only samples judged valid: by the oracle's own ``valid`` when the judge is the
            oracle, else by ``valid``. Off-world junk has no honest factor value.
        valid: per-sample validity ``[B*n]`` (e.g. from the oracle) used with ``only_valid``.
        reference_labels: the references' true values (a factor table, e.g. from
            ``fiberbench.toy.references``); default: the judge's labels of the references.
        prior: ``group, label, p`` label distribution for the chance level (e.g.
            ``semantics.label_distribution`` of unguided prior samples); default: uniform over the
            factor's values.

    Returns:
        Tidy frame, one row per (reference, factor): ``run_id, extractor, judge, reference,
        reference_id, factor, reference_value, n`` (samples counted), ``n_total``, ``retained``
        (count), ``retention`` in [0,1] (NaN when ``n == 0``) and ``chance`` in [0,1].
    """
    factors = list(factors)
    if not factors:
        raise ConfigError("retention needs at least one factor")
    ids = fiber_ids(result)
    m, n = result.images.shape[0], result.n
    b = result.reference.shape[0]
    labels = judge_labels(judge, result.images, factors, vocab)
    if reference_labels is None:
        ref_lab = judge_labels(judge, result.reference, factors, vocab)
        ref_vals = {f: ref_lab[f"{f}_label"].astype(str).to_numpy(object) for f in factors}
    else:
        if len(reference_labels) != b:
            raise InputError(f"reference_labels has {len(reference_labels)} rows for {b} references")
        missing = [f for f in factors if f not in reference_labels.columns]
        if missing:
            raise InputError(f"reference_labels lacks column(s) {missing}")
        ref_vals = {f: reference_labels[f].astype(str).to_numpy(object) for f in factors}
    keep = np.ones(m, bool)
    if only_valid:
        if valid is not None:
            keep = np.asarray(valid, bool)
            if keep.shape != (m,):
                raise InputError(f"valid must hold one flag per sample ({m}), got shape {keep.shape}")
        elif _is_oracle(judge):
            keep = labels["valid"].to_numpy(bool)
        else:
            raise ConfigError("only_valid with a CLIP judge needs valid= (e.g. the oracle's validity per sample)")
    judge_name = "oracle" if _is_oracle(judge) else getattr(judge, "spec", type(judge).__name__)
    rows = []
    for i in range(b):
        sl = slice(i * n, (i + 1) * n)
        k = keep[sl]
        for f in factors:
            lab = labels[f"{f}_label"].to_numpy(object)[sl]
            ref = ref_vals[f][i]
            hits = np.array([str(v) == ref for v in lab], bool) & k
            cnt = int(k.sum())
            rows.append({"run_id": ids["run_id"].iloc[i * n], "extractor": ids["extractor"].iloc[i * n],
                         "judge": judge_name, "reference": i, "reference_id": ids["reference_id"].iloc[i * n],
                         "factor": f, "reference_value": ref, "n": cnt, "n_total": n, "retained": int(hits.sum()),
                         "retention": float(hits.sum() / cnt) if cnt else float("nan"),
                         "chance": _chance(f, ref, prior, vocab)})
    return pd.DataFrame(rows)


def retention_summary(frame: pd.DataFrame, by: Sequence[str] = ("extractor", "factor"), *, n_boot: int = 2000,
                      ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Mean retention per group with a bootstrap CI over references (each reference counts once).

    Args:
        frame: output of :func:`retention` (one or several concatenated).
        by: grouping columns.

    Returns:
        One row per group: the ``by`` columns, ``mean``, ``ci_low``, ``ci_high`` (percentile bootstrap
        of the mean over references, :func:`fiberbench.stats.bootstrap_mean`), ``chance`` (mean chance
        level), ``n_references`` (with at least one counted sample) and ``n_samples``.
    """
    by = list(by)
    need = by + ["retention", "chance", "n"]
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise InputError(f"retention_summary needs the output of retention(); missing {missing}")
    rows = []
    for key, g in frame.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        v = g["retention"].to_numpy(float)
        mean, lo, hi = bootstrap_mean(v, n_boot=n_boot, ci=ci, seed=seed)
        rows.append(list(key) + [mean, lo, hi, float(g["chance"].mean()), int(np.isfinite(v).sum()),
                                 int(g["n"].sum())])
    return pd.DataFrame(rows, columns=by + ["mean", "ci_low", "ci_high", "chance", "n_references", "n_samples"])


# --------------------------------------------------------------------------- ground truth

def intervention(extractor, factors: Sequence[str] = FACTORS_JUDGED, n: int = 500, seed: int = 0,
                 bias: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The true sensitivity of ``extractor`` to each factor, by intervention on fresh renders.

    ``change = mean ||f(x') - f(x)|| / mean ||f(x) - f(x_other)||`` where ``x'`` is ``x`` with only that
    factor changed (``toy.intervene``) and ``x_other`` an independent render: 0 = blind to the factor,
    about 1 = it moves the features as much as a new image does. Same definition as
    ``toy.evaluate.eval_classifier``'s ``logit_change_<factor>``.

    Args:
        extractor: images ``[N,3,32,32]`` in [0,1] -> features ``[N,D]``.
        n: renders per factor; ``seed``: their seed; ``bias``: draw ``x`` from a biased world
            (``sample_factors``' ``bias``), e.g. to measure on the training distribution.

    Returns:
        Tidy frame: ``extractor, factor, change`` (>= 0), ``n``.
    """
    bad = [f for f in factors if f not in FACTORS]
    if bad:
        raise ConfigError(f"unknown factor(s) {bad}; factors: {list(FACTORS)}")

    def feats(x):
        with torch.no_grad():
            return torch.cat([extractor(c).flatten(1) for c in x.split(256)]).float()

    f = sample_factors(n, seed, bias=bias)
    h = feats(render(f))
    base = (h - feats(render(sample_factors(n, seed + 1, bias=bias)))).norm(dim=-1).mean()
    rows = []
    for k, name in enumerate(factors):
        g = f[f["shape"].isin(CHIRAL)] if name == "mirror" else f
        hi = feats(render(intervene(g, name, seed=seed + 2 + k)))
        change = (hi - h[torch.as_tensor(np.array(g.index), dtype=torch.long)]).norm(dim=-1).mean() / base
        rows.append({"extractor": getattr(extractor, "spec", type(extractor).__name__), "factor": name,
                     "change": float(change), "n": len(g)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the paper's read-out

def label_agreement(result, judge, *, reference_labels: pd.DataFrame | None = None,
                    prior_images: torch.Tensor | None = None, pair: tuple[str, str] = ("shape", "color"),
                    only_valid: bool = False, vocab: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The fiber paper's causal-MNIST read-out: cue-label agreement of fiber samples vs the prior's.

    The paper samples fibers of references drawn from an environment where colour and label rarely
    agree, with a prior trained where they mostly agree. A colour-blind classifier's fibers take their
    colour from the prior, so their colour-label agreement matches the prior's; a classifier that
    encodes colour keeps the references' colour, so the agreement moves towards the references'.

    Here the label is the reference's ``pair[0]`` (shape) and the cue is ``pair[1]`` (colour), paired
    as in ``sample_factors``' bias (circle-red, square-green, triangle-blue, arrow-yellow). A sample
    *agrees* when its cue is the one paired with the reference's label.

    Args:
        result: a FiberResult; judge: oracle or ClipModel (see :func:`judge_labels`).
        reference_labels: the references' true factors (default: the judge's labels of them).
        prior_images: ``[M,3,H,W]`` in [0,1] drawn from the prior (unguided samples, or fresh renders
            of the world the prior was trained on); default: none (``prior_agreement`` is NaN).
        only_valid: count only samples the oracle judges valid (oracle judge only).

    Returns:
        One row per reference: ``extractor, reference, label, reference_cue, reference_agrees``
        (0/1: the query environment), ``n``, ``fiber_agreement`` in [0,1] and ``prior_agreement``
        (agreement of prior samples judged to carry the same label).
    """
    first, second = pair
    ids = fiber_ids(result)
    n, b = result.n, result.reference.shape[0]
    lab = judge_labels(judge, result.images, [first, second], vocab)
    if reference_labels is None:
        rl = judge_labels(judge, result.reference, [first, second], vocab)
        ref_first, ref_second = rl[f"{first}_label"].astype(str).tolist(), rl[f"{second}_label"].astype(str).tolist()
    else:
        ref_first = reference_labels[first].astype(str).tolist()
        ref_second = reference_labels[second].astype(str).tolist()
    target_cue = paired_values(first, second, ref_first)
    keep = lab["valid"].to_numpy(bool) if only_valid else np.ones(len(lab), bool)
    prior_by_label: dict[str, float] = {}
    if prior_images is not None:
        pl = judge_labels(judge, prior_images, [first, second], vocab)
        if only_valid:
            pl = pl[pl["valid"].to_numpy(bool)]
        for v in set(ref_first):
            sub = pl[pl[f"{first}_label"].astype(str) == v]
            cue = paired_values(first, second, [v])[0]
            prior_by_label[v] = float((sub[f"{second}_label"].astype(str) == cue).mean()) if len(sub) else float("nan")
    rows = []
    cues = lab[f"{second}_label"].astype(str).to_numpy(object)
    for i in range(b):
        sl = slice(i * n, (i + 1) * n)
        k = keep[sl]
        agree = (cues[sl] == target_cue[i]) & k
        rows.append({"extractor": ids["extractor"].iloc[i * n], "reference": i, "label": ref_first[i],
                     "reference_cue": ref_second[i], "reference_agrees": float(ref_second[i] == target_cue[i]),
                     "n": int(k.sum()), "fiber_agreement": float(agree.sum() / k.sum()) if k.sum() else float("nan"),
                     "prior_agreement": prior_by_label.get(ref_first[i], float("nan"))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- pictures and words

def retention_plot(summary: pd.DataFrame, *, x: str = "factor", color: str = "extractor",
                   title: str = "retention inside fibers (95% CI over references)", save_to=None,
                   **save_kw):
    """Retention per factor, side by side per model, with CIs and each factor's chance level (dashes).

    ``summary``: output of :func:`retention_summary` (``factor, extractor, mean, ci_low, ci_high, chance``).
    Returns a plotly figure (``save_to``: path(s) for PNG/SVG/PDF export, see :mod:`fiberbench.plots`).
    """
    plots.require_columns(summary, [x, color, "mean", "ci_low", "ci_high", "chance"], "retention_plot")
    fig = plots.bars(summary, x, "mean", color=color, lo="ci_low", hi="ci_high", title=title,
                     y_title="retention", y_range=(0, 1.05))
    chance = summary.groupby(x, sort=False)["chance"].mean()
    fig.add_trace(plots.go.Scatter(x=[str(c) for c in chance.index], y=chance.to_numpy(float), mode="markers",
                             marker=dict(symbol="line-ew-open", size=40, color="black", line=dict(width=2)),
                             name="chance", hovertemplate="chance %{y:.3f}<extra></extra>"))
    fig.update_layout(width=max(fig.layout.width or 0, 620), height=400,
                      legend=dict(orientation="h", yanchor="top", y=-0.15, xanchor="left", x=0))
    return plots.finish(fig, save_to, **save_kw)


def fiber_gallery(results: Mapping[str, Any], reference: int = 0, *, max_samples: int = 8,
                  labels: Mapping[str, pd.DataFrame] | None = None, title: str | None = None, save_to=None,
                  **save_kw):
    """One row per model: the reference (framed red), then its fiber samples, for the same reference.

    Args:
        results: ``{model name: FiberResult}``; all must share the reference images.
        reference: which reference to show.
        labels: optional ``{model name: judge_labels(...) of that result's images}`` for captions
            (``"<color> <shape>"``, ``"junk"`` when not valid).
    """
    if not results:
        raise InputError("fiber_gallery needs at least one FiberResult")
    images, caps = [], []
    ncols = max_samples + 1
    for name, res in results.items():
        if reference >= res.reference.shape[0]:
            raise InputError(f"{name}: reference {reference} out of range ({res.reference.shape[0]} references)")
        fib = res.fiber(reference)[:max_samples]
        images.append(res.reference[reference])
        caps.append(f"<b>{name}</b>")
        lab = None if labels is None else labels.get(name)
        for j in range(ncols - 1):
            if j < len(fib):
                images.append(fib[j])
                if lab is not None:
                    row = lab.iloc[reference * res.n + j]
                    ok = bool(row.get("valid", True))
                    caps.append(f"{row.get('color_label', '')} {row.get('shape_label', '')}" if ok else "junk")
                else:
                    caps.append("")
            else:
                images.append(torch.ones_like(res.reference[reference]))
                caps.append("")
    outline = ["#d62728" if k % ncols == 0 else None for k in range(len(images))]
    return plots.image_grid(torch.stack([torch.as_tensor(i).float() for i in images]), caps, ncols=ncols,
                            title=title, outline=outline, save_to=save_to, **save_kw)


def describe(summary: pd.DataFrame, extractor: str, *, keep_at: float = 0.5) -> str:
    """One sentence per model from a :func:`retention_summary`: which factors it keeps and which it ignores.

    A factor is *kept* when its retention covers at least ``keep_at`` of the way from chance to 1
    (``(mean - chance) / (1 - chance) >= keep_at``), *ignored* otherwise.
    """
    sub = summary[summary["extractor"] == extractor]
    if sub.empty:
        raise InputError(f"no rows for extractor {extractor!r}; extractors: {sorted(summary['extractor'].unique())}")
    lift = (sub["mean"] - sub["chance"]) / (1 - sub["chance"]).clip(lower=1e-9)
    kept = sub.loc[lift >= keep_at, "factor"].tolist()
    ignored = sub.loc[lift < keep_at, "factor"].tolist()
    words = []
    if kept:
        words.append(f"keeps {' and '.join(kept)}")
    if ignored:
        words.append(f"ignores {' and '.join(ignored)}")
    return f"{extractor} " + ", ".join(words)
