"""fiberbench.bench: the plain-text tables the CLI prints without --json; bench perf's profile, floor and counts."""
from __future__ import annotations

import pytest
import torch

import fiberbench as fb
from fiberbench.bench import format_table
from fiberbench.bench.perf import UNITS, call_counts, expected_evals, floor_seconds, measure_run
from fiberbench.errors import ConfigError
from fiberbench.sampling import PresetStepsWarning, resolve_settings
from fiberbench.sampling.problem import STAGES
from fiberbench.toy import references


def _invariance_like() -> dict:
    """A result shaped like ``bench invariance --json`` (made-up numbers; metamer with JSON nulls)."""
    run = {"references": 12, "n": 8}
    return {
        "ndtm": {"recovery_auroc": 0.875, "rank_correlation": 0.6123, "pairs_estimated": 28,
                 "feature_match": 0.75, "validity": 0.9, "seconds_per_sample": 2.5,
                 "training_seconds": 0.0, "per_extractor": [{"extractor": "x"}], "table": [], "run": run},
        "metamer": {"recovery_auroc": None, "rank_correlation": None, "pairs_estimated": 0,
                    "feature_match": 0.88, "validity": 0.0, "seconds_per_sample": 0.19,
                    "training_seconds": 0.0, "run": run},
        "conditional": {"recovery_auroc": 1.0, "rank_correlation": 0.7, "pairs_estimated": 14,
                        "feature_match": 0.5, "validity": 0.95, "seconds_per_sample": 0.05,
                        "training_seconds": 1321.4, "run": run},
    }


def _row(text: str, method: str) -> list[str]:
    return next(line for line in text.splitlines() if line.split()[0] == method).split()


def test_format_table_has_invariance_columns():
    text = format_table(_invariance_like())
    header = text.splitlines()[0].split()
    assert header == ["method", "feature_match", "validity", "seconds_per_sample", "recovery_auroc",
                      "rank_correlation", "pairs_estimated", "training_seconds"]
    cols = {k: i for i, k in enumerate(header)}
    ndtm = _row(text, "ndtm")
    assert ndtm[cols["recovery_auroc"]] == "0.875"
    assert ndtm[cols["rank_correlation"]] == "0.612"
    assert ndtm[cols["pairs_estimated"]] == "28"
    assert ndtm[cols["training_seconds"]] == "0.000"
    cond = _row(text, "conditional")  # 11 characters: the name column widens instead of running into the numbers
    assert cond[0] == "conditional" and cond[cols["training_seconds"]] == "1321.400"
    assert cond[cols["recovery_auroc"]] == "1.000"
    metamer = _row(text, "metamer")  # JSON null (no valid sample) prints as '-'
    assert metamer[cols["recovery_auroc"]] == "-" and metamer[cols["rank_correlation"]] == "-"
    assert metamer[cols["validity"]] == "0.000"
    assert len(text.splitlines()) == 4


def test_format_table_quality_keeps_its_columns():
    out = {"ndtm": {"feature_match": 0.9, "validity": 0.5, "diversity": 0.3, "shape_kept": 1.0,
                    "color_changed": 0.7, "seconds_per_sample": 1.25, "overhead_vs_unguided": 12.0}}
    text = format_table(out)
    header = text.splitlines()[0].split()
    assert header == ["method", "feature_match", "validity", "diversity", "shape_kept", "color_changed",
                      "seconds_per_sample", "overhead_vs_unguided"]
    assert "recovery_auroc" not in text and "training_seconds" not in text
    assert _row(text, "ndtm")[header.index("overhead_vs_unguided")] == "12.000"


def test_format_table_perf_rows_print_as_dict():
    text = format_table({"ndtm": {"rows": [{"batch": 1, "steps": 25, "seconds_per_sample": 0.5}]}})
    assert "'batch': 1" in text and text.splitlines()[1].startswith("ndtm")


