"""Figures from tidy frames: the data in the figure equals the data in the frame; static export offline."""
import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fiberbench import plots, toy
from fiberbench.errors import ConfigError, InputError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stats_frame():
    """per_class-style long frame: 2 extractors x 3 classes x 2 statistics with CIs."""
    rng = np.random.default_rng(0)
    rows = []
    for e in ["toy/shape-resnet@logits", "toy/color-vit@logits"]:
        for c in ["circle", "square", "arrow"]:
            for s in ["color_changed", "shape_changed"]:
                m = float(rng.uniform(0.1, 0.9))
                rows.append(dict(extractor=e, **{"class": c}, statistic=s, mean=m, ci_low=m - 0.05, ci_high=m + 0.07,
                                 n=12))
    return pd.DataFrame(rows)


def test_change_rates_bars_carry_the_frame(stats_frame):
    fig = plots.change_rates(stats_frame)
    assert len(fig.data) == 4  # 2 statistics x 2 extractor panels
    names = {t.name for t in fig.data}
    assert names == {"color", "shape"}  # "_changed" dropped from the legend
    for tr in fig.data:
        panel = 0 if tr.xaxis in (None, "x") else 1
        ext = ["toy/shape-resnet@logits", "toy/color-vit@logits"][panel]
        sub = stats_frame[(stats_frame.extractor == ext) & (stats_frame.statistic == f"{tr.name}_changed")]
        sub = sub.set_index("class").loc[list(tr.x)]
        np.testing.assert_allclose(tr.y, sub["mean"].to_numpy())
        np.testing.assert_allclose(tr.error_y.array, 0.07, atol=1e-12)
        np.testing.assert_allclose(tr.error_y.arrayminus, 0.05, atol=1e-12)


def test_change_heatmap_values(stats_frame):
    fig = plots.change_heatmap(stats_frame)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    z = np.asarray(fig.data[1].z)
    sub = stats_frame[stats_frame.extractor == "toy/color-vit@logits"]
    want = sub.pivot_table(index="class", columns="statistic", values="mean").loc[
        list(fig.data[1].y), [f"{c}_changed" for c in fig.data[1].x]]
    np.testing.assert_allclose(z, want.to_numpy())
    assert fig.data[1].text[0][0] == format(z[0, 0], ".2f")


def test_image_grid_roundtrips_pixels():
    imgs, _ = toy.references(5, seed=3)
    fig = plots.image_grid(imgs, [f"s{i}" for i in range(5)], ncols=3, outline=["red", None, None, None, None])
    assert [t.type for t in fig.data] == ["image"] * 5
    raw = base64.b64decode(fig.data[4].source.split(",", 1)[1])
    back = torch.from_numpy(np.array(Image.open(io.BytesIO(raw)).convert("RGB"))).permute(2, 0, 1).float() / 255
    assert (back - imgs[4]).abs().max().item() <= 0.5 / 255 + 1e-6  # exact up to 8-bit rounding
    assert fig.layout.xaxis4.title.text == "s3"
    assert len(fig.layout.shapes) == 1


def test_loss_curve_mean_ignores_nan_steps():
    h = torch.tensor([[float("nan")] * 3, [1.0, 2.0, 3.0], [0.5, 0.5, 2.0]])
    fig = plots.loss_curve(h)
    mean = fig.data[-1]
    assert list(mean.x) == [1, 2]
    np.testing.assert_allclose(mean.y, [2.0, 1.0])


def test_bad_input_is_named():
    with pytest.raises(InputError, match="missing column"):
        plots.bars(pd.DataFrame({"a": [1]}), x="a", y="b")
    with pytest.raises(ConfigError, match="suffix"):
        plots.save_figure(plots.loss_curve(torch.ones(2, 2)), "fig.jpg")
    with pytest.raises(ConfigError, match="dpi"):
        plots.save_figure(plots.loss_curve(torch.ones(2, 2)), "fig.png", dpi=0)


def _pdf_size_pt(data: bytes) -> tuple[float, float]:
    m = re.search(rb"/MediaBox\s*\[\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", data)
    return float(m.group(3)) - float(m.group(1)), float(m.group(4)) - float(m.group(2))


def test_matplotlib_export_sizes(tmp_path, stats_frame):
    """Browserless export: PNG pixels = size x dpi / 96, PDF page = size x 72 / 96 points."""
    fig = plots.change_rates(stats_frame)
    png = plots.save_figure(fig, tmp_path / "a.png", width=600, height=300, dpi=192, engine="matplotlib")
    assert png["engine"] == "matplotlib"
    assert Image.open(tmp_path / "a.png").size == (1200, 600)
    plots.save_figure(fig, tmp_path / "a.pdf", width=600, height=300, engine="matplotlib")
    w, h = _pdf_size_pt((tmp_path / "a.pdf").read_bytes())
    assert (round(w), round(h)) == (450, 225)
    plots.save_figure(fig, tmp_path / "a.svg", width=600, height=300, engine="matplotlib")
    assert (tmp_path / "a.svg").read_text().lstrip().startswith("<?xml")


def test_auto_falls_back_to_matplotlib_without_a_browser(tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    info = plots.save_figure(plots.loss_curve(torch.rand(4, 3)), tmp_path / "f.png", width=300, height=200, dpi=96)
    assert info["engine"] == "matplotlib" and "BROWSER_PATH" in info["fallback_reason"]
    assert Image.open(tmp_path / "f.png").size == (300, 200)
    with pytest.raises(RuntimeError, match="kaleido"):
        plots.save_figure(plots.loss_curve(torch.rand(4, 3)), tmp_path / "g.png", engine="kaleido")


@pytest.mark.skipif(plots.kaleido_available() is not None, reason=f"kaleido export impossible here: "
                    f"{plots.kaleido_available()}")
def test_kaleido_batch_export_offline(tmp_path, stats_frame):
    imgs, _ = toy.references(4, seed=1)
    figs = {"rates": plots.change_rates(stats_frame), "grid": plots.image_grid(imgs, ncols=4)}
    table = plots.export_figures(figs, tmp_path, width=500, height=250, dpi=144, timeout=60)
    assert len(table) == 6 and set(table.engine) == {"kaleido"}, table
    assert Image.open(tmp_path / "rates.png").size == (750, 375)
    assert (tmp_path / "rates.pdf").read_bytes()[:5] == b"%PDF-"
    w, h = _pdf_size_pt((tmp_path / "grid.pdf").read_bytes())
    assert (round(w), round(h)) == (375, 188) or (round(w), round(h)) == (375, 187)
    assert b"<svg" in (tmp_path / "grid.svg").read_bytes()[:200]
