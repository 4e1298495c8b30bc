"""``fiberbench reproduce``: the quick toy form writes the paper's tables with numbers that hold up when
recomputed from the per-sample files; a folder of images works as references and bank."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import fiberbench as fb
from fiberbench.analysis import metrics as M
from fiberbench.bench import reproduce as R
from fiberbench.cli import main

TOY_COLUMNS = ["fiber_sq_l2", "fiber_sq_l2_std", "fiber_l2", "fiber_l1", "fiber_ce", "fiber_ce_soft", "fiber_rms",
               "fiber_cos", "nearest_neighbour_fiber_sq_l2", "fd_oracle", "fd_oracle_std", "kid_oracle",
               "real_fd_oracle", "nearest_neighbour_fd_oracle", "fd_clip", "kid_clip", "diversity", "valid"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "--quick", "--quiet", "--out", str(out)]) == 0
    return out


def test_quick_writes_the_tables_with_provenance(quick):
    names = sorted(p.name for p in quick.iterdir())
    assert names == sorted(["fiber_table.csv", "fiber_table.md", "fiber_table.tex", "samples.csv", "neighbours.csv",
                            "realism.csv", "provenance.json"])
    first = (quick / "fiber_table.csv").read_text().splitlines()[0]
    assert first.startswith("# fiberbench reproduce --prior toy/prior-fm --references toy")
    assert "--quick" in first and "torchmetrics" in first and "seeds 0, 1" in first
    assert "torch " in first and "Z |" in first  # versions and a UTC date
    md, tex = (quick / "fiber_table.md").read_text(), (quick / "fiber_table.tex").read_text()
    assert "Fiber loss (Table 5)" in md and "Realism (Table 2) in oracle" in md and " ± " in md
    assert tex.startswith("% fiberbench reproduce --prior") and r"\begin{tabular}" in tex and r"\pm" in tex
    prov = json.loads((quick / "provenance.json").read_text())
    assert prov["seeds"] == [0, 1] and prov["preset"] == "toy" and prov["samples_per_draw"] == 4


def test_quick_numbers(quick):
    table = pd.read_csv(quick / "fiber_table.csv", comment="#")
    assert len(table) == 4 and set(table["method"]) == {"ndtm", "unguided"} and (table["draws"] == 2).all()
    assert not table[TOY_COLUMNS].isna().any().any()
    row = table.set_index(["extractor", "method"])
    shape = "toy/shape-resnet@logits"
    # guidance lands on the fiber: far below the prior's own samples, in every convention
    for c in ("fiber_sq_l2", "fiber_l1", "fiber_ce", "fiber_cos"):
        assert row.loc[(shape, "ndtm"), c] < 0.2 * row.loc[(shape, "unguided"), c], c
    assert row.loc[(shape, "ndtm"), "fiber_sq_l2"] < 1.0 < row.loc[(shape, "unguided"), "fiber_sq_l2"]
    assert (table["fd_oracle"] > 0).all() and (table["real_fd_oracle"] > 0).all()
    assert table[["valid"]].le(1).all().all() and (table["diversity"] > 0).all()
    # the table's mean and "±" are the mean and std across draws of each draw's mean
    samples = pd.read_csv(quick / "samples.csv")
    per_draw = samples.groupby(["extractor", "method", "seed"])["fiber_sq_l2"].mean()
    for (ext, method), g in per_draw.groupby(level=[0, 1]):
        assert row.loc[(ext, method), "fiber_sq_l2"] == pytest.approx(g.mean(), rel=1e-9)
        assert row.loc[(ext, method), "fiber_sq_l2_std"] == pytest.approx(g.std(ddof=1), rel=1e-9)
    assert np.allclose(samples["fiber_l2"] ** 2, samples["fiber_sq_l2"], rtol=1e-9)
    realism = pd.read_csv(quick / "realism.csv")
    assert set(realism["space"]) == {"oracle", "clip"} and (realism["n"] == 4).all() and (realism["n_bank"] == 96).all()
    assert realism["caveat"].str.contains("biased upward").all()


def test_quick_nearest_neighbour_is_the_closest_other_bank_image(quick):
    nb = pd.read_csv(quick / "neighbours.csv")
    refs, _ = R.load_references("toy", 2, 32, 0)
    bank = R.load_bank(None, "toy", 32, R.QUICK["bank_size"], 0)
    ex = fb.load_extractor("toy/shape-resnet@logits")
    d = torch.cdist(M.embed(ex, refs).double(), M.embed(ex, bank).double()).pow(2)
    rows = nb[nb["extractor"] == "toy/shape-resnet@logits"].sort_values("reference")
    assert rows["bank_index"].tolist() == d.argmin(1).tolist()
    assert rows["fiber_sq_l2"].to_numpy() == pytest.approx(d.min(1).values.numpy(), rel=1e-5)
    table = pd.read_csv(quick / "fiber_table.csv", comment="#").set_index(["extractor", "method"])
    assert table.loc[("toy/shape-resnet@logits", "ndtm"), "nearest_neighbour_fiber_sq_l2"] == pytest.approx(
        float(d.min(1).values.mean()), rel=1e-5)


def test_reproduce_on_an_image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    images = fb.toy.render(fb.toy.sample_factors(6, seed=3))
    for i, im in enumerate(images):
        arr = (im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).resize((40, 40)).save(folder / f"img{i}.png")
    with pytest.warns(M.PresetStepsWarning, match="tuned for 20 steps"):
        rep = R.reproduce(["toy/shape-resnet@logits"], "toy/prior-fm", str(folder), method="unguided", preset="toy",
                          steps=4, n=2, n_references=2, draws=1, baseline=False, kid_subsets=5,
                          spaces=["feat=toy/shape-resnet@pre_logits"], out=tmp_path / "out", command="test")
    t = rep.table.iloc[0]
    assert rep.provenance["n_bank"] == 6 and rep.provenance["guidance_budget"]["short"]
    assert t["draws"] == 1 and math.isnan(t["fiber_sq_l2_std"]) and "fd_feat" in rep.table.columns
    # the bank is the references' own folder: each reference's neighbour is another image
    assert (rep.neighbours["bank_index"] != rep.neighbours["reference"]).all()
    assert "valid" not in rep.table.columns  # no oracle off the toy world
    md = (tmp_path / "out" / "fiber_table.md").read_text()
    assert "Realism (Table 2) in feat" in md and "| toy/shape-resnet@logits | unguided |" in md


def test_cli_needs_extractors(capsys):
    assert main(["reproduce", "--out", "unused"]) == 2
    assert "needs --extractors" in capsys.readouterr().err
