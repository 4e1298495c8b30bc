"""One test matrix over the registries: every registered sampler and every model source gets the same checks.

A new sampler or source is one file plus a registration line; it must also be given its test settings here
(the first test of each half fails until it is), and then it inherits every check below.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fiberbench as fb
from fiberbench.errors import ConfigError
from fiberbench.identity import file_sha256
from fiberbench.models import SOURCES, weights_checksum
from fiberbench.sampling import HP_RULES, SAMPLERS, sample_fiber
from fiberbench.toy import cards

# --------------------------------------------------------------------------- samplers

# a few steps of each method (the checks are about the machinery, not about quality)
METHOD_KW = {
    "ndtm": dict(preset="toy", steps=4),
    "dps": dict(steps=4, eta=1.0),
    "metamer": dict(iters=8),
    "unguided": dict(steps=4, eta=1.0),
    "conditional": dict(steps=4),
}
ALL_METHODS = sorted(SAMPLERS)
# Largest pixel difference batched vs one sample at a time. Every method draws each sample's noise from its
# own generator, so what is left is float round-off of batched networks (measured <= 2.6e-5 on reference seeds
# 4, 11, 21). NDTM amplifies it: its first Adam steps are sign-like, so a round-off-sized gradient component
# moves a pixel by lr (measured max 1.4e-2 on one of 4 samples at seed 21, 2e-4 at seed 4). A batch-dependent
# noise or optimiser path gives differences of order 0.1-1 in every sample.
BATCH_MAX = {"ndtm": 0.05}


@pytest.fixture(scope="module")
def cond_prior():
    return fb.load_prior("toy/cond-fm-shape-resnet")


def _prior(method, prior_fm, cond_prior):
    return cond_prior if SAMPLERS[method].trained else prior_fm


def test_every_registered_sampler_has_test_settings():
    assert set(SAMPLERS) == set(METHOD_KW)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_sampler_batches_do_not_change_samples(method, prior_fm, cond_prior, shape_resnet):
    """Two references x 2 samples in one batch equal the same run one sample at a time, to round-off."""
    refs, _ = fb.toy.references(2, seed=21)
    prior = _prior(method, prior_fm, cond_prior)
    kw = dict(n=2, method=method, seed=3, progress=False, **METHOD_KW[method])
    batched = sample_fiber(prior, shape_resnet, refs, **kw)
    single = sample_fiber(prior, shape_resnet, refs, batch_size=1, **kw)
    assert batched.images.shape == (4, 3, 32, 32)
    diff = (batched.images - single.images).abs()
    assert float(diff.max()) < BATCH_MAX.get(method, 1e-4)
    assert float(diff.mean()) < 1e-3
    assert batched.status == single.status
    assert batched.config["run_id"] == single.config["run_id"]  # batch size is not part of a run's identity


@pytest.mark.parametrize("method", ALL_METHODS)
def test_sampler_reports_every_step_through_the_callback(method, prior_fm, cond_prior, shape_resnet):
    ref, _ = fb.toy.references(1, seed=22)
    seen = []
    res = sample_fiber(_prior(method, prior_fm, cond_prior), shape_resnet, ref, n=3, method=method, seed=1,
                       progress=False, callback=seen.append, **METHOD_KW[method])
    assert seen, "no callback"
    for info in seen:
        assert {"i", "t", "x", "denoised", "images", "loss", "rows"} <= set(info)
        assert info["rows"] == [0, 1, 2] and info["images"].shape == (3, 3, 32, 32)
        assert 0 <= float(info["images"].min()) and float(info["images"].max()) <= 1
    steps = [info["i"] for info in seen]
    assert steps == sorted(steps) and steps[0] == 0
    last = METHOD_KW[method].get("iters", METHOD_KW[method].get("steps")) - 1
    assert steps[-1] == last
    assert res.images.shape == (3, 3, 32, 32)


class _PoisonRow(torch.nn.Module):
    """The wrapped extractor, except that row 1 of every batch of more than one image comes out NaN."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.spec = inner, inner.spec

    def forward(self, images):
        out = self.inner(images)
        if out.shape[0] > 1:
            out = out.clone()
            out[1] = float("nan")
        return out