def _perf_like() -> dict:
    """A result shaped like ``bench perf --json`` (made-up numbers)."""
    split = {"prior_forward": 0.5, "decode_forward": 0.01, "extractor_forward": 0.1, "extractor_backward": 0.09,
             "decode_backward": 0.02, "prior_backward": 0.2, "optimiser": 0.03, "other": 0.04}
    run = {"method": "ndtm", "preset": "toy", "label": "toy", "seconds_per_sample": 1.5,
           "floor_seconds_per_sample": 1.0, "ratio_to_floor": 1.5, "denoiser_evals_per_sample": 80,
           "extractor_evals_per_sample": 60, "split_fraction": split, "residual_fraction": 0.01,
           "memory": {"growth_mib": 2.0}}
    unguided = {**run, "method": "unguided", "label": "fiber-imagenet@50steps", "ratio_to_floor": None,
                "memory": {"growth_mib": None}}
    return {"benchmark": "perf", "command": "fiberbench bench perf", "date": "2026-12-01T00:00:00+00:00",
            "torch": "2.x", "threads": 1, "loadavg_start": [1.0, 2.0, 3.0], "loadavg_end": [1.5, 2.0, 3.0],
            "prior": "toy/prior-fm", "extractor": "toy/shape-resnet@logits", "batch": 8, "runs": [run, unguided]}


def test_format_table_prints_perf_runs_with_their_split():
    lines = format_table(_perf_like()).splitlines()
    assert "fiberbench bench perf" in lines[0] and "1 thread(s)" in lines[0] and "1.0/2.0/3.0 at start" in lines[0]
    head = lines[3].split()
    assert head[:6] == ["method", "preset", "s/sample", "floor", "ratio", "evals"]
    ndtm = dict(zip(head, lines[4].split()))
    assert ndtm["s/sample"] == "1.500" and ndtm["ratio"] == "1.50" and ndtm["evals"] == "80/60"
    assert ndtm["prior_f%"] == "50.0" and ndtm["decode%"] == "3.0" and ndtm["optim%"] == "3.0"
    assert ndtm["resid%"] == "1.0" and ndtm["mem+MiB"] == "2.0"
    unguided = dict(zip(head, lines[5].split()))
    assert unguided["preset"] == "fiber-imagenet@50steps" and unguided["ratio"] == "-" and unguided["mem+MiB"] == "-"


def _counts(prior, method: str, preset: str, steps: int | None = None, **hp) -> dict:
    settings, run, _ = resolve_settings(method, preset, hp, prior)
    steps = steps or run["steps"]
    return call_counts(method, settings, prior.schedule(steps).taus.tolist(), steps)


def test_call_counts_of_the_toy_and_imagenet_presets(prior_fm):
    """The arithmetic the floor rests on: toy-fast preset (20 steps, 15 of them guided, 4 inner steps), and the
    fiber paper's ImageNet preset at 50 steps (28 guided, 5 inner steps, plus h_t of the reference per guided
    step). The default toy preset's particles and skipping make its calls data-dependent: no fixed floor."""
    assert _counts(prior_fm, "ndtm", "toy") is None
    assert _counts(prior_fm, "ndtm", "toy-fast", particles=6) is None
    assert _counts(prior_fm, "ndtm", "toy-fast", skip_tol=0.01) is None
    ndtm = _counts(prior_fm, "ndtm", "toy-fast")
    assert ndtm["guided_steps"] == 15 and ndtm["prior_forward_backward"] == ndtm["features_forward_backward"] == 60
    assert ndtm["prior_forward"] == 20 and ndtm["reference_prior_forward"] == 0
    assert expected_evals(ndtm) == {"denoiser": 80, "extractor": 60}
    assert expected_evals(_counts(prior_fm, "dps", "toy")) == {"denoiser": 20, "extractor": 15}
    assert expected_evals(_counts(prior_fm, "unguided", "toy")) == {"denoiser": 20, "extractor": 0}
    assert expected_evals(_counts(prior_fm, "metamer", "toy")) == {"denoiser": 0, "extractor": 200}
    imagenet = _counts(prior_fm, "ndtm", "fiber-imagenet", 50)
    assert imagenet["guided_steps"] == 28 and imagenet["reference_features_forward"] == 28
    assert expected_evals(imagenet) == {"denoiser": 50 + 28 * 5 + 28, "extractor": 28 * 5 + 28}
    # time travel: the 10 guided steps at tau >= 500 run 3 times (each with its inner steps)
    recur = _counts(prior_fm, "ndtm", "toy-fast", recurrence=3, recurrence_tau=500.0)
    assert recur["prior_forward"] == 20 + 10 * 2 and recur["prior_forward_backward"] == (15 + 10 * 2) * 4
    units = {u: 10.0 ** k for k, u in enumerate(UNITS)}  # 1, 10, 100, ...: each term shows in its own digit
    assert floor_seconds(ndtm, units, batch=8) == (20 * 1 + 60 * 10 + 60 * 100) / 8


