"""Pictures of SING's equivalent pairs: sample the fibers of ``@pre_logits`` at ``h`` and at ``h' = h - P_null h``.

SING (docs/design.md) says what a classifier's null space carries by *translating* feature vectors to CLIP
space: IS = ∠(T h, T h'), AS = ∠(T h, t_c) - ∠(T h', t_c). Fibers turn the feature pair into image sets:
images whose pre-logits are ``h``, and images whose pre-logits are ``h'``. Both sets have the logits of ``h``
(``W h' = W h`` exactly), their pre-logits differ by the null component, and CLIP embeds the *images*, so IS and
AS can be measured on pictures instead of on a translator's predictions:

- image-space IS = ∠(ē_h, ē_h'), with ē the mean unit CLIP embedding of a set of fiber samples (renormalised);
- image-space AS = ∠(ē_h, t_c) - ∠(ē_h', t_c);
- the same for null-space steered features ``h + n`` (:func:`~fiberbench.analysis.nullspace.steer`): images the
  classifier labels as ``x``, moved toward a text concept.

Sets drawn for the *same* target also differ (a fiber is a set, not a point): ``noise_floor`` is the mean
centroid angle over random relabelings of the two pooled sets (a permutation test, ``p_value``), the angle an
image-space IS must clear. All variants of an image use the same sample seeds (paired draws). With the toy
oracle as ``judge`` every sample also says whether it kept each factor of the image (``<factor>_kept``): the
ground truth of what the null component carried.

A feature vector need not belong to any image: ``h'`` of a ReLU backbone (pooled non-negative features) has
negative coordinates, so its fiber is empty and the sampler returns the images nearest to it;
``negative_part`` (``||min(t, 0)|| / ||t||``) in :attr:`EquivalentPictures.targets` says by how much a
target leaves the non-negative orthant, and ``equivalent="nonnegative"`` samples the equivalent that every
such backbone can reach in principle (same logits, non-negative, nearest to ``h'``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .. import plots
from ..errors import ConfigError, InputError
from ..sampling import FiberResult, sample_fiber
from .nullspace import (
    HeadDecomposition,
    Translator,
    concept_embeddings,
    fit_translator,
    head_decomposition,
    predicted_classes,
    steer,
)
from .semantics import angle_deg
from .shortcut import FACTORS_JUDGED, judge_labels
from .stats import bootstrap_mean

__all__ = ["EQUIVALENTS", "EquivalentPictures", "nonnegative_equivalent", "equivalent_targets",
           "visualize_equivalents", "equivalents_summary"]

EQUIVALENTS = ("principal", "nonnegative")


def nonnegative_equivalent(h: torch.Tensor, decomposition: HeadDecomposition, iters: int = 3000) -> torch.Tensor:
    """The non-negative features nearest to ``h' = h - P_null h`` among those with the logits of ``h``.

    ``argmin ||g - h'||`` over ``{g : W g = W h, g >= 0}`` (Dykstra's alternating projections; the set holds
    ``h`` itself when ``h >= 0``, as pooled ReLU features are). ``h [N,D]`` -> ``[N,D]`` float64; its
    logits equal ``h``'s to float64 rounding (asserted by the caller's ``assert_equivalent``).
    """
    hd = torch.as_tensor(h).double()
    principal = decomposition.equivalent(hd)
    x = principal.clone()
    p, q = torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(iters):
        y = x + p
        on_plane = y - decomposition.equivalent(y) + principal  # the affine set {g : V_rᵀ g = V_rᵀ h}
        p = y - on_plane
        z = on_plane + q
        x = z.clamp_min(0.0)
        q = z - x
    # the orthant step ends the loop: move back onto the plane exactly (tiny negatives are the price)
    return x - decomposition.equivalent(x) + principal


def equivalent_targets(h: torch.Tensor, decomposition: HeadDecomposition, *, equivalent: str = "principal",
                       steer_to: str | None = None, translator: Translator | None = None, clip=None,
                       norm_bound: float = 1.0, steer_steps: int = 200) -> dict[str, torch.Tensor]:
    """Feature targets with the logits of ``h [B,D]``: ``{"original": h, "principal": h', "steered": h + n}``.

    ``equivalent="principal"``: ``h' = h - P_null h`` (SING's); ``"nonnegative"``: :func:`nonnegative_equivalent`.
    ``steered`` (only with ``steer_to``): ``h`` plus the null-space perturbation of norm ``<= norm_bound ·
    ||P_null h||`` that points ``T(h + n)`` most toward the concept (needs ``translator`` and ``clip``).
    All float64 ``[B,D]``; the logits of every target are asserted equal to ``h``'s (relative 1e-5).
    """
    if equivalent not in EQUIVALENTS:
        raise ConfigError(f"equivalent must be one of {EQUIVALENTS}, got {equivalent!r}")
    hd = torch.as_tensor(h).double()
    out = {"original": hd,
           "principal": decomposition.equivalent(hd) if equivalent == "principal"
           else nonnegative_equivalent(hd, decomposition)}
    if steer_to is not None:
        if translator is None or clip is None:
            raise ConfigError("steering needs a translator and a clip model")
        out["steered"] = steer(hd, steer_to, norm_bound, decomposition=decomposition, translator=translator,
                               clip=clip, relative_to="null", steps=steer_steps).features.double()
    for name, t in out.items():
        decomposition.assert_equivalent(hd, t)
    return out


@dataclass
class EquivalentPictures:
    """What :func:`visualize_equivalents` measured.

    Attributes:
        samples: one row per sampled image (see :func:`sample_rows`).
        scores: one row per (image, variant, concept) with SING's IS/AS in feature space beside the same
            angles measured on the sampled images (see :func:`score_rows`).
        targets: one row per (image, variant): ``null_fraction``, ``negative_part``, ``logit_change`` of the
            target itself (float64 rounding) and ``target_norm``.
        results: the :class:`~fiberbench.sampling.FiberResult` of every variant.
        figure: the pictures (reference, then the samples of each variant, one row per image and variant).
        score_figure: feature-space vs image-space IS per image (bars).
    """

    samples: pd.DataFrame
    scores: pd.DataFrame
    targets: pd.DataFrame
    results: dict[str, FiberResult]
    figure: Any = None
    score_figure: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self, by: Sequence[str] = ("class",), n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """IS in feature space vs on images per group, with bootstrap CIs over images
        (:func:`equivalents_summary` of :attr:`scores`)."""
        return equivalents_summary(self.scores, by=by, n_boot=n_boot, seed=seed)


def centroid(embeddings: torch.Tensor) -> torch.Tensor:
    """Renormalised mean of unit embeddings ``[n,E]`` -> ``[E]`` (the direction a set of images shares)."""
    return F.normalize(embeddings.double().mean(0), dim=-1)


def relative_logit_change(decomposition: HeadDecomposition, feats: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row ``max|logits(feats) - logits(ref)| / max|logits(ref)|`` (float64, ``[M]``)."""
    return decomposition.logit_change(ref.double(), feats.double())


