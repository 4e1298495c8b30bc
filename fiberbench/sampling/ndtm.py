"""``ndtm``: Non-linear Diffusion Trajectory Matching with the fiber loss as terminal cost.

Pandey et al. 2025 (arXiv 2502.03686); used for fibers by Rousselot, Wendebourg & Köthe 2026. At every
denoising step a control ``u`` is optimised so that x0_hat(x_t + gamma_t u) lies in the fiber, then the
prior steps from the controlled state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import progress, register_sampler, report
from .optim import RowAdam, guard
from .problem import FiberProblem, finite_rows, gamma_at

NDTM_DEFAULTS = dict(inner_steps=4, lr=0.05, lr_decay="linear", w_ctrl=0.0, w_score=0.0, w_term=1.0,
                     gamma=[(0, 0, 1000, 900), (1, 1, 900, 0)], eta=0.0, target="fixed", control_init="zero",
                     grad_clip=1.0, grad_norm="clip", fiber_tol=0.0, adam_eps=1e-4, recurrence=1,
                     recurrence_tau=500.0)


@register_sampler("ndtm", defaults=NDTM_DEFAULTS)
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
    ctrl = Control(inner_steps, w_ctrl, w_score, w_term, control_init, grad_clip, grad_norm, fiber_tol, adam_eps)
    u = torch.zeros_like(x)
    for i in progress(n_steps, disable):
        t, s = sched.times[i], sched.times[i + 1]
        g = gamma_at(gamma, float(sched.taus[i]))
        rate = lr * (1.0 - i / n_steps) if lr_decay == "linear" else lr
        reps = int(recurrence) if g > 0 and float(sched.taus[i]) >= recurrence_tau else 1
        for rep in range(reps):
            if rep:  # time travel: back to t from the state just reached at s
                x = problem.prior.renoise(x, s, t, problem.noise.draw())
            loss = None
            if g > 0 and inner_steps > 0 and rate > 0 and bool(problem.live().any()):
                u, loss = optimise_control(problem, x, u, t, g, problem.target_at(t, target), rate, i, ctrl)
            u[~problem.live()] = 0  # given up: unguided from here on
            x, x0 = controlled_step(problem, x, u, g, t, s, eta, i)
        problem.record(loss, x0)
        report(callback, i, t, x, x0, problem, loss)
    return x0


@dataclass(frozen=True)
class Control:
    """The inner problem's settings (see :func:`sample_ndtm` for each)."""

    inner_steps: int
    w_ctrl: float
    w_score: float
    w_term: float
    control_init: str
    grad_clip: float
    grad_norm: str
    fiber_tol: float
    adam_eps: float


def optimise_control(problem: FiberProblem, x: torch.Tensor, u: torch.Tensor, t, g: float, h: torch.Tensor,
                     rate: float, i: int, ctrl: Control) -> tuple[torch.Tensor, torch.Tensor]:
    """``ctrl.inner_steps`` Adam steps on the control ``u`` ``[M,C,H,W]`` at time ``t`` towards target ``h``.

    Returns the new control (detached; non-finite rows zeroed) and the last inner step's fiber loss ``[M]``.
    """
    eps_base = None
    if ctrl.w_score:
        with torch.no_grad():
            _, eps_base = problem.denoise(x, t)
    u = torch.zeros_like(x) if ctrl.control_init == "zero" else u.detach()
    u[~problem.live()] = 0
    problem.scale_exp.zero_()  # a new control problem: every sample starts at the full lr again
    last_ok = torch.zeros_like(x)  # per sample: the last control whose cost and gradient were finite
    opt = RowAdam(u, [rate * sc for sc in problem.step_scales()], eps=ctrl.adam_eps)
    u.requires_grad_(True)
    for _ in range(ctrl.inner_steps):
        assert torch.is_grad_enabled(), "guided step needs autograd (a pipeline may have disabled it)"
        x0, eps = problem.denoise(x + g * u, t)
        loss = problem.loss(x0, h)
        cost = ctrl.w_term * loss
        if ctrl.w_ctrl:
            cost = cost + ctrl.w_ctrl * (g * u).flatten(1).pow(2).sum(1)
        if eps_base is not None:
            cost = cost + ctrl.w_score * (eps_base - eps).flatten(1).pow(2).sum(1)
        cost.sum().backward()
        grad, u.grad = u.grad, None
        with torch.no_grad():
            ok = guard(problem, i, cost, grad, u, last_ok, opt, rate)
            last_ok[ok] = u[ok]
            norms = grad.flatten(1).norm(dim=1).clamp(min=1e-12)
            scale = ctrl.grad_clip / norms
            if ctrl.grad_norm == "clip":
                scale = scale.clamp(max=1.0)
            if ctrl.fiber_tol > 0:  # already on the fiber: no push (unit norm would push at full size)
                scale[loss.detach() <= ctrl.fiber_tol] = 0.0
            grad.mul_(scale.view(-1, *[1] * (grad.ndim - 1)))
        opt.step(grad, ok)
    u = u.detach()
    u[~finite_rows(u)] = 0
    return u, loss


@torch.no_grad()
def controlled_step(problem: FiberProblem, x: torch.Tensor, u: torch.Tensor, g: float, t, s, eta: float,
                    i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior's step from ``t`` to ``s`` out of the controlled state ``x + g u``: ``(x_s, x0_hat)``.

    A sample whose next state is non-finite is booked and redoes the step unguided (its control is zeroed).
    """
    xc = x + g * u if g > 0 else x
    x0, eps = problem.denoise(xc, t)
    x_new = problem.prior.step(xc, x0, eps, t, s, eta, problem.noise.draw() if eta > 0 else None)
    bad = ~finite_rows(x_new)
    if bad.any():  # fall back to the unguided step for those samples
        problem.fault(bad, "state", i, halve=False)  # the next step's control starts afresh anyway
        x0u, epsu = problem.denoise(x[bad], t)
        x0[bad] = x0u
        x_new[bad] = problem.prior.step(x[bad], x0u, epsu, t, s, 0.0)
        u[bad] = 0
    return x_new, x0
