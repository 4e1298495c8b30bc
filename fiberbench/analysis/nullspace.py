"""SING: what the null space of a classifier's linear head carries, said in CLIP space.

For a classifier whose last layer is linear, ``logits = W h + b`` with pre-logit
features ``h`` (Yadid et al., CVPR 2026, arXiv 2603.14610; docs/design.md, "SING"):

- SVD ``W = U Σ Vᵀ``; right singular vectors with σ > tol span the *principal*
  space, the rest the *null* space; ``P_null = I - V_r V_rᵀ``.
- ``h' = h - P_null h`` (null-space removal) has *identical* logits, and so has
  ``h + n`` for any ``n`` in the null space.
- A linear *translator* ``T`` maps ``h`` to CLIP image embeddings (ridge least
  squares on pairs ``(h(x_i), CLIP(x_i))``).
- **IS** (image score) = ∠(T h, T h') in degrees: how much CLIP-visible content
  the null space holds for this image.
- **AS** (attribute score) toward a text concept ``t_c``:
  ``AS = ∠(T h, t_c) - ∠(T h', t_c)`` in degrees. Positive: removing the null
  component brings the features *closer* to the concept (the null space was
  hiding it); negative: the null space was carrying the concept.
- Steering: the null-space perturbation ``n`` with ``||n|| <= bound`` that
  maximises ``cos(T(h + n), t_target)``; logits stay equal.

All linear algebra runs in float64 (the projectors are exact to ~1e-12), the
results come back in the dtype of the input features.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError, InputError
from ..models import load_extractor
from ..toy import references
from ..toy.vocab import TOY_VOCAB
from .metrics import load_image_folder
from .semantics import angle_deg, class_embeddings
from .stats import per_class

__all__ = [
    "HeadDecomposition", "head_decomposition", "Translator", "fit_translator", "load_translator",
    "pre_logit_features", "angle_deg", "image_score", "attribute_score", "concept_embeddings",
    "SteerResult", "steer", "sing_scores", "sing_summary", "steering_table", "steering_summary",
    "steering_benchmark", "factor_probe", "toy_sing_report", "LinearProbe", "fit_linear_probe", "IS_LEAK_DEG",
    "AS_LEAK_DEG", "predicted_classes", "sing_images", "toy_labels", "load_sing_extractors",
]

LOGIT_RTOL = 1e-5  # logits of equivalent features must agree to this relative tolerance (asserted)
# "substantial leakage" in SING's demo reading: an image whose null space moves its CLIP embedding by more than
# IS_LEAK_DEG, or its angle to a concept by more than AS_LEAK_DEG (degrees); sing_scores flags both
IS_LEAK_DEG = 12.0
AS_LEAK_DEG = 4.0


# --------------------------------------------------------------------------- head decomposition

@dataclass
class HeadDecomposition:
    """SVD of a linear head ``logits = W h + b``.

    Attributes:
        weight: ``[C,D]`` float64.
        bias: ``[C]`` float64 (zeros if the head has none).
        singular_values: ``[min(C,D)]`` descending.
        basis: ``[D,r]`` orthonormal basis ``V_r`` of the principal space (rows of ``W`` span it).
        null_basis: ``[D,D-r]`` orthonormal basis of the null space (``W @ null_basis ≈ 0``).
        tol: singular values ``<= tol`` count as zero (see :func:`head_decomposition`).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    singular_values: torch.Tensor
    basis: torch.Tensor
    null_basis: torch.Tensor
    tol: float
    spec: str = ""

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def null_dim(self) -> int:
        return int(self.null_basis.shape[1])

    @property
    def principal_projector(self) -> torch.Tensor:
        """``[D,D]`` orthogonal projector ``V_r V_rᵀ`` onto the principal (row) space of ``W``."""
        return self.basis @ self.basis.T

    @property
    def null_projector(self) -> torch.Tensor:
        """``[D,D]`` orthogonal projector ``I - V_r V_rᵀ`` onto the null space of ``W``."""
        return torch.eye(self.dim, dtype=self.basis.dtype) - self.principal_projector

    def _check(self, h: torch.Tensor) -> torch.Tensor:
        if not isinstance(h, torch.Tensor):
            h = torch.as_tensor(h)
        if h.shape[-1] != self.dim:
            raise InputError(f"features have dimension {h.shape[-1]}, the head {self.spec or ''} expects {self.dim}")
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``W h + b`` for ``h [...,D]``, computed in float64, returned in ``h``'s dtype."""
        h = self._check(h)
        return (h.double() @ self.weight.T + self.bias).to(h.dtype)

    def null_component(self, h: torch.Tensor) -> torch.Tensor:
        """``P_null h`` for ``h [...,D]`` (the part of the features the logits cannot see)."""
        h = self._check(h)
        hd = h.double()
        return (hd - (hd @ self.basis) @ self.basis.T).to(h.dtype)

    def equivalent(self, h: torch.Tensor) -> torch.Tensor:
        """Null-space-removed features ``h' = h - P_null h = V_r V_rᵀ h`` (same logits), ``[...,D]``."""
        h = self._check(h)
        hd = h.double()
        return ((hd @ self.basis) @ self.basis.T).to(h.dtype)

    def project_null(self, n: torch.Tensor) -> torch.Tensor:
        """The null-space part of an arbitrary perturbation ``n [...,D]`` (adding it keeps the logits)."""
        return self.null_component(n)

    def logit_change(self, h: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        """Per row ``max|logits(h2) - logits(h)| / max(max|logits(h)|, 1e-12)``, in float64. ``[N]``."""
        a = self._check(h).double() @ self.weight.T + self.bias
        b = self._check(h2).double() @ self.weight.T + self.bias
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        return (b - a).abs().amax(-1) / a.abs().amax(-1).clamp_min(1e-12)

    def assert_equivalent(self, h: torch.Tensor, h2: torch.Tensor, rtol: float = LOGIT_RTOL) -> float:
        """Raise ``AssertionError`` unless ``h2`` has the logits of ``h`` within ``rtol`` (relative); return the max."""
        worst = float(self.logit_change(h, h2).max()) if h.numel() else 0.0
        if not worst <= rtol:
            raise AssertionError(f"logits changed by {worst:.3g} (relative) > {rtol:g}: edit left the null space")
        return worst


def head_decomposition(head, tol: float | None = None) -> HeadDecomposition:
    """SVD of a linear classifier head into principal and null space.

    Args:
        head: an ``nn.Linear``, an :class:`~fiberbench.extractors.Extractor` whose
            ``.classifier()`` is linear (load it with ``@logits``), a weight tensor
            ``[C,D]``, or a ``(weight, bias)`` pair.
        tol: singular values ``<= tol`` are treated as zero. Default (as
            ``numpy.linalg.matrix_rank``): ``σ_max · max(C, D) · eps`` with ``eps``
            the machine epsilon of the head's stored dtype (float32: 1.19e-7), i.e.
            below what the stored weights can resolve.

    Returns:
        :class:`HeadDecomposition` (float64 tensors on the CPU).
    """
    spec = ""
    if hasattr(head, "classifier") and callable(head.classifier) and not isinstance(head, nn.Linear):
        spec = getattr(head, "spec", "")
        head = head.classifier()
    if isinstance(head, nn.Linear):
        weight = head.weight.detach()
        bias = head.bias.detach() if head.bias is not None else None
    elif isinstance(head, (tuple, list)) and len(head) == 2:
        weight, bias = (torch.as_tensor(v) if v is not None else None for v in head)
    elif isinstance(head, torch.Tensor):
        weight, bias = head, None
    else:
        raise ConfigError(f"head_decomposition needs an nn.Linear, an Extractor with a linear classifier, "
                          f"a weight [C,D] or (weight, bias); got {type(head).__name__}")
    if weight.ndim != 2:
        raise InputError(f"head weight must be [C,D], got shape {tuple(weight.shape)}")
    eps = torch.finfo(weight.dtype).eps if weight.is_floating_point() else torch.finfo(torch.float32).eps
    w = weight.detach().cpu().double()
    c, d = w.shape
    b = torch.zeros(c, dtype=torch.float64) if bias is None else bias.detach().cpu().double().reshape(c)
    _, s, vh = torch.linalg.svd(w, full_matrices=True)  # vh: [D,D]
    if tol is None:
        tol = float(s.max()) * max(c, d) * eps if s.numel() else 0.0
    r = int((s > tol).sum())
    v = vh.T
    return HeadDecomposition(weight=w, bias=b, singular_values=s, basis=v[:, :r].contiguous(),
                             null_basis=v[:, r:].contiguous(), tol=float(tol), spec=spec)


# --------------------------------------------------------------------------- angles and features

@torch.no_grad()
def pre_logit_features(extractor, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Pre-logit features ``[N,D]`` (the input of the linear head) of images ``[N,3,H,W]`` in [0,1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"expected images [N,3,H,W] in [0,1], got shape {tuple(images.shape)}")
    if getattr(extractor, "layer", None) == "pre_logits":
        fn = extractor
    elif hasattr(extractor, "pre_logits"):
        fn = extractor.pre_logits
    else:
        raise ConfigError(f"{getattr(extractor, 'spec', type(extractor).__name__)} has no pre-logit features")
    return torch.cat([fn(c).float() for c in images.split(batch_size)]) if len(images) else torch.zeros(0)


# --------------------------------------------------------------------------- translator

class Translator(nn.Module):
    """Affine map ``T(h) = A h + c`` from an extractor's pre-logit features ``[N,D]`` to CLIP image space ``[N,E]``.

    ``metrics`` holds how it was fitted and how well (``heldout_cosine``: mean
    cosine between ``T h`` and the CLIP embedding on images not used for the fit).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, metrics: dict[str, Any] | None = None,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise InputError(f"translator weight must be [E,D] and bias [E]; got {tuple(weight.shape)}, "
                             f"{tuple(bias.shape)}")
        self.register_buffer("weight", weight.detach().double().contiguous())
        self.register_buffer("bias", bias.detach().double().contiguous())
        self.metrics = dict(metrics or {})
        self.meta = dict(meta or {})

    @property
    def in_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``T h`` for ``h [...,D]`` in float64 (not normalised; angles ignore the norm)."""
        h = torch.as_tensor(h)
        if h.shape[-1] != self.in_dim:
            raise InputError(f"translator expects features of dimension {self.in_dim}, got {h.shape[-1]}")
        return h.double().to(self.weight.device) @ self.weight.T + self.bias

    def save(self, path: str | Path) -> Path:
        """Write ``weight``/``bias`` as safetensors; metrics and meta go into the file's metadata (JSON)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.cpu().contiguous(), "bias": self.bias.cpu().contiguous()}, str(path),
                  metadata={"metrics": json.dumps(self.metrics), "meta": json.dumps(self.meta),
                            "format": "fiberbench.translator/1"})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Translator":
        """Read a translator written by :meth:`save`."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"translator file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path} is not a translator safetensors file: {e}") from e
        return cls(weight, bias, metrics=json.loads(md.get("metrics", "{}")), meta=json.loads(md.get("meta", "{}")))

    def extra_repr(self) -> str:
        return f"{self.in_dim} -> {self.out_dim}, heldout_cosine={self.metrics.get('heldout_cosine')}"


def load_translator(path: str | Path) -> Translator:
    """Load a :class:`Translator` saved as safetensors."""
    return Translator.load(path)


def _ridge(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred ridge regression ``y ≈ x A^T + c``; ``ridge`` is relative to the mean eigenvalue of ``XcᵀXc``."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    g = xc.T @ xc
    lam = ridge * float(torch.trace(g)) / g.shape[0]
    a = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), xc.T @ yc).T  # [E,D]
    return a, my - a @ mx


