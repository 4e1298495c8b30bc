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
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .errors import ConfigError, InputError, close_matches

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
    # adam_eps 1e-3 (not the 1e-4 default): an Adam step moves a component with |g| ~ eps by up to lr/eps times
    # its gradient's round-off; at lr 0.1 / eps 1e-4 (x1000, over 4 inner x 20 steps) a batched and a one-by-one
    # run differed by 2e-3 in pixels (eps 1e-3: 5e-5). Same 12 x 4 check, prior-fm 12.5k steps: feature match
    # 1.00 / 1.00, validity 0.90 / 0.96, shape kept 0.94 / 1.00, mean cosine 0.9996 / 0.9979 (eps 1e-4 / 1e-3).
    "toy": dict(steps=20, inner_steps=4, lr=0.1, w_ctrl=0.0, w_score=0.0, w_term=1.0, loss="cosine",
                gamma=[(0, 0, 1000, 900), (1, 1, 900, 0)], eta=1.0, target="fixed", control_init="zero",
                adam_eps=1e-3),
}

NDTM_DEFAULTS = dict(inner_steps=4, lr=0.05, lr_decay="linear", w_ctrl=0.0, w_score=0.0, w_term=1.0,
                     gamma=[(0, 0, 1000, 900), (1, 1, 900, 0)], eta=0.0, target="fixed", control_init="zero",
                     grad_clip=1.0, grad_norm="clip", fiber_tol=0.0, adam_eps=1e-4, recurrence=1,
                     recurrence_tau=500.0)
DPS_DEFAULTS = dict(scale=1.0, gamma=[(0, 0, 1000, 900), (1, 1, 900, 0)], eta=0.0, target="fixed")
METAMER_DEFAULTS = dict(iters=200, lr=0.02)
# The prior's own sampler. deterministic_above_tau: steps from tau above it use eta 0 (DDIM / Euler), the rest
# ``eta``; grid_shift > 0 (diffusion priors): the times of a shifted rectified-flow grid (Prior.schedule), 0 = the
# prior's own; unclamped_tau (lo, hi): x0_hat is not clamped to the data range for lo < tau <= hi, except to
# unclamped_limit times the data range when that is >= 1 (0 = no clamp there at all). The DDPM toy prior's card
# sets all five (its sampling section; see docs/performance.md for why each is there).
UNGUIDED_DEFAULTS = dict(eta=0.0, deterministic_above_tau=1000.0, grid_shift=0.0, unclamped_tau=(0.0, 0.0),
                         unclamped_limit=0.0)
DEFAULTS = {"ndtm": NDTM_DEFAULTS, "dps": DPS_DEFAULTS, "metamer": METAMER_DEFAULTS, "unguided": UNGUIDED_DEFAULTS}

# What every hyper-parameter of DEFAULTS accepts; resolve_hyperparameters checks each value against its rule
# (a test asserts every key of DEFAULTS has one). Bools are not numbers, numbers must be finite, counts must be
# integers (4.0 is refused: ``range(4.0)`` would fail deep inside the sampler), strings one of the choices.
# Upper bounds on counts catch typos such as inner_steps=40000 before hours of compute.
HP_RULES: dict[str, dict[str, Any]] = {
    "inner_steps": dict(kind="int", lo=0, hi=1000),
    "iters": dict(kind="int", lo=1, hi=1_000_000),
    "lr": dict(kind="real", lo=0.0),
    "scale": dict(kind="real", lo=0.0),
    "w_ctrl": dict(kind="real", lo=0.0),
    "w_score": dict(kind="real", lo=0.0),
    "w_term": dict(kind="real", lo=0.0),
    "eta": dict(kind="real", lo=0.0, hi=1.0),
    "grad_clip": dict(kind="real", lo=0.0, open_lo=True),  # 0 would zero every update
    "adam_eps": dict(kind="real", lo=0.0, open_lo=True),  # 0 gives 0/0 = NaN in Adam for a row whose gradient is 0
    "lr_decay": dict(kind="choice", choices=("linear", "constant")),
    "grad_norm": dict(kind="choice", choices=("clip", "unit")),
    "fiber_tol": dict(kind="real", lo=0.0),
    "target": dict(kind="choice", choices=("fixed", "time")),
    "control_init": dict(kind="choice", choices=("zero", "warm")),
    "gamma": dict(kind="gamma"),
    "recurrence": dict(kind="int", lo=1, hi=100),
    "recurrence_tau": dict(kind="real", lo=0.0, hi=1000.0),
    "deterministic_above_tau": dict(kind="real", lo=0.0, hi=1000.0),
    "grid_shift": dict(kind="real", lo=0.0),
    "unclamped_tau": dict(kind="tau_band"),
    "unclamped_limit": dict(kind="real", lo=0.0),  # 0 or >= 1, checked in sample_fiber
}

