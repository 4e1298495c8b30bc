"""Widgets as objects: click the buttons in Python, then check the gallery and the figures' numbers."""
import gc
import re
import time

import numpy as np
import pandas as pd
import pytest
import torch

import fiberbench as fb
from fiberbench.widgets import FiberGallery, ModelPicker

torch.set_num_threads(1)

N, STEPS = 3, 3


def _clip():
    """The shipped toy CLIP if it is there, else a tiny random open_clip CLIP (scores are then arbitrary,
    but every number below is checked against the same model)."""
    if "toy/clip" in fb.list_models(kind="clip"):
        return fb.load_clip("toy/clip")
    from conftest import build_tiny_clip

    return build_tiny_clip()


@pytest.fixture(scope="module")
def clip():
    return _clip()


@pytest.fixture
def gallery(tmp_path, clip, prior_fm, shape_resnet):
    picker = ModelPicker(extractor="toy/shape-resnet@logits", prior="toy/prior-fm")
    picker.add_model("prior", prior_fm)
    picker.add_model("extractor", shape_resnet)
    picker.add_model("clip", clip)
    return FiberGallery(picker, store=tmp_path / "store", n=N, steps=STEPS, seed=0)


def test_picker_lists_toy_models_first_and_shows_cards():
    p = ModelPicker()
    toy_ext = [s for s in p.extractor.options if s.startswith("toy/")]
    assert toy_ext and list(p.extractor.options[:len(toy_ext)]) == toy_ext
    assert p.prior.options[0] == "toy/prior-fm"
    assert "@" not in "".join(p.extractor.options)  # layers are chosen in their own dropdown
    assert p.extractor_spec == f"{p.extractor.value}@{p.layer.value}"
    assert "pre_logits" in p.layer.options
    assert "toy/prior-fm" in p.card.value and "kind" in p.card.value


def test_picker_reports_a_bad_spec_in_its_output():
    p = ModelPicker()
    p.custom.value = "toy/shape-resnt"
    p.load_button.click()
    assert len(p.errors) == 1 and p.errors[0].startswith("ConfigError")
    assert "did you mean" in p.errors[0] and "toy/shape-resnet" in p.errors[0]
    html = p.out.outputs[-1]["data"]["text/html"]
    assert "fb-error" in html and "ConfigError" in html and "Traceback" not in html
    assert "could not load" in p.status.value
    p.custom.value = "toy/shape-resnet@pre_logits"
    p.load_button.click()
    assert len(p.errors) == 1 and p.extractor_spec == "toy/shape-resnet@pre_logits"
    assert p.load_extractor()(torch.rand(2, 3, 32, 32)).shape[1] > 4  # pre-logit width, not 4 classes


def test_gallery_run_click_then_store_hit(gallery, clip):
    g = gallery
    g.run_button.click()
    g.wait(300)
    assert g.errors == [], g.errors
    assert g.last_run["from_store"] is False and not g.last_run["stopped"]
    # live progress reached the end; the live loss curve got one point per step
    assert g.progress.value == g.progress.max == STEPS
    assert len(g.loss_figure.data[0].y) == STEPS
    per_step = [np.nanmean(r) if np.isfinite(r).any() else np.nan for r in g.result.loss_history.numpy()]
    np.testing.assert_allclose(np.asarray(g.loss_figure.data[0].y, float), per_step, equal_nan=True, rtol=1e-6)
    assert all(v is None or np.isfinite(v) for v in g.loss_figure.data[0].y)  # JSON-safe: a gap, never a NaN
    # the gallery: reference first, then the samples sorted by feature distance
    fr = g.frame
    assert len(g.cells) == N + 1 and len(g.grid.children) == N + 1
    assert "fb-gallery-reference" in g.cells[0]._dom_classes
    d = fr["feature_distance"].to_numpy()
    assert (np.diff(d) >= 0).all()
    np.testing.assert_array_equal(d, g.result.feature_distance[torch.as_tensor(fr["sample"].to_numpy())].numpy())
    # the distance chart shows exactly those numbers, in that order
    np.testing.assert_allclose(np.asarray(g.distance_figure.data[0].y, float), d)
    assert list(g.distance_figure.data[0].x) == [f"s{s}" for s in fr["sample"]]
    # captions and hover carry the distance and the CLIP angle of each sample
    for cell, (_, row) in zip(g.cells[1:], fr.iterrows()):
        img, cap, _ = cell.children
        assert f"d={row.feature_distance:.3g}" in cap.value
        assert f"{row.clip_angle:.1f}°" in cap.value
        assert re.search(r"title='[^']*feature distance " + f"{row.feature_distance:.4f}", cap.value)  # hover
    # CLIP angles equal the angle between sample and reference embeddings
    emb = clip.embed_images(g.result.images)
    ref = clip.embed_images(g.result.reference)
    ang = torch.rad2deg(torch.arccos((emb @ ref[0]).clamp(-1, 1).double())).numpy()
    np.testing.assert_allclose(fr["clip_angle"].to_numpy(), ang[fr["sample"].to_numpy()], atol=1e-3)
    # "Δ" shows the attribute deltas of that sample
    s = int(fr["sample"].iloc[-1])
    g.cells[-1].children[2].click()
    assert f"sample {s}" in g.details.value and "<table" in g.details.value
    for grp in ("shape", "color"):
        assert f"<td style='padding:2px 8px'>{grp}</td>" in g.details.value
    first = g.result.images.clone()
    t_first = g.last_run["seconds"]

    # same configuration again: loaded from the store, identical pixels, much faster
    g.run_button.click()
    g.wait(60)
    assert g.last_run["from_store"] is True
    assert torch.equal(g.result.images, first)
    assert g.last_run["seconds"] < t_first
    assert "loaded from the store" in g.status.value
    from fiberbench.plots import image_to_png
    assert [w.value for w in g._preview_images] == [image_to_png(first[k], scale=2) for k in range(N)]
    assert len(g.loss_figure.data[0].y) == STEPS  # the stored loss history is drawn again