def fit_translator(extractor, clip, images: torch.Tensor | None = None, ridge: float = 1e-3, *,
                   features: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                   holdout: float = 0.2, seed: int = 0, batch_size: int = 256) -> Translator:
    """Fit the SING translator: pre-logit features -> CLIP image embeddings, by ridge least squares.

    Args:
        extractor: the classifier (an Extractor with ``.pre_logits``), or ``None`` when ``features`` is given.
        clip: a :class:`~fiberbench.semantics.ClipModel`, or ``None`` when ``targets`` is given.
        images: ``[N,3,H,W]`` in [0,1] (both models see the same images).
        ridge: regularisation relative to the mean eigenvalue of the centred Gram
            matrix (scale-free: 1e-3 = a thousandth of the average feature variance × N).
        features, targets: precomputed ``[N,D]`` and ``[N,E]`` instead of images.
        holdout: fraction of the pairs kept out of the fit to measure ``heldout_cosine``;
            the returned translator is refitted on all pairs.
        seed: seed of the hold-out split.

    Returns:
        :class:`Translator` with ``metrics`` = ``heldout_cosine`` (mean cosine of
        ``T h`` with the CLIP embedding on held-out images), ``baseline_cosine`` (the same
        for the constant prediction "mean training embedding"), ``train_cosine``,
        ``n_train``, ``n_heldout``, ``ridge``.
    """
    if features is None:
        if images is None or extractor is None:
            raise ConfigError("fit_translator needs images and an extractor, or features=")
        features = pre_logit_features(extractor, images, batch_size)
    if targets is None:
        if images is None or clip is None:
            raise ConfigError("fit_translator needs images and a clip model, or targets=")
        targets = clip.embed_images(images, batch_size=batch_size)
    x, y = torch.as_tensor(features).double().cpu(), F.normalize(torch.as_tensor(targets).double().cpu(), dim=-1)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise InputError(f"features [N,D] and targets [N,E] must pair up; got {tuple(x.shape)} and {tuple(y.shape)}")
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"holdout must lie in [0, 1), got {holdout}")
    if ridge < 0 or not math.isfinite(ridge):
        raise ConfigError(f"ridge must be a finite number >= 0, got {ridge}")
    n = len(x)
    n_test = int(round(holdout * n))
    if n - n_test < 2:
        raise InputError(f"need at least 2 training pairs, got {n - n_test} of {n}")
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    test, train = perm[:n_test], perm[n_test:]
    a, c = _ridge(x[train], y[train], ridge)
    train_cos = float(F.cosine_similarity(x[train] @ a.T + c, y[train], dim=-1).mean())
    held = float(F.cosine_similarity(x[test] @ a.T + c, y[test], dim=-1).mean()) if n_test else float("nan")
    # what predicting the mean training embedding for every image achieves: the bar a translator must clear
    base = float("nan")
    if n_test:
        base = float(F.cosine_similarity(y[train].mean(0, keepdim=True), y[test], dim=-1).mean())
    a, c = _ridge(x, y, ridge)
    metrics = {"heldout_cosine": held, "baseline_cosine": base, "train_cosine": train_cos, "n_train": int(len(train)),
               "n_heldout": n_test,
               "ridge": ridge, "seed": seed}
    meta = {"extractor": getattr(extractor, "spec", None), "clip": getattr(clip, "spec", None)}
    return Translator(a, c, metrics=metrics, meta=meta)


