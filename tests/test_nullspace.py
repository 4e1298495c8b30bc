"""SING: head decomposition, exact logit equality under null-space edits, IS/AS, translator, steering."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fiberbench import toy
from fiberbench.errors import ConfigError, InputError
from fiberbench.identity import file_sha256
from fiberbench.nullspace import (
    Translator,
    angle_deg,
    attribute_score,
    factor_probe,
    fit_linear_probe,
    fit_translator,
    head_decomposition,
    image_score,
    load_translator,
    pre_logit_features,
    sing_scores,
    sing_summary,
    steer,
    steering_benchmark,
    steering_summary,
    steering_table,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------- tiny random models

@pytest.fixture(scope="module")
def tiny_resnet():
    import timm

    from fiberbench.models import Extractor

    torch.manual_seed(1)
    m = timm.create_model("resnet18", pretrained=False, num_classes=4, layers=(1, 1, 1, 1), channels=(8, 16, 16, 24),
                          stem_width=8)
    return Extractor(m, spec="test/tiny-resnet@logits", layer="logits", input_size=32, mean=[0.5] * 3,
                     std=[0.5] * 3, classes=["circle", "square", "triangle", "arrow"])


def _renders(n, seed):
    from fiberbench import toy

    return toy.references(n, seed)


# --------------------------------------------------------------------------- decomposition

def test_decomposition_of_a_linear_head_is_exact():
    torch.manual_seed(0)
    head = nn.Linear(16, 4)
    d = head_decomposition(head)
    assert (d.rank, d.null_dim, d.dim) == (4, 12, 16)
    # the null basis is annihilated by W, the projectors are complementary and idempotent
    assert float((d.weight @ d.null_basis).abs().max()) < 1e-12
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose(d.principal_projector + d.null_projector, eye, atol=1e-14)
    assert torch.allclose(d.null_projector @ d.null_projector, d.null_projector, atol=1e-12)
    # equivalent features: float32 logits through the module itself equal within 1e-5 relative
    h = torch.randn(64, 16) * 3
    h2 = d.equivalent(h)
    assert h2.dtype == torch.float32
    with torch.no_grad():
        a, b = head(h), head(h2)
    rel = float((a - b).abs().max() / a.abs().max())
    assert rel < 1e-5, rel
    assert float(d.logit_change(h.double(), d.equivalent(h.double())).max()) < 1e-12  # float64: exact to rounding
    # a huge null-space edit (100x the features' norm) keeps the logits too
    n = d.project_null(torch.randn(64, 16).double() * 300)
    assert float(d.logit_change(h.double(), h.double() + n).max()) < 1e-10
    # and the removed part is orthogonal to what stays
    assert float((d.null_component(h.double()) * d.equivalent(h.double())).sum(-1).abs().max()) < 1e-9


def test_rank_deficient_head_uses_the_documented_tolerance():
    torch.manual_seed(2)
    w = (torch.randn(5, 2) @ torch.randn(2, 10)).float()  # rank 2, stored in float32
    d = head_decomposition((w, torch.zeros(5)))
    assert d.rank == 2 and d.null_dim == 8
    s = d.singular_values
    assert math.isclose(d.tol, float(s.max()) * 10 * torch.finfo(torch.float32).eps, rel_tol=1e-12)
    assert float(s[2:].max()) < d.tol < float(s[1])
    with pytest.raises(InputError, match="dimension"):
        d.equivalent(torch.randn(3, 7))
    with pytest.raises(ConfigError, match="nn.Linear"):
        head_decomposition("resnet")


def test_decomposition_of_an_extractor_head(tiny_resnet):
    images, _ = _renders(12, 0)
    d = head_decomposition(tiny_resnet)
    assert d.spec == "test/tiny-resnet@logits" and (d.rank, d.null_dim) == (4, 20)
    h = pre_logit_features(tiny_resnet, images)
    with torch.no_grad():
        logits = tiny_resnet(images)
        assert torch.allclose(tiny_resnet.classifier()(h), logits, atol=1e-5)
        eq = tiny_resnet.classifier()(d.equivalent(h))
    assert float((eq - logits).abs().max() / logits.abs().max()) < 1e-5


# --------------------------------------------------------------------------- IS / AS

def _identity_translator(dim):
    return Translator(torch.eye(dim), torch.zeros(dim))


def test_image_score_is_zero_without_null_component_and_positive_with_it():
    torch.manual_seed(3)
    d = head_decomposition(nn.Linear(8, 3))
    tr = Translator(torch.randn(6, 8), torch.randn(6))
    h_principal = (torch.randn(10, 3).double() @ d.basis.T)  # lies in the row space of W
    is0 = image_score(h_principal, d, tr)
    assert float(is0.abs().max()) < 1e-6  # degrees
    h = torch.randn(10, 8).double()
    is1 = image_score(h, d, tr)
    assert bool((is1 > 1.0).all())
    # equals the angle between T h and T h' computed by hand
    manual = angle_deg(tr(h), tr(d.equivalent(h)))
    assert torch.allclose(is1, manual)


def test_attribute_score_sign_on_a_constructed_case():
    # logits see only e1; the null space is span(e2, e3); T = identity; concept = e2
    d = head_decomposition((torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(1)))
    tr = _identity_translator(3)
    t = torch.tensor([0.0, 1.0, 0.0])
    hiding = torch.tensor([1.0, -1.0, 0.0])   # null part points away from the concept: removing it helps
    carrying = torch.tensor([1.0, 1.0, 0.0])  # null part points toward the concept: removing it hurts
    assert float(attribute_score(hiding, d, tr, t)) == pytest.approx(45.0, abs=1e-9)   # 135 - 90
    assert float(attribute_score(carrying, d, tr, t)) == pytest.approx(-45.0, abs=1e-9)  # 45 - 90
    both = attribute_score(torch.stack([hiding, carrying]), d, tr, torch.stack([t, -t]))
    assert both.shape == (2, 2)
    assert torch.allclose(both, torch.tensor([[45.0, -45.0], [-45.0, 45.0]], dtype=torch.float64), atol=1e-9)
    assert float(image_score(hiding, d, tr)) == pytest.approx(45.0, abs=1e-9)


# --------------------------------------------------------------------------- translator

def test_translator_recovers_a_linear_map_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(600, 20, generator=g) * 2 + 1
    a_true, c_true = torch.randn(12, 20, generator=g), torch.randn(12, generator=g)
    y = F.normalize(x @ a_true.T + c_true + 0.05 * torch.randn(600, 12, generator=g), dim=-1)
    tr = fit_translator(None, None, features=x, targets=y, ridge=1e-4)
    m = tr.metrics
    assert m["n_train"] == 480 and m["n_heldout"] == 120
    # y is a *normalised* affine image of x: cosine is what a linear fit can match, and it does
    assert m["heldout_cosine"] > 0.97, m
    assert m["baseline_cosine"] < m["heldout_cosine"] - 0.1, m  # the constant prediction is clearly worse
    path = tr.save(tmp_path / "t.safetensors")
    back = load_translator(path)
    assert torch.equal(back.weight, tr.weight) and torch.equal(back.bias, tr.bias)
    assert back.metrics == m
    with pytest.raises(InputError, match="does not exist"):
        load_translator(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(InputError, match="not a translator"):
        load_translator(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match="ridge"):
        fit_translator(None, None, features=x, targets=y, ridge=-1)


def test_ridge_shrinks_toward_the_mean():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(200, 10, generator=g), F.normalize(torch.randn(200, 6, generator=g), dim=-1)
    big = fit_translator(None, None, features=x, targets=y, ridge=1e6, holdout=0.0)
    assert float(big.weight.abs().max()) < 1e-4  # all shrunk: T h ≈ mean of the targets
    assert torch.allclose(big.bias, y.double().mean(0), atol=1e-4)


# --------------------------------------------------------------------------- steering

def test_steering_reaches_the_analytic_optimum_and_keeps_logits():
    # W sees e1, e2; null space span(e3..e6); T = identity; target = e4 (in the null space)
    w = torch.zeros(2, 6)
    w[0, 0] = w[1, 1] = 1.0
    d = head_decomposition((w, torch.tensor([0.5, -0.5])))
    tr = _identity_translator(6)
    h = torch.tensor([[3.0, 4.0, 0, 0, 0, 0], [1.0, 0.0, 0, 0, 0, 0]])
    t = torch.zeros(6)
    t[3] = 1.0
    r = 2.0
    res = steer(h, t, r, decomposition=d, translator=tr, steps=300)
    # optimum: n = r e4, cos = r / sqrt(|h|^2 + r^2)
    expect = torch.tensor([r / math.sqrt(25 + r * r), r / math.sqrt(1 + r * r)], dtype=torch.float64)
    assert torch.allclose(res.cos_after, expect, atol=1e-4), (res.cos_after, expect)
    assert torch.allclose(res.cos_before, torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert float(res.delta.norm(dim=-1).max()) <= r + 1e-6
    assert float(res.logit_change.max()) < 1e-12
    # the steered null space now carries the concept: AS negative (angle to t shrank vs h' = h)
    expect_as = torch.rad2deg(torch.arccos(expect)) - 90.0
    assert torch.allclose(res.attribute_score, expect_as, atol=1e-2)
    # relative bound: 0.5 * ||h|| for the first row = 2.5
    rel = steer(h[0], t, 0.5, decomposition=d, translator=tr, relative_to="feature")
    assert float(rel.bound) == pytest.approx(2.5)
    assert float(rel.cos_after) == pytest.approx(2.5 / math.sqrt(25 + 6.25), abs=1e-4)
    with pytest.raises(ConfigError, match="relative_to"):
        steer(h, t, 1.0, decomposition=d, translator=tr, relative_to="logits")


def test_sing_frames_on_tiny_models(tiny_resnet, tiny_clip):
    images, factors = _renders(48, 1)
    tr = fit_translator(tiny_resnet, tiny_clip, images, ridge=1e-2)
    assert set(tr.metrics) >= {"heldout_cosine", "train_cosine", "n_train", "n_heldout"}
    concepts = ["a red shape", "a blue shape"]
    df = sing_scores(tiny_resnet, tiny_clip, tr, images[:10], concepts, labels=factors["shape"][:10])
    assert list(df.columns) == ["extractor", "clip", "image", "class", "label", "concept", "image_score",
                                "attribute_score", "null_fraction", "is_leak", "as_leak", "leak"]
    assert len(df) == 20 and df["image_score"].between(0, 180).all() and df["attribute_score"].abs().le(180).all()
    # leakage flags: SING's demo thresholds by default, any angles on request
    assert (df["is_leak"] == (df["image_score"] > 12)).all()
    assert (df["as_leak"] == (df["attribute_score"].abs() > 4)).all()
    assert (df["leak"] == (df["is_leak"] | df["as_leak"])).all()
    cut = float(df["image_score"].median())
    strict = sing_scores(tiny_resnet, tiny_clip, tr, images[:10], concepts, is_threshold=cut, as_threshold=0.0)
    assert strict["is_leak"].sum() == (df["image_score"] > cut).sum() > 0
    assert bool(strict["as_leak"].eq(df["attribute_score"].abs() > 0).all())
    with pytest.raises(ConfigError, match="is_threshold"):
        sing_scores(tiny_resnet, tiny_clip, tr, images[:2], concepts, is_threshold=-1)
    assert set(df["class"]) <= {"circle", "square", "triangle", "arrow"}
    summ = sing_summary(df, by=("extractor", "concept"), n_boot=200)
    assert set(summ["statistic"]) == {"image_score", "attribute_score", "null_fraction"}
    assert (summ["ci_low"] <= summ["mean"]).all() and (summ["mean"] <= summ["ci_high"]).all()

    tab = steering_table(tiny_resnet, tiny_clip, images[:10], "a photo of a jellyfish", translator=tr, steps=150)
    assert float(tab["logit_change"].max()) < 1e-5
    # steering toward the concept can only increase the cosine and lower the AS
    assert bool((tab["cos_after"] >= tab["cos_before"] - 1e-12).all())
    assert float(tab["attribute_score"].mean()) < float(tab["attribute_score_before"].mean())
    s = steering_summary(tab)
    assert len(s) == 1 and s["abs_as_mean"].iloc[0] > 0 and s["n"].iloc[0] == 10


def test_steering_benchmark_over_two_models(tiny_resnet, tiny_clip):
    import timm

    from fiberbench.models import Extractor

    torch.manual_seed(7)
    vit = Extractor(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=6, img_size=32,
                                      patch_size=8, embed_dim=24, depth=1, num_heads=2),
                    spec="test/tiny-vit@logits", layer="logits", input_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    images, _ = _renders(40, 3)
    per_image, summary = steering_benchmark([tiny_resnet, vit], tiny_clip, images[:8], "a photo of a jellyfish",
                                            fit_images=images, steps=100)
    assert len(per_image) == 16 and float(per_image["logit_change"].max()) < 1e-5
    assert list(summary["extractor"]) == sorted(["test/tiny-resnet@logits", "test/tiny-vit@logits"])
    assert {"abs_as_mean", "abs_as_std", "translator_heldout_cosine"} <= set(summary.columns)
    assert (summary["cos_after"] > summary["cos_before"]).all()


# --------------------------------------------------------------------------- the toy world (shipped models)

def _have(*names):
    from fiberbench.toy import cards as M

    missing = [n for n in names if n not in M.available()]
    return pytest.mark.skipif(bool(missing), reason=f"toy model(s) {missing} not trained yet (data/models)")


@_have("shape-resnet", "color-vit")
def test_toy_null_spaces_carry_the_augmented_factors():
    """Ground truth for SING's premise: what a linear probe reads from P_null h but not from P_principal h.

    Measured (800 renders, seed 4242, 240 held out): shape-resnet colour 0.45 null / 0.18 principal
    (chance ~0.17), background 1.0 / 0.53; color-vit shape 0.45 / 0.24 (chance ~0.25), background 1.0 / 0.45.
    """
    import fiberbench as fb

    images, fac = toy.references(800, 4242)
    acc = {}
    for spec in ("toy/shape-resnet@logits", "toy/color-vit@logits"):
        ext = fb.load_extractor(spec)
        d = head_decomposition(ext)
        h = pre_logit_features(ext, images)
        assert float(d.logit_change(h.double(), d.equivalent(h.double())).max()) < 1e-10
        for f in ("shape", "color", "background"):
            p = factor_probe(ext, images, fac[f], factor=f, decomposition=d, features=h).set_index("space")
            acc[(spec, f)] = p["accuracy"].to_dict() | {"chance": p["chance"].iloc[0]}
    sr, cv = "toy/shape-resnet@logits", "toy/color-vit@logits"
    # the shape classifier's head (rank 4) cannot read colour; its null space can
    assert acc[(sr, "color")]["principal"] < acc[(sr, "color")]["chance"] + 0.1, acc[(sr, "color")]
    assert acc[(sr, "color")]["null"] > acc[(sr, "color")]["principal"] + 0.2, acc[(sr, "color")]
    assert acc[(sr, "shape")]["principal"] > 0.95
    # the colour classifier: colour in the principal space, shape only in the null space
    assert acc[(cv, "color")]["principal"] > 0.95
    assert acc[(cv, "shape")]["null"] > acc[(cv, "shape")]["principal"] + 0.1, acc[(cv, "shape")]
    # background is invisible to both heads and fully present in both null spaces
    for spec in (sr, cv):
        assert acc[(spec, "background")]["null"] > 0.95 > acc[(spec, "background")]["principal"] + 0.25


@_have("shape-resnet", "color-vit")
def test_toy_sing_report_structure(tiny_clip):
    from fiberbench.nullspace import toy_sing_report

    rep = toy_sing_report(tiny_clip, n_fit=120, n_test=24, steer_images=6, steps=50, n_boot=100,
                          steer_concepts=("a red shape.",))
    tr = rep["translators"].set_index("extractor")
    assert tr.loc["toy/shape-resnet@logits", "rank"] == 4 and tr.loc["toy/color-vit@logits", "rank"] == 6
    sc = rep["scores"]
    # 24 images x (6 colours + 4 shapes) x 2 models; exactly one "own" colour and shape per image and model
    assert len(sc) == 24 * 10 * 2
    assert (sc[sc["is_true"]].groupby(["extractor", "group"]).size() == 24).all()
    pc = rep["per_class"]
    assert set(pc["statistic"]) == {"image_score", "attribute_score"}
    shape_classes = set(pc.loc[pc["extractor"] == "toy/shape-resnet@logits", "class"])
    assert shape_classes <= {"circle", "square", "triangle", "arrow"}
    st = rep["steering"]
    assert len(st) == 2 and float(st["max_logit_change"].max()) < 1e-5


@pytest.mark.slow
@_have("shape-resnet", "color-vit", "clip")
def test_toy_sing_with_the_shipped_clip():
    """On the toy CLIP: translators beat the constant predictor, and each null space carries the other factor."""
    import fiberbench as fb
    from fiberbench.nullspace import toy_sing_report

    rep = toy_sing_report(fb.load_clip("toy/clip"))
    print(rep["translators"].to_string())
    own = rep["scores"][rep["scores"]["is_true"]].groupby(["extractor", "group"])["attribute_score"].mean()
    print(own.to_string())
    print(rep["steering"].to_string())
    tr = rep["translators"].set_index("extractor")
    assert ((tr["heldout_cosine"] - tr["baseline_cosine"]) > 0.1).all(), tr
    sr, cv = "toy/shape-resnet@logits", "toy/color-vit@logits"
    # AS toward the image's own colour: the shape classifier's null space carries colour (more negative AS)
    assert own[(sr, "color")] < own[(cv, "color")]
    # and the colour classifier's null space carries shape
    assert own[(cv, "shape")] < own[(sr, "shape")]


# --------------------------------------------------------------------------- SING's own definitions

def _sing_angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SING's definition, written out: normalise, clamp the cosine to [-1, 1], arccos, degrees (float64)."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))


def _exact_angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The same angle in extended precision (numpy longdouble): the yardstick for small angles."""
    a, b = a.astype(np.longdouble), b.astype(np.longdouble)
    a = a / np.sqrt((a * a).sum(-1, keepdims=True))
    b = b / np.sqrt((b * b).sum(-1, keepdims=True))
    d, s = np.sqrt(((a - b) ** 2).sum(-1)), np.sqrt(((a + b) ** 2).sum(-1))
    return (2 * np.arctan2(d, s) * 180 / np.pi).astype(np.longdouble)


