import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# one thread: batch-invariance checks hold to ~2e-5 (2 threads: 1e-2), and no OpenMP spin under load
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def oracle():
    from fiberbench import toy
    return toy.load_oracle()


@pytest.fixture(scope="session")
def prior_fm():
    import fiberbench as fb
    return fb.load_prior("toy/prior-fm")


@pytest.fixture(scope="session")
def shape_resnet():
    import fiberbench as fb
    return fb.load_extractor("toy/shape-resnet@logits")


@pytest.fixture(scope="session")
def color_vit():
    import fiberbench as fb
    return fb.load_extractor("toy/color-vit@logits")


def build_tiny_clip(embed_dim: int = 32):
    """A tiny random open_clip CLIP behind fiberbench's ClipModel (scores are arbitrary but deterministic)."""
    from open_clip.model import CLIP

    from fiberbench.semantics import ClipModel, toy_tokenizer

    torch.manual_seed(0)
    model = CLIP(embed_dim=embed_dim, vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                                  "head_width": 16},
                 text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    return ClipModel(model, toy_tokenizer(16), spec="test/tiny-clip",
                     preprocess_cfg={"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})


@pytest.fixture(scope="module")
def tiny_clip():
    return build_tiny_clip()


@pytest.fixture(scope="module")
def models_dir(request, tmp_path_factory):
    """A private copy of the toy models named by the test module's ``MODELS`` (weights a test may tamper
    with, e.g. to check checksums, without touching data/models); ``FIBERBENCH_MODELS`` points at it."""
    import shutil

    from fiberbench.toy import cards as M

    src = M.models_dir()
    dst = tmp_path_factory.mktemp("models")
    for name in request.module.MODELS:
        for p in src.glob(f"{name}.*"):
            shutil.copy2(p, dst / p.name)
    old = os.environ.get("FIBERBENCH_MODELS")
    os.environ["FIBERBENCH_MODELS"] = str(dst)
    yield dst
    if old is None:
        os.environ.pop("FIBERBENCH_MODELS", None)
    else:
        os.environ["FIBERBENCH_MODELS"] = old


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): with two
    OpenMP threads on a busy 2-core machine one call took 230 s instead of 1 s."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
