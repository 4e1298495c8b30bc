"""``guided-diffusion/...``: OpenAI's ADM checkpoints (guided-diffusion, Dhariwal & Nichol 2021) as priors.

Spec syntax (no ``@layer``):

- ``guided-diffusion/256x256_diffusion_uncond``: a published checkpoint by name (:data:`PUBLISHED`), read
  from ``<folder>/<name>.pt`` with its published flags. The folder is ``cache_dir=`` if given, else
  ``$FIBERBENCH_GUIDED_DIFFUSION``, else ``~/.cache/fiberbench/guided-diffusion``; a missing file is one
  ``ConfigError`` naming it and its download URL.
- ``guided-diffusion/<path>.pt``: a checkpoint file; its flags are the published ones when the file
  name is a published name (``/data/256x256_diffusion_uncond.pt``).
- ``guided-diffusion/<path>.pt?<name>&<flag>=<value>&…``: a file with the flags of a published model
  (``?256x256_diffusion_uncond``) and/or any flags set one by one, named as guided-diffusion's
  ``MODEL_FLAGS`` (``?image_size=64&num_channels=64&attention_resolutions=16,8&learn_sigma=True``;
  unset flags take guided-diffusion's defaults, :class:`~fiberbench.models.adm.ADMConfig`).

Checkpoints are plain state dicts read by :func:`fiberbench.io.load_state_dict` (``torch.load`` with
``weights_only=True``, or safetensors): a pickle that would run code is refused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError, close_matches
from ...identity import file_sha256
from ...io import load_state_dict
from ..adm import NUM_CLASSES, ADMConfig, ADMPrior, ADMUNet, config_from_flags, flags_dict
from ..registry import ModelSource, Spec, register_source

# the fiber paper's ImageNet setting was tuned on 256x256_diffusion_uncond; eta 1: the ancestral update the
# published models were sampled with (learned variance), also for the prior alone
ADM_PRESET = "fiber-imagenet"
ENV_DIR = "FIBERBENCH_GUIDED_DIFFUSION"
DEFAULT_DIR = Path("~/.cache/fiberbench/guided-diffusion")
URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/{name}.pt"

# The README's MODEL_FLAGS of each released diffusion checkpoint (every one learns sigma, 1000 steps).
_BASE = dict(attention_resolutions="32,16,8", learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True,
             diffusion_steps=1000)
_ADM256 = dict(_BASE, image_size=256, num_channels=256, num_head_channels=64, num_res_blocks=2,
               noise_schedule="linear", use_fp16=True)
PUBLISHED: dict[str, dict[str, Any]] = {
    "256x256_diffusion_uncond": dict(_ADM256, class_cond=False),
    "256x256_diffusion": dict(_ADM256, class_cond=True),
    "128x128_diffusion": dict(_BASE, image_size=128, num_channels=256, num_heads=4, num_res_blocks=2,
                              noise_schedule="linear", class_cond=True, use_fp16=True),
    "64x64_diffusion": dict(_BASE, image_size=64, num_channels=192, num_head_channels=64, num_res_blocks=3,
                            noise_schedule="cosine", class_cond=True, dropout=0.1, use_new_attention_order=True,
                            use_fp16=True),
    "512x512_diffusion": dict(_ADM256, image_size=512, class_cond=True, use_fp16=False),
    "lsun_bedroom": dict(_ADM256, class_cond=False, dropout=0.1),
    "lsun_cat": dict(_ADM256, class_cond=False, dropout=0.1),
    "lsun_horse": dict(_ADM256, class_cond=False, dropout=0.1),
    "lsun_horse_nodropout": dict(_ADM256, class_cond=False),
}
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class ADMRef:
    """A parsed spec name: the published name (if any), the explicit file (if any) and the flags."""

    published: str | None
    file: Path | None
    flags: dict[str, Any]

    def path(self, cache_dir: str | os.PathLike | None = None) -> Path:
        """The checkpoint file: the explicit one, else ``<folder>/<published>.pt``."""
        return self.file if self.file is not None else checkpoint_dir(cache_dir) / f"{self.published}.pt"


def checkpoint_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where published checkpoints are looked for: ``cache_dir``, ``$FIBERBENCH_GUIDED_DIFFUSION`` or the default."""
    return Path(cache_dir or os.environ.get(ENV_DIR) or DEFAULT_DIR).expanduser()


