"""``dps``: Diffusion Posterior Sampling with the fiber loss (Chung et al. 2023): one gradient a step."""
from __future__ import annotations

import torch

from .base import progress, register_sampler, report
from .problem import FiberProblem, finite_rows, gamma_at

DPS_DEFAULTS = dict(scale=1.0, gamma=[(0, 0, 1000, 900), (1, 1, 900, 0)], eta=0.0, target="fixed")


@register_sampler("dps", defaults=DPS_DEFAULTS, step_knob="scale")
def sample_dps(problem: FiberProblem, x: torch.Tensor, sched, callback=None, disable=None, *,
               scale: float = 1.0, gamma=1.0, eta: float = 0.0, target: str = "fixed") -> torch.Tensor:
    """DPS: ``x_s = step(x_t) - scale * gamma_t * grad_{x_t} L_fiber(x0_hat(x_t))`` (one gradient a step).

    Faults, per sample: a non-finite loss or gradient skips that sample's guidance in this step and
    halves its ``scale`` for the rest of the run; a non-finite next state redoes the step unguided for
    it (and halves too). A fault after ``MAX_HALVINGS`` halvings in a row gives up its guidance.
    """
    for i in progress(len(sched), disable):
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
                finite_loss, finite_grad = torch.isfinite(loss.detach()), finite_rows(grad)
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
            bad = ~finite_rows(x_new)
            if bad.any():  # fall back to the unguided step for those samples
                problem.fault(bad, "state", i)
                x0u, epsu = problem.denoise(x[bad], t)
                x0[bad] = x0u
                x_new[bad] = problem.prior.step(x[bad], x0u, epsu, t, s, 0.0)
        x = x_new
        problem.record(loss, x0)
        report(callback, i, t, x, x0, problem, loss)
    return x0
