"""CLIP space: embed images and texts, and say in words what changed inside a fiber."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from ..models.clip import ClipModel
from ..toy.vocab import TOY_VOCAB, Vocabulary

# --------------------------------------------------------------------------- vocabularies

TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "a {}."]


def make_vocab(concepts, templates: list[str] | None = None, group: str = "concept") -> Vocabulary:
    """An open vocabulary from plain concepts: ``["a dog", "a cat"]`` or ``{"animal": ["dog", "cat"]}``.

    Each concept is expanded with ``templates`` (open_clip's zero-shot style,
    default :data:`TEMPLATES`) and the prompt embeddings are averaged.
    """
    templates = templates or TEMPLATES
    if isinstance(concepts, dict):
        return {g: make_vocab(c, templates, g)[g] for g, c in concepts.items()}
    if isinstance(concepts, str) or not concepts:
        raise ConfigError(f"concepts must be a non-empty list of strings (or a dict of lists), got {concepts!r}")
    return {group: {c: [t.format(c) for t in templates] for c in concepts}}


def class_embeddings(clip: ClipModel, labels: dict[str, list[str]]) -> torch.Tensor:
    """``[K,D]`` unit-norm class embeddings: the mean of each label's prompt embeddings, renormalised."""
    embs = [F.normalize(clip.embed_texts(list(prompts)).mean(0), dim=-1) for prompts in labels.values()]
    return torch.stack(embs)


def zero_shot(clip: ClipModel, images: torch.Tensor, labels: dict[str, list[str]] | list[str],
              image_embeddings: torch.Tensor | None = None, temperature: float | None = None):
    """Zero-shot classification of ``images`` ([N,3,H,W] in [0,1]) among ``labels``.

    Returns a DataFrame with ``label`` (argmax), ``prob`` (its softmax probability at the
    model's logit scale) and one ``p_<label>`` column per label.
    """
    if isinstance(labels, (list, tuple)):
        labels = make_vocab(list(labels))["concept"]
    cls = class_embeddings(clip, labels)
    img = image_embeddings if image_embeddings is not None else clip.embed_images(images)
    scale = temperature or float(clip.model.logit_scale.exp()) if hasattr(clip.model, "logit_scale") else 100.0
    probs = (scale * img.to(cls.device) @ cls.T).softmax(-1).cpu()
    names = list(labels)
    idx = probs.argmax(-1)
    df = pd.DataFrame({"label": [names[i] for i in idx.tolist()], "prob": probs.max(-1).values.numpy()})
    for j, nm in enumerate(names):
        df[f"p_{nm}"] = probs[:, j].numpy()
    return df


# --------------------------------------------------------------------------- scoring fibers
#
#
# Column names are a contract (widgets and the results store read them):
#   per sample  : run_id, extractor, method, reference, reference_id, class, sample,
#                 clip_angle, clip_cosine, <group>_label, <group>_prob,
#                 <group>_ref_label, <group>_changed
#   per fiber   : run_id, extractor, method, reference, reference_id, class, group, n,
#                 change_rate, entropy, prior_entropy, expected_entropy, entropy_ratio

def angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in degrees in [0, 180] between the last-dimension vectors of ``a`` and ``b`` (broadcast)."""
    # 2·atan2(|â - b̂|, |â + b̂|) instead of arccos(cos): exact at 0 and accurate for tiny angles
    # (arccos of 1 - 1e-16 is already 1e-6 degrees off)
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    a, b = torch.broadcast_tensors(F.normalize(a, dim=-1, eps=1e-300), F.normalize(b, dim=-1, eps=1e-300))
    return torch.rad2deg(2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1)))


def clip_labels(clip: ClipModel, images: torch.Tensor | None = None, vocab: Vocabulary | None = None, *,
                image_embeddings: torch.Tensor | None = None) -> pd.DataFrame:
    """Zero-shot label per vocabulary group: columns ``<group>_label`` and ``<group>_prob``, one row per image.

    ``images``: ``[N,3,H,W]`` in [0,1] (or pass ``image_embeddings [N,D]``).
    """
    vocab = TOY_VOCAB if vocab is None else vocab
    check_vocab(vocab)
    img = image_embeddings if image_embeddings is not None else clip.embed_images(images)
    out = {}
    for group, labels in vocab.items():
        zs = zero_shot(clip, None, labels, image_embeddings=img)
        out[f"{group}_label"] = zs["label"].to_numpy()
        out[f"{group}_prob"] = zs["prob"].to_numpy()
    return pd.DataFrame(out)


def check_vocab(vocab) -> None:
    """``ConfigError`` unless ``vocab`` is ``{group: {label: [prompts]}}`` with >= 2 labels a group."""
    if not isinstance(vocab, dict) or not vocab:
        raise ConfigError(f"a vocabulary is a non-empty dict group -> {{label: [prompts]}}; got {type(vocab).__name__}"
                          " (build one with make_vocab)")
    for g, labels in vocab.items():
        if not isinstance(labels, dict) or len(labels) < 2:
            raise ConfigError(f"vocabulary group {g!r} needs at least two labels with prompts, got {labels!r}")


def fiber_ids(result) -> pd.DataFrame:
    """Identity columns of a FiberResult's samples: run_id, extractor, method, reference, reference_id, sample."""
    m, n = result.images.shape[0], result.n
    b = result.reference.shape[0]
    if m != b * n:
        raise InputError(f"FiberResult has {m} samples for {b} references x n={n}")
    ids = result.reference_ids or [str(i) for i in range(b)]
    c = result.config
    return pd.DataFrame({"run_id": c.get("run_id"), "extractor": c.get("extractor"), "method": c.get("method"),
                         "reference": np.repeat(np.arange(b), n), "reference_id": np.repeat(np.asarray(ids, object), n),
                         "sample": np.tile(np.arange(n), b)})


def with_changes(ids: pd.DataFrame, labels: pd.DataFrame, ref_labels: pd.DataFrame, groups: Sequence[str],
                 classes: Sequence[str] | None, n: int) -> pd.DataFrame:
    """``ids`` plus ``class`` and, per group, the sample's label, its probability, the reference's label and
    whether they differ (``<group>_label``, ``_prob``, ``_ref_label``, ``_changed``)."""
    df = ids.copy()
    b = len(ref_labels)
    if classes is not None:
        if len(classes) != b:
            raise InputError(f"classes must give one class per reference ({b}), got {len(classes)}")
        df.insert(df.columns.get_loc("sample"), "class", np.repeat(np.asarray([str(c) for c in classes], object), n))
    else:
        df.insert(df.columns.get_loc("sample"), "class", "all")
    for g in groups:
        lab = labels[f"{g}_label"].to_numpy(object)
        ref = np.repeat(ref_labels[f"{g}_label"].to_numpy(object), n)
        df[f"{g}_label"] = lab
        df[f"{g}_prob"] = labels[f"{g}_prob"].to_numpy(float)
        df[f"{g}_ref_label"] = ref
        known = pd.notna(lab) & pd.notna(ref)
        changed = pd.array([bool(a != r) if k else pd.NA for a, r, k in zip(lab, ref, known)], dtype="boolean")
        df[f"{g}_changed"] = changed
    return df


def score_fiber(result, clip: ClipModel, vocab: Vocabulary | None = None, *,
                classes: Sequence[str] | None = None, batch_size: int = 256) -> pd.DataFrame:
    """Say in CLIP space what changed inside each fiber: one row per sample.

    Args:
        result: a :class:`~fiberbench.sampling.FiberResult` (``images [B*n,3,H,W]``, reference-major).
        clip: the scorer (``fiberbench.load_clip("toy/clip")`` or any open_clip model).
        vocab: attribute groups ``{group: {label: [prompts]}}`` (default :data:`TOY_VOCAB`;
            any list of concepts via :func:`make_vocab`).
        classes: optional class name per reference (goes into ``class``; default ``"all"``).

    Returns:
        DataFrame with ``run_id, extractor, method, reference, reference_id, class, sample``,
        ``clip_angle`` (degrees in [0,180] between the sample's and its reference's CLIP
        embeddings), ``clip_cosine``, and per group ``<group>_label``, ``<group>_prob``
        (zero-shot softmax probability), ``<group>_ref_label`` (the reference's label)
        and ``<group>_changed`` (label differs from the reference's). Merge with
        ``result.to_frame()`` on ``run_id, reference, sample``.
    """
    vocab = TOY_VOCAB if vocab is None else vocab
    check_vocab(vocab)
    ids = fiber_ids(result)
    emb = clip.embed_images(result.images, batch_size=batch_size)
    ref = clip.embed_images(result.reference, batch_size=batch_size)
    n = result.n
    ref_rep = ref.repeat_interleave(n, 0)
    cos = (emb.double() * ref_rep.double()).sum(-1).clamp(-1, 1)
    labels = clip_labels(clip, vocab=vocab, image_embeddings=emb)
    ref_labels = clip_labels(clip, vocab=vocab, image_embeddings=ref)
    df = with_changes(ids, labels, ref_labels, list(vocab), classes, n)
    df.insert(df.columns.get_loc("sample") + 1, "clip_angle", angle_deg(emb, ref_rep).cpu().numpy())
    df.insert(df.columns.get_loc("clip_angle") + 1, "clip_cosine", cos.cpu().numpy())
    return df


