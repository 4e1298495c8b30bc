"""The shortcut audit: a biased world, a classifier that takes the colour shortcut, and fibers that show it.

Numbers are measured on fresh seeds (neither the training seeds >= 10**6 nor the cards' 12345).
"""
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import build_tiny_clip

# notebook helpers of test_notebooks (tests/ is on sys.path under pytest); `kernel` is its module-scoped fixture
from test_notebooks import FLOAT, kernel, mime_count, number, run_notebook  # noqa: F401, F811

import fiberbench as fb
from fiberbench import shortcut as S
from fiberbench.errors import ConfigError, InputError
from fiberbench.toy import cards as M
from fiberbench.toy.evaluate import eval_shortcut, paired_values, pairing_factors
from fiberbench.toy.world import FACTORS, sample_factors

torch.set_num_threads(1)
FRESH = 4242
REFS, N = 8, 3  # fibers: 8 references x 3 samples per model (about 1 min per model on a busy 2-core machine)


def _needs(name):
    if name not in M.available():
        pytest.fail(f"toy model {name} is not shipped in data/models")


# --------------------------------------------------------------------------- the biased world and its measurement

def test_bias_pairing_is_what_the_docs_say():
    f = sample_factors(4000, seed=FRESH, bias={"pair": ("shape", "color"), "strength": 0.9})
    paired = np.array(paired_values("shape", "color", f["shape"])) == f["color"].to_numpy()
    # with prob. 0.9 paired, else uniform over 6 colours (1/6 of which is paired again): 0.9 + 0.1 / 6
    assert abs(paired.mean() - (0.9 + 0.1 / 6)) < 0.015
    assert paired_values("shape", "color", FACTORS["shape"]) == ["red", "green", "blue", "yellow"]
    # deterministic per seed
    pd.testing.assert_frame_equal(f, sample_factors(4000, seed=FRESH, bias={"pair": ("shape", "color"),
                                                                            "strength": 0.9}))
    held = pairing_factors(500, FRESH, holds=True)
    broken = pairing_factors(500, FRESH, holds=False)
    assert (np.array(paired_values("shape", "color", held["shape"])) == held["color"]).all()
    assert not (np.array(paired_values("shape", "color", broken["shape"])) == broken["color"]).any()
    assert set(broken["color"]) == {"red", "green", "blue", "yellow"}  # another shape's colour, never magenta/cyan


def test_eval_shortcut_on_known_answers(oracle):
    """The oracle's shape head has no shortcut; its colour head read as a shape classifier is all shortcut."""
    shape_head = lambda x: oracle.logits(x)["shape"]  # noqa: E731
    colour_as_shape = lambda x: oracle.logits(x)["color"][:, :4]  # noqa: E731  (red->circle, green->square, ...)
    honest = eval_shortcut(shape_head, n=300, seed=FRESH)
    assert honest["acc_shape_paired"] >= 0.99 and honest["acc_shape_broken"] >= 0.99
    assert abs(honest["shortcut_gap"]) <= 0.01 and honest["follows_cue_broken"] <= 0.01
    cheat = eval_shortcut(colour_as_shape, n=300, seed=FRESH)
    assert cheat["acc_shape_paired"] >= 0.99 and cheat["acc_shape_broken"] <= 0.01
    assert cheat["follows_cue_broken"] >= 0.99 and cheat["shortcut_gap"] >= 0.98


def test_shortcut_resnet_takes_the_shortcut_and_its_card_says_so(shape_resnet):
    _needs("shortcut-resnet")
    card = M.read_card("shortcut-resnet")
    assert card["training"]["bias"]["pair"] == ["shape", "color"] and card["augment"] == []
    assert card["architecture"] == M.read_card("shape-resnet")["architecture"]  # same timm architecture
    m = card["metrics"]
    assert m["acc_shape_paired"] >= 0.95 and m["acc_shape_broken"] <= 0.6
    ext = fb.load_extractor("toy/shortcut-resnet@logits")
    fresh = eval_shortcut(ext, n=600, seed=FRESH)
    assert fresh["acc_shape_paired"] >= 0.95, fresh
    assert fresh["acc_shape_broken"] <= 0.6, fresh
    assert fresh["follows_cue_broken"] >= 0.3, fresh  # wrong answers mostly name the class of the colour shown
    honest = eval_shortcut(shape_resnet, n=600, seed=FRESH)  # the augmented twin has no gap
    assert honest["acc_shape_broken"] >= 0.97 and abs(honest["shortcut_gap"]) <= 0.03, honest


def test_intervention_ground_truth(shape_resnet):
    _needs("shortcut-resnet")
    cut = S.intervention(fb.load_extractor("toy/shortcut-resnet@logits"), n=300, seed=FRESH).set_index("factor")
    honest = S.intervention(shape_resnet, n=300, seed=FRESH).set_index("factor")
    assert cut["change"].idxmax() == "color" and honest["change"].idxmax() == "shape"
    assert cut.loc["color", "change"] > 2 * cut.loc["shape", "change"]
    assert honest.loc["color", "change"] < 0.1 < 0.8 < honest.loc["shape", "change"]
    with pytest.raises(ConfigError, match="unknown factor"):
        S.intervention(shape_resnet, factors=["hue"])


