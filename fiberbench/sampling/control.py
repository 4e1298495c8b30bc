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
    exit_tol: float = 0.0
    w_real: float = 0.0
    real_tau: float = 300.0


@dataclass
class Kept:
    """Prior evaluations an inner loop already made at the final controlled state of some rows: ``rows`` ``[M]``
    bool, ``x0`` and ``eps`` ``[M,C,H,W]`` (meaningful on those rows), so the step need not denoise them again."""

    rows: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor


def realism_residual(problem: FiberProblem, x0: torch.Tensor, tau: float, noise: torch.Tensor) -> torch.Tensor:
    """``||x0 - sg(D(x0 noised to tau))||^2`` per row ``[M]``: how much the prior's denoiser would change x0_hat.

    Regularisation by denoising (Romano et al. 2017): the gradient ``2 (x0 - D)`` points off the prior's image
    manifold, so the cost pulls x0_hat back towards it without a backward pass through the second denoiser call.
    A clean render moves little; guidance texture (grain) moves several times more. One counted prior forward
    with ``noise`` ``[M,C,H,W]`` (standard normal).
    """
    t_r = problem.prior.time_at_tau(tau)
    with torch.no_grad():
        clean, _ = problem.denoise(problem.prior.add_noise(x0.detach(), t_r, noise), t_r)
    return (x0 - clean).flatten(1).pow(2).sum(1)


def optimise_control(problem: FiberProblem, x: torch.Tensor, u: torch.Tensor, t, g: float, h: torch.Tensor,
                     rate: float, i: int, ctrl: Control,
                     real_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Kept | None]:
    """``ctrl.inner_steps`` Adam steps on the control ``u`` ``[M,C,H,W]`` at time ``t`` towards target ``h``.

    With ``ctrl.exit_tol`` > 0 a sample whose fiber loss at an inner evaluation is ``<= exit_tol`` leaves the loop
    with the control it was evaluated at: its later inner steps cost nothing, and that evaluation is returned in
    :class:`Kept` for the prior's step. With ``ctrl.w_real`` > 0 the cost adds ``w_real`` times the realism residual
    of x0_hat (:func:`realism_residual`), renoised with ``real_noise`` ``[M,C,H,W]`` (drawn by the caller once per
    step, so a sample's noise stream does not depend on how long the other rows stay in the loop). Returns the new
    control (detached; non-finite rows zeroed), the fiber loss ``[M]`` of each sample's last inner evaluation, and the
    kept evaluations (``None`` without ``exit_tol``).
    """
    if ctrl.w_real and real_noise is None:
        raise ValueError("w_real > 0 needs the step's real_noise (drawn by the caller once per guided step)")
    eps_base = None
    if ctrl.w_score:
        with torch.no_grad():
            _, eps_base = problem.denoise(x, t)
    u = torch.zeros_like(x) if ctrl.control_init == "zero" else u.detach()
    u[~problem.live()] = 0
    problem.scale_exp.zero_()  # a new control problem: every sample starts at the full lr again
    last_ok = torch.zeros_like(x)  # per sample: the last control whose cost and gradient were finite
    opt = RowAdam(u, [rate * sc for sc in problem.step_scales()], eps=ctrl.adam_eps)
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    kept = Kept(torch.zeros_like(active), torch.zeros_like(x), torch.zeros_like(x)) if ctrl.exit_tol > 0 else None
    loss_all = torch.full((x.shape[0],), float("nan"), device=x.device)
    u.requires_grad_(True)
    for _ in range(ctrl.inner_steps):
        assert torch.is_grad_enabled(), "guided step needs autograd (a pipeline may have disabled it)"
        if not bool(active.any()):
            break
        full = bool(active.all())
        idx = None if full else active.nonzero().flatten()
        sub = problem if full else problem.rows(idx)
        uc = g * u if full else g * u[idx]
        x0, eps = sub.denoise((x if full else x[idx]) + uc, t)
        loss = sub.loss(x0, h if full else h[idx])
        cost = ctrl.w_term * loss
        if ctrl.w_ctrl:
            cost = cost + ctrl.w_ctrl * uc.flatten(1).pow(2).sum(1)
        if eps_base is not None:
            cost = cost + ctrl.w_score * ((eps_base if full else eps_base[idx]) - eps).flatten(1).pow(2).sum(1)
        if ctrl.w_real:
            cost = cost + ctrl.w_real * realism_residual(sub, x0, ctrl.real_tau,
                                                         real_noise if full else real_noise[idx])
        cost.sum().backward()
        grad, u.grad = u.grad, None
        if not full:
            problem.merge(sub)  # the calls, counted for the rows evaluated
        with torch.no_grad():
            cost_all = torch.zeros_like(loss_all)
            cost_all[active] = cost.detach()
            loss_all[active] = loss.detach()
            ok = guard(problem, i, cost_all, grad, u, last_ok, opt, rate, rows=active)
            last_ok[ok] = u[ok]
            norms = grad.flatten(1).norm(dim=1).clamp(min=1e-12)
            scale = ctrl.grad_clip / norms
            if ctrl.grad_norm == "clip":
                scale = scale.clamp(max=1.0)
            if ctrl.fiber_tol > 0:  # already on the fiber: no push (unit norm would push at full size)
                scale[loss_all <= ctrl.fiber_tol] = 0.0
            grad.mul_(scale.view(-1, *[1] * (grad.ndim - 1)))
            if kept is not None:  # on the fiber: leave the loop where this evaluation was made
                done = active & ok & (loss_all <= ctrl.exit_tol)
                if bool(done.any()):
                    at = done[active]
                    rows = done.nonzero().flatten()
                    kept.rows[rows] = True
                    kept.x0[rows], kept.eps[rows] = x0.detach()[at], eps.detach()[at]
                    ok = ok & ~done
                    active = active & ~done
        opt.step(grad, ok)
    u = u.detach()
    bad = ~finite_rows(u)
    u[bad] = 0
    if kept is not None:
        kept.rows &= ~bad.to(kept.rows.device)
    return u, loss_all, kept