@pytest.mark.parametrize("dims", [(64, 32, 10), (512, 256, 100)])
def test_is_and_as_equal_sings_own_functions_on_float64_inputs(dims):
    d_feat, d_clip, c = dims
    g = torch.Generator().manual_seed(d_feat)
    w = torch.randn(c, d_feat, generator=g, dtype=torch.float64)
    dec = head_decomposition((w, torch.zeros(c, dtype=torch.float64)))
    tr = Translator(torch.randn(d_clip, d_feat, generator=g, dtype=torch.float64),
                    torch.randn(d_clip, generator=g, dtype=torch.float64))
    h = torch.randn(300, d_feat, generator=g, dtype=torch.float64)
    t = F.normalize(torch.randn(5, d_clip, generator=g, dtype=torch.float64), dim=-1)
    # SING's principal features h - h V_null V_nullᵀ are ours to float64 rounding
    v_null = dec.null_basis
    assert float((h - h @ v_null @ v_null.T - dec.equivalent(h)).abs().max()) < 1e-12 * float(h.abs().max())
    to, tp = tr(h).numpy(), tr(dec.equivalent(h)).numpy()  # the inputs SING's compute_is / compute_as see
    is_ours = image_score(h, dec, tr).numpy()
    as_ours = attribute_score(h, dec, tr, t).numpy()
    is_sing = _sing_angle(to, tp)
    as_sing = _sing_angle(to[:, None], t.numpy()[None]) - _sing_angle(tp[:, None], t.numpy()[None])
    assert 10 < is_sing.min() and is_sing.max() < 170  # generic angles, where arccos is well conditioned
    assert np.abs(is_ours - is_sing).max() < 1e-13
    assert np.abs(as_ours - as_sing).max() < 1e-13


