"""Priors: pretrained diffusion / flow-matching models behind one interface.

Samplers never ask what kind of prior they hold. Every prior is written as

    x_t = alpha_t * x0 + sigma_t * eps

(diffusion, VP: ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``;
rectified flow: ``alpha_t = 1 - sigma_t``), and offers

- ``schedule(steps)``: the model times of a sampling run (from the diffusers
  scheduler, so the noise schedule is the library's own), ending at the data;
- ``denoise(x_t, t, clamp=True)``: one model call -> ``(x0_hat, eps_hat)``; x0_hat is
  clamped to the data range for pixel priors (``clamp=False``: not; ``k >= 1``: to k times
  that range) and eps_hat re-derived from it;
- ``step(x_t, x0_hat, eps_hat, t, s, eta, noise)``: the DDIM update from t to
  s (eta = 0: deterministic DDIM, which is exactly the Euler step for flows;
  eta = 1: the ancestral / DDPM posterior step, with the denoiser's own learned
  variance where it has one, see :data:`VARIANCES`);
- ``decode(x0)``: prior space -> images ``[N,3,H,W]`` in [0,1] (identity +
  rescale for pixel priors, the VAE decoder for latent priors; a 1-channel
  prior's gray images repeated to RGB), differentiable;
- ``encode(images)``: the inverse (for SDEdit starts and time-dependent targets;
  RGB to a 1-channel prior's gray by luminance, see :func:`rgb_to_gray`).

Times are *model times* on the scale of ``num_train_timesteps`` (1000): large t
is noise, t = -1 (diffusion) or 0 (flow) is data. ``tau(t)`` maps them to the
common scale [0, 1000] used by guidance schedules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import diffusers
import torch
from diffusers import DDIMScheduler
from torch import nn

from ..errors import ConfigError


@dataclass
class Schedule:
    """The times of one sampling run: ``times[i]`` -> ``times[i+1]``; the last entry is the data end."""

    times: torch.Tensor  # [steps + 1] model times
    alphas: torch.Tensor  # [steps + 1]
    sigmas: torch.Tensor  # [steps + 1]
    taus: torch.Tensor  # [steps + 1] on [0, 1000]: 1000 = pure noise

    def __len__(self) -> int:
        return len(self.times) - 1


class Prior(nn.Module):
    """Base class. Subclasses set ``denoiser``, ``kind`` and implement the schedule pieces."""

    kind: str = "diffusion"  # "diffusion" | "flow"
    latent: bool = False
    spec: str = "?"
    card: dict[str, Any]

    def __init__(self):
        super().__init__()
        self.card = {}

    # -- shapes ------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one sample in the prior's own space."""
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        """Side of the decoded images in pixels."""
        return self.sample_shape[-1] * (self.vae_scale if self.latent else 1)

    vae_scale: int = 1

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # -- schedule ----------------------------------------------------------------------
    noise: "VPNoise | FlowNoise"

    def schedule(self, steps: int, t_start: float | None = None, shift: float | None = None) -> Schedule:
        """Times of a ``steps``-step run from pure noise (or from model time ``t_start``) to the data.

        ``shift`` (diffusion priors, runs from pure noise): the times at the noise levels of a
        ``shift``-shifted rectified-flow grid (see :meth:`VPNoise.times`) instead of the trailing grid.
        """
        if int(steps) != steps or steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {steps!r}")
        if shift is not None:
            if not isinstance(self.noise, VPNoise):
                raise ConfigError("shift applies to diffusion (VP) priors; a flow prior's grid is its scheduler's")
            if t_start is not None:
                raise ConfigError("shift gives a grid from pure noise; it cannot start at t_start")
            times = self.noise.times(int(steps), shift=shift)
        else:
            times = self.noise.times(int(steps), t_start)
        a, s = self.alpha_sigma(times)
        return Schedule(times, a, s, self.tau(times))

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` at model time ``t``."""
        return self.noise.alpha_sigma(t)

    def tau(self, t: torch.Tensor | float) -> torch.Tensor:
        """Model time -> the common scale [0, 1000] (1000 = pure noise, 0 = data)."""
        return self.noise.tau(t)

    def time_at_tau(self, tau: float) -> float:
        """Model time whose tau is closest to ``tau`` (for SDEdit starts given on the common scale)."""
        return self.noise.time_at_tau(tau)

    # -- model -------------------------------------------------------------------------
    def model_output(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw network output at (x_t, t); ``t`` a scalar tensor."""
        raise NotImplementedError

    def model_outputs(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prediction [N,C,H,W], variance output [N,C,H,W] or None)`` at (x_t, t) in one network call.

        The variance output is the second half of a denoiser trained with a learned variance (IDDPM, ADM,
        DiT), in the parameterisation named by :attr:`variance_type`; priors without one give ``None``.
        """
        return self.model_output(x_t, t), None

    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample | flow
    # a key of VARIANCES when the denoiser also outputs the variance of its ancestral step, else None
    variance_type: str | None = None
    clamp_range: tuple[float, float] | None = (-1.0, 1.0)
    # (x_t, t, variance output) of the last denoiser call with a variance output: the ancestral step from the
    # same state reuses it instead of calling the network again
    variance_memo: tuple[torch.Tensor, float, torch.Tensor] | None = None

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor | float,
                clamp: bool | float = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One model call: ``(x0_hat, eps_hat)``, both shaped like ``x_t``.

        x0_hat is clamped to the data range (pixel priors; ``clamp=False`` skips it; a number
        ``k >= 1`` clamps to the data range widened ``k`` times about its centre, [-k, k] for
        [-1, 1]) and eps_hat is re-derived from the clamped x0_hat so that (x0_hat, eps_hat)
        are consistent with x_t (as diffusers' DDIM does with clipping).
        """
        t = torch.as_tensor(t, dtype=torch.float32)
        a, s = self.alpha_sigma(t)
        out, var = self.model_outputs(x_t, t)
        out = out.to(x_t.dtype)
        if var is not None and self.variance_type is not None:
            self.variance_memo = (x_t.detach().clone(), float(t), var.detach())
        x0 = PREDICTIONS[self.prediction_type](x_t, out, a, s)
        if clamp is not False and self.clamp_range is not None:
            lo, hi = self.clamp_range
            k = 1.0 if clamp is True else float(clamp)
            if not k >= 1:  # also NaN
                raise ConfigError(f"clamp must be True, False or a widening factor >= 1, got {clamp!r}")
            mid, half = (lo + hi) / 2, (hi - lo) / 2
            x0 = x0.clamp(mid - k * half, mid + k * half)
        eps = (x_t - a * x0) / s
        return x0, eps

    def step(self, x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t, s, eta: float = 0.0,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM update from time ``t`` to ``s`` (``s`` closer to the data).

        ``x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z`` with
        ``c = eta sigma_s sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2)``:
        eta = 0 is deterministic DDIM (the Euler step for flows), eta = 1 the
        ancestral DDPM posterior. ``noise`` is z (required when eta > 0).

        With a learned variance (:attr:`variance_type`), eta = 1 is the ancestral step the model was
        trained for (IDDPM / ADM): the same posterior mean, noise of the learned variance instead of
        ``c^2`` (:meth:`learned_std`). Other eta keep the DDIM family, which has no learned counterpart.
        """
        a_t, s_t = self.alpha_sigma(t)
        a_s, s_s = self.alpha_sigma(s)
        if eta > 0 and float(s_s) > 0:
            ratio = (a_t * s_s / (a_s * s_t)).clamp(max=1.0)
            c = eta * s_s * torch.sqrt((1 - ratio ** 2).clamp(min=0))
            if noise is None:
                raise ValueError("step with eta > 0 needs noise")
        else:
            c = torch.zeros(())
        direction = torch.sqrt((s_s ** 2 - c ** 2).clamp(min=0))
        x_s = a_s * x0 + direction * eps
        if float(c) > 0:
            std = self.learned_std(x_t, t, s) if eta == 1 and self.variance_type is not None else c
            x_s = x_s + std * noise
        return x_s

    def learned_std(self, x_t: torch.Tensor, t, s) -> torch.Tensor:
        """Standard deviation ``[N,C,H,W]`` of the ancestral step t -> s under the learned variance.

        The variance interpolates, per pixel, between the step's forward variance
        ``beta = 1 - (alpha_t / alpha_s)^2`` and its posterior variance ``beta_tilde = beta sigma_s^2 /
        sigma_t^2`` as :data:`VARIANCES` says (for a grid coarser than the training steps these are the
        respaced process's, as in guided-diffusion's ``SpacedDiffusion`` and diffusers' ``DDPMScheduler``).
        The variance output is the one of the last :meth:`denoise` call when it was made at the same
        ``(x_t, t)`` (every sampler steps from the state it has just denoised), else one more network call.
        """
        t = torch.as_tensor(t, dtype=torch.float32)
        memo = self.variance_memo
        if (memo is not None and memo[1] == float(t) and memo[0].shape == x_t.shape
                and memo[0].device == x_t.device and torch.equal(memo[0], x_t.detach().to(memo[0].dtype))):
            var = memo[2]
        else:
            with torch.no_grad():
                var = self.model_outputs(x_t, t)[1]
            if var is None:
                raise ConfigError(f"{self.spec}: variance_type {self.variance_type!r} is set but the denoiser "
                                  f"gives no variance output")
        a_t, s_t = self.alpha_sigma(t)
        a_s, s_s = self.alpha_sigma(s)
        beta = (1 - (a_t / a_s) ** 2).clamp(min=1e-20).to(x_t.device, torch.float32)
        beta_tilde = (beta * s_s ** 2 / s_t ** 2).clamp(min=1e-20).to(x_t.device, torch.float32)
        log_var = VARIANCES[self.variance_type](var.float(), beta.log(), beta_tilde.log())
        return (0.5 * log_var).exp().to(x_t.dtype)

    def add_noise(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """``alpha_t x0 + sigma_t noise``."""
        a, s = self.alpha_sigma(t)
        return a * x0 + s * noise

    def renoise(self, x_s: torch.Tensor, s, t, noise: torch.Tensor) -> torch.Tensor:
        """Forward-diffuse a state at time ``s`` back to the noisier time ``t`` (one transition of q).

        ``x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t sigma_s / alpha_s)^2) noise``: if ``x_s``
        is distributed as the marginal at ``s``, ``x_t`` is distributed as the marginal at ``t`` (the
        "time travel" / recurrence step of FreeDoM and Universal Guidance).
        """
        a_t, s_t = self.alpha_sigma(t)
        a_s, s_s = self.alpha_sigma(s)
        r = a_t / a_s
        return r * x_s + torch.sqrt((s_t ** 2 - (r * s_s) ** 2).clamp(min=0)) * noise

    # -- data space <-> images --------------------------------------------------------------
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Prior space ``[N,C,H,W]`` in [-1,1] -> images ``[N,3,H,W]`` in [0,1] (differentiable; C = 1: gray
        repeated to RGB, so extractors always see three channels)."""
        return gray_to_rgb(((x0 + 1) / 2).clamp(0, 1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[N,3,H,W]`` in [0,1] -> prior space ``[N,C,H,W]`` in [-1,1] (C = 1: :func:`rgb_to_gray`)."""
        if self.sample_shape[0] == 1:
            images = rgb_to_gray(images)
        return images * 2 - 1

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, kind={self.kind}, prediction={self.prediction_type}, latent={self.latent}"


class VPNoise:
    """Noise schedule of a VP diffusion prior, read from a diffusers DDPM/DDIM scheduler."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        ac = scheduler.alphas_cumprod.to(torch.float64)
        # index -1 = data end (abar = 1), as diffusers' DDIM with set_alpha_to_one
        self.abar = torch.cat([ac, torch.ones(1, dtype=torch.float64)]).float()

    def alpha_sigma(self, t):
        t = torch.as_tensor(t)
        idx = t.round().long().cpu()
        idx = torch.where(idx < 0, torch.full_like(idx, len(self.abar) - 1), idx)
        abar = self.abar[idx].to(t.device)
        return abar.sqrt(), (1 - abar).clamp(min=0).sqrt()

    def tau(self, t):
        t = torch.as_tensor(t, dtype=torch.float32)
        return ((t + 1) * 1000.0 / self.num_train_timesteps).clamp(0, 1000)

    def time_at_tau(self, tau: float) -> float:
        return float(round(tau * self.num_train_timesteps / 1000.0) - 1)

    def times(self, steps: int, t_start: float | None = None, shift: float | None = None) -> torch.Tensor:
        """``steps`` trailing-spaced DDIM times (first = the last training step), then -1 (data).

        ``shift``: instead, the training steps nearest (in log SNR) to the noise levels of a
        ``steps``-step rectified-flow grid shifted by ``shift`` (``sigma = shift u / (1 + (shift - 1) u)``,
        ``u`` uniform on (0, 1]; equal ``alpha / sigma`` is the same noise level), repeated steps
        dropped. With shift > 1 the grid is fine at high noise, where a global choice such as an
        image's background is made, and the first step no longer jumps across it (as the trailing grid does).
        """
        if shift is not None:
            if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
                raise ConfigError(f"shift must be a finite number > 0, got {shift!r}")
            u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
            sig = shift * u / (1 + (shift - 1) * u)
            abar_grid = (1 - sig) ** 2 / ((1 - sig) ** 2 + sig ** 2)
            lsnr_train = (self.abar[:-1].double() / (1 - self.abar[:-1].double())).log()
            lsnr_grid = (abar_grid / (1 - abar_grid)).log().clamp(min=float(lsnr_train.min()))  # u = 1: last step
            idx = (lsnr_train[None, :] - lsnr_grid[:, None]).abs().argmin(1)
            ts = torch.tensor(sorted(set(idx.tolist()), reverse=True), dtype=torch.float32)
            return torch.cat([ts, torch.tensor([-1.0])])
        if t_start is None:
            sched = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
            sched.set_timesteps(steps)
            ts = sched.timesteps.to(torch.float32)
        else:
            ts = torch.linspace(float(t_start), 0, steps + 1)[:-1].round()
        return torch.cat([ts, torch.tensor([-1.0])])


class FlowNoise:
    """Noise schedule of a rectified flow (``x_t = (1 - sigma) x0 + sigma eps``), from a
    ``FlowMatchEulerDiscreteScheduler``."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def alpha_sigma(self, t):
        sig = torch.as_tensor(t, dtype=torch.float32) / self.num_train_timesteps
        return 1 - sig, sig

    def tau(self, t):
        return torch.as_tensor(t, dtype=torch.float32) * 1000.0 / self.num_train_timesteps

    def time_at_tau(self, tau: float) -> float:
        return float(tau * self.num_train_timesteps / 1000.0)

    def times(self, steps: int, t_start: float | None = None) -> torch.Tensor:
        """The scheduler's own sigmas (shift applied) for ``steps`` Euler steps, ending at 0, in model time."""
        if t_start is None:
            sched = self.scheduler.__class__.from_config(self.scheduler.config)
            kwargs = {"mu": 0.0} if sched.config.get("use_dynamic_shifting", False) else {}
            sched.set_timesteps(steps, **kwargs)
            sigmas = sched.sigmas.to(torch.float32)
        else:
            sigmas = torch.linspace(float(t_start) / self.num_train_timesteps, 0, steps + 1)
        return sigmas * self.num_train_timesteps


# What a network's raw output means, as x0_hat from (x_t, output, alpha_t, sigma_t). A new
# parameterisation is one more entry here.
PREDICTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "epsilon": lambda x_t, out, a, s: (x_t - s * out) / a,
    "v_prediction": lambda x_t, out, a, s: a * x_t - s * out,
    "sample": lambda x_t, out, a, s: out,
    "flow": lambda x_t, out, a, s: x_t - s * out,  # rectified flow: out = eps - x0, alpha = 1 - sigma
}

# What a denoiser's variance output means, as the log variance of the ancestral step from (output v,
# log beta, log beta_tilde): beta = 1 - (alpha_t / alpha_s)^2 is the step's forward variance, beta_tilde the
# posterior's. "learned_range" (Nichol & Dhariwal 2021; IDDPM, ADM, DiT; diffusers' DDPMScheduler
# variance_type="learned_range"): log var = f log beta + (1 - f) log beta_tilde with f = (v + 1) / 2, v in
# [-1, 1]. A new parameterisation is one more entry here.
VARIANCES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "learned_range": lambda v, log_beta, log_beta_tilde: (v + 1) / 2 * log_beta + (1 - v) / 2 * log_beta_tilde,
}

# Luminance weights of ITU-R BT.601, the ones PIL's convert("L") uses: a grayscale training set (an X-ray
# corpus, MNIST) was most likely made from colour with them, and on gray RGB (R = G = B, what
# fiberbench.io makes of a gray file) they give back that gray exactly, as they sum to 1.
LUMA = (0.299, 0.587, 0.114)


def rgb_to_gray(images: torch.Tensor) -> torch.Tensor:
    """``[N,3,H,W]`` -> ``[N,1,H,W]`` luminance (:data:`LUMA`), same range; 1-channel input is returned as is."""
    if images.shape[1] == 1:
        return images
    w = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def gray_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """``[N,1,H,W]`` -> ``[N,3,H,W]`` (the channel repeated); other channel counts are returned as they are."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


# Noise schedules by prior kind (a diffusers scheduler in, alpha/sigma/tau/times out). A new kind of
# prior (e.g. a variance-exploding one) is one class with the methods of VPNoise and one entry here.
NOISE_KINDS: dict[str, type] = {"diffusion": VPNoise, "flow": FlowNoise}


def kind_of_scheduler(scheduler) -> str:
    """The prior kind a diffusers scheduler belongs to (flow-matching schedulers -> ``flow``)."""
    return "flow" if "FlowMatch" in type(scheduler).__name__ else "diffusion"


class PixelPrior(Prior):
    """A pixel-space ``UNet2DModel`` (diffusion or flow), images in [-1, 1] inside."""

    def __init__(self, unet: nn.Module, scheduler, *, kind: str, prediction_type: str, spec: str = "?",
                 card: dict | None = None):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.kind, self.prediction_type, self.spec = kind, prediction_type, spec
        self.card = card or {}
        self.scheduler = scheduler
        if prediction_type not in PREDICTIONS:
            raise ConfigError(f"unknown prediction type {prediction_type!r}; known: {sorted(PREDICTIONS)}")
        if kind not in NOISE_KINDS:
            raise ConfigError(f"unknown prior kind {kind!r}; known: {sorted(NOISE_KINDS)}")
        self.noise = NOISE_KINDS[kind](scheduler)
        self.variance_type = learned_variance_type(unet, scheduler)

    @property
    def sample_shape(self):
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def model_output(self, x_t, t):
        return self.model_outputs(x_t, t)[0]

    def model_outputs(self, x_t, t):
        tt = t.to(x_t.device).expand(x_t.shape[0])
        return split_variance(self.unet(x_t, tt).sample, x_t.shape[1], self.variance_type)


class LatentPrior(PixelPrior):
    """A latent prior: a denoiser in VAE latent space plus the VAE (decode inside the fiber loss).

    ``denoiser`` is a ``UNet2DModel``, a ``UNet2DConditionModel`` (called with
    fixed ``encoder_hidden_states``, e.g. the empty prompt's) or an SD3-style
    ``SD3Transformer2DModel`` (called with ``encoder_hidden_states`` and
    ``pooled_projections``). Latents are ``vae_latents * scaling_factor``
    (minus ``shift_factor`` where the VAE has one), as in diffusers' pipelines.
    """

    latent = True

    def __init__(self, denoiser: nn.Module, vae: nn.Module, scheduler, *, kind: str, prediction_type: str,
                 cond: dict[str, torch.Tensor] | None = None, spec: str = "?", card: dict | None = None):
        super().__init__(denoiser, scheduler, kind=kind, prediction_type=prediction_type, spec=spec, card=card)
        self.vae = vae.eval().requires_grad_(False)
        self.clamp_range = None
        self.cond = dict(cond or {})
        cfg = vae.config
        self.scaling_factor = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        self.vae_scale = 2 ** (len(cfg.block_out_channels) - 1)

    @property
    def sample_shape(self):
        c = self.unet.config
        size = getattr(c, "sample_size", None)
        ch = getattr(c, "in_channels", None)
        return (ch, size, size)

    # conditioning of the denoiser: ``cond`` (fixed text embedding / class label), and for
    # classifier-free guidance an ``uncond`` set and a ``guidance_scale`` (1 = no CFG)
    uncond: dict[str, torch.Tensor] | None = None
    guidance_scale: float = 1.0

    def model_output(self, x_t, t):
        """Denoiser output at (x_t, t): UNet2D(Condition)Model, DiT (class label) or SD3 transformer.

        Learned-variance outputs (2C channels, DiT) are cut to the first C (:meth:`model_outputs` keeps the
        variance half); with ``guidance_scale != 1`` the conditional and unconditional calls are batched
        and combined as ``u + g (c - u)``.
        """
        return self.model_outputs(x_t, t)[0]

    def model_outputs(self, x_t, t):
        return denoiser_outputs(self.unet, x_t, t, self.cond, self.uncond, self.guidance_scale,
                                variance_type=self.variance_type)

    def decode(self, x0):
        z = x0 / self.scaling_factor + self.shift_factor
        img = self.vae.decode(z.to(self.vae.dtype)).sample.to(x0.dtype)
        return gray_to_rgb(((img + 1) / 2).clamp(0, 1))

    def encode(self, images):
        images = rgb_to_gray(images) if getattr(self.vae.config, "in_channels", 3) == 1 else images
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return ((dist.mean - self.shift_factor) * self.scaling_factor).to(images.dtype)


def build_scheduler(spec: dict[str, Any]):
    """A diffusers scheduler from ``{"class": name, "config": {...}}``."""
    cls = getattr(diffusers, spec["class"], None)
    if cls is None:
        raise ConfigError(f"unknown diffusers scheduler class {spec['class']!r}")
    return cls.from_config(spec["config"])


def call_denoiser(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | None = None,
                  uncond: dict[str, torch.Tensor] | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """One call of a diffusers denoiser on ``x_t [N,C,H,W]`` at scalar model time ``t`` -> ``[N,C,H,W]``.

    ``cond``/``uncond``: keyword tensors with batch 1 (``encoder_hidden_states``,
    ``pooled_projections``, ``class_labels``), broadcast to N. The input is cast to
    the network's dtype (``torch_dtype`` loading); the output keeps that dtype. A
    learned-variance output (2C channels) is cut to its prediction half.
    """
    return denoiser_outputs(net, x_t, t, cond, uncond, guidance_scale, variance_type="learned_range")[0]


def denoiser_outputs(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | None = None,
                     uncond: dict[str, torch.Tensor] | None = None, guidance_scale: float = 1.0, *,
                     variance_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`call_denoiser` keeping the variance half: ``(prediction [N,C,H,W], variance [N,C,H,W] or None)``.

    The variance half is split off when ``variance_type`` is set and the output has 2C channels; with
    classifier-free guidance the prediction is ``u + g (c - u)`` and the variance the conditional one (as
    DiT's sampler keeps it).
    """
    cond = dict(cond or {})
    guided = bool(uncond) and float(guidance_scale) != 1.0
    n, c = x_t.shape[0], x_t.shape[1]
    wdtype = next(net.parameters()).dtype
    x = x_t.to(wdtype) if x_t.dtype != wdtype and not torch.is_autocast_enabled(x_t.device.type) else x_t
    m = 2 * n if guided else n

    def batch(v: torch.Tensor, k: int) -> torch.Tensor:
        v = v.to(x.device, x.dtype) if v.is_floating_point() else v.to(x.device)
        return v.expand(k, *v.shape[1:])

    if guided:
        x = torch.cat([x, x])
        kwargs = {k: torch.cat([batch(cond[k], n), batch(uncond[k], n)]) for k in cond}
    else:
        kwargs = {k: batch(v, n) for k, v in cond.items()}
    tt = t.to(x.device).float().reshape(-1)[:1].expand(m)
    if "Transformer" in type(net).__name__:
        out = net(hidden_states=x, timestep=tt, return_dict=False, **kwargs)[0]
    else:
        out = net(x, tt, return_dict=False, **kwargs)[0]
    out, var = split_variance(out, c, variance_type)
    if guided:
        oc, ou = out.chunk(2)
        out = ou + float(guidance_scale) * (oc - ou)
        var = None if var is None else var.chunk(2)[0]
    return out, var


def split_variance(out: torch.Tensor, channels: int,
                   variance_type: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A denoiser's raw output ``[N,C',H,W]`` -> ``(prediction [N,C,H,W], variance half or None)``.

    C' = 2C (learned variance: IDDPM, ADM, DiT): the first C channels are the prediction; the rest are
    returned when ``variance_type`` is set and dropped otherwise.
    """
    if out.shape[1] != 2 * channels:
        return out, None
    return out[:, :channels], (out[:, channels:] if variance_type is not None else None)


def learned_variance_type(denoiser: nn.Module, scheduler) -> str | None:
    """``"learned_range"`` for a denoiser with twice as many output as input channels, unless its scheduler
    declares another variance kind (diffusers' ``variance_type``, e.g. ``fixed_small``, which its own step
    would use); ``None`` otherwise. DiT's and IDDPM's second half is the learned range (:data:`VARIANCES`)."""
    cfg = getattr(denoiser, "config", None)
    cin, cout = getattr(cfg, "in_channels", None), getattr(cfg, "out_channels", None)
    if not cin or cout != 2 * cin:
        return None
    declared = getattr(getattr(scheduler, "config", None), "variance_type", None)
    return "learned_range" if declared in (None, "learned_range") else None


class DiffusersPixelPrior(PixelPrior):
    """A pixel ``UNet2DModel`` from a diffusers pipeline (any ``torch_dtype``; class-conditional UNets too)."""

    def __init__(self, unet, scheduler, *, cond: dict[str, torch.Tensor] | None = None, **kwargs):
        super().__init__(unet, scheduler, **kwargs)
        self.cond = dict(cond or {})

    def model_output(self, x_t, t):
        return self.model_outputs(x_t, t)[0]

    def model_outputs(self, x_t, t):
        return denoiser_outputs(self.unet, x_t, t, self.cond, variance_type=self.variance_type)


class VQLatentPrior(LatentPrior):
    """A latent prior on a ``VQModel`` (LDM): decode quantises with the straight-through estimator."""

    def decode(self, x0):
        img = self.vae.decode((x0 / self.scaling_factor).to(self.vae.dtype)).sample.to(x0.dtype)
        return gray_to_rgb(((img + 1) / 2).clamp(0, 1))

    def encode(self, images):
        images = rgb_to_gray(images) if getattr(self.vae.config, "in_channels", 3) == 1 else images
        h = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latents
        return (h * self.scaling_factor).to(images.dtype)


class FeatureConditionedPrior(Prior):
    """A flow generator conditioned on an extractor's features, ``v(x_t, t | h)`` (the trained baseline).

    It samples a fiber by itself (conditioned on ``f(x_ref)``), so only the ``conditional`` sampler can
    drive it; guided samplers, which need an unconditional denoiser, get a clear error. ``model`` is a
    :class:`~fiberbench.toy.nets.FeatureConditionedFlow`; images are in [-1, 1] inside, as the toy priors.
    """

    kind = "flow"
    prediction_type = "flow"

    def __init__(self, model: nn.Module, scheduler, *, spec: str, card: dict[str, Any]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.noise = FlowNoise(scheduler)
        self.spec, self.card = spec, card

    @property
    def sample_shape(self):
        c = self.model.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def condition_info(self) -> dict[str, Any]:
        """The card's ``condition`` entry: ``{"extractor": base spec, "dims": {layer: D}, …}``."""
        return self.card["architecture"]["config"]["condition"]

    def model_output(self, x_t, t):
        raise ConfigError(f"{self.spec} is a feature-conditioned generator: sample it with method='conditional' "
                          f"(guided samplers need an unconditional prior such as toy/prior-fm)")