@pytest.mark.parametrize("method", ALL_METHODS)
def test_sampler_contains_a_faulty_sample_and_leaves_the_rest_bit_identical(method, prior_fm, cond_prior,
                                                                          shape_resnet):
    ref, _ = fb.toy.references(1, seed=23)  # one reference: its own features are computed alone, finite
    prior = _prior(method, prior_fm, cond_prior)
    kw = dict(n=3, method=method, seed=2, progress=False, **METHOD_KW[method])
    if method == "ndtm":  # the poison is keyed to batch row 1, so sample 1 must stay row 1, and the other rows'
        # batches must not depend on it: no lazily spawned particles, early draws or inner-loop exits (each
        # evaluates the rows it keeps as a sub-batch, whose size changes convolution round-off by ~5e-7)
        kw.update(particle_spawn="all", exit_tol=0.0, early_draw_tol=0.0)
    clean = sample_fiber(prior, shape_resnet, ref, **kw)
    faulty = sample_fiber(prior, _PoisonRow(shape_resnet), ref, **kw)
    assert faulty.status[1].startswith("failed"), faulty.status[1]
    for r in (0, 2):
        assert torch.equal(faulty.images[r], clean.images[r])
        assert faulty.status[r] == clean.status[r]
    assert torch.isfinite(faulty.images).all()


def _bad_value(rule: dict):
    kind = rule["kind"]
    return {"int": -1, "real": float("nan"), "choice": "no-such-choice", "gamma": -1.0, "tau_band": (5.0, 1.0)}[kind]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_sampler_refuses_unknown_and_bad_hyperparameters_before_sampling(method):
    ref = torch.rand(3, 32, 32)
    with pytest.raises(ConfigError, match="unknown hyper-parameter"):
        sample_fiber("toy/prior-fm", "toy/shape-resnet@logits", ref, method=method, not_a_knob=1)
    for name in SAMPLERS[method].defaults:
        with pytest.raises(ConfigError, match=re.escape(name)):
            sample_fiber("toy/prior-fm", "toy/shape-resnet@logits", ref, method=method,
                         **{name: _bad_value(HP_RULES[name])})
    if not SAMPLERS[method].supports_init:
        with pytest.raises(ConfigError, match="SDEdit"):
            sample_fiber("toy/prior-fm", "toy/shape-resnet@logits", ref, method=method, init=("sdedit", 500))


# --------------------------------------------------------------------------- model sources

# a spec whose weights are not here, loaded through each source (hub sources: an empty cache folder)
MISSING = {
    "toy": ("extractor", "toy/no-such-model", {}),
    "timm": ("extractor", "timm/resnet50.a1_in1k", {"cache_dir": "EMPTY"}),
    "open_clip": ("clip", "open_clip/ViT-B-32:laion2b_s34b_b79k", {"cache_dir": "EMPTY"}),
    "hf": ("extractor", "hf/facebook/dinov2-small", {"cache_dir": "EMPTY"}),
    "torch": ("extractor", "torch/no_such_module_xyz:build", {}),
    "diffusers": ("prior", "diffusers/google/ddpm-cifar10-32", {"cache_dir": "EMPTY"}),
    "mix": ("extractor", "mix/0.5*timm/resnet50.a1_in1k+0.5*toy/shape-resnet@logits", {"cache_dir": "EMPTY"}),
    "guided-diffusion": ("prior", "guided-diffusion/256x256_diffusion_uncond", {"cache_dir": "EMPTY"}),
}
LOADERS = {"extractor": fb.load_extractor, "prior": fb.load_prior, "clip": fb.load_clip}


