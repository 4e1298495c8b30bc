"""Fiber samplers: draw images ``x`` with ``f(x) ~ f(x_ref)`` under a pretrained prior.

Every method is a plain function of one signature (as in k-diffusion)::

    x0 = sample_<method>(problem, x, sched, callback=None, disable=None, **hp)

``problem`` (:class:`FiberProblem`) holds the prior, the fiber loss and the
per-sample noise; ``x`` is the starting state ``[M,C,H,W]`` in the prior's
space; ``sched`` the prior's :class:`~fiberbench.priors.Schedule`. Methods:

- ``ndtm``: Non-linear Diffusion Trajectory Matching with the fiber loss as
  terminal cost (Pandey et al. 2025; Rousselot et al. 2026);
- ``dps``: one gradient step of the fiber loss w.r.t. x_t through x0_hat per step (Chung et al. 2023);
- ``metamer``: gradient descent on pixels from noise, no prior (Feather et al. 2023);
- ``unguided``: plain sampling from the prior.

:func:`sample_fiber` is the public entry point: it validates the request,
builds targets and per-sample generators, batches, recovers from faults and
returns a :class:`FiberResult`.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .errors import ConfigError, InputError

METHODS = ("ndtm", "dps", "metamer", "unguided")
LOSSES = ("l2", "cosine", "nl2")

# Gamma schedules are segments (gamma_start, gamma_end, tau_from, tau_to) over the common
# time scale tau in [0, 1000] (1000 = pure noise); gamma is linear inside a segment.
PRESETS: dict[str, dict[str, Any]] = {
    # the fiber paper's sampling scripts (vislearn/InvarianceAuditing), see DESIGN.md
    "fiber-imagenet": dict(steps=200, inner_steps=5, lr=2e-3, w_ctrl=0.0, w_score=0.0, w_term=1.0, loss="l2",
                           gamma=[(0, 0, 1000, 800), (3, 3, 800, 600), (1, 0.5, 600, 200), (2, 10, 200, 0)],
                           eta=1.0, target="time", adam_eps=1e-8),
    "fiber-chexpert": dict(steps=100, inner_steps=4, lr=2e-3, w_ctrl=0.0, w_score=0.0, w_term=1.0, loss="l2",
                           gamma=[(0, 0, 1000, 500), (0, 10, 500, 0)], eta=0.5, target="time", adam_eps=1e-8),
    "fiber-vlm": dict(steps=100, inner_steps=7, lr=2e-3, w_ctrl=1e-4, w_score=0.0, w_term=1.0, loss="l2",
                      gamma=[(0, 0, 1000, 600), (10, 10, 600, 200), (20, 20, 200, 0)], eta=0.25, target="time",
                      adam_eps=1e-8),
    "fiber-colormnist": dict(steps=200, inner_steps=10, lr=2e-2, w_ctrl=3e-4, w_score=0.0, w_term=1.0, loss="l2",
                             gamma=[(0, 0, 1000, 500), (5, 5, 500, 0)], eta=1.0, target="fixed", adam_eps=1e-8),
    # ours, tuned on the shapes world with `fiberbench bench` (see docs/performance.md)
    # eta=1 (stochastic steps) lets the prior wash out the high-frequency residue of Adam's sign-like
    # control updates: on 12 references x 4 samples validity 0.50 -> 0.92 at feature match 1.00
    # (eta 0 / lr 0.05 -> eta 1 / lr 0.1; see docs/performance.md)
    "toy": dict(steps=20, inner_steps=4, lr=0.1, w_ctrl=0.0, w_score=0.0, w_term=1.0, loss="cosine",
                gamma=[(0, 0, 1000, 900), (1, 1, 900, 0)], eta=1.0, target="fixed", control_init="zero"),
}

NDTM_DEFAULTS = dict(inner_steps=4, lr=0.05, lr_decay="linear", w_ctrl=0.0, w_score=0.0, w_term=1.0,
                     gamma=[(0, 0, 1000, 900), (1, 1, 900, 0)], eta=0.0, target="fixed", control_init="zero",
                     grad_clip=1.0, adam_eps=1e-4)
DPS_DEFAULTS = dict(scale=1.0, gamma=[(0, 0, 1000, 900), (1, 1, 900, 0)], eta=0.0, target="fixed")
METAMER_DEFAULTS = dict(iters=200, lr=0.02)
UNGUIDED_DEFAULTS = dict(eta=0.0)
DEFAULTS = {"ndtm": NDTM_DEFAULTS, "dps": DPS_DEFAULTS, "metamer": METAMER_DEFAULTS, "unguided": UNGUIDED_DEFAULTS}


# --------------------------------------------------------------------------- pieces

def gamma_at(gamma, tau: float) -> float:
    """Guidance weight at common time ``tau`` for a constant or a segment list.

    Segments ``(g_start, g_end, tau_from, tau_to)`` with ``tau_from > tau_to``;
    inside one, gamma goes linearly from ``g_start`` (at ``tau_from``) to
    ``g_end`` (at ``tau_to``). Outside every segment gamma is 0.
    """
    if isinstance(gamma, (int, float)):
        return float(gamma)
    for g0, g1, a, b in gamma:
        hi, lo = max(a, b), min(a, b)
        if lo <= tau <= hi and (tau < hi or hi >= 1000 or tau == hi):
            frac = 0.0 if a == b else (a - tau) / (a - b)
            return float(g0 + (g1 - g0) * frac)
    return 0.0


def fiber_distance(feats: torch.Tensor, target: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-sample fiber loss ``[M]`` between features ``[M,D]`` and targets ``[M,D]``.

    ``l2``: ||f - h||_2 (unsquared, the paper's); ``cosine``: 1 - cos(f, h);
    ``nl2``: ||f - h||_2 / ||h||_2.
    """
    if metric == "l2":
        return (feats - target).norm(dim=-1)
    if metric == "cosine":
        return 1 - F.cosine_similarity(feats, target, dim=-1, eps=1e-8)
    if metric == "nl2":
        return (feats - target).norm(dim=-1) / target.norm(dim=-1).clamp(min=1e-8)
    raise ConfigError(f"unknown fiber loss {metric!r}; choose one of {LOSSES}")


