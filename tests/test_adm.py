"""OpenAI's ADM (guided-diffusion) as a prior, offline: tiny random UNets of the same architecture code, saved as the
published checkpoints are (a plain state dict ``.pt``), loaded through ``guided-diffusion/`` specs; the full-size
published architecture checked on the meta device (no weights)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fiberbench as fb
from fiberbench.errors import ConfigError, InputError
from fiberbench.identity import file_sha256
from fiberbench.models import weights_checksum
from fiberbench.models.adm import ADMUNet, adm_scheduler, config_from_flags
from fiberbench.models.sources.guided_diffusion import PUBLISHED, parse_adm_name

# a tiny ADM: two levels (16 and 8 px), attention at 8 px, resampling in ResBlocks, learned sigma
TINY = dict(image_size=16, num_channels=32, channel_mult="1,2", num_res_blocks=1, attention_resolutions="8",
            num_head_channels=16, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True)
# the other branches: conv resampling, new attention order, class labels, no scale-shift norm, cosine schedule
TINY_COND = dict(image_size=16, num_channels=32, channel_mult="1,2", num_res_blocks=1, attention_resolutions="16,8",
                 num_heads=2, learn_sigma=True, resblock_updown=False, use_scale_shift_norm=False,
                 use_new_attention_order=True, class_cond=True, noise_schedule="cosine")


def query(flags: dict) -> str:
    return "&".join(f"{k}={v}" for k, v in flags.items())


def save_tiny(path: Path, flags: dict, seed: int = 0) -> ADMUNet:
    """A random ADM of ``flags`` saved as OpenAI saves theirs: ``torch.save(model.state_dict(), path)``."""
    torch.manual_seed(seed)
    model = ADMUNet(config_from_flags(flags)).eval()
    with torch.no_grad():  # the output convs start at zero in training; random here so outputs say something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(model.state_dict(), path)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("adm") / "tiny_adm.pt"
    return path, save_tiny(path, TINY)


@pytest.fixture(scope="module")
def tiny_prior(tiny):
    return fb.load_prior(f"guided-diffusion/{tiny[0]}?{query(TINY)}")


def test_checkpoint_round_trips_and_prior_is_the_network(tiny, tiny_prior):
    path, model = tiny
    prior = tiny_prior
    saved = torch.load(path, weights_only=True)
    loaded = prior.unet.state_dict()
    assert list(loaded) == list(saved)  # the same keys, in the same order
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert prior.sample_shape == (3, 16, 16) and prior.image_size == 16 and prior.variance_type == "learned_range"
    assert prior.card["preset"] == "fiber-imagenet" and prior.card["sampling"] == {"eta": 1.0}
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(613.0)
    with torch.no_grad():
        raw = model(x, torch.full((2,), 613.0))
    assert raw.shape == (2, 6, 16, 16) and float(raw.std()) > 1e-3
    eps, var = prior.model_outputs(x, t)
    assert torch.equal(eps, raw[:, :3]) and torch.equal(var, raw[:, 3:])
    assert torch.equal(prior.model_output(x, t), raw[:, :3])
    x0, eps_hat = prior.denoise(x, t, clamp=False)
    a, s = prior.alpha_sigma(t)
    assert torch.allclose(x0, (x - s * raw[:, :3]) / a, atol=1e-5) and torch.allclose(eps_hat, raw[:, :3], atol=1e-4)
    assert weights_checksum(f"guided-diffusion/{path}?{query(TINY)}") == "sha256:" + file_sha256(path)


def test_noise_schedules_are_guided_diffusions():
    """linear: np.linspace(1e-4, 0.02) in float64; cosine: betas_for_alpha_bar(cos^2), capped at 0.999."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ours = adm_scheduler(config_from_flags(TINY)).alphas_cumprod.double().numpy()
    assert np.allclose(ours, np.cumprod(1 - betas), rtol=1e-5, atol=1e-7)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    cos_b = np.array([min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999) for i in range(1000)])
    ours = adm_scheduler(config_from_flags(TINY_COND)).alphas_cumprod.double().numpy()
    assert np.allclose(ours, np.cumprod(1 - cos_b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t, s", [(500, 499), (999, 749), (250, 50)])
def test_ancestral_step_is_guided_diffusions_p_sample(tiny_prior, t, s):
    """eta = 1 is guided-diffusion's p_sample with learned-range variance, on its respaced betas for strided grids:
    mean = posterior mean of the clipped x0, log var = f log beta + (1 - f) log beta_tilde, f = (v + 1) / 2."""
    prior = tiny_prior
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    x0, eps = prior.denoise(x, t)
    out = prior.step(x, x0, eps, t, s, eta=1.0, noise=z)
    # guided-diffusion's formulas in float64 (SpacedDiffusion: beta = 1 - abar_t / abar_s on the kept steps)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    beta = 1 - abar[t] / abar[s]
    beta_tilde = beta * (1 - abar[s]) / (1 - abar[t])
    with torch.no_grad():
        raw = prior.unet(x, torch.full((2,), float(t))).double()
    x0_ref = ((x.double() - math.sqrt(1 - abar[t]) * raw[:, :3]) / math.sqrt(abar[t])).clamp(-1, 1)
    mean = (beta * math.sqrt(abar[s]) / (1 - abar[t])) * x0_ref \
        + ((1 - abar[s]) * math.sqrt(abar[t] / abar[s]) / (1 - abar[t])) * x.double()
    frac = (raw[:, 3:] + 1) / 2
    std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(beta_tilde)))
    assert torch.allclose(out.double(), mean + std * z.double(), atol=2e-5)
    # the noise term is the learned one, not the posterior variance of plain DDPM (the two bounds beta and
    # beta_tilde differ by a factor (1 - abar_t) / (1 - abar_s), which only a strided step makes large)
    fixed = prior.step(x, x0, eps, t, s, eta=0.999999, noise=z)
    if t - s > 1:
        assert float((out - fixed).abs().max()) > 1e-3


