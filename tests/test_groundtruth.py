"""Ground-truth invariance benchmark (fiberbench.bench.invariance) and the partial-invariance toy encoder."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fiberbench.bench import invariance as G
from fiberbench.errors import ConfigError, InputError
from fiberbench.models import Extractor
from fiberbench.semantics import expected_plugin_entropy
from fiberbench.toy import FACTORS
from fiberbench.toy import cards as M

torch.set_num_threads(1)

needs = {name: pytest.mark.skipif(name not in M.available(), reason=f"toy/{name} not shipped yet")
         for name in ("shape-resnet", "color-vit", "simclr-resnet", "oracle", "prior-fm")}


# --------------------------------------------------------------------------- scores

def test_recovery_auroc_counts_pairs_and_ties():
    true = [0.9, 0.85, 0.1, 0.0, 0.5]
    # invariant estimates 0.9, 0.5; sensitive 0.6, 0.1; the partial pair (0.5) is left out
    assert G.recovery_auroc(true, [0.9, 0.5, 0.6, 0.1, -5.0]) == pytest.approx(3 / 4)
    assert G.recovery_auroc(true, [1.0, 0.9, 0.1, 0.0, 0.5]) == 1.0
    assert G.recovery_auroc(true, [0.0, 0.1, 0.9, 1.0, 0.5]) == 0.0
    assert G.recovery_auroc(true, [0.5, 0.5, 0.5, 0.5, 0.5]) == 0.5
    # a NaN estimate drops its pair: 0.9 vs {0.6, 0.1} -> 1.0
    assert G.recovery_auroc(true, [0.9, np.nan, 0.6, 0.1, 0.3]) == 1.0
    assert math.isnan(G.recovery_auroc([0.9, 0.95], [0.1, 0.2]))  # no sensitive pair


def test_rank_correlation_is_spearman_on_finite_pairs():
    from scipy.stats import spearmanr

    t = [0.0, 0.1, 0.5, 0.9, 1.0, 0.3]
    e = [0.2, 0.1, 0.7, 0.8, 1.1, np.nan]
    assert G.rank_correlation(t, e) == pytest.approx(spearmanr(t[:5], e[:5]).statistic)
    assert G.rank_correlation(t[:5], [0.2, 0.1, 0.7, 0.8, 1.1]) == pytest.approx(0.9)
    assert math.isnan(G.rank_correlation([0.1, 0.2], [0.3, 0.4]))


def test_rank_correlation_ceiling_is_the_ideal_fiber_estimators_spearman():
    from scipy.stats import spearmanr

    # invariant pairs with distinct true scores: the ideal estimate ties them at 1.0
    t = [0.0, 0.1, 0.35, 0.86, 0.9, 0.97, 1.0]
    ideal = [0.0, 0.1, 0.35, 1.0, 1.0, 1.0, 1.0]
    assert G.rank_correlation_ceiling(t) == pytest.approx(spearmanr(t, ideal).statistic)
    assert G.rank_correlation_ceiling(t) < 0.93  # 1 would need the order among the four invariant pairs
    assert G.rank_correlation_ceiling([0.0, 0.1, 0.5, 1.0, 1.0]) == pytest.approx(1.0)  # nothing to order
    # a method's ceiling counts only the pairs it estimated
    e = [0.1, np.nan, 0.4, 0.9, 1.0, 1.1, np.nan]
    assert G.rank_correlation_ceiling(t, e) == pytest.approx(
        spearmanr([0.0, 0.35, 0.86, 0.9, 0.97], [0.0, 0.35, 1, 1, 1]).statistic)
    # the measured truth of the shipped extractors (docs/invariance_bench.md, 1000 references, seed 0):
    # 21 invariant pairs between 0.86 and 1.00, so even the ideal estimator stays below the 0.8
    measured = [0.00, 0.97, 0.94, 0.97, 0.97, 0.97, 0.96, 0.00, 0.91, 0.35, 0.92, 0.89, 0.87, 0.88,
                0.99, 0.00, 0.99, 0.99, 1.00, 1.00, 0.99, 0.00, 0.87, 0.00, 0.87, 0.87, 0.86, 0.13]
    assert G.rank_correlation_ceiling(measured) == pytest.approx(0.762, abs=0.002)


# --------------------------------------------------------------------------- fiber statistics on hand-made frames

def _frame(rows):
    base = {"shape": "circle", "color": "red", "background": "black", "size": 0.25, "x": 0.5, "y": 0.5,
            "mirror": False, "valid": True}
    return pd.DataFrame([{**base, **r} for r in rows])


def _uniform_prior(k: int = 2 * 2 * 3 * 4 * 6 * 3):
    """Every discrete combination equally often; continuous factors spread over their range."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(k):
        rows.append({"shape": FACTORS["shape"][i % 4], "color": FACTORS["color"][(i // 4) % 6],
                     "background": FACTORS["background"][(i // 24) % 3], "mirror": bool((i // 72) % 2),
                     "size": rng.uniform(*FACTORS["size"]), "x": rng.uniform(*FACTORS["x"]),
                     "y": rng.uniform(*FACTORS["y"])})
    return _frame(rows)


def test_fiber_stats_known_answers():
    prior = _uniform_prior()
    colours = FACTORS["color"]
    # fiber 0: shape, background and size fixed, colour through all six values, x spread, one junk sample
    f0 = [{"fiber": 0, "color": c, "x": 0.35 + 0.05 * j} for j, c in enumerate(colours)]
    f0.append({"fiber": 0, "shape": "square", "color": "blue", "valid": False})
    # fiber 1: two arrows (mirror flips) and four circles; everything else fixed
    f1 = [{"fiber": 1, "shape": "arrow", "mirror": m} for m in (False, True)] + [{"fiber": 1}] * 4
    # fiber 2: a single valid sample -> skipped for every factor
    f2 = [{"fiber": 2}, {"fiber": 2, "valid": False}]
    stats = G.fiber_factor_stats(_frame(f0 + f1 + f2), prior, n_mc=20000, min_samples=2)
    s = stats.set_index(["fiber", "factor"])
    assert set(stats["fiber"]) == {0, 1}
    assert s.loc[(0, "shape"), "ratio"] == 0.0 and s.loc[(0, "shape"), "n"] == 6  # the junk square is ignored
    assert s.loc[(0, "color"), "value"] == pytest.approx(math.log2(6))
    assert s.loc[(0, "color"), "ratio"] == pytest.approx(math.log2(6) / expected_plugin_entropy(np.ones(6), 6,
                                                                                             20000, 0))
    assert 1.3 < s.loc[(0, "color"), "ratio"] < 1.5  # six distinct colours in six draws: freer than chance
    assert s.loc[(0, "size"), "ratio"] == 0.0 and s.loc[(0, "size"), "statistic"] == "variance_ratio"
    x = 0.35 + 0.05 * np.arange(6)
    assert s.loc[(0, "x"), "ratio"] == pytest.approx(x.var(ddof=1) / prior["x"].var(ddof=1))
    # mirror: only the fiber's chiral samples count (2 arrows, one each way = 1 bit)
    assert (0, "mirror") not in s.index
    assert s.loc[(1, "mirror"), "n"] == 2 and s.loc[(1, "mirror"), "value"] == pytest.approx(1.0)
    assert s.loc[(1, "mirror"), "ratio"] == pytest.approx(1.0 / expected_plugin_entropy(np.ones(2), 2, 20000, 0))
    assert s.loc[(1, "shape"), "ratio"] > 0  # arrows among circles
    # with junk kept, fiber 0 sees a square: shape is no longer fixed
    all_s = G.fiber_factor_stats(_frame(f0 + f1 + f2), prior, only_valid=False,
                                 min_samples=2).set_index(["fiber", "factor"])
    assert all_s.loc[(0, "shape"), "ratio"] > 0 and all_s.loc[(0, "shape"), "n"] == 7
    assert (2, "shape") in all_s.index

    est = G.estimated_invariance(stats).set_index("factor")
    assert list(est.index) == list(FACTORS)
    assert est.loc["mirror", "fibers"] == 1 and est.loc["mirror", "samples"] == 2
    assert est.loc["shape", "fibers"] == 2 and est.loc["shape", "samples"] == 12
    assert est.loc["size", "estimated"] == 0.0
    assert est.loc["color", "estimated"] == pytest.approx((s.loc[(0, "color"), "ratio"] + 0.0) / 2)
    # default min_samples=3: the 2-arrow mirror fiber is too small to count
    assert G.estimated_invariance(G.fiber_factor_stats(_frame(f0 + f1 + f2), prior)).set_index("factor").loc[
        "mirror", "fibers"] == 0
    # the estimate weights fibers by their usable samples
    w = pd.DataFrame({"fiber": [0, 1], "factor": ["x", "x"], "n": [2, 6], "statistic": "variance_ratio",
                      "value": 0.0, "baseline": 1.0, "ratio": [1.0, 0.0]})
    assert G.estimated_invariance(w).set_index("factor").loc["x", "estimated"] == pytest.approx(2 / 8)
    empty = G.estimated_invariance(stats.iloc[0:0])
    assert empty["estimated"].isna().all() and (empty["fibers"] == 0).all()


def test_fiber_stats_bad_input():
    prior = _uniform_prior()
    with pytest.raises(InputError, match="fiber"):
        G.fiber_factor_stats(_frame([{}]), prior)
    with pytest.raises(InputError, match="prior"):
        G.fiber_factor_stats(_frame([{"fiber": 0}]), prior.drop(columns="size"))
    with pytest.raises(ConfigError, match="min_samples"):
        G.fiber_factor_stats(_frame([{"fiber": 0}]), prior, min_samples=1)


# --------------------------------------------------------------------------- true invariance

def test_true_invariance_known_answer_corner_pixel():
    """f(x) = the corner pixel = the background colour: sensitive to background, exactly blind to the rest."""
    corner = Extractor(nn.Identity(), spec="test/corner", layer="embed", forward_fn=lambda m, x: x[:, :, 0, 0])
    df = G.true_invariance({"corner": corner}, n=64, seed=3).set_index("factor")
    for name in FACTORS:
        if name == "background":
            assert df.loc[name, "ratio"] > 1.2 and df.loc[name, "true_invariance"] == 0.0
        else:
            assert df.loc[name, "change_intervention"] == 0.0 and df.loc[name, "true_invariance"] == 1.0
    assert df.loc["mirror", "n"] == int((G.intervention_set(64, 3)["factors"]["shape"] == "arrow").sum()) > 0


@needs["shape-resnet"]
@needs["color-vit"]
def test_true_invariance_of_the_toy_classifiers():
    from fiberbench import load_extractor

    exts = {s: load_extractor(s) for s in ("toy/shape-resnet@logits", "toy/color-vit@logits")}
    df = G.true_invariance(exts, n=128, seed=1).set_index(["extractor", "factor"])["true_invariance"]
    assert df[("toy/shape-resnet@logits", "shape")] == 0.0
    assert df[("toy/color-vit@logits", "color")] == 0.0
    for f in ("color", "background", "size", "x", "y", "mirror"):
        assert df[("toy/shape-resnet@logits", f)] >= 0.9, f
    for f in ("shape", "background", "size", "x", "y", "mirror"):
        assert df[("toy/color-vit@logits", f)] >= 0.95, f


@needs["simclr-resnet"]
def test_simclr_encoder_is_partially_invariant():
    """The toy zoo's partial invariance: blind to the augmented factors, sees shape, background and mirror."""
    from fiberbench import load_extractor

    df = G.true_invariance({"ssl": load_extractor("toy/simclr-resnet@embed")}, n=256, seed=2)
    t = df.set_index("factor")["true_invariance"]
    for f in ("color", "size", "x", "y"):
        assert t[f] >= 0.8, (f, t[f])
    for f in ("shape", "background", "mirror"):
        assert t[f] <= 0.2, (f, t[f])


def test_nt_xent_known_value():
    from fiberbench.training.classifiers import nt_xent

    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])  # rows i and i+2 are views of one scene
    tau = 0.5
    want = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * math.exp(0.0)))
    assert float(nt_xent(z, tau)) == pytest.approx(want, rel=1e-6)