# --------------------------------------------------------------------------- retention on exact fibers

def _result(images, reference, n, extractor="toy/x@logits"):
    from fiberbench.sampling import FiberResult

    m = images.shape[0]
    return FiberResult(images=images, reference=reference, feature_distance=torch.zeros(m), cosine=torch.ones(m),
                       status=["ok"] * m, config={"n": n, "run_id": "r0", "extractor": extractor, "method": "ndtm"})


def test_retention_counts_exactly_on_constructed_fibers(oracle):
    """Fiber 0 = colour-only interventions of its reference, fiber 1 = shape-only ones: retention is exact."""
    from fiberbench.toy.world import intervene, render

    ref_f = sample_factors(2, seed=FRESH)
    fib0 = pd.concat([intervene(ref_f.iloc[[0]], "color", seed=s) for s in range(4)], ignore_index=True)
    fib1 = pd.concat([intervene(ref_f.iloc[[1]], "shape", seed=s) for s in range(4)], ignore_index=True)
    res = _result(render(pd.concat([fib0, fib1], ignore_index=True)), render(ref_f), 4)
    df = S.retention(res, oracle, ["shape", "color", "background"], reference_labels=ref_f)
    assert len(df) == 6 and set(df.columns) >= {"reference", "factor", "retention", "chance", "n", "reference_value"}
    r = df.set_index(["reference", "factor"])["retention"]
    assert r[(0, "shape")] == 1 and r[(0, "color")] == 0 and r[(0, "background")] == 1
    assert r[(1, "shape")] == 0 and r[(1, "color")] == 1 and r[(1, "background")] == 1
    assert df.set_index("factor").loc["color", "chance"].iloc[0] == pytest.approx(1 / 6)
    # only_valid with the oracle: clean renders are all valid, so nothing changes; junk is not counted
    res.images[:2] = torch.rand(2, 3, 32, 32)
    dv = S.retention(res, oracle, ["shape"], only_valid=True)
    assert dv.loc[0, "n"] == 2 and dv.loc[1, "n"] == 4
    summ = S.retention_summary(df)
    assert summ.set_index("factor").loc["background", "mean"] == 1
    assert set(summ.columns) >= {"mean", "ci_low", "ci_high", "chance", "n_references"}
    with pytest.raises(InputError, match="judge"):
        S.retention(res, object(), ["shape"])
    with pytest.raises(ConfigError, match="valid="):
        S.retention(res, build_tiny_clip(16), ["shape"], only_valid=True)


# --------------------------------------------------------------------------- retention on sampled fibers