class NoiseSource:
    """One ``torch.Generator`` per sample, so sample *i* is the same alone or in any batch.

    Noise is drawn on the CPU (reproducible across devices) and moved to ``device``.
    """

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device, dtype=torch.float32):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device, self.dtype = tuple(shape), device, dtype

    def draw(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        shape = tuple(shape or self.shape)
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens]).to(self.device, self.dtype)

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.rand(shape, generator=g) for g in self.gens]).to(self.device, self.dtype)

    def subset(self, idx: Sequence[int]) -> "NoiseSource":
        out = NoiseSource.__new__(NoiseSource)
        out.gens = [self.gens[i] for i in idx]
        out.shape, out.device, out.dtype = self.shape, self.device, self.dtype
        return out


def sample_seed(seed: int, ref: int, j: int) -> int:
    """The generator seed of sample ``j`` of reference ``ref`` in a run with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(ref), int(j)]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class FiberProblem:
    """What a sampler needs: the prior, the fiber loss, targets and per-sample noise, plus bookkeeping."""

    prior: Any
    extractor: Any
    target: torch.Tensor  # [M,D] fixed targets f(x_ref) per sample
    metric: str
    noise: NoiseSource
    ref_latent: torch.Tensor | None = None  # [R,C,H,W] encode(x_ref) of the R references in this batch
    ref_noise: torch.Tensor | None = None  # [R,C,H,W] fixed noise per reference used for h_t
    ref_rows: torch.Tensor | None = None  # [M] which of the R references each sample belongs to
    autocast: torch.dtype | None = None
    calls: dict[str, int] = field(default_factory=lambda: {"denoiser": 0, "extractor": 0})
    faults: torch.Tensor | None = None  # [M] count of non-finite events per sample
    history: list[torch.Tensor] = field(default_factory=list)  # per step: [M] fiber loss (NaN where not computed)
    trajectory: list[torch.Tensor] | None = None
    _target_cache: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.faults is None:
            self.faults = torch.zeros(self.target.shape[0], dtype=torch.long)

    def _amp(self):
        dev = self.target.device.type
        return torch.autocast(dev, dtype=self.autocast, enabled=self.autocast is not None)

    def denoise(self, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls["denoiser"] += 1
        with self._amp():
            x0, eps = self.prior.denoise(x_t, t)
        return x0.float(), eps.float()

    def features(self, x0: torch.Tensor) -> torch.Tensor:
        """Extractor features of prior-space x0 (decoded to [0,1] images first)."""
        self.calls["extractor"] += 1
        with self._amp():
            return self.extractor(self.prior.decode(x0)).float()

    def target_at(self, t, mode: str) -> torch.Tensor:
        """The fiber target at model time ``t``: fixed f(x_ref), or h_t = f(x0_hat(x_ref noised to t))."""
        if mode == "fixed" or self.ref_latent is None:
            return self.target
        if mode != "time":
            raise ConfigError(f"unknown target mode {mode!r}; use 'fixed' or 'time'")
        with torch.no_grad():  # once per reference, not once per sample: samples of a fiber share h_t
            x_t = self.prior.add_noise(self.ref_latent, t, self.ref_noise)
            x0, _ = self.denoise(x_t, t)
            return self.features(x0)[self.ref_rows]

    def loss(self, x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample fiber loss ``[M]`` of prior-space x0."""
        return fiber_distance(self.features(x0), target, self.metric)

    def record(self, i: int, loss: torch.Tensor | None, x0: torch.Tensor | None = None) -> None:
        m = self.target.shape[0]
        self.history.append(loss.detach().float().cpu() if loss is not None else torch.full((m,), float("nan")))
        if self.trajectory is not None and x0 is not None:
            self.trajectory.append(self.prior.decode(x0.detach()).cpu())


