"""The real-model zoo, offline: tiny random models of the *same classes* as the hub models
(timm, open_clip, transformers, diffusers), saved the way a hub snapshot is laid out and
loaded through the public spec strings. HF_HUB_OFFLINE=1 is set in conftest.py.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fiberbench as fb
from fiberbench.errors import ConfigError

# --------------------------------------------------------------------------- helpers


def hub_snapshot(cache: Path, repo_id: str, src: Path) -> Path:
    """Lay ``src`` out as the Hugging Face cache does: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = repo_dir / "snapshots" / sha
    if snap.exists():
        shutil.rmtree(snap)
    shutil.copytree(src, snap)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha)
    return snap


def make_test_image(h: int = 70, w: int = 90, seed: int = 0):
    """A smooth natural-looking test image: a shapes-world render upscaled -> (PIL uint8, [1,3,h,w] tensor)."""
    from PIL import Image

    img = fb.toy.render(fb.toy.sample_factors(1, seed=seed))[0]
    arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr).resize((w, h), Image.BICUBIC)
    t = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float()[None] / 255.0
    return pil, t


def grad_norm(ex, h: int = 45, w: int = 61) -> float:
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ex(x).pow(2).sum().backward()
    return float(x.grad.norm())


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min())


# --------------------------------------------------------------------------- timm

TIMM_ARGS = dict(num_classes=7, layers=[1, 1, 1, 1], channels=[8, 16, 16, 16], stem_width=8)


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("resnet18", **TIMM_ARGS,
                              pretrained_cfg_overlay=dict(input_size=(3, 48, 48), crop_pct=0.9,
                                                          interpolation="bicubic"))
    d = tmp_path_factory.mktemp("timm") / "tiny-resnet"
    save_for_hf(model, str(d), model_args=TIMM_ARGS, safe_serialization=True)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    return d


def test_timm_layers_shapes_and_gradients(timm_dir):
    logits = fb.load_extractor(f"timm/{timm_dir}")
    pre = fb.load_extractor(f"timm/{timm_dir}@pre_logits")
    mid = fb.load_extractor(f"timm/{timm_dir}@layer3")
    x = torch.rand(3, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    lo, pr, md = logits(x), pre(x), mid(x)
    assert lo.shape == (3, 7) and pr.shape == (3, 16)
    # input 48 -> stem /4 -> layer2 /2 -> layer3 /2: 16 channels x 3 x 3
    assert md.shape == (3, 16 * 3 * 3)
    head = logits.classifier()
    assert torch.allclose(pr @ head.weight.T + head.bias, lo, atol=1e-5)  # pre_logits really feed the head
    for ex in (logits, pre, mid):
        assert grad_norm(ex) > 1e-6
    assert logits.input_size == 48 and logits.resize == "shortest" and logits.resize_size == 53  # floor(48/0.9)


def test_timm_preprocessing_matches_timm_transform(timm_dir):
    """Our in-graph resize/crop/normalise vs timm's own eval transform on a PIL image."""
    import timm
    from timm.data import create_transform, resolve_data_config

    ex = fb.load_extractor(f"timm/{timm_dir}")
    model = timm.create_model(f"local-dir:{timm_dir}", pretrained=True).eval()
    tf = create_transform(**resolve_data_config({}, model=model))
    pil, t = make_test_image()
    ref = tf(pil)[None]
    ours = ex.preprocess(t)
    assert ours.shape == ref.shape == (1, 3, 48, 48)
    # PIL and torch bicubic antialias kernels differ slightly; PIL also rounds to uint8.
    # Measured: mean 0.0009, max 0.017 (normalised units), feature cosine 0.999997.
    err = (ours - ref).abs()
    assert float(err.mean()) < 0.005 and float(err.max()) < 0.08, (float(err.mean()), float(err.max()))
    with torch.no_grad():
        assert cos(ex(t), model(ref)) > 0.9999


def test_timm_hub_id_from_cache_and_missing(timm_dir, tmp_path):
    cache = tmp_path / "hub"
    hub_snapshot(cache, "fbtest/tiny-resnet", timm_dir)
    ex = fb.load_extractor("timm/hf-hub:fbtest/tiny-resnet", cache_dir=str(cache))
    ref = fb.load_extractor(f"timm/{timm_dir}")
    x = torch.rand(2, 3, 48, 48)
    assert torch.equal(ex(x), ref(x))
    with pytest.raises(ConfigError) as e:
        fb.load_extractor("timm/resnet50.a1_in1k", cache_dir=str(tmp_path / "empty"))
    msg = str(e.value)
    assert "timm/resnet50.a1_in1k" in msg and str(tmp_path / "empty") in msg
    assert "huggingface-cli download timm/resnet50.a1_in1k" in msg and e.value.__cause__ is None
    with pytest.raises(ConfigError, match="unknown timm model"):
        fb.load_extractor("timm/resnet5o.a1_in1k", pretrained=False)


# --------------------------------------------------------------------------- open_clip

CLIP_CFG = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CLIP_PRE = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic", "resize_mode": "shortest"}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**CLIP_CFG)
    d = tmp_path_factory.mktemp("oc") / "tiny-clip"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_CFG, "preprocess_cfg": CLIP_PRE}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return d


