import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # one thread: batch-invariance checks hold to ~2e-5 (2 threads: 1e-2), and no OpenMP spin under load


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
