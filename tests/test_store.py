"""Results store: round trips, content keys, atomic commits, corruption detection, path safety."""
import os
import time
import warnings

import pandas as pd
import pytest
import torch

from fiberbench.errors import ConfigError, InputError
from fiberbench.store import Store, cached_sample_fiber, check_name, config_from_result, run_config, weights_checksum

MODELS = ("prior-fm", "shape-resnet")
KW = dict(n=2, steps=5, preset="toy", progress=False)


@pytest.fixture(scope="module")
def models(models_dir):
    import fiberbench as fb

    torch.set_num_threads(1)
    return fb.load_prior("toy/prior-fm"), fb.load_extractor("toy/shape-resnet@logits")


@pytest.fixture(scope="module")
def refs():
    from fiberbench.toy import references

    return references(2, seed=4321)[0]


@pytest.fixture(scope="module")
def computed(models, refs, tmp_path_factory):
    """One run computed through the store, and the store."""
    prior, ext = models
    store = Store(tmp_path_factory.mktemp("store") / "results")
    t0 = time.perf_counter()
    res = cached_sample_fiber(store, prior, ext, refs, reference_ids=["a", "b"], **KW)
    return store, res, time.perf_counter() - t0


def test_get_rebuilds_the_result_exactly_and_fast(computed, models, refs):
    store, res, t_compute = computed
    assert res.config["from_store"] is False and len(store) == 1
    prior, ext = models
    t0 = time.perf_counter()
    hit = cached_sample_fiber(store, prior, ext, refs, reference_ids=["a", "b"], **KW)
    t_hit = time.perf_counter() - t0
    assert hit.config["from_store"] is True
    assert t_hit < 0.2 * t_compute, (t_hit, t_compute)
    for name in ("images", "reference", "feature_distance", "cosine", "loss_history", "features",
                 "reference_features", "latents"):
        a, b = getattr(hit, name), getattr(res, name)
        assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan()), name
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), name  # bit-exact, NaN where NaN
    assert hit.images.shape == (4, 3, 32, 32) and hit.status == res.status and hit.reference_ids == ["a", "b"]
    assert hit.config["run_id"] == res.config["run_id"] and hit.config["sample_seeds"] == res.config["sample_seeds"]
    pd.testing.assert_frame_equal(hit.to_frame(), res.to_frame())
    # the table in the store is to_frame() plus the key
    q = store.query()
    assert len(q) == 4 and set(q["store_key"]) == {res.config["store_key"]}
    assert q["feature_distance"].tolist() == res.feature_distance.tolist()


def test_key_follows_content_not_spelling(models_dir, refs):
    base = run_config("toy/prior-fm", "toy/shape-resnet@logits", refs, **KW)
    same = [
        run_config("toy/prior-fm", "toy/shape-resnet", refs, **KW),  # default layer spelled out or not
        run_config("toy/prior-fm", "toy/shape-resnet@logits", refs, n=2, steps=5, lr=0.1, inner_steps=8,
                   preset="toy", callback=print, batch_size=1),  # preset values restated, non-content kwargs
        run_config("toy/prior-fm", "toy/shape-resnet@logits", refs.clone(), **KW),
    ]
    assert all(c["key"] == base["key"] for c in same)
    other = [
        run_config("toy/prior-fm", "toy/shape-resnet@logits", refs, **{**KW, "n": 3}),
        run_config("toy/prior-fm", "toy/shape-resnet@logits", refs, seed=1, **KW),
        run_config("toy/prior-fm", "toy/shape-resnet@logits", refs, lr=0.06, **KW),
        run_config("toy/prior-fm", "toy/shape-resnet@pre_logits", refs, **KW),
        run_config("toy/prior-fm", "toy/shape-resnet@logits", refs, method="dps", **KW),
        run_config("toy/prior-fm", "toy/shape-resnet@logits", refs.flip(-1), **KW),
        run_config("toy/prior-fm", "toy/shape-resnet@logits", refs, checksums={"prior": "sha256:0"}, **KW),
    ]
    keys = {c["key"] for c in other} | {base["key"]}
    assert len(keys) == len(other) + 1
    assert len(base["key"]) == 32 and base["weights"]["prior"].startswith("sha256:")


