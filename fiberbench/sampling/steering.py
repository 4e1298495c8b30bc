"""Feynman-Kac steering of NDTM's high-noise steps: K guided particles per sample, one drawn by its fiber loss.

Why: NDTM fails on embeddings (SSL encoders, CLIP towers, pre-logits) by committing at high noise to a coarse
layout (shape, background) from which its inner problem never escapes: the fiber loss stays at 0.6-0.8 from
tau ~800 on, a local minimum rather than a step-size problem. Each particle here is a full NDTM trajectory,
so each sample gets K independent tries at that decision; the fiber loss of a particle's x0_hat at tau ~600
predicts which try worked, and one particle per sample is drawn with weight ``exp(-lambda L(x0_hat))``
(the potential of Feynman-Kac steering, Singhal et al. 2025, with NDTM's control inside each particle).
There is no resampling before the draw: at tau 900-800 the loss is a noisy predictor, and resampling copies
one lineage into all K slots, so the tries stop being independent (docs/performance.md has the measurements).

Algorithm, per sample with its own generator (so a sample is the same alone or in any batch):

1. start K particles from fresh noise (or, for SDEdit, the reference noised with K fresh draws);
2. while tau >= ``until_tau``: NDTM's control (``inner_steps`` Adam steps) and the prior's step for every
   live particle, then the fiber loss L of each particle's x0_hat;
3. draw one particle by ``softmax(-lambda L)`` with the sample's own uniform; its state, x0_hat, loss and
   fault record become the sample's. With ``early_draw_tol`` > 0 a sample draws as soon as one of its
   particles has L <= early_draw_tol and its other particles are not evaluated again.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .base import progress, report
from .control import Control, guide_rows, step_rows
from .problem import FiberProblem, ParticleNoise, gamma_at

WORST_LOSS = 2.0  # the cosine loss's maximum: the weight given to non-finite and dropped particles


@dataclass(frozen=True)
class Steering:
    """The particle phase's settings (see :func:`steer_particles`)."""

    particles: int  # K per sample
    until_tau: float  # the phase runs while tau >= this
    inner_steps: int  # NDTM inner steps per particle and step
    grad_norm: str  # "unit" | "clip", as NDTM's
    lam: float  # the potential's inverse temperature: weight exp(-lam * L(x0_hat))
    early_draw_tol: float  # > 0: draw as soon as a particle is this close to the fiber
    lazy: bool = False  # one particle first; the other K - 1 only for samples it left off the fiber


def draw_particles(problem: FiberProblem, logw: torch.Tensor) -> torch.Tensor:
    """Per sample, one particle drawn by ``softmax(logw)`` (``[M,K]``) with the sample's own uniform:
    the rows ``[M]`` (``i*K + k``) of the particle problem."""
    M, K = logw.shape
    cdf = torch.softmax(logw.double(), dim=1).cumsum(1)
    cdf[:, -1] = 1.0
    u = problem.noise.uniform((1,)).view(M, 1).to(cdf.device, cdf.dtype)
    j = torch.searchsorted(cdf.contiguous(), u.contiguous()).clamp(max=K - 1)
    return (j + torch.arange(M, device=cdf.device).view(M, 1) * K).flatten()


def early_draws(problem: FiberProblem, logw: torch.Tensor, loss: torch.Tensor, alive: torch.Tensor,
                tol: float) -> torch.Tensor:
    """The particles still evaluated after this step: a sample with several live particles, one of them with
    ``loss <= tol``, keeps only one, drawn by weight. ``loss`` and ``alive`` are ``[M*K]``; the uniforms are
    drawn for every sample every step (per-sample streams)."""
    M, K = logw.shape
    pick = draw_particles(problem, logw)
    live = alive.view(M, K)
    best = loss.view(M, K).masked_fill(~live, float("inf")).min(1).values
    hit = (live.sum(1) > 1) & (best <= tol)
    if not bool(hit.any()):
        return alive
    alive = alive & ~hit.repeat_interleave(K)
    alive[pick[hit]] = True
    return alive