def _finite_rows(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)


def _report(callback, i, t, x, x0, problem, loss=None):
    if callback is not None:
        callback({"i": i, "t": float(t), "x": x.detach(), "denoised": x0.detach(),
                  "images": problem.prior.decode(x0.detach()), "loss": None if loss is None else loss.detach()})


def _progress(total: int, disable: bool | None):
    from tqdm.auto import trange

    return trange(total, disable=disable, leave=False, desc="fiber")


# --------------------------------------------------------------------------- samplers

def sample_unguided(problem: FiberProblem, x: torch.Tensor, sched, callback=None, disable=None,
                    eta: float = 0.0) -> torch.Tensor:
    """Plain sampling from the prior (DDIM with ``eta``; the Euler step for flows)."""
    for i in _progress(len(sched), disable):
        t, s = sched.times[i], sched.times[i + 1]
        with torch.no_grad():
            x0, eps = problem.denoise(x, t)
            x = problem.prior.step(x, x0, eps, t, s, eta, problem.noise.draw() if eta > 0 else None)
        problem.record(i, None, x0)
        _report(callback, i, t, x, x0, problem)
    return x0


def sample_ndtm(problem: FiberProblem, x: torch.Tensor, sched, callback=None, disable=None, *,
                inner_steps: int = 4, lr: float = 0.05, lr_decay: str = "linear", w_ctrl: float = 0.0,
                w_score: float = 0.0, w_term: float = 1.0, gamma=1.0, eta: float = 0.0, target: str = "fixed",
                control_init: str = "zero", grad_clip: float = 1.0, adam_eps: float = 1e-8) -> torch.Tensor:
    """NDTM: at every step optimise a control u so that x0_hat(x_t + gamma_t u) lies in the fiber.

    Cost ``C = w_ctrl ||gamma u||^2 + w_score ||eps(x_t) - eps(x_t + gamma u)||^2 + w_term L_fiber``,
    minimised with ``inner_steps`` Adam steps (fresh optimiser each step, gradient clipped to norm
    ``grad_clip`` per sample, lr decaying linearly over the trajectory); then a DDIM step (``eta``)
    from the controlled state. Adam's first step is ``lr * sign(g)``: components whose gradient is
    float noise move as much as real ones, which makes results depend on batch size through
    round-off; ``adam_eps`` well above that noise (e.g. 1e-4 with unit-norm gradients) damps them.
    ``control_init="zero"`` restarts u at 0 (the paper's); ``"warm"`` starts from the previous
    step's control.
    """
    n_steps = len(sched)
    u = torch.zeros_like(x)
    for i in _progress(n_steps, disable):
        t, s = sched.times[i], sched.times[i + 1]
        g = gamma_at(gamma, float(sched.taus[i]))
        rate = lr * (1.0 - i / n_steps) if lr_decay == "linear" else lr
        loss = None
        if g > 0 and inner_steps > 0 and rate > 0:
            h = problem.target_at(t, target)
            eps_base = None
            if w_score:
                with torch.no_grad():
                    _, eps_base = problem.denoise(x, t)
            u = torch.zeros_like(x) if control_init == "zero" else u.detach()
            u.requires_grad_(True)
            opt = torch.optim.Adam([u], lr=rate, eps=adam_eps)
            for _ in range(inner_steps):
                assert torch.is_grad_enabled(), "guided step needs autograd (a pipeline may have disabled it)"
                x0, eps = problem.denoise(x + g * u, t)
                loss = problem.loss(x0, h)
                cost = w_term * loss
                if w_ctrl:
                    cost = cost + w_ctrl * (g * u).flatten(1).pow(2).sum(1)
                if eps_base is not None:
                    cost = cost + w_score * (eps_base - eps).flatten(1).pow(2).sum(1)
                opt.zero_grad(set_to_none=True)
                cost.sum().backward()
                grad = u.grad
                ok = _finite_rows(grad) & torch.isfinite(cost.detach())
                if not ok.all():  # a sample's loss or gradient went non-finite: skip its update
                    problem.faults[~ok.cpu()] += 1
                    grad[~ok] = 0
                norms = grad.flatten(1).norm(dim=1).clamp(min=1e-12)
                grad.mul_((grad_clip / norms).clamp(max=1.0).view(-1, *[1] * (grad.ndim - 1)))
                opt.step()
            u = u.detach()
            u[~_finite_rows(u)] = 0
        with torch.no_grad():
            xc = x + g * u if g > 0 else x
            x0, eps = problem.denoise(xc, t)
            x_new = problem.prior.step(xc, x0, eps, t, s, eta, problem.noise.draw() if eta > 0 else None)
            bad = ~_finite_rows(x_new)
            if bad.any():  # fall back to the unguided step for those samples
                problem.faults[bad.cpu()] += 1
                x0u, epsu = problem.denoise(x[bad], t)
                x0[bad] = x0u
                x_new[bad] = problem.prior.step(x[bad], x0u, epsu, t, s, 0.0)
            x = x_new
        problem.record(i, loss, x0)
        _report(callback, i, t, x, x0, problem, loss)
    return x0


