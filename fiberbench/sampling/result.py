"""The result of a fiber run: images, distances, per-sample status, and the run's identity."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import diffusers
import pandas as pd
import torch
import torch.nn.functional as F

from ..identity import content_key
from ..version import __version__

# the config entries that define a run's samples (its run_id); timings, devices and batch sizes do not
RUN_ID_KEYS = ("extractor", "prior", "method", "loss", "steps", "seed", "n", "init", "hyperparameters",
               "reference_hash")
# the fiber loss in every convention the fiber paper reports, one per-sample column each (see fiber_losses)
FIBER_LOSS_COLUMNS = ("fiber_sq_l2", "fiber_l2", "fiber_l1", "fiber_ce", "fiber_ce_soft", "fiber_rms", "fiber_cos")


def fiber_losses(features: torch.Tensor, reference_features: torch.Tensor, logits: bool) -> dict[str, torch.Tensor]:
    """Per-sample fiber loss in every convention of the fiber paper, each ``[M]`` float64.

    ``features`` ``[M,D]`` of the samples and ``reference_features`` ``[M,D]`` (the reference's, repeated per
    sample). ``fiber_sq_l2`` = sum_d (f - h)^2 (Tables 5-7), ``fiber_l2`` its square root (the cost NDTM
    minimises with ``loss="l2"``), ``fiber_l1`` = sum_d |f - h| (Table 7), ``fiber_rms`` = sqrt(mean_d (f - h)^2)
    (colorMNIST), ``fiber_cos`` = 1 - cos(f, h) in [0, 2]. For classifier logits (``logits=True``) also
    ``fiber_ce``, the cross-entropy of the sample's logits against the argmax of the reference's (>= 0), and
    ``fiber_ce_soft``, against the softmax of the reference's (Table 7's evaluation code; >= the entropy of
    that softmax, so not 0 on the fiber); NaN for other features, where a softmax means nothing.
    """
    f, h = features.detach().double().cpu(), reference_features.detach().double().cpu()
    sq = (f - h).pow(2).sum(-1)
    nan = torch.full_like(sq, float("nan"))
    return {
        "fiber_sq_l2": sq, "fiber_l2": sq.sqrt(), "fiber_l1": (f - h).abs().sum(-1),
        "fiber_ce": F.cross_entropy(f, h.argmax(-1), reduction="none") if logits else nan,
        "fiber_ce_soft": F.cross_entropy(f, h.softmax(-1), reduction="none") if logits else nan,
        "fiber_rms": (sq / max(f.shape[-1], 1)).sqrt(),
        "fiber_cos": 1 - F.cosine_similarity(f, h, dim=-1, eps=1e-12),
    }


def is_logits(spec: str | None) -> bool:
    """Whether an extractor spec returns a classifier's logits (a loaded extractor's spec names its layer:
    ``toy/shape-resnet@logits``, ``timm/resnet50.a1_in1k@logits``)."""
    return isinstance(spec, str) and spec.rsplit("@", 1)[-1] == "logits"


@dataclass
class FiberResult:
    """Samples of the fibers of one or more references.

    Attributes:
        images: ``[B*n,3,H,W]`` in [0,1], reference-major (rows i*n … i*n+n-1 belong to reference i).
        reference: ``[B,3,H,W]`` in [0,1]; all zeros (black, the prior's size) for fibers of given feature vectors
            without reference images (``sample_fiber(target_features=...)``: ``reference_features`` holds the
            targets and ``config["targets"]`` says ``"features"``).
        feature_distance: ``[B*n]`` final fiber loss (``config["loss"]``) against the fixed target f(x_ref).
        cosine: ``[B*n]`` cosine similarity of sample and reference features.
        status: per sample ``"ok"``, ``"recovered: non-finite loss 2 times; lr halved 2 times"`` (faults
            retried at a smaller step size) or ``"failed: <reason>; <fault history>"`` (final image or
            features non-finite, guidance given up after ``MAX_HALVINGS`` halvings, or no guided update
            ever finite).
        config: every hyper-parameter, spec strings, seed, versions, timings and call counts.
        loss_history: ``[steps, B*n]`` fiber loss at each denoising step (NaN where not computed).
        trajectory: ``[steps, B*n, 3, H, W]`` decoded x0_hat per step, when asked for.
        reference_ids: one id per reference (strings), repeated per sample in ``to_frame()``.
    """

    images: torch.Tensor
    reference: torch.Tensor
    feature_distance: torch.Tensor
    cosine: torch.Tensor
    status: list[str]
    config: dict[str, Any]
    loss_history: torch.Tensor | None = None
    trajectory: torch.Tensor | None = None
    reference_ids: list[str] | None = None
    features: torch.Tensor | None = None
    reference_features: torch.Tensor | None = None
    latents: torch.Tensor | None = None  # [B*n, C, h, w] final x0 in the prior's own space (before decoding)

    @property
    def n(self) -> int:
        return int(self.config["n"])

    def fiber(self, i: int) -> torch.Tensor:
        """Samples of reference ``i``: ``[n,3,H,W]``."""
        return self.images[i * self.n:(i + 1) * self.n]

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: one row per sample with specs, method, hyper-parameters, seed, distances, status.

        ``feature_distance`` is the run's own loss (``config["loss"]``); the :data:`FIBER_LOSS_COLUMNS` hold the
        same features' distance in every convention of the fiber paper (:func:`fiber_losses`; NaN when the
        result carries no features).
        """
        m = self.images.shape[0]
        n = self.n
        ids = self.reference_ids or [str(i) for i in range(self.reference.shape[0])]
        c = self.config
        rows = {
            "run_id": [c["run_id"]] * m,
            "reference": [i // n for i in range(m)],
            "reference_id": [ids[i // n] for i in range(m)],
            "sample": [i % n for i in range(m)],
            "sample_seed": c["sample_seeds"],
            "extractor": [c["extractor"]] * m, "prior": [c["prior"]] * m, "method": [c["method"]] * m,
            "loss": [c["loss"]] * m, "steps": [c["steps"]] * m, "seed": [c["seed"]] * m,
            "init": [str(c["init"])] * m,
            "feature_distance": self.feature_distance.tolist(), "cosine": self.cosine.tolist(),
            "status": self.status,
        }
        if self.features is not None and self.reference_features is not None:
            ref = self.reference_features.repeat_interleave(n, dim=0)
            rows.update({k: v.tolist() for k, v in fiber_losses(self.features, ref, is_logits(c["extractor"])).items()})
        else:
            rows.update({k: [float("nan")] * m for k in FIBER_LOSS_COLUMNS})
        df = pd.DataFrame(rows)
        for k, v in sorted(c["hyperparameters"].items()):
            df[f"hp_{k}"] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
        return df


def run_versions() -> dict[str, str]:
    """Versions of the libraries whose arithmetic a result depends on."""
    return {"fiberbench": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def run_id(config: dict[str, Any]) -> str:
    """The 16-hex identity of a run: a content key of :data:`RUN_ID_KEYS` of its config."""
    return content_key({k: config.get(k) for k in RUN_ID_KEYS}, length=16)


def fault_history(events: dict[str, int], halvings: int, gave_up: int, unit: str, total: int,
                   knob: str = "lr") -> str:
    """What happened to one sample's numerics, for its ``status``: e.g. ``non-finite loss 2 times; lr
    halved 2 times`` or ``non-finite gradient 5 times; lr halved 4 times, then guidance given up at
    denoising step 3 of 4 (unguided from there)``. ``knob`` names the step size (``scale`` for DPS)."""
    seen = [f"{k} {v} time{'s' if v != 1 else ''}" for k, v in events.items() if v]
    if not seen:
        return "no non-finite value during sampling"
    text = "non-finite " + ", ".join(seen)
    if events.get("state"):
        text += " (that step redone unguided)"
    if halvings:
        text += f"; {knob} halved {halvings} time{'s' if halvings != 1 else ''}"
    if gave_up >= 0:
        after = "frozen at its last finite image" if unit == "iteration" else "unguided from there"
        text += f", then guidance given up at {unit} {gave_up + 1} of {total} ({after})"
    return text


def sample_status(*, finite: bool, dist_finite: bool, gave_up: int, faults: int, updates: int, guided: bool,
                  history: str) -> str:
    """One sample's ``status``: ``ok``, ``recovered: <history>`` or ``failed: <reason>; <history>``."""
    if not finite:
        return f"failed: the sample's image is non-finite (set to 0); {history}"
    if not dist_finite:
        return f"failed: the extractor gave non-finite features for the final image; {history}"
    if gave_up >= 0:
        return f"failed: {history}"
    if faults > 0 and guided and updates == 0:
        return f"failed: every guided update was non-finite ({history}); the sample is effectively unguided"
    if faults > 0:
        return f"recovered: {history}"
    return "ok"
