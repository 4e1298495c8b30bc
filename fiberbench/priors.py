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
  eta = 1: the ancestral / DDPM posterior step);
- ``decode(x0)``: prior space -> images ``[N,3,H,W]`` in [0,1] (identity +
  rescale for pixel priors, the VAE decoder for latent priors), differentiable;
- ``encode(images)``: the inverse (for SDEdit starts and time-dependent targets).

Times are *model times* on the scale of ``num_train_timesteps`` (1000): large t
is noise, t = -1 (diffusion) or 0 (flow) is data. ``tau(t)`` maps them to the
common scale [0, 1000] used by guidance schedules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, close_matches


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

    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample | flow
    clamp_range: tuple[float, float] | None = (-1.0, 1.0)

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
        out = self.model_output(x_t, t).to(x_t.dtype)
        p = self.prediction_type
        if p == "epsilon":
            x0 = (x_t - s * out) / a
        elif p == "v_prediction":
            x0 = a * x_t - s * out
        elif p == "sample":
            x0 = out
        elif p == "flow":
            x0 = x_t - s * out
        else:  # pragma: no cover - checked at construction
            raise ConfigError(f"unknown prediction type {p!r}")
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
            x_s = x_s + c * noise
        return x_s

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
        """Prior space -> images in [0,1] (differentiable)."""
        return ((x0 + 1) / 2).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[N,3,H,W]`` in [0,1] -> prior space."""
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
        from diffusers import DDIMScheduler

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
    """Noise schedule of a rectified flow (``x_t = (1 - sigma) x0 + sigma eps``), from ``FlowMatchEulerDiscreteScheduler``."""

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


class PixelPrior(Prior):
    """A pixel-space ``UNet2DModel`` (diffusion or flow), images in [-1, 1] inside."""

    def __init__(self, unet: nn.Module, scheduler, *, kind: str, prediction_type: str, spec: str = "?",
                 card: dict | None = None):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.kind, self.prediction_type, self.spec = kind, prediction_type, spec
        self.card = card or {}
        self.scheduler = scheduler
        self.noise = FlowNoise(scheduler) if kind == "flow" else VPNoise(scheduler)
        if prediction_type not in ("epsilon", "v_prediction", "sample", "flow"):
            raise ConfigError(f"unknown prediction type {prediction_type!r}")

    @property
    def sample_shape(self):
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def model_output(self, x_t, t):
        tt = t.to(x_t.device).expand(x_t.shape[0])
        return self.unet(x_t, tt).sample

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

        Learned-variance outputs (2C channels, DiT) are cut to the first C; with
        ``guidance_scale != 1`` the conditional and unconditional calls are batched
        and combined as ``u + g (c - u)``.
        """
        return call_denoiser(self.unet, x_t, t, self.cond, self.uncond, self.guidance_scale)

    def decode(self, x0):
        z = x0 / self.scaling_factor + self.shift_factor
        img = self.vae.decode(z.to(self.vae.dtype)).sample.to(x0.dtype)
        return ((img + 1) / 2).clamp(0, 1)

    def encode(self, images):
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return ((dist.mean - self.shift_factor) * self.scaling_factor).to(images.dtype)


def build_scheduler(spec: dict[str, Any]):
    """A diffusers scheduler from ``{"class": name, "config": {...}}``."""
    import diffusers

    cls = getattr(diffusers, spec["class"], None)
    if cls is None:
        raise ConfigError(f"unknown diffusers scheduler class {spec['class']!r}")
    return cls.from_config(spec["config"])


def load_toy_prior(name: str, device="cpu") -> PixelPrior:
    """``toy/prior-fm`` or ``toy/prior-ddpm`` from ``data/models``."""
    from .toy import models as M

    unet, card = M.load_toy_module(name)
    sched = build_scheduler(card["scheduler"])
    kind = "flow" if card["prediction_type"] == "flow" else "diffusion"
    return PixelPrior(unet, sched, kind=kind, prediction_type=card["prediction_type"], spec=card["spec"],
                      card=card).to(device)


