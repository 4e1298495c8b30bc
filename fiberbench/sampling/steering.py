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

With ``retry`` R > 0 a sample whose best particle still has L > ``retry_tol`` at the end of the phase gets R
more particles (a second swarm from its own generator, after the first), and the draw is among all K + R: the
hard references pay for more tries, the others are untouched bit for bit.
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
    retry: int = 0  # R more particles for the samples whose best of K ends the phase with loss > retry_tol
    retry_tol: float = 0.05


def draw_particles(problem: FiberProblem, logw: torch.Tensor) -> torch.Tensor:
    """Per sample, one particle drawn by ``softmax(logw)`` (``[M,K]``) with the sample's own uniform:
    the rows ``[M]`` (``i*K + k``) of the particle problem."""
    M, K = logw.shape
    w = torch.softmax(logw.double(), dim=1)
    cdf = w.cumsum(1)
    # from each row's last particle with weight on, the cdf is exactly 1: a dropped particle is never drawn
    col = torch.arange(K, device=w.device)
    last = (K - 1) - (w > 0).flip(1).int().argmax(1, keepdim=True)
    cdf = torch.where(col >= last, torch.ones_like(cdf), cdf)
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
    more = retry_swarm(problem, st, sched, steering, ctrl, gamma, lr_at, eta, target) if steering.retry else None
    if more is None:
        keep = draw_particles(problem, logw)
        problem.merge(pp)  # every particle's calls
        problem.merge(pp.rows(keep), torch.arange(M))  # the drawn lineage's fault record
        return st.xs[keep], st.x0[keep], i, st.loss[keep]
    idx, pr, sr = more
    R = steering.retry
    wide = torch.full((M, K + R), float("-inf"), dtype=logw.dtype, device=logw.device)
    wide[:, :K] = logw
    wide[idx.to(wide.device), K:] = (-steering.lam * sr.loss).view(-1, R).double().masked_fill(
        ~sr.alive.view(-1, R), float("-inf"))
    j = draw_particles(problem, wide) % (K + R)  # per sample, its column among K + R
    first = j < K
    keep = torch.arange(M, device=j.device) * K + j.clamp(max=K - 1)
    xs, x0, loss = st.xs[keep], st.x0[keep], st.loss[keep]
    problem.merge(pp)
    problem.merge(pr)  # every retry particle's calls
    problem.merge(pp.rows(keep[first]), first.nonzero().flatten())
    took = (~first).nonzero().flatten()
    if took.numel():
        pos = torch.full((M,), -1, dtype=torch.long, device=j.device)
        pos[idx.to(j.device)] = torch.arange(idx.numel(), device=j.device)
        rows = pos[took] * R + (j[took] - K)
        xs[took], x0[took], loss[took] = sr.xs[rows], sr.x0[rows], sr.loss[rows]
        problem.merge(pr.rows(rows), took)
    return xs, x0, i, loss


def retry_swarm(problem: FiberProblem, st: Swarm, sched, steering: Steering, ctrl: Control, gamma, lr_at: Callable,
                eta: float, target: str) -> tuple[torch.Tensor, FiberProblem, Swarm] | None:
    """The retry round: ``steering.retry`` R fresh particles for each sample whose best live particle in ``st``
    ended the phase with fiber loss > ``retry_tol``, run through the same phase. Their noise comes from those
    samples' generators only, so the other samples' streams do not advance. Returns ``(idx [P], problem of the
    P*R particles, their swarm)``, or ``None`` when no sample needs it."""
    M, K, R = st.m, st.k, steering.retry
    best = st.loss.view(M, K).masked_fill(~st.alive.view(M, K), float("inf")).min(1).values
    idx = (best > steering.retry_tol).nonzero().flatten().cpu()
    if idx.numel() == 0:
        return None
    sub = problem.rows(idx, noise=problem.noise.subset(idx))
    pr = problem.rows(idx.repeat_interleave(R), noise=ParticleNoise(sub.noise, R))
    sr = Swarm(pr.fresh_start(sched), idx.numel(), R)
    run_phase(sub, pr, sr, sched, steering, ctrl, gamma, lr_at, eta, target, None, True, quiet=True)
    return idx, pr, sr


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
    cur = pp.rows_loss(x0[idx], idx)
    out[idx] = torch.where(torch.isfinite(cur), cur, torch.full_like(cur, WORST_LOSS))
    return out


