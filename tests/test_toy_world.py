"""The shapes world: factors, determinism, anti-aliasing, chirality, captions, bias."""
import numpy as np
import pandas as pd
import pytest
import torch

from fiberbench import toy
from fiberbench.toy import FACTORS, as_frame, caption, intervene, render, sample_factors


def test_factor_space_has_what_the_design_asks():
    assert len(FACTORS["shape"]) >= 4 and len(FACTORS["color"]) >= 6 and len(FACTORS["background"]) >= 3
    assert set(toy.CHIRAL) <= set(FACTORS["shape"]) and toy.CHIRAL
    assert FACTORS["mirror"] == [False, True]
    for k in ("size", "x", "y"):
        lo, hi = FACTORS[k]
        assert 0 < lo < hi < 1


def test_sample_factors_deterministic_and_in_range():
    a, b, c = sample_factors(500, 3), sample_factors(500, 3), sample_factors(500, 4)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    for k, v in FACTORS.items():
        if isinstance(v, list):
            assert set(a[k]) <= set(v) and len(set(a[k])) == len(v)  # all values occur in 500 draws
        else:
            assert a[k].between(*v).all()


def test_render_is_deterministic_and_in_range():
    f = sample_factors(64, 0)
    x, y = render(f), render(f)
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, y)
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_edges_are_anti_aliased():
    img = render(as_frame({"shape": "circle", "color": "red", "background": "black", "size": 0.3}))[0]
    fg = torch.tensor(toy.COLORS_RGB["red"]).view(3, 1, 1)
    bg = torch.tensor(toy.BACKGROUNDS_RGB["black"]).view(3, 1, 1)
    is_fg = (img - fg).abs().amax(0) < 1e-4
    is_bg = (img - bg).abs().amax(0) < 1e-4
    partial = ~(is_fg | is_bg)
    # a circle of radius ~9.6 px has a rim of ~60 partially covered pixels
    assert 30 <= int(partial.sum()) <= 120
    assert int(is_fg.sum()) > 200


def test_mirror_flips_the_chiral_shape_only():
    base = {"color": "blue", "background": "white", "size": 0.3, "x": 0.5, "y": 0.5}
    arrow = render(as_frame([{**base, "shape": "arrow", "mirror": m} for m in (False, True)]))
    # centred: the mirrored arrow is the horizontal flip of the plain one
    assert torch.allclose(arrow[1], arrow[0].flip(-1), atol=1e-5)
    assert (arrow[0] - arrow[1]).abs().sum() > 20  # and it is a visible change
    for shape in ("circle", "square", "triangle"):
        pair = render(as_frame([{**base, "shape": shape, "mirror": m} for m in (False, True)]))
        assert torch.equal(pair[0], pair[1])


def test_arrow_is_chiral_not_just_pointing():
    """No rotation by a multiple of 90 degrees maps the arrow onto its mirror image."""
    base = {"shape": "arrow", "color": "blue", "background": "white", "size": 0.3, "x": 0.5, "y": 0.5}
    a, m = render(as_frame([{**base, "mirror": False}, {**base, "mirror": True}]))
    diffs = [float((torch.rot90(a, k, dims=(1, 2)) - m).abs().mean()) for k in range(4)]
    assert min(diffs) > 0.02


def test_invalid_factor_values_name_the_factor():
    f = sample_factors(3, 0)
    f.loc[1, "color"] = "purple"
    with pytest.raises(ValueError, match="'color'.*purple.*allowed"):
        render(f)
    f = sample_factors(3, 0)
    f.loc[0, "size"] = 0.9
    with pytest.raises(ValueError, match="'size'"):
        render(f)
    with pytest.raises(ValueError, match="'mirror' is missing"):
        render(sample_factors(2, 0).drop(columns="mirror"))


def test_caption_reads_the_factors():
    f = as_frame({"shape": "arrow", "color": "red", "background": "gray", "size": 0.19, "x": 0.33, "y": 0.33,
                  "mirror": True})
    assert caption(f) == ["a small red arrow pointing left on a gray background, top left"]
    g = as_frame({"shape": "circle", "color": "cyan", "background": "black", "size": 0.31, "x": 0.5, "y": 0.5})
    assert caption(g) == ["a large cyan circle on a black background, center"]


def test_intervene_changes_one_factor_only():
    f = sample_factors(200, 1)
    for name in FACTORS:
        g = intervene(f, name, seed=2)
        others = [k for k in FACTORS if k != name]
        pd.testing.assert_frame_equal(f[others].reset_index(drop=True), g[others])
        if isinstance(FACTORS[name], list):
            assert (f[name].to_numpy() != g[name].to_numpy()).all()


def test_bias_pairs_factors_with_the_given_strength():
    f = sample_factors(4000, 5, bias={"pair": ("shape", "color"), "strength": 0.9})
    paired = [FACTORS["color"][FACTORS["shape"].index(s)] for s in f["shape"]]
    agree = float((f["color"].to_numpy() == np.array(paired)).mean())
    # strength 0.9 plus chance agreement 0.1 * 1/6
    assert abs(agree - (0.9 + 0.1 / 6)) < 0.02
    pd.testing.assert_frame_equal(f, sample_factors(4000, 5, bias={"pair": ("shape", "color"), "strength": 0.9}))
    with pytest.raises(ValueError, match="strength"):
        sample_factors(3, 0, bias={"pair": ("shape", "color"), "strength": 1.5})