def call_denoiser(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | None = None,
                  uncond: dict[str, torch.Tensor] | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """One call of a diffusers denoiser on ``x_t [N,C,H,W]`` at scalar model time ``t`` -> ``[N,C,H,W]``.

    ``cond``/``uncond``: keyword tensors with batch 1 (``encoder_hidden_states``,
    ``pooled_projections``, ``class_labels``), broadcast to N. The input is cast to
    the network's dtype (``torch_dtype`` loading); the output keeps that dtype.
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
    if out.shape[1] == 2 * c:  # learned variance (DiT, IDDPM): keep the mean prediction
        out = out[:, :c]
    if guided:
        oc, ou = out.chunk(2)
        out = ou + float(guidance_scale) * (oc - ou)
    return out


class DiffusersPixelPrior(PixelPrior):
    """A pixel ``UNet2DModel`` from a diffusers pipeline (any ``torch_dtype``; class-conditional UNets too)."""

    def __init__(self, unet, scheduler, *, cond: dict[str, torch.Tensor] | None = None, **kwargs):
        super().__init__(unet, scheduler, **kwargs)
        self.cond = dict(cond or {})

    def model_output(self, x_t, t):
        return call_denoiser(self.unet, x_t, t, self.cond)


class VQLatentPrior(LatentPrior):
    """A latent prior on a ``VQModel`` (LDM): decode quantises with the straight-through estimator."""

    def decode(self, x0):
        img = self.vae.decode((x0 / self.scaling_factor).to(self.vae.dtype)).sample.to(x0.dtype)
        return ((img + 1) / 2).clamp(0, 1)

    def encode(self, images):
        h = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latents
        return (h * self.scaling_factor).to(images.dtype)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The weights-dtype keyword of ``DiffusionPipeline.from_pretrained``: ``dtype`` where the installed
    diffusers reads it (``torch_dtype`` is deprecated there, diffusers PR #14205), else ``torch_dtype``."""
    import inspect

    from diffusers import DiffusionPipeline

    try:
        new = 'kwargs.pop("dtype"' in inspect.getsource(DiffusionPipeline.from_pretrained)
    except (OSError, TypeError):
        new = False
    return {"dtype" if new else "torch_dtype": dtype}


# pipeline components fiberbench never needs (never loaded)
_SKIP_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def load_diffusers_prior(path: str, *, spec: str | None = None, device="cpu", torch_dtype=None,
                         prompt: str = "", negative_prompt: str = "", guidance_scale: float = 1.0,
                         class_label: int | str | None = None, vae_slicing: bool = True, vae_tiling: bool = False,
                         gradient_checkpointing: bool = False, text_encoder_device: str = "cpu",
                         drop_t5: bool = False, max_sequence_length: int = 256, cache_dir=None,
                         revision: str | None = None, variant: str | None = None,
                         trust_remote_code: bool = False) -> Prior:
    """A prior from a diffusers pipeline folder (``save_pretrained`` layout) or a hub id in the local cache.

    Supported (all through the same :class:`Prior` interface):

    - pixel ``UNet2DModel`` pipelines (DDPM/DDIM, e.g. ``google/ddpm-cifar10-32``);
    - latent ``UNet2DModel`` + ``VQModel`` / ``AutoencoderKL`` (LDM);
    - Stable-Diffusion-style ``UNet2DConditionModel`` + ``AutoencoderKL`` + CLIP text encoder,
      conditioned on ``prompt`` (empty by default);
    - DiT (``DiTTransformer2DModel`` / ``Transformer2DModel``) conditioned on ``class_label``
      (an index or a label name; default: the null class, i.e. unconditional);
    - SD3-style ``SD3Transformer2DModel`` with a flow-matching scheduler (empty prompt by
      default; ``drop_t5=True`` skips the T5 encoder, as diffusers allows).

    Args:
        torch_dtype: weights dtype (default float32); the sampler's ``dtype=`` autocast is separate.
        guidance_scale: classifier-free guidance for prompts / classes (1 = off; > 1 doubles the cost).
        vae_slicing: decode a batch one image at a time (memory; no effect on values).
        vae_tiling: tiled VAE decoding (off by default: tiling shifts the tone at tile borders).
        gradient_checkpointing: recompute denoiser/VAE activations in the backward pass.
        text_encoder_device: where the text encoders run. They run once at load time and are
            then freed, so the CPU (default) keeps them off the accelerator: this is the
            model-CPU-offload that fits a guided sampler (the denoiser and the VAE alternate in
            every inner step, so offloading those would move their weights at every call).
        cache_dir, revision, variant: as in ``DiffusionPipeline.from_pretrained``.
        trust_remote_code: off unless passed (custom pipeline code is never run by default).

    Weights: safetensors when present, otherwise ``torch.load(weights_only=True)`` (diffusers'
    and transformers' own loaders). Components are taken out of the pipeline object; its
    ``__call__`` (which runs under ``no_grad``) is never used.
    """
    import json
    from pathlib import Path

    from diffusers import DiffusionPipeline

    from .hub import is_missing_weights, weights_unavailable

    spec = spec or f"diffusers/{path}"
    dtype = torch_dtype or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"{spec}: unknown torch_dtype {torch_dtype!r}")
    root = Path(path)
    local = (root / "model_index.json").exists()
    if root.exists() and root.is_dir() and not local:
        raise ConfigError(f"{spec}: folder {root} has no model_index.json (not a diffusers pipeline folder)")
    grad_mode = torch.is_grad_enabled()
    try:
        if not local:  # a hub id: the snapshot in the local cache (downloaded first only when online)
            root = Path(DiffusionPipeline.download(path, cache_dir=cache_dir, revision=revision, variant=variant,
                                                   trust_remote_code=trust_remote_code))
        index = json.loads((root / "model_index.json").read_text())
        skip = {k: None for k, v in index.items()
                if k in _SKIP_COMPONENTS or (drop_t5 and k in ("text_encoder_3", "tokenizer_3"))
                or (isinstance(v, list) and v and v[0] is None)}
        pipe = DiffusionPipeline.from_pretrained(
            str(root), **_dtype_kwarg(dtype), use_safetensors=None, variant=variant,
            trust_remote_code=trust_remote_code, **skip)
    except Exception as e:  # noqa: BLE001 - hub errors vary by version: one readable message
        if not local and is_missing_weights(e):
            raise weights_unavailable(spec, path, e, cache_dir) from None
        raise ConfigError(f"cannot load diffusers pipeline {spec}: {type(e).__name__}: {e}") from e
    finally:
        torch.set_grad_enabled(grad_mode)  # some diffusers releases switched grads off while loading (#13790)

    comps = pipe.components
    denoiser = comps.get("transformer") or comps.get("unet")
    if denoiser is None:
        raise ConfigError(f"{spec}: pipeline {type(pipe).__name__} has no unet/transformer "
                          f"(components: {sorted(k for k, v in comps.items() if v is not None)})")
    sched = comps.get("scheduler")
    flow = "FlowMatch" in type(sched).__name__
    kind = "flow" if flow else "diffusion"
    pred = "flow" if flow else sched.config.get("prediction_type", "epsilon")
    if gradient_checkpointing and getattr(denoiser, "_supports_gradient_checkpointing", False):
        denoiser.enable_gradient_checkpointing()
    vae = comps.get("vae") or comps.get("vqvae")
    card = {"pipeline": type(pipe).__name__, "denoiser": type(denoiser).__name__, "scheduler": type(sched).__name__,
            "vae": type(vae).__name__ if vae is not None else None, "torch_dtype": str(dtype),
            "gradient_checkpointing": gradient_checkpointing, "vae_slicing": vae_slicing, "vae_tiling": vae_tiling}

    cond, uncond = _condition(pipe, denoiser, spec, prompt=prompt, negative_prompt=negative_prompt,
                              guidance_scale=guidance_scale, class_label=class_label,
                              text_encoder_device=text_encoder_device, max_sequence_length=max_sequence_length)
    card.update(prompt=prompt if "encoder_hidden_states" in cond else None, guidance_scale=guidance_scale,
                class_label=int(cond["class_labels"][0]) if "class_labels" in cond else None)
    del pipe, comps  # frees the text encoders
    if vae is None:
        if cond and "class_labels" not in cond:
            raise ConfigError(f"{spec}: text-conditioned pixel pipelines are not supported")
        prior = DiffusersPixelPrior(denoiser, sched, cond=cond, kind=kind, prediction_type=pred, spec=spec, card=card)
        return prior.to(device)
    if hasattr(vae, "use_slicing"):
        vae.use_slicing = bool(vae_slicing)
    if vae_tiling:
        if not hasattr(vae, "enable_tiling"):
            raise ConfigError(f"{spec}: {type(vae).__name__} has no tiled decoding")
        vae.enable_tiling()
    if gradient_checkpointing and getattr(vae, "_supports_gradient_checkpointing", False):
        vae.enable_gradient_checkpointing()
    cls = VQLatentPrior if type(vae).__name__ == "VQModel" else LatentPrior
    prior = cls(denoiser, vae, sched, kind=kind, prediction_type=pred, cond=cond, spec=spec, card=card)
    if uncond:
        prior.uncond, prior.guidance_scale = uncond, float(guidance_scale)
    return prior.to(device)