def steer_particles(problem: FiberProblem, sched, steering: Steering, ctrl: Control, *, gamma, lr_at: Callable,
                    eta: float, target: str, callback=None,
                    disable=None) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """The particle phase of :func:`~fiberbench.sampling.ndtm.sample_ndtm` on ``problem`` (M samples).

    With ``steering.lazy`` the phase runs twice: first particle 0 of every sample alone; then, for the samples
    whose particle 0 ended the phase with a fiber loss above ``early_draw_tol``, their other K - 1 particles
    from their own starts, and the draw is among all K. A sample its first particle brought to the fiber
    costs one trajectory.

    Returns ``(x, x0, i, loss)``: per sample the drawn particle's state ``[M,C,H,W]`` at step ``i`` (the first
    step with tau < ``until_tau``, or the end), its x0_hat and the fiber loss of that x0_hat ``[M]``. The
    particles' network calls are charged to ``problem`` per output sample (K particles cost K evaluations).
    """
    M, K = problem.target.shape[0], steering.particles
    pp = problem.rows(torch.arange(M).repeat_interleave(K), noise=ParticleNoise(problem.noise, K))
    st = Swarm(pp.fresh_start(sched), M, K)
    if steering.lazy:
        st.alive = (torch.arange(M * K, device=st.xs.device) % K) == 0
    i = run_phase(problem, pp, st, sched, steering, ctrl, gamma, lr_at, eta, target, callback, disable)
    if steering.lazy:
        first = st.loss.view(M, K)[:, 0]
        retry = (first > steering.early_draw_tol).repeat_interleave(K)
        others = (torch.arange(M * K, device=st.xs.device) % K) != 0
        # the second pass runs even when no sample needs it: every sample's noise stream then advances alike
        # whatever the others in its batch do, so a sample is the same alone or in any batch
        done = st.alive.clone()
        st.alive = retry & others
        run_phase(problem, pp, st, sched, steering, ctrl, gamma, lr_at, eta, target, None, True, quiet=True)
        # an early draw among the others (it keeps one of K - 1 >= 2) drops particle 0 too
        drew = (st.alive.view(M, K)[:, 1:].sum(1) == 1) & (K > 2)
        st.alive = st.alive | (done & ~drew.repeat_interleave(K))
    logw = (-steering.lam * st.loss).view(M, K).double().masked_fill(~st.alive.view(M, K), float("-inf"))
    keep = draw_particles(problem, logw)
    problem.merge(pp)  # every particle's calls
    problem.merge(pp.rows(keep), torch.arange(M))  # the drawn lineage's fault record
    return st.xs[keep], st.x0[keep], i, st.loss[keep]


class Swarm:
    """The particles' state ``[M*K,...]``: positions, x0_hat, fiber loss of x0_hat and which are still evaluated."""

    def __init__(self, xs: torch.Tensor, m: int, k: int):
        self.xs, self.x0, self.m, self.k = xs, torch.zeros_like(xs), m, k
        self.alive = torch.ones(m * k, dtype=torch.bool, device=xs.device)
        self.loss = torch.full((m * k,), WORST_LOSS, device=xs.device)


def run_phase(problem: FiberProblem, pp: FiberProblem, st: Swarm, sched, steering: Steering, ctrl: Control, gamma,
              lr_at: Callable, eta: float, target: str, callback, disable, quiet: bool = False) -> int:
    """Steps 0, 1, ... while tau >= ``until_tau`` for the live particles of ``st`` (updated in place); returns the
    first step after the phase. ``quiet``: a second pass, which records and reports nothing."""
    M, K = st.m, st.k
    pctrl = replace(ctrl, inner_steps=steering.inner_steps, grad_norm=steering.grad_norm, w_real=0.0)
    i = 0
    for i in progress(len(sched), disable):
        t, s, tau = sched.times[i], sched.times[i + 1], float(sched.taus[i])
        if tau < steering.until_tau:
            return i
        if not bool(st.alive.any()):  # nothing to evaluate: only the draws a step makes, for every sample
            if eta > 0:
                pp.noise.draw()
            if steering.early_draw_tol > 0:
                problem.noise.uniform((1,))
            continue
        g, rate = gamma_at(gamma, tau), lr_at(i)
        u, loss, kept = torch.zeros_like(st.xs), None, None
        if g > 0 and pctrl.inner_steps > 0 and rate > 0:
            u, loss, kept = guide_rows(pp, st.xs, u, t, g, pp.target_at(t, target), rate, i, pctrl,
                                       pp.live() & st.alive)
        u[~pp.live()] = 0
        st.xs, x0 = step_rows(pp, st.xs, u, g, t, s, eta, i, st.alive, kept)
        rows = st.alive.view(-1, *[1] * (x0.ndim - 1))
        st.x0 = torch.where(rows, x0, st.x0)
        with torch.no_grad():
            st.loss = torch.where(st.alive, particle_losses(pp, x0, st.alive), st.loss)
        logw = (-steering.lam * st.loss).view(M, K).double().masked_fill(~st.alive.view(M, K), float("-inf"))
        if steering.early_draw_tol > 0:
            st.alive = early_draws(problem, logw, st.loss, st.alive, steering.early_draw_tol)
            logw = logw.masked_fill(~st.alive.view(M, K), float("-inf"))
        if quiet:
            continue
        shown = logw.argmax(1) + torch.arange(M, device=logw.device) * K  # the currently heaviest particle
        problem.record(None if loss is None else loss[shown], st.x0[shown])
        report(callback, i, t, st.xs[shown], st.x0[shown], problem, None if loss is None else loss[shown])
    return len(sched)


def particle_losses(pp: FiberProblem, x0: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """The fiber loss of each live particle's x0_hat ``[M*K]`` (:data:`WORST_LOSS` for dropped or non-finite
    ones), one extractor pass over the live rows."""
    out = torch.full((x0.shape[0],), WORST_LOSS, device=x0.device)
    idx = alive.nonzero().flatten()
    sub = pp.rows(idx)
    cur = sub.loss(x0[idx], sub.target)
    pp.merge(sub)
    out[idx] = torch.where(torch.isfinite(cur), cur, torch.full_like(cur, WORST_LOSS))
    return out
