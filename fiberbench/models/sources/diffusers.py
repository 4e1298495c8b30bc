"""``diffusers/<folder or hub id>``: a pretrained diffusion / flow-matching pipeline as a prior.

Components are taken out of the pipeline object; its ``__call__`` (which runs under ``no_grad``) is never
used. Pixel UNets, latent UNets on a VAE or VQ-VAE, Stable Diffusion (empty prompt by default), DiT
(class label) and SD3 flow transformers all come out behind the same :class:`Prior` interface.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import nn

from ...errors import ConfigError, close_matches
from ..hubcache import HUB_WEIGHT_FILES, is_missing_weights, local_or_cached_checksum, weights_unavailable
from ..prior import DiffusersPixelPrior, LatentPrior, Prior, VQLatentPrior, kind_of_scheduler
from ..registry import ModelSource, Spec, register_source

# the recommended preset of a hub diffusion / flow prior: the fiber paper's ImageNet setting (200 steps, its
# guidance schedule, time-dependent target), tuned there on a pretrained pixel diffusion model
HUB_PRESET = "fiber-imagenet"
# pipeline components fiberbench never needs (never loaded)
SKIP_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
# the denoiser's weight file comes first in a diffusers repo's checksum
DIFFUSERS_WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors",
                          "transformer/diffusion_pytorch_model.safetensors") + HUB_WEIGHT_FILES


@register_source
class DiffusersSource(ModelSource):
    name = "diffusers"
    kinds = ("prior",)

    def check(self, spec: Spec, kind: str) -> None:
        super().check(spec, kind)
        if spec.layer:
            raise ConfigError(f"priors take no '@layer' ({str(spec)!r})")

    def load_prior(self, spec: Spec, device: str, **kwargs: Any) -> Prior:
        return load_diffusers_prior(spec.name, spec=str(spec), device=device, **kwargs)

    def checksum(self, spec: Spec) -> str | None:
        return local_or_cached_checksum(spec.name, DIFFUSERS_WEIGHT_FILES)

    def defaults(self, spec: Spec) -> dict[str, Any]:
        return {"preset": HUB_PRESET}


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The weights-dtype keyword of ``DiffusionPipeline.from_pretrained``: ``dtype`` where the installed
    diffusers reads it (``torch_dtype`` is deprecated there, diffusers PR #14205), else ``torch_dtype``."""
    try:
        new = 'kwargs.pop("dtype"' in inspect.getsource(DiffusionPipeline.from_pretrained)
    except (OSError, TypeError):
        new = False
    return {"dtype" if new else "torch_dtype": dtype}


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
    spec = spec or f"diffusers/{path}"
    dtype = _resolve_dtype(torch_dtype, spec)
    pipe = _open_pipeline(path, spec, dtype, drop_t5=drop_t5, cache_dir=cache_dir, revision=revision,
                          variant=variant, trust_remote_code=trust_remote_code)
    comps = pipe.components
    denoiser = comps.get("transformer") or comps.get("unet")
    if denoiser is None:
        raise ConfigError(f"{spec}: pipeline {type(pipe).__name__} has no unet/transformer "
                          f"(components: {sorted(k for k, v in comps.items() if v is not None)})")
    sched = comps.get("scheduler")
    kind = kind_of_scheduler(sched)
    pred = "flow" if kind == "flow" else sched.config.get("prediction_type", "epsilon")
    if gradient_checkpointing and getattr(denoiser, "_supports_gradient_checkpointing", False):
        denoiser.enable_gradient_checkpointing()
    vae = comps.get("vae") or comps.get("vqvae")
    card = {"preset": HUB_PRESET, "pipeline": type(pipe).__name__, "denoiser": type(denoiser).__name__,
            "scheduler": type(sched).__name__,
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
        prior.card["variance"] = prior.variance_type
        return prior.to(device)
    _configure_vae(vae, spec, slicing=vae_slicing, tiling=vae_tiling, checkpointing=gradient_checkpointing)
    cls = VQLatentPrior if type(vae).__name__ == "VQModel" else LatentPrior
    prior = cls(denoiser, vae, sched, kind=kind, prediction_type=pred, cond=cond, spec=spec, card=card)
    prior.card["variance"] = prior.variance_type  # "learned_range": the ancestral step (eta 1) uses it
    if uncond:
        prior.uncond, prior.guidance_scale = uncond, float(guidance_scale)
    return prior.to(device)


def _resolve_dtype(torch_dtype, spec: str) -> torch.dtype:
    """``torch_dtype`` (a dtype, its name, or ``None`` for float32) as a ``torch.dtype``."""
    dtype = torch_dtype or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"{spec}: unknown torch_dtype {torch_dtype!r}")
    return dtype


def _open_pipeline(path: str, spec: str, dtype: torch.dtype, *, drop_t5: bool, cache_dir, revision: str | None,
                   variant: str | None, trust_remote_code: bool) -> DiffusionPipeline:
    """The pipeline of a folder or of a hub id's snapshot in the local cache, without the components never used.

    Missing weights give one :func:`weights_unavailable` error; grad mode is restored whatever diffusers did.
    """
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
                if k in SKIP_COMPONENTS or (drop_t5 and k in ("text_encoder_3", "tokenizer_3"))
                or (isinstance(v, list) and v and v[0] is None)}
        return DiffusionPipeline.from_pretrained(
            str(root), **_dtype_kwarg(dtype), use_safetensors=None, variant=variant,
            trust_remote_code=trust_remote_code, **skip)
    except Exception as e:  # noqa: BLE001 - hub errors vary by version: one readable message
        if not local and is_missing_weights(e):
            raise weights_unavailable(spec, path, e, cache_dir) from None
        raise ConfigError(f"cannot load diffusers pipeline {spec}: {type(e).__name__}: {e}") from e
    finally:
        torch.set_grad_enabled(grad_mode)  # some diffusers releases switched grads off while loading (#13790)


def _configure_vae(vae: nn.Module, spec: str, *, slicing: bool, tiling: bool, checkpointing: bool) -> None:
    """VAE slicing (memory, same values), tiling (off by default: it shifts the tone at tile borders), checkpointing."""
    if hasattr(vae, "use_slicing"):
        vae.use_slicing = bool(slicing)
    if tiling:
        if not hasattr(vae, "enable_tiling"):
            raise ConfigError(f"{spec}: {type(vae).__name__} has no tiled decoding")
        vae.enable_tiling()
    if checkpointing and getattr(vae, "_supports_gradient_checkpointing", False):
        vae.enable_gradient_checkpointing()


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
