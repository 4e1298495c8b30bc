"""Reliability and safety (issue 9): bad inputs, numerical faults, memory, interrupted work, untrusted files.

Already covered elsewhere (not repeated here): OOM split in the denoiser and one-call live-tensor count
(test_sampling), store corruption/quarantine and key/name path checks (test_store), whole-config sweep
validation and a SIGKILLed sweep (test_sweep), a malicious pickle inside a diffusers folder (test_hub).
"""
from __future__ import annotations

import gc
import math
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

import fiberbench as fb
from fiberbench.errors import ConfigError, InputError
from fiberbench.io import as_image_batch, load_image, load_state_dict, pickle_globals
from fiberbench.sampling import DEFAULTS, METHODS, PRESETS, resolve_hyperparameters, sample_fiber

HYP = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# =========================================================================== images

def _png16(path: Path, arr: np.ndarray) -> Path:
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit colour): arr [H,W,C] uint16, C in 1..4."""
    h, w, c = arr.shape
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_unreadable_and_non_image_files_raise_input_errors_naming_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(good)
    cases = {
        "missing.png": None,
        "notes.png": b"this is not an image at all",
        "empty.png": b"",
        "truncated.png": good.read_bytes()[: len(good.read_bytes()) // 2],
        "random.jpg": bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)),
    }
    for fname, data in cases.items():
        p = tmp_path / fname
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(InputError) as e:
            load_image(p)
        assert str(p) in str(e.value), (fname, str(e.value))
        assert e.value.__cause__ is None  # one readable message, not a chained PIL traceback
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        load_image(tmp_path / "folder.png")
    # the same errors through the batch converter used by sample_fiber
    with pytest.raises(InputError, match="notes.png"):
        as_image_batch(str(tmp_path / "notes.png"))
    with pytest.raises(ConfigError, match="size must be a positive integer"):
        load_image(good, size=0)


def test_grayscale_rgba_palette_and_16_bit_files_convert_exactly(tmp_path):
    # 8-bit gray: repeated to RGB, /255
    Image.fromarray(np.array([[0, 51], [102, 255]], np.uint8)).save(tmp_path / "g.png")
    g = load_image(tmp_path / "g.png")
    assert g.shape == (3, 2, 2) and g.dtype == torch.float32
    assert torch.equal(g[0], g[2]) and torch.allclose(g[0], torch.tensor([[0, 0.2], [0.4, 1.0]]), atol=1e-7)
    # RGBA: composited on white; half-transparent red -> (1, 0.5, 0.5)
    Image.new("RGBA", (3, 2), (255, 0, 0, 128)).save(tmp_path / "a.png")
    a = load_image(tmp_path / "a.png")
    assert torch.allclose(a[:, 0, 0], torch.tensor([1.0, 127 / 255, 127 / 255]), atol=1 / 255)
    # gray + alpha and palette with a transparent index also end up on white
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert torch.equal(load_image(tmp_path / "la.png"), torch.ones(3, 2, 2))
    p = Image.new("P", (2, 2), 0)
    p.putpalette([255, 0, 0] * 256)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png")
    assert torch.equal(load_image(tmp_path / "p.png"), torch.ones(3, 2, 2))
    # 16-bit grayscale: always /65535, also when every value is small (a dark image is not 8-bit data)
    dark = _png16(tmp_path / "dark16.png", np.array([[[0], [200]], [[30000], [65535]]], np.uint16))
    d = load_image(dark)
    assert torch.allclose(d[0], torch.tensor([[0, 200 / 65535], [30000 / 65535, 1.0]]), atol=1e-7)
    # 16-bit RGB: read by Pillow at 8-bit precision (the top byte)
    rgb16 = np.random.default_rng(1).integers(0, 65536, (4, 5, 3)).astype(np.uint16)
    r = load_image(_png16(tmp_path / "rgb16.png", rgb16))
    assert torch.allclose(r, torch.from_numpy((rgb16 >> 8).astype(np.float32) / 255).permute(2, 0, 1), atol=1e-7)
    # a float TIFF is used as-is when it lies in [0,1], refused otherwise
    Image.fromarray(np.array([[0.25, 0.75]], np.float32)).save(tmp_path / "ok.tif")
    assert torch.allclose(load_image(tmp_path / "ok.tif")[:, 0], torch.tensor([[0.25, 0.75]] * 3))
    Image.fromarray(np.array([[0.5, 2.0]], np.float32)).save(tmp_path / "hot.tif")
    with pytest.raises(InputError, match=r"hot.tif: float image values must lie in \[0,1\]"):
        load_image(tmp_path / "hot.tif")
    Image.fromarray(np.array([[0.5, np.nan]], np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(InputError, match="nan.tif: float image contains NaN"):
        load_image(tmp_path / "nan.tif")
    Image.fromarray(np.array([[1, 70000]], np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(InputError, match="i32.tif: 32-bit integer image"):
        load_image(tmp_path / "i32.tif")
    # EXIF orientation 6 (rotate 90 degrees): a 20x10 stored image is shown 10 wide, 20 high
    im = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").shape == (3, 20, 10)


def test_value_ranges_uint8_float_nan_and_out_of_range_arrays():
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)  # HWC uint8, as PIL/numpy users hold images
    x = as_image_batch(u8)
    assert x.shape == (1, 3, 5, 6) and torch.equal((x[0] * 255).round().byte(), torch.from_numpy(u8).permute(2, 0, 1))
    f = torch.rand(2, 3, 4, 4)
    assert torch.equal(as_image_batch(f), f)  # float in [0,1]: untouched
    assert torch.equal(as_image_batch(f[0]), f[:1])  # [3,H,W] -> [1,3,H,W]
    assert torch.equal(as_image_batch(torch.from_numpy(np.full((3, 2, 2), 65535, np.uint16))), torch.ones(1, 3, 2, 2))
    assert torch.equal(as_image_batch(np.ones((2, 2), bool)), torch.ones(1, 3, 2, 2))
    # rounding noise just outside [0,1] is clamped; real excursions are refused with a hint
    assert float(as_image_batch(torch.full((3, 2, 2), 1.0005)).max()) == 1.0
    with pytest.raises(InputError, match="divide by 255"):
        as_image_batch(torch.full((3, 2, 2), 200.0), name="my_ref")
    with pytest.raises(InputError, match=r"my_ref: .*\(x \+ 1\) / 2"):
        as_image_batch(torch.rand(3, 2, 2) * 2 - 1, name="my_ref")
    nan = torch.rand(1, 3, 4, 4)
    nan[0, 1, 2, 3] = float("nan")
    with pytest.raises(InputError, match="my_ref: contains 1 NaN or infinite"):
        as_image_batch(nan, name="my_ref")
    for bad, pat in [(np.zeros((4, 4, 3), np.int16), "no unambiguous range"), (torch.zeros(0, 3, 4, 4), "empty"),
                     (np.zeros((2, 2), np.complex64), "not an image"), (np.array([[None]]), "not an image"),
                     (torch.rand(32, 32, 3), "channels-last"), (torch.rand(5), "expected an image"),
                     ({"a": 1}, "expected an image"), ([], "empty list")]:
        with pytest.raises(InputError, match=pat):
            as_image_batch(bad)
    # lists of images of one size are stacked; different sizes are refused with the fix
    assert as_image_batch([torch.rand(3, 4, 4), u8[:4, :4]]).shape == (2, 3, 4, 4)
    with pytest.raises(InputError, match="different sizes"):
        as_image_batch([torch.rand(3, 4, 4), torch.rand(3, 5, 5)])


def test_tiny_and_huge_images_and_the_documented_resize(tmp_path, monkeypatch):
    Image.new("RGB", (1, 1), (255, 0, 0)).save(tmp_path / "dot.png")
    dot = load_image(tmp_path / "dot.png")
    assert dot.shape == (3, 1, 1)
    up = load_image(tmp_path / "dot.png", size=32)  # a 1x1 image is a constant image at any size
    assert up.shape == (3, 32, 32)
    assert torch.allclose(up, torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 32, 32), atol=1e-6)
    # a big non-square image is squashed to size x size; antialiasing keeps the mean colour
    rng = np.random.default_rng(3)
    arr = (rng.random((900, 600, 3)) * 255).astype(np.uint8)
    arr[:, :300] = 0  # left half black: the squash keeps it as the left half
    Image.fromarray(arr).save(tmp_path / "big.png")
    full = load_image(tmp_path / "big.png")
    small = load_image(tmp_path / "big.png", size=32)
    assert small.shape == (3, 32, 32) and 0 <= float(small.min()) and float(small.max()) <= 1
    assert abs(float(small.mean()) - float(full.mean())) < 0.01
    assert float(small[:, :, :15].max()) < 0.02 and float(small[:, :, 17:].mean()) > 0.45
    # sample_fiber resizes references to the prior's size itself: an image at 3x that size is accepted
    # decompression bombs (> 2x Pillow's MAX_IMAGE_PIXELS) are refused, naming the file
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match=r"big.png is too large to read safely"):
        load_image(tmp_path / "big.png")


# --------------------------------------------------------------------------- property tests: the image loader

_DTYPES = [np.uint8, np.uint16, np.int8, np.int16, np.int32, np.int64, np.uint32, np.float16, np.float32,
           np.float64, np.bool_]


@st.composite
def image_like(draw):
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5))
    if dtype.kind == "f" and draw(st.booleans()):
        arr = draw(hnp.arrays(dtype, shape, elements=st.floats(0, 1, width=16)))  # mostly valid images
    else:
        arr = draw(hnp.arrays(dtype, shape))  # anything the dtype holds: NaN, inf, huge, negative
    kind = draw(st.sampled_from(["numpy", "torch", "noncontiguous"]))
    if kind == "numpy":
        return arr
    t = torch.from_numpy(arr.copy())
    return t.transpose(-1, -2) if kind == "noncontiguous" and t.ndim >= 2 else t


def _assert_valid_batch(x):
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.ndim == 4 and x.shape[1] == 3
    assert x.shape[0] >= 1 and x.shape[2] >= 1 and x.shape[3] >= 1
    assert bool(torch.isfinite(x).all()) and float(x.min()) >= 0 and float(x.max()) <= 1


@settings(max_examples=150, **HYP)
@given(image_like())
def test_property_as_image_batch_gives_a_valid_batch_or_an_input_error(images):
    try:
        x = as_image_batch(images, name="ref")
    except InputError as e:
        assert str(e).startswith("ref") or "ref" in str(e)
        return
    _assert_valid_batch(x)
    # float inputs already [B,3,H,W] in [0,1] come back unchanged (as float32)
    if isinstance(images, torch.Tensor) and images.is_floating_point() and images.ndim == 4 and images.shape[1] == 3:
        assert torch.equal(x, images.float())


@settings(max_examples=60, **HYP)
@given(data=st.data())
def test_property_load_image_gives_a_valid_image_or_an_input_error(data):
    mode = data.draw(st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "I", "F", "CMYK"]))
    fmt = data.draw(st.sampled_from(["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "PPM"]))
    h, w = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    seed = data.draw(st.integers(0, 2 ** 16))
    damage = data.draw(st.sampled_from(["none", "none", "truncate", "flip", "garbage"]))
    size = data.draw(st.sampled_from([None, None, 1, 5, 16]))
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"x.{fmt.lower()}"
        if damage == "garbage":
            p.write_bytes(rng.integers(0, 256, data.draw(st.integers(0, 300)), dtype=np.uint8).tobytes())
        else:
            im = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
            if mode == "F":
                im = Image.fromarray(rng.normal(0.5, 0.6, (h, w)).astype(np.float32))
            elif mode == "I":
                im = Image.fromarray(rng.integers(-10, 80000, (h, w)).astype(np.int32))
            elif mode == "I;16":
                im = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
            else:
                im = im.convert(mode)
            try:
                im.save(p, format=fmt)
            except (OSError, ValueError, KeyError):
                assume(False)  # this format cannot hold this mode: nothing to test
            raw = p.read_bytes()
            if damage == "truncate":
                p.write_bytes(raw[: max(1, len(raw) * data.draw(st.integers(1, 9)) // 10)])
            elif damage == "flip":
                k = data.draw(st.integers(0, len(raw) - 1))
                p.write_bytes(raw[:k] + bytes([raw[k] ^ 0xFF]) + raw[k + 1:])
        try:
            x = load_image(p, size=size)
        except InputError as e:
            assert str(p) in str(e)
            return
        _assert_valid_batch(x[None])
        if size is not None:
            assert x.shape == (3, size, size)


# =========================================================================== specs and configs

def _no_loading(monkeypatch):
    """Make every model loader fail loudly: a ConfigError must come from validation, before any load."""
    from fiberbench.models import SOURCES

    def boom(*a, **k):
        raise AssertionError(f"a model was loaded: {a}")

    for source in SOURCES.values():
        for name in ("load_prior", "load_extractor", "load_clip"):
            monkeypatch.setattr(source, name, boom)


def test_bad_specs_and_hyperparameters_fail_before_any_model_is_loaded(monkeypatch):
    _no_loading(monkeypatch)
    ref = torch.rand(3, 32, 32)
    ok = dict(prior="toy/prior-fm", extractor="toy/shape-resnet@logits")
    cases = [
        (dict(ok, prior="toy/prior-fn"), r"unknown prior 'toy/prior-fn'.*did you mean \['toy/prior-fm'"),
        (dict(ok, extractor="toy/shape-resnt@logits"),
         r"unknown extractor 'toy/shape-resnt'.*did you mean.*shape-resnet"),
        (dict(ok, extractor="toy/prior-fm"), r"unknown extractor 'toy/prior-fm'"),  # a prior is no extractor
        (dict(ok, extractor="tim/resnet50"), r"unknown model source 'tim'.*did you mean 'timm'"),
        (dict(ok, prior="prior-fm"), r"must look like '<source>/<name>"),
        (dict(ok, n=0), "n must be a positive integer"),
        (dict(ok, n=2.5), "n must be a positive integer"),
        (dict(ok, steps=-3), "steps must be a positive integer"),
        (dict(ok, steps=0), "steps must be a positive integer"),
        (dict(ok, method="ndmt"), "unknown method 'ndmt'"),
        (dict(ok, lr=float("nan")), "lr must be a finite number"),
        (dict(ok, inner_steps=-1), "inner_steps must be a non-negative integer"),
        (dict(ok, seed="7"), "seed must be an integer"),
        (dict(ok, batch_size=0), "batch_size must be a positive integer"),
        (dict(ok, dtype="bf16"), "dtype must be"),
        (dict(ok, reference_ids=["a", "b"]), "reference_ids has 2 entries for 1 references"),
    ]
    for kw, pat in cases:
        kw = dict(kw)
        with pytest.raises(ConfigError, match=pat):
            sample_fiber(kw.pop("prior"), kw.pop("extractor"), ref, progress=False, **kw)
    with pytest.raises(InputError, match="reference: contains"):
        sample_fiber(ok["prior"], ok["extractor"], torch.full((3, 32, 32), float("nan")), progress=False)


def test_bad_layer_names_list_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        fb.load_extractor("toy/shape-resnet@layer9")
    msg = str(e.value)
    assert "layer 'layer9' not found in toy/shape-resnet" in msg
    assert "logits, pre_logits" in msg and "layer4" in msg  # the valid names, with the closest module names


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2000) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
_HP_KEYS = sorted({k for d in DEFAULTS.values() for k in d})


@settings(max_examples=300, **HYP)
@given(method=st.sampled_from(list(METHODS) + ["", "NDTM", "magic"]),
       preset=st.sampled_from([None] + sorted(PRESETS) + ["nope"]) | _JSONISH,
       overrides=st.dictionaries(st.sampled_from(_HP_KEYS) | st.text(max_size=6), _JSONISH, max_size=4))
def test_property_resolve_hyperparameters_gives_valid_settings_or_a_config_error(method, preset, overrides):
    try:
        hp, run = resolve_hyperparameters(method, preset, dict(overrides))
    except ConfigError:
        return
    assert method in METHODS and set(hp) == set(DEFAULTS[method])
    for k in ("lr", "scale", "w_ctrl", "w_score", "w_term", "eta"):
        if k in hp:
            assert isinstance(hp[k], (int, float)) and math.isfinite(hp[k]) and hp[k] >= 0, (k, hp[k])
    for k in ("inner_steps", "iters"):
        if k in hp:
            assert int(hp[k]) == hp[k] and hp[k] >= (0 if k == "inner_steps" else 1)
    if "gamma" in hp:
        g = hp["gamma"]
        if isinstance(g, (int, float)):
            assert math.isfinite(g) and g >= 0
        else:
            assert all(len(s) == 4 and all(math.isfinite(v) for v in s) for s in g)


def test_every_hyperparameter_is_checked_for_type_finiteness_range_and_choices():
    from fiberbench.sampling import HP_RULES

    assert {k for d in DEFAULTS.values() for k in d} <= set(HP_RULES)  # no hyper-parameter without a rule
    cases = [
        ("ndtm", dict(inner_steps="a"),
         r"inner_steps must be a non-negative integer \(at most 1000\), got 'a' \(method 'ndtm'\)"),
        ("ndtm", dict(inner_steps=4.0), r"inner_steps .*must be a non-negative integer .*got 4\.0"),
        ("ndtm", dict(inner_steps=True), r"inner_steps .*got True \(bool\)"),
        ("ndtm", dict(inner_steps=5000), r"inner_steps .*at most 1000\), got 5000"),
        ("metamer", dict(iters=float("nan")), r"iters must be a positive integer .*got nan \(method 'metamer'\)"),
        ("metamer", dict(iters=0), r"iters .*must be a positive integer"),
        ("ndtm", dict(gamma=float("nan")), r"gamma .*must be a finite number >= 0 or .*got nan"),
        ("dps", dict(gamma=float("inf")), r"gamma must be a finite number >= 0 .*got inf \(method 'dps'\)"),
        ("ndtm", dict(gamma=[(0, 0, 1000)]), r"gamma .*segments .*got \[\(0, 0, 1000\)\] \(list\)"),
        ("ndtm", dict(gamma=[(1, 1, 2000, 0)]), r"tau_from, tau_to in \[0, 1000\]"),
        ("ndtm", dict(gamma=[(-1, 1, 900, 0)]), r"g_start, g_end >= 0"),
        ("ndtm", dict(gamma=[]), r"non-empty list of segments"),
        ("ndtm", dict(gamma="strong"), r"gamma .*got 'strong'"),
        ("ndtm", dict(lr=True), r"lr must be a finite number >= 0, got True \(bool\) \(method 'ndtm'\)"),
        ("ndtm", dict(lr=float("inf")), r"lr .*finite number >= 0, got inf"),
        ("ndtm", dict(lr="0.1"), r"lr .*got '0\.1'"),
        ("ndtm", dict(adam_eps=-1), r"adam_eps .*must be a finite number > 0, got -1"),
        ("ndtm", dict(adam_eps=0.0), r"adam_eps .*> 0, got 0\.0"),
        ("ndtm", dict(grad_clip=0), r"grad_clip .*> 0, got 0"),
        ("ndtm", dict(lr_decay="cosine"), r"lr_decay .*must be one of \['linear', 'constant'\], got 'cosine'"),
        ("ndtm", dict(target=None), r"target .*one of \['fixed', 'time'\], got None"),
        ("ndtm", dict(grad_norm="unit-norm"), r"grad_norm .*one of \['clip', 'unit'\], got 'unit-norm'"),
        ("ndtm", dict(control_init=["zero"]), r"control_init .*got \['zero'\] \(list\)"),
        ("ndtm", dict(w_term=-0.5), r"w_term .*>= 0, got -0\.5"),
        ("ndtm", dict(w_ctrl=10 ** 400), r"w_ctrl .*finite number"),
        ("dps", dict(scale=float("nan")), r"scale .*finite number >= 0, got nan"),
        ("unguided", dict(eta=1.5), r"eta must be a finite number in \[0, 1\], got 1\.5 \(method 'unguided'\)"),
        ("ndtm", dict(lr_decya="linear"), r"unknown hyper-parameter\(s\) \['lr_decya'\].*did you mean \['lr_decay'\]"),
        ("ndtm", {3: 1}, r"unknown hyper-parameter\(s\) \[3\]"),
    ]
    for method, over, pat in cases:
        with pytest.raises(ConfigError, match=pat):
            resolve_hyperparameters(method, None, over)
    for preset, pat in [([1], r"unknown preset \[1\] \(list\)"), ({"a": 1}, "unknown preset"),
                        ("toy ", "unknown preset")]:
        with pytest.raises(ConfigError, match=pat):
            resolve_hyperparameters("ndtm", preset, {})
    with pytest.raises(ConfigError, match=r"unknown method 'ndmt'.*did you mean 'ndtm'"):
        resolve_hyperparameters("ndmt", None, {})
    with pytest.raises(ConfigError, match="unknown method"):
        resolve_hyperparameters(["ndtm"], None, {})
    # accepted values come back as plain Python numbers (numpy scalars are what a grid from np.linspace holds)
    hp, run = resolve_hyperparameters("ndtm", "toy", dict(lr=np.float32(0.25), inner_steps=np.int64(3),
                                                          lr_decay="constant", gamma=2))
    assert type(hp["lr"]) is float and hp["lr"] == 0.25 and type(hp["inner_steps"]) is int and hp["inner_steps"] == 3
    assert hp["gamma"] == 2 and run == {"steps": 20, "loss": "cosine"}


@st.composite
def sweep_configs(draw):
    """A valid small sweep, with some keys replaced by random values or random keys added."""
    cfg = {"name": "p", "extractors": ["toy/shape-resnet@logits"], "priors": ["toy/prior-fm"],
           "methods": ["ndtm"], "n": 2, "steps": 3, "seeds": [0], "references": [{"toy": {"n": 1, "seed": 3}}]}
    keys = list(cfg) + ["preset", "loss", "init", "hyperparameters", "grid", "resources", "threads", "batch_size",
                        "resourses"]
    for k in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        cfg[k] = draw(_JSONISH | st.lists(st.sampled_from(["toy/prior-fm", "toy/shape-resnet@logits", "ndtm",
                                                           "dps", "x/y", "toy/nope"]), max_size=2))
    return cfg


@settings(max_examples=150, **HYP)
@given(cfg=sweep_configs())
def test_property_sweep_config_validation_gives_jobs_or_one_config_error(cfg):
    from fiberbench.sweep import expand

    try:
        name, jobs = expand(cfg, checksums=False)
    except ConfigError as e:
        assert str(e).startswith("sweep config has") or "same run" in str(e), str(e)
        return
    assert jobs and all(len(j.key) == 32 and j.n >= 1 and j.reference.shape[0] == 1 for j in jobs)


# =========================================================================== numerical faults

class _NaNGradient(torch.autograd.Function):
    """Identity forward; NaN gradient for the given rows."""

    @staticmethod
    def forward(ctx, x, rows):
        ctx.rows = rows
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[ctx.rows] = float("nan")
        return g, None


class Faulty(torch.nn.Module):
    """A deliberately broken extractor around a real one, on sample batches (>= 2 rows) only:

    - ``nan_rows``: NaN features always (also for the final image);
    - ``grad_rows``: finite features but NaN gradients (every guided update is skipped);
    - ``transient_rows``: NaN features in the first ``transient_calls`` gradient-carrying calls only.
    """

    spec = "test/faulty"

    def __init__(self, base, nan_rows=(), grad_rows=(), transient_rows=(), transient_calls=2):
        super().__init__()
        self.base, self.nan_rows, self.grad_rows = base, list(nan_rows), list(grad_rows)
        self.transient_rows, self.transient_calls, self.grad_calls = list(transient_rows), transient_calls, 0

    def forward(self, images):
        out = self.base(images)
        if images.shape[0] < 2:
            return out  # the reference
        if torch.is_grad_enabled():
            self.grad_calls += 1
            if self.grad_rows:
                out = _NaNGradient.apply(out, self.grad_rows)
        rows = list(self.nan_rows)
        if torch.is_grad_enabled() and self.grad_calls <= self.transient_calls:
            rows += self.transient_rows
        if rows:
            mask = torch.zeros(out.shape[0], 1, dtype=torch.bool)
            mask[rows] = True
            out = torch.where(mask, torch.full_like(out, float("nan")), out)
        return out


# The fault tests count guided steps: only the first denoising step (tau 1000) unguided, whatever the
# prior's timestep shift (the shipped prior-fm samples with shift 3, whose second step is at tau 923-947
# for 6-8 steps: inside the toy preset's gamma-0 segment down to tau 900)
GAMMA_ONE_UNGUIDED_STEP = [(0, 0, 1000, 950), (1, 1, 950, 0)]


def _unguided(kw: dict) -> dict:
    """The same run without guidance (drops the guidance-only gamma)."""
    return {k: v for k, v in kw.items() if k != "gamma"} | {"method": "unguided"}


def test_nan_injection_retries_at_half_the_lr_gives_up_after_four_halvings_and_the_rest_finish(prior_fm,
                                                                                               shape_resnet):
    ref, _ = fb.toy.references(1, seed=21)
    kw = dict(n=6, method="ndtm", preset="toy-fast", steps=6, seed=3, progress=False, gamma=GAMMA_ONE_UNGUIDED_STEP)
    clean = sample_fiber(prior_fm, shape_resnet, ref, **kw)
    plain = sample_fiber(prior_fm, shape_resnet, ref, **_unguided(kw))
    bad = Faulty(shape_resnet, nan_rows=[1, 3], grad_rows=[2], transient_rows=[0], transient_calls=2)
    res = sample_fiber(prior_fm, bad, ref, **kw)
    guided_calls = bad.grad_calls  # inner steps x guided denoising steps
    assert guided_calls == 20  # preset toy-fast: 4 inner steps on the 5 guided steps (gamma 0 at tau 1000)
    st_ = res.status
    # permanent faults: 4 retries at 1/2, 1/4, 1/8, 1/16 of the lr inside step 2; the 5th fault in a row (first
    # inner step of step 3) gives the sample up, it finishes unguided and is marked failed
    gave_up = "non-finite {} 5 times; lr halved 4 times, then guidance given up at denoising step 3 of 6 " \
              "(unguided from there)"
    assert st_[2] == "failed: " + gave_up.format("gradient")
    for r in (1, 3):  # NaN features also for the final image
        assert st_[r] == "failed: the extractor gave non-finite features for the final image; " + gave_up.format("loss")
    # transient fault (the first 2 calls): retried twice at a smaller lr, then guided to the end
    assert st_[0] == "recovered: non-finite loss 2 times; lr halved 2 times"
    assert st_[4] == st_[5] == "ok"
    assert list(res.to_frame()["status"]) == st_
    assert res.config["lr_halvings"] == 2 + 3 * 4 and res.config["samples_given_up"] == 3
    # every image is finite; healthy samples are bit for bit what a run without the faulty rows gives
    assert bool(torch.isfinite(res.images).all())
    for r in (4, 5):
        assert torch.equal(res.images[r], clean.images[r]), r
        assert float(res.feature_distance[r]) == float(clean.feature_distance[r])
    # samples given up never took a finite guided step: they are the plain prior trajectory
    for r in (1, 2, 3):
        assert torch.allclose(res.images[r], plain.images[r], atol=1e-5), r
    # the recovered sample lands on the fiber like the clean ones: both under 1 % of the unguided distance
    # (measured with two prior-fm checkpoints: 3.0e-4 and 9.7e-6, clean samples 9e-6..1.5e-4 and 1e-6..1.5e-3,
    # unguided 1.32; cosine loss)
    # (with the shift-3 prior the plain sample of row 0 happens to keep the reference's shape, so the bound is
    # the benchmark's own "on the fiber": cosine >= 0.95, i.e. cosine loss <= 0.05; measured 1.2e-4)
    d = res.feature_distance
    on_fiber = 0.05
    assert math.isfinite(float(d[0])) and float(d[0]) < on_fiber and float(clean.feature_distance.max()) < on_fiber
    assert math.isnan(float(d[1])) and math.isnan(float(d[3]))
    # the loss history shows NaN where the loss was not finite
    guided = ~torch.isnan(clean.loss_history[:, 4])
    assert bool(torch.isnan(res.loss_history[guided, 1]).all())
    assert bool(torch.isfinite(res.loss_history[guided, 4]).all())


def test_faults_spread_over_the_run_are_retried_each_time_and_never_add_up_to_a_give_up(prior_fm, shape_resnet):
    """One NaN per guided step, a finite evaluation after each: the lr is halved six times in all, but a
    sample is only given up after five faults *in a row*; each denoising step starts at the full lr again."""
    ref, _ = fb.toy.references(1, seed=27)
    kw = dict(n=3, method="ndtm", preset="toy-fast", steps=7, seed=1, progress=False, gamma=GAMMA_ONE_UNGUIDED_STEP)
    clean = sample_fiber(prior_fm, shape_resnet, ref, **kw)

    class FirstCallOfEveryStep(Faulty):
        """NaN features for row 0 in the first inner call of every guided step (4 inner steps per step)."""

        def forward(self, images):
            out = self.base(images)
            if torch.is_grad_enabled() and images.shape[0] >= 2:
                self.grad_calls += 1
                if self.grad_calls % 4 == 1:
                    out = out.clone()
                    out[0] = float("nan")
            return out

    bad = FirstCallOfEveryStep(shape_resnet)
    res = sample_fiber(prior_fm, bad, ref, **kw)
    assert bad.grad_calls == 6 * 4  # 6 guided steps
    assert res.status == ["recovered: non-finite loss 6 times; lr halved 6 times", "ok", "ok"]
    assert torch.equal(res.images[1:], clean.images[1:])
    # still guided, though weaker: 3 of 4 inner steps at half the lr each step (measured 0.38 / 0.93 with two
    # prior-fm checkpoints, against 1.33 unguided and <= 3e-3 clean; cosine loss). Unguided it would be the plain
    # sample exactly (same noise), so 0.2 below it is guidance at work
    plain = sample_fiber(prior_fm, shape_resnet, ref, **_unguided(kw))
    assert float(res.feature_distance[0]) < float(plain.feature_distance[0]) - 0.2


@pytest.mark.parametrize("method,kw", [("dps", dict(preset="toy", steps=8, scale=2.0, gamma=GAMMA_ONE_UNGUIDED_STEP)),
                                       ("metamer", dict(iters=30))])
def test_dps_and_metamer_retry_faulty_samples_at_a_smaller_step_and_leave_the_rest_alone(prior_fm, shape_resnet,
                                                                                         method, kw):
    ref, _ = fb.toy.references(1, seed=21)
    kw = dict(n=4, method=method, seed=3, progress=False, **kw)
    clean = sample_fiber(prior_fm, shape_resnet, ref, **kw)
    bad = Faulty(shape_resnet, nan_rows=[1], grad_rows=[2], transient_rows=[0], transient_calls=2)
    res = sample_fiber(prior_fm, bad, ref, **kw)
    knob = "scale" if method == "dps" else "lr"
    where = "denoising step 6 of 8 (unguided from there)" if method == "dps" else \
        "iteration 5 of 30 (frozen at its last finite image)"
    assert res.status[0] == f"recovered: non-finite loss 2 times; {knob} halved 2 times"
    assert res.status[1] == ("failed: the extractor gave non-finite features for the final image; non-finite loss "
                             f"5 times; {knob} halved 4 times, then guidance given up at {where}")
    # metamer used to skip non-finite gradients silently ("ok"): now they are counted and retried
    assert res.status[2] == (f"failed: non-finite gradient 5 times; {knob} halved 4 times, then guidance given up "
                             f"at {where}")
    assert res.status[3] == "ok"
    assert torch.equal(res.images[3], clean.images[3])
    assert float(res.feature_distance[3]) == float(clean.feature_distance[3])
    assert bool(torch.isfinite(res.images).all()) and math.isfinite(float(res.feature_distance[0]))
    if method == "metamer":  # the recovered metamer still matches (measured 8e-4 vs 3e-4 clean; noise: ~1)
        assert float(res.feature_distance[0]) < 0.01


def test_non_finite_state_falls_back_to_the_unguided_step_for_that_sample(prior_fm, shape_resnet, monkeypatch):
    """The prior blows up (NaN x0) for one sample in one step: that step is redone unguided for it alone."""
    ref, _ = fb.toy.references(1, seed=22)
    kw = dict(n=3, method="ndtm", preset="toy-fast", steps=4, seed=5, progress=False)
    clean = sample_fiber(prior_fm, shape_resnet, ref, **kw)
    real = type(prior_fm).denoise
    calls = {"n": 0}

    def flaky(self, x_t, t, clamp=True):
        x0, eps = real(self, x_t, t, clamp)
        if x_t.shape[0] == 3 and not torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:  # the controlled step of the 3rd denoising step
                x0, eps = x0.clone(), eps.clone()
                x0[2], eps[2] = float("nan"), float("nan")
        return x0, eps

    monkeypatch.setattr(type(prior_fm), "denoise", flaky)
    res = sample_fiber(prior_fm, shape_resnet, ref, **kw)
    assert res.status[:2] == ["ok", "ok"]
    assert res.status[2] == "recovered: non-finite state 1 time (that step redone unguided)"
    assert bool(torch.isfinite(res.images).all())
    assert torch.equal(res.images[:2], clean.images[:2])
    assert float(res.feature_distance[2]) < 1.0  # still a sensible sample (cosine loss lies in [0, 2])


# =========================================================================== memory

def test_simulated_oom_in_the_extractor_splits_and_other_errors_are_not_retried(prior_fm, shape_resnet, monkeypatch):
    ref, _ = fb.toy.references(1, seed=23)
    kw = dict(n=4, method="ndtm", preset="toy-fast", steps=3, seed=0, progress=False, batch_size=4)
    # what asking for batch_size=2 in the first place gives: the retry must reproduce it bit for bit (no sample
    # lost, repeated or drawn from generators the failed attempt had advanced). Equality with batch_size=4
    # is batch-size invariance of the sampler itself (test_sampling), which holds only to round-off.
    expected = sample_fiber(prior_fm, shape_resnet, ref, **{**kw, "batch_size": 2})
    seen = []

    class OOMAbove2(torch.nn.Module):
        spec = "test/oom"

        def forward(self, images):
            seen.append(images.shape[0])
            if images.shape[0] > 2 and torch.is_grad_enabled():
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (simulated)")
            return shape_resnet(images)

    got = sample_fiber(prior_fm, OOMAbove2(), ref, **kw)
    assert got.config["oom_splits"] == 1 and got.config["batch_size_used"] == 2
    assert torch.equal(got.images, expected.images) and torch.equal(got.feature_distance, expected.feature_distance)
    assert all(s == "ok" for s in got.status)
    assert seen[:2] == [1, 4] and set(seen[2:]) == {2}, seen  # reference, the failed batch, then halves

    class Broken(torch.nn.Module):
        spec = "test/broken"
        calls = 0

        def forward(self, images):
            if torch.is_grad_enabled():
                Broken.calls += 1
                raise RuntimeError("shape mismatch in my model")
            return shape_resnet(images)

    with pytest.raises(RuntimeError, match="shape mismatch"):
        sample_fiber(prior_fm, Broken(), ref, **kw)
    assert Broken.calls == 1  # raised at once, not retried at smaller batch sizes


def test_simulated_oom_in_the_particle_draw_splits_the_batch_and_reproduces_the_smaller_one(prior_fm, shape_resnet):
    """The toy preset with 6 particles per sample spawned at once: a batch of 4 runs 24 rows through the
    extractor. An OOM above 12 rows halves the batch once, and the result is that of batch_size=2 bit for bit."""
    ref, _ = fb.toy.references(1, seed=23)
    k = 6
    kw = dict(n=4, method="ndtm", preset="toy", steps=8, seed=0, progress=False, batch_size=4, particle_spawn="all",
              particles=k)
    expected = sample_fiber(prior_fm, shape_resnet, ref, **{**kw, "batch_size": 2})
    seen = []

    class OOMAbove2K(torch.nn.Module):
        spec = "test/oom-particles"

        def forward(self, images):
            seen.append(images.shape[0])
            if images.shape[0] > 2 * k and torch.is_grad_enabled():
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (simulated)")
            return shape_resnet(images)

    got = sample_fiber(prior_fm, OOMAbove2K(), ref, **kw)
    assert got.config["oom_splits"] == 1 and got.config["batch_size_used"] == 2
    assert torch.equal(got.images, expected.images) and got.status == ["ok"] * 4
    last = max(i for i, rows in enumerate(seen) if rows == 4 * k)  # the failed draw (no-grad passes precede it)
    assert seen[:2] == [1, 4 * k] and max(seen[last + 1:]) == 2 * k, seen  # then halves: 2 samples x 6 particles


def test_simulated_oom_in_the_final_decode_and_feature_pass_splits_and_keeps_every_sample(prior_fm, shape_resnet,
                                                                                         monkeypatch):
    """After sampling, the decode and the final features run under no_grad in chunks; an OOM there halves the
    chunk (down to 1) instead of throwing away the finished samples. So do the reference features."""
    ref, _ = fb.toy.references(1, seed=23)
    kw = dict(n=4, method="ndtm", preset="toy-fast", steps=3, seed=0, progress=False, batch_size=4)
    plain = sample_fiber(prior_fm, shape_resnet, ref, **kw)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (simulated)")
    seen = []

    class OOMWithoutGrad(torch.nn.Module):  # sampling (with autograd) fits; the no-grad passes do not
        spec = "test/oom-final"

        def forward(self, images):
            if not torch.is_grad_enabled():
                seen.append(images.shape[0])
                if images.shape[0] > 1:
                    raise oom
            return shape_resnet(images)

    got = sample_fiber(prior_fm, OOMWithoutGrad(), ref, **kw)
    assert seen == [1, 4, 2, 1, 1, 1, 1], seen  # the reference, then the final pass: 4 -> 2 -> 1, one by one
    assert got.config["oom_splits"] == 2 and got.config["batch_size_used"] == 4
    assert got.config["final_batch_size_used"] == 1
    assert torch.equal(got.images, plain.images) and got.status == ["ok"] * 4
    with torch.no_grad():
        one_by_one = torch.cat([shape_resnet(got.images[i:i + 1]) for i in range(4)])
    assert torch.equal(got.features, one_by_one)
    assert float((got.feature_distance - plain.feature_distance).abs().max()) < 1e-6
    # an OOM in the final decode: split there, and the features run at the split size
    real_decode = type(prior_fm).decode

    def decode(self, x0):
        if not torch.is_grad_enabled() and x0.shape[0] > 2:
            raise oom
        return real_decode(self, x0)

    monkeypatch.setattr(type(prior_fm), "decode", decode)
    dec = sample_fiber(prior_fm, shape_resnet, ref, **kw)
    assert dec.config["oom_splits"] == 1 and dec.config["final_batch_size_used"] == 2
    assert torch.equal(dec.images, plain.images)
    assert float((dec.feature_distance - plain.feature_distance).abs().max()) < 1e-6
    monkeypatch.setattr(type(prior_fm), "decode", real_decode)
    # a batch of references too big for one pass: their features are split the same way
    refs, _ = fb.toy.references(2, seed=28)
    seen.clear()
    two = sample_fiber(prior_fm, OOMWithoutGrad(), refs, **{**kw, "n": 1, "steps": 2, "batch_size": 2})
    assert seen[:3] == [2, 1, 1] and two.status == ["ok", "ok"]
    with torch.no_grad():
        assert torch.equal(two.reference_features, torch.cat([shape_resnet(refs[i:i + 1]) for i in range(2)]))
    # any other error in the final pass is raised at once, not retried
    class Broken(torch.nn.Module):
        spec = "test/broken-final"

        def forward(self, images):
            if not torch.is_grad_enabled() and images.shape[0] > 1:
                raise RuntimeError("shape mismatch in my model")
            return shape_resnet(images)

    with pytest.raises(RuntimeError, match="shape mismatch"):
        sample_fiber(prior_fm, Broken(), ref, **kw)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def test_memory_stays_flat_over_ten_repeated_calls(prior_fm, shape_resnet):
    ref, _ = fb.toy.references(1, seed=24)
    kw = dict(n=2, method="ndtm", preset="toy", steps=2, seed=0, progress=False)  # default preset: particles too
    tensors, rss = {}, []
    for i in range(10):
        res = sample_fiber(prior_fm, shape_resnet, ref, **kw)
        assert res.images.grad_fn is None and not res.images.requires_grad
        del res
        gc.collect()
        rss.append(_rss_mb())
        if i in (2, 5, 9):  # scanning every object is slow: count live tensors after calls 3, 6 and 10
            tensors[i] = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
    assert len(set(tensors.values())) == 1, tensors  # not one tensor more after the warm-up calls
    assert rss[-1] - rss[2] < 25, rss  # MB; a leaked graph per call would add its activations every time


# =========================================================================== interrupted work

def _no_partial_files(root: Path) -> None:
    assert list((root / ".tmp").iterdir()) == [], "a half-written run was left in .tmp"
    assert list((root / ".corrupt").iterdir()) == []
    for d in (root / "runs").iterdir():
        assert sorted(p.name for p in d.iterdir()) == ["meta.json", "samples.parquet", "tensors.safetensors"]


def test_ctrl_c_in_a_notebook_call_keeps_finished_runs_and_writes_nothing_partial(prior_fm, shape_resnet, tmp_path,
                                                                                  monkeypatch):
    from fiberbench.store import Store, cached_sample_fiber

    store = Store(tmp_path / "store")
    refs, _ = fb.toy.references(2, seed=25)
    kw = dict(n=2, steps=3, preset="toy", progress=False)
    first = cached_sample_fiber(store, prior_fm, shape_resnet, refs[0], **kw)
    key = first.config["store_key"]

    def ctrl_c(info):
        if info["i"] == 1:
            raise KeyboardInterrupt  # what Jupyter's interrupt raises in the running cell

    with pytest.raises(KeyboardInterrupt):
        cached_sample_fiber(store, prior_fm, shape_resnet, refs[1], callback=ctrl_c, **kw)
    # interrupted while writing the second of the run's files: the temp dir is removed, nothing is committed
    from fiberbench.runs import store as S

    orig, calls = S._fsync_write, {"n": 0}

    def write_then_ctrl_c(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        orig(path, data)

    monkeypatch.setattr(S, "_fsync_write", write_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        cached_sample_fiber(store, prior_fm, shape_resnet, refs[1], **kw)
    monkeypatch.setattr(S, "_fsync_write", orig)
    assert calls["n"] == 2
    again = Store(tmp_path / "store")
    assert again.keys() == [key] and again.has(key)
    assert torch.equal(again.get(key).images, first.images)
    _no_partial_files(again.root)
    # and the interrupted fiber is simply computed next time
    second = cached_sample_fiber(again, prior_fm, shape_resnet, refs[1], **kw)
    assert second.config["from_store"] is False and len(again.keys()) == 2


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A private copy of the toy models (stable weights while the shipped ones may still be retrained)."""
    from fiberbench.toy import cards as M

    dst = tmp_path_factory.mktemp("models")
    for name in ("prior-fm", "shape-resnet"):
        for p in M.models_dir().glob(f"{name}.*"):
            shutil.copy2(p, dst / p.name)
    return dst


