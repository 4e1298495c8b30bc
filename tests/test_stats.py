"""Per-class invariance statistics: means, bootstrap CIs (iid and clustered), long format."""
import numpy as np
import pandas as pd
import pytest

from fiberbench.errors import ConfigError, InputError
from fiberbench.stats import bootstrap_mean, per_class


def _frame(seed=0, n=400):
    rng = np.random.default_rng(seed)
    rows = []
    for ext, shift in (("toy/shape-resnet@logits", 0.0), ("toy/color-vit@logits", 1.0)):
        for cls, mu in (("circle", 0.2), ("square", 0.8)):
            rows.append(pd.DataFrame({
                "extractor": ext, "class": cls, "reference": np.repeat(np.arange(n // 4), 4),
                "sample": np.tile(np.arange(4), n // 4), "seed": 0,
                "color_change": rng.normal(mu + shift, 1.0, n), "clip_angle": rng.uniform(0, 10, n),
                "shape_changed": rng.random(n) < mu, "method": "ndtm"}))
    return pd.concat(rows, ignore_index=True)


def test_per_class_means_and_ci_widths_match_theory():
    df = _frame()
    out = per_class(df, by=["extractor", "class"], n_boot=2000, seed=1)
    assert list(out.columns) == ["extractor", "class", "statistic", "mean", "ci_low", "ci_high", "n"]
    # ids (reference, sample, seed) and strings are not statistics; the boolean is
    assert set(out["statistic"]) == {"color_change", "clip_angle", "shape_changed"}
    assert len(out) == 2 * 2 * 3 and (out["n"] == 400).all()
    cc = out[out["statistic"] == "color_change"].set_index(["extractor", "class"])
    # sample means within 4 standard errors (0.05) of the truth
    assert cc.loc[("toy/shape-resnet@logits", "circle"), "mean"] == pytest.approx(0.2, abs=0.2)
    assert cc.loc[("toy/color-vit@logits", "square"), "mean"] == pytest.approx(1.8, abs=0.2)
    # 95% percentile CI of a mean of 400 N(., 1): width ≈ 2 · 1.96 / 20 = 0.196
    width = cc["ci_high"] - cc["ci_low"]
    assert width.between(0.16, 0.24).all(), width
    assert ((cc["ci_low"] <= cc["mean"]) & (cc["mean"] <= cc["ci_high"])).all()
    # exact group mean
    sel = df[(df["extractor"] == "toy/color-vit@logits") & (df["class"] == "circle")]
    got = out[(out["extractor"] == "toy/color-vit@logits") & (out["class"] == "circle")
              & (out["statistic"] == "clip_angle")]["mean"].iloc[0]
    assert got == pytest.approx(sel["clip_angle"].mean(), rel=1e-12)
    # seeded: identical output twice
    pd.testing.assert_frame_equal(out, per_class(df, by=["extractor", "class"], n_boot=2000, seed=1))


def test_cluster_bootstrap_is_wider_for_correlated_rows():
    rng = np.random.default_rng(3)
    # 30 fibers of 8 samples; the statistic is nearly constant inside a fiber
    fiber_means = rng.normal(0, 1, 30)
    vals = np.repeat(fiber_means, 8) + rng.normal(0, 0.05, 240)
    df = pd.DataFrame({"extractor": "e", "class": "c", "reference": np.repeat(np.arange(30), 8), "x": vals})
    iid = per_class(df, stats=["x"], n_boot=3000)
    clu = per_class(df, stats=["x"], n_boot=3000, cluster="reference")
    w_iid = float(iid["ci_high"].iloc[0] - iid["ci_low"].iloc[0])
    w_clu = float(clu["ci_high"].iloc[0] - clu["ci_low"].iloc[0])
    # iid treats 240 rows as independent (~2·1.96/sqrt(240)); honest width ~2·1.96/sqrt(30): ratio ~sqrt(8)
    assert 2.0 < w_clu / w_iid < 4.0, (w_iid, w_clu)
    assert clu["n_clusters"].iloc[0] == 30 and clu["mean"].iloc[0] == pytest.approx(vals.mean())


def test_bootstrap_edge_cases_and_errors():
    assert bootstrap_mean(np.array([2.0])) == (2.0, 2.0, 2.0)
    m, lo, hi = bootstrap_mean(np.array([1.0, np.nan, 3.0]), n_boot=500)
    assert m == 2.0 and 1.0 <= lo <= hi <= 3.0
    assert all(np.isnan(bootstrap_mean(np.array([np.nan]))))
    df = _frame(n=8)
    with pytest.raises(ConfigError, match="grouping column"):
        per_class(df, by=["model"])
    with pytest.raises(ConfigError, match="statistic column"):
        per_class(df, stats=["nope"])
    with pytest.raises(InputError):
        per_class([1, 2, 3])
    empty = per_class(df.iloc[:0])
    assert empty.empty and "mean" in empty.columns


def test_long_format_feeds_plotly():
    import plotly.express as px

    out = per_class(_frame(n=40), n_boot=200)
    out["err_plus"], out["err_minus"] = out["ci_high"] - out["mean"], out["mean"] - out["ci_low"]
    fig = px.bar(out, x="class", y="mean", error_y="err_plus", error_y_minus="err_minus", color="statistic",
                 facet_col="extractor", barmode="group")
    assert len(fig.data) == 3 * 2  # one trace per statistic and facet