def sample_rows(results: dict[str, FiberResult], targets: dict[str, torch.Tensor], decomposition: HeadDecomposition,
                image_embed: dict[str, torch.Tensor], ref_embed: torch.Tensor, meta: pd.DataFrame) -> pd.DataFrame:
    """One row per sample: ``image, image_id, class, label, variant, sample, fiber_loss, target_distance,
    distance_to_original`` (both relative to the target's / ``h``'s norm), ``resolution`` (``(d(f, other) -
    d(f, own)) / d(own, other)`` in [-1, 1] with ``other`` = ``h'`` for ``original`` samples and ``h`` for the
    rest: +1 at its own target, -1 at the pair's other member, > 0 when the sample's pre-logits tell the pair
    apart), ``null_fraction``, ``logit_change`` (relative, against the logits of ``h``, which every target shares),
    ``same_class`` and ``clip_angle_to_image`` (degrees, CLIP angle between the sample and the image whose features
    made the target)."""
    frames = []
    h = targets["original"]
    for variant, res in results.items():
        n = res.n
        rows = torch.arange(len(res.images)) // n
        f = res.features.double()
        t, h_rep = targets[variant][rows], h[rows]
        lg, lh = decomposition.logits(f), decomposition.logits(h_rep)
        df = meta.iloc[rows.numpy()].reset_index(drop=True)
        df.insert(len(df.columns), "variant", variant)
        df["sample"] = (torch.arange(len(res.images)) % n).numpy()
        df["fiber_loss"] = res.feature_distance.numpy()
        df["target_distance"] = ((f - t).norm(dim=-1) / t.norm(dim=-1).clamp_min(1e-12)).numpy()
        df["distance_to_original"] = ((f - h_rep).norm(dim=-1) / h_rep.norm(dim=-1).clamp_min(1e-12)).numpy()
        other = targets["principal" if variant == "original" else "original"][rows]
        df["resolution"] = (((f - other).norm(dim=-1) - (f - t).norm(dim=-1))
                            / (t - other).norm(dim=-1).clamp_min(1e-12)).numpy()
        df["null_fraction"] = (decomposition.null_component(f).norm(dim=-1)
                               / f.norm(dim=-1).clamp_min(1e-12)).numpy()
        df["logit_change"] = relative_logit_change(decomposition, f, h_rep).numpy()
        df["same_class"] = (lg.argmax(-1) == lh.argmax(-1)).numpy()
        df["clip_angle_to_image"] = angle_deg(image_embed[variant], ref_embed[rows]).numpy()
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def set_angles(emb: dict[str, torch.Tensor], i: int, n: int, variant: str, permutations: int = 500,
               seed: int = 0) -> dict[str, float]:
    """Image-space IS of image ``i``'s ``variant`` set against its ``principal`` set (degrees), with a
    permutation test: ``noise_floor`` = mean centroid angle when the pooled ``2n`` embeddings are split at
    random, ``p_value`` = share of random splits at least as far apart (add-one); ``paired_angle`` = mean angle
    between samples drawn with the same seed."""
    e_v, e_p = emb[variant][i * n:(i + 1) * n], emb["principal"][i * n:(i + 1) * n]
    observed = float(angle_deg(centroid(e_v), centroid(e_p)))
    pooled = torch.cat([e_v, e_p]).double()
    g = torch.Generator().manual_seed(seed * 100_003 + i)
    perms = torch.stack([torch.randperm(2 * n, generator=g) for _ in range(permutations)])
    split = pooled[perms]  # [R,2n,E]
    null = angle_deg(F.normalize(split[:, :n].mean(1), dim=-1), F.normalize(split[:, n:].mean(1), dim=-1))
    return {"image_score_images": observed, "noise_floor": float(null.mean()),
            "p_value": float((1 + (null >= observed - 1e-9).sum()) / (1 + permutations)),
            "paired_angle": float(angle_deg(e_v, e_p).mean())}