# A sample whose fiber loss or gradient (or, for NDTM/DPS, next state) is non-finite goes back to its last
# finite iterate with a fresh optimiser state and half its step size; a fault after MAX_HALVINGS halvings in a
# row (no finite evaluation in between) gives up its guidance: the sample finishes unguided, marked failed.
MAX_HALVINGS = 4


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
    # fault bookkeeping, all [M] on the CPU (see fault()):
    events: dict[str, torch.Tensor] = field(default_factory=dict)  # "loss" | "gradient" | "state" -> count
    halvings: torch.Tensor | None = None  # step-size halvings in all
    scale_exp: torch.Tensor | None = None  # the current step scale is 0.5 ** scale_exp (NDTM: reset every step)
    streak: torch.Tensor | None = None  # faults since the last finite evaluation
    gave_up: torch.Tensor | None = None  # step/iteration at which guidance was given up, -1 while guided
    updates: torch.Tensor | None = None  # guided updates taken with a finite loss and gradient

    def __post_init__(self):
        m = self.target.shape[0]
        if self.faults is None:
            self.faults = torch.zeros(m, dtype=torch.long)
        self.events = {k: torch.zeros(m, dtype=torch.long) for k in ("loss", "gradient", "state")}
        self.halvings = torch.zeros(m, dtype=torch.long)
        self.scale_exp = torch.zeros(m, dtype=torch.long)
        self.streak = torch.zeros(m, dtype=torch.long)
        self.gave_up = torch.full((m,), -1, dtype=torch.long)
        self.updates = torch.zeros(m, dtype=torch.long)

    def live(self) -> torch.Tensor:
        """``[M]`` bool (on the targets' device): samples still guided (not given up)."""
        return (self.gave_up < 0).to(self.target.device)

    def step_scales(self) -> list[float]:
        """Per-sample step-size factor ``0.5 ** scale_exp`` (exactly 1.0 for a sample without faults)."""
        return [0.5 ** int(h) for h in self.scale_exp]

    def fault(self, bad: torch.Tensor, kind: str, step: int, halve: bool = True) -> None:
        """Book a non-finite ``kind`` (``loss`` | ``gradient`` | ``state``) for the samples in ``bad`` ([M] bool).

        Each fault halves that sample's step scale (when ``halve``); a fault that follows ``MAX_HALVINGS``
        others with no finite evaluation in between gives up its guidance at ``step`` instead. Samples
        already given up are not booked again.
        """
        bad = bad.detach().cpu() & (self.gave_up < 0)
        if not bad.any():
            return
        self.faults[bad] += 1
        self.events[kind][bad] += 1
        give_up = bad & (self.streak >= MAX_HALVINGS)
        self.streak[bad] += 1
        if halve:
            self.halvings[bad & ~give_up] += 1
            self.scale_exp[bad & ~give_up] += 1
        self.gave_up[give_up] = step

    def finite(self, ok: torch.Tensor) -> None:
        """The samples in ``ok`` ([M] bool) had a finite evaluation and take their update: their streak ends."""
        ok = ok.detach().cpu()
        self.streak[ok] = 0
        self.updates[ok] += 1

    def _amp(self):
        dev = self.target.device.type
        return torch.autocast(dev, dtype=self.autocast, enabled=self.autocast is not None)

    def denoise(self, x_t: torch.Tensor, t, clamp: bool | float = True) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls["denoiser"] += 1
        with self._amp():
            x0, eps = self.prior.denoise(x_t, t, clamp=clamp)
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