def test_open_clip_scorer_matches_open_clip_transforms(clip_dir):
    """ClipModel records its preprocessing; its embedding equals open_clip's own pipeline on a PIL image."""
    import open_clip

    clip = fb.load_clip(f"open_clip/local-dir:{clip_dir}")
    assert clip.preprocess_cfg == {"size": 32, **CLIP_PRE}
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    pil, t = make_test_image()
    with torch.no_grad():
        ref = F.normalize(model.eval().encode_image(preprocess(pil)[None]), dim=-1)
    ours = clip.embed_images(t)
    assert ours.shape == (1, 16)
    assert cos(ours, ref) > 0.9999  # PIL vs torch bicubic + uint8 rounding; measured 0.99999996
    txt = clip.embed_texts(["a red circle", "a blue square"])
    assert txt.shape == (2, 16) and torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_open_clip_extractor_layers_and_hub_cache(clip_dir, tmp_path):
    cache = tmp_path / "hub"
    hub_snapshot(cache, "fbtest/tiny-clip", clip_dir)
    emb = fb.load_extractor("open_clip/hf-hub:fbtest/tiny-clip", cache_dir=str(cache))
    plain = fb.load_extractor(f"open_clip/{clip_dir}@embed")  # a plain folder works too
    x = torch.rand(2, 3, 40, 52, generator=torch.Generator().manual_seed(0))
    assert emb(x).shape == (2, 16) and torch.equal(emb(x), plain(x))
    # module hooks run encode_image (the CLIP forward would need text as well)
    blk = fb.load_extractor(f"open_clip/local-dir:{clip_dir}@visual.transformer.resblocks.0")
    assert blk(x).shape == (2, (1 + 16) * 32)  # CLS + 4x4 patches, width 32
    for ex in (emb, blk):
        assert grad_norm(ex) > 1e-6
    txt = fb.load_extractor(f"open_clip/local-dir:{clip_dir}@transformer.resblocks.0")
    with pytest.raises(ConfigError, match="not run by the forward pass"):
        txt(x)
    with pytest.raises(ConfigError) as e:
        fb.load_clip("open_clip/hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                     cache_dir=str(tmp_path / "empty"))
    assert "huggingface-cli download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in str(e.value)
    assert str(tmp_path / "empty") in str(e.value)


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     image_size=28, patch_size=14))
    d = tmp_path_factory.mktemp("hf") / "tiny-dinov2"
    model.save_pretrained(d)
    # DINOv2's own processor settings, scaled down: short side 32, centre crop 28, bicubic, ImageNet stats
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, resample=3,
                      do_convert_rgb=True, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(d)
    return d