def parse_flag(name: str, text: str) -> Any:
    """One ``flag=value`` of a spec query, typed as the :class:`ADMConfig` field (bools: true/false/1/0)."""
    default = ADMConfig.__dataclass_fields__[name].default
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        return type(default)(text)
    except ValueError:
        raise ConfigError(f"ADM flag {name}={text!r} is not a {type(default).__name__}") from None


def parse_adm_name(name: str) -> ADMRef:
    """The name part of a ``guided-diffusion/`` spec -> :class:`ADMRef` (``ConfigError`` if malformed)."""
    base, _, query = name.partition("?")
    items = [i for i in query.split("&") if i]
    bare = [i for i in items if "=" not in i]
    overrides: dict[str, Any] = {}
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            if key not in ADMConfig.__dataclass_fields__:
                hint = close_matches(key, list(ADMConfig.__dataclass_fields__))
                raise ConfigError(f"unknown ADM flag {key!r} in guided-diffusion/{name}"
                                  + (f"; did you mean {hint[0]!r}?" if hint else ""))
            overrides[key] = parse_flag(key, value)
    for b in bare:
        if b not in PUBLISHED:
            hint = close_matches(b, list(PUBLISHED))
            raise ConfigError(f"{b!r} in guided-diffusion/{name} is not a published ADM model ({sorted(PUBLISHED)})"
                              + (f"; did you mean {hint[0]!r}?" if hint else ""))
    if len(bare) > 1:
        raise ConfigError(f"guided-diffusion/{name} names more than one published model ({bare})")
    is_file = "/" in base or base.endswith(WEIGHT_SUFFIXES) or base.startswith("~")
    if not is_file:
        if base not in PUBLISHED:
            hint = close_matches(base, list(PUBLISHED))
            raise ConfigError(f"unknown guided-diffusion model {base!r}; published: {sorted(PUBLISHED)}"
                              + (f"; did you mean {hint[0]!r}?" if hint else "")
                              + "; or give a checkpoint file: guided-diffusion/<path>.pt?<flags>")
        return ADMRef(base, None, {**PUBLISHED[base], **overrides})
    file = Path(base).expanduser()
    like = bare[0] if bare else (file.stem if file.stem in PUBLISHED else None)
    if like is None and not overrides:
        raise ConfigError(f"guided-diffusion/{name}: the checkpoint's architecture is unknown; name the published "
                          f"model it follows (?256x256_diffusion_uncond) or give its flags "
                          f"(?image_size=64&num_channels=128&learn_sigma=True&…)")
    return ADMRef(like, file, {**(PUBLISHED[like] if like else {}), **overrides})


@register_source
class GuidedDiffusionSource(ModelSource):
    name = "guided-diffusion"
    kinds = ("prior",)

    def check(self, spec: Spec, kind: str) -> None:
        super().check(spec, kind)
        if spec.layer:
            raise ConfigError(f"priors take no '@layer' ({str(spec)!r})")
        config_from_flags(parse_adm_name(spec.name).flags)

    def load_prior(self, spec: Spec, device: str, **kwargs: Any) -> ADMPrior:
        return load_adm_prior(spec.name, spec=str(spec), device=device, **kwargs)

    def checksum(self, spec: Spec) -> str | None:
        path = parse_adm_name(spec.name).path()
        return "sha256:" + file_sha256(path) if path.is_file() else None

    def defaults(self, spec: Spec) -> dict[str, Any]:
        return {"preset": ADM_PRESET, "sampling": {"eta": 1.0}}


def missing_checkpoint(spec: str, ref: ADMRef, path: Path, cache_dir) -> ConfigError:
    """One readable error for a checkpoint that is not where it was looked for."""
    if ref.file is not None:
        return ConfigError(f"cannot load {spec}: checkpoint file {path} does not exist")
    url = URL.format(name=ref.published)
    where = "cache_dir=" if cache_dir else f"${ENV_DIR}" if os.environ.get(ENV_DIR) else "the default folder"
    return ConfigError(
        f"cannot load {spec}: {path} is not there (looked in {path.parent}, from {where}). Pre-download it on a "
        f"machine with network: `curl -L -o {path} {url}` (or wget), copy it here, or set ${ENV_DIR} / pass "
        f"cache_dir= to the folder holding {path.name}, or name the file: guided-diffusion/<path>/{path.name}")


