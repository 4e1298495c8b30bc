"""Fuzzing with a time and a memory bound (issue 26): ``as_image_batch`` over array shapes, dtypes, devices and
layouts, and ``sweep.expand`` over YAML documents with aliases and huge scalars.

Every example must give a valid result or one ``InputError`` / ``ConfigError``, within ``SECONDS`` of wall time and
``MEGABYTES`` of resident memory above where it started (sampled every few milliseconds while it runs). CI runs a
few hundred examples; ``FIBERBENCH_FUZZ_EXAMPLES=5000`` runs the long version with the same bounds.
"""
from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from fiberbench.errors import ConfigError, InputError
from fiberbench.io import as_image_batch
from fiberbench.sweep import TOP_KEYS, expand

LONG = int(os.environ.get("FIBERBENCH_FUZZ_EXAMPLES", "0"))
HYP = dict(deadline=None, derandomize=not LONG, database=None,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
SECONDS = 5.0  # per example (a normal one takes milliseconds)
MEGABYTES = 512  # resident memory above the level at the start of an example


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@contextmanager
def bounded(what: str) -> Iterator[None]:
    """Fail if the body runs longer than ``SECONDS`` (interrupted by SIGALRM) or its resident memory peaks more than
    ``MEGABYTES`` above the start (a thread samples it every 2 ms)."""
    start, peak, stop = _rss_mb(), [0.0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], _rss_mb())

    def alarm(signum, frame):
        raise TimeoutError(f"{what}: no answer within {SECONDS} s")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        stop.set()
        watcher.join()
    grew = max(peak[0], _rss_mb()) - start
    assert grew < MEGABYTES, f"{what}: resident memory grew by {grew:.0f} MB"
    assert time.perf_counter() - t0 < SECONDS


# --------------------------------------------------------------------------- as_image_batch

NP_DTYPES = [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32,
             np.float64, np.longdouble, np.complex64, np.bool_, ">f4", ">u2", "<U3", "O", "M8[s]"]
TORCH_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
                torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.bool,
                torch.float8_e4m3fn, torch.float8_e5m2]
IMAGE_SHAPES = st.sampled_from([(3, 8, 8), (1, 8, 8), (2, 8, 8), (4, 8, 8), (8, 8, 3), (8, 8, 4), (1, 9, 3), (3, 9, 3),
                                (3, 9, 1), (1, 1, 1), (2, 3, 5, 5), (2, 5, 5, 3), (1, 4, 4, 4), (5, 5), (1, 1)])


TENSOR_SOURCES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_]


@st.composite
def numpy_images(draw, dtypes: list = NP_DTYPES) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    shape = draw(IMAGE_SHAPES | hnp.array_shapes(min_dims=0, max_dims=6, min_side=0, max_side=6))
    if dtype.kind in "UOM":
        return np.zeros(shape, dtype)
    if dtype.kind == "f" and draw(st.booleans()):
        arr = draw(hnp.arrays(dtype, shape, elements=st.floats(0, 1, width=16)))  # mostly valid images
    else:
        arr = draw(hnp.arrays(dtype, shape))
    if arr.ndim >= 2 and draw(st.booleans()):
        arr = arr[::-1] if draw(st.booleans()) else np.swapaxes(arr, -1, -2)  # negative strides, transposed
    return arr


@st.composite
def torch_images(draw) -> torch.Tensor:
    t = torch.from_numpy(draw(numpy_images(TENSOR_SOURCES)).copy()).to(draw(st.sampled_from(TORCH_DTYPES)))
    kind = draw(st.sampled_from(["plain", "plain", "meta", "sparse", "csr", "quantized", "grad", "expanded"]))
    side = draw(st.sampled_from([1, 2, 10 ** 3, 10 ** 5]))
    make = {"meta": lambda: t.to("meta"), "sparse": t.to_sparse, "csr": t.to_sparse_csr,
            "quantized": lambda: torch.quantize_per_tensor(t.float(), 0.1, 0, torch.quint8),
            "grad": lambda: t.float().requires_grad_(),
            # a view far bigger than its memory
            "expanded": lambda: torch.zeros(1, dtype=t.dtype).expand(draw(st.integers(1, 3)), 3, side, side)}
    try:
        return make[kind]() if kind in make else t
    except Exception:  # noqa: BLE001 - not every dtype and shape has every layout: keep the plain tensor
        return t


@st.composite
def image_inputs(draw) -> Any:
    kind = draw(st.sampled_from(["numpy", "torch", "torch", "list", "pil", "path", "broadcast", "other"]))
    if kind == "numpy":
        return draw(numpy_images())
    if kind == "torch":
        return draw(torch_images())
    if kind == "list":
        items = draw(st.lists(numpy_images() | torch_images(), max_size=3))
        return [items] if draw(st.booleans()) and items else items
    if kind == "pil":
        mode = draw(st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "I", "F", "CMYK"]))
        return Image.new(mode, (draw(st.integers(1, 6)), draw(st.integers(1, 6))))
    if kind == "path":
        return draw(st.sampled_from(["/nonexistent/x.png", "/", "/dev/null", tempfile.gettempdir()]))
    if kind == "broadcast":  # numpy's kind of huge view
        side = draw(st.sampled_from([1, 10 ** 3, 10 ** 5]))
        return np.broadcast_to(np.zeros(1, np.float32), (draw(st.integers(1, 3)), side, side, 3))
    return draw(st.sampled_from([None, 3, 2.5, "x", {"a": 1}, b"\x89PNG", object()]))