def test_small_image_scores_are_exact_where_arccos_rounds():
    """At IS ~ 0.01 degrees SING's arccos loses ~1e-10 degrees to rounding; ours stays at ~1e-13."""
    g = torch.Generator().manual_seed(9)
    dec = head_decomposition((torch.randn(10, 64, generator=g, dtype=torch.float64), torch.zeros(10)))
    tr = Translator(torch.randn(32, 64, generator=g, dtype=torch.float64), torch.randn(32, generator=g,
                                                                                       dtype=torch.float64))
    h = torch.randn(200, 64, generator=g, dtype=torch.float64)
    h = 10 * dec.equivalent(h) + 1e-3 * dec.null_component(h)
    to, tp = tr(h).numpy(), tr(dec.equivalent(h)).numpy()
    exact = _exact_angle(to, tp)
    ours = image_score(h, dec, tr).numpy()
    assert 1e-3 < float(exact.min()) and float(exact.max()) < 0.1
    assert float(np.abs(ours - exact).max()) < 1e-13
    assert float(np.abs(_sing_angle(to, tp) - exact).max()) > 1e-12  # the arccos form is the coarse one here


# --------------------------------------------------------------------------- SING's model classes

def _tiny_timm(kind: str, num_classes: int = 5):
    import timm

    torch.manual_seed({"resnet": 11, "bit": 12, "dino": 13}[kind])
    if kind == "resnet":
        return timm.create_model("resnet18", pretrained=False, num_classes=num_classes, layers=(1, 1, 1, 1),
                                 channels=(8, 16, 16, 24), stem_width=8)
    if kind == "bit":  # GroupNorm(32) needs 32 | bottleneck width: channels 128 -> 32
        return timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=num_classes,
                                 channels=(128, 128, 128, 128), stem_chs=32)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                             embed_dim=24, depth=1, num_heads=2)  # DINO-style: a backbone without head