def test_every_registered_source_has_test_settings():
    assert set(SOURCES) == set(MISSING) == set(LOCAL_MODELS)


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_source_names_missing_weights_in_one_config_error(source, tmp_path):
    kind, spec, kw = MISSING[source]
    kw = {k: str(tmp_path / "empty") if v == "EMPTY" else v for k, v in kw.items()}
    with pytest.raises(ConfigError) as e:
        LOADERS[kind](spec, **kw)
    msg = str(e.value)
    assert (spec.split("@")[0] if source != "mix" else "timm/resnet50.a1_in1k") in msg
    if "cache_dir" in kw:  # a hub model: where it was looked for and how to get it
        assert kw["cache_dir"] in msg and "download" in msg and e.value.__cause__ is None


def _toy_model(tmp_path: Path) -> tuple[str, Path]:
    return "toy/shape-resnet", cards.weights_path("shape-resnet")


def _timm_model(tmp_path: Path) -> tuple[str, Path]:
    import timm
    from timm.models import save_for_hf

    d = tmp_path / "timm-tiny"
    model = timm.create_model("resnet18", num_classes=3, layers=[1, 1, 1, 1], channels=[8, 8, 8, 8], stem_width=8)
    save_for_hf(model, str(d), model_args=dict(num_classes=3, layers=[1, 1, 1, 1], channels=[8, 8, 8, 8],
                                               stem_width=8), safe_serialization=True)
    return f"timm/{d}", d / "model.safetensors"


def _open_clip_model(tmp_path: Path) -> tuple[str, Path]:
    import json

    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 8, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8,
                                          "head_width": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    d = tmp_path / "oc-tiny"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**cfg).state_dict().items()},
              str(d / "open_clip_model.safetensors"))
    return f"open_clip/local-dir:{d}", d / "open_clip_model.safetensors"


def _hf_model(tmp_path: Path) -> tuple[str, Path]:
    from transformers import Dinov2Config, Dinov2Model

    d = tmp_path / "hf-tiny"
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=28, patch_size=14)).save_pretrained(d)
    return f"hf/{d}", d / "model.safetensors"


def _torch_model(tmp_path: Path) -> tuple[str, None]:
    return "torch/torch.nn:Flatten", None


def _diffusers_model(tmp_path: Path) -> tuple[str, Path]:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    d = tmp_path / "ddpm-tiny"
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[8, 8],
                       down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(d)
    return f"diffusers/{d}", d / "unet" / "diffusion_pytorch_model.safetensors"


def _mix_model(tmp_path: Path) -> tuple[str, Path]:
    spec, weights = _timm_model(tmp_path)
    return f"mix/0.7*{spec}+0.3*toy/shape-resnet@logits", weights


def _guided_diffusion_model(tmp_path: Path) -> tuple[str, Path]:
    from fiberbench.models.adm import ADMUNet, config_from_flags

    flags = dict(image_size=8, num_channels=32, channel_mult="1,1", num_res_blocks=1, attention_resolutions="4",
                 learn_sigma=True, resblock_updown=True)
    path = tmp_path / "adm-tiny.pt"
    torch.save(ADMUNet(config_from_flags(flags)).state_dict(), path)
    return "guided-diffusion/" + str(path) + "?" + "&".join(f"{k}={v}" for k, v in flags.items()), path


LOCAL_MODELS = {"toy": _toy_model, "timm": _timm_model, "open_clip": _open_clip_model, "hf": _hf_model,
                "torch": _torch_model, "diffusers": _diffusers_model, "mix": _mix_model,
                "guided-diffusion": _guided_diffusion_model}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_source_checksums_the_weights_behind_a_spec(source, tmp_path):
    """The store keys a run by the weights behind its specs: a checksum that changes with any weight byte (or
    ``None`` for a source with no weight file, where the key rests on the spec string alone)."""
    spec, weights = LOCAL_MODELS[source](tmp_path)
    digest = weights_checksum(spec)
    if weights is None:
        assert digest is None
        return
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest
    assert weights_checksum(spec) == digest
    if source == "toy":  # the shipped file: the checksum is its sha256 (never modified here)
        assert digest == "sha256:" + file_sha256(weights)
        return
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    weights.write_bytes(bytes(data))
    assert weights_checksum(spec) != digest