# --------------------------------------------------------------------------- IS / AS

def image_score(h: torch.Tensor, decomposition: HeadDecomposition, translator: Translator) -> torch.Tensor:
    """IS in degrees, ``[N]`` (or a scalar for ``h [D]``): ∠(T h, T h') with ``h'`` the null-removed features.

    Exactly 0 when ``h`` has no null-space component.
    """
    return angle_deg(translator(h), translator(decomposition.equivalent(torch.as_tensor(h).double())))


def attribute_score(h: torch.Tensor, decomposition: HeadDecomposition, translator: Translator,
                    concepts: torch.Tensor, *, reference: torch.Tensor | None = None) -> torch.Tensor:
    """AS in degrees: ``∠(T h, t_c) - ∠(T h', t_c)``.

    Args:
        h: ``[N,D]`` (or ``[D]``) pre-logit features.
        concepts: text embeddings ``[K,E]`` (or ``[E]``).
        reference: features whose null-removed equivalent is the comparison point
            (default ``h`` itself); steering passes the unsteered features here.

    Returns:
        ``[N,K]`` (dimensions of size one squeezed as in the inputs). Positive: the
        null space was hiding the concept; negative: it was carrying it.
    """
    h = torch.as_tensor(h).double()
    ref = h if reference is None else torch.as_tensor(reference).double()
    t = torch.as_tensor(concepts).double().to(translator.weight.device)
    squeeze_n, squeeze_k = h.ndim == 1, t.ndim == 1
    h2, r2, t2 = h.reshape(-1, h.shape[-1]), ref.reshape(-1, ref.shape[-1]), t.reshape(-1, t.shape[-1])
    th, te = translator(h2), translator(decomposition.equivalent(r2))
    out = angle_deg(th[:, None, :], t2[None]) - angle_deg(te[:, None, :], t2[None])
    if squeeze_k:
        out = out[:, 0]
    if squeeze_n:
        out = out[0]
    return out


