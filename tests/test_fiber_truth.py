"""The fiber truth (bench/fiber_truth.py): known answers on analytic features, and the shipped tables."""
import numpy as np
import pandas as pd
import pytest
import torch

from fiberbench.bench import fiber_truth as T
from fiberbench.bench import invariance as G
from fiberbench.errors import ConfigError
from fiberbench.models import load_extractor
from fiberbench.seeds import INVARIANCE_SEED_BASE
from fiberbench.toy import FACTORS, balanced_references


def _onehot(values: pd.Series, levels) -> torch.Tensor:
    return torch.tensor(np.stack([(values == v).to_numpy(float) for v in levels], axis=1), dtype=torch.float32)


def _truth_of(features: torch.Tensor, pool: pd.DataFrame, refs: int = 6) -> dict[str, float]:
    """Fiber truth of an analytic extractor whose features of pool row i are ``features[i]`` (the first
    ``refs`` rows serve as references, the rest as the pool)."""
    unit = torch.nn.functional.normalize(features, dim=-1)
    fibers = T.exact_fibers(unit[:refs], unit[refs:])
    fibers = [idx[:256] for idx in fibers]
    rest = pool.iloc[refs:].reset_index(drop=True)
    return T.estimate_from_draws(rest, fibers, rest.iloc[:4096].assign(valid=True), seed=0)


def test_truth_of_a_shape_only_extractor_is_zero_for_shape_and_one_elsewhere():
    pool = T.world_pool(20_000)
    truth = _truth_of(_onehot(pool["shape"], FACTORS["shape"]), pool)
    assert truth["shape"] == pytest.approx(0.0, abs=1e-9)  # every fiber member has the reference's shape
    for k in ("color", "background", "size", "x", "y", "mirror"):
        assert truth[k] > 0.9, (k, truth)  # the shape pins nothing else: the fiber is the world, given the shape


def test_truth_of_a_two_factor_extractor_pins_both():
    pool = T.world_pool(20_000)
    feats = torch.cat([_onehot(pool["shape"], FACTORS["shape"]), _onehot(pool["background"],
                                                                         FACTORS["background"])], dim=1)
    truth = _truth_of(feats, pool)
    assert truth["shape"] == pytest.approx(0.0, abs=1e-9)
    assert truth["background"] == pytest.approx(0.0, abs=1e-9)
    assert min(truth[k] for k in ("color", "size", "x", "y")) > 0.9, truth


def test_truth_of_a_continuous_factor_shrinks_with_the_tolerance():
    """Features (cos, sin) of an angle that maps size linearly: the fiber keeps sizes within an arc whose
    width is set by delta, so the size's truth is the arc's share of the world's size spread."""
    pool = T.world_pool(20_000)
    lo, hi = FACTORS["size"]
    angle = torch.tensor(((pool["size"] - lo) / (hi - lo)).to_numpy(), dtype=torch.float32) * (np.pi / 2)
    feats = torch.stack([angle.cos(), angle.sin()], dim=1)
    truth = _truth_of(feats, pool)
    # cos >= 0.95 keeps |angle - angle_ref| <= arccos(0.95) = 0.318 rad of the pi/2 range: at most 40 % of it
    assert 0.05 < truth["size"] < 0.6, truth
    assert min(truth[k] for k in ("shape", "color", "background", "x", "y")) > 0.9, truth


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="pool_size"):
        T.check_settings(10, 256, 0.05)
    with pytest.raises(ConfigError, match="truth_samples"):
        T.check_settings(1000, 2, 0.05)
    with pytest.raises(ConfigError, match="delta"):
        T.check_settings(1000, 256, 3.0)


@pytest.mark.parametrize("references,n", [(12, 8), (8, 4)])
def test_shipped_truth_covers_the_default_and_quick_settings(references, n, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the shipped truth should have answered without computing")
    monkeypatch.setattr(T, "_compute", refuse)
    exts = {spec: load_extractor(spec) for spec in G.EXTRACTORS}
    refs = balanced_references(references, 0)[0]
    out = T.compute_truth(exts, refs, INVARIANCE_SEED_BASE + 500, n, cache=None)
    truth = out.frame.set_index(["extractor", "factor"])["fiber_truth"]
    # the shape classifier pins the shape and leaves the colour free; the colour ViT the other way round
    assert truth["toy/shape-resnet@logits", "shape"] < 0.05
    assert truth["toy/shape-resnet@logits", "color"] > 0.9
    assert truth["toy/color-vit@logits", "color"] < 0.05
    # the graded mixtures: more CLIP weight pins the colour more
    colour = [truth[f"mix/{w}*toy/shape-resnet@logits+{c}*toy/clip@embed", "color"]
              for w, c in (("0.79", "0.21"), ("0.75", "0.25"), ("0.71", "0.29"))]
    assert colour[0] > colour[1] > colour[2], colour
    # the ideal estimator at the benchmark's sample counts (docs/invariance_bench.md)
    assert out.ceiling()["median"] >= (0.95 if references == 12 else 0.85)
