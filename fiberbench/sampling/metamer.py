"""``metamer``: gradient descent on pixels from noise until the features match, no prior (Feather et al. 2023)."""
from __future__ import annotations

import torch

from .base import progress, register_sampler
from .optim import RowAdam, guard
from .problem import FiberProblem, fiber_distance

METAMER_DEFAULTS = dict(iters=200, lr=0.02)


@register_sampler("metamer", defaults=METAMER_DEFAULTS, uses_prior=False, supports_init=False, pixel_space=True,
                  iterations="iters")
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
    for i in progress(iters, disable):
        img.requires_grad_(True)
        problem.calls["extractor"] += 1
        with problem.amp():
            loss = fiber_distance(problem.extractor(img).float(), problem.target, problem.metric)
        loss.sum().backward()
        grad, img.grad = img.grad, None
        img.requires_grad_(False)
        with torch.no_grad():
            ok = guard(problem, i, loss, grad, img, last_ok, opt, lr)
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