def concept_embeddings(clip, concepts: str | Sequence[str] | torch.Tensor,
                       templates: Sequence[str] | None = None) -> torch.Tensor:
    """Unit text embeddings ``[K,E]`` of concepts, each the renormalised mean over ``templates``.

    ``concepts`` may also be a vocabulary group ``{label: [prompts]}`` (one embedding per label).
    ``templates=None`` uses the concept string as the prompt itself; pass
    :data:`fiberbench.semantics.TEMPLATES` for open_clip-style ensembling.
    Tensors are passed through (normalised).
    """
    if isinstance(concepts, torch.Tensor):
        return F.normalize(concepts.double().reshape(-1, concepts.shape[-1]), dim=-1)
    if isinstance(concepts, dict):  # a vocabulary group {label: [prompts]}: prompt-ensembled per label
        return class_embeddings(clip, concepts).double().cpu()
    if isinstance(concepts, str):
        concepts = [concepts]
    if clip is None:
        raise ConfigError("text concepts need a clip model (or pass embeddings as a tensor)")
    out = []
    for c in concepts:
        prompts = [t.format(c) for t in templates] if templates else [c]
        out.append(F.normalize(clip.embed_texts(prompts).double().mean(0), dim=-1))
    return torch.stack(out).cpu()


# --------------------------------------------------------------------------- steering

@dataclass
class SteerResult:
    """Outcome of :func:`steer` for ``N`` feature vectors.

    Attributes:
        features: ``[N,D]`` steered features ``h + n`` (input dtype).
        delta: ``[N,D]`` the null-space perturbation ``n`` (``||n|| <= bound``).
        bound: ``[N]`` the norm bound used per row.
        cos_before, cos_after: ``[N]`` cos(T h, t) and cos(T(h + n), t).
        attribute_score: ``[N]`` AS of the steered features (degrees; vs the null-removed ``h'``).
        attribute_score_before: ``[N]`` AS of the original features.
        logit_change: ``[N]`` max relative logit change (asserted ``<= 1e-5``).
    """

    features: torch.Tensor
    delta: torch.Tensor
    bound: torch.Tensor
    cos_before: torch.Tensor
    cos_after: torch.Tensor
    attribute_score: torch.Tensor
    attribute_score_before: torch.Tensor
    logit_change: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def steer(h: torch.Tensor, target, norm_bound: float, *, decomposition: HeadDecomposition,
          translator: Translator, clip=None, relative_to: str | None = None, steps: int = 300,
          lr: float = 0.05, templates: Sequence[str] | None = None) -> SteerResult:
    """Null-space perturbation ``n`` that maximises ``cos(T(h + n), t_target)`` with ``||n|| <= bound``.

    Projected gradient ascent (Adam) on the coordinates ``c`` of ``n = N c`` in an
    orthonormal null basis ``N``, so ``||n|| = ||c||`` and ``W n = 0`` by
    construction; it starts from the steepest direction ``Mᵀt`` (``M = A N``) scaled
    to the bound, and keeps the best iterate. The logits are checked to stay equal
    within 1e-5 (relative): ``AssertionError`` otherwise.

    Args:
        h: ``[N,D]`` or ``[D]`` pre-logit features.
        target: a concept string (needs ``clip``) or a text embedding ``[E]``.
        norm_bound: the bound on ``||n||``: absolute, or a multiple of ``||P_null h||``
            (``relative_to="null"``) or of ``||h||`` (``relative_to="feature"``).
        steps, lr: optimiser budget (the problem is ``k = null_dim`` dimensional and cheap).

    Returns:
        :class:`SteerResult` (achieved AS toward the target in ``attribute_score``).
    """
    if relative_to not in (None, "null", "feature"):
        raise ConfigError(f"relative_to must be None, 'null' or 'feature', got {relative_to!r}")
    if not (norm_bound >= 0 and math.isfinite(norm_bound)):
        raise ConfigError(f"norm_bound must be a finite number >= 0, got {norm_bound}")
    h_in = torch.as_tensor(h)
    squeeze = h_in.ndim == 1
    hd = h_in.double().reshape(-1, h_in.shape[-1])
    t = concept_embeddings(clip, target, templates)[0].to(translator.weight.device)
    nb = decomposition.null_basis.to(translator.weight.device)  # [D,k]
    if relative_to == "null":
        bound = decomposition.null_component(hd).norm(dim=-1) * norm_bound
    elif relative_to == "feature":
        bound = hd.norm(dim=-1) * norm_bound
    else:
        bound = torch.full((len(hd),), float(norm_bound), dtype=torch.float64)
    if decomposition.null_dim == 0:
        raise ConfigError("the head has full column rank: its null space is empty, nothing to steer")
    a = translator(hd)  # [N,E]
    m = translator.weight @ nb  # [E,k]
    g0 = F.normalize((t @ m).expand(len(hd), -1), dim=-1)
    # optimise u = c / bound (||u|| <= 1) so one learning rate fits every scale of features
    u = g0.clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)

    def objective(uu):
        return F.cosine_similarity(a + (uu * bound[:, None]) @ m.T, t[None], dim=-1)

    with torch.enable_grad():
        best_u = u.detach().clone()
        best = objective(best_u)
        for _ in range(steps):
            opt.zero_grad()
            (-objective(u).sum()).backward()
            opt.step()
            with torch.no_grad():
                u.div_(u.norm(dim=-1, keepdim=True).clamp_min(1.0))  # project onto the unit ball
                val = objective(u)
                better = val > best
                best = torch.where(better, val, best)
                best_u[better] = u[better]
    best_c = best_u * bound[:, None]
    delta = best_c @ nb.T  # [N,D], exactly in the null space up to float64 rounding
    steered = hd + delta
    change = decomposition.logit_change(hd, steered)
    decomposition.assert_equivalent(hd, steered)
    as_after = attribute_score(steered, decomposition, translator, t, reference=hd)
    as_before = attribute_score(hd, decomposition, translator, t)
    out_feat = steered.to(h_in.dtype)
    res = SteerResult(features=out_feat, delta=delta.to(h_in.dtype), bound=bound,
                      cos_before=objective(torch.zeros_like(best_u)).detach(), cos_after=best.detach(),
                      attribute_score=as_after, attribute_score_before=as_before, logit_change=change,
                      info={"steps": steps, "lr": lr, "relative_to": relative_to, "norm_bound": norm_bound})
    if squeeze:
        for name in ("features", "delta", "bound", "cos_before", "cos_after", "attribute_score",
                     "attribute_score_before", "logit_change"):
            setattr(res, name, getattr(res, name)[0])
    return res


