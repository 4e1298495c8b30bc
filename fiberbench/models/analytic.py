"""Closed forms that check a fiber sampler: Gaussian data, exact denoiser, linear extractor.

For data ``x0 ~ N(mu, diag(s^2))`` and ``x_t = alpha_t x0 + sigma_t eps`` the
posterior mean is exact::

    E[x0 | x_t] = mu + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) * (x_t - alpha_t mu)

so :class:`GaussianPrior` is a prior whose denoiser makes no error. With a
linear extractor ``f(x) = A x`` the fiber through ``x_ref`` is the affine
subspace ``{x : A x = A x_ref}`` and the prior *restricted to it* is again
Gaussian (:func:`conditional_moments`): a sampler that is right must land on
the subspace *and* spread like that conditional, not collapse to one point.
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from .prior import FlowNoise, Prior, VPNoise


class GaussianPrior(Prior):
    """Exact-denoiser prior of ``N(mu, diag(std^2))`` on tensors of shape ``(C,H,W)``.

    ``kind="diffusion"`` uses a diffusers ``DDPMScheduler`` schedule, ``"flow"``
    a ``FlowMatchEulerDiscreteScheduler``; ``decode`` maps x0 to [0,1] images
    linearly (``(x + 1) / 2``, not clamped, so the algebra stays linear).
    """

    def __init__(self, mu: torch.Tensor, std: torch.Tensor, kind: str = "diffusion", scheduler=None,
                 prediction_type: str = "sample"):
        super().__init__()
        self.register_buffer("mu", mu.float())
        self.register_buffer("std", std.float())
        self.kind = kind
        self.spec = f"analytic/gaussian-{kind}"
        self.prediction_type = prediction_type
        self.clamp_range = None
        if scheduler is None:
            scheduler = FlowMatchEulerDiscreteScheduler() if kind == "flow" else DDPMScheduler(
                beta_schedule="squaredcos_cap_v2")
        self.scheduler = scheduler
        self.noise = FlowNoise(scheduler) if kind == "flow" else VPNoise(scheduler)
        self._dummy = nn.Parameter(torch.zeros(()), requires_grad=False)

    @property
    def sample_shape(self):
        return tuple(self.mu.shape)

    @property
    def image_size(self) -> int:
        return self.mu.shape[-1]

    def posterior_mean(self, x_t, t):
        """Exact ``E[x0 | x_t]``."""
        a, s = self.alpha_sigma(t)
        a, s = a.to(x_t), s.to(x_t)
        var = self.std ** 2
        return self.mu + a * var / (a ** 2 * var + s ** 2) * (x_t - a * self.mu)

    def model_output(self, x_t, t):
        """The exact network output for ``prediction_type`` (sample, epsilon, v_prediction or flow)."""
        x0 = self.posterior_mean(x_t, t)
        a, s = self.alpha_sigma(t)
        a, s = a.to(x_t), s.to(x_t)
        eps = (x_t - a * x0) / s
        if self.prediction_type == "sample":
            return x0
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return a * eps - s * x0
        if self.prediction_type == "flow":
            return eps - x0
        raise ValueError(f"unknown prediction type {self.prediction_type!r}")

    def decode(self, x0):
        return (x0 + 1) / 2

    def encode(self, images):
        return images * 2 - 1


class LinearExtractor(nn.Module):
    """``f(images) = A @ vec(2 images - 1)``: linear in prior space. ``A: [K, D]``."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A.float())
        self.spec = f"analytic/linear-{A.shape[0]}x{A.shape[1]}"

    def forward(self, images):
        return (images * 2 - 1).flatten(1) @ self.A.T


def conditional_moments(mu: torch.Tensor, var: torch.Tensor, A: torch.Tensor, x_ref: torch.Tensor):
    """Mean ``[D]`` and covariance ``[D,D]`` of ``N(mu, diag var)`` conditioned on ``A x = A x_ref`` (flattened)."""
    mu, var, x_ref = mu.flatten().double(), var.flatten().double(), x_ref.flatten().double()
    A = A.double()
    S = torch.diag(var)
    K = S @ A.T @ torch.linalg.inv(A @ S @ A.T)
    mean = mu + K @ (A @ x_ref - A @ mu)
    cov = S - K @ A @ S
    return mean, cov