def test_time_target_counts_its_reference_call_per_row(prior_fm, shape_resnet):
    """h_t is one call on the references' rows per guided step: with 4 samples of one reference in a batch it costs
    each sample a quarter of a call, in batches of one sample a whole one; the images do not depend on it."""
    refs, _ = references(1, seed=3)
    counts = _counts(prior_fm, "ndtm", "fiber-imagenet", 6)
    assert counts["reference_prior_forward"] == counts["guided_steps"] > 0
    out = {}
    for bs, share in ((4, 0.25), (1, 1.0)):
        with pytest.warns(PresetStepsWarning):
            res = fb.sample_fiber(prior_fm, shape_resnet, refs, n=4, method="ndtm", preset="fiber-imagenet", steps=6,
                                  batch_size=bs, progress=False)
        assert expected_evals(counts, share) == {"denoiser": res.config["denoiser_evals_per_sample"],
                                                 "extractor": res.config["extractor_evals_per_sample"]}
        out[bs] = res.latents
    assert torch.allclose(out[4], out[1], atol=1e-4)


RUNS = [("ndtm", "toy-fast", 4, {}), ("ndtm", "fiber-imagenet", 6, {}), ("ndtm", "toy-fast", 4, {"recurrence": 2}),
        ("dps", "toy", 4, {}), ("unguided", "toy", 3, {}), ("metamer", "toy", None, {"iters": 5})]


@pytest.mark.parametrize("method,preset,steps,hp", RUNS, ids=["ndtm-toy", "ndtm-imagenet", "ndtm-recurrence", "dps",
                                                              "unguided", "metamer"])
def test_profile_gives_bit_identical_samples_and_counts_every_call(prior_fm, shape_resnet, method, preset, steps, hp):
    """Profiling on and off: the same images bit for bit; with it, every network call enters its forward stage
    once per batch (two batches of 1 here), every guided backward its three backward stages, and the evaluation
    counts are the arithmetic of call_counts."""
    refs, _ = references(1, seed=3)
    kw = dict(n=2, method=method, preset=preset, steps=steps, batch_size=1, progress=False, **hp)
    plain = fb.sample_fiber(prior_fm, shape_resnet, refs, **kw)
    prof = fb.sample_fiber(prior_fm, shape_resnet, refs, profile=True, **kw)
    assert torch.equal(plain.images, prof.images) and torch.equal(plain.latents, prof.latents)
    assert "profile" not in plain.config and plain.config["run_id"] == prof.config["run_id"]
    cfg, p = prof.config, prof.config["profile"]
    counts = _counts(prior_fm, method, preset, cfg["steps"], **hp)
    assert expected_evals(counts) == {"denoiser": cfg["denoiser_evals_per_sample"],
                                      "extractor": cfg["extractor_evals_per_sample"]}
    assert p["entries"]["prior_forward"] == 2 * cfg["denoiser_evals_per_sample"]
    assert p["entries"]["extractor_forward"] == 2 * cfg["extractor_evals_per_sample"]
    backward = 2 * (counts["prior_forward_backward"] + counts["extractor_forward_backward"])
    assert p["entries"]["extractor_backward"] == p["entries"]["optimiser"] == backward
    guided_prior = 2 * counts["prior_forward_backward"]
    assert p["entries"]["decode_backward"] == p["entries"]["prior_backward"] == guided_prior
    assert all((p["seconds"][s] > 0) == (p["entries"][s] > 0) for s in STAGES if s != "other")