def test_train_encoder_writes_a_loadable_encoder(tmp_path, monkeypatch):
    from fiberbench.toy.evaluate import eval_encoder
    from fiberbench.training import train_encoder

    card = train_encoder("simclr-resnet", steps=2, batch=4, root=tmp_path, log=lambda s: None)
    assert card["kind"] == "encoder" and card["training"]["steps"] == 2 and card["parameters"] > 100_000
    monkeypatch.setenv("FIBERBENCH_MODELS", str(tmp_path))
    from fiberbench import list_models, load_extractor

    assert set(list_models("toy/simclr*")) == {"toy/simclr-resnet", "toy/simclr-resnet@embed",
                                               "toy/simclr-resnet@pre_logits"}
    e = load_extractor("toy/simclr-resnet")
    x = torch.rand(3, 3, 32, 32)
    assert e.spec == "toy/simclr-resnet@embed" and e(x).shape == (3, 64)
    assert load_extractor("toy/simclr-resnet@pre_logits")(x).shape == (3, 128)
    m = eval_encoder(e, n=16)
    assert all(0.0 <= m[f"true_invariance_{f}"] <= 1.0 for f in FACTORS)
    assert m["true_invariance_background"] == pytest.approx(max(0.0, 1 - m["feature_change_background"]))


# --------------------------------------------------------------------------- the benchmark end to end (tiny)