@torch.no_grad()
def controlled_step(problem: FiberProblem, x: torch.Tensor, u: torch.Tensor, g: float, t, s, eta: float,
                    i: int, kept: Kept | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior's step from ``t`` to ``s`` out of the controlled state ``x + g u``: ``(x_s, x0_hat)``.

    ``kept``: the rows whose prior evaluation at ``x + g u`` the inner loop already made (not denoised again).
    A sample whose next state is non-finite is booked and redoes the step unguided (its control is zeroed).
    """
    xc = x + g * u if g > 0 else x
    if kept is None or not bool(kept.rows.any()):
        x0, eps = problem.denoise(xc, t)
    else:
        x0, eps = kept.x0.clone(), kept.eps.clone()
        idx = (~kept.rows).nonzero().flatten()
        if idx.numel():
            sub = problem.rows(idx)
            x0[idx], eps[idx] = sub.denoise(xc[idx], t)
            problem.merge(sub)
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
               rate: float, i: int, ctrl: Control, rows: torch.Tensor,
               real_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, Kept | None]:
    """:func:`optimise_control` on the rows ``rows`` (``[M]`` bool) only; the others get a zero control and a
    NaN loss. Returns ``(u [M,...], loss [M] or None when no row is guided, kept evaluations or None)``."""
    if bool(rows.all()):
        return optimise_control(problem, x, u, t, g, h, rate, i, ctrl, real_noise)
    u = torch.zeros_like(x) if ctrl.control_init == "zero" else u.detach().clone()
    u[~rows] = 0
    if not bool(rows.any()):
        return u, None, None
    idx = rows.nonzero().flatten()
    sub = problem.rows(idx)
    u_sub, loss_sub, kept_sub = optimise_control(sub, x[idx], u[idx], t, g, h[idx], rate, i, ctrl,
                                                 None if real_noise is None else real_noise[idx])
    problem.merge(sub, idx)
    u[idx] = u_sub
    loss = torch.full((x.shape[0],), float("nan"), device=x.device)
    loss[idx] = loss_sub.detach()
    kept = None
    if kept_sub is not None:
        kept = Kept(torch.zeros_like(rows), torch.zeros_like(x), torch.zeros_like(x))
        kept.rows[idx], kept.x0[idx], kept.eps[idx] = kept_sub.rows, kept_sub.x0, kept_sub.eps
    return u, loss, kept


def step_rows(problem: FiberProblem, x: torch.Tensor, u: torch.Tensor, g: float, t, s, eta: float, i: int,
              rows: torch.Tensor, kept: Kept | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`controlled_step` of the rows ``rows`` (``[M]`` bool; the others keep their state and get a zero
    x0_hat; every sample's noise stream advances as in a full step). Returns ``(x_s, x0_hat)``, both ``[M,...]``."""
    if bool(rows.all()):
        return controlled_step(problem, x, u, g, t, s, eta, i, kept)
    idx = rows.nonzero().flatten()
    sub = problem.rows(idx)
    kept_sub = None if kept is None else Kept(kept.rows[idx], kept.x0[idx], kept.eps[idx])
    x_new, x0_sub = controlled_step(sub, x[idx], u[idx], g, t, s, eta, i, kept_sub)
    problem.merge(sub, idx)
    x, x0 = x.clone(), torch.zeros_like(x)
    x[idx], x0[idx] = x_new, x0_sub
    return x, x0