def label_distribution(labels: pd.DataFrame, groups: Sequence[str] | None = None) -> pd.DataFrame:
    """Empirical label distribution per group from a frame with ``<group>_label`` columns.

    Returns a long frame ``group, label, p`` (missing labels ignored).
    """
    groups = groups or [c[:-len("_label")] for c in labels.columns
                        if c.endswith("_label") and not c.endswith("_ref_label")]
    rows = []
    for g in groups:
        vc = labels[f"{g}_label"].dropna().value_counts(normalize=True)
        rows += [(g, str(k), float(v)) for k, v in vc.items()]
    return pd.DataFrame(rows, columns=["group", "label", "p"])


def label_prior(clip: ClipModel, images: torch.Tensor, vocab: Vocabulary | None = None) -> pd.DataFrame:
    """The distribution of each group's zero-shot label over ``images`` (``group, label, p``).

    What "entropy under the prior" is measured against in :func:`summarize_fiber`.
    Use *unguided samples of the prior* for a real prior (the fiber's own
    population); on the toy world, fresh renders (``fiberbench.toy.references``)
    are the distribution the toy priors were trained on and cost no sampling:
    :func:`toy_label_prior` does that.
    """
    return label_distribution(clip_labels(clip, images, vocab))


def entropy_bits(p: np.ndarray) -> float:
    """Shannon entropy in bits of a probability vector ``p`` (zero entries ignored; not renormalised)."""
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def expected_plugin_entropy(p: np.ndarray, n: int, n_mc: int = 4000, seed: int = 0) -> float:
    """E[plug-in entropy (bits) of ``n`` i.i.d. draws from ``p``] — the small-sample baseline.

    A fiber of 4 samples cannot show more than 2 bits of entropy even if its labels
    are drawn freely from six colours; comparing with this size-matched value (not
    with ``H(p)``) makes a ratio of 1 mean "as free as the prior".
    """
    p = np.asarray(p, float)
    p = p / p.sum()
    if n <= 1 or len(p) <= 1:
        return 0.0
    counts = np.random.default_rng(seed).multinomial(n, p, size=n_mc) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(counts > 0, counts * np.log2(counts), 0.0).sum(1)
    return float(h.mean())