def test_samples_unguided_and_ndtm_with_ancestral_steps(tiny_prior, shape_resnet):
    prior = tiny_prior
    calls = []
    hook = prior.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        ref, _ = fb.toy.references(1, seed=0)
        res = fb.sample_fiber(prior, shape_resnet, ref, n=2, method="unguided", steps=5, seed=0, progress=False)
        # the card's eta = 1 (ancestral, learned variance); one network call a step: the step reuses the
        # variance output of the denoiser call it follows
        assert len(calls) == 5
        assert res.images.shape == (2, 3, 16, 16) and torch.isfinite(res.images).all()
        assert 0 <= float(res.images.min()) and float(res.images.max()) <= 1
        again = fb.sample_fiber(prior, shape_resnet, ref, n=2, method="unguided", steps=5, seed=0, progress=False,
                                eta=0.0)
        assert float((again.images - res.images).abs().max()) > 1e-3  # eta 1 was not the deterministic DDIM
        calls.clear()
        res = fb.sample_fiber(prior, shape_resnet, ref, n=2, method="ndtm", steps=3, inner_steps=2, seed=0,
                              progress=False)
        assert res.config["preset"] == "fiber-imagenet"
        assert res.images.shape == (2, 3, 16, 16) and torch.isfinite(res.images).all()
        assert torch.isfinite(res.feature_distance).all() and res.status == ["ok", "ok"]
    finally:
        hook.remove()


def test_class_conditional_checkpoint_and_labels(tmp_path):
    path = tmp_path / "cond.pt"
    model = save_tiny(path, TINY_COND, seed=1)
    spec = f"guided-diffusion/{path}?{query(TINY_COND)}"
    with pytest.raises(ConfigError, match="class_label="):
        fb.load_prior(spec)
    with pytest.raises(ConfigError, match=r"class_label must be an integer in \[0, 1000\)"):
        fb.load_prior(spec, class_label=1000)
    prior = fb.load_prior(spec, class_label=207)
    assert prior.card["class_label"] == 207 and prior.unet.label_emb.weight.shape == (1000, 128)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = model(x, torch.tensor([300.0]), torch.tensor([207]))
        other = model(x, torch.tensor([300.0]), torch.tensor([3]))
    assert torch.equal(prior.model_outputs(x, torch.tensor(300.0))[0], raw[:, :3])
    assert float((raw - other).abs().max()) > 1e-4
    keys = list(torch.load(path, weights_only=True))
    assert "input_blocks.2.0.op.weight" in keys and "output_blocks.1.2.conv.weight" in keys  # conv resampling