def _valid_batch(x: torch.Tensor) -> None:
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.ndim == 4 and x.shape[1] == 3
    assert x.shape[0] >= 1 and x.shape[2] >= 1 and x.shape[3] >= 1 and not x.requires_grad
    assert bool(torch.isfinite(x).all()) and float(x.min()) >= 0 and float(x.max()) <= 1


@settings(max_examples=LONG or 300, **HYP)
@given(images=image_inputs())
def test_fuzz_as_image_batch_gives_a_valid_batch_or_an_input_error_in_bounded_time_and_memory(images):
    with bounded(f"as_image_batch({type(images).__name__})"):
        try:
            x = as_image_batch(images, name="ref")
        except InputError as e:
            named = images if isinstance(images, str) else "ref"  # a path's errors name the file
            assert named in str(e) and len(str(e)) < 2000, str(e)
            return
    _valid_batch(x)


# --------------------------------------------------------------------------- sweep.expand on YAML documents

BASE = {"name": "f", "extractors": ["toy/shape-resnet@logits"], "priors": ["toy/prior-fm"], "methods": ["ndtm"],
        "n": 1, "steps": 2, "preset": "toy", "seeds": [0], "references": [{"toy": {"n": 1, "seed": 3}}]}
SCALARS = st.one_of(
    st.integers(-5, 50).map(str), st.sampled_from(["1e999", "-.inf", ".nan", "~", "true", "no", "0x" + "f" * 5000,
                                                   "9" * 5000, "0o777", "2001-12-14", "'toy/prior-fm'", "ndtm",
                                                   "toy/shape-resnet@layer99", "timm/resnet5O", "[]", "{}"]),
    st.text(max_size=12).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.integers(1, 300_000).map(lambda k: '"' + "x" * k + '"'))  # huge strings


@st.composite
def yaml_nodes(draw, anchors: list[str], depth: int = 0) -> str:
    """A YAML node in flow style: scalars, sequences, mappings, anchors and aliases of earlier anchors."""
    kind = draw(st.sampled_from(["scalar", "scalar", "seq", "map", "alias", "anchor"] if depth < 4 else ["scalar"]))
    if kind == "alias" and anchors:
        return "*" + draw(st.sampled_from(anchors))
    if kind == "seq":
        return "[" + ", ".join(draw(st.lists(yaml_nodes(anchors, depth + 1), max_size=4))) + "]"
    if kind == "map":
        keys = draw(st.lists(st.sampled_from(list(TOP_KEYS) + ["toy", "folder", "n", "seed", "ndtm", "lr", "x"]),
                             max_size=4, unique=True))
        return "{" + ", ".join(f"{k}: {draw(yaml_nodes(anchors, depth + 1))}" for k in keys) + "}"
    if kind == "anchor":
        name = f"a{len(anchors)}"
        node = draw(yaml_nodes(anchors, depth + 1))
        anchors.append(name)
        return f"&{name} {node}"
    return draw(SCALARS)


@st.composite
def yaml_documents(draw) -> str:
    """A valid sweep with some top-level values replaced by fuzzed nodes, often after an alias bomb (``levels``
    levels of ``fan`` aliases each) whose last anchor can be used anywhere."""
    anchors: list[str] = []
    lines = []
    if draw(st.booleans()):
        fan, levels = draw(st.integers(2, 12)), draw(st.integers(1, 12))
        lines.append("_l0: &l0 [" + ", ".join(['"lol"'] * fan) + "]")
        for i in range(1, levels):
            lines.append(f"_l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]")
        anchors.append(f"l{levels - 1}")
    doc = dict(BASE)
    for key in draw(st.lists(st.sampled_from(list(TOP_KEYS) + ["unknown_key"]), max_size=3, unique=True)):
        doc[key] = None
        lines.append(f"{key}: {draw(yaml_nodes(anchors))}")
    lines += [yaml.safe_dump({k: v}, default_flow_style=True).strip() for k, v in doc.items() if v is not None]
    if draw(st.integers(0, 9)) == 0:  # now and then a document that is not YAML at all
        lines.append(draw(st.sampled_from(["{", "]", "&x", "*nope", "\t- x", "? [a]: 1", "!!python/object:os.system"])))
    return "\n".join(lines) + "\n"


@settings(max_examples=LONG or 200, **HYP)
@given(text=yaml_documents())
def test_fuzz_sweep_expand_gives_jobs_or_one_config_error_in_bounded_time_and_memory(text, tmp_path_factory):
    path = Path(tmp_path_factory.getbasetemp()) / "fuzz.yaml"
    path.write_text(text)
    with bounded(f"expand of {len(text)} bytes"):
        try:
            name, jobs = expand(path, checksums=False)
        except ConfigError as e:
            msg = str(e)
            assert msg.startswith("sweep config") and len(msg) < 150_000, msg[:500]
            return
    assert jobs and all(len(j.key) == 32 for j in jobs)