# --------------------------------------------------------------------------- tidy frames

def predicted_classes(extractor, logits: torch.Tensor) -> list[str]:
    """The class name (``extractor.classes``, else the index as a string) of each row's argmax, ``[N]``."""
    classes = getattr(extractor, "classes", None)
    idx = logits.argmax(-1).tolist()
    return [str(classes[i]) if classes else str(i) for i in idx]


def sing_scores(extractor, clip, translator: Translator, images: torch.Tensor, concepts: Sequence[str] | dict,
                *, decomposition: HeadDecomposition | None = None, labels: Sequence[Any] | None = None,
                image_ids: Sequence[Any] | None = None, templates: Sequence[str] | None = None,
                batch_size: int = 256, is_threshold: float = IS_LEAK_DEG,
                as_threshold: float = AS_LEAK_DEG) -> pd.DataFrame:
    """IS and AS of every image toward every concept: a tidy frame, one row per (image, concept).

    ``concepts``: strings (prompts, or concepts expanded with ``templates``) or a
    vocabulary group ``{label: [prompts]}`` such as ``TOY_VOCAB["color"]``.

    Columns: ``extractor``, ``clip``, ``image``, ``class`` (the classifier's
    prediction, from the logits of ``h``), ``label`` (``labels`` if given, else the
    prediction), ``concept``, ``image_score`` (IS, degrees), ``attribute_score``
    (AS, degrees), ``null_fraction`` (``||P_null h|| / ||h||``), and the leakage flags ``is_leak``
    (IS > ``is_threshold``), ``as_leak`` (|AS| > ``as_threshold``) and ``leak`` (either); the default
    thresholds, 12 and 4 degrees, are SING's demo reading of "substantial leakage".
    """
    for name, v in (("is_threshold", is_threshold), ("as_threshold", as_threshold)):
        if not (isinstance(v, (int, float)) and 0 <= v <= 180):
            raise ConfigError(f"{name} must be an angle in [0, 180] degrees, got {v!r}")
    decomposition = decomposition or head_decomposition(extractor)
    h = pre_logit_features(extractor, images, batch_size)
    t = concept_embeddings(clip, concepts if isinstance(concepts, dict) else list(concepts), templates)
    concepts = list(concepts)
    is_ = image_score(h, decomposition, translator).numpy()
    as_ = attribute_score(h, decomposition, translator, t).reshape(len(h), len(concepts)).numpy()
    frac = (decomposition.null_component(h.double()).norm(dim=-1) / h.double().norm(dim=-1).clamp_min(1e-12)).numpy()
    cls = predicted_classes(extractor, decomposition.logits(h.double()))
    ids = list(image_ids) if image_ids is not None else list(range(len(h)))
    lab = [str(v) for v in labels] if labels is not None else cls
    if len(ids) != len(h) or len(lab) != len(h):
        raise InputError(f"image_ids/labels must have one entry per image ({len(h)})")
    rows = []
    for i in range(len(h)):
        for k, c in enumerate(concepts):
            rows.append((ids[i], cls[i], lab[i], c, float(is_[i]), float(as_[i, k]), float(frac[i])))
    df = pd.DataFrame(rows, columns=["image", "class", "label", "concept", "image_score", "attribute_score",
                                     "null_fraction"])
    df["is_leak"] = df["image_score"] > is_threshold
    df["as_leak"] = df["attribute_score"].abs() > as_threshold
    df["leak"] = df["is_leak"] | df["as_leak"]
    df.insert(0, "clip", getattr(clip, "spec", None))
    df.insert(0, "extractor", getattr(extractor, "spec", None))
    return df


def sing_summary(frame: pd.DataFrame, by: Sequence[str] = ("extractor", "class", "concept"),
                 **kwargs) -> pd.DataFrame:
    """Class- or model-level IS/AS: mean and bootstrap CI per group (long format, see
    :func:`fiberbench.analysis.stats.per_class`).

    ``by=("extractor", "concept")`` gives the model-level aggregate.
    """
    stats = [c for c in ("image_score", "attribute_score", "abs_attribute_score", "cos_after", "null_fraction")
             if c in frame.columns]
    return per_class(frame, by=list(by), stats=stats, **kwargs)


