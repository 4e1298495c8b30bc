"""``ndtm``: Non-linear Diffusion Trajectory Matching with the fiber loss as terminal cost.

Pandey et al. 2025 (arXiv 2502.03686); used for fibers by Rousselot, Wendebourg & Köthe 2026. At every
denoising step a control ``u`` is optimised so that x0_hat(x_t + gamma_t u) lies in the fiber, then the
prior steps from the controlled state. With ``particles`` K > 1 the high-noise steps run on K guided particles
per sample, one of which is drawn by its fiber loss (:mod:`.steering`).
"""
from __future__ import annotations

import torch

from .base import progress, register_sampler, report
from .control import Control, Kept, controlled_step, guide_rows, optimise_control
from .problem import FiberProblem, gamma_at
from .steering import Branching, Steering, steer_particles

NDTM_DEFAULTS = dict(inner_steps=4, lr=0.05, lr_decay="linear", w_ctrl=0.0, w_score=0.0, w_term=1.0,
                     gamma=[(0, 0, 1000, 900), (1, 1, 900, 0)], eta=0.0, target="fixed", control_init="zero",
                     grad_clip=1.0, grad_norm="clip", fiber_tol=0.0, adam_eps=1e-4, recurrence=1,
                     recurrence_tau=500.0, particles=1, particle_tau=600.0, particle_inner_steps=2,
                     particle_grad_norm="unit", particle_lambda=20.0, early_draw_tol=0.0, skip_tol=0.0,
                     exit_tol=0.0, particle_spawn="all", w_real=0.0, real_tau=300.0, branches=1, branch_tau=600.0,
                     branch_until=300.0, branch_tol=0.02, particle_retry=0, particle_retry_tol=0.05)
PARTICLE_RULES = {
    "particles": dict(kind="int", lo=1, hi=256),
    "particle_tau": dict(kind="real", lo=0.0, hi=1000.0),
    "particle_inner_steps": dict(kind="int", lo=0, hi=1000),
    "particle_grad_norm": dict(kind="choice", choices=("clip", "unit")),
    "particle_lambda": dict(kind="real", lo=0.0),
    "early_draw_tol": dict(kind="real", lo=0.0),
    "skip_tol": dict(kind="real", lo=0.0),
    "exit_tol": dict(kind="real", lo=0.0),
    "particle_spawn": dict(kind="choice", choices=("all", "lazy")),
    "w_real": dict(kind="real", lo=0.0),
    "real_tau": dict(kind="real", lo=0.0, hi=1000.0, open_lo=True),
    "branches": dict(kind="int", lo=1, hi=256),
    "branch_tau": dict(kind="real", lo=0.0, hi=1000.0),
    "branch_until": dict(kind="real", lo=0.0, hi=1000.0),
    "branch_tol": dict(kind="real", lo=0.0),
    "particle_retry": dict(kind="int", lo=0, hi=256),
    "particle_retry_tol": dict(kind="real", lo=0.0),
}


