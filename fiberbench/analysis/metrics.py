"""The fiber paper's evaluation for any model: fiber loss in every convention, realism (Fréchet distance and KID
in a stated feature space), the nearest-neighbour baseline, spread over draws, diversity, cross-model agreement,
colour shift, and the guidance budget of a preset at a given step count.

Rousselot, Wendebourg & Köthe 2026 report the fiber loss as the *squared* L2 norm summed over feature dimensions
(Tables 5-7), its l1 and cross-entropy variants (Table 7) and the RMS per dimension (colorMNIST); the
nearest-neighbour column of Table 5 is the loss of the closest *real* image; the "±" is the spread across
independently drawn sample sets. Every function here takes tensors or tidy frames and returns numbers or tidy
frames (one row per sample, reference or pair), so the same code scores the toy world and hub models.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ..errors import ConfigError, InputError
from ..io import load_image
from ..models import load_clip, load_extractor
from ..plots import heatmap
from ..sampling.hyperparams import PresetStepsWarning, check_preset_steps, guidance_budget
from ..sampling.result import FIBER_LOSS_COLUMNS, fiber_losses, is_logits
from ..toy import DISCRETE, load_oracle

__all__ = ["FIBER_LOSS_COLUMNS", "FeatureSpace", "PresetStepsWarning", "Neighbours", "agreement_heatmap",
           "agreement_matrix", "check_preset_steps", "colour_shift", "cross_model_agreement", "data_scale",
           "embed", "feature_space", "fiber_losses", "frechet_distance", "guidance_budget", "histogram",
           "kernel_distance", "load_image_folder", "nearest_neighbours", "realism", "realism_from_features",
           "sample_diversity", "spread", "loss_frame"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# The paper's "PT FID" network: torchvision's InceptionV3 on [0,1] pixels resized to 299 (fff/evaluate/fid_old.py)
INCEPTION_SIZE = 299
SMALL_N_CAVEAT = ("FD is biased upward at small n (the fitted means and covariances are noisy, so FD > 0 even "
                  "between two draws of one distribution, shrinking like 1/n: about 2.6 at n=20 and 0.03 at "
                  "n=2000 for 8-dim standard normals); compare FDs only at equal n, e.g. against real_fd (bank "
                  "images at the same n). KID is an unbiased MMD^2 estimate: ~0 in expectation for equal "
                  "distributions at any n (single estimates scatter around 0, more at small n)")


# --------------------------------------------------------------------------- fiber loss

def loss_frame(features: torch.Tensor, reference_features: torch.Tensor, n: int = 1,
               logits: bool = False) -> pd.DataFrame:
    """Per-sample fiber losses (:data:`FIBER_LOSS_COLUMNS`) of features ``[B*n,D]`` against their references'
    ``[B,D]`` (reference-major, ``n`` samples each), with ``reference`` and ``sample`` columns."""
    if features.shape[0] != reference_features.shape[0] * n:
        raise InputError(f"{features.shape[0]} feature rows for {reference_features.shape[0]} references x n={n}")
    ref = reference_features.repeat_interleave(n, dim=0)
    df = pd.DataFrame({k: v.numpy() for k, v in fiber_losses(features, ref, logits).items()})
    df.insert(0, "sample", np.tile(np.arange(n), reference_features.shape[0]))
    df.insert(0, "reference", np.repeat(np.arange(reference_features.shape[0]), n))
    return df


# --------------------------------------------------------------------------- feature spaces

@dataclass(frozen=True)
class FeatureSpace:
    """Where realism is measured: ``embed(images [N,3,H,W] in [0,1]) -> [N,D]`` (no gradient), named for
    the columns it fills (``fd_<name>``, ``kid_<name>``)."""

    name: str
    embed: Callable[[torch.Tensor], torch.Tensor]
    description: str


def embed(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``fn`` over ``images`` ``[N,3,H,W]`` in batches, without gradients: ``[N,D]`` float32 on the CPU."""
    with torch.no_grad():
        outs = [fn(chunk).float().flatten(1).cpu() for chunk in images.split(batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, 0)


def oracle_space(device: str | torch.device = "cpu") -> FeatureSpace:
    """The toy oracle's judgement as features: softmax of its shape, colour, background and mirror heads and
    its regressed size, x, y (18 dims). Junk gets near-uniform heads, so distance here is realism."""
    oracle = load_oracle(device)

    def fn(images: torch.Tensor) -> torch.Tensor:
        out = oracle.logits(images.float().clamp(0, 1))
        return torch.cat([out[k].softmax(-1) for k in DISCRETE] + [out["regress"]], dim=-1)

    return FeatureSpace("oracle", fn, "toy oracle: head probabilities + size, x, y (18 dims)")


def inception_space(device: str | torch.device = "cpu") -> FeatureSpace:
    """torchvision's InceptionV3 pool features (2048 dims) on [0,1] pixels resized to 299 bilinear, without
    ImageNet normalisation: the fiber paper's "PT FID" (Table 2). Needs torchvision's ``IMAGENET1K_V1``
    weights in the torch hub cache (nothing is downloaded here)."""
    weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.exists():
        raise ConfigError(f"the inception feature space needs torchvision's InceptionV3 weights at {path}; on a "
                          f"machine with a network run: python -c \"import torchvision; "
                          f"torchvision.models.inception_v3(weights='IMAGENET1K_V1')\" and copy the file there")
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.fc, net.dropout = nn.Identity(), nn.Identity()
    net = net.eval().requires_grad_(False).to(device)

    def fn(images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float().to(device), size=INCEPTION_SIZE, mode="bilinear", align_corners=False)
        return net(x)

    return FeatureSpace("inception", fn, "torchvision InceptionV3 pool3 (2048 dims), the paper's PT FID")


def feature_space(spec: str | FeatureSpace, device: str | torch.device = "cpu") -> FeatureSpace:
    """A feature space from a spec: ``"oracle"`` (toy), ``"inception"`` (the paper's PT FID network),
    ``"clip:<clip spec>"`` (a CLIP image tower, e.g. ``clip:toy/clip``, ``clip:open_clip/ViT-B-32:laion2b_s34b_b79k``)
    or any extractor spec (its features). ``"<name>=<spec>"`` names the columns (default: oracle, inception,
    clip, or the extractor's model name)."""
    if isinstance(spec, FeatureSpace):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"a feature space is 'oracle', 'inception', 'clip:<spec>' or an extractor spec; got {spec!r}")
    name = None
    head, sep, rest = spec.partition("=")
    if sep and "/" not in head and ":" not in head:
        name, spec = head, rest
    if spec == "oracle":
        space = oracle_space(device)
    elif spec == "inception":
        space = inception_space(device)
    elif spec.startswith("clip:"):
        clip = load_clip(spec[5:], device=device)
        space = FeatureSpace("clip", clip.embed_images, f"CLIP image tower {clip.spec} (unit norm)")
    else:
        ex = load_extractor(spec, device=device)
        short = ex.spec.split("/", 1)[-1].split("@")[0].replace("-", "_").replace(".", "_").replace("/", "_")
        space = FeatureSpace(short, ex, f"features of {ex.spec}")
    return FeatureSpace(name, space.embed, space.description) if name else space