def steering_table(extractor, clip, images: torch.Tensor, concept: str = "jellyfish", *,
                   translator: Translator | None = None, norm_bound: float = 1.0, relative_to: str | None = "null",
                   templates: Sequence[str] | None = None, labels: Sequence[Any] | None = None,
                   decomposition: HeadDecomposition | None = None, steps: int = 300,
                   fit_images: torch.Tensor | None = None, ridge: float = 1e-3,
                   batch_size: int = 256) -> pd.DataFrame:
    """SING's Table 1 protocol for one (extractor, CLIP) pair: steer every image's null space toward ``concept``.

    For each image, the null-space perturbation of norm ``<= norm_bound ·
    ||P_null h||`` (default ``relative_to="null"``: the steered null component is
    at most as large again as the image's own) that maximises the cosine to the
    concept; the logits are asserted unchanged; the achieved AS is measured against
    the image's null-removed features. The paper reports the mean |AS| toward
    "jellyfish" per model (ResNet50 12.04±0.25 …); :func:`steering_summary` gives it.

    If ``translator`` is ``None`` one is fitted on ``fit_images`` (else on
    ``images``; the fit's held-out cosine is recorded in every row).

    Returns one row per image: ``extractor``, ``clip``, ``image``, ``class``,
    ``label``, ``concept``, ``norm_bound``, ``image_score``, ``attribute_score_before``,
    ``attribute_score`` (after steering), ``abs_attribute_score``, ``cos_before``,
    ``cos_after``, ``logit_change``, ``translator_heldout_cosine``.
    """
    decomposition = decomposition or head_decomposition(extractor)
    if translator is None:
        translator = fit_translator(extractor, clip, fit_images if fit_images is not None else images, ridge=ridge,
                                    batch_size=batch_size)
    h = pre_logit_features(extractor, images, batch_size)
    res = steer(h, concept, norm_bound, decomposition=decomposition, translator=translator, clip=clip,
                relative_to=relative_to, steps=steps, templates=templates)
    cls = predicted_classes(extractor, decomposition.logits(h.double()))
    df = pd.DataFrame({
        "extractor": getattr(extractor, "spec", None), "clip": getattr(clip, "spec", None),
        "image": np.arange(len(h)), "class": cls,
        "label": [str(v) for v in labels] if labels is not None else cls,
        "concept": concept, "norm_bound": norm_bound,
        "image_score": image_score(h, decomposition, translator).numpy(),
        "attribute_score_before": res.attribute_score_before.numpy(),
        "attribute_score": res.attribute_score.numpy(),
        "abs_attribute_score": res.attribute_score.abs().numpy(),
        "cos_before": res.cos_before.numpy(), "cos_after": res.cos_after.numpy(),
        "logit_change": res.logit_change.numpy(),
        "translator_heldout_cosine": translator.metrics.get("heldout_cosine", float("nan")),
    })
    return df


def steering_summary(frame: pd.DataFrame, by: Sequence[str] = ("extractor", "concept")) -> pd.DataFrame:
    """Table-1 style: per model, mean ± std of |AS| after steering (and of IS), one row per group."""
    g = frame.groupby(list(by), sort=True)
    out = g.agg(abs_as_mean=("abs_attribute_score", "mean"), abs_as_std=("abs_attribute_score", "std"),
                as_mean=("attribute_score", "mean"), is_mean=("image_score", "mean"),
                cos_before=("cos_before", "mean"), cos_after=("cos_after", "mean"),
                max_logit_change=("logit_change", "max"), n=("abs_attribute_score", "size")).reset_index()
    return out


def steering_benchmark(extractors: Sequence[Any], clip, images: torch.Tensor, concept: str = "jellyfish", *,
                       fit_images: torch.Tensor | None = None, ridge: float = 1e-3, norm_bound: float = 1.0,
                       relative_to: str | None = "null", templates: Sequence[str] | None = None,
                       steps: int = 300, device: str = "cpu") -> tuple[pd.DataFrame, pd.DataFrame]:
    """SING Table 1 for several classifiers: one translator per model, steer toward ``concept``, |AS| per model.

    Args:
        extractors: Extractors or spec strings (``"timm/resnet50.a1_in1k@logits"``, ``"toy/shape-resnet@logits"``).
        clip: the ClipModel scoring every model (the paper: one CLIP for all).
        images: ``[N,3,H,W]`` in [0,1] to steer; ``fit_images`` (default ``images``) fit the translators.

    Returns:
        ``(per_image, summary)``: :func:`steering_table` rows of every model, and
        :func:`steering_summary` (``abs_as_mean``/``abs_as_std`` per model, the paper's columns)
        with each model's translator ``heldout_cosine``.
    """
    tables = []
    for ext in extractors:
        ext = load_extractor(ext, device=device) if isinstance(ext, str) else ext
        tables.append(steering_table(ext, clip, images, concept, norm_bound=norm_bound, relative_to=relative_to,
                                     templates=templates, steps=steps, fit_images=fit_images, ridge=ridge))
    per_image = pd.concat(tables, ignore_index=True)
    summary = steering_summary(per_image).merge(
        per_image.groupby(["extractor", "concept"])["translator_heldout_cosine"].first().reset_index(),
        on=["extractor", "concept"])
    return per_image, summary


