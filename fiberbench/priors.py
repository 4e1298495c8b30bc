"""Priors: pretrained diffusion / flow-matching models behind one interface.

Samplers never ask what kind of prior they hold. Every prior is written as

    x_t = alpha_t * x0 + sigma_t * eps

(diffusion, VP: ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``;
rectified flow: ``alpha_t = 1 - sigma_t``), and offers

- ``schedule(steps)``: the model times of a sampling run (from the diffusers
  scheduler, so the noise schedule is the library's own), ending at the data;
- ``denoise(x_t, t)``: one model call -> ``(x0_hat, eps_hat)``; x0_hat is
  clamped to the data range for pixel priors and eps_hat re-derived from it;
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

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError


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

    def schedule(self, steps: int, t_start: float | None = None) -> Schedule:
        """Times of a ``steps``-step run from pure noise (or from model time ``t_start``) to the data."""
        if int(steps) != steps or steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {steps!r}")
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

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """One model call: ``(x0_hat, eps_hat)``, both shaped like ``x_t``.

        x0_hat is clamped to the data range (pixel priors) and eps_hat is
        re-derived from the clamped x0_hat so that (x0_hat, eps_hat) are
        consistent with x_t (as diffusers' DDIM does with clipping).
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
        if self.clamp_range is not None:
            x0 = x0.clamp(*self.clamp_range)
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

    def times(self, steps: int, t_start: float | None = None) -> torch.Tensor:
        """``steps`` trailing-spaced DDIM times (first = the last training step), then -1 (data)."""
        from diffusers import DDIMScheduler

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

    def model_output(self, x_t, t):
        n = x_t.shape[0]
        tt = t.to(x_t.device).expand(n)
        kwargs = {k: v.to(x_t.device, x_t.dtype).expand(n, *v.shape[1:]) for k, v in self.cond.items()}
        name = type(self.unet).__name__
        if "Transformer" in name:
            return self.unet(hidden_states=x_t, timestep=tt, **kwargs).sample
        if kwargs:
            return self.unet(x_t, tt, **kwargs).sample
        return self.unet(x_t, tt).sample

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


def load_diffusers_prior(path: str, *, spec: str | None = None, device="cpu", torch_dtype=None,
                         prompt: str = "", class_label: int | None = None) -> Prior:
    """A prior from a diffusers pipeline folder (or hub id already in the local cache).

    Supports ``UNet2DModel`` pixel pipelines (DDPM/DDIM), latent ``UNet2DModel`` +
    ``AutoencoderKL`` (LDM), Stable-Diffusion-style ``UNet2DConditionModel``
    (with the prompt's text embedding, empty by default) and SD3-style
    transformers with a flow-matching scheduler. Components are loaded one by
    one (never a pipeline ``__call__``, which runs under ``no_grad``).
    """
    import json
    from pathlib import Path

    import diffusers

    root = Path(path)
    if not (root / "model_index.json").exists():
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(path, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - hub errors vary by version
            raise ConfigError(
                f"cannot load diffusers prior {path!r}: no local folder and not in the Hugging Face cache "
                f"(~/.cache/huggingface/hub). Download it first, e.g. `huggingface-cli download {path}`.") from e
    index = json.loads((root / "model_index.json").read_text())
    dtype = torch_dtype or torch.float32

    def load(component: str):
        cls = getattr(diffusers, index[component][1])
        if issubclass(cls, diffusers.ModelMixin):
            return cls.from_pretrained(root / component, torch_dtype=dtype, use_safetensors=None)
        return cls.from_pretrained(root / component)

    sched = getattr(diffusers, index["scheduler"][1]).from_pretrained(root / "scheduler")
    flow = "FlowMatch" in type(sched).__name__
    kind = "flow" if flow else "diffusion"
    pred = "flow" if flow else sched.config.get("prediction_type", "epsilon")
    denoiser_key = "transformer" if "transformer" in index else "unet"
    denoiser = load(denoiser_key)
    spec = spec or f"diffusers/{path}"
    if "vae" not in index and "vqvae" not in index:
        return PixelPrior(denoiser, sched, kind=kind, prediction_type=pred, spec=spec).to(device)
    vae = load("vae" if "vae" in index else "vqvae")
    cond = {}
    if "text_encoder" in index and index.get("text_encoder", [None])[0]:
        cond = _encode_prompt(root, index, prompt, dtype)
    return LatentPrior(denoiser, vae, sched, kind=kind, prediction_type=pred, cond=cond, spec=spec).to(device)


def _encode_prompt(root, index, prompt: str, dtype) -> dict[str, torch.Tensor]:
    """Text conditioning of SD-style (CLIP text encoder) pipelines: ``encoder_hidden_states`` [1,L,D]."""
    import transformers

    tok_cls = getattr(transformers, index["tokenizer"][1])
    enc_cls = getattr(transformers, index["text_encoder"][1])
    tok = tok_cls.from_pretrained(root / "tokenizer")
    enc = enc_cls.from_pretrained(root / "text_encoder", torch_dtype=dtype).eval()
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        out = enc(ids)
    return {"encoder_hidden_states": out[0]}