def sample_dps(problem: FiberProblem, x: torch.Tensor, sched, callback=None, disable=None, *,
               scale: float = 1.0, gamma=1.0, eta: float = 0.0, target: str = "fixed") -> torch.Tensor:
    """DPS: ``x_s = step(x_t) - scale * gamma_t * grad_{x_t} L_fiber(x0_hat(x_t))`` (one gradient a step)."""
    for i in _progress(len(sched), disable):
        t, s = sched.times[i], sched.times[i + 1]
        g = gamma_at(gamma, float(sched.taus[i]))
        loss = None
        if g > 0 and scale > 0:
            h = problem.target_at(t, target)
            xg = x.detach().requires_grad_(True)
            x0, eps = problem.denoise(xg, t)
            loss = problem.loss(x0, h)
            grad, = torch.autograd.grad(loss.sum(), xg)
            ok = _finite_rows(grad)
            if not ok.all():
                problem.faults[~ok.cpu()] += 1
                grad[~ok] = 0
            with torch.no_grad():
                x = problem.prior.step(x, x0.detach(), eps.detach(), t, s, eta,
                                       problem.noise.draw() if eta > 0 else None) - scale * g * grad
            x0 = x0.detach()
        else:
            with torch.no_grad():
                x0, eps = problem.denoise(x, t)
                x = problem.prior.step(x, x0, eps, t, s, eta, problem.noise.draw() if eta > 0 else None)
        problem.record(i, loss, x0)
        _report(callback, i, t, x, x0, problem, loss)
    return x0