def test_sigint_during_a_sweep_keeps_every_finished_fiber_and_no_partial_files(models_dir, tmp_path, monkeypatch):
    import yaml

    from fiberbench.store import Store
    from fiberbench.sweep import expand, run_sweep

    cfg = {"name": "sigint", "extractors": ["toy/shape-resnet@logits"], "priors": ["toy/prior-fm"],
           "methods": ["ndtm"], "n": 2, "steps": 3, "preset": "toy", "seeds": [0], "threads": 1,
           "references": [{"toy": {"n": 6, "seed": 41}}]}
    path = tmp_path / "sigint.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    env = dict(os.environ, FIBERBENCH_MODELS=str(models_dir), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fiberbench.cli", "sweep", str(path), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = out / "runs"
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 240 and not (runs.exists() and len(list(runs.iterdir())) >= 1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # Ctrl-C in the terminal
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and b"KeyboardInterrupt" in err, err.decode()[-1500:]
    store = Store(out)
    kept = store.keys()
    assert 1 <= len(kept) < 6, kept
    assert all(store.has(k) for k in kept)
    _no_partial_files(store.root)
    # resuming computes exactly the missing fibers
    monkeypatch.setenv("FIBERBENCH_MODELS", str(models_dir))
    summary = run_sweep(path, out, progress=False)
    assert (summary.cached, summary.done, summary.failed) == (len(kept), 6 - len(kept), [])
    assert sorted(Store(out).keys()) == sorted(j.key for j in expand(path)[1])


# =========================================================================== untrusted files

class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_malicious_pickles_are_refused_with_an_explanation_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"weight": torch.ones(2, 2), "evil": _Evil(str(marker))}
    files = {"zip.pt": lambda p: torch.save(payload, p),
             "legacy.pt": lambda p: torch.save(payload, p, _use_new_zipfile_serialization=False),
             "plain.pkl": lambda p: p.write_bytes(pickle.dumps(payload))}
    for fname, write in files.items():
        p = tmp_path / fname
        write(p)
        assert "pathlib.Path" in " ".join(pickle_globals(p)) or "pathlib.Path.touch" in pickle_globals(p)
        with pytest.raises(InputError) as e:
            load_state_dict(p)
        msg = str(e.value)
        assert msg.startswith(f"refused to load {p}") and "pathlib.Path" in msg, msg
        assert "execute arbitrary code" in msg and "Nothing from the file was run" in msg
        assert not marker.exists(), fname
    # the same file really would have run code (positive control, in this test's own process)
    torch.load(tmp_path / "zip.pt", weights_only=False)
    assert marker.exists()
    # plain weights load; wrapped ones are unwrapped; other content is refused with a reason
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "epoch": 7}, tmp_path / "ok.pt")
    assert torch.equal(load_state_dict(tmp_path / "ok.pt")["w"], torch.arange(3.0))
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "named.bin")  # safetensors under another name
    assert torch.equal(load_state_dict(tmp_path / "named.bin")["w"], torch.ones(2))
    torch.save({"w": torch.ones(1), "epoch": 3}, tmp_path / "mixed.pt")
    with pytest.raises(InputError, match=r"entries \['epoch'\] are not tensors"):
        load_state_dict(tmp_path / "mixed.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:80])
    with pytest.raises(InputError, match="corrupt/truncated"):
        load_state_dict(tmp_path / "trunc.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InputError, match="not a valid safetensors file"):
        load_state_dict(tmp_path / "bad.safetensors")


def test_malicious_checkpoint_through_a_torch_extractor_spec(tmp_path):
    """The user-facing path: ``torch/<module:callable>`` with ``checkpoint=`` refuses the pickle too."""
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.ones(2, 3), "bias": torch.zeros(2), "x": _Evil(str(marker))}, tmp_path / "ck.pt")
    with pytest.raises(InputError, match="refused to load"):
        fb.load_extractor("torch/torch.nn:Linear", model_kwargs={"in_features": 3, "out_features": 2},
                          checkpoint=str(tmp_path / "ck.pt"))
    assert not marker.exists()


