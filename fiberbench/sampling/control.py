"""NDTM's control problem at one denoising step, and the prior's step out of the controlled state.

Shared by :func:`~fiberbench.sampling.ndtm.sample_ndtm` and its particle phase
(:mod:`~fiberbench.sampling.steering`). :func:`guide_rows` and :func:`step_rows` run them on some rows only
(samples already on the fiber, particles dropped) through :meth:`FiberProblem.rows`, so the rows left out
cost no network evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .optim import RowAdam, guard
from .problem import FiberProblem, finite_rows


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


def guide_rows(problem: FiberProblem, x: torch.Tensor, u: torch.Tensor, t, g: float, h: torch.Tensor,
               rate: float, i: int, ctrl: Control, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`optimise_control` on the rows ``rows`` (``[M]`` bool) only; the others get a zero control and a
    NaN loss. Returns ``(u [M,...], loss [M] or None when no row is guided)``."""
    if bool(rows.all()):
        return optimise_control(problem, x, u, t, g, h, rate, i, ctrl)
    u = torch.zeros_like(x) if ctrl.control_init == "zero" else u.detach().clone()
    u[~rows] = 0
    if not bool(rows.any()):
        return u, None
    idx = rows.nonzero().flatten()
    sub = problem.rows(idx)
    u_sub, loss_sub = optimise_control(sub, x[idx], u[idx], t, g, h[idx], rate, i, ctrl)
    problem.merge(sub, idx)
    u[idx] = u_sub
    loss = torch.full((x.shape[0],), float("nan"), device=x.device)
    loss[idx] = loss_sub.detach()
    return u, loss


def step_rows(problem: FiberProblem, x: torch.Tensor, u: torch.Tensor, g: float, t, s, eta: float, i: int,
              rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`controlled_step` of the rows ``rows`` (``[M]`` bool; the others keep their state and get a zero
    x0_hat; every sample's noise stream advances as in a full step). Returns ``(x_s, x0_hat)``, both ``[M,...]``."""
    if bool(rows.all()):
        return controlled_step(problem, x, u, g, t, s, eta, i)
    idx = rows.nonzero().flatten()
    sub = problem.rows(idx)
    x_new, x0_sub = controlled_step(sub, x[idx], u[idx], g, t, s, eta, i)
    problem.merge(sub, idx)
    x, x0 = x.clone(), torch.zeros_like(x)
    x[idx], x0[idx] = x_new, x0_sub
    return x, x0