@pytest.fixture(scope="module")
def fibers(prior_fm, shape_resnet):
    """Fibers of both models through the same 8 fresh references (4 where the pairing holds, 4 broken)."""
    _needs("shortcut-resnet")
    from fiberbench.toy.world import render

    f = pd.concat([pairing_factors(REFS // 2, FRESH, holds=True), pairing_factors(REFS // 2, FRESH + 1, holds=False)],
                  ignore_index=True)
    refs = render(f)
    out = {}
    for name, ext in (("shortcut-resnet", fb.load_extractor("toy/shortcut-resnet@logits")),
                      ("shape-resnet", shape_resnet)):
        out[name] = fb.sample_fiber(prior_fm, ext, refs, n=N, preset="toy", seed=FRESH, progress=False)
    return f, out


def test_shortcut_fibers_keep_colour_and_let_shape_drift(fibers, oracle):
    f, res = fibers
    frames = [S.retention(r, oracle, reference_labels=f, only_valid=True) for r in res.values()]
    df = pd.concat(frames, ignore_index=True)
    summ = S.retention_summary(df, n_boot=500).set_index(["extractor", "factor"])
    print(summ.round(3).to_string())
    valid = {k: int(fr.groupby("reference")["n"].first().sum()) for k, fr in zip(res, frames)}
    print("oracle-valid samples:", valid, "of", REFS * N)
    assert min(valid.values()) >= REFS * N // 4, valid  # enough valid samples for the statistic to mean anything
    cut, honest = "toy/shortcut-resnet@logits", "toy/shape-resnet@logits"
    chance_color = 1 / 6
    assert summ.loc[(cut, "color"), "mean"] >= chance_color + 0.4  # well above chance
    assert summ.loc[(cut, "color"), "mean"] > summ.loc[(honest, "color"), "mean"] + 0.3
    assert summ.loc[(honest, "shape"), "mean"] > summ.loc[(cut, "shape"), "mean"] + 0.3
    # the fiber statement agrees with the intervention: the most retained factor is the one that moves the logits
    assert summ.loc[cut]["mean"].idxmax() == "color" and summ.loc[honest]["mean"].idxmax() == "shape"
    assert S.describe(summ.reset_index(), cut).startswith(f"{cut} keeps color")


def test_paper_readout_colour_label_agreement(fibers, oracle):
    """Shortcut fibers follow the references' colour-label agreement; the honest model's follow the prior's."""
    from fiberbench.toy.world import render

    f, res = fibers
    prior_images = render(sample_factors(600, FRESH + 9))  # the world the toy prior was trained on
    agree = {k: S.label_agreement(r, oracle, reference_labels=f, prior_images=prior_images, only_valid=True)
             for k, r in res.items()}
    for k, a in agree.items():
        print(k, a[["reference_agrees", "n", "fiber_agreement", "prior_agreement"]].round(2).to_dict("list"))
    cut, honest = agree["shortcut-resnet"].dropna(), agree["shape-resnet"].dropna()
    assert abs(cut["prior_agreement"].mean() - 1 / 6) < 0.07
    # shortcut: agreement near 1 where the references agree (pairing holds) and near 0 where they do not
    to_query = (cut["fiber_agreement"] - cut["reference_agrees"]).abs().mean()
    to_prior = (cut["fiber_agreement"] - cut["prior_agreement"]).abs().mean()
    assert to_query < to_prior, (to_query, to_prior)
    h_query = (honest["fiber_agreement"] - honest["reference_agrees"]).abs().mean()
    h_prior = (honest["fiber_agreement"] - honest["prior_agreement"]).abs().mean()
    assert h_prior < h_query, (h_prior, h_query)


def test_clip_and_oracle_retention_agree(fibers, oracle):
    if "toy/clip" not in fb.list_models(kind="clip"):
        pytest.skip("toy/clip is not shipped yet (still training): the CLIP-judged retention needs it")
    clip = fb.load_clip("toy/clip")
    f, res = fibers
    rows = []
    for r in res.values():
        valid = oracle.predict(r.images)["valid"].to_numpy()
        o = S.retention(r, oracle, only_valid=True)
        c = S.retention(r, clip, only_valid=True, valid=valid)
        rows.append(o.merge(c, on=["extractor", "reference", "factor"], suffixes=("_oracle", "_clip")))
    both = pd.concat(rows, ignore_index=True)
    per = both.groupby(["extractor", "factor"])[["retention_oracle", "retention_clip"]].mean()
    print(per.round(3).to_string())
    assert (per["retention_oracle"] - per["retention_clip"]).abs().max() <= 0.2, per
    for ext in per.index.get_level_values(0).unique():
        assert per.loc[ext]["retention_clip"].idxmax() == per.loc[ext]["retention_oracle"].idxmax()


def test_plot_and_gallery(fibers, oracle, tmp_path):
    f, res = fibers
    df = pd.concat([S.retention(r, oracle, reference_labels=f) for r in res.values()], ignore_index=True)
    summ = S.retention_summary(df, n_boot=200)
    fig = S.retention_plot(summ)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 2 and {t.name for t in bars} == set(summ["extractor"])
    for t in bars:
        sub = summ[summ["extractor"] == t.name].set_index("factor")
        assert np.allclose(np.asarray(t.y, float), sub.loc[list(t.x), "mean"].to_numpy(float))
        assert np.allclose(np.asarray(t.error_y.array, float),
                           (sub.loc[list(t.x), "ci_high"] - sub.loc[list(t.x), "mean"]).to_numpy(float))
    chance = next(t for t in fig.data if t.name == "chance")
    assert np.allclose(chance.y, [1 / 4, 1 / 6, 1 / 3])
    labels = {k: S.judge_labels(oracle, r.images) for k, r in res.items()}
    g = S.fiber_gallery(res, reference=0, labels=labels, max_samples=N)
    assert len(g.data) == 2 * (N + 1)
    with pytest.raises(InputError, match="missing column"):
        S.retention_plot(summ.drop(columns="chance"))


def test_notebook_07_runs_top_to_bottom(kernel):  # noqa: F811 - the fixture imported above
    _needs("shortcut-resnet")
    nb, text = run_notebook(kernel, "07_shortcut_audit", dict(REFERENCES=2, N=2, STEPS=3, N_EVAL=200, N_BOOT=100,
                                                              CLIP=None, SEED=FRESH), timeout=300)
    paired = number(text, r"accuracy where the pairing holds: " + FLOAT)
    broken = number(text, r"accuracy where it is broken: " + FLOAT)
    assert paired >= 0.95 and broken <= 0.6
    assert re.search(r"intervention: shortcut-resnet moves most with color, shape-resnet with shape", text), text
    assert mime_count(nb, "application/vnd.plotly.v1+json") == 4  # data grid, two galleries, retention plot
    assert "SHORTCUT_DONE 8" in text  # 2 models x 2 references x 2 samples