def test_no_trust_remote_code_by_default(tmp_path):
    import inspect

    from fiberbench.models.sources.diffusers import load_diffusers_prior
    from fiberbench.models.sources.hf import load_hf_extractor

    for fn in (load_hf_extractor, load_diffusers_prior):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    # a diffusers folder whose pipeline is custom code: refused, the code never runs
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    marker = tmp_path / "ran"
    (pipe / "pipeline.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                      "from diffusers import DiffusionPipeline\n"
                                      "class MyPipeline(DiffusionPipeline):\n    pass\n")
    (pipe / "model_index.json").write_text(
        '{"_class_name": ["pipeline", "MyPipeline"], "_diffusers_version": "0.30.0"}')
    with pytest.raises(ConfigError, match="trust_remote_code=True"):
        fb.load_prior(f"diffusers/{pipe}")
    assert not marker.exists()
    # a transformers folder whose config is custom code: likewise
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "configuration_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    (hf / "config.json").write_text(
        '{"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}')
    with pytest.raises(ConfigError, match="trust_remote_code=True"):
        fb.load_extractor(f"hf/{hf}")
    assert not marker.exists()
    # positive control: with trust_remote_code=True diffusers does import it
    with pytest.raises(ConfigError):
        fb.load_prior(f"diffusers/{pipe}", trust_remote_code=True)
    assert marker.exists()