class RowAdam:
    """Adam on a batched tensor ``[M,...]`` whose rows (samples) each have their own state, step count and lr.

    The arithmetic is ``torch.optim.Adam``'s (its single-tensor path, no weight decay), so rows that are never
    reset step bit for bit as a batched ``torch.optim.Adam`` would; unlike it, one row can be given a fresh
    state (moments 0, step count 0: its next step is a first Adam step again) and its own learning rate
    without touching the others. ``param`` is updated in place.
    """

    def __init__(self, param: torch.Tensor, lr: Sequence[float], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, [float(v) for v in lr], betas, eps
        self.m = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.v = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.steps = [0] * param.shape[0]

    def reset(self, rows: torch.Tensor, lr: Sequence[float]) -> None:
        """Fresh state for the rows in ``rows`` ([M] bool) and new learning rates ``lr`` (one per row, all M)."""
        with torch.no_grad():
            self.m[rows] = 0
            self.v[rows] = 0
        for r in rows.nonzero().flatten().tolist():
            self.steps[r] = 0
            self.lr[r] = float(lr[r])

    @torch.no_grad()
    def step(self, grad: torch.Tensor, rows: torch.Tensor) -> None:
        """One Adam step with ``grad`` ``[M,...]`` for the rows in ``rows`` ([M] bool); other rows stay as they are."""
        b1, b2 = self.betas
        idx = rows.nonzero().flatten().tolist()
        if not idx:
            return
        full = len(idx) == self.param.shape[0]
        if full:
            self.m.lerp_(grad, 1 - b1)
            self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        else:
            sel = torch.tensor(idx, device=self.param.device)
            self.m[sel] = self.m[sel].lerp_(grad[sel], 1 - b1)
            self.v[sel] = self.v[sel].mul_(b2).addcmul_(grad[sel], grad[sel], value=1 - b2)
        groups: dict[tuple[int, float], list[int]] = {}
        for r in idx:
            self.steps[r] += 1
            groups.setdefault((self.steps[r], self.lr[r]), []).append(r)
        for (step, lr), members in groups.items():
            step_size = lr / (1 - b1 ** float(step))
            bc2_sqrt = (1 - b2 ** float(step)) ** 0.5
            if full and len(groups) == 1:  # the common case: every row alike, no copies
                denom = (self.v.sqrt() / bc2_sqrt).add_(self.eps)
                self.param.addcdiv_(self.m, denom, value=-step_size)
            else:
                sel = torch.tensor(members, device=self.param.device)
                denom = (self.v[sel].sqrt() / bc2_sqrt).add_(self.eps)
                self.param[sel] = self.param[sel].addcdiv_(self.m[sel], denom, value=-step_size)


def _guard(problem: "FiberProblem", step: int, cost: torch.Tensor, grad: torch.Tensor, param: torch.Tensor,
           last_ok: torch.Tensor, opt: RowAdam, base_lr: float) -> torch.Tensor:
    """Find the samples whose ``cost`` ``[M]`` or ``grad`` ``[M,...]`` is non-finite and retry them smaller.

    Each such sample is booked (:meth:`FiberProblem.fault`), its ``param`` row goes back to ``last_ok`` (its
    last iterate with a finite cost and gradient), its optimiser state is reset and its learning rate becomes
    ``base_lr * problem.step_scales()``. Their gradient rows (and those of samples given up) are zeroed.
    Returns ``[M]`` bool: the samples that take this optimiser step.
    """
    live = problem.live()
    finite_cost = torch.isfinite(cost.detach())
    finite_grad = _finite_rows(grad)
    ok = finite_cost & finite_grad & live
    bad = live & ~ok
    if bad.any():
        problem.fault(bad & ~finite_cost, "loss", step)
        problem.fault(bad & finite_cost & ~finite_grad, "gradient", step)
        with torch.no_grad():
            param[bad] = last_ok[bad]
        opt.reset(bad, [base_lr * sc for sc in problem.step_scales()])
    grad[~ok] = 0
    problem.finite(ok)
    return ok


def _report(callback, i, t, x, x0, problem, loss=None):
    if callback is not None:
        callback({"i": i, "t": float(t), "x": x.detach(), "denoised": x0.detach(),
                  "images": problem.prior.decode(x0.detach()), "loss": None if loss is None else loss.detach()})


def _progress(total: int, disable: bool | None):
    from tqdm.auto import trange

    return trange(total, disable=disable, leave=False, desc="fiber")


# --------------------------------------------------------------------------- samplers

def sample_unguided(problem: FiberProblem, x: torch.Tensor, sched, callback=None, disable=None,
                    eta: float = 0.0, deterministic_above_tau: float = 1000.0, grid_shift: float = 0.0,
                    unclamped_tau: tuple[float, float] = (0.0, 0.0), unclamped_limit: float = 0.0) -> torch.Tensor:
    """Plain sampling from the prior (DDIM with ``eta``; the Euler step for flows).

    ``deterministic_above_tau``: steps starting above this tau are deterministic (eta 0).
    ``grid_shift`` > 0: ``sched`` is the shifted grid of :meth:`~fiberbench.priors.Prior.schedule`
    (:func:`sample_fiber` builds it so; the argument is here only to be recorded with the others).
    ``unclamped_tau = (lo, hi)``: no clamp of x0_hat to the data range for lo < tau <= hi;
    ``unclamped_limit`` >= 1 still clamps it there, to that multiple of the data range (0: not at all).
    """
    lo, hi = unclamped_tau
    band_clamp = unclamped_limit if unclamped_limit else False
    for i in _progress(len(sched), disable):
        t, s = sched.times[i], sched.times[i + 1]
        tau = float(sched.taus[i])
        e = 0.0 if tau > deterministic_above_tau else eta
        with torch.no_grad():
            x0, eps = problem.denoise(x, t, clamp=band_clamp if lo < tau <= hi else True)
            x = problem.prior.step(x, x0, eps, t, s, e, problem.noise.draw() if e > 0 else None)
        problem.record(i, None, x0)
        _report(callback, i, t, x, x0, problem)
    return x0


def sample_ndtm(problem: FiberProblem, x: torch.Tensor, sched, callback=None, disable=None, *,
                inner_steps: int = 4, lr: float = 0.05, lr_decay: str = "linear", w_ctrl: float = 0.0,
                w_score: float = 0.0, w_term: float = 1.0, gamma=1.0, eta: float = 0.0, target: str = "fixed",
                control_init: str = "zero", grad_clip: float = 1.0, grad_norm: str = "clip",
                fiber_tol: float = 0.0, adam_eps: float = 1e-8, recurrence: int = 1,
                recurrence_tau: float = 500.0) -> torch.Tensor:
    """NDTM: at every step optimise a control u so that x0_hat(x_t + gamma_t u) lies in the fiber.

    Cost ``C = w_ctrl ||gamma u||^2 + w_score ||eps(x_t) - eps(x_t + gamma u)||^2 + w_term L_fiber``,
    minimised with ``inner_steps`` Adam steps (fresh optimiser each step, gradient clipped to norm
    ``grad_clip`` per sample, or with ``grad_norm="unit"`` rescaled to norm ``grad_clip`` whatever its
    size, lr decaying linearly over the trajectory; a sample whose fiber loss is already ``<= fiber_tol``
    gets a zero gradient for that inner step, so unit norm does not keep pushing it); then a DDIM step (``eta``)
    from the controlled state. Adam's first step is ``lr * sign(g)``: components whose gradient is
    float noise move as much as real ones, which makes results depend on batch size through
    round-off; ``adam_eps`` well above that noise (e.g. 1e-4 with unit-norm gradients) damps them.
    ``control_init="zero"`` restarts u at 0 (the paper's); ``"warm"`` starts from the previous
    step's control.

    Faults, per sample: a non-finite cost or gradient sends that sample's control back to its last
    iterate with a finite cost and gradient (0 if there was none this step), resets its Adam state and
    halves its lr for the rest of this step's inner loop; the next inner step retries from there (the
    next denoising step starts at the full lr again). A non-finite next state redoes that step unguided
    for the sample. A fault after ``MAX_HALVINGS`` halvings in a row (no finite evaluation between
    them) gives up: the sample's control stays 0 (unguided) to the end.

    ``recurrence`` r > 1 repeats every guided step at tau >= ``recurrence_tau`` r times: after the
    controlled step from t to s the state is forward-diffused back to t (:meth:`Prior.renoise`, fresh
    per-sample noise) and the step is redone, r - 1 times, the last result is kept ("time travel",
    FreeDoM / Universal Guidance). It gives the coarse layout (shape, background) r chances to move to
    the fiber while the noise level still lets it; cost: r times the guided calls of those steps.
    """
    n_steps = len(sched)
    u = torch.zeros_like(x)
    for i in _progress(n_steps, disable):
        t, s = sched.times[i], sched.times[i + 1]
        g = gamma_at(gamma, float(sched.taus[i]))
        rate = lr * (1.0 - i / n_steps) if lr_decay == "linear" else lr
        reps = int(recurrence) if g > 0 and float(sched.taus[i]) >= recurrence_tau else 1
        for rep in range(reps):
            if rep:  # time travel: back to t from the state just reached at s
                x = problem.prior.renoise(x, s, t, problem.noise.draw())
            loss = None
            if g > 0 and inner_steps > 0 and rate > 0 and bool(problem.live().any()):
                h = problem.target_at(t, target)
                eps_base = None
                if w_score:
                    with torch.no_grad():
                        _, eps_base = problem.denoise(x, t)
                u = torch.zeros_like(x) if control_init == "zero" else u.detach()
                u[~problem.live()] = 0
                problem.scale_exp.zero_()  # a new control problem: every sample starts at the full lr again
                last_ok = torch.zeros_like(x)  # per sample: the last control whose cost and gradient were finite
                opt = RowAdam(u, [rate * sc for sc in problem.step_scales()], eps=adam_eps)
                u.requires_grad_(True)
                for _ in range(inner_steps):
                    assert torch.is_grad_enabled(), "guided step needs autograd (a pipeline may have disabled it)"
                    x0, eps = problem.denoise(x + g * u, t)
                    loss = problem.loss(x0, h)
                    cost = w_term * loss
                    if w_ctrl:
                        cost = cost + w_ctrl * (g * u).flatten(1).pow(2).sum(1)
                    if eps_base is not None:
                        cost = cost + w_score * (eps_base - eps).flatten(1).pow(2).sum(1)
                    cost.sum().backward()
                    grad, u.grad = u.grad, None
                    with torch.no_grad():
                        ok = _guard(problem, i, cost, grad, u, last_ok, opt, rate)
                        last_ok[ok] = u[ok]
                        norms = grad.flatten(1).norm(dim=1).clamp(min=1e-12)
                        scale = grad_clip / norms
                        if grad_norm == "clip":
                            scale = scale.clamp(max=1.0)
                        if fiber_tol > 0:  # already on the fiber: no push (unit norm would push at full size)
                            scale[loss.detach() <= fiber_tol] = 0.0
                        grad.mul_(scale.view(-1, *[1] * (grad.ndim - 1)))
                    opt.step(grad, ok)
                u = u.detach()
                u[~_finite_rows(u)] = 0
            u[~problem.live()] = 0  # given up: unguided from here on
            with torch.no_grad():
                xc = x + g * u if g > 0 else x
                x0, eps = problem.denoise(xc, t)
                x_new = problem.prior.step(xc, x0, eps, t, s, eta, problem.noise.draw() if eta > 0 else None)
                bad = ~_finite_rows(x_new)
                if bad.any():  # fall back to the unguided step for those samples
                    problem.fault(bad, "state", i, halve=False)  # the next step's control starts afresh anyway
                    x0u, epsu = problem.denoise(x[bad], t)
                    x0[bad] = x0u
                    x_new[bad] = problem.prior.step(x[bad], x0u, epsu, t, s, 0.0)
                    u[bad] = 0
                x = x_new
        problem.record(i, loss, x0)
        _report(callback, i, t, x, x0, problem, loss)
    return x0


def sample_dps(problem: FiberProblem, x: torch.Tensor, sched, callback=None, disable=None, *,
               scale: float = 1.0, gamma=1.0, eta: float = 0.0, target: str = "fixed") -> torch.Tensor:
    """DPS: ``x_s = step(x_t) - scale * gamma_t * grad_{x_t} L_fiber(x0_hat(x_t))`` (one gradient a step).

    Faults, per sample: a non-finite loss or gradient skips that sample's guidance in this step and
    halves its ``scale`` for the rest of the run; a non-finite next state redoes the step unguided for
    it (and halves too). A fault after ``MAX_HALVINGS`` halvings in a row gives up its guidance.
    """
    for i in _progress(len(sched), disable):
        t, s = sched.times[i], sched.times[i + 1]
        g = gamma_at(gamma, float(sched.taus[i]))
        loss = None
        if g > 0 and scale > 0 and bool(problem.live().any()):
            h = problem.target_at(t, target)
            xg = x.detach().requires_grad_(True)
            x0, eps = problem.denoise(xg, t)
            loss = problem.loss(x0, h)
            grad, = torch.autograd.grad(loss.sum(), xg)
            with torch.no_grad():
                live = problem.live()
                finite_loss, finite_grad = torch.isfinite(loss.detach()), _finite_rows(grad)
                problem.fault(live & ~finite_loss, "loss", i)
                problem.fault(live & finite_loss & ~finite_grad, "gradient", i)
                ok = finite_loss & finite_grad & problem.live()
                problem.finite(ok)
                grad[~ok] = 0
                scales = problem.step_scales()
                if all(sc == 1.0 for sc in scales):
                    step_ = scale * g * grad
                else:  # (scale * g) * 0.5**k is exact: unhalved samples step bit for bit as above
                    f = torch.tensor([scale * g * sc for sc in scales], device=grad.device, dtype=grad.dtype)
                    step_ = grad * f.view(-1, *[1] * (grad.ndim - 1))
                x0, eps = x0.detach(), eps.detach()
                x_new = problem.prior.step(x, x0, eps, t, s, eta, problem.noise.draw() if eta > 0 else None) - step_
        else:
            with torch.no_grad():
                x0, eps = problem.denoise(x, t)
                x_new = problem.prior.step(x, x0, eps, t, s, eta, problem.noise.draw() if eta > 0 else None)
        with torch.no_grad():
            bad = ~_finite_rows(x_new)
            if bad.any():  # fall back to the unguided step for those samples
                problem.fault(bad, "state", i)
                x0u, epsu = problem.denoise(x[bad], t)
                x0[bad] = x0u
                x_new[bad] = problem.prior.step(x[bad], x0u, epsu, t, s, 0.0)
        x = x_new
        problem.record(i, loss, x0)
        _report(callback, i, t, x, x0, problem, loss)
    return x0


def sample_metamer(problem: FiberProblem, x: torch.Tensor, sched, callback=None, disable=None, *,
                   iters: int = 200, lr: float = 0.02) -> torch.Tensor:
    """Model metamers: Adam on the pixels of a noise image until its features match; no prior.

    Starts from uniform noise in [0,1] (per-sample generators); pixels are kept in [0,1]. A sample
    whose loss or gradient is non-finite goes back to its last finite image with a fresh Adam state
    and half its lr (for the rest of the run); a fault after ``MAX_HALVINGS`` halvings in a row
    freezes it at that image.
    """
    img = problem.noise.uniform(tuple(x.shape[1:]) if not problem.prior.latent else
                                (3, problem.prior.image_size, problem.prior.image_size))
    opt = RowAdam(img, [lr * sc for sc in problem.step_scales()])
    last_ok = img.clone()
    every = max(1, iters // max(1, len(sched)))
    for i in _progress(iters, disable):
        img.requires_grad_(True)
        problem.calls["extractor"] += 1
        with problem._amp():
            loss = fiber_distance(problem.extractor(img).float(), problem.target, problem.metric)
        loss.sum().backward()
        grad, img.grad = img.grad, None
        img.requires_grad_(False)
        with torch.no_grad():
            ok = _guard(problem, i, loss, grad, img, last_ok, opt, lr)
            last_ok[ok] = img[ok]
        opt.step(grad, ok)
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


def _split_on_oom(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int,
                  oom: dict[str, int], device, to=None) -> tuple[torch.Tensor, int]:
    """``fn`` over ``x`` ``[N,...]`` in chunks of ``batch_size`` rows (moved to ``device``; results to ``to``).

    On CUDA out-of-memory the failing chunk is retried at half the size (down to one row; counted in
    ``oom["splits"]``), chunks already done are kept. Any other error is raised at once.
    Returns ``(results [N,...] concatenated, the chunk size it ended at)``.
    """
    outs, start, bs = [], 0, max(1, int(batch_size))
    while start < x.shape[0]:
        chunk = x[start:start + bs]
        try:
            y = fn(chunk.to(device))
        except Exception as e:  # noqa: BLE001 - only CUDA OOM is retried
            if not _is_oom(e) or bs == 1:
                raise
            oom["splits"] += 1
            bs = max(1, bs // 2)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            continue
        outs.append(y if to is None else y.to(to))
        start += chunk.shape[0]
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), bs


def _fault_history(events: dict[str, int], halvings: int, gave_up: int, unit: str, total: int,
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


def _show(value: Any) -> str:
    """``repr`` of a user value for an error message: short, with its type when the repr hides it."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return text if isinstance(value, (int, float, str)) and not isinstance(value, bool) \
        else f"{text} ({type(value).__name__})"


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (OverflowError, ValueError, TypeError):  # ints beyond float range
        return False


def check_hyperparameter(name: str, value: Any, method: str = "") -> Any:
    """``value`` checked against :data:`HP_RULES` (numpy scalars become Python numbers), or ``ConfigError``
    naming the hyper-parameter, the bad value and what is accepted."""
    rule = HP_RULES[name]
    kind = rule["kind"]
    where = f" (method {method!r})" if method else ""  # after the value: "lr must …" stays greppable
    if kind == "int":
        lo, hi = rule["lo"], rule["hi"]
        what = "a non-negative integer" if lo == 0 else "a positive integer"
        if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or not lo <= value <= hi:
            raise ConfigError(f"{name} must be {what} (at most {hi}), got {_show(value)}{where}")
        return int(value)
    if kind == "real":
        lo, hi, open_lo = rule["lo"], rule.get("hi"), rule.get("open_lo", False)
        if hi is not None:
            what = f"in [{lo:g}, {hi:g}]"
        else:
            what = f"> {lo:g}" if open_lo else f">= {lo:g}"
        ok = _is_real(value) and _finite(value) and (value > lo if open_lo else value >= lo) \
            and (hi is None or value <= hi)
        if not ok:
            raise ConfigError(f"{name} must be a finite number {what}, got {_show(value)}{where}")
        return value.item() if isinstance(value, (np.integer, np.floating)) else value
    if kind == "tau_band":
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_real(v) and _finite(v) for v in value)
                and 0 <= float(value[0]) <= float(value[1]) <= 1000):
            raise ConfigError(f"{name} must be a pair (lo, hi) of numbers with 0 <= lo <= hi <= 1000, "
                              f"got {_show(value)}{where}")
        return (float(value[0]), float(value[1]))
    if kind == "choice":
        choices = rule["choices"]
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)}, got {_show(value)}{where}")
        return value
    # gamma: a constant >= 0, or segments (g_start, g_end, tau_from, tau_to) with g >= 0 and tau in [0, 1000]
    if _is_real(value):
        if not _finite(value) or value < 0:
            raise ConfigError(f"gamma must be a finite number >= 0 or a list of segments "
                              f"(g_start, g_end, tau_from, tau_to), got {_show(value)}{where}")
        return value.item() if isinstance(value, (np.integer, np.floating)) else value
    segs = None
    if isinstance(value, (list, tuple)) and value:
        segs = []
        for seg in value:
            if not isinstance(seg, (list, tuple)) or len(seg) != 4 or not all(_is_real(v) and _finite(v) for v in seg):
                segs = None
                break
            g0, g1, a, b = (float(v) for v in seg)
            if g0 < 0 or g1 < 0 or not (0 <= a <= 1000 and 0 <= b <= 1000):
                segs = None
                break
            segs.append((g0, g1, a, b))
    if segs is None:
        raise ConfigError(f"gamma must be a finite number >= 0 or a non-empty list of segments "
                          f"(g_start, g_end, tau_from, tau_to) of finite numbers with g_start, g_end >= 0 and "
                          f"tau_from, tau_to in [0, 1000], e.g. [(0, 0, 1000, 900), (1, 1, 900, 0)]; "
                          f"got {_show(value)}{where}")
    return segs


def resolve_hyperparameters(method: str, preset: str | None, overrides: dict[str, Any]) -> tuple[dict, dict]:
    """Merge method defaults < preset < explicit keyword arguments and check every value.

    Unknown names, and values outside :data:`HP_RULES` (wrong type, NaN/inf, out of range, unknown
    strings; bools are not numbers), raise one ``ConfigError`` naming the hyper-parameter, its value and
    what is accepted; no other exception escapes. Returns ``(hyperparameters for the sampler function,
    run-level settings from the preset)``.
    """
    if not isinstance(method, str) or method not in METHODS:
        hint = close_matches(method, METHODS) if isinstance(method, str) else []
        raise ConfigError(f"unknown method {_show(method)}; choose one of {METHODS}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"hyper-parameters must be a mapping of names to values, got {_show(overrides)}")
    allowed = DEFAULTS[method]
    run_keys = ("steps", "loss")
    hp = dict(allowed)
    run: dict[str, Any] = {}
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"unknown preset {_show(preset)}; presets: {sorted(PRESETS)}")
        for k, v in PRESETS[preset].items():
            if k in run_keys:
                run[k] = v
            elif k in allowed:
                hp[k] = v
    unknown = sorted((k for k in overrides if k not in allowed), key=repr)
    if unknown:
        hint = [h for k in unknown if isinstance(k, str) for h in close_matches(k, allowed, n=1)]
        raise ConfigError(f"unknown hyper-parameter(s) {unknown} for method {method!r}; valid: {sorted(allowed)}"
                          + (f" (did you mean {hint}?)" if hint else ""))
    hp.update(overrides)
    for k in hp:
        hp[k] = check_hyperparameter(k, hp[k], method)
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
        batch_size: samples per batched run; on CUDA out-of-memory the batch is halved and retried (in the
            sampling loop, the reference features and the final decode / feature pass), finished work kept.
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
        if hp.get("grid_shift"):
            raise ConfigError("grid_shift gives a grid from pure noise; it cannot start from an SDEdit init")
    elif init != "noise":
        raise ConfigError(f"init must be 'noise' or ('sdedit', tau_star), got {init!r}")
    if 0 < hp.get("unclamped_limit", 0) < 1:
        raise ConfigError(f"unclamped_limit must be 0 (no clamp in unclamped_tau) or >= 1 (a multiple of the data "
                          f"range), got {hp['unclamped_limit']!r}; below 1 it would clamp tighter than the data")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
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
    oom = {"splits": 0}
    with torch.no_grad():  # a batch of B references can run out of memory too: split like the samples
        ref_feats, _ = _split_on_oom(lambda c: extractor(c).float(), ref, batch_size, oom, device)
        need_latent = hp.get("target") == "time" or t_star is not None
        ref_latent = _split_on_oom(prior.encode, ref, batch_size, oom, device)[0] if need_latent else None
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
    events = {k: torch.zeros(M, dtype=torch.long) for k in ("loss", "gradient", "state")}
    halvings = torch.zeros(M, dtype=torch.long)
    gave_up = torch.full((M,), -1, dtype=torch.long)
    updates = torch.zeros(M, dtype=torch.long)
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
            sched = prior.schedule(steps, shift=hp.get("grid_shift") or None)  # grid_shift: unguided only
            x = noise.draw() * sched.sigmas[0]  # alpha ~ 0 at the top time: pure noise

        def cb(info):
            if callback is not None:
                callback({**info, "rows": rows})

        with torch.enable_grad():
            x0 = sampler(problem, x, sched, callback=cb if callback else None, disable=True, **hp)
        out_x0[rows] = x0.detach().float().cpu()
        faults[rows] = problem.faults
        halvings[rows], gave_up[rows], updates[rows] = problem.halvings, problem.gave_up, problem.updates
        for k in events:
            events[k][rows] = problem.events[k]
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

    # the final decode and feature pass: finished samples are never lost to an out-of-memory here either
    final_bs = bs
    with torch.no_grad():
        if method == "metamer" and prior.latent:
            images = out_x0.clamp(0, 1)
        else:
            images, final_bs = _split_on_oom(lambda c: prior.decode(c).float(), out_x0, bs, oom, device, to="cpu")
        images = images.clamp(0, 1)
        finite = _finite_rows(images)
        images[~finite] = 0.0
        feats, final_bs = _split_on_oom(lambda c: extractor(c).float(), images, final_bs, oom, device, to="cpu")
        tgt = ref_feats.cpu().repeat_interleave(n, dim=0)
        dist = fiber_distance(feats, tgt, loss)
        cos = F.cosine_similarity(feats, tgt, dim=-1)
    unit = "iteration" if method == "metamer" else "denoising step"
    total = hp.get("iters", steps) if method == "metamer" else steps
    status = []
    for r in range(M):
        ev = {k: int(v[r]) for k, v in events.items()}
        history = _fault_history(ev, int(halvings[r]), int(gave_up[r]), unit, total,
                                 "scale" if method == "dps" else "lr")
        if not bool(finite[r]):
            status.append(f"failed: the sample's image is non-finite (set to 0); {history}")
        elif not bool(torch.isfinite(dist[r])):
            status.append(f"failed: the extractor gave non-finite features for the final image; {history}")
        elif gave_up[r] >= 0:
            status.append(f"failed: {history}")
        elif faults[r] > 0 and method != "unguided" and updates[r] == 0:
            status.append(f"failed: every guided update was non-finite ({history}); "
                          f"the sample is effectively unguided")
        elif faults[r] > 0:
            status.append(f"recovered: {history}")
        else:
            status.append("ok")
    config.update(seconds=seconds, seconds_per_sample=seconds / M, batch_size_used=bs,
                  final_batch_size_used=final_bs, oom_splits=oom_splits + oom["splits"],
                  lr_halvings=int(halvings.sum()), samples_given_up=int((gave_up >= 0).sum()),
                  denoiser_evals_per_sample=calls["denoiser"], extractor_evals_per_sample=calls["extractor"])
    hist = None
    if all(h is not None for h in histories):
        hist = torch.stack(histories, dim=1)
    traj = torch.stack(trajs, dim=1) if return_trajectory and all(t is not None for t in trajs) else None
    return FiberResult(images=images, reference=ref.cpu(), feature_distance=dist, cosine=cos, status=status,
                       config=config, loss_history=hist, trajectory=traj,
                       reference_ids=list(reference_ids) if reference_ids is not None else None,
                       features=feats, reference_features=ref_feats.cpu(), latents=out_x0)
