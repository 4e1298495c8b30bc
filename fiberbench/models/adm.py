"""ADM, the UNet of OpenAI's guided-diffusion (Dhariwal & Nichol 2021), and the prior built on it.

Written here from the published architecture (``guided_diffusion/unet.py`` ``UNetModel`` and
``script_util.py`` ``create_model``), so the published checkpoints load without that package.

Key compatibility. The parameter names are the ones ``UNetModel`` gives, because every module that
holds parameters sits at the same attribute path: ``time_embed.{0,2}`` (Linear, SiLU, Linear),
``label_emb`` (class-conditional), ``input_blocks.<i>.<j>``, ``middle_block.{0,1,2}`` and
``output_blocks.<i>.<j>`` (each a sequence of a :class:`ResBlock`, an :class:`AttentionBlock`, a
:class:`Downsample` / :class:`Upsample`), and ``out.{0,2}`` (GroupNorm, SiLU, conv). Inside, a ResBlock
has ``in_layers.{0,2}`` (GroupNorm, SiLU, conv), ``emb_layers.1`` (SiLU, Linear to 2 x channels with
scale-shift norm), ``out_layers.{0,3}`` (GroupNorm, SiLU, Dropout, conv) and ``skip_connection`` (a 1x1
conv when the channel count changes); an attention block ``norm``, ``qkv`` and ``proj_out`` (1-d
convolutions, as OpenAI's); resampling blocks ``op`` / ``conv`` (only without ``resblock_updown``). The
block order, channel counts and the places of attention and resampling follow ``create_model``'s loops
over ``channel_mult`` and ``num_res_blocks``, and the attention resolutions are the flag's ``image_size //
res``. With the published flags of ``256x256_diffusion_uncond`` (``attention_resolutions 32,16,8,
num_channels 256, num_head_channels 64, num_res_blocks 2, resblock_updown, use_scale_shift_norm,
learn_sigma``) this gives 552,814,086 parameters under 36 input / output blocks; ``tests/test_adm.py``
builds it on the meta device and checks that count and the names and shapes of its landmark keys.

Numerics follow the original: GroupNorm(32) computed in float32, the sinusoidal timestep embedding
(cos half first), attention scaled by 1/sqrt(head channels) with the heads split before q/k/v (legacy
order) or after (``use_new_attention_order``, the 64x64 model). ``use_fp16`` there casts the torso's
convolutions to float16 and keeps norms, embeddings and the output head in float32;
:meth:`ADMUNet.convert_torso` does the same for any dtype.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .prior import PixelPrior, split_variance

NUM_CLASSES = 1000  # ImageNet, for the class-conditional checkpoints


@dataclass(frozen=True)
class ADMConfig:
    """The architecture and diffusion flags of a guided-diffusion model, named as its ``MODEL_FLAGS``.

    Defaults are ``script_util.model_and_diffusion_defaults()``; ``in_channels`` is not a flag there
    (``create_model`` fixes 3) and is here for gray-scale models trained with the same code.
    """

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: str = ""  # "" = by image size, as create_model
    attention_resolutions: str = "16,8"  # image resolutions with attention
    num_heads: int = 4
    num_head_channels: int = -1  # > 0 overrides num_heads
    num_heads_upsample: int = -1
    class_cond: bool = False
    learn_sigma: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_fp16: bool = False
    dropout: float = 0.0
    noise_schedule: str = "linear"  # linear | cosine
    diffusion_steps: int = 1000
    in_channels: int = 3

    def multipliers(self) -> tuple[int, ...]:
        """Channel multiplier per level (``create_model``'s table for ``channel_mult=""``)."""
        if self.channel_mult:
            return tuple(int(m) for m in self.channel_mult.split(","))
        table = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
        if self.image_size not in table:
            raise ConfigError(f"ADM image_size {self.image_size} has no default channel_mult (64, 128, 256, 512); "
                              f"give channel_mult, e.g. '1,2,2'")
        return table[self.image_size]

    def attention_ds(self) -> tuple[int, ...]:
        """Downsampling rates with attention: ``image_size // res`` for each attention resolution."""
        return tuple(self.image_size // int(r) for r in self.attention_resolutions.split(",") if r)

    def check(self) -> None:
        """``ConfigError`` for flags no UNet can be built from (channel counts GroupNorm(32) cannot split, …)."""
        mults = self.multipliers()
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ConfigError(f"ADM noise_schedule must be one of {sorted(NOISE_SCHEDULES)}, "
                              f"got {self.noise_schedule!r}")
        bad = [self.num_channels * m for m in mults if (self.num_channels * m) % 32]
        if bad:
            raise ConfigError(f"ADM channel counts {bad} are not multiples of 32 (GroupNorm(32)); "
                              f"num_channels={self.num_channels}, channel_mult={mults}")
        if self.image_size % 2 ** (len(mults) - 1):
            raise ConfigError(f"ADM image_size {self.image_size} is not divisible by 2^{len(mults) - 1} "
                              f"(channel_mult {mults})")
        if self.num_head_channels > 0 and any((self.num_channels * m) % self.num_head_channels for m in mults):
            raise ConfigError(f"ADM num_head_channels {self.num_head_channels} does not divide the channel counts "
                              f"{[self.num_channels * m for m in mults]}")
        if self.num_res_blocks < 1 or self.diffusion_steps < 1 or self.in_channels < 1:
            raise ConfigError("ADM num_res_blocks, diffusion_steps and in_channels must be >= 1")


# guided-diffusion's named beta schedules, as diffusers names the same ones ("cosine" is
# betas_for_alpha_bar with max_beta 0.999 in both)
NOISE_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def config_from_flags(flags: dict[str, Any]) -> ADMConfig:
    """An :class:`ADMConfig` from a flag dict (unknown names -> ``ConfigError``), checked."""
    known = {f.name for f in fields(ADMConfig)}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise ConfigError(f"unknown ADM flag(s) {unknown}; known: {sorted(known)}")
    cfg = ADMConfig(**flags)
    cfg.check()
    return cfg


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` of (possibly fractional) timesteps ``[N]``: cosines, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 whatever the input dtype (the fp16 torso's norms stay exact)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv (``conv``) if ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.channels = channels
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Downsample(nn.Module):
    """2x downsampling: a strided 3x3 conv if ``use_conv``, else 2x2 average pooling (both named ``op``)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block on ``x [N,C,H,W]`` conditioned on ``emb [N,E]``; optionally resamples (``up`` / ``down``)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, *, dropout: float = 0.0,
                 scale_shift: bool = True, up: bool = False, down: bool = False):
        super().__init__()
        out = out_channels or channels
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out if scale_shift else out))
        self.out_layers = nn.Sequential(norm(out), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:  # resample between the norm/activation and the conv, the skip path alike
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions of ``[N,C,H,W]``: ``norm``, ``qkv`` and ``proj_out`` (1x1 conv1d).

    ``new_order=False`` (OpenAI's legacy order) splits heads before q/k/v: channels of ``qkv`` are
    ``[head][q|k|v][d]``; ``new_order=True`` splits q/k/v first: ``[q|k|v][head][d]``.
    """

    def __init__(self, channels: int, heads: int, new_order: bool):
        super().__init__()
        self.heads, self.new_order = heads, new_order
        self.norm = norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        d, n = c // self.heads, x.shape[-1]
        if self.new_order:
            q, k, v = (z.reshape(b * self.heads, d, n) for z in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * self.heads, 3 * d, n).split(d, dim=1)
        # softmax in float32, as the original does for its fp16 torso
        a = F.scaled_dot_product_attention(*(z.transpose(1, 2).float() for z in (q, k, v)))
        h = self.proj_out(a.transpose(1, 2).reshape(b, c, n).type(x.dtype))
        return (x + h).reshape(b, c, *spatial)


class TimestepSequential(nn.Sequential):
    """A block of the UNet: its ResBlocks get the embedding, the other layers only ``x``."""

    checkpointing: bool = False

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = (checkpoint(layer, x, emb, use_reentrant=False) if self.checkpointing and torch.is_grad_enabled()
                     else layer(x, emb))
            elif isinstance(layer, AttentionBlock) and self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class ADMUNet(nn.Module):
    """guided-diffusion's ``UNetModel`` (2-d): ``forward(x [N,C,H,W], t [N], y [N] or None) -> [N,C',H,W]``.

    C' = 2C with ``learn_sigma`` (the epsilon prediction, then the variance output ``v`` in [-1, 1]).
    Parameter names match the published checkpoints (module docstring).
    """

    def __init__(self, cfg: ADMConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        mc, emb = cfg.num_channels, 4 * cfg.num_channels
        self.torso_dtype = torch.float32
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        if cfg.class_cond:
            self.label_emb = nn.Embedding(NUM_CLASSES, emb)
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skips, ch = self._build_encoder(cfg, emb)
        self.middle_block = TimestepSequential(
            self._res(ch, emb), self._attn(ch, cfg.num_heads), self._res(ch, emb))
        self.output_blocks = nn.ModuleList()
        self._build_decoder(cfg, emb, skips, ch)
        out_ch = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.out = nn.Sequential(norm(mc), nn.SiLU(), nn.Conv2d(mc, out_ch, 3, padding=1))

    def _res(self, ch: int, emb: int, out: int | None = None, **kw: bool) -> ResBlock:
        return ResBlock(ch, emb, out, dropout=self.cfg.dropout, scale_shift=self.cfg.use_scale_shift_norm, **kw)

    def _attn(self, ch: int, heads: int) -> AttentionBlock:
        cfg = self.cfg
        n = ch // cfg.num_head_channels if cfg.num_head_channels > 0 else heads
        return AttentionBlock(ch, n, cfg.use_new_attention_order)

    def _build_encoder(self, cfg: ADMConfig, emb: int) -> tuple[list[int], int]:
        """``input_blocks[1:]``; returns the channels of every skip connection and the final channels."""
        skips, ch, ds = [cfg.num_channels], cfg.num_channels, 1
        mults = cfg.multipliers()
        for level, mult in enumerate(mults):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [self._res(ch, emb, mult * cfg.num_channels)]
                ch = mult * cfg.num_channels
                if ds in cfg.attention_ds():
                    layers.append(self._attn(ch, cfg.num_heads))
                self.input_blocks.append(TimestepSequential(*layers))
                skips.append(ch)
            if level != len(mults) - 1:
                down = self._res(ch, emb, ch, down=True) if cfg.resblock_updown else Downsample(ch, True)
                self.input_blocks.append(TimestepSequential(down))
                skips.append(ch)
                ds *= 2
        return skips, ch

    def _build_decoder(self, cfg: ADMConfig, emb: int, skips: list[int], ch: int) -> None:
        """``output_blocks``: num_res_blocks + 1 blocks per level, each taking one skip connection."""
        mults = cfg.multipliers()
        ds = 2 ** (len(mults) - 1)
        heads_up = cfg.num_heads_upsample if cfg.num_heads_upsample != -1 else cfg.num_heads
        for level, mult in list(enumerate(mults))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [self._res(ch + skips.pop(), emb, cfg.num_channels * mult)]
                ch = cfg.num_channels * mult
                if ds in cfg.attention_ds():
                    layers.append(self._attn(ch, heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(self._res(ch, emb, ch, up=True) if cfg.resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

    def convert_torso(self, dtype: torch.dtype) -> None:
        """Cast the convolutions of the input, middle and output blocks to ``dtype`` (OpenAI's ``use_fp16`` for
        float16); norms, embeddings and the output head stay float32."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for m in part.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.to(dtype)
        self.torso_dtype = dtype

    def set_checkpointing(self, on: bool) -> None:
        """Gradient checkpointing of every ResBlock and attention block (memory for compute in backward)."""
        for m in self.modules():
            if isinstance(m, TimestepSequential):
                m.checkpointing = bool(on)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is not None) != self.cfg.class_cond:
            raise ValueError("ADM: pass class labels y if and only if the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.num_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        h, hs = x.type(self.torso_dtype), []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def adm_scheduler(cfg: ADMConfig) -> DDPMScheduler:
    """The model's noise schedule as a diffusers scheduler: guided-diffusion's ``get_named_beta_schedule``
    (linear: betas 1e-4 .. 0.02 scaled by 1000 / steps; cosine: Nichol & Dhariwal's, capped at 0.999)."""
    scale = 1000.0 / cfg.diffusion_steps
    return DDPMScheduler(num_train_timesteps=cfg.diffusion_steps, beta_schedule=NOISE_SCHEDULES[cfg.noise_schedule],
                         beta_start=scale * 1e-4, beta_end=scale * 0.02, prediction_type="epsilon",
                         variance_type="learned_range" if cfg.learn_sigma else "fixed_small", clip_sample=True)


class ADMPrior(PixelPrior):
    """A pixel prior on an :class:`ADMUNet` (epsilon prediction, images in [-1, 1], 1000 training steps).

    With ``learn_sigma`` the ancestral step (eta = 1) uses the learned-range variance (the update the
    published models were sampled with); a class-conditional model is called with ``class_label``.
    Times are the training-step indices the network was trained on (guided-diffusion's respacing feeds
    the original index too, ``rescale_timesteps=False``).
    """

    def __init__(self, unet: ADMUNet, *, spec: str, card: dict[str, Any], class_label: int | None = None):
        super().__init__(unet, adm_scheduler(unet.cfg), kind="diffusion", prediction_type="epsilon", spec=spec,
                         card=card)
        self.variance_type = "learned_range" if unet.cfg.learn_sigma else None
        self.class_label = class_label

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.cfg
        return (cfg.in_channels, cfg.image_size, cfg.image_size)

    def model_outputs(self, x_t, t):
        n = x_t.shape[0]
        tt = t.to(x_t.device).float().reshape(-1)[:1].expand(n)
        y = None if self.class_label is None else torch.full((n,), self.class_label, dtype=torch.long,
                                                               device=x_t.device)
        return split_variance(self.unet(x_t, tt, y), x_t.shape[1], self.variance_type)


def flags_dict(cfg: ADMConfig) -> dict[str, Any]:
    """The flags of ``cfg`` as a plain dict (for cards)."""
    return asdict(cfg)