def score_rows(targets: dict[str, torch.Tensor], emb: dict[str, torch.Tensor], feats: dict[str, torch.Tensor],
               translator: Translator, texts: torch.Tensor, concepts: list[str], n: int,
               meta: pd.DataFrame) -> pd.DataFrame:
    """One row per (image, variant other than ``principal``, concept): SING's angles in feature space
    (``image_score_features``, ``attribute_score_features``: translator on the targets), on the sampled
    images (``image_score_images``, ``attribute_score_images``: CLIP centroids of the sets), on the samples'
    own features (``image_score_sample_features``: translator on the set means), ``noise_floor``, ``p_value``
    and ``paired_angle`` (see :func:`set_angles`); angles in degrees."""
    rows = []
    tp = translator(targets["principal"])
    for variant in [v for v in targets if v != "principal"]:
        tv = translator(targets[variant])
        for i in range(len(meta)):
            sl = slice(i * n, (i + 1) * n)
            ev, ep = centroid(emb[variant][sl]), centroid(emb["principal"][sl])
            sv, sp = translator(feats[variant][sl].mean(0)), translator(feats["principal"][sl].mean(0))
            base = {**meta.iloc[i].to_dict(), "variant": variant,
                    "image_score_features": float(angle_deg(tv[i], tp[i])),
                    "image_score_sample_features": float(angle_deg(sv, sp)), **set_angles(emb, i, n, variant)}
            for k, c in enumerate(concepts):
                t = texts[k]
                rows.append({**base, "concept": c,
                             "attribute_score_features": float(angle_deg(tv[i], t) - angle_deg(tp[i], t)),
                             "attribute_score_images": float(angle_deg(ev, t) - angle_deg(ep, t))})
    return pd.DataFrame(rows)