def test_html_report_escapes_user_strings(prior_fm, shape_resnet, tmp_path, monkeypatch):
    """The demo report with a hostile caption and spec: every user string is escaped in index.html."""
    from fiberbench import toy
    from fiberbench.ui import demo

    script, img = "<script>alert(1)</script>", '<img src=x onerror="alert(2)">'
    monkeypatch.setattr(demo, "DEMO_EXTRACTORS", [f"toy/{script}@logits"])
    monkeypatch.setattr(demo, "load_extractor", lambda spec, **k: shape_resnet)
    monkeypatch.setattr(demo, "load_prior", lambda spec, **k: prior_fm)
    monkeypatch.setattr(toy, "caption", lambda df: [img] * len(df))
    page = demo.run_demo(tmp_path / "demo", n=1, references=1, steps=2, progress=False).read_text()
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in page
    # every file it wrote stays inside its folder
    root = (tmp_path / "demo").resolve()
    assert all(p.resolve().is_relative_to(root) for p in root.rglob("*"))


def test_store_never_writes_outside_its_folder(prior_fm, shape_resnet, tmp_path):
    from fiberbench.store import Store, check_name

    store = Store(tmp_path / "s")
    ref, _ = fb.toy.references(1, seed=26)
    res = sample_fiber(prior_fm, shape_resnet, ref, n=1, steps=2, preset="toy", progress=False,
                       reference_ids=["../../../escaped"])
    before = set(tmp_path.rglob("*"))
    key = store.put(res, key="0" * 32, extra={"note": "../../x"})
    after = set(tmp_path.rglob("*")) - before
    assert after and all(p.resolve().is_relative_to(store.root.resolve()) for p in after)
    assert store.get(key).reference_ids == ["../../../escaped"]  # kept as data, never used as a path
    for bad in ("../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(ConfigError):
            store.get(bad)
        with pytest.raises(ConfigError):
            check_name(bad, "sweep name")


# =========================================================================== bounds everywhere (issue 26)

def _sweep_cfg(**kw) -> dict:
    cfg = {"name": "b", "extractors": ["toy/shape-resnet@logits"], "priors": ["toy/prior-fm"], "methods": ["ndtm"],
           "n": 1, "steps": 2, "preset": "toy", "seeds": [0], "threads": 1,
           "references": [{"toy": {"n": 1, "seed": 3}}]}
    cfg.update(kw)
    return cfg


def test_sweep_specs_layers_modules_and_hub_names_are_checked_before_the_first_job(monkeypatch):
    from fiberbench.store import run_config
    from fiberbench.sweep import expand

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = {"toy/shape-resnet@layer99": r"layer 'layer99' not found in toy/shape-resnet.*did you mean.*layer4",
             "timm/resnet5O": r"unknown timm model 'resnet5O'.*resnet50",
             "timm/resnet18@layer99": r"layer 'layer99' not found in timm/resnet18",  # built on the meta device
             "torch/nomod:f": r"torch/nomod:f: cannot import module 'nomod'",
             "torch/torch.nn:Linaer": r"has no attribute 'Linaer'; did you mean \['Linear'",
             "hf/nonexistent/x": r"'hf/nonexistent/x'.*not downloaded.*HF_HUB_OFFLINE",
             "hf/a/b/c": r"neither a folder nor a hub repo id",
             f"hf/{Path(tempfile.gettempdir()) / 'no-such-folder-fb'}": r"no folder"}
    for spec, pat in cases.items():
        with pytest.raises(ConfigError, match=pat):
            expand(_sweep_cfg(extractors=[spec]), checksums=False)
    # every problem in one message, with the good specs' jobs never built
    with pytest.raises(ConfigError) as e:
        expand(_sweep_cfg(extractors=list(cases)), checksums=False)
    assert str(e.value).startswith(f"sweep config has {len(cases)} problem(s)")
    # valid module layers and other sources' priors pass (guided-diffusion priors were refused by sweeps before)
    _, jobs = expand(_sweep_cfg(extractors=["toy/shape-resnet@layer4", "toy/clip@embed"]), checksums=False)
    assert [j.extractor for j in jobs] == ["toy/shape-resnet@layer4", "toy/clip@embed"]
    # the same checks reach sample_fiber (before the prior loads) and the store
    _no_loading(monkeypatch)
    for spec, pat in list(cases.items())[:5]:
        with pytest.raises(ConfigError, match=pat):
            sample_fiber("toy/prior-fm", spec, torch.rand(3, 32, 32), progress=False)
        with pytest.raises(ConfigError, match=pat):
            run_config("toy/prior-fm", spec, torch.rand(3, 32, 32), n=1)


def test_the_same_limits_apply_at_every_entry_point(monkeypatch, tmp_path):
    from fiberbench.checks import MAX_IMAGE_SIDE, MAX_N, MAX_REFERENCES, MAX_STEPS
    from fiberbench.store import run_config

    _no_loading(monkeypatch)
    ref = torch.rand(3, 32, 32)
    for kw, pat in [(dict(n=10 ** 9), rf"n must be a positive integer \(at most {MAX_N}\)"),
                    (dict(n=MAX_N + 1), rf"at most {MAX_N}"),
                    (dict(steps=10 ** 7), rf"steps must be a positive integer \(at most {MAX_STEPS}\)")]:
        with pytest.raises(ConfigError, match=pat):
            sample_fiber("toy/prior-fm", "toy/shape-resnet@logits", ref, progress=False, **kw)
        with pytest.raises(ConfigError, match=pat):
            run_config("toy/prior-fm", "toy/shape-resnet@logits", ref, **kw)
    with pytest.raises(InputError, match=rf"{MAX_REFERENCES + 1} images in one batch; at most {MAX_REFERENCES}"):
        sample_fiber("toy/prior-fm", "toy/shape-resnet@logits", torch.rand(MAX_REFERENCES + 1, 3, 2, 2),
                     progress=False)
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    for size in (100000, MAX_IMAGE_SIDE + 1):  # 100000 used to allocate 120 GB
        with pytest.raises(ConfigError, match=rf"size must be a positive integer \(at most {MAX_IMAGE_SIDE}\)"):
            load_image(tmp_path / "small.png", size=size)
        from fiberbench.io import load_image_bytes

        with pytest.raises(ConfigError, match="at most"):
            load_image_bytes((tmp_path / "small.png").read_bytes(), "small.png", size=size)
    assert load_image(tmp_path / "small.png", size=MAX_IMAGE_SIDE // 64).shape == (3, 64, 64)


_ALIAS_LEVELS = "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefg", "bcdefgh"))
ALIAS_BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + _ALIAS_LEVELS