@register_sampler("ndtm", defaults=NDTM_DEFAULTS, rules=PARTICLE_RULES)
def sample_ndtm(problem: FiberProblem, x: torch.Tensor, sched, callback=None, disable=None, *,
                inner_steps: int = 4, lr: float = 0.05, lr_decay: str = "linear", w_ctrl: float = 0.0,
                w_score: float = 0.0, w_term: float = 1.0, gamma=1.0, eta: float = 0.0, target: str = "fixed",
                control_init: str = "zero", grad_clip: float = 1.0, grad_norm: str = "clip",
                fiber_tol: float = 0.0, adam_eps: float = 1e-8, recurrence: int = 1,
                recurrence_tau: float = 500.0, particles: int = 1, particle_tau: float = 600.0,
                particle_inner_steps: int = 2, particle_grad_norm: str = "unit", particle_lambda: float = 20.0,
                early_draw_tol: float = 0.0, skip_tol: float = 0.0, exit_tol: float = 0.0,
                particle_spawn: str = "all", w_real: float = 0.0, real_tau: float = 300.0, branches: int = 1,
                branch_tau: float = 600.0, branch_until: float = 300.0, branch_tol: float = 0.02,
                particle_retry: int = 0, particle_retry_tol: float = 0.05) -> torch.Tensor:
    """NDTM: at every step optimise a control u so that x0_hat(x_t + gamma_t u) lies in the fiber.

    Cost ``C = w_ctrl ||gamma u||^2 + w_score ||eps(x_t) - eps(x_t + gamma u)||^2 + w_term L_fiber`` (+ the
    realism term below), minimised with ``inner_steps`` Adam steps (fresh optimiser each step, gradient clipped
    to norm ``grad_clip`` per sample, or with ``grad_norm="unit"`` rescaled to norm ``grad_clip`` whatever its
    size, lr decaying linearly over the trajectory; a sample whose fiber loss is already ``<= fiber_tol``
    gets a zero gradient for that inner step, so unit norm does not keep pushing it); then a DDIM step (``eta``)
    from the controlled state. Adam's first step is ``lr * sign(g)``: components whose gradient is float noise
    move as much as real ones, which makes results depend on batch size through round-off; ``adam_eps`` well
    above that noise (e.g. 1e-4 with unit-norm gradients) damps them. ``control_init="zero"`` restarts u at 0
    (the paper's); ``"warm"`` starts from the previous step's control.

    Faults, per sample: a non-finite cost or gradient sends the control back to its last finite iterate with a
    fresh Adam state and half the lr for the rest of this inner loop (:func:`.optim.guard`); a non-finite next
    state redoes the step unguided; after ``MAX_HALVINGS`` halvings in a row the sample finishes unguided.

    ``recurrence`` r > 1 repeats every guided step at tau >= ``recurrence_tau`` r times: the state reached at s
    is forward-diffused back to t (:meth:`Prior.renoise`, fresh noise) and the step redone ("time travel",
    FreeDoM / Universal Guidance), r chances for the coarse layout; cost: r times those steps' guided calls.

    ``particles`` K > 1 runs the steps with tau >= ``particle_tau`` on K particles per sample, each an NDTM
    trajectory with ``particle_inner_steps`` inner steps and ``particle_grad_norm``, then draws one per sample
    with weight ``exp(-particle_lambda * L(x0_hat))`` (``early_draw_tol`` > 0: as soon as one particle of a
    sample has L <= early_draw_tol) and continues as above (:mod:`.steering`: K tries at the coarse layout,
    which NDTM alone gets wrong on embeddings); ``particle_spawn="lazy"`` runs the other K - 1 only for samples
    whose first particle ends the phase off the fiber; ``particle_retry`` R: R more for samples still above
    ``particle_retry_tol`` after it. Adaptive work: ``skip_tol`` > 0 skips the inner loop of a sample whose
    x0_hat after the previous step has loss <= skip_tol; ``exit_tol`` > 0 ends its inner loop at the first evaluation
    with loss <= exit_tol, and the step reuses it (:func:`.control.optimise_control`). Counts are per output sample.

    ``w_real`` > 0 adds ``w_real ||x0_hat - sg(D(x0_hat noised to real_tau))||^2`` after the particle phase: the
    prior's denoising residual, large on grain that reaches a small fiber (:func:`.control.realism_residual`).

    ``branches`` K > 1: a sample off the fiber (loss > ``branch_tol``) at the first step below ``branch_tau`` gets
    K - 1 more trajectories to ``branch_until``, the lowest loss kept (:class:`.steering.Branching`).
    """
    n_steps = len(sched)
    ctrl = Control(inner_steps, w_ctrl, w_score, w_term, control_init, grad_clip, grad_norm, fiber_tol, adam_eps,
                   exit_tol, w_real, real_tau)

    def lr_at(i: int) -> float:
        return lr * (1.0 - i / n_steps) if lr_decay == "linear" else lr

    start, last, x0 = 0, None, x  # last: x0_hat's fiber loss after the previous step, when skip_tol is used
    if particles > 1:
        steering = Steering(particles, particle_tau, particle_inner_steps, particle_grad_norm, particle_lambda,
                            early_draw_tol, particle_spawn == "lazy", particle_retry, particle_retry_tol)
        x, x0, start, last = steer_particles(problem, sched, steering, ctrl, gamma=gamma, lr_at=lr_at, eta=eta,
                                             target=target, callback=callback, disable=disable)
        last = last if skip_tol > 0 else None
    u = torch.zeros_like(x)
    fork = Branching(branches, branch_tau, branch_until, branch_tol) if branches > 1 else None
    for i in progress(n_steps, disable, start):
        t, s = sched.times[i], sched.times[i + 1]
        g, rate = gamma_at(gamma, float(sched.taus[i])), lr_at(i)
        if fork is not None:  # the samples still off the fiber get branches - 1 more tries from here
            fork.start(problem, float(sched.taus[i]), x, u, x0, last, lambda: on_fiber_loss(problem, x0))
        reps = int(recurrence) if g > 0 and float(sched.taus[i]) >= recurrence_tau else 1
        for rep in range(reps):
            if rep:  # time travel: back to t from the state just reached at s
                x = problem.prior.renoise(x, s, t, problem.noise.draw())
            x, u, x0, loss, last = ndtm_step(problem, x, u, last, t, s, g, rate, i, ctrl, target, eta, skip_tol)
        if fork is not None:
            x, u, x0, last = fork.after(problem, float(sched.taus[i + 1]), i == n_steps - 1, x, u, x0, last,
                                        lambda pp, xb, ub: guide_step(pp, xb, ub, t, g, rate, i, ctrl, target, None),
                                        lambda pp, xb, ub, kb: controlled_step(pp, xb, ub, g, t, s, eta, i, kb))
        problem.record(loss, x0)
        report(callback, i, t, x, x0, problem, loss)
    return x0