def sample_metamer(problem: FiberProblem, x: torch.Tensor, sched, callback=None, disable=None, *,
                   iters: int = 200, lr: float = 0.02) -> torch.Tensor:
    """Model metamers: Adam on the pixels of a noise image until its features match; no prior.

    Starts from uniform noise in [0,1] (per-sample generators); pixels are kept in [0,1].
    """
    img = problem.noise.uniform(tuple(x.shape[1:]) if not problem.prior.latent else
                                (3, problem.prior.image_size, problem.prior.image_size))
    img.requires_grad_(True)
    opt = torch.optim.Adam([img], lr=lr)
    every = max(1, iters // max(1, len(sched)))
    for i in _progress(iters, disable):
        problem.calls["extractor"] += 1
        with problem._amp():
            loss = fiber_distance(problem.extractor(img).float(), problem.target, problem.metric)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        grad = img.grad
        grad[~_finite_rows(grad)] = 0
        opt.step()
        with torch.no_grad():
            img.clamp_(0, 1)
        if i % every == 0 or i == iters - 1:
            problem.history.append(loss.detach().cpu())
            if callback is not None:
                callback({"i": i, "t": float("nan"), "x": img.detach(), "denoised": img.detach(),
                          "images": img.detach(), "loss": loss.detach()})
    # metamers live in pixel space: hand back prior-space values that decode to them
    return problem.prior.encode(img.detach()) if not problem.prior.latent else img.detach()


SAMPLERS: dict[str, Callable] = {"ndtm": sample_ndtm, "dps": sample_dps, "metamer": sample_metamer,
                                 "unguided": sample_unguided}


# --------------------------------------------------------------------------- result

@dataclass
class FiberResult:
    """Samples of the fibers of one or more references.

    Attributes:
        images: ``[B*n,3,H,W]`` in [0,1], reference-major (rows i*n … i*n+n-1 belong to reference i).
        reference: ``[B,3,H,W]`` in [0,1].
        feature_distance: ``[B*n]`` final fiber loss (``config["loss"]``) against the fixed target f(x_ref).
        cosine: ``[B*n]`` cosine similarity of sample and reference features.
        status: per sample ``"ok"``, ``"recovered: …"`` or ``"failed: …"``.
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
        """Tidy table: one row per sample with specs, method, hyper-parameters, seed, distances, status."""
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
        df = pd.DataFrame(rows)
        for k, v in sorted(c["hyperparameters"].items()):
            df[f"hp_{k}"] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
        return df


def _versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    return {"fiberbench": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def _run_id(config: dict[str, Any]) -> str:
    keys = ("extractor", "prior", "method", "loss", "steps", "seed", "n", "init", "hyperparameters", "reference_hash")
    blob = json.dumps({k: config.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def resolve_hyperparameters(method: str, preset: str | None, overrides: dict[str, Any]) -> tuple[dict, dict]:
    """Merge method defaults < preset < explicit keyword arguments; reject unknown names.

    Returns ``(hyperparameters for the sampler function, run-level settings from the preset)``.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {METHODS}")
    allowed = DEFAULTS[method]
    run_keys = ("steps", "loss")
    hp = dict(allowed)
    run: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
        for k, v in PRESETS[preset].items():
            if k in run_keys:
                run[k] = v
            elif k in allowed:
                hp[k] = v
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown hyper-parameter(s) {unknown} for method {method!r}; "
                          f"valid: {sorted(allowed)}")
    hp.update(overrides)
    if "inner_steps" in hp and (int(hp["inner_steps"]) != hp["inner_steps"] or hp["inner_steps"] < 0):
        raise ConfigError(f"inner_steps must be a non-negative integer, got {hp['inner_steps']!r}")
    for k in ("lr", "scale", "w_ctrl", "w_score", "w_term", "eta"):
        if k in hp and (not isinstance(hp[k], (int, float)) or hp[k] < 0 or not math.isfinite(hp[k])):
            raise ConfigError(f"{k} must be a finite number >= 0, got {hp[k]!r}")
    if "eta" in hp and hp["eta"] > 1:
        raise ConfigError(f"eta must lie in [0, 1], got {hp['eta']}")
    if "iters" in hp and (int(hp["iters"]) != hp["iters"] or hp["iters"] < 1):
        raise ConfigError(f"iters must be a positive integer, got {hp['iters']!r}")
    if "target" in hp and hp["target"] not in ("fixed", "time"):
        raise ConfigError(f"target must be 'fixed' or 'time', got {hp['target']!r}")
    if "control_init" in hp and hp["control_init"] not in ("zero", "warm"):
        raise ConfigError(f"control_init must be 'zero' or 'warm', got {hp['control_init']!r}")
    if "gamma" in hp:
        gm = hp["gamma"]
        if isinstance(gm, (int, float)):
            if gm < 0:
                raise ConfigError(f"gamma must be >= 0, got {gm}")
        else:
            try:
                hp["gamma"] = [tuple(float(v) for v in seg) for seg in gm]
                assert all(len(seg) == 4 for seg in hp["gamma"])
            except (TypeError, ValueError, AssertionError):
                raise ConfigError(f"gamma must be a number or segments (g_start, g_end, tau_from, tau_to), "
                                  f"got {gm!r}") from None
    return hp, run


