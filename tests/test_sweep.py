"""Sweeps: validation, expansion, resumable local runs (killed for real), and the Ray backend."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fiberbench.errors import ConfigError
from fiberbench.store import Store
from fiberbench.sweep import expand, run_job, run_sweep

MODELS = ("prior-fm", "shape-resnet")


def small(name="t", refs=2, methods=("ndtm", "unguided"), **kw):
    cfg = {"name": name, "extractors": ["toy/shape-resnet@logits"], "priors": ["toy/prior-fm"],
           "methods": list(methods), "n": 2, "steps": 5, "preset": "toy", "seeds": [0], "threads": 1,
           "references": [{"toy": {"n": refs, "seed": 31}}]}
    cfg.update(kw)
    return cfg


def test_validation_lists_every_problem_before_any_job(models_dir, tmp_path):
    bad = {
        "name": "../escape",
        "extractors": ["toy/shape-resnt@logits", "diffusers/x"],
        "priors": ["toy/shape-resnet"],
        "methods": ["ndtm", "ndmt"],
        "seeds": [0, 0],
        "n": 0,
        "hyperparameters": {"ndtm": {"lr": -1, "inner_stpes": 2}},
        "grid": {"dps": {"scale": [1.0]}},
        "references": [{"folder": {"path": str(tmp_path / "nowhere")}},
                       {"toy": {"n": 1, "classes": {"shape": ["hexagon"]}}}],
        "resourses": {},
    }
    with pytest.raises(ConfigError) as e:
        expand(bad)
    msg = str(e.value)
    expected = ["invalid sweep name", "'toy/shape-resnt@logits' is not a toy extractor", "did you mean",
                "'diffusers/x' is a prior", "'toy/shape-resnet' is not a toy prior", "unknown method 'ndmt'",
                "seeds has duplicates", "n must be a positive integer", "inner_stpes", "method 'dps' is not in",
                "nowhere does not exist", "['hexagon'] not in", "unknown key 'resourses'"]
    for part in expected:
        assert part in msg, part
    assert msg.startswith(f"sweep config has {msg.count(chr(10) + '  - ')} problem(s)")


def test_yaml_and_toml_expand_to_the_same_jobs(models_dir, tmp_path):
    yaml_text = """
name: grid
extractors: [toy/shape-resnet@logits, toy/shape-resnet@pre_logits]
priors: [toy/prior-fm]
methods: [ndtm, dps]
seeds: [0, 1]
n: 2
steps: 5
preset: toy
hyperparameters: {dps: {scale: 0.5}}
grid: {ndtm: {lr: [0.02, 0.05], inner_steps: [2, 4]}}
references:
  - toy: {n: 2, seed: 5}
  - toy: {seed: 9, per_class: 1, classes: {shape: [circle, square, triangle]}}
"""
    toml_text = """