def test_invariance_figure_one_panel_per_method(tmp_path):
    pairs = pd.DataFrame({"method": ["ndtm"] * 2 + ["dps"] * 2, "extractor": ["toy/a@logits"] * 4,
                          "factor": ["shape", "color"] * 2, "true_invariance": [0.0, 1.0] * 2,
                          "estimated": [0.1, 0.9, 0.5, 0.6], "fibers": [3] * 4, "samples": [12] * 4})
    fig = G.invariance_figure(pairs)
    ys = sorted(float(y) for tr in fig.data for y in tr.y)
    assert ys == [0.1, 0.5, 0.6, 0.9]
    assert {a.text for a in fig.layout.annotations} == {"method=ndtm", "method=dps"}
    G.save_report_figure(fig, tmp_path, "inv")
    assert (tmp_path / "inv.html").stat().st_size > 1000
    with pytest.raises(InputError):
        G.invariance_figure(pairs.drop(columns="estimated"))


@needs["prior-fm"]
@needs["color-vit"]
@needs["oracle"]
def test_run_invariance_bench_tiny_is_reproducible(tmp_path):
    from fiberbench import load_prior

    prior = load_prior("toy/prior-fm")  # loaded once: the shipped weights may be replaced while a prior trains
    kw = dict(methods=("unguided", "dps"), extractors=["toy/color-vit@logits"], references=4, n=3, steps=3,
              truth_n=32, prior_n=128, save_to=tmp_path, prior=prior, pool_size=4000, truth_samples=16,
              truth_cache=tmp_path / "truth.json")
    a = G.run_invariance_bench(seed=5, **kw)
    b = G.run_invariance_bench(seed=5, **{**kw, "save_to": None})
    assert list(a) == ["unguided", "dps"]
    json.dumps(a, allow_nan=False)  # strict JSON, as the CLI prints it
    for method in a:
        m, m2 = a[method], b[method]
        for key in ("recovery_auroc", "rank_correlation", "feature_match", "validity", "seconds_per_sample"):
            assert key in m
        assert 0.0 <= m["validity"] <= 1.0 and 0.0 <= m["feature_match"] <= 1.0
        assert len(m["table"]) == len(FACTORS)
        ta, tb = pd.DataFrame(m["table"]), pd.DataFrame(m2["table"])
        pd.testing.assert_frame_equal(ta, tb)  # same seed, same numbers
        t = ta.set_index("factor")["true_invariance"]
        assert t["color"] == 0.0 and t["shape"] >= 0.9
    assert (tmp_path / "invariance.html").exists()
    with pytest.raises(ConfigError, match="unknown method"):
        G.run_invariance_bench(methods=("nope",), extractors=["toy/color-vit@logits"])