@pytest.fixture(scope="module")
def sing_classes(tmp_path_factory):
    """Tiny random ResNet, BiT (resnetv2, 1x1-conv head) and headless DINO-style ViT, saved as timm folders;
    the ViT gets a linear probe fitted on toy shapes."""
    from timm.models import save_for_hf

    import fiberbench as fb

    root = tmp_path_factory.mktemp("sing-classes")
    args = {"resnet": dict(num_classes=5, layers=(1, 1, 1, 1), channels=(8, 16, 16, 24), stem_width=8),
            "bit": dict(num_classes=5, channels=(128, 128, 128, 128), stem_chs=32),
            "dino": dict(num_classes=0, img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2)}
    for kind in args:
        save_for_hf(_tiny_timm(kind), str(root / kind), model_args=args[kind], safe_serialization=True)
    images, fac = toy.references(120, seed=77)
    backbone = fb.load_extractor(f"timm/{root / 'dino'}@pre_logits")
    probe = fit_linear_probe(backbone, images, fac["shape"], path=root / "probe.safetensors")
    return {"root": root, "probe": probe, "images": images, "factors": fac}


def test_classifier_heads_of_sings_model_classes(sing_classes):
    import fiberbench as fb

    root = sing_classes["root"]
    x, _ = toy.references(6, seed=78)
    heads = {}
    for kind, kw in (("resnet", {}), ("bit", {}), ("dino", {"linear_probe": root / "probe.safetensors"})):
        ext = fb.load_extractor(f"timm/{root / kind}@logits", **kw)
        head = ext.classifier()
        assert type(head) is nn.Linear and not head.weight.requires_grad
        with torch.no_grad():
            logits, h = ext(x), ext.pre_logits(x)
            assert float((head(h) - logits).abs().max()) <= 1e-5 * float(logits.abs().max())
        d = head_decomposition(ext)
        heads[kind] = (d.rank, d.null_dim, tuple(head.weight.shape))
        # exact in float64; the probe's dropped direction (below the float32 tolerance) moves logits by ~5e-7
        assert float(d.logit_change(h.double(), d.equivalent(h.double())).max()) < (1e-5 if kind == "dino" else 1e-10)
    # a penalised softmax probe's rows sum to zero: rank C - 1 (its 4th singular value is ~1e-8 of the 1st;
    # that direction shifts all logits alike, which no softmax sees)
    assert heads == {"resnet": (5, 19, (5, 24)), "bit": (5, 123, (5, 128)), "dino": (3, 21, (4, 24))}
    # the BiT head is a 1x1 convolution; classifier() returns the same map as a Linear sharing its weights
    bit = fb.load_extractor(f"timm/{root / 'bit'}@logits")
    conv = bit.model.get_classifier()
    assert isinstance(conv, nn.Conv2d) and bit.classifier().weight.data_ptr() == conv.weight.data_ptr()
    # the probe carries its classes and its file's checksum
    dino = fb.load_extractor(f"timm/{root / 'dino'}@logits", linear_probe=root / "probe.safetensors")
    assert dino.classes == ["arrow", "circle", "square", "triangle"]
    assert dino.card["linear_probe"]["sha256"] == file_sha256(root / "probe.safetensors")
    assert sing_classes["probe"].train_accuracy > 0.5  # a random 1-block ViT's CLS token still separates shapes
    headless = fb.load_extractor(f"timm/{root / 'dino'}@logits")
    with pytest.raises(ConfigError, match="no classifier head.*linear_probe"):
        headless.classifier()
    with pytest.raises(ConfigError, match=r"weight \[C,24\]"):
        headless.set_linear_head(torch.randn(3, 7))