name = "grid"
extractors = ["toy/shape-resnet@logits", "toy/shape-resnet@pre_logits"]
priors = ["toy/prior-fm"]
methods = ["ndtm", "dps"]
seeds = [0, 1]
n = 2
steps = 5
preset = "toy"
[[references]]
toy = {n = 2, seed = 5}
[[references]]
toy = {seed = 9, per_class = 1, classes = {shape = ["circle", "square", "triangle"]}}
[hyperparameters.dps]
scale = 0.5
[grid.ndtm]
lr = [0.02, 0.05]
inner_steps = [2, 4]
"""
    (tmp_path / "a.yaml").write_text(yaml_text)
    (tmp_path / "a.toml").write_text(toml_text)
    name, jobs = expand(tmp_path / "a.yaml")
    _, jobs2 = expand(tmp_path / "a.toml")
    # 5 references x 2 extractors x (4 ndtm settings + 1 dps) x 2 seeds
    assert name == "grid" and len(jobs) == 5 * 2 * 5 * 2 == 100
    assert [j.key for j in jobs] == [j.key for j in jobs2]
    assert len({j.key for j in jobs}) == 100
    cls = {j.reference_id: j.columns["class"] for j in jobs}
    assert cls["toy:s9:shape=square:0"] == "square" and cls["toy:s5:0"] is None
    sq = next(j for j in jobs if j.reference_id == "toy:s9:shape=square:0")
    assert sq.columns["ref_shape"] == "square"
    # a class list holds everything but the class fixed: same colour, position for every class
    by_cls = {j.columns["class"]: j.columns for j in jobs if j.columns["class"]}
    assert len({(c["ref_color"], c["ref_x"]) for c in by_cls.values()}) == 1


def test_folder_references_by_class(models_dir, tmp_path):
    from PIL import Image

    from fiberbench.toy import references

    imgs, f = references(4, seed=77)
    for i, cls in enumerate(["cat", "cat", "dog", "dog"]):
        (tmp_path / "imgs" / cls).mkdir(parents=True, exist_ok=True)
        arr = (imgs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")
    cfg = small(references=[{"folder": {"path": "imgs", "classes": ["cat", "dog"], "per_class": 1}}], methods=["ndtm"])
    (tmp_path / "s.yaml").write_text(__import__("yaml").safe_dump(cfg))
    _, jobs = expand(tmp_path / "s.yaml")  # paths relative to the sweep file
    assert [(j.reference_id, j.columns["class"]) for j in jobs] == [("folder:cat/0.png", "cat"),
                                                                     ("folder:dog/2.png", "dog")]
    # pixels survive the PNG round trip to within 8-bit rounding
    assert float((jobs[1].reference[0] - imgs[2]).abs().max()) <= 0.5 / 255 + 1e-6


def test_local_sweep_runs_missing_jobs_only_and_recomputes_corrupt_ones(models_dir, tmp_path):
    cfg = small()
    s1 = run_sweep(cfg, tmp_path / "out", progress=False)
    assert (s1.total, s1.done, s1.cached, s1.failed) == (4, 4, 0, [])
    store = Store(tmp_path / "out")
    table = store.query()
    assert len(table) == 8 and not table.duplicated(["store_key", "reference", "sample"]).any()
    # guided fibers match the reference features far better than unguided samples (a number, not "it ran")
    med = table.groupby("method")["feature_distance"].median()
    assert med["ndtm"] < 0.5 * med["unguided"], med
    s2 = run_sweep(cfg, tmp_path / "out", progress=False)
    assert (s2.done, s2.cached) == (0, 4)
    # damage one run: the next sweep recomputes exactly that one, bit-identical
    key = table["store_key"].iloc[0]
    p = store.run_dir(key) / "samples.parquet"
    p.write_bytes(p.read_bytes()[:-50])
    with pytest.warns(UserWarning, match="recomputed"):
        s3 = run_sweep(cfg, tmp_path / "out", progress=False)
    assert (s3.done, s3.cached, s3.failed) == (1, 3, [])
    again = Store(tmp_path / "out").query()
    assert again.equals(table)
    assert (tmp_path / "out" / "sweeps" / "t.last.json").exists()


def test_a_failing_job_is_reported_with_its_reason_and_the_rest_run(models_dir, tmp_path):
    _, jobs = expand(small(refs=1, methods=["ndtm"]))
    job = jobs[0]
    job.checksums = dict(job.checksums, prior="sha256:" + "0" * 64)  # as if the weights changed meanwhile
    out = run_job(job, str(tmp_path / "s"))
    assert out["status"] == "failed" and "weights of toy/prior-fm changed" in out["reason"]
    assert Store(tmp_path / "s").keys() == []


def _runs(folder):
    runs = folder / "runs"
    return [p for p in runs.iterdir()] if runs.exists() else []


def test_killed_sweep_resumes_without_lost_or_duplicated_rows(models_dir, tmp_path):
    import yaml

    cfg = small(name="kill", refs=5)  # 10 jobs
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fiberbench.cli", "sweep", str(path), "--out", str(out)]
    env = dict(os.environ, FIBERBENCH_MODELS=str(models_dir), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while len(_runs(out)) < 2 and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    before = Store(out)
    kept = before.keys()
    assert 2 <= len(kept) < 10, len(kept)
    assert all(before.has(k) for k in kept) and before.corrupt() == []  # nothing half-written is visible
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"10 jobs — {10 - len(kept)} done, {len(kept)} cached, 0 failed" in res.stdout
    table = Store(out).query()
    _, jobs = expand(path)
    assert sorted(table["store_key"].unique()) == sorted(j.key for j in jobs)
    assert len(table) == 20 and not table.duplicated(["store_key", "reference", "sample"]).any()
    assert set(Store(out).keys()) >= set(kept)


@pytest.fixture(scope="module")
def ray_cluster(models_dir):
    ray = pytest.importorskip("ray")
    from fiberbench.sweep import start_ray

    start_ray(num_cpus=2)  # workers at our niceness, not Ray's 15 (starved on a busy machine)
    yield ray
    ray.shutdown()


def test_ray_backend_gives_the_same_table_and_loads_models_once_per_worker(models_dir, ray_cluster, tmp_path):
    cfg = small(name="ray", refs=2)  # 4 jobs on 2 workers: some worker runs >= 2 of them
    local = run_sweep(cfg, tmp_path / "local", progress=False)
    remote = run_sweep(cfg, tmp_path / "ray", backend="ray", progress=False)
    assert (remote.done, remote.failed) == (4, []) and local.done == 4
    a, b = Store(tmp_path / "local").query(), Store(tmp_path / "ray").query()
    assert len(a) == 8
    cols = ["store_key", "reference_id", "sample", "method"]
    assert a[cols].equals(b[cols])
    np.testing.assert_array_equal(a["feature_distance"].to_numpy(), b["feature_distance"].to_numpy())
    assert a.equals(b)
    # every job ran in a Ray worker, not in this process, and each worker loaded each model at most once
    pids = {o["pid"] for o in remote.outcomes}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    for pid in pids:
        loads = [s for o in remote.outcomes if o["pid"] == pid for s in o["loads"]]
        assert sorted(loads) == ["toy/prior-fm", "toy/shape-resnet@logits"], loads
    assert max(sum(o["pid"] == pid for o in remote.outcomes) for pid in pids) >= 2
    # the ray store's results rebuild into the same images as the local ones
    key = a["store_key"].iloc[0]
    assert torch.equal(Store(tmp_path / "ray").get(key).images, Store(tmp_path / "local").get(key).images)
    # a second ray run computes nothing
    again = run_sweep(cfg, tmp_path / "ray", backend="ray", progress=False)
    assert (again.done, again.cached) == (0, 4)


@pytest.mark.slow
def test_benchmark_ray_overhead_per_job_is_under_ten_percent(models_dir, tmp_path):
    """The numbers of docs/scaling.md, at small scale: steady-state Ray overhead < 10 % of a toy job."""
    import ray

    from fiberbench.sweep import benchmark, format_benchmark

    if ray.is_initialized():
        pytest.skip("needs to start its own Ray instances")
    res = benchmark(jobs=4, n=8, workers=(1,), out=tmp_path)
    print(format_benchmark(res))
    r = res["ray1"]
    assert r["same_table"] and res["local_again"]["same_table"]
    assert r["steady_overhead_fraction"] < 0.10, r


def test_validation_catches_wrong_types_empty_lists_and_typo_sized_counts(models_dir, tmp_path):
    """Values of the wrong shape or size are listed like every other problem (no TypeError from deep inside),
    before anything is rendered: a typo such as n: 10000000 references would otherwise render for hours."""
    from fiberbench.sweep import MAX_JOBS, MAX_REFERENCES

    cases = [
        (dict(methods=[]), "methods must list at least one of"),
        (dict(methods=None), "methods must list at least one of"),
        (dict(methods=["ndtm", "ndtm"]), "methods has duplicates"),
        (dict(hyperparameters=["ndtm"]), "hyperparameters must map method names to settings"),
        (dict(hyperparameters={"ndtm": 5}), "hyperparameters.ndtm must be a mapping of hyper-parameters, got 5"),
        (dict(grid="lr"), "grid must map method names to settings"),
        (dict(grid={"ndtm": "lr"}), "grid.ndtm must be a mapping"),
        (dict(grid={"ndtm": {"lr": 0.1}}), "grid.ndtm.lr must be a non-empty list of values, got 0.1"),
        (dict(grid={"ndtm": {"lr": [0.1, float("nan")]}}), "lr must be a finite number >= 0, got nan (method 'ndtm')"),
        (dict(hyperparameters={"ndtm": {"lr_decay": "cosine"}}),
         "lr_decay must be one of ['linear', 'constant'], got 'cosine' (method 'ndtm')"),
        (dict(resources=[1]), "resources must be a mapping"),
        (dict(resources={"num_cpus": float("inf")}), "resources.num_cpus must be a finite number >= 0"),
        (dict(resources={"num_gpus": True}), "resources.num_gpus must be a finite number >= 0, got True"),
        (dict(threads=True), "threads must be a positive integer, got True"),
        (dict(batch_size=False), "batch_size must be a positive integer"),
        (dict(seeds=[-1]), "seeds must be integers in [0, 2**63)"),
        (dict(seeds=[True]), "seeds must be integers"),
        (dict(n=10 ** 7), "n must be a positive integer (samples per fiber, at most 10000), got 10000000"),
        (dict(steps=10 ** 6), "steps must be a positive integer (at most 10000)"),
        (dict(preset=["toy"]), "unknown preset ['toy']"),
        (dict(loss={"l2": 1}), "unknown fiber loss {'l2': 1}"),
        (dict(init=["sdedit", True]), "init must be 'noise' or [sdedit, tau_star]"),
        (dict(extractors=[7]), "extractors: 7 is not a spec string"),
        (dict(references=[{"toy": {"n": 10_000_000, "seed": 3}}]),
         f"references[0].toy.n = 10000000 references is too many: a sweep takes at most {MAX_REFERENCES}"),
        (dict(references=[{"toy": {"per_class": 5000, "classes": {"shape": ["circle", "square", "arrow"]}}}]),
         "references[0].toy selects 5000 x 3 references"),
        (dict(references=[{"toy": {"n": 1, "seed": -4}}]), "references[0].toy.seed must be an integer in [0, 2**63)"),
        (dict(references=[{"toy": {"n": 1, "fixed": "red"}}]), "references[0].toy.fixed must map factor names"),
        (dict(references=[{"toy": {"n": 1, "fixed": {"size": 5}}}]),
         "references[0].toy.fixed.size must be a number in"),
        (dict(references=[{"toy": {"n": 1, "fixed": {"mirror": 1}}}]),
         "references[0].toy.fixed.mirror: 1 is not one of"),
        (dict(references=[{"toy": {"classes": {"shape": []}}}]), "classes.shape must list at least one of"),
        (dict(references=[{"folder": {"path": 3}}]), "references[0].folder.path must be a folder name"),
        (dict(references=[{"folder": {"path": ".", "glob": "/abs/*.png"}}]),
         "references[0].folder.glob '/abs/*.png' cannot"),
        (dict(references=[{"folder": {"path": ".", "glob": 5}}]), "references[0].folder.glob must be a file pattern"),
        (dict(references=[{"folder": {"path": "a\x00b"}}]), "does not exist"),
        (dict(references=[{"toy": {"n": 1000, "seed": 3}}], seeds=list(range(101))),  # x 2 methods
         f"the sweep would run 202000 jobs; at most {MAX_JOBS}"),
    ]
    for kw, part in cases:
        with pytest.raises(ConfigError) as e:
            expand({**small(), **kw}, checksums=False)
        msg = str(e.value)
        assert msg.startswith("sweep config has") and part in msg, (kw, msg)
    # the same config with valid values expands (the cases above fail for the reason named, nothing else)
    _, jobs = expand(small(refs=1, hyperparameters={"ndtm": {"lr_decay": "constant"}},
                           grid={"ndtm": {"lr": [0.05, 0.1]}}, resources={"num_cpus": 1}), checksums=False)
    assert len(jobs) == 3 and {j.hyperparameters.get("lr") for j in jobs if j.method == "ndtm"} == {0.05, 0.1}