def _condition(pipe, denoiser, spec: str, *, prompt: str, negative_prompt: str, guidance_scale: float,
               class_label, text_encoder_device: str, max_sequence_length: int):
    """``(cond, uncond)`` keyword tensors (batch 1) for the denoiser: text embeddings or a class label."""
    cfg = denoiser.config
    comps = pipe.components
    cfg_on = float(guidance_scale) != 1.0
    if comps.get("text_encoder") is not None or comps.get("text_encoder_2") is not None:
        return _encode_prompt(pipe, prompt, negative_prompt, cfg_on, text_encoder_device, max_sequence_length)
    if prompt:
        raise ConfigError(f"{spec} has no text encoder; prompt={prompt!r} cannot be used")
    n_classes = getattr(cfg, "num_embeds_ada_norm", None) or getattr(cfg, "num_class_embeds", None)
    if n_classes:
        null = int(getattr(cfg, "num_embeds_ada_norm", None) or 0)  # DiT: index n_classes is the dropped label
        if class_label is None:
            if not getattr(cfg, "num_embeds_ada_norm", None):
                raise ConfigError(f"{spec} is class-conditional ({n_classes} classes) without a null class; "
                                  f"pass class_label=")
            label = null
        elif isinstance(class_label, str):
            labels = getattr(pipe, "labels", None) or {}
            if class_label not in labels:
                hint = close_matches(class_label, list(labels))
                raise ConfigError(f"{spec}: unknown class label {class_label!r}"
                                  + (f"; did you mean {hint}?" if hint else f"; {len(labels)} labels known"))
            label = int(labels[class_label])
        else:
            label = int(class_label)
            if not 0 <= label < n_classes:
                raise ConfigError(f"{spec}: class_label must be in [0, {n_classes}), got {label}")
        cond = {"class_labels": torch.tensor([label], dtype=torch.long)}
        uncond = {"class_labels": torch.tensor([null], dtype=torch.long)} if cfg_on and null else None
        return cond, uncond
    if class_label is not None:
        raise ConfigError(f"{spec} is not class-conditional; class_label={class_label!r} cannot be used")
    return {}, None


