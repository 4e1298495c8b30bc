"""``hf/`` vision towers that need more than ``pixel_values``: Qwen2-VL and Qwen2.5-VL, offline, on tiny random
models saved with ``save_pretrained`` next to their image processor's config."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fiberbench as fb
from fiberbench.errors import ConfigError
from fiberbench.models.qwen_vl import patchify, smart_size

VISION = dict(depth=2, embed_dim=32, hidden_size=48, num_heads=2, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2)
# the merger's 48-d tokens are the text model's width
TEXT = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [4, 4, 4]})


def build_qwen(kind: str, d) -> None:
    """A tiny random Qwen2-VL / Qwen2.5-VL (vision tower: 2 blocks, width 32, merged tokens 48-d) and its processor."""
    import transformers

    torch.manual_seed(0)
    if kind == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(text_config=TEXT, vision_config=dict(VISION, mlp_ratio=2))
        model = transformers.Qwen2VLForConditionalGeneration(cfg)
    else:
        # Qwen2.5-VL names the block width hidden_size and the merged width out_hidden_size; window attention
        # in block 0 (56 px windows), full attention in block 1
        vision = dict(VISION, hidden_size=32, out_hidden_size=48, intermediate_size=64, window_size=56,
                      fullatt_block_indexes=[1])
        vision.pop("embed_dim")
        cfg = transformers.Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision)
        model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    model.save_pretrained(d)
    # the real processor's settings (CLIP mean/std, bicubic, 28 px grid), with a small pixel budget
    transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64).save_pretrained(d)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param) / "tiny"
    build_qwen(request.param, d)
    return request.param, d


def reference_embedding(d, pil) -> torch.Tensor:
    """transformers' own path: the image processor on a PIL image, then the model's image features, mean-pooled."""
    import transformers

    proc = transformers.AutoImageProcessor.from_pretrained(d)
    model = transformers.AutoModelForImageTextToText.from_pretrained(d).eval()
    inp = proc(images=[pil], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"])
    tokens = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    return tokens[0].mean(0)[None] if isinstance(tokens, (tuple, list)) else tokens.mean(0)[None]


def image(h: int, w: int, seed: int = 0):
    from PIL import Image

    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255


def test_qwen_tower_equals_transformers_processor_and_model(qwen):
    kind, d = qwen
    ex = fb.load_extractor(f"hf/{d}")
    assert ex.spec == f"hf/{d}@mean" and ex.card["vision_tower"].endswith("VisionTransformerPretrainedModel")
    # 56 x 84 is on the processor's 28 px grid: no resize, only rescale, normalise, patch: equal to round-off
    pil, t = image(56, 84)
    ref = reference_embedding(d, pil)
    ours = ex(t)
    assert ours.shape == ref.shape == (1, 48)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-4), float((ours - ref).abs().max())
    # 70 x 90 -> 84 x 84: the processor resizes the uint8 image with torchvision's antialiased bicubic and rounds
    # to uint8 before normalising; we resize the float image. Measured on uniform-noise images (the worst case for
    # resampling) with both towers: cosine 0.99984 - 0.99995, max difference 1.3 - 2.3 % of the largest entry
    pil, t = image(70, 90, seed=1)
    ref, ours = reference_embedding(d, pil), ex(t)
    assert float(F.cosine_similarity(ours, ref)) > 0.9995
    assert float((ours - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_qwen_layers_gradients_and_batches(qwen):
    kind, d = qwen
    ex = fb.load_extractor(f"hf/{d}")
    x = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = ex(x)
    assert out.shape == (3, 48)
    out.pow(2).sum().backward()
    assert float(x.grad.norm()) > 0 and torch.isfinite(x.grad).all()
    with torch.no_grad():  # one image at a time equals the batch: attention stays within each image
        single = torch.cat([ex(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(out.detach(), single, atol=1e-5)
    tokens = fb.load_extractor(f"hf/{d}@tokens")
    assert tokens(x).shape == (3, 2 * 2 * 48)  # 56 px = 4 x 4 patches = 2 x 2 merged tokens
    assert torch.allclose(tokens(x).view(3, 4, 48).mean(1), out, atol=1e-6)
    hidden = fb.load_extractor(f"hf/{d}@hidden_mean")
    block = fb.load_extractor(f"hf/{d}@blocks.0")
    with torch.no_grad():
        assert hidden(x).shape == block(x).shape == (3, 32)
        assert float((hidden(x) - block(x)).abs().max()) > 1e-6
    with pytest.raises(ConfigError, match="unknown layer 'blocks.7'"):
        fb.load_extractor(f"hf/{d}@blocks.7")


def test_qwen_patching_is_the_processors():
    """Our patch order and smart size against the processor's own on one normalised image (no model)."""
    import transformers

    proc = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    pil, t = image(56, 112, seed=3)
    ref = proc(images=[pil], return_tensors="pt")
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    patches, grid = patchify((t - mean) / std, 14, 2, 2)
    assert torch.equal(grid, ref["image_grid_thw"]) and patches.shape == ref["pixel_values"].shape == (32, 1176)
    assert torch.allclose(patches, ref["pixel_values"], atol=1e-5)
    assert smart_size(384, 384, 28, 56 * 56, 28 * 28 * 1280) == (392, 392)  # the paper's CheXpert size
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for h, w, lo, hi in [(20, 20, 56 * 56, 28 * 28 * 1280), (1000, 500, 56 * 56, 28 * 28 * 64),
                         (70, 90, 56 * 56, 28 * 28 * 64), (256, 256, 56 * 56, 28 * 28 * 1280)]:
        assert smart_size(h, w, 28, lo, hi) == tuple(smart_resize(h, w, 28, lo, hi)), (h, w)