def kept_columns(judge, results: dict[str, FiberResult], images: torch.Tensor,
                 factors: Sequence[str]) -> pd.DataFrame:
    """``<factor>_kept`` per sample (rows in :func:`sample_rows`' order): the judge's label of the sample equals
    its label of the image whose features made the target (NA where either label is missing)."""
    ref = judge_labels(judge, images, factors)
    frames = []
    for res in results.values():
        lab = judge_labels(judge, res.images, factors)
        rows = np.arange(len(res.images)) // res.n
        cols = {}
        for f in factors:
            a, b = lab[f"{f}_label"].to_numpy(object), ref[f"{f}_label"].to_numpy(object)[rows]
            cols[f"{f}_kept"] = pd.array([None if x is None or y is None else str(x) == str(y) for x, y in zip(a, b)],
                                         dtype="boolean")
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


def target_rows(targets: dict[str, torch.Tensor], decomposition: HeadDecomposition, meta: pd.DataFrame) -> pd.DataFrame:
    """One row per (image, variant): ``target_norm``, ``null_fraction``, ``negative_part`` (``||min(t,0)||/||t||``:
    how far the target is from every non-negative feature vector, relative) and its exact ``logit_change``."""
    frames = []
    h = targets["original"]
    for variant, t in targets.items():
        norm = t.norm(dim=-1).clamp_min(1e-12)
        df = meta.reset_index(drop=True).assign(
            variant=variant, target_norm=norm.numpy(),
            null_fraction=(decomposition.null_component(t).norm(dim=-1) / norm).numpy(),
            negative_part=(t.clamp_max(0).norm(dim=-1) / norm).numpy(),
            logit_change=decomposition.logit_change(h, t).numpy())
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def prepare_inputs(extractor, images: torch.Tensor, prior, labels, image_ids) -> tuple[torch.Tensor, pd.DataFrame,
                                                                                       torch.Tensor]:
    """Images at the prior's size, their pre-logits ``h [B,D]`` (the extractor must return them) and the
    per-image columns ``image, image_id, class, label``."""
    if getattr(extractor, "layer", None) != "pre_logits":
        raise ConfigError(f"visualize_equivalents samples fibers of the pre-logits: load the extractor with "
                          f"@pre_logits, got {getattr(extractor, 'spec', type(extractor).__name__)}")
    if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        raise InputError(f"expected images [B,3,H,W] in [0,1], got shape {tuple(images.shape)}")
    size = prior.image_size
    if tuple(images.shape[-2:]) != (size, size):  # as sample_fiber resizes its references
        images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False,
                               antialias=True).clamp(0, 1)
    device = next(prior.parameters()).device
    with torch.no_grad():
        h = extractor.to(device)(images.to(device)).float().cpu()
    b = len(images)
    ids = [str(v) for v in image_ids] if image_ids is not None else [str(i) for i in range(b)]
    if len(ids) != b or (labels is not None and len(labels) != b):
        raise InputError(f"image_ids/labels must have one entry per image ({b})")
    return images, h, pd.DataFrame({"image": np.arange(b), "image_id": ids})