def factor_probe(extractor, images: torch.Tensor, labels: Sequence[Any], *, factor: str = "factor",
                 decomposition: HeadDecomposition | None = None, ridge: float = 1e-3, holdout: float = 0.3,
                 seed: int = 0, batch_size: int = 256, features: torch.Tensor | None = None) -> pd.DataFrame:
    """Linear decodability of a known factor from the full, principal and null parts of the pre-logit features.

    The ground-truth side of SING on a world whose factors are known: if a
    factor is decodable from ``P_null h`` but not from ``P_principal h``, the
    classifier's null space carries it (the logits cannot see it). Ridge
    least squares on one-hot targets (``ridge`` relative as in
    :func:`fit_translator`), accuracy on a held-out split.

    Args:
        images: ``[N,3,H,W]`` in [0,1]; labels: one discrete label per image.
        features: precomputed pre-logit features ``[N,D]`` of ``images`` (skips the forward pass).

    Returns:
        Rows ``extractor, factor, space (full|principal|null), accuracy, chance, n_heldout``
        (``chance`` = frequency of the most common held-out label).
    """
    decomposition = decomposition or head_decomposition(extractor)
    h = (features if features is not None else pre_logit_features(extractor, images, batch_size)).double()
    labels = np.asarray([str(v) for v in labels], dtype=object)
    if len(labels) != len(h):
        raise InputError(f"labels must give one label per image ({len(h)}), got {len(labels)}")
    classes, y_idx = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise InputError(f"factor {factor!r} takes a single value in these images: nothing to probe")
    y = F.one_hot(torch.from_numpy(y_idx), len(classes)).double()
    n = len(h)
    n_test = max(1, int(round(holdout * n)))
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    test, train = perm[:n_test], perm[n_test:]
    chance = float(np.bincount(y_idx[test.numpy()], minlength=len(classes)).max() / n_test)
    rows = []
    spaces = (("full", h), ("principal", decomposition.equivalent(h)), ("null", decomposition.null_component(h)))
    for space, x in spaces:
        a, c = _ridge(x[train], y[train], ridge)
        pred = (x[test] @ a.T + c).argmax(-1).numpy()
        rows.append((getattr(extractor, "spec", None), factor, space, float((pred == y_idx[test.numpy()]).mean()),
                     chance, n_test))
    return pd.DataFrame(rows, columns=["extractor", "factor", "space", "accuracy", "chance", "n_heldout"])


# --------------------------------------------------------------------------- linear probes