def test_profile_of_the_particle_preset_is_bit_identical_and_counts_the_particles(prior_fm, shape_resnet):
    """The default toy preset (8 particles, skipping, the realism term): profiling changes no bit, the counted
    evaluations are the plain run's, and more than one particle's worth of prior calls entered the profile (the
    draw runs K rows); measure_run gives it no floor and no ratio, only its counts."""
    refs, _ = references(1, seed=3)
    kw = dict(n=2, method="ndtm", preset="toy", steps=8, batch_size=2, progress=False)
    plain = fb.sample_fiber(prior_fm, shape_resnet, refs, **kw)
    prof = fb.sample_fiber(prior_fm, shape_resnet, refs, profile=True, **kw)
    assert torch.equal(plain.images, prof.images)
    for k in ("denoiser_evals_per_sample", "extractor_evals_per_sample"):
        assert plain.config[k] == prof.config[k] > 0
    fast = fb.sample_fiber(prior_fm, shape_resnet, refs, **{**kw, "preset": "toy-fast"})
    assert plain.config["denoiser_evals_per_sample"] != fast.config["denoiser_evals_per_sample"]
    row = measure_run(prior_fm, shape_resnet, refs, method="ndtm", preset="toy", steps=8, batch=2, reps=1)
    assert row["floor_seconds_per_sample"] is None and row["ratio_to_floor"] is None and row["expected_evals"] is None
    assert row["denoiser_evals_per_sample"] == plain.config["denoiser_evals_per_sample"]


def test_profile_split_sums_to_the_wall_time(prior_fm, shape_resnet):
    """The stages tile the sampler's run: their sum is within 5 % of the sampling loop's wall time (the rest is the
    set-up of each batch), and the wall time is the one the run reports."""
    refs, _ = references(1, seed=4)
    res = fb.sample_fiber(prior_fm, shape_resnet, refs, n=2, method="ndtm", preset="toy", steps=3, batch_size=1,
                          progress=False, profile=True)
    p = res.config["profile"]
    assert p["wall_seconds"] == res.config["seconds"]
    assert sum(p["seconds"].values()) == pytest.approx(p["sum_seconds"], rel=1e-12)
    assert 0 <= p["residual_seconds"] <= 0.05 * p["wall_seconds"]
    assert p["residual_seconds"] == pytest.approx(p["wall_seconds"] - p["sum_seconds"], abs=1e-12)
    assert p["synchronized"] is False
    with pytest.raises(ConfigError, match="profile"):
        fb.sample_fiber("toy/prior-fm", "toy/shape-resnet@logits", refs, n=1, profile="yes")


def test_measure_run_row_is_consistent(prior_fm, shape_resnet):
    """One bench perf row: split fractions and residual add up to 1, the ratio is s/sample over the floor, the
    counted evaluations are the predicted ones, and peak memory is read from step 10 on (12 steps: step 6)."""
    refs, _ = references(1, seed=5)
    row = measure_run(prior_fm, shape_resnet, refs, method="unguided", preset="toy", steps=12, batch=2, reps=1)
    assert sum(row["split_fraction"].values()) + row["residual_fraction"] == pytest.approx(1.0, abs=1e-9)
    assert row["ratio_to_floor"] == pytest.approx(row["seconds_per_sample"] / row["floor_seconds_per_sample"])
    assert row["floor_seconds_per_sample"] == pytest.approx(
        12 * row["floor"]["unit_seconds"]["prior_forward"] / 2)
    assert row["expected_evals"] == {"denoiser": 12, "extractor": 0} and row["denoiser_evals_per_sample"] == 12
    mem = row["memory"]
    assert mem["from_step"] == 6 and mem["step"] == 6 and mem["growth_mib"] >= 0
    assert mem["last_step_mib"] >= mem["at_step_mib"] > 0
    assert row["all_ok"] and row["batch"] == 2 and row["label"] == "toy"