def test_published_names_resolve_in_the_folder_and_bad_checkpoints_fail(tiny, tmp_path, monkeypatch):
    path, _ = tiny
    folder = tmp_path / "gd"
    folder.mkdir()
    (folder / "256x256_diffusion_uncond.pt").write_bytes(path.read_bytes())
    monkeypatch.setenv("FIBERBENCH_GUIDED_DIFFUSION", str(folder))
    # the published name, from $FIBERBENCH_GUIDED_DIFFUSION: the tiny weights do not fit its published flags ...
    with pytest.raises(ConfigError, match="does not fit the ADM flags") as e:
        fb.load_prior("guided-diffusion/256x256_diffusion_uncond")
    assert "shape mismatches" in str(e.value)
    # ... and do with the tiny flags given on top of the name
    prior = fb.load_prior(f"guided-diffusion/256x256_diffusion_uncond?{query(TINY)}")
    assert prior.card["checkpoint"] == str(folder / "256x256_diffusion_uncond.pt")
    assert weights_checksum("guided-diffusion/256x256_diffusion_uncond") == "sha256:" + file_sha256(path)
    with pytest.raises(ConfigError) as e:
        fb.load_prior("guided-diffusion/256x256_diffusion", cache_dir=str(tmp_path / "empty"), class_label=1)
    msg = str(e.value)
    assert str(tmp_path / "empty" / "256x256_diffusion.pt") in msg and e.value.__cause__ is None
    assert "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion.pt" in msg
    with pytest.raises(ConfigError, match="checkpoint file .* does not exist"):
        fb.load_prior(f"guided-diffusion/{tmp_path / 'nope.pt'}?{query(TINY)}")
    # a pickle that would run code is refused, never executed
    marker = tmp_path / "pwned"
    state = torch.load(path, weights_only=True)
    state["evil"] = _Evil(str(marker))
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="refused to load"):
        fb.load_prior(f"guided-diffusion/{tmp_path / 'evil.pt'}?{query(TINY)}")
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_spec_syntax_errors_before_loading():
    assert parse_adm_name("/x/256x256_diffusion_uncond.pt").published == "256x256_diffusion_uncond"
    ref = parse_adm_name("/x/ft.pt?256x256_diffusion&class_cond=False&use_fp16=0")
    assert ref.published == "256x256_diffusion" and ref.flags["class_cond"] is False and ref.flags["use_fp16"] is False
    assert ref.flags["num_head_channels"] == 64 and ref.file == Path("/x/ft.pt")
    for bad, match in [("256x256_difusion_uncond", "did you mean '256x256_diffusion_uncond'"),
                       ("/x/model.pt", "architecture is unknown"),
                       ("/x/model.pt?image_siz=64", "did you mean 'image_size'"),
                       ("/x/model.pt?image_size=sixty", "is not a int"),
                       ("/x/model.pt?image_size=48&num_channels=32", "no default channel_mult"),
                       ("/x/model.pt?image_size=64&num_channels=48", "not multiples of 32")]:
        with pytest.raises(ConfigError, match=match):
            fb.models.check_spec(f"guided-diffusion/{bad}", "prior")
    with pytest.raises(ConfigError, match="not a feature extractor"):
        fb.models.check_spec("guided-diffusion/256x256_diffusion_uncond", "extractor")


