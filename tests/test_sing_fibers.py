"""SING meets fibers: fibers of given feature vectors, pictures of SING's equivalent pairs, head vs backbone."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import fiberbench as fb
from fiberbench.errors import ConfigError, InputError
from fiberbench.nullspace import (
    change_table,
    equivalent_targets,
    head_decomposition,
    head_invariance_truth,
    head_vs_backbone,
    nonnegative_equivalent,
    sign_agreement,
    visualize_equivalents,
)
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


# --------------------------------------------------------------------------- equivalent targets

def test_equivalent_targets_share_the_logits_and_the_nonnegative_one_is_nearest_to_h_prime():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 12, generator=g, dtype=torch.float64)
    dec = head_decomposition((w, torch.randn(3, generator=g, dtype=torch.float64)))
    h = torch.rand(8, 12, generator=g, dtype=torch.float64) * (torch.rand(8, 12, generator=g) > 0.5)  # ReLU-like
    t = equivalent_targets(h, dec, equivalent="nonnegative")
    hp = dec.equivalent(h)
    gg = t["principal"]
    assert float(dec.logit_change(h, gg).max()) < 1e-12
    assert float(gg.min()) > -1e-9 and float(hp.min()) < -0.05  # h' leaves the orthant, the equivalent does not
    # nearer to h' than h is (h is itself a non-negative equivalent), and no equivalent is nearer than the orthant
    d_g, d_h = (gg - hp).norm(dim=-1), (h - hp).norm(dim=-1)
    assert bool((d_g <= d_h + 1e-9).all()) and float((d_h - d_g).mean()) > 0.05
    assert bool((d_g >= hp.clamp(max=0).norm(dim=-1) - 1e-9).all())
    # where h' is already non-negative it is its own nearest point: a head that reads the mean feature
    mean_head = head_decomposition((torch.ones(1, 12, dtype=torch.float64), torch.zeros(1)))
    assert torch.allclose(nonnegative_equivalent(h, mean_head), h.mean(-1, keepdim=True).expand(-1, 12), atol=1e-9)
    assert set(equivalent_targets(h, dec)) == {"original", "principal"}
    assert torch.equal(equivalent_targets(h, dec)["principal"], hp)
    with pytest.raises(ConfigError, match="equivalent must be one of"):
        equivalent_targets(h, dec, equivalent="relu")
    with pytest.raises(ConfigError, match="translator and a clip"):
        equivalent_targets(h, dec, steer_to="a red shape.")


# --------------------------------------------------------------------------- head vs backbone (tables)

def _changes(rows):
    return pd.DataFrame(rows, columns=["layer", "extractor", "reference", "class", "factor", "reference_value", "n",
                                       "change", "chance"])


def test_change_table_pairs_the_layers_by_reference_and_pools_the_classes():
    rows = []
    for r, (cls, lo, pre) in enumerate([("a", 1.0, 0.25), ("a", 0.75, 0.25), ("b", 0.5, 0.5), ("b", 0.5, 0.0)]):
        rows += [("logits", "x@logits", r, cls, "color", "red", 4, lo, 0.8),
                 ("pre_logits", "x@pre_logits", r, cls, "color", "red", 4, pre, 0.8)]
    tab = change_table(_changes(rows), n_boot=200).set_index(["class", "statistic"])
    assert tab.loc[("a", "difference"), "mean"] == pytest.approx(0.625)
    assert tab.loc[("b", "difference"), "mean"] == pytest.approx(0.25)
    assert tab.loc[("all", "difference"), "mean"] == pytest.approx(0.4375)
    assert tab.loc[("all", "logits"), "n_references"] == 4
    assert tab.loc[("all", "difference"), "ci_low"] > 0  # every reference's difference is >= 0, three > 0
    truth = pd.DataFrame({"factor": ["color"], "head_added": [0.5]})
    agree = sign_agreement(change_table(_changes(rows), n_boot=200), truth)
    assert agree.loc[0, "decisive"] and agree.loc[0, "agrees"] and agree.loc[0, "ci_excludes_zero"]
    flipped = sign_agreement(change_table(_changes(rows), n_boot=200), truth.assign(head_added=-0.5))
    assert not flipped.loc[0, "agrees"]
    # below the margin the truth says "no difference": agreement means the fibers' CI holds 0 too
    assert not sign_agreement(change_table(_changes(rows), n_boot=200), truth.assign(head_added=0.02)).loc[0, "agrees"]
    with pytest.raises(InputError, match="both layers"):
        change_table(_changes([r for r in rows if r[0] == "logits"]))


# --------------------------------------------------------------------------- the toy world

@pytest.mark.timeout(900)
def test_head_vs_backbone_signs_agree_with_interventions_on_the_toy_world(prior_fm, oracle):
    """shape-resnet: the head discards the background its pre-logits carry (intervention: invariance 0.95 at the
    logits, 0.37 at the pre-logits), so @logits fibers change the background more often; shape (seen by both) and
    colour (already ignored by the backbone, 0.97 vs 0.91) show no settled difference.

    Measured (8 balanced references x 4 samples, toy preset, seed 0): background +0.28 [0.09, 0.50],
    colour -0.09 [-0.22, 0.09], shape +0.06 [-0.06, 0.22].
    """
    refs, fac = fb.toy.balanced_references(8, seed=7)
    hb = head_vs_backbone(prior_fm, "toy/shape-resnet", refs, oracle, reference_labels=fac,
                          classes=list(fac["shape"]), n=4, seed=0, preset="toy", n_boot=2000)
    truth = head_invariance_truth("toy/shape-resnet", n=500)
    agree = sign_agreement(hb.table, truth).set_index("factor")
    print(hb.table[hb.table["class"] == "all"].to_string(), truth.to_string(), agree.to_string(), sep="\n")
    assert truth.set_index("factor").loc["background", "head_added"] > 0.4
    assert list(agree.index[agree["decisive"]]) == ["background"]
    assert agree["agrees"].all(), agree
    assert agree.loc["background", "ci_excludes_zero"] and agree.loc["background", "difference"] > 0.1
    # the per-class table has every class, factor and statistic, rates in [0, 1]
    tab = hb.table
    assert set(tab["class"]) == {"all", "circle", "square", "triangle", "arrow"}
    assert tab.loc[tab["statistic"] != "difference", "mean"].between(0, 1).all()
    assert len(hb.changes) == 2 * 8 * 3 and set(hb.results) == {"logits", "pre_logits"}
    fig = hb.plot()
    assert len(fig.data) == 3 * 5  # logits, pre_logits, difference in each class's panel


# --------------------------------------------------------------------------- pictures of equivalent pairs

@pytest.fixture(scope="module")
def toy_clip():
    return fb.load_clip("toy/clip")


@pytest.fixture(scope="module")
def pictures(prior_fm, oracle, toy_clip):
    """shape-resnet's pairs for one image per shape, 4 samples per target, one NDTM trajectory each (``toy-fast``:
    57 s; the particle ``toy`` preset takes 290 s here, with the h samples at target distance 0.04 instead of 0.07)."""
    ext = fb.load_extractor("toy/shape-resnet@pre_logits")
    images, fac = fb.toy.balanced_references(4, seed=3)
    fit, _ = fb.toy.references(600, seed=10_000)
    return visualize_equivalents(prior_fm, ext, images, toy_clip, fit_images=fit, concepts=["a red shape."],
                                 steer_to="a blue shape.", n=4, seed=0, labels=list(fac["shape"]), judge=oracle,
                                 preset="toy-fast", gamma=3.0)


def test_equivalent_pictures_frames(pictures):
    p = pictures
    assert set(p.results) == {"original", "principal", "steered"}
    seeds = [r.config["sample_seeds"] for r in p.results.values()]
    assert seeds[0] == seeds[1] == seeds[2]  # paired draws: sample j of image i has one seed in every variant
    assert len(p.samples) == 3 * 4 * 4 and len(p.targets) == 3 * 4
    assert float(p.targets["logit_change"].max()) < 1e-12  # the targets share their logits exactly
    assert float(p.targets.loc[p.targets["variant"] == "principal", "null_fraction"].max()) < 1e-12
    assert p.samples["resolution"].between(-1 - 1e-9, 1 + 1e-9).all()
    assert {"shape_kept", "color_kept", "background_kept"} <= set(p.samples.columns)
    sc = p.scores
    assert len(sc) == 4 * 2 * 2  # images x (original, steered) x (the concept, the steering concept)
    assert sc["p_value"].between(0, 1).all() and (sc["noise_floor"] > 0).all()
    # steering toward a concept lowers SING's AS toward it in feature space (the translator's view)
    blue = sc[sc["concept"] == "a blue shape."].groupby("variant")["attribute_score_features"].mean()
    assert blue["steered"] < blue["original"] - 5
    summ = p.summary(n_boot=200)
    assert set(summ["statistic"]) == {"image_score_features", "image_score_images", "image_score_sample_features",
                                      "noise_floor"}
    assert len(p.figure.data) == 4 * 3 * 5  # per image and variant: a label cell and 4 samples
    assert len(p.score_figure.data) == 3 * 2


def test_equivalent_pictures_show_what_the_null_space_carried(pictures):
    """Measured (this fixture): samples at h land at relative distance 0.07 of h (resolution 0.92),
    logits within 0.019, and keep the image's background 15 times in 16; samples at h' (0.68 of whose norm lies in
    negative coordinates no pooled ReLU feature has: out of reach, target distance 0.98, logits off by 0.46) keep
    it 3 times in 16 and keep the classifier's class every time; in CLIP their set is further from the h set than
    the permutation noise floor."""
    s = pictures.samples.groupby("variant")
    kept = s["background_kept"].mean()
    print(s[["target_distance", "resolution", "logit_change", "same_class", "background_kept", "shape_kept"]]
          .mean().to_string())
    assert s["target_distance"].mean()["original"] < 0.2 and s["logit_change"].mean()["original"] < 0.1
    assert s["resolution"].mean()["original"] > 0.5  # the h samples' pre-logits tell h from h'
    assert kept["original"] > kept["principal"] + 0.3  # removing the null component removed the background
    assert s["same_class"].mean()["principal"] >= 0.9
    neg = pictures.targets.set_index("variant").loc["principal", "negative_part"]
    assert float(neg.min()) > 0.5  # why h' is out of reach: most of its norm is negative
    per = pictures.scores.drop_duplicates(["image", "variant"])
    orig = per[per["variant"] == "original"]
    assert float((orig["image_score_images"] - orig["noise_floor"]).mean()) > 0