def _encode_prompt(pipe, prompt: str, negative_prompt: str, cfg_on: bool, device: str,
                   max_sequence_length: int = 256) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Text conditioning with the pipeline's own ``encode_prompt`` (SD: CLIP; SD3: CLIP-L + CLIP-G [+ T5]).

    The text encoders run once on ``device`` under ``no_grad``; returns
    ``({"encoder_hidden_states" [1,L,D], ("pooled_projections" [1,P])}, same for the negative prompt or None)``.
    """
    comps = pipe.components
    encoders = [v for k, v in comps.items() if k.startswith("text_encoder") and v is not None]
    for enc in encoders:
        enc.to(device)
    with torch.no_grad():
        if "transformer" in comps and "text_encoder_2" in comps:  # SD3
            pe, npe, pooled, npooled = pipe.encode_prompt(
                prompt=prompt, prompt_2=None, prompt_3=None, device=torch.device(device),
                do_classifier_free_guidance=cfg_on, negative_prompt=negative_prompt,
                max_sequence_length=max_sequence_length)
            cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
            uncond = {"encoder_hidden_states": npe, "pooled_projections": npooled} if cfg_on else None
        else:  # SD 1.x / 2.x
            pe, npe = pipe.encode_prompt(prompt, torch.device(device), 1, cfg_on, negative_prompt=negative_prompt)
            cond = {"encoder_hidden_states": pe}
            uncond = {"encoder_hidden_states": npe} if cfg_on else None
    detach = lambda d: None if d is None else {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
    return detach(cond), detach(uncond)