# landmarks of the published 256x256 models, derived by hand from their flags (channel_mult 1,1,2,2,4,4 x 256;
# attention at 32, 16, 8 px = levels 3, 4, 5; two ResBlocks a level, resampling by ResBlocks; learned sigma)
LANDMARKS_256 = {
    "time_embed.0.weight": (1024, 256), "time_embed.2.weight": (1024, 1024),
    "input_blocks.0.0.weight": (256, 3, 3, 3),
    "input_blocks.1.0.emb_layers.1.weight": (512, 1024),  # scale-shift norm: 2 x 256
    "input_blocks.3.0.in_layers.2.weight": (256, 256, 3, 3),  # the first down-sampling ResBlock
    "input_blocks.7.0.skip_connection.weight": (512, 256, 1, 1),  # level 2: 256 -> 512
    "input_blocks.10.1.qkv.weight": (1536, 512, 1), "input_blocks.10.1.proj_out.weight": (512, 512, 1),
    "input_blocks.17.1.norm.weight": (1024,),
    "middle_block.1.qkv.weight": (3072, 1024, 1), "middle_block.2.out_layers.3.weight": (1024, 1024, 3, 3),
    "output_blocks.0.0.in_layers.0.weight": (2048,),  # 1024 + the 1024 skip
    "output_blocks.2.2.emb_layers.1.weight": (2048, 1024),  # the first up-sampling ResBlock, after attention
    "output_blocks.17.0.skip_connection.weight": (256, 512, 1, 1),
    "out.2.weight": (6, 256, 3, 3), "out.2.bias": (6,),
}


def test_published_256_architecture_on_the_meta_device():
    """The full-size 256x256 models, built from their published flags without weights: the parameter count of the
    published 256x256_diffusion_uncond (552.8 M) and the names and shapes its checkpoint's keys have."""
    with torch.device("meta"):
        uncond = ADMUNet(config_from_flags(PUBLISHED["256x256_diffusion_uncond"]))
        cond = ADMUNet(config_from_flags(PUBLISHED["256x256_diffusion"]))
    sd = uncond.state_dict()
    assert sum(p.numel() for p in uncond.parameters()) == 552_814_086
    assert sum(p.numel() for p in cond.parameters()) == 552_814_086 + 1000 * 1024  # + label_emb
    assert len(uncond.input_blocks) == len(uncond.output_blocks) == 18
    for key, shape in LANDMARKS_256.items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(k.endswith("qkv.weight") for k in sd) == 2 * 3 + 1 + 3 * 3
    assert not any(".op." in k or ".conv." in k for k in sd)  # resblock_updown: no conv resampling layers
    assert "label_emb.weight" not in sd and tuple(cond.state_dict()["label_emb.weight"].shape) == (1000, 1024)
    c64 = config_from_flags(PUBLISHED["64x64_diffusion"])
    assert c64.noise_schedule == "cosine" and c64.use_new_attention_order and c64.attention_ds() == (2, 4, 8)


def test_mixed_precision_and_checkpointing_keep_values(tiny):
    """torch_dtype casts only the torso's convolutions (OpenAI's use_fp16); gradient checkpointing changes memory,
    not values or gradients."""
    path, _ = tiny
    spec = f"guided-diffusion/{path}?{query(TINY)}"
    plain = fb.load_prior(spec)
    ckpt = fb.load_prior(spec, gradient_checkpointing=True)
    half = fb.load_prior(spec, torch_dtype="bfloat16")
    assert half.unet.input_blocks[1][0].in_layers[2].weight.dtype == torch.bfloat16
    assert half.unet.out[2].weight.dtype == half.unet.time_embed[0].weight.dtype == torch.float32
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(400.0)
    grads, outs = [], []
    for p in (plain, ckpt):
        xt = x.clone().requires_grad_(True)
        out = p.model_output(xt, t)
        out.pow(2).sum().backward()
        grads.append(xt.grad)
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1]) and torch.allclose(grads[0], grads[1], atol=1e-6)
    o16 = half.model_output(x, t)
    assert o16.dtype == torch.float32 and float((o16 - outs[0]).norm() / outs[0].norm()) < 0.05