def test_table1_protocol_on_tiny_dino_vit_bit_and_resnet(sing_classes, tiny_clip):
    import fiberbench as fb

    root = sing_classes["root"]
    exts = [fb.load_extractor(f"timm/{root / 'resnet'}@logits"), fb.load_extractor(f"timm/{root / 'bit'}@logits"),
            fb.load_extractor(f"timm/{root / 'dino'}@logits", linear_probe=root / "probe.safetensors")]
    images = sing_classes["images"]
    per_image, summary = steering_benchmark(exts, tiny_clip, images[:10], "jellyfish", fit_images=images, steps=80)
    assert len(per_image) == 30 and float(per_image["logit_change"].max()) < 1e-5
    assert set(summary["extractor"]) == {e.spec for e in exts}
    # steering toward "jellyfish" raises the cosine and opens a non-zero |AS| for every class of model
    assert (summary["cos_after"] > summary["cos_before"]).all()
    assert (summary["abs_as_mean"] > 0.1).all() and (summary["abs_as_mean"] < 180).all()
    assert summary["translator_heldout_cosine"].between(-1, 1).all()


def test_fit_linear_probe_recovers_a_linear_rule_and_refuses_bad_input(tmp_path):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 6, generator=g) * torch.tensor([1.0, 5.0, 0.1, 1.0, 1.0, 1.0]) + 2.0
    y = np.where(x[:, 1] > 2.0, "up", "down")
    probe = fit_linear_probe(None, features=x, labels=y, path=tmp_path / "p.safetensors")
    assert probe.classes == ["down", "up"] and probe.train_accuracy > 0.97
    assert probe.weight.shape == (2, 6) and probe.weight.dtype == torch.float32
    w = probe.weight[1] - probe.weight[0]
    assert float(w[1].abs()) > 5 * float(w[[0, 2, 3, 4, 5]].abs().max())  # it reads the one coordinate that matters
    with pytest.raises(InputError, match="two classes"):
        fit_linear_probe(None, features=x, labels=["a"] * 400)
    with pytest.raises(InputError, match="one label per row"):
        fit_linear_probe(None, features=x, labels=["a", "b"])
