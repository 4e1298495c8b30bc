"""``unguided``: plain sampling from the prior (DDIM with ``eta``, the Euler step for flows).

It is the floor of feature match: what the prior gives with no extractor at all.
"""
from __future__ import annotations

import torch

from .base import progress, register_sampler, report
from .problem import FiberProblem

# The prior's own sampler. deterministic_above_tau: steps from tau above it use eta 0 (DDIM / Euler), the rest
# ``eta``; grid_shift > 0 (diffusion priors): the times of a shifted rectified-flow grid (Prior.schedule), 0 = the
# prior's own; unclamped_tau (lo, hi): x0_hat is not clamped to the data range for lo < tau <= hi, except to
# unclamped_limit times the data range when that is >= 1 (0 = no clamp there at all). The DDPM toy prior's card
# sets all five (its sampling section; docs/models.md says why each is there).
UNGUIDED_DEFAULTS = dict(eta=0.0, deterministic_above_tau=1000.0, grid_shift=0.0, unclamped_tau=(0.0, 0.0),
                         unclamped_limit=0.0)


@register_sampler("unguided", defaults=UNGUIDED_DEFAULTS, guided=False)
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
    for i in progress(len(sched), disable):
        t, s = sched.times[i], sched.times[i + 1]
        tau = float(sched.taus[i])
        e = 0.0 if tau > deterministic_above_tau else eta
        with torch.no_grad():
            x0, eps = problem.denoise(x, t, clamp=band_clamp if lo < tau <= hi else True)
            x = problem.prior.step(x, x0, eps, t, s, e, problem.noise.draw() if e > 0 else None)
        problem.record(None, x0)
        report(callback, i, t, x, x0, problem)
    return x0