def summarize_fiber(frame: pd.DataFrame, prior: "pd.DataFrame | None" = None, *,
                    vocab: Vocabulary | None = None, groups: Sequence[str] | None = None,
                    n_mc: int = 4000, seed: int = 0) -> pd.DataFrame:
    """Per fiber and attribute group: change rate and entropy relative to the prior — the invariance statistic.

    Args:
        frame: output of :func:`score_fiber` (or :func:`score_fiber_oracle`).
        prior: ``group, label, p`` (from :func:`label_prior` / :func:`toy_label_prior` /
            :func:`label_distribution`). ``None``: uniform over the vocabulary's labels
            (an upper bound on the prior's entropy), labels from ``vocab`` (default TOY_VOCAB).
        groups: groups to summarise (default: every ``<group>_changed`` column).

    Returns:
        Long frame, one row per (fiber, group): ``run_id, extractor, method, reference,
        reference_id, class, group, n`` (samples with a label), ``change_rate`` (fraction
        whose label differs from the reference's), ``entropy`` (plug-in, bits, of the
        labels inside the fiber), ``prior_entropy`` (``H(prior)``, bits),
        ``expected_entropy`` (expected plug-in entropy of ``n`` draws from the prior)
        and ``entropy_ratio = entropy / expected_entropy`` (≈1: the extractor is blind
        to the attribute; 0: the fiber keeps it fixed).
    """
    groups = list(groups) if groups is not None else [c[:-len("_changed")] for c in frame.columns
                                                      if c.endswith("_changed")]
    if not groups:
        raise InputError("frame has no <group>_changed columns: pass the output of score_fiber")
    if prior is None:
        vocab = TOY_VOCAB if vocab is None else vocab
        prior = pd.DataFrame([(g, lab, 1.0 / len(v)) for g, v in vocab.items() for lab in v],
                             columns=["group", "label", "p"])
    keys = [k for k in ("run_id", "extractor", "method", "reference", "reference_id", "class") if k in frame.columns]
    cache: dict[tuple[str, int], float] = {}
    rows = []
    for key, fib in frame.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        for g in groups:
            lab = fib[f"{g}_label"].dropna()
            n = len(lab)
            changed = fib[f"{g}_changed"].dropna().astype(float)
            p_prior = prior.loc[prior["group"] == g, "p"].to_numpy(float)
            if n == 0 or p_prior.size == 0:
                h = hp = he = float("nan")
            else:
                h = entropy_bits(lab.value_counts(normalize=True).to_numpy(float))
                hp = entropy_bits(p_prior / p_prior.sum())
                if (g, n) not in cache:
                    cache[(g, n)] = expected_plugin_entropy(p_prior, n, n_mc, seed)
                he = cache[(g, n)]
            ratio = h / he if he and he > 0 else float("nan")
            rows.append(list(key) + [g, n, float(changed.mean()) if len(changed) else float("nan"), h, hp, he, ratio])
    return pd.DataFrame(rows, columns=keys + ["group", "n", "change_rate", "entropy", "prior_entropy",
                                             "expected_entropy", "entropy_ratio"])


def change_rates(summary: pd.DataFrame, by: Sequence[str] = ("extractor", "group")) -> pd.DataFrame:
    """Mean change rate and entropy ratio per ``by`` (default: per extractor and attribute group)."""
    return summary.groupby(list(by), sort=True)[["change_rate", "entropy_ratio"]].mean().reset_index()


def change_rate_agreement(clip_frame: pd.DataFrame, oracle_frame: pd.DataFrame,
                          groups: Sequence[str] = ("shape", "color", "background", "size"),
                          by: Sequence[str] = ("extractor",), only_valid: bool = False) -> pd.DataFrame:
    """How well CLIP-based change rates rank the attribute groups like the oracle's ground truth.

    Args:
        clip_frame, oracle_frame: per-sample frames of the *same* fibers from
            :func:`score_fiber` and :func:`score_fiber_oracle`.
        groups: attribute groups present in both (mirror is left out by default: it is
            only defined on chiral shapes).
        only_valid: keep only samples the oracle judges valid (``oracle_frame["valid"]``):
            on junk samples both judges' labels are arbitrary.

    Returns:
        One row per ``by`` group and attribute: ``group``, ``clip_change_rate``,
        ``oracle_change_rate``, and ``spearman`` (rank correlation across the attribute
        groups, repeated on each row of that ``by`` group).
    """
    by = list(by)
    if only_valid:
        if len(clip_frame) != len(oracle_frame) or "valid" not in oracle_frame.columns:
            raise InputError("only_valid needs the oracle frame of the same samples (with a 'valid' column)")
        keep = oracle_frame["valid"].to_numpy(bool)
        clip_frame, oracle_frame = clip_frame[keep], oracle_frame[keep]
    rows = []
    for name, frame in (("clip", clip_frame), ("oracle", oracle_frame)):
        cols = [f"{g}_changed" for g in groups]
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise InputError(f"{name} frame lacks {missing}")
        m = frame[by + cols].copy()
        m[cols] = m[cols].astype("Float64")
        long = m.melt(id_vars=by, value_vars=cols, var_name="group", value_name="changed")
        long["group"] = long["group"].str[:-len("_changed")]
        rows.append(long.groupby(by + ["group"], sort=True)["changed"].mean().astype(float)
                    .rename(f"{name}_change_rate"))
    out = pd.concat(rows, axis=1).reset_index()
    out["spearman"] = np.nan
    for _, g in out.groupby(by):
        rho = g["clip_change_rate"].corr(g["oracle_change_rate"], method="spearman")
        out.loc[g.index, "spearman"] = rho
    return out