def test_yaml_alias_bombs_are_refused_before_they_are_expanded(tmp_path):
    from fiberbench.sweep import expand

    # 8 levels of 9 aliases: 43 million strings once expanded; as the sweep name (an error message shows it) it
    # used to build a 300 MB message in ~20 s, one level more ran out of memory
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB + "name: *h\nextractors: [toy/shape-resnet@logits]\npriors: [toy/prior-fm]\n"
                    "references: [{toy: {n: 1}}]\n")
    assert len(path.read_bytes()) < 500
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"more than 100000 values with its aliases expanded") as e:
        expand(path)
    assert time.perf_counter() - t0 < 2 and len(str(e.value)) < 1000
    # a document that refers to itself, absurd nesting, a huge file, a shared Python structure
    for text, pat in [("name: &x [*x]\n", "contains itself"), ("name: " + "[" * 40 + "]" * 40 + "\n", "nested"),
                      ("name: x\n" + "#" * (1 << 20), "larger than")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=pat):
            expand(path)
    x = ["lol"] * 9
    for _ in range(8):
        x = [x] * 9
    with pytest.raises(ConfigError, match="aliases expanded"):
        expand({**_sweep_cfg(), "name": x})
    # untrusted values are cut before formatting: a 100 kB name gives a short message
    with pytest.raises(ConfigError) as e:
        expand(_sweep_cfg(name="n" * 100_000), checksums=False)
    assert len(str(e.value)) < 1000