@pytest.fixture(scope="module")
def full_bench(tmp_path_factory):
    """The default setting's whole benchmark, every method (run it with ``-m slow``: 1:10:02 under pytest's one torch
    thread on 2026-12-04, both slow tests passing)."""
    for model in ("prior-fm", "shape-resnet", "color-vit", "simclr-resnet", "clip"):
        if model not in M.available():
            pytest.skip(f"toy/{model} is not shipped")
    return G.run_invariance_bench(seed=0, save_to=tmp_path_factory.mktemp("bench"))


@pytest.mark.slow
def test_full_invariance_bench_ranks_like_the_fiber_truth(full_bench):
    """Issue #23's ranking bars on the default setting: ndtm separates and ranks the pairs like the fiber truth
    (measured 2026-12-03: AUROC 0.997, Spearman 0.881), the ideal estimator's ceiling is >= 0.95 (0.970), and
    the prior alone cannot (unguided AUROC 0.303)."""
    nd = full_bench["ndtm"]
    assert nd["recovery_auroc"] >= 0.95, nd["recovery_auroc"]
    assert nd["rank_correlation"] >= 0.8, nd["rank_correlation"]
    assert nd["run"]["rank_correlation_ceiling"]["median"] >= 0.95
    assert full_bench["unguided"]["recovery_auroc"] <= 0.75  # the prior alone knows nothing of the extractor


@pytest.mark.slow
def test_full_invariance_bench_per_extractor_bars(full_bench):
    """feature_match >= 0.9 and validity >= 0.9 on every extractor of the benchmark (measured 2026-12-03:
    feature match 0.948-1.000, validity 0.958-1.000, docs/invariance_bench.md)."""
    for row in full_bench["ndtm"]["per_extractor"]:
        assert row["feature_match"] >= 0.9, row
        assert row["validity"] >= 0.9, row