def visualize_equivalents(prior, extractor, images: torch.Tensor, clip, *, translator: Translator | None = None,
                          fit_images: torch.Tensor | None = None, concepts: Sequence[str] = (),
                          steer_to: str | None = None, norm_bound: float = 1.0, equivalent: str = "principal",
                          n: int = 4, seed: int = 0, labels: Sequence[Any] | None = None,
                          image_ids: Sequence[Any] | None = None, decomposition: HeadDecomposition | None = None,
                          steer_steps: int = 200, judge=None, factors: Sequence[str] = FACTORS_JUDGED,
                          figure: bool = True, progress: bool = False, **sampling: Any) -> EquivalentPictures:
    """Sample fibers of ``@pre_logits`` at ``h``, at ``h'`` (and at steered ``h + n``): SING's pairs as pictures.

    Args:
        prior: a loaded :class:`~fiberbench.models.prior.Prior`.
        extractor: an Extractor loaded ``@pre_logits`` whose :meth:`classifier` is linear.
        images: ``[B,3,H,W]`` in [0,1], the images whose features make the targets.
        clip: the CLIP model that embeds the samples (and the concepts).
        translator: SING's ``T`` (:func:`~fiberbench.analysis.nullspace.fit_translator`); fitted on
            ``fit_images`` when ``None``.
        concepts: text concepts to measure AS toward (``steer_to`` is added when given).
        steer_to: a concept to steer the null space toward (adds the ``steered`` variant).
        norm_bound: steering bound, relative to each image's own ``||P_null h||``.
        equivalent: ``"principal"`` (SING's ``h'``) or ``"nonnegative"`` (see module docstring).
        n: samples per target; seed: the run seed, shared by every variant (paired draws).
        labels: a true label per image (kept in the frames); image_ids: names.
        judge: the toy oracle (or a ClipModel with the toy vocabulary): adds ``<factor>_kept`` per sample
            (the sample's factor equals the image's), see :func:`~fiberbench.analysis.shortcut.judge_labels`.
        **sampling: :func:`~fiberbench.sampling.sample_fiber` options (``method``, ``steps``, ``preset``,
            ``gamma``, …); ``loss`` defaults to ``"l2"`` (the logits follow the features' norm, which a cosine
            loss leaves free).

    Returns:
        :class:`EquivalentPictures`.
    """
    images, h, meta = prepare_inputs(extractor, images, prior, labels, image_ids)
    dec = decomposition or head_decomposition(extractor)
    if translator is None:
        if fit_images is None:
            raise ConfigError("visualize_equivalents needs a translator or fit_images to fit one")
        translator = fit_translator(extractor, clip, fit_images)
    meta["class"] = predicted_classes(extractor, dec.logits(h.double()))
    meta["label"] = [str(v) for v in labels] if labels is not None else meta["class"]
    targets = equivalent_targets(h, dec, equivalent=equivalent, steer_to=steer_to, translator=translator, clip=clip,
                                 norm_bound=norm_bound, steer_steps=steer_steps)
    sampling.setdefault("loss", "l2")
    results = {v: sample_fiber(prior, extractor, target_features=t.float(), n=n, seed=seed, progress=progress,
                               reference_ids=[f"{i}:{v}" for i in meta["image_id"]], **sampling)
               for v, t in targets.items()}
    concepts = list(dict.fromkeys(list(concepts) + ([steer_to] if steer_to else [])))
    texts = concept_embeddings(clip, concepts) if concepts else torch.zeros(0, 1, dtype=torch.float64)
    emb = {v: clip.embed_images(r.images).double().cpu() for v, r in results.items()}
    ref_embed = clip.embed_images(images).double().cpu()
    feats = {v: r.features.double() for v, r in results.items()}
    samples = sample_rows(results, targets, dec, emb, ref_embed, meta)
    if judge is not None:
        samples = pd.concat([samples, kept_columns(judge, results, images, factors)], axis=1)
    scores = score_rows(targets, emb, feats, translator, texts, concepts, n, meta) if concepts else \
        score_rows(targets, emb, feats, translator, torch.zeros(1, translator.out_dim, dtype=torch.float64),
                   ["-"], n, meta).drop(columns=["concept", "attribute_score_features", "attribute_score_images"])
    out = EquivalentPictures(samples=samples, scores=scores, targets=target_rows(targets, dec, meta), results=results,
                             info={"equivalent": equivalent, "steer_to": steer_to, "n": n, "seed": seed,
                                   "translator_heldout_cosine": translator.metrics.get("heldout_cosine")})
    if figure:
        out.figure = equivalents_figure(out, images)
        out.score_figure = is_figure(out.scores)
    return out