def test_load_image_refuses_a_named_pipe_instead_of_blocking(tmp_path):
    import threading

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = {}

    def read():
        try:
            load_image(fifo)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            outcome["error"] = e

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader before failing (opening for writing releases the open)
        with open(fifo, "wb"):
            pass
        t.join(10)
        pytest.fail("load_image blocked on a named pipe")
    assert isinstance(outcome.get("error"), InputError), outcome
    assert "pipe.png is not a regular file" in str(outcome["error"])
    with pytest.raises(InputError, match="not a regular file"):
        load_state_dict(fifo)


def test_ambiguous_array_layouts_are_refused_naming_both_readings(tmp_path):
    Image.new("RGB", (500, 1), (10, 20, 30)).save(tmp_path / "thin_1x500.png")
    thin = np.asarray(Image.open(tmp_path / "thin_1x500.png"))  # (1, 500, 3): read as [C,H,W] before
    for arr, readings in [(thin, ["1x500 pixels with 3 channel(s)", "500x3 pixels with 1 channel(s)"]),
                          (np.zeros((3, 40, 3), np.uint8), ["3x40 pixels with 3", "40x3 pixels with 3"])]:
        with pytest.raises(InputError) as e:
            as_image_batch(arr)
        msg = str(e.value)
        assert all(r in msg for r in readings) and "np.moveaxis(x, -1, -3)" in msg and "torch.from_numpy" in msg
    # stating which is meant works, as do PIL images and paths
    assert as_image_batch(np.moveaxis(thin, -1, -3)).shape == (1, 3, 1, 500)
    assert as_image_batch(torch.from_numpy(thin.copy())).shape == (1, 3, 500, 3)
    assert as_image_batch(Image.open(tmp_path / "thin_1x500.png")).shape == (1, 3, 1, 500)
    assert as_image_batch(str(tmp_path / "thin_1x500.png")).shape == (1, 3, 1, 500)
    # [4,H,W] / [2,H,W] tensors: one RGBA / gray+alpha image, or a batch of grayscale images?
    for c in (4, 2):
        x = torch.rand(c, 8, 8)
        with pytest.raises(InputError, match=rf"one 8x8 image with {c} channels .* or {c} grayscale images.*"
                                             r"x\[None\].*x\[:, None\]"):
            as_image_batch(x)
        assert as_image_batch(x[None]).shape == (1, 3, 8, 8)
        assert torch.equal(as_image_batch(x[:, None]), x[:, None].expand(-1, 3, -1, -1))
    # unambiguous inputs keep working exactly as before
    rgb = torch.rand(3, 8, 8)
    assert torch.equal(as_image_batch(rgb), rgb[None])
    assert torch.equal(as_image_batch(rgb[:1]), rgb[:1].expand(3, -1, -1)[None])
    u8 = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert torch.equal((as_image_batch(u8)[0] * 255).round().byte(), torch.from_numpy(u8).permute(2, 0, 1))
    assert as_image_batch(np.zeros((4, 4, 3), np.uint8)).shape == (1, 3, 4, 4)  # 4 is never a numpy channel axis
    assert as_image_batch(np.zeros((2, 8, 8, 3), np.float32)).shape == (2, 3, 8, 8)
    assert as_image_batch(np.zeros((1, 1, 1))).shape == (1, 3, 1, 1)  # one gray pixel either way
    assert as_image_batch(torch.rand(2, 4, 8, 8)).shape == (2, 3, 8, 8)  # RGBA batches are [B,4,H,W]