def test_hf_dinov2_outputs_preprocessing_gradients(dinov2_dir):
    from transformers import AutoImageProcessor, Dinov2Model

    ex = fb.load_extractor(f"hf/{dinov2_dir}")
    assert ex.spec.endswith("@pooled") and (ex.input_size, ex.resize, ex.resize_size) == (28, "shortest", 32)
    model = Dinov2Model.from_pretrained(dinov2_dir).eval()
    proc = AutoImageProcessor.from_pretrained(dinov2_dir)
    pil, t = make_test_image()
    ref_in = proc(pil, return_tensors="pt").pixel_values
    ours_in = ex.preprocess(t)
    # measured: mean 0.0010, max 0.013 (normalised units), pooled cosine 0.999997
    err = (ours_in - ref_in).abs()
    assert float(err.mean()) < 0.005 and float(err.max()) < 0.08, (float(err.mean()), float(err.max()))
    with torch.no_grad():
        ref = model(pixel_values=ref_in)
    assert cos(ex(t), ref.pooler_output) > 0.9999
    cls = fb.load_extractor(f"hf/{dinov2_dir}@cls")
    x = torch.rand(2, 3, 37, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cls(x), ex(x))  # DINOv2's pooler output is the (layer-normed) CLS token
    mean = fb.load_extractor(f"hf/{dinov2_dir}@mean")
    layer = fb.load_extractor(f"hf/{dinov2_dir}@encoder.layer.0")
    assert ex(x).shape == mean(x).shape == (2, 32)
    assert layer(x).shape == (2, (1 + 4) * 32)  # CLS + 2x2 patches
    for e in (ex, mean, layer):
        assert grad_norm(e) > 1e-6


def test_hf_classifier_hub_cache_and_missing(dinov2_dir, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fish"},
                    label2id={"cat": 0, "dog": 1, "fish": 2})
    d = tmp_path / "vit"
    ViTForImageClassification(cfg).save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}, resample=2).save_pretrained(d)
    cache = tmp_path / "hub"
    hub_snapshot(cache, "fbtest/tiny-vit", d)
    ex = fb.load_extractor("hf/fbtest/tiny-vit", cache_dir=str(cache))
    assert ex.spec == "hf/fbtest/tiny-vit@logits" and ex.classes == ["cat", "dog", "fish"]
    x = torch.rand(2, 3, 32, 32)
    model = ViTForImageClassification.from_pretrained(d).eval()
    with torch.no_grad():  # squash resize is a no-op at 32x32: logits must be identical
        ref = model(pixel_values=(x - 0.5) / 0.5).logits
    assert torch.allclose(ex(x), ref, atol=1e-5)
    with pytest.raises(ConfigError) as e:
        fb.load_extractor("hf/facebook/dinov2-small", cache_dir=str(tmp_path / "empty"))
    msg = str(e.value)
    assert "hf/facebook/dinov2-small" in msg and "huggingface-cli download facebook/dinov2-small" in msg


# --------------------------------------------------------------------------- torch modules

USER_MODULE = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, width=8, classes=5):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(width * 4, classes)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))

def build(width=8):
    torch.manual_seed(0)
    return Net(width=width)