def equivalents_summary(scores: pd.DataFrame, by: Sequence[str] = ("class",), n_boot: int = 1000,
                        seed: int = 0) -> pd.DataFrame:
    """Per group and variant: mean and bootstrap CI (over images) of IS in feature space, on the images, on the
    samples' features, and of the permutation noise floor. Long format: ``by…, variant, statistic, mean, ci_low,
    ci_high, n``."""
    per_image = scores.drop_duplicates(subset=["image", "variant"])
    stats = ["image_score_features", "image_score_images", "image_score_sample_features", "noise_floor"]
    rows = []
    for key, g in per_image.groupby(list(by) + ["variant"], sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for s in stats:
            mean, lo, hi = bootstrap_mean(g[s].to_numpy(float), n_boot=n_boot, seed=seed)
            rows.append(list(key) + [s, mean, lo, hi, int(g[s].notna().sum())])
    return pd.DataFrame(rows, columns=list(by) + ["variant", "statistic", "mean", "ci_low", "ci_high", "n"])


def equivalents_figure(pics: EquivalentPictures, images: torch.Tensor, max_images: int = 4):
    """A grid: per image one row per variant; the first cell is the image (framed) or a blank with the variant's
    name, then its samples captioned with their relative logit change and the target distance."""
    n = pics.info["n"]
    cells, caps, outline = [], [], []
    blank = torch.ones_like(images[0])
    variants = list(pics.results)
    for i in range(min(len(images), max_images)):
        for v in variants:
            tgt = pics.targets[(pics.targets["image"] == i) & (pics.targets["variant"] == v)].iloc[0]
            cells.append(images[i] if v == "original" else blank)
            caps.append(f"{v}<br>null {tgt['null_fraction']:.2f}")
            outline.append("#d62728" if v == "original" else None)
            sub = pics.samples[(pics.samples["image"] == i) & (pics.samples["variant"] == v)]
            res = pics.results[v]
            for _, row in sub.iterrows():
                cells.append(res.images[i * n + int(row["sample"])])
                caps.append(f"Δlogit {row['logit_change']:.2f}<br>d {row['target_distance']:.2f}")
                outline.append(None)
    return plots.image_grid(torch.stack(cells), caps, ncols=n + 1, outline=outline,
                            title="targets with the logits of h: samples at h, h' (and h + n); "
                                  "captions: relative logit change, distance to the target")


def is_figure(scores: pd.DataFrame):
    """Bars per image: SING's IS in feature space beside the image-space IS and its noise floor (degrees)."""
    per = scores.drop_duplicates(subset=["image", "variant"])
    long = per.melt(id_vars=["image", "variant"], value_vars=["image_score_features", "image_score_images",
                                                              "noise_floor"],
                    var_name="measure", value_name="degrees").assign(image=lambda d: d["image"].astype(str))
    return plots.bars(long, "image", "degrees", color="measure", facet="variant",
                      title="IS: translator on features vs CLIP on the sampled images (degrees)", y_title="degrees")