class _OneRow(torch.nn.Module):
    """Features of the first image only, whatever the batch: broadcast against every sample before."""

    spec = "test/one-row"

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, images):
        return self.base(images)[:1]


class _Argmax(torch.nn.Module):
    spec = "test/argmax"

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, images):
        return self.base(images).argmax(-1, keepdim=True)


def test_features_must_have_one_row_per_image(prior_fm, shape_resnet):
    kw = dict(n=3, steps=2, preset="toy-fast", progress=False)
    ref = torch.rand(3, 32, 32)
    with pytest.raises(ConfigError, match=r"test/one-row returned features of shape \(1, \d+\) for 3 images"):
        sample_fiber(prior_fm, _OneRow(shape_resnet), ref, **kw)
    with pytest.raises(ConfigError, match=r"test/one-row returned features of shape \(1, \d+\) for 2 images"):
        sample_fiber(prior_fm, _OneRow(shape_resnet), torch.rand(2, 3, 32, 32), **kw)  # the references already
    with pytest.raises(ConfigError, match=r"test/one-row returned features of shape \(1, \d+\) for 3 images"):
        sample_fiber(prior_fm, _OneRow(shape_resnet), ref, **kw, method="unguided")  # the final feature pass
    with pytest.raises(ConfigError, match=r"test/argmax returned integer features \(torch.int64\)"):
        sample_fiber(prior_fm, _Argmax(shape_resnet), ref, **kw)