# --------------------------------------------------------------------------- realism

class GivenFeatures(nn.Module):
    """Feeds precomputed features ``[N,D]`` to torchmetrics' FID/KID in place of an image network."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def check_features(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"{what}: features must be [N,D] and [M,D] with one D; got {tuple(a.shape)}, {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise InputError(f"{what} needs at least 2 samples on each side; got {a.shape[0]} and {b.shape[0]}")


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features ``a`` ``[N,D]`` and ``b`` ``[M,D]`` (>= 0):
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with unbiased covariances, computed by torchmetrics'
    ``FrechetInceptionDistance`` on the given features. Biased upward at small N (see :data:`SMALL_N_CAVEAT`)."""
    check_features(a, b, "frechet_distance")
    metric = FrechetInceptionDistance(feature=GivenFeatures(a.shape[1]))
    metric.update(b.double(), real=True)
    metric.update(a.double(), real=False)
    return max(float(metric.compute()), 0.0)


def kernel_distance(a: torch.Tensor, b: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float, int]:
    """KID between features ``a`` and ``b``: the unbiased MMD^2 with the cubic polynomial kernel
    ``(x.y / D + 1)^3``, averaged over ``subsets`` random subsets of ``min(subset_size, N, M)`` rows
    (torchmetrics' ``KernelInceptionDistance``, seeded). Returns ``(mean, std over subsets, subset size)``;
    ~0 for two draws of one distribution at any size (it can be slightly negative)."""
    check_features(a, b, "kernel_distance")
    size = int(min(subset_size, a.shape[0], b.shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer": a few MB here
        metric = KernelInceptionDistance(feature=GivenFeatures(a.shape[1]), subsets=subsets, subset_size=size)
    metric.update(b.double(), real=True)
    metric.update(a.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def realism_from_features(a: torch.Tensor, b: torch.Tensor, space: str, *, seed: int = 0,
                          kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict[str, Any]:
    """FD and KID of sample features ``a`` ``[N,D]`` against bank features ``b`` ``[M,D]``, with the caveats.

    Returns ``{"space", "n", "n_bank", "dim", "fd", "kid", "kid_std", "kid_subset_size", "caveat"}``.
    """
    fd = frechet_distance(a, b)
    kid, kid_std, size = kernel_distance(a, b, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    return {"space": space, "n": int(a.shape[0]), "n_bank": int(b.shape[0]), "dim": int(a.shape[1]), "fd": fd,
            "kid": kid, "kid_std": kid_std, "kid_subset_size": size,
            "caveat": f"n={a.shape[0]} in {a.shape[1]} dims: {SMALL_N_CAVEAT}"}


def realism(samples: torch.Tensor, bank: torch.Tensor, space: str | FeatureSpace, **kw) -> dict[str, Any]:
    """:func:`realism_from_features` of images ``samples`` ``[N,3,H,W]`` and ``bank`` ``[M,3,H,W]`` in [0,1]
    embedded in ``space`` (a :class:`FeatureSpace` or a spec for :func:`feature_space`)."""
    space = feature_space(space)
    return realism_from_features(embed(space.embed, samples), embed(space.embed, bank), space.name, **kw)


# --------------------------------------------------------------------------- nearest neighbours

def load_image_folder(folder: str | Path, size: int | None = None, limit: int | None = None
                      ) -> tuple[torch.Tensor, list[str]]:
    """Every image file of ``folder`` (sorted by name, not recursive) as ``[N,3,size,size]`` in [0,1] and their
    names; ``size`` is required when the files differ in size. ``InputError`` for an empty or missing folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist or is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    images = [load_image(p, size=size) for p in paths]
    if len({tuple(im.shape) for im in images}) > 1:
        raise InputError(f"the images of {folder} differ in size; pass size= to resize them to one")
    return torch.stack(images), [p.name for p in paths]


@dataclass
class Neighbours:
    """For each reference, the closest bank image in an extractor's feature space (Table 5's baseline).

    ``index [B]`` into the bank, ``images [B,3,H,W]``, ``features [B,D]`` (the neighbours'),
    ``reference_features [B,D]``, ``extractor`` (spec)."""

    index: torch.Tensor
    images: torch.Tensor
    features: torch.Tensor
    reference_features: torch.Tensor
    extractor: str

    def frame(self) -> pd.DataFrame:
        """One row per reference: ``reference``, ``bank_index`` and the neighbour's :data:`FIBER_LOSS_COLUMNS`."""
        df = loss_frame(self.features, self.reference_features, 1, is_logits(self.extractor)).drop(columns="sample")
        df.insert(1, "bank_index", self.index.numpy())
        df.insert(0, "extractor", self.extractor)
        return df


def identical_rows(reference: torch.Tensor, bank: torch.Tensor, tol: float = 1e-6, chunk: int = 512) -> torch.Tensor:
    """``[B,M]`` bool: bank image j is reference i (pixel MSE <= ``tol``, after resizing the bank to the
    references' size)."""
    size = tuple(reference.shape[-2:])
    out = []
    for part in bank.split(chunk):
        if tuple(part.shape[-2:]) != size:
            part = F.interpolate(part.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        d = torch.cdist(reference.flatten(1).double(), part.flatten(1).double()).pow(2) / reference[0].numel()
        out.append(d <= tol)
    return torch.cat(out, dim=1)


def nearest_neighbours(reference: torch.Tensor, bank: torch.Tensor, extractor, *,
                       bank_features: torch.Tensor | None = None, batch_size: int = 256,
                       exclude_identical: bool = True) -> Neighbours:
    """The closest bank image to each reference under the squared L2 distance of ``extractor``'s features.

    ``reference`` ``[B,3,H,W]`` and ``bank`` ``[M,3,h,w]`` in [0,1]; ``extractor`` a loaded extractor or a spec.
    The reference itself (a pixel-identical bank image) is skipped: unlike the paper's feature threshold
    (1e-4), this keeps a *different* image that the model cannot tell apart, which is the point of a fiber.
    ``bank_features`` ``[M,D]`` skips re-embedding the bank.
    """
    ex = load_extractor(extractor) if isinstance(extractor, str) else extractor
    spec = getattr(ex, "spec", type(ex).__name__)
    ref_f = embed(ex, reference, batch_size)
    bank_f = embed(ex, bank, batch_size) if bank_features is None else bank_features.float().cpu()
    if bank_f.shape[0] != bank.shape[0]:
        raise InputError(f"bank_features has {bank_f.shape[0]} rows for {bank.shape[0]} bank images")
    d = torch.cdist(ref_f.double(), bank_f.double())
    if exclude_identical:
        d[identical_rows(reference, bank)] = float("inf")
    if not torch.isfinite(d.min(dim=1).values).all():
        raise InputError("a reference has no nearest neighbour: every bank image is the reference itself")
    idx = d.argmin(dim=1)
    return Neighbours(index=idx, images=bank[idx], features=bank_f[idx], reference_features=ref_f, extractor=spec)


# --------------------------------------------------------------------------- spread and diversity

def spread(frame: pd.DataFrame, columns: Sequence[str], by: Sequence[str] = ("extractor", "method"),
           draw: str = "seed") -> pd.DataFrame:
    """Mean over independent draws of each draw's mean, and the std across draws (the paper's "±").

    ``frame``: one row per sample with a ``draw`` column (the run seed). Returns one row per ``by`` group with
    ``<column>`` (mean of the per-draw means), ``<column>_std`` (sample std across draws, NaN for one draw: a
    single set has no across-draw spread, and the scatter across samples is a different, larger quantity) and
    ``draws``.
    """
    missing = [c for c in [*by, draw, *columns] if c not in frame.columns]
    if missing:
        raise ConfigError(f"spread: column(s) {missing} not in the frame; columns: {list(frame.columns)}")
    per_draw = frame.groupby([*by, draw], sort=True, dropna=False)[list(columns)].mean().reset_index()
    g = per_draw.groupby(list(by), sort=False, dropna=False)
    out = g[list(columns)].mean()
    std = g[list(columns)].std(ddof=1).add_suffix("_std")
    res = pd.concat([out, std], axis=1)
    res["draws"] = g.size()
    order = [c for col in columns for c in (col, f"{col}_std")] + ["draws"]
    return res[order].reset_index()


def data_scale(images: torch.Tensor) -> float:
    """Mean pixel L2 distance between distinct pairs of ``images`` ``[K,3,H,W]`` (independent images: the
    data's own diversity)."""
    flat = images.flatten(1).double()
    k = flat.shape[0]
    if k < 2:
        raise InputError("data_scale needs at least two images")
    return float(torch.cdist(flat, flat).sum() / (k * (k - 1)))


def sample_diversity(images: torch.Tensor, n: int, scale: float = 1.0) -> torch.Tensor:
    """Per sample ``[B*n]``: mean pixel L2 distance to the other ``n - 1`` samples of its fiber, divided by
    ``scale`` (e.g. :func:`data_scale` of independent images: ~1 = as varied as the data, 0 = all alike).
    NaN for ``n == 1``."""
    if images.shape[0] % n:
        raise InputError(f"{images.shape[0]} images is not a multiple of n={n}")
    if n < 2:
        return torch.full((images.shape[0],), float("nan"), dtype=torch.float64)
    out = []
    for fiber in images.flatten(1).double().split(n):
        out.append(torch.cdist(fiber, fiber).sum(1) / (n - 1))
    return torch.cat(out) / scale


# --------------------------------------------------------------------------- cross-model agreement

def independent_distance(features: torch.Tensor, convention: str, logits: bool) -> float:
    """Mean distance (``convention``, a :data:`FIBER_LOSS_COLUMNS` name) over distinct pairs of independent
    images' ``features`` ``[K,D]``: the scale of "as different as two unrelated images"."""
    k = features.shape[0]
    i, j = torch.triu_indices(k, k, offset=1)
    if i.numel() == 0:
        raise InputError("independent images: need at least two")
    return float(fiber_losses(features[i], features[j], logits)[convention].mean())


def cross_model_agreement(results: Mapping[str, Any], judges: Mapping[str, Any], independent: torch.Tensor, *,
                          convention: str = "fiber_sq_l2", batch_size: int = 256) -> pd.DataFrame:
    """Model A's fibers judged by model B (Figs 8 and 18): one row per (source A, judge B, sample).

    ``results``: ``{name: FiberResult}`` of the sources; ``judges``: ``{name: extractor or spec}``;
    ``independent``: ``[K,3,H,W]`` unrelated images (e.g. the bank). Columns ``source, judge, reference, sample,
    distance`` (B's ``convention`` distance between sample and reference), ``baseline`` (B's mean distance between
    independent images) and ``relative`` = distance / baseline: 0 when B also cannot tell them apart, ~1 when
    the sample is as different to B as an unrelated image.
    """
    if convention not in FIBER_LOSS_COLUMNS:
        raise ConfigError(f"convention must be one of {FIBER_LOSS_COLUMNS}, got {convention!r}")
    rows = []
    for jname, judge in judges.items():
        ex = load_extractor(judge) if isinstance(judge, str) else judge
        logits = is_logits(getattr(ex, "spec", None))
        base = independent_distance(embed(ex, independent, batch_size), convention, logits)
        for sname, res in results.items():
            f = loss_frame(embed(ex, res.images, batch_size), embed(ex, res.reference, batch_size), res.n, logits)
            rows.append(pd.DataFrame({"source": sname, "judge": jname, "reference": f["reference"],
                                      "sample": f["sample"], "distance": f[convention], "baseline": base,
                                      "relative": f[convention] / base if base > 0 else np.nan}))
    return pd.concat(rows, ignore_index=True)


def agreement_matrix(frame: pd.DataFrame, value: str = "relative") -> pd.DataFrame:
    """Source x judge table of the mean ``value`` of :func:`cross_model_agreement` rows (the heatmap's cells)."""
    return frame.pivot_table(index="source", columns="judge", values=value, aggfunc="mean", sort=False)


def agreement_heatmap(frame: pd.DataFrame, *, value: str = "relative", title: str | None = None, **kw):
    """A x B heatmap (rows: whose fibers, columns: who judges) of :func:`cross_model_agreement` ``value``."""
    title = title or "cross-model agreement (judge distance / unrelated pairs)"
    zmax = max(1.0, float(np.nanmax(frame[value].to_numpy(float)))) if len(frame) else 1.0
    return heatmap(frame, "source", "judge", value, zmin=0.0, zmax=zmax, title=title, **kw)


# --------------------------------------------------------------------------- colour shift

CHANNELS = ("red", "green", "blue")


def foreground_colour(images: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """``[N,3]`` mean colour of each image's foreground: the pixels whose L1 distance to the median colour of
    the image's border exceeds ``threshold`` (a flat or smooth background drops out; the whole image when
    nothing stands out)."""
    x = images.float()
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # [N,3,4W]
    bg = border.median(dim=-1).values[..., None, None]
    mask = ((x - bg).abs().sum(1, keepdim=True) > threshold).float()
    empty = mask.flatten(1).sum(1) == 0
    mask[empty] = 1.0
    return (x * mask).flatten(2).sum(-1) / mask.flatten(2).sum(-1)


def colour_shift(result, threshold: float = 0.2) -> pd.DataFrame:
    """The colorMNIST-style colour shift of each sample: foreground colour minus its reference's, per channel.

    One row per (sample, channel): ``extractor, method, reference, sample, channel`` (red / green / blue),
    ``shift`` in [-1, 1]; plus ``magnitude`` (the RGB shift's L2 norm, same for the three rows of a sample).
    """
    n = result.n
    s = foreground_colour(result.images, threshold)
    r = foreground_colour(result.reference, threshold).repeat_interleave(n, dim=0)
    d = (s - r).double()
    m = d.shape[0]
    c = result.config
    return pd.DataFrame({
        "extractor": c.get("extractor"), "method": c.get("method"),
        "reference": np.repeat(np.arange(m) // n, 3), "sample": np.repeat(np.arange(m) % n, 3),
        "channel": np.tile(CHANNELS, m), "shift": d.flatten().numpy(),
        "magnitude": np.repeat(d.norm(dim=1).numpy(), 3)})


def histogram(frame: pd.DataFrame, column: str, *, by: Sequence[str] = (), bins: int = 21,
              value_range: tuple[float, float] = (-1.0, 1.0)) -> pd.DataFrame:
    """Histogram of ``column`` per ``by`` group as a tidy frame: ``by..., bin`` (centre), ``count``, ``density``
    (fraction of the group's rows per bin, sums to 1 inside the range)."""
    edges = np.linspace(*value_range, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    rows = []
    groups = frame.groupby(list(by), sort=False) if by else [((), frame)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        counts, _ = np.histogram(g[column].to_numpy(float), bins=edges)
        total = max(int(counts.sum()), 1)
        rows += [(*key, float(c), int(k), k / total) for c, k in zip(centres, counts)]
    return pd.DataFrame(rows, columns=[*by, "bin", "count", "density"])