def test_gallery_stop_ends_the_run_and_stores_nothing(gallery):
    g = gallery
    g.steps.value = 60
    g.run_button.click()
    t0 = time.time()
    while g.progress.value < 1 and time.time() - t0 < 120:
        time.sleep(0.05)
    g.stop()
    g.wait(120)
    assert not g.running
    assert g.last_run.get("stopped") is True
    assert g.progress.value < 60
    assert "stopped" in g.status.value and g.errors == []
    assert len(g.store) == 0
    assert g.run_button.disabled is False and g.stop_button.disabled is True


def test_gallery_shows_errors_in_the_widget(gallery):
    g = gallery
    g.ref_source.value = "upload"  # nothing uploaded
    g.threaded = False
    g.run_button.click()
    assert len(g.errors) == 1 and g.errors[0].startswith("InputError") and "upload" in g.errors[0]
    assert "fb-error" in g.out.outputs[-1]["data"]["text/html"]
    assert "failed" in g.status.value


def test_gallery_uses_a_given_reference_and_holds_no_graphs(gallery):
    g = gallery
    g.threaded = False
    ref, _ = fb.toy.references(1, seed=5)
    g.set_reference(ref[0], "my reference")
    g.run_button.click()
    assert g.errors == []
    assert torch.equal(g.result.reference[0], ref[0])
    assert not g.result.images.requires_grad and g.result.images.grad_fn is None

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    g.run_button.click()  # first store hit warms one-off caches (text embeddings, file checksums)
    counts = []
    for _ in range(6):  # store hits: repeated runs must not accumulate tensors
        g.run_button.click()
        assert g.last_run["from_store"] is True
        counts.append(live_tensors())
    assert counts[-1] - counts[0] <= 0, counts


# --------------------------------------------------------------------------- explorers

@pytest.fixture(scope="module")
def scored(prior_fm, shape_resnet):
    """Oracle-scored fibers of 4 references (ground-truth labels; sample quality does not matter here)."""
    from fiberbench.semantics import score_fiber_oracle

    refs, fac = fb.toy.references(4, seed=2)
    res = fb.sample_fiber(prior_fm, shape_resnet, refs, n=3, steps=2, preset="toy", progress=False,
                          reference_ids=[f"r{i}" for i in range(4)])
    sc = score_fiber_oracle(res, classes=list(fac["shape"]))
    return pd.concat([sc, sc.assign(extractor="copy")], ignore_index=True)


def test_class_stats_explorer_numbers(scored):
    from fiberbench.widgets import ClassStatsExplorer

    ex = ClassStatsExplorer(scored, n_boot=200)
    assert ex.errors == []
    # bars: one trace per attribute, two extractor panels; heights are the per-class mean change rates
    assert len(ex.figure.data) == 2 * len(ex.statistics.value)
    tr = next(t for t in ex.figure.data if t.name == "color" and t.xaxis in (None, "x"))
    ext = ex.stats.extractor.unique()[0]
    for cls, y in zip(tr.x, tr.y):
        rows = scored[(scored.extractor == ext) & (scored["class"] == cls)]
        want = rows["color_changed"].astype("Float64").astype(float).mean()
        assert y == pytest.approx(want, abs=1e-12)
    # side by side: deselect one extractor -> one panel
    ex.extractors.value = ("copy",)
    assert len(ex.figure.data) == len(ex.statistics.value)
    ex.kind.value = "heatmap"
    assert [t.type for t in ex.figure.data] == ["heatmap"]
    z = np.asarray(ex.figure.data[0].z, float)
    assert np.nanmin(z) >= 0 and np.nanmax(z) <= 1
    ex.kind.value = "box"
    assert ex.figure.data[0].type == "box"
    ex.statistics.value = ()
    assert ex.errors and ex.errors[-1].startswith("InputError")


def test_null_space_explorer_scores_and_steering(shape_resnet):
    from fiberbench.widgets import NullSpaceExplorer

    clip = _clip()
    imgs, fac = fb.toy.references(48, seed=3)
    ns = NullSpaceExplorer(shape_resnet, clip, imgs[:12], ["red", "circle"], labels=list(fac["shape"][:12]),
                           fit_images=imgs, steps=60)
    assert ns.errors == []
    sub = ns.scores[ns.scores.concept == "red"]
    assert len(ns.scores) == 24 and (sub.image_score >= 0).all() and (sub.image_score <= 180).all()
    bar = next(t for t in ns.figure.data if t.name == "attribute_score")
    for cls, y in zip(bar.x, bar.y):
        assert y == pytest.approx(sub[sub["class"] == cls].attribute_score.mean(), abs=1e-9)
    share = f"{sub.is_leak.mean():.0%} / {sub.as_leak.mean():.0%} of images"  # sing_scores' flags, not constants
    assert share in ns.summary.value and "IS > 12°" in ns.summary.value, ns.summary.value
    ns.view.value = "per image"
    assert sum(int(np.isfinite(np.asarray(t.y, float)).sum()) for t in ns.figure.data) == 12
    ns.target.value = "blue"
    ns.steer_button.click()
    assert ns.errors == []
    t = ns.steering
    assert len(t) == 12 and t.logit_change.max() <= 1e-5  # the logits did not move
    assert (t.cos_after >= t.cos_before - 1e-9).all()  # steering never moves away from the concept
    assert "achieved |AS|" in ns.steer_result.value
    ns.target.value = " "
    ns.steer_button.click()
    assert ns.errors[-1].startswith("ConfigError")