def load_adm_prior(name: str, *, spec: str | None = None, device: str = "cpu", cache_dir=None,
                   class_label: int | None = None, torch_dtype: torch.dtype | str | None = None,
                   gradient_checkpointing: bool = False) -> ADMPrior:
    """An :class:`~fiberbench.models.adm.ADMPrior` from a ``guided-diffusion/`` spec name (module docstring).

    Args:
        cache_dir: folder of the published checkpoints (default ``$FIBERBENCH_GUIDED_DIFFUSION``, else
            ``~/.cache/fiberbench/guided-diffusion``).
        class_label: ImageNet class index (0..999); required by the class-conditional models, which have no
            unconditional mode, and refused by the unconditional ones.
        torch_dtype: ``float16`` / ``bfloat16`` runs the torso's convolutions in that dtype (the published
            ``use_fp16`` mixed precision); default float32 throughout.
        gradient_checkpointing: recompute block activations in the backward pass (guided samplers at 256 px).
    """
    spec = spec or f"guided-diffusion/{name}"
    ref = parse_adm_name(name)
    cfg = config_from_flags(ref.flags)
    label = check_class_label(spec, cfg, class_label)
    dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else getattr(torch, str(torch_dtype or "float32")
                                                                             .replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{spec}: unknown torch_dtype {torch_dtype!r}")
    path = ref.path(cache_dir)
    if not path.is_file():
        raise missing_checkpoint(spec, ref, path, cache_dir)
    unet = build_loaded_unet(cfg, load_state_dict(path), spec)
    if dtype != torch.float32:
        unet.convert_torso(dtype)
    unet.set_checkpointing(gradient_checkpointing)
    card = {"preset": ADM_PRESET, "sampling": {"eta": 1.0}, "architecture": "ADM (guided-diffusion UNetModel)",
            "flags": flags_dict(cfg), "published": ref.published, "checkpoint": str(path),
            "variance": "learned_range" if cfg.learn_sigma else None, "class_label": label,
            "torch_dtype": str(dtype), "gradient_checkpointing": bool(gradient_checkpointing)}
    return ADMPrior(unet, spec=spec, card=card, class_label=label).to(device)


def check_class_label(spec: str, cfg: ADMConfig, class_label) -> int | None:
    """The class index a class-conditional model is called with (``None`` for unconditional models)."""
    if not cfg.class_cond:
        if class_label is not None:
            raise ConfigError(f"{spec} is not class-conditional; class_label={class_label!r} cannot be used")
        return None
    if class_label is None:
        raise ConfigError(f"{spec} is class-conditional ({NUM_CLASSES} ImageNet classes) with no unconditional "
                          f"mode: pass class_label=<0..{NUM_CLASSES - 1}>, or use 256x256_diffusion_uncond")
    if isinstance(class_label, bool) or not isinstance(class_label, int) or not 0 <= class_label < NUM_CLASSES:
        raise ConfigError(f"{spec}: class_label must be an integer in [0, {NUM_CLASSES}), got {class_label!r}")
    return int(class_label)


def build_loaded_unet(cfg: ADMConfig, state: dict[str, torch.Tensor], spec: str) -> ADMUNet:
    """The UNet of ``cfg`` holding ``state``: built on the meta device, then given the checkpoint's tensors (no
    second copy of the weights in memory). A state dict that does not fit the flags is one ``ConfigError``."""
    with torch.device("meta"):
        unet = ADMUNet(cfg)
    want = unet.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        hint = (" (class_cond?)" if "label_emb.weight" in missing + unexpected else "")
        raise ConfigError(f"{spec}: the checkpoint does not fit the ADM flags {flags_dict(cfg)}{hint}: "
                          f"{len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}, "
                          f"{len(shapes)} shape mismatches {shapes[:3]}")
    unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return unet.eval().requires_grad_(False)