def ndtm_step(problem: FiberProblem, x: torch.Tensor, u: torch.Tensor, last: torch.Tensor | None, t, s, g: float,
              rate: float, i: int, ctrl: Control, target: str, eta: float, skip_tol: float):
    """One guided denoising step from ``t`` to ``s``: the control, then the prior's step out of the controlled state.
    ``last``: x0_hat's fiber loss ``[M]`` after the previous step (``None`` without ``skip_tol``). Returns
    ``(x_s, u, x0_hat, loss of the inner loop or None, last)``."""
    skip = None if last is None else last <= skip_tol  # samples already on the fiber skip the inner loop
    u, loss, kept = guide_step(problem, x, u, t, g, rate, i, ctrl, target, skip)
    u[~problem.live()] = 0  # given up: unguided from here on
    x, x0 = controlled_step(problem, x, u, g, t, s, eta, i, kept)
    if skip_tol > 0:
        last = on_fiber_loss(problem, x0, kept if target == "fixed" else None, loss)
    return x, u, x0, loss, last


def guide_step(problem: FiberProblem, x: torch.Tensor, u: torch.Tensor, t, g: float, rate: float, i: int,
               ctrl: Control, target: str,
               skip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, Kept | None]:
    """One step's control: the inner loop for the live samples not in ``skip`` (``[M]`` bool, ``None``: none
    skip). Returns ``(u, loss or None, kept or None)``; ``u`` unchanged when the step is not guided."""
    if not (g > 0 and ctrl.inner_steps > 0 and rate > 0):
        return u, None, None
    # the realism term's noise: one draw per guided step for every sample, whatever the batch does
    real_noise = problem.noise.draw() if ctrl.w_real > 0 else None
    if not bool(problem.live().any()):
        return u, None, None
    h = problem.target_at(t, target)
    if skip is None:
        return optimise_control(problem, x, u, t, g, h, rate, i, ctrl, real_noise)
    return guide_rows(problem, x, u, t, g, h, rate, i, ctrl, problem.live() & ~skip, real_noise)


@torch.no_grad()
def on_fiber_loss(problem: FiberProblem, x0: torch.Tensor, kept: Kept | None = None,
                  loss: torch.Tensor | None = None) -> torch.Tensor:
    """The fiber loss ``[M]`` of x0_hat against the fixed targets (inf where non-finite): what ``skip_tol``
    compares. Rows in ``kept`` take their inner loop's ``loss`` instead: their x0_hat is that evaluation's."""
    if kept is None or loss is None or not bool(kept.rows.any()):
        out = problem.loss(x0, problem.target)
    else:
        out = loss.detach().clone()
        idx = (~kept.rows).nonzero().flatten()
        if idx.numel():
            out[idx] = problem.rows_loss(x0[idx], idx)
    return torch.where(torch.isfinite(out), out, torch.full_like(out, float("inf")))