def sample_fiber(prior, extractor, reference, n: int = 16, method: str = "ndtm", steps: int | None = None,
                 seed: int = 0, loss: str | None = None, callback: Callable[[dict], None] | None = None, *,
                 init="noise", preset: str | None = None, batch_size: int = 64, progress: bool = True,
                 return_trajectory: bool = False, dtype: torch.dtype | None = None,
                 reference_ids: Sequence[str] | None = None, **hyperparameters) -> FiberResult:
    """Draw ``n`` samples from the fiber of ``extractor`` through each reference image.

    Args:
        prior: a :class:`~fiberbench.priors.Prior` (or a spec string such as ``"toy/prior-fm"``).
        extractor: an :class:`~fiberbench.extractors.Extractor` (or a spec string).
        reference: ``[3,H,W]`` or ``[B,3,H,W]`` in [0,1] (resized to the prior's size if needed).
        n: samples per reference.
        method: ``ndtm`` | ``dps`` | ``metamer`` | ``unguided``.
        steps: denoising steps (default: the preset's, else 50).
        seed: run seed; sample j of reference i uses its own generator seeded from (seed, i, j).
        loss: fiber loss ``cosine`` | ``l2`` | ``nl2`` (default: the preset's, else ``cosine``).
        callback: called after every step with ``{"i", "t", "x", "denoised", "images", "loss", "rows"}``.
        init: ``"noise"`` or ``("sdedit", tau_star)``: start from x_ref noised to tau_star in (0, 1000].
        preset: a name in :data:`PRESETS` (``toy``, ``fiber-imagenet``, …) filling the defaults.
        batch_size: samples per batched run (split and retried on CUDA out-of-memory).
        dtype: ``torch.bfloat16`` / ``torch.float16`` autocast for the networks (u and Adam stay fp32).
        **hyperparameters: the method's own (see :data:`DEFAULTS`).

    Returns:
        :class:`FiberResult` with ``images [B*n,3,H,W]`` in [0,1], reference-major.
    """
    from . import zoo
    from .io import as_image_batch

    # ---- validate everything before any model is loaded
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    hp, run = resolve_hyperparameters(method, preset, hyperparameters)
    steps = steps if steps is not None else run.get("steps", 50)
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    loss = loss or run.get("loss", "cosine")
    if loss not in LOSSES:
        raise ConfigError(f"unknown fiber loss {loss!r}; choose one of {LOSSES}")
    t_star = None
    if isinstance(init, (tuple, list)):
        if len(init) != 2 or init[0] != "sdedit" or not 0 < float(init[1]) <= 1000:
            raise ConfigError(f"init must be 'noise' or ('sdedit', tau_star) with 0 < tau_star <= 1000, got {init!r}")
        t_star = float(init[1])
        if method == "metamer":
            raise ConfigError("metamer has no prior and so no SDEdit start; use init='noise'")
    elif init != "noise":
        raise ConfigError(f"init must be 'noise' or ('sdedit', tau_star), got {init!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"dtype must be None, torch.bfloat16 or torch.float16, got {dtype!r}")
    ref = as_image_batch(reference, name="reference")
    if reference_ids is not None and len(reference_ids) != ref.shape[0]:
        raise ConfigError(f"reference_ids has {len(reference_ids)} entries for {ref.shape[0]} references")
    for spec, kind in ((prior, "prior"), (extractor, "extractor")):
        if isinstance(spec, str):  # unknown names fail here, before either model is loaded
            parsed = zoo.parse_spec(spec)
            if parsed.source == "toy" and zoo._toy_kind(parsed.name) not in (
                    ("flow", "diffusion") if kind == "prior" else ("classifier", "encoder")):
                raise zoo._unknown_toy(parsed.name, kind)

    if isinstance(prior, str):
        prior = zoo.load_prior(prior)
    if isinstance(extractor, str):
        extractor = zoo.load_extractor(extractor)
    device = next(prior.parameters()).device
    size = prior.image_size
    if tuple(ref.shape[-2:]) != (size, size):
        ref = F.interpolate(ref, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    ref = ref.to(device)
    extractor = extractor.to(device)

    B = ref.shape[0]
    M = B * n
    seeds = [sample_seed(seed, i, j) for i in range(B) for j in range(n)]
    with torch.no_grad():
        ref_feats = extractor(ref).float()
        need_latent = hp.get("target") == "time" or t_star is not None
        ref_latent = prior.encode(ref) if need_latent else None
    config: dict[str, Any] = {
        "method": method, "extractor": getattr(extractor, "spec", type(extractor).__name__),
        "prior": getattr(prior, "spec", type(prior).__name__), "n": n, "steps": steps, "seed": seed, "loss": loss,
        "init": list(init) if isinstance(init, (tuple, list)) else init, "preset": preset,
        "hyperparameters": hp, "batch_size": batch_size, "dtype": str(dtype) if dtype else None,
        "device": str(device), "versions": _versions(), "sample_seeds": seeds,
        "reference_hash": hashlib.sha256(ref.detach().cpu().numpy().tobytes()).hexdigest()[:16],
    }
    config["run_id"] = _run_id(config)

    sampler = SAMPLERS[method]
    out_x0 = torch.empty(M, *prior.sample_shape) if method != "metamer" or not prior.latent \
        else torch.empty(M, 3, size, size)
    faults = torch.zeros(M, dtype=torch.long)
    histories: list[torch.Tensor | None] = [None] * M
    trajs: list[torch.Tensor | None] = [None] * M
    calls = {"denoiser": 0, "extractor": 0}
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=M, desc=f"{method} fiber samples", leave=False)

    def run_chunk(rows: list[int]) -> None:
        gens_seeds = [seeds[r] for r in rows]
        noise = NoiseSource(gens_seeds, prior.sample_shape, device)
        per_ref = torch.tensor([r // n for r in rows])
        problem = FiberProblem(
            prior=prior, extractor=extractor, target=ref_feats[per_ref.to(device)], metric=loss, noise=noise,
            autocast=dtype, trajectory=[] if return_trajectory else None)
        if ref_latent is not None:
            uniq, rows_of = torch.unique(per_ref, return_inverse=True)
            problem.ref_latent = ref_latent[uniq.to(device)]
            problem.ref_rows = rows_of.to(device)
            # h_t noise: fixed per reference so all samples of a fiber share one target path
            ref_gens = NoiseSource([sample_seed(seed, int(i), 1 << 30) for i in uniq.tolist()],
                                   prior.sample_shape, device)
            problem.ref_noise = ref_gens.draw()
        if t_star is not None:
            sched = prior.schedule(steps, t_start=prior.time_at_tau(t_star))
            x = prior.add_noise(problem.ref_latent[problem.ref_rows], sched.times[0], noise.draw())
        else:
            sched = prior.schedule(steps)
            x = noise.draw() * sched.sigmas[0]  # alpha ~ 0 at the top time: pure noise

        def cb(info):
            if callback is not None:
                callback({**info, "rows": rows})

        with torch.enable_grad():
            x0 = sampler(problem, x, sched, callback=cb if callback else None, disable=True, **hp)
        out_x0[rows] = x0.detach().float().cpu()
        faults[rows] = problem.faults
        hist = torch.stack(problem.history) if problem.history else None
        for k, r in enumerate(rows):
            histories[r] = None if hist is None else hist[:, k]
            if problem.trajectory:
                trajs[r] = torch.stack([tr[k] for tr in problem.trajectory])
        for k2 in calls:
            calls[k2] = max(calls[k2], problem.calls[k2])

    todo = list(range(M))
    bs = batch_size
    oom_splits = 0
    while todo:
        rows = todo[:bs]
        try:
            run_chunk(rows)
        except Exception as e:  # noqa: BLE001 - only CUDA OOM is retried
            if not _is_oom(e) or bs == 1:
                raise
            oom_splits += 1
            bs = max(1, bs // 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        todo = todo[len(rows):]
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0

    with torch.no_grad():
        images = torch.cat([prior.decode(c.to(device)).float().cpu() for c in out_x0.split(bs)]) \
            if not (method == "metamer" and prior.latent) else out_x0.clamp(0, 1)
        images = images.clamp(0, 1)
        finite = _finite_rows(images)
        images[~finite] = 0.0
        feats = torch.cat([extractor(c.to(device)).float().cpu() for c in images.split(bs)])
        tgt = ref_feats.cpu().repeat_interleave(n, dim=0)
        dist = fiber_distance(feats, tgt, loss)
        cos = F.cosine_similarity(feats, tgt, dim=-1)
    status = []
    for r in range(M):
        skipped = f"{int(faults[r])} non-finite loss/gradient/state event(s) skipped during sampling"
        if not bool(finite[r]):
            status.append(f"failed: the sample's image is non-finite (set to 0); {skipped}")
        elif not bool(torch.isfinite(dist[r])):
            status.append(f"failed: the extractor gave non-finite features for the final image; {skipped}")
        elif faults[r] > 0 and method in ("ndtm", "dps") and faults[r] >= calls["extractor"]:
            status.append(f"failed: every guided update was non-finite and skipped ({int(faults[r])}); "
                          f"the sample is effectively unguided")
        elif faults[r] > 0:
            status.append(f"recovered: {skipped}")
        else:
            status.append("ok")
    config.update(seconds=seconds, seconds_per_sample=seconds / M, batch_size_used=bs, oom_splits=oom_splits,
                  denoiser_evals_per_sample=calls["denoiser"], extractor_evals_per_sample=calls["extractor"])
    hist = None
    if all(h is not None for h in histories):
        hist = torch.stack(histories, dim=1)
    traj = torch.stack(trajs, dim=1) if return_trajectory and all(t is not None for t in trajs) else None
    return FiberResult(images=images, reference=ref.cpu(), feature_distance=dist, cosine=cos, status=status,
                       config=config, loss_history=hist, trajectory=traj,
                       reference_ids=list(reference_ids) if reference_ids is not None else None,
                       features=feats, reference_features=ref_feats.cpu(), latents=out_x0)