def test_weight_checksum_is_the_file_content(models_dir):
    before = weights_checksum("toy/shape-resnet@logits")
    assert before == weights_checksum("toy/shape-resnet@pre_logits")  # same file
    path = models_dir / "shape-resnet.safetensors"
    saved = path.read_bytes()
    try:
        b = bytearray(saved)
        b[-1] ^= 0x01  # one bit of one weight
        path.write_bytes(bytes(b))
        os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
        assert weights_checksum("toy/shape-resnet@logits") != before
    finally:
        path.write_bytes(saved)
        os.utime(path, ns=(time.time_ns() + 2 * 10**9,) * 2)
    assert weights_checksum("toy/shape-resnet@logits") == before
    assert weights_checksum("torch/os:getcwd") is None  # nothing to checksum: key rests on the spec


def test_corrupted_or_truncated_runs_are_detected_and_quarantined(computed, tmp_path):
    store, res, _ = computed
    key = res.config["store_key"]
    copy = Store(tmp_path / "s")
    damages = {
        "samples.parquet": lambda b: b[: len(b) // 2],                 # truncated
        "tensors.safetensors": lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:],  # one byte flipped
        "meta.json": lambda b: b[:-5],                                 # half-written JSON
    }
    for fname, damage in damages.items():
        copy.put(res, store.run_config(key))
        assert copy.has(key)
        p = copy.run_dir(key) / fname
        p.write_bytes(damage(p.read_bytes()))
        copy._verified.clear()
        with pytest.warns(UserWarning, match="recomputed"):
            assert copy.get(key) is None
        assert not copy.has(key) and key not in copy.keys()
        assert len(copy.query()) == 0
    assert len(copy.corrupt()) == 3
    reasons = sorted((copy.root / ".corrupt" / c / "REASON.txt").read_text() for c in copy.corrupt())
    assert any("truncated" in r for r in reasons) and any("sha256" in r for r in reasons)
    assert any("meta.json" in r for r in reasons)
    # and it can be written again
    copy.put(res, store.run_config(key))
    assert torch.equal(copy.get(key).images, res.images)


def test_leftover_temp_dirs_are_invisible_and_cleaned(computed, tmp_path):
    store, res, _ = computed
    s = Store(tmp_path / "s")
    import socket

    dead = tmp_path / "s" / ".tmp" / f"{'0' * 32}.{socket.gethostname()}.999999999.abcd1234"
    dead.mkdir()
    (dead / "samples.parquet").write_bytes(b"half")
    assert s.keys() == [] and len(s.query()) == 0
    Store(tmp_path / "s")  # opening the store removes temp dirs of dead writers on this host
    assert not dead.exists()


def test_put_with_extra_columns_and_query_filters(computed, tmp_path):
    store, res, _ = computed
    s = Store(tmp_path / "s")
    extra = pd.DataFrame({"clip_score": [0.1, 0.2, 0.3, 0.4]})
    key = s.put(res, store.run_config(res.config["store_key"]), extra=extra)
    s2 = Store(tmp_path / "s2")
    s2.put(res, key=key, extra={"sweep": "x", "class": "circle"})
    q = s.query()
    assert q["clip_score"].tolist() == [0.1, 0.2, 0.3, 0.4]
    assert s2.query(reference_id="b")["sample"].tolist() == [0, 1]
    assert s2.query(sample=[1], columns=["feature_distance"]).shape == (2, 2)
    assert len(s2.query(feature_distance=lambda c: c < -1)) == 0
    with pytest.raises(ConfigError, match="clash"):
        Store(tmp_path / "s3").put(res, key=key, extra={"method": "other"})
    with pytest.raises(InputError, match="rows"):
        Store(tmp_path / "s4").put(res, key=key, extra=pd.DataFrame({"x": [1]}))
    with pytest.raises(ConfigError, match="no column"):
        s.query(methd="ndtm")


def test_key_from_result_config_matches_run_config(computed):
    store, res, _ = computed
    assert config_from_result(res)["key"] == res.config["store_key"]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "runs/../x", "/abs", "ABCDEF" * 6, "", None, "a" * 31])
def test_keys_cannot_smuggle_paths(computed, bad):
    store, _, _ = computed
    with pytest.raises(ConfigError, match="invalid store key"):
        store.get(bad)
    with pytest.raises(ConfigError):
        store.run_dir(bad)


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "a\\b", "x" * 200, ""])
def test_names_cannot_smuggle_paths(bad):
    with pytest.raises(ConfigError, match="invalid"):
        check_name(bad)


def test_refuses_a_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a fiberbench store"):
        Store(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Store(tmp_path / "fresh")