def _stored_run(prior_fm, shape_resnet, tmp_path):
    from fiberbench.store import Store

    res = sample_fiber(prior_fm, shape_resnet, torch.rand(3, 32, 32), n=1, steps=2, preset="toy", progress=False)
    store = Store(tmp_path / "store")
    return store, store.put(res)


def test_store_verifies_meta_json_and_every_file_whatever_its_timestamps(prior_fm, shape_resnet, tmp_path):
    import json

    from fiberbench.store import Store

    store, key = _stored_run(prior_fm, shape_resnet, tmp_path)
    d = store.run_dir(key)
    meta = json.loads((d / "meta.json").read_text())
    meta["status"], meta["result_config"]["seed"] = ["failed: edited"], 99  # still valid JSON
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="meta.json does not match its own recorded sha256"):
        assert Store(store.root).get(key) is None
    assert store.corrupt() and not store.run_dir(key).exists()
    # a byte flip that keeps the size and the mtime: the verification cache also keys on the ctime
    store, key = _stored_run(prior_fm, shape_resnet, tmp_path / "again")
    assert store.has(key)
    p = store.run_dir(key) / "tensors.safetensors"
    st_ = p.stat()
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert p.stat().st_size == st_.st_size and p.stat().st_mtime_ns == st_.st_mtime_ns
    with pytest.warns(UserWarning, match="tensors.safetensors does not match its recorded sha256"):
        assert not store.has(key)


def test_negative_max_jobs_is_refused_and_the_summary_names_the_jobs_not_run(models_dir, tmp_path, monkeypatch):
    import yaml

    from fiberbench.sweep import run_sweep

    monkeypatch.setenv("FIBERBENCH_MODELS", str(models_dir))
    cfg = _sweep_cfg(references=[{"toy": {"n": 2, "seed": 3}}])
    with pytest.raises(ConfigError, match="max_jobs must be a non-negative integer, got -1"):
        run_sweep(cfg, tmp_path / "out", progress=False, max_jobs=-1)
    s = run_sweep(cfg, tmp_path / "out", progress=False, max_jobs=1)
    assert (s.done, s.cached, s.not_run) == (1, 0, 1) and "1 done, 0 cached, 0 failed" in str(s)
    assert "1 not run" in str(s) and s.to_dict()["not_run"] == 1
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, FIBERBENCH_MODELS=str(models_dir), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fiberbench.cli", "sweep", str(path), "--out", str(tmp_path / "out"),
                        "--max-jobs", "-1"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "max_jobs must be a non-negative integer" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_unclear_errors_of_sample_fiber_and_as_image_batch_are_clear_now(monkeypatch):
    _no_loading(monkeypatch)
    ok = dict(prior="toy/prior-fm", extractor="toy/shape-resnet@logits", reference=torch.rand(3, 32, 32), n=1,
              steps=2, progress=False)
    for kw, pat in [(dict(prior=None), r"prior must be a spec string .* or a loaded Prior .*got None"),
                    (dict(extractor=123), r"extractor must be a spec string .* or a callable .*, got 123$"),
                    (dict(callback=5), r"callback must be callable .*, got 5$"),
                    (dict(init=("sdedit", "abc")), r"init must be 'noise' or \('sdedit', tau_star\) .*'abc'"),
                    (dict(init=("sdedit", float("nan"))), r"init must be"),
                    (dict(extractor="timm/resnet5O"), r"unknown timm model 'resnet5O'")]:  # before the prior loads
        with pytest.raises(ConfigError, match=pat):
            sample_fiber(**{**ok, **kw})
    with pytest.raises(AssertionError, match="a model was loaded"):  # numpy integers pass validation
        sample_fiber(**{**ok, "n": np.int64(1), "steps": np.int32(2), "seed": np.uint8(3)})
    for x, pat in [(torch.rand(3, 8, 8, device="meta"), "meta device has no values"),
                   (torch.rand(3, 8, 8).to_sparse(), r"sparse_coo tensor is not an image.*to_dense"),
                   (torch.quantize_per_tensor(torch.rand(3, 8, 8), 0.1, 0, torch.quint8), "dequantize")]:
        with pytest.raises(InputError, match=pat):
            as_image_batch(x)


def test_sweep_benchmark_arguments_give_an_error_line_not_a_traceback():
    r = subprocess.run([sys.executable, "-m", "fiberbench.sweep", "bench", "--jobs", "0"], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "jobs must be a positive integer" in r.stderr


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims ``w`` x ``h`` pixels (and holds almost none): what a decompression bomb looks like."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"x")) + chunk(b"IEND", b""))


def test_gallery_upload_goes_through_the_image_checks_and_names_the_file(tmp_path):
    import io
    from datetime import datetime

    from fiberbench.widgets import FiberGallery, ModelPicker

    g = FiberGallery(ModelPicker(extractor="toy/shape-resnet@logits", prior="toy/prior-fm"), store=tmp_path / "s",
                     n=1, steps=2)
    good = io.BytesIO()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(good, format="PNG")
    uploads = {"cut.png": good.getvalue()[:60], "empty.png": b"", "notes.png": b"hello, this is text",
               "bomb.png": _png_header_only(20000, 20000)}  # 400 megapixels
    for name, data in uploads.items():
        g.errors.clear()
        g.upload.value = ({"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
                           "last_modified": datetime.now()},)
        assert len(g.errors) == 1 and g.errors[0].startswith("InputError: ") and name in g.errors[0], g.errors
        assert "Traceback" not in g.out.outputs[-1]["data"]["text/html"]  # the message alone, no PIL traceback
    g.errors.clear()
    data = good.getvalue()
    g.upload.value = ({"name": "red.png", "type": "image/png", "size": len(data), "content": memoryview(data),
                       "last_modified": datetime.now()},)
    assert g.errors == [] and g._uploaded.shape == (3, 30, 40) and float(g._uploaded[0].min()) == 1.0


SHARE_MODELS_CFG = dict(references=[{"toy": {"n": 6, "seed": 3}}], steps=3, n=2)


def test_two_sweeps_into_one_store_compute_every_job_once(models_dir, tmp_path):
    import re

    import yaml

    path = tmp_path / "share.yaml"
    path.write_text(yaml.safe_dump(_sweep_cfg(**SHARE_MODELS_CFG)))
    env = dict(os.environ, FIBERBENCH_MODELS=str(models_dir), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fiberbench.cli", "sweep", str(path), "--out", str(tmp_path / "shared")]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    counts = []
    for (out, err), p in zip(outs, procs):
        assert p.returncode == 0, err[-2000:]
        m = re.search(r"6 jobs — (\d+) done, (\d+) cached, (\d+) failed, (\d+) done by another process, "
                      r"(\d+) not run", out)
        assert m, out
        counts.append([int(v) for v in m.groups()])
    done = [c[0] for c in counts]
    assert sum(done) == 6, outs  # 12 computations for 6 runs before
    for d, cached, failed, elsewhere, not_run in counts:
        assert d + cached + elsewhere == 6 and failed == not_run == 0
    from fiberbench.store import Store

    store = Store(tmp_path / "shared")
    assert len(store.keys()) == 6 and all(store.has(k) for k in store.keys())
    assert list((store.root / ".claims").iterdir()) == []  # every claim released


def _claim_in_child(root: str, key: str, q) -> None:
    from fiberbench.store import Store

    c = Store(root).claim(key)
    q.put(c is not None)
    time.sleep(1.0)  # hold it while the others try
    if c is not None:
        c.release()


def test_job_claims_are_exclusive_and_a_dead_owners_claim_is_taken_over(models_dir, tmp_path, monkeypatch):
    import json
    import multiprocessing as mp
    import socket

    from fiberbench.store import Store
    from fiberbench.sweep import expand, run_job, run_sweep

    store = Store(tmp_path / "s")
    key = "a" * 32
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_child, args=(str(store.root), key, q)) for _ in range(6)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert sorted(got) == [False] * 5 + [True]  # exactly one process holds the claim
    assert store.claim_owner(key) is None  # and it released it
    # a claim whose owner died on this host (pid gone) is taken over; a live owner's is not
    monkeypatch.setenv("FIBERBENCH_MODELS", str(models_dir))
    cfg = _sweep_cfg(references=[{"toy": {"n": 2, "seed": 5}}])
    _, jobs = expand(cfg)
    dead = ctx.Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    lock = store.root / ".claims" / f"{jobs[0].key}.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "token": "x", "started": 0}))
    live = store.root / ".claims" / f"{jobs[1].key}.lock"
    live.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "token": "y", "started": 0}))
    assert run_job(jobs[1], str(store.root), wait=False)["status"] == "busy"
    live.unlink()
    s = run_sweep(cfg, store.root, progress=False)
    assert (s.done, s.cached, s.elsewhere, s.failed) == (2, 0, 0, []) and not lock.exists()