'''


def test_torch_user_module(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    (tmp_path / "fb_user_model.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fb_user_model", None)
    import fb_user_model

    torch.manual_seed(3)
    trained = fb_user_model.Net(width=4)
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    ex = fb.load_extractor("torch/fb_user_model:build", model_kwargs={"width": 4}, input_size=16, mean=[0.5] * 3,
                           std=[0.25] * 3, checkpoint=str(tmp_path / "w.safetensors"))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ex(x), trained((x - 0.5) / 0.25), atol=1e-6)
    body = fb.load_extractor("torch/fb_user_model:Net@body", model_kwargs={"width": 4})
    assert body(x).shape == (2, 16) and grad_norm(ex) > 1e-6
    with pytest.raises(ConfigError, match="did you mean"):
        fb.load_extractor("torch/fb_user_model:biuld")
    with pytest.raises(ConfigError, match="cannot import"):
        fb.load_extractor("torch/no_such_module_xyz:build")


# --------------------------------------------------------------------------- diffusers priors


def _clip_tokenizer(d: Path, max_len: int = 16):
    """A tiny byte-level BPE CLIPTokenizer from vocab/merges files written here."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars] + ["ph", "ot", "oto</w>", "photo</w>"]:
        vocab.setdefault(c, len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\np h\no t\not o</w>\nph oto</w>\n")
    return CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"), model_max_length=max_len)


def _clip_text(tok, cls, **kw):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw))


def _vae(latent: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                         latent_channels=latent, norm_num_groups=8, sample_size=16)


def build_ddpm(d: Path, safe: bool = True) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[8, 16],
                       down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                       up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=8, attention_head_dim=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
        d, safe_serialization=safe)


def build_sd(d: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=[16, 32], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)
    tok = _clip_tokenizer(d.parent / f"{d.name}-tok")
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=_vae(), text_encoder=_clip_text(tok, CLIPTextModel), tokenizer=tok, unet=unet,
                            scheduler=sched, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(d)


DIT_LABELS = ["tench, Tinca tinca", "goldfish", "great white shark", "d3", "d4", "d5", "d6", "d7", "d8", "d9"]


def build_dit(d: Path) -> None:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8)
    DiTPipeline(transformer=tr, vae=_vae(), scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(d)
    index = json.loads((d / "model_index.json").read_text())  # facebook/DiT-XL-2-256 keeps its labels here
    index["id2label"] = {str(i): n for i, n in enumerate(DIT_LABELS)}
    (d / "model_index.json").write_text(json.dumps(index))


def build_sd3(d: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                               caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
    toks = [_clip_tokenizer(d.parent / f"{d.name}-tok{i}") for i in range(2)]
    encs = [_clip_text(t, CLIPTextModelWithProjection, projection_dim=16) for t in toks]
    pieces = ["\u2581", "a", "p", "h", "o", "t", "\u2581a", "\u2581photo"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -float(i)) for i, p in enumerate(pieces)]
    t5tok = T5Tokenizer(vocab=vocab,
                        extra_ids=0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    vae = _vae(4)
    vae.register_to_config(scaling_factor=1.5, shift_factor=0.1)
    StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                             text_encoder=encs[0], tokenizer=toks[0], text_encoder_2=encs[1], tokenizer_2=toks[1],
                             text_encoder_3=t5, tokenizer_3=t5tok).save_pretrained(d)


def build_ldm(d: Path) -> None:
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vq = VQModel(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                 latent_channels=3, num_vq_embeddings=32, vq_embed_dim=3, norm_num_groups=8, sample_size=16)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[8, 16],
                       down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                       up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=8, attention_head_dim=8)
    LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(d)


BUILDERS = {"ddpm": build_ddpm, "sd": build_sd, "dit": build_dit, "sd3": build_sd3, "ldm": build_ldm}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    out = {}
    for name, build in BUILDERS.items():
        build(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def tiny_extractor(timm_dir):
    return fb.load_extractor(f"timm/{timm_dir}@pre_logits")


EXPECTED = {  # (kind, latent, denoiser, sample_shape, image_size)
    "ddpm": ("diffusion", False, "UNet2DModel", (3, 16, 16), 16),
    "sd": ("diffusion", True, "UNet2DConditionModel", (4, 8, 8), 16),
    "dit": ("diffusion", True, "DiTTransformer2DModel", (4, 8, 8), 16),
    "sd3": ("flow", True, "SD3Transformer2DModel", (4, 8, 8), 16),
    "ldm": ("diffusion", True, "UNet2DModel", (3, 8, 8), 16),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_diffusers_prior_kinds_sample_a_fiber(pipes, tiny_extractor, name):
    prior = fb.load_prior(f"diffusers/{pipes[name]}")
    kind, latent, den, shape, size = EXPECTED[name]
    assert (prior.kind, prior.latent, type(prior.unet).__name__) == (kind, latent, den)
    assert prior.sample_shape == shape and prior.image_size == size
    assert type(prior).__name__ == {"ddpm": "DiffusersPixelPrior", "ldm": "VQLatentPrior"}.get(name, "LatentPrior")
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    t = prior.schedule(4).times[1]
    out = prior.model_output(x, t)
    assert out.shape == x.shape  # DiT's learned-sigma channels are cut
    ref = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    res = fb.sample_fiber(prior, tiny_extractor, ref, n=1, steps=2, seed=0, progress=False)
    assert res.images.shape == (1, 3, size, size) and res.status == ["ok"]
    assert torch.isfinite(res.images).all() and torch.isfinite(res.feature_distance).all()
    assert float(res.images.min()) >= 0 and float(res.images.max()) <= 1
    # the guided step really back-propagates through decode (VAE) and the denoiser into x_t
    x_t = x[:1].clone().requires_grad_(True)
    x0, _ = prior.denoise(x_t, t)
    tiny_extractor(prior.decode(x0)).pow(2).sum().backward()
    assert float(x_t.grad.norm()) > 0


def test_sd_prompt_conditioning_is_the_pipelines(pipes):
    """The empty prompt's embedding is exactly the text encoder's output on the padded empty prompt."""
    from transformers import CLIPTextModel, CLIPTokenizer

    d = pipes["sd"]
    prior = fb.load_prior(f"diffusers/{d}")
    tok = CLIPTokenizer.from_pretrained(d / "tokenizer")
    enc = CLIPTextModel.from_pretrained(d / "text_encoder").eval()
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        emb = enc(ids.input_ids)[0]
    assert prior.cond["encoder_hidden_states"].shape == (1, 16, 16)
    assert torch.allclose(prior.cond["encoder_hidden_states"], emb, atol=1e-6)
    photo = fb.load_prior(f"diffusers/{d}", prompt="a photo")
    assert float((photo.cond["encoder_hidden_states"] - emb).abs().max()) > 1e-3
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500.0)
    cfg = fb.load_prior(f"diffusers/{d}", prompt="a photo", guidance_scale=3.0)
    u, c = prior.model_output(x, t), photo.model_output(x, t)
    assert torch.allclose(cfg.model_output(x, t), u + 3.0 * (c - u), atol=1e-5)
    assert "class_labels" not in prior.cond


def test_dit_class_labels(pipes):
    d = pipes["dit"]
    assert int(fb.load_prior(f"diffusers/{d}").cond["class_labels"]) == 10  # null class = unconditional
    gold = fb.load_prior(f"diffusers/{d}", class_label="goldfish")
    assert int(gold.cond["class_labels"]) == 1 and gold.card["class_label"] == 1
    assert int(fb.load_prior(f"diffusers/{d}", class_label="tench").cond["class_labels"]) == 0
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500.0)
    shark = fb.load_prior(f"diffusers/{d}", class_label=2)
    assert float((gold.model_output(x, t) - shark.model_output(x, t)).abs().max()) > 1e-4
    with pytest.raises(ConfigError, match="class_label must be in"):
        fb.load_prior(f"diffusers/{d}", class_label=10)
    with pytest.raises(ConfigError, match="unknown class label"):
        fb.load_prior(f"diffusers/{d}", class_label="goldfsh")
    with pytest.raises(ConfigError, match="not class-conditional"):
        fb.load_prior(f"diffusers/{pipes['ddpm']}", class_label=1)


def test_sd3_text_conditioning_and_t5(pipes):
    d = pipes["sd3"]
    prior = fb.load_prior(f"diffusers/{d}")
    # CLIP-L and CLIP-G token states (16 + 16 padded to 32) then T5's 256 tokens: sequence 16 + 256
    assert prior.cond["encoder_hidden_states"].shape == (1, 16 + 256, 32)
    assert prior.cond["pooled_projections"].shape == (1, 32)
    no_t5 = fb.load_prior(f"diffusers/{d}", drop_t5=True)
    assert torch.equal(no_t5.cond["encoder_hidden_states"][:, 16:], torch.zeros(1, 256, 32))
    assert float(prior.cond["encoder_hidden_states"][:, 16:].abs().max()) > 0
    assert torch.equal(no_t5.cond["pooled_projections"], prior.cond["pooled_projections"])
    # the latent convention of SD3's VAE: (mean - shift) * scale, decode inverts it
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = prior.encode(img)
        ref = (prior.vae.encode(img * 2 - 1).latent_dist.mean - 0.1) * 1.5
        assert torch.allclose(z, ref, atol=1e-6)
        dec = prior.vae.decode(z / 1.5 + 0.1).sample
        assert torch.allclose(prior.decode(z), ((dec + 1) / 2).clamp(0, 1), atol=1e-6)


def test_memory_options_keep_values(pipes):
    """Gradient checkpointing and VAE slicing change memory, not values; bf16 weights stay close."""
    d = pipes["sd"]
    plain = fb.load_prior(f"diffusers/{d}", vae_slicing=False)
    ckpt = fb.load_prior(f"diffusers/{d}", gradient_checkpointing=True)
    assert ckpt.unet.is_gradient_checkpointing and ckpt.vae.use_slicing and not plain.vae.use_slicing
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(300.0)
    grads, imgs = [], []
    for p in (plain, ckpt):
        xt = x.clone().requires_grad_(True)
        x0, _ = p.denoise(xt, t)
        img = p.decode(x0)
        img.pow(2).sum().backward()
        grads.append(xt.grad)
        imgs.append(img.detach())
    assert torch.allclose(imgs[0], imgs[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    bf = fb.load_prior(f"diffusers/{d}", torch_dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    o32, o16 = plain.model_output(x, t), bf.model_output(x, t).float()
    assert float((o16 - o32).norm() / o32.norm()) < 0.05


def test_diffusers_missing_weights_and_safe_loading(tmp_path):
    with pytest.raises(ConfigError) as e:
        fb.load_prior("diffusers/google/ddpm-cifar10-32", cache_dir=str(tmp_path / "empty"))
    msg = str(e.value)
    assert "diffusers/google/ddpm-cifar10-32" in msg and str(tmp_path / "empty") in msg
    assert "huggingface-cli download google/ddpm-cifar10-32" in msg and e.value.__cause__ is None
    with pytest.raises(ConfigError, match="no model_index.json"):
        fb.load_prior(f"diffusers/{tmp_path}")
    # a pickle checkpoint (.bin) loads only as plain weights (weights_only=True) ...
    build_ddpm(tmp_path / "bin", safe=False)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").exists()
    prior = fb.load_prior(f"diffusers/{tmp_path / 'bin'}")
    assert prior.sample_shape == (3, 16, 16)
    # ... and a pickle that would run code is refused, never executed
    marker = tmp_path / "pwned"
    evil = tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(evil, weights_only=True)
    state["evil"] = _Evil(str(marker))
    torch.save(state, evil)
    with pytest.raises(ConfigError):
        fb.load_prior(f"diffusers/{tmp_path / 'bin'}")
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_diffusers_hub_id_from_cache(pipes, tiny_extractor, tmp_path):
    cache = tmp_path / "hub"
    hub_snapshot(cache, "fbtest/tiny-ddpm", pipes["ddpm"])
    prior = fb.load_prior("diffusers/fbtest/tiny-ddpm", cache_dir=str(cache))
    local = fb.load_prior(f"diffusers/{pipes['ddpm']}")
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(prior.model_output(x, torch.tensor(10.0)), local.model_output(x, torch.tensor(10.0)))
    assert prior.spec == "diffusers/fbtest/tiny-ddpm"


# --------------------------------------------------------------------------- the curated list


def test_list_models_real_is_curated(capsys):
    from fiberbench.models import REAL_MODELS

    specs = [m["spec"] for m in REAL_MODELS]
    assert len(specs) == len(set(specs))
    for m in REAL_MODELS:
        assert set(m) >= {"spec", "kind", "for", "size"} and m["kind"] in ("extractor", "clip", "prior")
        s = fb.parse_spec(m["spec"])
        assert s.source in ("timm", "open_clip", "hf", "diffusers", "guided-diffusion")
        fb.models.check_spec(m["spec"], m["kind"])  # every curated spec parses for its kind (no weights needed)
    import open_clip
    import timm

    for m in REAL_MODELS:  # every timm / open_clip name exists in the installed library
        s = fb.parse_spec(m["spec"])
        if s.source == "timm":
            assert timm.is_model(s.name.split(".")[0]) and s.name in timm.list_pretrained(s.name), s.name
        if s.source == "open_clip" and not s.name.startswith("hf-hub:"):
            arch, tag = s.name.split(":")
            assert (arch, tag) in open_clip.list_pretrained(), s.name
    from fiberbench.cli import main

    assert main(["list-models", "--real", "--kind", "prior"]) == 0
    out = capsys.readouterr().out
    assert "diffusers/google/ddpm-cifar10-32" in out and "timm/" not in out
    assert sum(line.startswith(("diffusers/", "guided-diffusion/")) for line in out.splitlines()) == \
        sum(m["kind"] == "prior" for m in REAL_MODELS)


# --------------------------------------------------------------------------- learned variance, gray priors


def build_ddpm_learned(d: Path) -> None:
    """A pixel DDPM whose UNet outputs epsilon and a learned-range variance (6 channels), IDDPM-style."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=[8, 16],
                       down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                       norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
                 ).save_pretrained(d)


@pytest.mark.parametrize("t, s", [(10, 9), (999, 749), (400, 0)])
def test_learned_variance_step_is_diffusers_ddpm_step(tmp_path, t, s):
    """eta = 1 on a learned_range UNet is DDPMScheduler(variance_type="learned_range").step on the same output and
    noise, on a consecutive and on strided steps (custom timesteps: the respaced betas)."""
    from diffusers import DDPMScheduler

    build_ddpm_learned(tmp_path / "ddpm")
    prior = fb.load_prior(f"diffusers/{tmp_path / 'ddpm'}")
    assert prior.variance_type == "learned_range" and prior.card["variance"] == "learned_range"
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sched = DDPMScheduler.from_pretrained(tmp_path / "ddpm" / "scheduler")
    if t - s > 1:
        sched.set_timesteps(timesteps=[t, s])
    with torch.no_grad():
        raw = prior.unet(x, torch.tensor([float(t)] * 2)).sample
        ref = sched.step(raw, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    x0, eps = prior.denoise(x, t)
    ours = prior.step(x, x0, eps, t, s, 1.0, z)
    assert torch.allclose(ours, ref, atol=2e-5), float((ours - ref).abs().max())
    prior.variance_memo = None  # not stepping from the denoised state: one more network call, the same step
    assert torch.allclose(prior.step(x, x0, eps, t, s, 1.0, z), ours, atol=1e-6)
    # the learned variance: frac log beta + (1 - frac) log beta_tilde of the step, frac = (v + 1) / 2
    a_t, s_t = prior.alpha_sigma(t)
    a_s, s_s = prior.alpha_sigma(s)
    beta = 1 - (a_t / a_s) ** 2
    frac = (raw[:, 3:] + 1) / 2
    std = torch.exp(0.5 * (frac * beta.log() + (1 - frac) * (beta * s_s ** 2 / s_t ** 2).log()))
    assert torch.allclose(ours - prior.step(x, x0, eps, t, s, 1.0, torch.zeros_like(z)), std * z, atol=1e-5)


def test_dit_keeps_its_learned_variance(pipes):
    prior = fb.load_prior(f"diffusers/{pipes['dit']}")
    assert prior.variance_type == "learned_range" and prior.card["variance"] == "learned_range"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, s = 700, 450
    with torch.no_grad():
        raw = prior.unet(hidden_states=x, timestep=torch.tensor([700.0] * 2),
                         class_labels=torch.tensor([10, 10]), return_dict=False)[0]
    eps, var = prior.model_outputs(x, torch.tensor(700.0))
    assert torch.allclose(eps, raw[:, :4], atol=1e-6) and torch.allclose(var, raw[:, 4:], atol=1e-6)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x0, e = prior.denoise(x, t)
    noise_part = prior.step(x, x0, e, t, s, 1.0, z) - prior.step(x, x0, e, t, s, 1.0, torch.zeros_like(z))
    assert torch.allclose(noise_part, prior.learned_std(x, t, s) * z, atol=1e-6)
    a_t, s_t = prior.alpha_sigma(t)
    a_s, s_s = prior.alpha_sigma(s)
    beta = 1 - (a_t / a_s) ** 2
    frac = (raw[:, 4:] + 1) / 2
    std = torch.exp(0.5 * (frac * beta.log() + (1 - frac) * (beta * s_s ** 2 / s_t ** 2).log()))
    assert torch.allclose(prior.learned_std(x, t, s), std, atol=1e-6)


def test_one_channel_pixel_prior(tmp_path, tiny_extractor):
    """A gray DDPM: decode repeats the channel to RGB (what extractors see), encode takes RGB to luminance."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=[8, 16],
                       down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                       norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "gray")
    prior = fb.load_prior(f"diffusers/{tmp_path / 'gray'}")
    assert prior.sample_shape == (1, 16, 16) and prior.image_size == 16
    gray = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    rgb = gray.expand(-1, 3, -1, -1)
    z = prior.encode(rgb)
    assert z.shape == (2, 1, 16, 16) and torch.allclose(z, gray * 2 - 1, atol=1e-6)  # gray RGB -> the same gray
    back = prior.decode(z)
    assert back.shape == (2, 3, 16, 16) and torch.allclose(back, rgb, atol=1e-6)
    colour = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    luma = 0.299 * colour[:, :1] + 0.587 * colour[:, 1:2] + 0.114 * colour[:, 2:]
    assert torch.allclose(prior.encode(colour), luma * 2 - 1, atol=1e-6)
    ref = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    for method in ("ndtm", "unguided"):  # ndtm's preset encodes the reference (time-dependent target)
        res = fb.sample_fiber(prior, tiny_extractor, ref, n=2, method=method, steps=2, seed=0, progress=False)
        assert res.images.shape == (2, 3, 16, 16) and torch.isfinite(res.images).all()
        assert torch.equal(res.images[:, 0], res.images[:, 1]) and torch.equal(res.images[:, 0], res.images[:, 2])
