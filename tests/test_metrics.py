"""fiberbench.analysis.metrics: every function on a case whose answer is known in closed form."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from torch import nn

from fiberbench.analysis import metrics as M
from fiberbench.errors import ConfigError, InputError
from fiberbench.sampling import FiberResult


def make_result(images: torch.Tensor, reference: torch.Tensor, n: int, extractor: str = "test/f@logits",
                features: torch.Tensor | None = None, reference_features: torch.Tensor | None = None) -> FiberResult:
    m = images.shape[0]
    config = {"run_id": "r", "sample_seeds": list(range(m)), "extractor": extractor, "prior": "p", "method": "ndtm",
              "loss": "l2", "steps": 1, "seed": 0, "init": "noise", "n": n, "hyperparameters": {}}
    return FiberResult(images=images, reference=reference, feature_distance=torch.zeros(m), cosine=torch.ones(m),
                       status=["ok"] * m, config=config, features=features, reference_features=reference_features)


class MeanColour(nn.Module):
    """Features = mean colour per channel ``[N,3]`` (blind to where the pixels are)."""

    spec = "test/mean-colour@embed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean((2, 3))


def flat(value: tuple[float, float, float], size: int = 8) -> torch.Tensor:
    return torch.tensor(value).view(3, 1, 1).expand(3, size, size).clone()


# --------------------------------------------------------------------------- fiber loss conventions

def test_fiber_losses_in_every_convention():
    f, h = torch.tensor([[1.0, 3.0, 4.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    out = M.fiber_losses(f, h, logits=True)
    assert out["fiber_sq_l2"].item() == pytest.approx(25.0)
    assert out["fiber_l2"].item() == pytest.approx(5.0)
    assert out["fiber_l1"].item() == pytest.approx(7.0)
    assert out["fiber_rms"].item() == pytest.approx(math.sqrt(25 / 3))
    assert out["fiber_cos"].item() == pytest.approx(1 - 1 / math.sqrt(26))
    lse = math.log(math.e + math.e ** 3 + math.e ** 4)
    assert out["fiber_ce"].item() == pytest.approx(lse - 1.0)  # the reference's argmax is class 0
    p = np.exp([1.0, 0.0, 0.0]) / np.exp([1.0, 0.0, 0.0]).sum()
    assert out["fiber_ce_soft"].item() == pytest.approx(float(-(p * (np.array([1.0, 3.0, 4.0]) - lse)).sum()))
    emb = M.fiber_losses(f, h, logits=False)
    assert math.isnan(emb["fiber_ce"].item()) and math.isnan(emb["fiber_ce_soft"].item())
    assert emb["fiber_sq_l2"].item() == pytest.approx(25.0)


def test_to_frame_records_every_convention_per_sample():
    ref_f = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    feats = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0], [1.0, 2.0]])  # two references x n=2
    res = make_result(torch.zeros(4, 3, 4, 4), torch.zeros(2, 3, 4, 4), 2, features=feats, reference_features=ref_f)
    df = res.to_frame()
    assert df["fiber_sq_l2"].tolist() == pytest.approx([25.0, 0.0, 0.0, 1.0])
    assert df["fiber_l2"].tolist() == pytest.approx([5.0, 0.0, 0.0, 1.0])
    assert df["fiber_l1"].tolist() == pytest.approx([7.0, 0.0, 0.0, 1.0])
    assert df["fiber_rms"].tolist() == pytest.approx([math.sqrt(12.5), 0.0, 0.0, math.sqrt(0.5)])
    assert np.isfinite(df["fiber_ce"]).all()  # the spec names @logits
    pre = make_result(torch.zeros(4, 3, 4, 4), torch.zeros(2, 3, 4, 4), 2, extractor="timm/x@pre_logits",
                      features=feats, reference_features=ref_f).to_frame()
    assert pre["fiber_ce"].isna().all() and pre["fiber_sq_l2"].tolist() == pytest.approx([25.0, 0.0, 0.0, 1.0])
    bare = make_result(torch.zeros(4, 3, 4, 4), torch.zeros(2, 3, 4, 4), 2).to_frame()
    assert set(M.FIBER_LOSS_COLUMNS) <= set(bare.columns) and bare["fiber_sq_l2"].isna().all()


def test_loss_frame_checks_rows():
    with pytest.raises(InputError, match="3 feature rows for 2 references"):
        M.loss_frame(torch.zeros(3, 2), torch.zeros(2, 2), n=2)


# --------------------------------------------------------------------------- realism

def gaussian_with(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> torch.Tensor:
    """``n`` points whose sample mean and unbiased sample covariance are exactly ``mean`` and ``cov``."""
    x = np.random.default_rng(seed).standard_normal((n, len(mean)))
    x -= x.mean(0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # whitened: sample cov = I
    return torch.from_numpy(x @ np.linalg.cholesky(cov).T + mean)


def test_frechet_distance_matches_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    a, b = gaussian_with(mu1, s1, 50, 0), gaussian_with(mu2, s2, 80, 1)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sigma1 - sigma2)^2 = 5 + (1 + 1 + 4)
    assert M.frechet_distance(a, b) == pytest.approx(11.0, abs=1e-6)
    full1 = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]])
    full2 = np.array([[1.0, -0.2, 0.1], [-0.2, 2.0, 0.0], [0.1, 0.0, 0.5]])
    r1 = scipy.linalg.sqrtm(full1)
    closed = 5.0 + np.trace(full1 + full2 - 2 * scipy.linalg.sqrtm(r1 @ full2 @ r1).real)
    fd = M.frechet_distance(gaussian_with(mu1, full1, 40, 2), gaussian_with(mu2, full2, 40, 3))
    assert fd == pytest.approx(closed, abs=1e-6)


def test_fd_is_biased_upward_at_small_n_and_kid_is_not():
    g = torch.Generator().manual_seed(0)
    fd_small, fd_large, kids = [], [], []
    for r in range(8):
        fd_small.append(M.frechet_distance(torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)))
        fd_large.append(M.frechet_distance(torch.randn(2000, 8, generator=g), torch.randn(2000, 8, generator=g)))
        kids.append(M.kernel_distance(torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g),
                                      subsets=20, seed=r)[0])
    assert np.mean(fd_small) > 1.0 > 0.1 > np.mean(fd_large)  # same distribution, FD far from 0 at n=20
    assert abs(np.mean(kids)) < 3 * np.std(kids) / math.sqrt(len(kids))  # KID: 0 within its standard error
    shifted = M.kernel_distance(torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g) + 1)[0]
    assert shifted > 10 * np.std(kids)


def test_kid_of_identical_sets_is_the_unbiased_estimators_small_negative():
    a = torch.randn(50, 4, generator=torch.Generator().manual_seed(1)).double()
    kid, std, size = M.kernel_distance(a, a, subset_size=50)
    k = (a @ a.T / 4 + 1) ** 3
    off = (k.sum() - k.diag().sum()) / (50 * 49)
    # X = Y: unbiased MMD^2 = -2 (mean k(x,x) - mean_{i != j} k(x_i,x_j)) / m, ~0 next to a real difference
    assert kid == pytest.approx(float(-2 * (k.diag().mean() - off) / 50), rel=1e-6)
    assert size == 50 and std == pytest.approx(0.0, abs=1e-9)
    assert abs(kid) < 0.1 * M.kernel_distance(a, a + 1, subset_size=50)[0]


def test_realism_record_states_n_and_the_caveat():
    space = M.FeatureSpace("mean", MeanColour(), "mean colour")
    g = torch.Generator().manual_seed(0)
    bank = torch.rand(64, 3, 8, 8, generator=g)
    rec = M.realism(bank[:16], bank[16:], space, kid_subsets=10)
    assert rec["space"] == "mean" and rec["n"] == 16 and rec["n_bank"] == 48 and rec["dim"] == 3
    assert rec["kid_subset_size"] == 16 and "biased upward" in rec["caveat"] and "n=16" in rec["caveat"]
    far = M.realism(bank[:16] * 0.2, bank[16:], space, kid_subsets=10)
    assert far["fd"] > 10 * rec["fd"] and far["kid"] > rec["kid"]
    with pytest.raises(InputError, match="at least 2"):
        M.frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


def test_feature_spaces(tmp_path, monkeypatch):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    oracle = M.feature_space("oracle")
    f = M.embed(oracle.embed, images)
    assert oracle.name == "oracle" and f.shape == (3, 18)
    assert torch.allclose(f[:, :4].sum(1), torch.ones(3), atol=1e-5)  # the shape head's probabilities
    clip = M.feature_space("clip:toy/clip")
    assert clip.name == "clip" and M.embed(clip.embed, images).norm(dim=1).sub(1).abs().max() < 1e-4
    ex = M.feature_space("shape=toy/shape-resnet@pre_logits")
    assert ex.name == "shape" and M.embed(ex.embed, images).shape[0] == 3
    assert M.feature_space("toy/shape-resnet@logits").name == "shape_resnet"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="inception_v3_google"):
        M.feature_space("inception")


def test_inception_space_reads_torchvisions_cached_weights(tmp_path, monkeypatch):
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(net.state_dict(), ckpt / "inception_v3_google-0cc3c7bd.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    space = M.feature_space("inception")
    f = M.embed(space.embed, torch.rand(2, 3, 32, 32))
    assert space.name == "inception" and f.shape == (2, 2048) and torch.isfinite(f).all()


# --------------------------------------------------------------------------- nearest neighbours

def test_nearest_neighbour_skips_the_reference_and_keeps_its_fiber():
    ref = flat((0.5, 0.2, 0.2))
    near = flat((0.6, 0.2, 0.2))
    far = flat((0.0, 1.0, 0.0))
    bank = torch.stack([ref, near, far])
    nb = M.nearest_neighbours(ref[None], bank, MeanColour())
    assert nb.index.tolist() == [1]  # not itself (index 0)
    row = nb.frame().iloc[0]
    assert row["bank_index"] == 1 and row["fiber_sq_l2"] == pytest.approx(0.01, abs=1e-6)
    assert math.isnan(row["fiber_ce"])  # an embedding, not logits
    # a different image with the same features (pixels moved) is the nearest neighbour, at loss 0
    moved = ref.clone()
    moved[0, :4], moved[0, 4:] = 0.4, 0.6
    nb2 = M.nearest_neighbours(ref[None], torch.stack([ref, near, moved]), MeanColour())
    assert nb2.index.tolist() == [2] and nb2.frame()["fiber_sq_l2"].item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InputError, match="no nearest neighbour"):
        M.nearest_neighbours(ref[None], ref[None], MeanColour())


def test_load_image_folder(tmp_path):
    from PIL import Image

    for i, size in enumerate([(10, 10), (10, 10), (12, 8)]):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="differ in size"):
        M.load_image_folder(tmp_path)
    images, names = M.load_image_folder(tmp_path, size=6)
    assert names == ["im0.png", "im1.png", "im2.png"] and images.shape == (3, 3, 6, 6)
    assert images[1].mean().item() == pytest.approx(40 / 255, abs=1e-3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        M.load_image_folder(tmp_path / "empty")


# --------------------------------------------------------------------------- spread and diversity

def test_spread_is_across_draws():
    df = pd.DataFrame({"extractor": "e", "method": "ndtm", "seed": [0, 0, 1, 1], "x": [0.0, 2.0, 2.0, 4.0]})
    out = M.spread(df, ["x"]).iloc[0]
    assert out["x"] == pytest.approx(2.0) and out["x_std"] == pytest.approx(math.sqrt(2.0)) and out["draws"] == 2
    one = M.spread(df[df["seed"] == 0], ["x"]).iloc[0]
    assert one["x"] == pytest.approx(1.0) and math.isnan(one["x_std"]) and one["draws"] == 1
    with pytest.raises(ConfigError, match="not in the frame"):
        M.spread(df, ["y"])


def test_diversity():
    a, b = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)  # pixel L2 distance sqrt(12)
    assert M.data_scale(torch.stack([a, b])) == pytest.approx(math.sqrt(12))
    d = M.sample_diversity(torch.stack([a, a, a, b]), n=2, scale=math.sqrt(12))
    assert d.tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])
    three = M.sample_diversity(torch.stack([a, a, b]), n=3)
    assert three.tolist() == pytest.approx([math.sqrt(12) / 2, math.sqrt(12) / 2, math.sqrt(12)])
    assert torch.isnan(M.sample_diversity(torch.stack([a]), n=1)).all()


# --------------------------------------------------------------------------- cross-model agreement

def test_cross_model_agreement_known_answers():
    A, B, C = flat((0.0, 0.0, 0.0)), flat((1.0, 0.0, 0.0)), flat((0.0, 0.5, 0.0))
    independent = torch.stack([A, B, C])
    on_fiber = make_result(torch.stack([A, A, B]), torch.stack([A, A, B]), 1)  # samples = references
    # samples that are unrelated images, one per distinct pair of the independent set: mean relative = 1 exactly
    unrelated = make_result(torch.stack([B, C, C]), torch.stack([A, A, B]), 1)
    frame = M.cross_model_agreement({"same": on_fiber, "other": unrelated}, {"colour": MeanColour()}, independent)
    assert set(frame.columns) >= {"source", "judge", "reference", "sample", "distance", "baseline", "relative"}
    assert frame.loc[frame["source"] == "same", "relative"].tolist() == pytest.approx([0.0, 0.0, 0.0])
    base = (1.0 + 0.25 + 1.25) / 3
    assert frame["baseline"].iloc[0] == pytest.approx(base)
    assert frame.loc[frame["source"] == "other", "relative"].mean() == pytest.approx(1.0)
    mat = M.agreement_matrix(frame)
    assert mat.loc["other", "colour"] == pytest.approx(1.0) and mat.loc["same", "colour"] == pytest.approx(0.0)
    fig = M.agreement_heatmap(frame)
    z = np.asarray(fig.data[0].z, float)
    assert z.shape == (2, 1) and sorted(z.ravel().tolist()) == pytest.approx([0.0, 1.0])
    with pytest.raises(ConfigError, match="convention"):
        M.cross_model_agreement({}, {}, independent, convention="l3")


# --------------------------------------------------------------------------- colour shift

def test_colour_shift_of_a_recoloured_patch():
    def patch(colour):
        img = torch.zeros(3, 16, 16)
        img[:, 4:12, 4:12] = torch.tensor(colour).view(3, 1, 1)
        return img

    red, blue = patch((0.9, 0.1, 0.1)), patch((0.1, 0.2, 0.9))
    res = make_result(torch.stack([red, blue]), torch.stack([red]), 2)
    df = M.colour_shift(res)
    assert df["channel"].tolist() == ["red", "green", "blue"] * 2
    assert df["shift"].tolist() == pytest.approx([0.0, 0.0, 0.0, -0.8, 0.1, 0.8], abs=1e-6)
    assert df["magnitude"].iloc[-1] == pytest.approx(math.sqrt(0.64 + 0.01 + 0.64), abs=1e-6)
    hist = M.histogram(df, "shift", by=["channel"], bins=4)
    red_rows = hist[hist["channel"] == "red"]
    assert red_rows["bin"].tolist() == pytest.approx([-0.75, -0.25, 0.25, 0.75])
    assert red_rows["count"].tolist() == [1, 0, 1, 0] and red_rows["density"].sum() == pytest.approx(1.0)


# --------------------------------------------------------------------------- a preset's guidance budget

def test_guidance_budget_and_the_preset_steps_warning():
    from fiberbench.sampling import PRESETS

    gamma = PRESETS["fiber-imagenet"]["gamma"]
    # uniform grid tau_i = 1000 (1 - i/steps), i < steps: gamma > 0 only below tau 800 -> i > steps / 5
    assert M.guidance_budget(gamma, 200)["guided_steps"] == 159
    assert M.guidance_budget(gamma, 50)["guided_steps"] == 39
    with pytest.warns(M.PresetStepsWarning, match=r"200 steps: 159 guided updates.*steps=50 gives 39 guided"):
        info = M.check_preset_steps("fiber-imagenet", 50)
    assert info["short"] and info["inner_steps_needed"] == math.ceil(5 * 159 / 39) == 21
    with pytest.raises(ConfigError, match="raise inner_steps to 21"):
        M.check_preset_steps("fiber-imagenet", 50, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not M.check_preset_steps("fiber-imagenet", 200)["short"]
        assert not M.check_preset_steps("fiber-imagenet", 50, inner_steps=21)["short"]
        assert M.check_preset_steps("fiber-imagenet", None) is None and M.check_preset_steps(None, 5) is None
