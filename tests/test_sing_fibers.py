"""SING meets fibers: fibers of given feature vectors, pictures of SING's equivalent pairs, head vs backbone."""
from __future__ import annotations

import pytest
import torch

import fiberbench as fb
from fiberbench.errors import ConfigError
from fiberbench.sampling import SAMPLERS, sample_fiber

torch.set_num_threads(1)

# a few steps of each method (as tests/test_registries.py: the check is the machinery, not the quality)
METHOD_KW = {
    "ndtm": dict(preset="toy", steps=4),
    "dps": dict(steps=4, eta=1.0),
    "metamer": dict(iters=8),
    "unguided": dict(steps=4, eta=1.0),
    "conditional": dict(steps=4),
}


@pytest.fixture(scope="module")
def cond_prior():
    return fb.load_prior("toy/cond-fm-shape-resnet")


# --------------------------------------------------------------------------- targets given as features

@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_fiber_of_given_features_equals_the_fiber_of_the_image_bit_for_bit(method, prior_fm, cond_prior,
                                                                            shape_resnet):
    assert set(METHOD_KW) == set(SAMPLERS)
    prior = cond_prior if SAMPLERS[method].trained else prior_fm
    refs, _ = fb.toy.references(2, seed=31)
    with torch.no_grad():
        h = shape_resnet(refs).float()
    kw = dict(n=2, method=method, seed=5, progress=False, **METHOD_KW[method])
    by_image = sample_fiber(prior, shape_resnet, refs, **kw)
    by_features = sample_fiber(prior, shape_resnet, target_features=h, reference_ids=["a", "b"], **kw)
    assert torch.equal(by_features.images, by_image.images)
    assert torch.equal(by_features.feature_distance, by_image.feature_distance)
    assert torch.equal(by_features.reference_features, h)
    # no reference images: a black placeholder of the prior's size, and the same tidy frame
    assert by_features.reference.shape == (2, 3, 32, 32) and float(by_features.reference.abs().max()) == 0.0
    fa, fi = by_features.to_frame(), by_image.to_frame()
    assert list(fa.columns) == list(fi.columns)
    assert list(fa["reference_id"]) == ["a", "a", "b", "b"]
    assert fa["fiber_sq_l2"].tolist() == fi["fiber_sq_l2"].tolist()
    # the run identity knows the targets (a store never mixes the two runs up)
    assert by_features.config["targets"] == "features" and by_image.config["targets"] == "reference"
    assert by_features.config["run_id"] != by_image.config["run_id"]


def test_given_features_with_reference_images_start_sdedit_from_the_images(prior_fm, shape_resnet):
    refs, _ = fb.toy.references(2, seed=32)
    with torch.no_grad():
        h = shape_resnet(refs).float()
    kw = dict(n=2, seed=1, progress=False, preset="toy", steps=4, init=("sdedit", 500))
    a = sample_fiber(prior_fm, shape_resnet, refs, **kw)
    b = sample_fiber(prior_fm, shape_resnet, refs, target_features=h, **kw)
    assert torch.equal(a.images, b.images) and torch.equal(b.reference, a.reference)


def test_given_features_are_refused_when_they_do_not_fit(prior_fm, shape_resnet):
    refs, _ = fb.toy.references(2, seed=33)
    h = torch.randn(2, 4)
    kw = dict(n=1, steps=2, preset="toy", progress=False)
    with pytest.raises(ConfigError, match="dimension 5, toy/shape-resnet@logits returns 4"):
        sample_fiber(prior_fm, shape_resnet, target_features=torch.randn(2, 5), **kw)
    with pytest.raises(ConfigError, match="float64.*returns torch.float32"):
        sample_fiber(prior_fm, shape_resnet, target_features=h.double(), **kw)
    with pytest.raises(ConfigError, match="target='time'"):
        sample_fiber(prior_fm, shape_resnet, target_features=h, n=1, steps=2, preset="toy", target="time")
    with pytest.raises(ConfigError, match="SDEdit init starts from the reference images"):
        sample_fiber(prior_fm, shape_resnet, target_features=h, init=("sdedit", 400), **kw)
    with pytest.raises(ConfigError, match="3 target_features for 2 reference images"):
        sample_fiber(prior_fm, shape_resnet, refs, target_features=torch.randn(3, 4), **kw)
    with pytest.raises(ConfigError, match="must be \\[B,D\\]"):
        sample_fiber(prior_fm, shape_resnet, target_features=torch.randn(2, 2, 4), **kw)
    with pytest.raises(ConfigError, match="non-finite"):
        sample_fiber(prior_fm, shape_resnet, target_features=torch.full((1, 4), float("nan")), **kw)
    with pytest.raises(ConfigError, match="reference_ids has 1 entries for 2"):
        sample_fiber(prior_fm, shape_resnet, target_features=h, reference_ids=["x"], **kw)
    # a [D] vector is one target
    one = sample_fiber(prior_fm, shape_resnet, target_features=h[0], **kw)
    assert one.images.shape == (1, 3, 32, 32) and one.reference_features.shape == (1, 4)