class Branches:
    """Late branching: ``k - 1`` extra trajectories for each sample still off the fiber at a mid-noise step.

    The branches start from the sample's state and differ by the prior's step noise (eta > 0); they are stepped
    beside the main batch with the same control, and :meth:`draw` keeps, per branched sample, the trajectory whose
    x0_hat has the lowest fiber loss. Samples on the fiber cost nothing.
    """

    def __init__(self, problem: FiberProblem, x: torch.Tensor, u: torch.Tensor, x0: torch.Tensor, off: torch.Tensor,
                 k: int):
        self.k, self.off = int(k), off.clone()
        self.idx = off.nonzero().flatten()
        src = self.idx.repeat_interleave(self.k - 1)
        # the branches draw from the branched samples' generators only: a sample that does not branch keeps
        # exactly the trajectory it has without branching, and one that does is the same alone or in any batch
        noise = ParticleNoise(problem.noise.subset(self.idx), self.k - 1) if src.numel() else None
        self.pp = problem.rows(src, noise=noise) if src.numel() else None
        self.x, self.u, self.x0 = x[src].clone(), u[src].clone(), x0[src].clone()

    def step(self, guide: Callable, advance: Callable) -> None:
        """One denoising step of every branch: ``guide(pp, x, u) -> (u, loss, kept)``, ``advance(pp, x, u, kept) ->
        (x, x0)`` on the branches' problem."""
        if self.pp is None:
            return
        self.u, _, kept = guide(self.pp, self.x, self.u)
        self.u[~self.pp.live()] = 0
        self.x, self.x0 = advance(self.pp, self.x, self.u, kept)

    @torch.no_grad()
    def draw(self, problem: FiberProblem, x: torch.Tensor, u: torch.Tensor,
             x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per branched sample the lowest-loss of its ``k`` trajectories: ``(x, u, x0, loss [M])`` (loss inf where
        not branched)."""
        best = torch.full((x.shape[0],), float("inf"), device=x.device)
        if self.pp is None:
            return x, u, x0, best
        n = self.idx.numel()
        main = problem.rows_loss(x0[self.idx], self.idx)
        extra = self.pp.loss(self.x0, self.pp.target)
        losses = torch.cat([main.view(n, 1), extra.view(n, self.k - 1)], 1)
        losses = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, float("inf")))
        j = losses.argmin(1)
        best[self.idx] = losses.min(1).values
        problem.merge(self.pp)  # every branch's calls
        took = j > 0
        if bool(took.any()):
            pick = (j[took] - 1) + torch.arange(n, device=j.device)[took] * (self.k - 1)
            rows = self.idx[took]
            x, u, x0 = x.clone(), u.clone(), x0.clone()
            x[rows], u[rows], x0[rows] = self.x[pick], self.u[pick], self.x0[pick]
            problem.merge(self.pp.rows(pick), rows)  # the kept branch's fault record
        return x, u, x0, best


@dataclass
class Branching:
    """When to branch and draw (see :class:`Branches`): ``k`` trajectories per sample off the fiber (loss >
    ``tol``) at the first step with tau < ``from_tau``, drawn among once the state's tau is below ``until_tau``."""

    k: int
    from_tau: float
    until_tau: float
    tol: float
    live: Branches | None = None
    started: bool = False

    def start(self, problem: FiberProblem, tau: float, x: torch.Tensor, u: torch.Tensor, x0: torch.Tensor,
              last: torch.Tensor | None, loss_now: Callable[[], torch.Tensor]) -> None:
        """Before the step at ``tau``: branch, once, the samples whose loss (``last``, else ``loss_now()``) is
        above ``tol``."""
        if self.started or tau >= self.from_tau:
            return
        self.started = True
        self.live = Branches(problem, x, u, x0, (last if last is not None else loss_now()) > self.tol, self.k)

    def after(self, problem: FiberProblem, tau_next: float, final: bool, x: torch.Tensor, u: torch.Tensor,
              x0: torch.Tensor, last: torch.Tensor | None, guide: Callable,
              advance: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """After the main step to ``tau_next``: the same step for the branches, and the draw once ``tau_next <
        until_tau`` (or at the ``final`` step). Returns ``(x, u, x0, last)`` with the drawn trajectories."""
        if self.live is None:
            return x, u, x0, last
        self.live.step(guide, advance)
        if tau_next >= self.until_tau and not final:
            return x, u, x0, last
        br, self.live = self.live, None
        x, u, x0, best = br.draw(problem, x, u, x0)
        if last is not None:
            last = torch.where(br.off, torch.minimum(last, best), last)
        return x, u, x0, last