@dataclass
class LinearProbe:
    """A linear classifier ``logits = weight @ h + bias`` fitted on a backbone's pre-logit features.

    Attributes:
        weight: ``[C,D]`` float32; bias: ``[C]`` float32; classes: the ``C`` label strings (row order).
        train_accuracy: accuracy on the fitting features, in [0, 1].
    """

    weight: torch.Tensor
    bias: torch.Tensor
    classes: list[str]
    train_accuracy: float

    def save(self, path: str | Path) -> Path:
        """Write ``weight``/``bias`` as safetensors (the file the timm loader's ``linear_probe=`` reads);
        the classes go into the metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path),
                  metadata={"classes": json.dumps(self.classes), "format": "fiberbench.linear_probe/1",
                            "train_accuracy": repr(self.train_accuracy)})
        return path


def fit_linear_probe(extractor, images: torch.Tensor | None = None, labels: Sequence[Any] | None = None, *,
                     features: torch.Tensor | None = None, weight_decay: float = 1e-4, steps: int = 100,
                     path: str | Path | None = None, batch_size: int = 256) -> LinearProbe:
    """Multinomial logistic regression on pre-logit features: a linear head for a backbone that has none.

    DINO-style protocol (SING's DINO-ViT row): the self-supervised backbone stays frozen, a linear layer
    on its features is trained for the labels; SING then analyses that layer's null space.

    Args:
        extractor: a backbone with pre-logit features (``None`` when ``features`` is given).
        images: ``[N,3,H,W]`` in [0,1]; labels: ``N`` labels (any hashables, classes sorted as strings).
        features: precomputed ``[N,D]`` instead of images.
        weight_decay: L2 penalty on the weight (times ``||W||²/2``, per sample mean loss).
        steps: L-BFGS iterations (float64, full batch).
        path: if given, the probe is also saved there (:meth:`LinearProbe.save`).

    Returns:
        :class:`LinearProbe` (``weight [C,D]``, ``bias [C]`` float32).
    """
    if features is None:
        if images is None or extractor is None:
            raise ConfigError("fit_linear_probe needs images and an extractor, or features=")
        features = pre_logit_features(extractor, images, batch_size)
    x = torch.as_tensor(features).detach().double()
    lab = np.asarray([str(v) for v in (labels if labels is not None else [])], dtype=object)
    if x.ndim != 2 or len(lab) != len(x):
        raise InputError(f"need features [N,D] and one label per row; got {tuple(x.shape)} and {len(lab)} labels")
    classes, y = np.unique(lab, return_inverse=True)
    if len(classes) < 2:
        raise InputError("a linear probe needs at least two classes")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ConfigError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    yt = torch.from_numpy(y)
    # standardise for the optimiser's sake, then fold the scaling back into the head acting on raw features
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-8)
    xs = (x - mu) / sd
    w = torch.zeros(len(classes), x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w.T + b, yt) + 0.5 * weight_decay * (w / sd).pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight = (w / sd).detach()
    bias = (b - weight @ mu).detach()
    acc = float(((x @ weight.T + bias).argmax(-1) == yt).double().mean())
    probe = LinearProbe(weight.float(), bias.float(), [str(c) for c in classes], acc)
    if path is not None:
        probe.save(path)
    return probe


def sing_images(source: str = "toy", n_fit: int = 1000, n_score: int = 48, *, size: int | None = None,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame | None]:
    """Images for SING: ``(fit_images [n_fit,3,H,W], images [n_score,3,H,W], factors or None)``, in [0,1].

    ``source="toy"``: fresh renders (seeds ``10_000 + seed`` to fit, ``20_000 + seed`` to score) and the
    scored renders' factor table. A folder: its images sorted by name at ``size`` (required when they differ),
    the last ``n_score`` scored and up to ``n_fit`` of the others fitting the translator; factors ``None``.
    """
    if source == "toy":
        fit, _ = references(n_fit, seed=10_000 + seed)
        images, factors = references(n_score, seed=20_000 + seed)
        return fit, images, factors
    folder, _ = load_image_folder(source, size=size)
    if len(folder) < n_score + 2:
        raise InputError(f"{source} holds {len(folder)} images: SING needs {n_score} to score and at least 2 more "
                         f"to fit the translator")
    rest = folder[:len(folder) - n_score]
    return rest[:n_fit], folder[len(folder) - n_score:], None


def toy_labels(extractor, factors: pd.DataFrame | None) -> list[str] | None:
    """The true class of each image for a toy classifier (its card's ``target`` column of ``factors``), else None."""
    target = (getattr(extractor, "card", {}) or {}).get("target")
    if factors is None or target not in getattr(factors, "columns", ()):
        return None
    return [str(v) for v in factors[target]]


def load_sing_extractors(specs: Sequence[str], probes: dict[str, str] | None = None, device: str = "cpu") -> dict:
    """``{spec: Extractor}`` for SING, each with a linear head: ``probes`` maps a headless backbone's spec to its
    linear-probe file (the timm loader's ``linear_probe=``). ``ConfigError`` up front for a model without one."""
    probes = dict(probes or {})
    unknown = sorted(set(probes) - set(specs))
    if unknown:
        raise ConfigError(f"linear probes given for {unknown}, which are not among the extractors {list(specs)}")
    out = {}
    for spec in specs:
        ext = load_extractor(spec, device=device, **({"linear_probe": probes[spec]} if spec in probes else {}))
        ext.classifier()  # a model SING cannot analyse fails here, with the reason
        out[spec] = ext
    return out


TOY_SING_MODELS = ("toy/shape-resnet@logits", "toy/color-vit@logits")


def toy_sing_report(clip, extractors: Sequence[Any] = TOY_SING_MODELS, *, n_fit: int = 1500, n_test: int = 300,
                    seed: int = 4242, ridge: float = 1e-3,
                    steer_concepts: Sequence[str] = ("a red shape.", "a triangle."),
                    steer_images: int = 100, steps: int = 200, n_boot: int = 1000) -> dict[str, pd.DataFrame]:
    """SING on the shapes world, where the truth is known: IS/AS per class toward colour and shape words.

    For each toy classifier: fit a translator on ``n_fit`` fresh renders, score
    ``n_test`` other renders against :data:`~fiberbench.semantics.TOY_VOCAB`'s colour and
    shape prompts, and steer ``steer_images`` of them toward each of ``steer_concepts``.

    Returns a dict of tidy frames:
        ``translators``: ``extractor, heldout_cosine, baseline_cosine, train_cosine, rank, null_dim``;
        ``scores``: :func:`sing_scores` rows plus ``group`` (color|shape), ``true_color``,
            ``true_shape`` and ``is_true`` (the concept is the image's own colour/shape);
        ``per_class``: mean + bootstrap CI of IS and of AS toward the *image's own* colour and
            shape, per ``extractor, class, group`` (long format);
        ``steering``: :func:`steering_summary` per model and concept.
    A shape classifier whose null space carries colour shows a negative AS toward the
    image's own colour (removing the null component moves it away from its colour word).
    """
    fit_x, _ = references(n_fit, seed)
    test_x, test_f = references(n_test, seed + 1)
    tr_rows, score_frames, steer_frames = [], [], []
    for ext in extractors:
        ext = load_extractor(ext) if isinstance(ext, str) else ext
        d = head_decomposition(ext)
        tr = fit_translator(ext, clip, fit_x, ridge=ridge)
        tr_rows.append({"extractor": ext.spec, **{k: tr.metrics[k] for k in ("heldout_cosine", "baseline_cosine",
                                                                            "train_cosine")},
                        "rank": d.rank, "null_dim": d.null_dim})
        target = (getattr(ext, "card", {}) or {}).get("target")
        labels = test_f[target] if target in test_f.columns else None
        for group in ("color", "shape"):
            df = sing_scores(ext, clip, tr, test_x, TOY_VOCAB[group], decomposition=d, labels=labels)
            df["group"] = group
            df["true_color"] = test_f["color"].to_numpy()[df["image"].to_numpy()]
            df["true_shape"] = test_f["shape"].to_numpy()[df["image"].to_numpy()]
            df["is_true"] = df["concept"] == df[f"true_{group}"]
            score_frames.append(df)
        for concept in steer_concepts:
            steer_frames.append(steering_table(ext, clip, test_x[:steer_images], concept, translator=tr,
                                               decomposition=d, steps=steps, labels=labels[:steer_images]
                                               if labels is not None else None))
    scores = pd.concat(score_frames, ignore_index=True)
    own = scores[scores["is_true"]]
    pc = per_class(own, by=["extractor", "label", "group"], stats=["image_score", "attribute_score"],
                   n_boot=n_boot).rename(columns={"label": "class"})
    steering = steering_summary(pd.concat(steer_frames, ignore_index=True))
    return {"translators": pd.DataFrame(tr_rows), "scores": scores, "per_class": pc, "steering": steering}
