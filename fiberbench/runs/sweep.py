"""Headless sweeps: a YAML/TOML file expanded into fiber jobs, run locally or as Ray tasks, into a store.

A sweep file (YAML or TOML; every key but ``extractors``, ``priors`` and ``references`` is optional)::

    name: toy-small                 # letters, digits, '._-'
    extractors: [toy/shape-resnet@logits]
    priors: [toy/prior-fm]
    methods: [ndtm, unguided]       # default [ndtm]
    seeds: [0, 1]                   # or one integer
    n: 8                            # samples per fiber (per reference)
    steps: 20                       # default: the preset's
    preset: toy                     # default: the prior's recommendation; "none": the method's defaults
    loss: cosine
    init: noise                     # or [sdedit, 600]
    hyperparameters:                # fixed overrides, per method
      ndtm: {inner_steps: 4}
    grid:                           # per method, every combination of these lists is a job
      ndtm: {lr: [0.05, 0.1]}
    references:                     # reference selections, each giving one fiber job per image
      - toy: {n: 4, seed: 100}                                    # fresh renders of the shapes world
      - toy: {seed: 7, per_class: 1, classes: {shape: [circle, square]}}  # a class list of a factor
      - folder: {path: refs/, glob: "*.png", limit: 8}            # a folder of images (relative to the file)
      - folder: {path: imgs/, classes: [cat, dog], per_class: 2}  # sub-folders named by class
    resources: {num_cpus: 1, num_gpus: 0.5}   # per job (Ray); num_gpus used only where GPUs exist
    threads: 1                      # torch threads per job

Jobs = references × extractors × priors × methods × grid × seeds; one job samples ``n`` images of one
reference's fiber and writes one run into the store (key = content hash of its full config, see
:mod:`fiberbench.store`). Running a sweep again runs only the jobs whose key is missing or corrupt.
The whole file is checked before the first job runs (:func:`expand`): one ``ConfigError`` lists every
problem, and the limits :data:`MAX_REFERENCES`, :data:`MAX_N`, :data:`MAX_STEPS`, :data:`MAX_JOBS` catch
typos such as ``n: 10000000`` before anything is rendered.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import time
import traceback
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 has no tomllib: TOML sweep files then need 3.11+ (YAML works)
    tomllib = None

from ..checks import (
    MAX_CONFIG_BYTES,
    MAX_IMAGE_SIDE,
    MAX_JOBS,
    MAX_MODELS,
    MAX_N,
    MAX_REFERENCES,
    MAX_STEPS,
    check_expanded_size,
    check_int,
    in_choices,
    is_int,
    is_real,
    show,
)
from ..errors import ConfigError, FiberbenchError, InputError, close_matches
from ..io import load_image, open_regular_file
from ..models import list_models, load_extractor, load_prior, parse_spec, weights_checksum
from ..models.registry import check_available
from ..sampling import LOSSES, METHODS, NO_PRESET, PRESETS, resolve_hyperparameters, sample_fiber
from ..seeds import SWEEP_BENCH_SEED_BASE
from ..toy import FACTORS, references
from .store import Store, check_name, run_config

TOP_KEYS = ("name", "extractors", "priors", "methods", "seeds", "n", "steps", "preset", "loss", "init",
            "hyperparameters", "grid", "references", "resources", "threads", "batch_size")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------- config

class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose values, every alias expanded where it is used, exceed
    :data:`~fiberbench.checks.MAX_CONFIG_VALUES` (or nest deeper than ``MAX_CONFIG_DEPTH``, or refer to
    themselves). It counts the composed node graph before anything is constructed: a few hundred bytes of
    nested aliases ("billion laughs") would otherwise expand to billions of values in the first error message
    or loop that walks them."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        check_expanded_size("the document", node, children=yaml_children)
        return node


def yaml_children(node: Any) -> list[Any] | None:
    """The nodes a YAML node holds (keys and values of a mapping, items of a sequence); ``None`` for a scalar."""
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return None


def read_config_text(path: Path) -> str:
    """The text of a sweep file: a regular file of at most :data:`~fiberbench.checks.MAX_CONFIG_BYTES`, UTF-8."""
    try:
        with open_regular_file(path, "sweep config") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except InputError as e:
        raise ConfigError(str(e)) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"sweep config {path} is larger than {MAX_CONFIG_BYTES} bytes; a sweep file lists "
                          f"models, settings and reference selections, not data")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"sweep config {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_config(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], Path]:
    """Read a sweep file (``.yaml``/``.yml``/``.toml``) or take a dict. Returns ``(raw dict, base folder)``.

    Bounded before anything else looks at it: the file's size, and the number of values with YAML aliases
    expanded (:class:`BoundedLoader`; the same walk bounds a dict passed in).
    """
    if isinstance(source, Mapping):
        check_expanded_size("the sweep config", source)
        return dict(source), Path.cwd()
    path = Path(source)
    text = read_config_text(path)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"sweep config {path}: use a .yaml, .yml or .toml file")
    try:
        if path.suffix == ".toml":
            if tomllib is None:
                raise ConfigError(f"sweep config {path}: TOML needs Python >= 3.11; use a .yaml file")
            raw = tomllib.loads(text)
        else:
            raw = yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"sweep config {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - yaml / toml parse errors (RecursionError for absurd nesting)
        raise ConfigError(f"sweep config {path} does not parse: {show(str(e), 300, typed=False)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep config {path} must hold a mapping at the top level")
    check_expanded_size(f"sweep config {path}", raw)
    return raw, path.parent.absolute()


def _show(v: Any) -> str:
    return show(v, typed=False)


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


# one reference of a sweep: (image [1,3,H,W] in [0,1], reference id, columns added to its rows)
_Reference = tuple[torch.Tensor, str, dict[str, Any]]


@dataclass
class Job:
    """One fiber run: ``n`` samples of one reference's fiber under one model pair, method, setting, seed."""

    index: int
    prior: str
    extractor: str
    method: str
    seed: int
    n: int
    steps: int | None
    loss: str | None
    preset: str | None
    init: Any
    hyperparameters: dict[str, Any]
    reference: torch.Tensor  # [1,3,H,W] in [0,1]
    reference_id: str
    columns: dict[str, Any]  # added to every row: sweep name, reference source, class, toy factors …
    checksums: dict[str, str | None]
    threads: int | None = None
    batch_size: int = 64
    resources: dict[str, float] = field(default_factory=dict)
    key: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        hp = ",".join(f"{k}={v}" for k, v in sorted(self.hyperparameters.items()))
        return (f"#{self.index} {self.method} {self.extractor} | {self.prior} ref={self.reference_id} "
                f"seed={self.seed}" + (f" {hp}" if hp else ""))

    def sample_kwargs(self) -> dict[str, Any]:
        kw = dict(n=self.n, method=self.method, seed=self.seed, init=self.init, preset=self.preset,
                  reference_ids=[self.reference_id], **self.hyperparameters)
        if self.steps is not None:
            kw["steps"] = self.steps
        if self.loss is not None:
            kw["loss"] = self.loss
        return kw


def _toy_references(sel: Mapping, where: str, problems: list[str], room: int) -> list[_Reference]:
    """Render a ``toy`` selection (at most ``room`` images) or add its problems to ``problems``."""
    unknown = sorted((k for k in sel if k not in ("n", "seed", "classes", "per_class", "fixed")), key=_show)
    if unknown:
        problems.append(f"{where}: unknown key(s) {_show(unknown)}; toy selections take n, seed, classes, per_class, "
                        f"fixed")
    seed = sel.get("seed", 0)
    if not is_int(seed, 0, 2 ** 63 - 1):
        problems.append(f"{where}.seed must be an integer in [0, 2**63), got {_show(seed)}")
    fixed = sel.get("fixed") or {}
    if not isinstance(fixed, Mapping):
        problems.append(f"{where}.fixed must map factor names to values, e.g. {{color: red}}; got {_show(fixed)}")
        fixed = {}
    for k, v in fixed.items():
        if k not in FACTORS:
            problems.append(f"{where}.fixed: unknown factor {_show(k)}; factors: {list(FACTORS)}")
        elif isinstance(FACTORS[k], list) and not in_choices(v, FACTORS[k]):
            problems.append(f"{where}.fixed.{k}: {_show(v)} is not one of {FACTORS[k]}")
        elif isinstance(FACTORS[k], tuple) and not (is_real(v) and FACTORS[k][0] <= v <= FACTORS[k][1]):
            problems.append(f"{where}.fixed.{k} must be a number in [{FACTORS[k][0]}, {FACTORS[k][1]}], "
                            f"got {_show(v)}")
    out = []
    if "classes" in sel:
        classes = sel["classes"]
        per = sel.get("per_class", 1)
        if not is_int(per, 1):
            problems.append(f"{where}.per_class must be a positive integer, got {_show(per)}")
            return []
        if not isinstance(classes, Mapping) or len(classes) != 1:
            problems.append(f"{where}.classes must map one discrete factor to a list of values, "
                            f"e.g. {{shape: [circle, square]}}; got {_show(classes)}")
            return []
        (factor, values), = classes.items()
        if factor not in FACTORS or not isinstance(FACTORS[factor], list):
            problems.append(f"{where}.classes: {_show(factor)} is not a discrete factor; "
                            f"choose from {[k for k, v in FACTORS.items() if isinstance(v, list)]}")
            return []
        values = _as_list(values)
        bad = [v for v in values if not in_choices(v, FACTORS[factor])]
        if bad or not values:
            problems.append(f"{where}.classes.{factor}: {_show(bad)} not in {FACTORS[factor]}" if bad else
                            f"{where}.classes.{factor} must list at least one of {FACTORS[factor]}")
            return []
        if per * len(values) > room:
            problems.append(f"{where} selects {per} x {len(values)} references; a sweep takes at most "
                            f"{MAX_REFERENCES} in all")
            return []
        if problems:  # rendering waits until the config is known to be good
            return []
        for value in values:
            imgs, f = references(per, seed=seed, **{**fixed, factor: value})
            for i in range(per):
                cols = {f"ref_{k}": (v.item() if hasattr(v, "item") else v) for k, v in f.iloc[i].items()}
                out.append((imgs[i:i + 1], f"toy:s{seed}:{factor}={value}:{i}",
                            {"reference_source": "toy", "class": str(value), **cols}))
        return out
    n = sel.get("n", 1)
    if not is_int(n, 1):
        problems.append(f"{where}.n must be a positive integer, got {_show(n)}")
        return []
    if n > room:
        problems.append(f"{where}.n = {n} references is too many: a sweep takes at most {MAX_REFERENCES} in all "
                        f"(a typo?)")
        return []
    if problems:
        return []
    imgs, f = references(n, seed=seed, **fixed)
    for i in range(n):
        cols = {f"ref_{k}": (v.item() if hasattr(v, "item") else v) for k, v in f.iloc[i].items()}
        out.append((imgs[i:i + 1], f"toy:s{seed}:{i}", {"reference_source": "toy", "class": None, **cols}))
    return out


def _folder_references(sel: Mapping, base: Path, where: str, problems: list[str],
                       room: int) -> list[_Reference]:
    """Read a ``folder`` selection (at most ``room`` images) or add its problems to ``problems``."""
    unknown = sorted((k for k in sel if k not in ("path", "glob", "limit", "classes", "per_class", "size")), key=_show)
    if unknown:
        problems.append(f"{where}: unknown key(s) {_show(unknown)}; folder selections take path, glob, limit, "
                        f"classes, per_class, size")
    if "path" not in sel:
        problems.append(f"{where}: a folder selection needs 'path'")
        return []
    if not isinstance(sel["path"], str) or not sel["path"]:
        problems.append(f"{where}.path must be a folder name (a string), got {_show(sel['path'])}")
        return []
    root: Path | str = sel["path"]
    try:
        root = (base / Path(sel["path"]).expanduser()).resolve()
        exists = root.is_dir()
    except (OSError, ValueError, RuntimeError):  # e.g. a NUL byte in the name, an unknown ~user
        exists = False
    if not exists:
        problems.append(f"{where}.path: folder {root} does not exist")
        return []
    pattern = sel.get("glob", "*")
    if not isinstance(pattern, str) or not pattern:
        problems.append(f"{where}.glob must be a file pattern such as '*.png', got {_show(pattern)}")
        return []
    limit = sel.get("limit", sel.get("per_class"))
    if limit is not None and not is_int(limit, 1):
        problems.append(f"{where}: limit/per_class must be a positive integer, got {_show(limit)}")
        return []
    size = sel.get("size")
    if size is not None and not is_int(size, 1, MAX_IMAGE_SIDE):
        problems.append(f"{where}.size must be a positive integer (at most {MAX_IMAGE_SIDE}), got {_show(size)}")
        return []
    groups: list[tuple[str | None, Path]] = []
    if "classes" in sel:
        classes = _as_list(sel["classes"])
        if not classes or not all(isinstance(c, str) and c or is_int(c, -10 ** 9, 10 ** 9) for c in classes):
            problems.append(f"{where}.classes must list sub-folder names, got {_show(sel['classes'])}")
            return []
        for c in classes:
            sub = root / str(c)
            if not sub.is_dir():
                have = sorted(p.name for p in root.iterdir() if p.is_dir())
                problems.append(f"{where}.classes: no sub-folder {_show(str(c))} in {root}; have {have[:20]}")
            else:
                groups.append((str(c), sub))
    else:
        groups.append((None, root))
    chosen: list[tuple[str | None, Path]] = []
    for cls, folder in groups:
        try:
            files = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        except (ValueError, NotImplementedError, OSError) as e:  # '../*', '/abs/*', '**x' …
            problems.append(f"{where}.glob {_show(pattern)} cannot be used: {e}")
            return []
        if not files:
            problems.append(f"{where}: no images matching {_show(pattern)} in {folder}")
            continue
        chosen += [(cls, p) for p in files[:limit]]
    if len(chosen) > room:
        problems.append(f"{where} selects {len(chosen)} images; a sweep takes at most {MAX_REFERENCES} references "
                        f"in all (set limit)")
        return []
    out = []
    for cls, p in chosen:
        try:
            img = load_image(p, size=size)
        except FiberbenchError as e:
            problems.append(f"{where}: {e}")
            continue
        rel = p.relative_to(root).as_posix()
        out.append((img[None], f"folder:{rel}", {"reference_source": str(root), "class": cls}))
    return out


@dataclass
class _Plan:
    """The values of a sweep file other than its references, as read and checked.

    Each field holds the file's value (or its default) even when it is invalid; a problem found is in the
    ``problems`` list of the check, and jobs are built from a plan only when that list stayed empty.
    """

    name: Any  # letters, digits and '._-'
    extractors: list[str]  # spec strings, distinct
    priors: list[str]  # spec strings, distinct
    methods: list[str]  # names in METHODS, distinct
    seeds: list[Any]  # integers in [0, 2**63), distinct
    n: Any  # samples per fiber, in [1, MAX_N]
    steps: Any  # None (the preset's) or in [1, MAX_STEPS]
    threads: Any  # None or torch threads per job in [1, 1024]
    batch_size: Any  # positive integer
    resources: dict[str, Any]  # num_cpus / num_gpus, finite numbers >= 0
    preset: str | None  # None also when the file names an unknown preset
    loss: Any  # None or a name in LOSSES
    init: Any  # "noise" or ("sdedit", tau_star) with 0 < tau_star <= 1000
    settings: dict[str, list[dict[str, Any]]]  # method -> its valid hyper-parameter dicts, in grid order


def expand(source: str | Path | Mapping[str, Any], *, checksums: bool = True) -> tuple[str, list[Job]]:
    """Validate a sweep config as a whole and expand it into jobs (with store keys).

    Every value is checked (types, ranges, names; the limits :data:`MAX_REFERENCES`, :data:`MAX_N`,
    :data:`MAX_STEPS`, :data:`MAX_JOBS` catch typos) and every problem found is collected first; if there
    are any, one ``ConfigError`` starting ``sweep config has k problem(s)`` lists them all and no job
    runs. Returns ``(sweep name, jobs)`` in a deterministic order.
    """
    raw, base = load_config(source)
    problems: list[str] = []
    plan = _check_plan(raw, problems)
    # references last: a toy selection renders its images only when nothing before it was found wrong
    refs = _expand_references(raw, base, problems)
    _check_job_count(plan, refs, problems)
    sums: dict[str, str | None] = {}
    if checksums and not problems:  # hashing weights is slow: only for a config that is otherwise good
        sums = _weights_checksums(plan.extractors + plan.priors, problems)
    if problems:
        raise ConfigError(problem_list(problems))
    jobs = _build_jobs(plan, refs, sums)
    _check_distinct_keys(jobs)
    return plan.name, jobs


def problem_list(problems: list[str], shown: int = 50) -> str:
    """The message listing a sweep config's problems: the first ``shown``, each cut to 2,000 characters."""
    lines = [f"  - {p[:2000]}" for p in problems[:shown]]
    more = [f"  … and {len(problems) - shown} more"] if len(problems) > shown else []
    return f"sweep config has {len(problems)} problem(s):\n" + "\n".join(lines + more)


def _check_plan(raw: Mapping[str, Any], problems: list[str]) -> _Plan:
    """Check every key of ``raw`` but ``references``; problems are added in a fixed order: unknown keys, name,
    models, methods, counts, resources, preset/loss/init, per-method settings."""
    _check_top_keys(raw, problems)
    name = _check_name(raw, problems)
    extractors = _check_specs(raw, "extractors", "extractor", problems)
    priors = _check_specs(raw, "priors", "prior", problems)
    methods = _check_methods(raw, problems)
    seeds, n, steps, threads, batch_size = _check_counts(raw, problems)
    resources = _check_resources(raw, problems)
    preset, loss, init = _check_sampling(raw, methods, problems)
    sections, broken = _check_method_sections(raw, methods, problems)
    settings = _expand_settings(methods, preset, sections, broken, problems)
    return _Plan(name=name, extractors=extractors, priors=priors, methods=methods, seeds=seeds, n=n, steps=steps,
                 threads=threads, batch_size=batch_size, resources=resources, preset=preset, loss=loss, init=init,
                 settings=settings)


def _check_top_keys(raw: Mapping[str, Any], problems: list[str]) -> None:
    """Add a problem per key not in :data:`TOP_KEYS` (sorted), with the closest key as a hint."""
    for k in sorted((k for k in raw if k not in TOP_KEYS), key=lambda k: show(k, typed=False)):
        hint = close_matches(show(k, typed=False), TOP_KEYS)
        problems.append(f"unknown key {_show(k)}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; keys: {list(TOP_KEYS)}")


def _check_name(raw: Mapping[str, Any], problems: list[str]) -> Any:
    """The sweep name (default ``"sweep"``); a problem unless it is letters, digits and ``._-``."""
    name = raw.get("name", "sweep")
    try:
        check_name(name, "sweep name")
    except ConfigError as e:
        problems.append(str(e))
    return name


def _check_specs(raw: Mapping[str, Any], key: str, kind: str, problems: list[str]) -> list[str]:
    """The model spec strings under ``key`` that are ``kind`` ("extractor" or "prior"), in file order.

    Checked without loading anything (:func:`~fiberbench.models.registry.check_available`): the source, toy
    names against the toy cards, layer names against the model's modules built on the meta device, folders,
    importable modules and, with the hub offline, the local hub cache. An empty list is a problem, as are
    duplicates and more than :data:`~fiberbench.checks.MAX_MODELS` specs. Each distinct spec is checked once.
    """
    vals = _as_list(raw.get(key) or [])
    if not vals:
        problems.append(f"{key!r} is required: a list of {kind} spec strings")
    if len(vals) > MAX_MODELS:
        problems.append(f"{key} lists {len(vals)} specs; a sweep takes at most {MAX_MODELS}")
        return []
    out: list[str] = []
    found: dict[str, str | None] = {}
    for v in vals:
        if not isinstance(v, str):
            problems.append(f"{key}: {_show(v)} is not a spec string such as 'toy/shape-resnet@logits'")
        elif v in found:
            out += [v] if found[v] is None else []
        else:
            found[v] = _spec_problem(v, key, kind)
            if found[v] is None:
                out.append(v)
            else:
                problems.append(found[v])
    dup = sorted(v for v, c in Counter(out).items() if c > 1)
    if dup:
        problems.append(f"{key} has duplicates: {_show(dup)}")
    return out


def _spec_problem(spec: str, key: str, kind: str) -> str | None:
    """The problem with one spec string of ``key`` (see :func:`_check_specs`), or ``None``."""
    try:
        s = parse_spec(spec)
    except ConfigError as e:
        return f"{key}: {e}"
    if s.source == "toy":
        known = list_models(kind=kind) + (list_models(kind="conditional") if kind == "prior" else [])
        if f"toy/{s.name}" not in {k.split("@")[0] for k in known}:
            hint = close_matches(spec[:200], known)
            return (f"{key}: {_show(spec)} is not a toy {kind}; available: {known}"
                    + (f"; did you mean {hint[0]!r}?" if hint else ""))
    elif kind == "extractor" and s.source == "diffusers":
        return f"{key}: {_show(spec)} is a prior, not a feature extractor"
    try:
        check_available(spec, kind)
    except ConfigError as e:
        return f"{key}: {e}" if spec in str(e) else f"{key}: {_show(spec)}: {e}"
    return None


def _check_methods(raw: Mapping[str, Any], problems: list[str]) -> list[str]:
    """The known sampler names of ``methods`` (default ``[ndtm]``), in file order; unknown ones are problems."""
    methods_raw = raw.get("methods", ["ndtm"])
    listed = _as_list(methods_raw if methods_raw is not None else [])
    if not listed:
        problems.append(f"methods must list at least one of {list(METHODS)}, got {_show(methods_raw)}")
    methods: list[str] = []
    for m in listed:
        if not isinstance(m, str) or m not in METHODS:
            hint = close_matches(m, METHODS) if isinstance(m, str) else []
            problems.append(f"methods: unknown method {_show(m)}; choose from {list(METHODS)}"
                            + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        else:
            methods.append(m)
    if len(set(methods)) != len(methods):
        problems.append(f"methods has duplicates: {_show(methods)}")
    return methods


def _check_counts(raw: Mapping[str, Any], problems: list[str]) -> tuple[list[Any], Any, Any, Any, Any]:
    """``(seeds, n, steps, threads, batch_size)`` with their defaults (``[0]``, 8, None, None, 64).

    Seeds are integers in [0, 2**63) without duplicates, ``n`` in [1, MAX_N], ``steps`` None or in
    [1, MAX_STEPS], ``threads`` None or in [1, 1024], ``batch_size`` >= 1; anything else is a problem.
    """
    seeds = _as_list(raw.get("seeds", [0]))
    if not seeds or any(not is_int(s, 0, 2 ** 63 - 1) for s in seeds):
        problems.append(f"seeds must be integers in [0, 2**63), got {_show(raw.get('seeds'))}")
    elif len(set(seeds)) != len(seeds):
        problems.append(f"seeds has duplicates: {_show(seeds)}")
    n = raw.get("n", 8)
    if not is_int(n, 1, MAX_N):
        problems.append(f"n must be a positive integer (samples per fiber, at most {MAX_N}), got {_show(n)}")
    steps = raw.get("steps")
    if steps is not None and not is_int(steps, 1, MAX_STEPS):
        problems.append(f"steps must be a positive integer (at most {MAX_STEPS}), got {_show(steps)}")
    threads = raw.get("threads")
    if threads is not None and not is_int(threads, 1, 1024):
        problems.append(f"threads must be a positive integer, got {_show(threads)}")
    batch_size = raw.get("batch_size", 64)
    if not is_int(batch_size, 1):
        problems.append(f"batch_size must be a positive integer, got {_show(batch_size)}")
    return seeds, n, steps, threads, batch_size


def _check_resources(raw: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """The per-job Ray resources (a copy; ``{}`` when missing or not a mapping): num_cpus, num_gpus >= 0."""
    resources = raw.get("resources") or {}
    if not isinstance(resources, Mapping):
        problems.append(f"resources must be a mapping such as {{num_cpus: 1, num_gpus: 0.5}}, got {_show(resources)}")
        resources = {}
    resources = dict(resources)
    for k, v in resources.items():
        if k not in ("num_cpus", "num_gpus"):
            problems.append(f"resources: unknown key {_show(k)}; use num_cpus, num_gpus")
        elif not is_real(v) or v < 0:
            problems.append(f"resources.{k} must be a finite number >= 0, got {_show(v)}")
    return resources


def _check_sampling(raw: Mapping[str, Any], methods: list[str], problems: list[str]) -> tuple[str | None, Any, Any]:
    """``(preset, loss, init)``: a preset in PRESETS or None, a loss in LOSSES or None, and ``init`` as
    ``"noise"`` or a tuple ``("sdedit", tau_star)``, 0 < tau_star <= 1000 (not with ``metamer``)."""
    preset = raw.get("preset")
    if preset is not None and (not isinstance(preset, str) or preset not in (*PRESETS, NO_PRESET)):
        problems.append(f"unknown preset {_show(preset)}; presets: {sorted(PRESETS)} or {NO_PRESET!r}")
        preset = None  # the hyper-parameters are still checked, against the method defaults
    loss = raw.get("loss")
    if loss is not None and (not isinstance(loss, str) or loss not in LOSSES):
        problems.append(f"unknown fiber loss {_show(loss)}; choose one of {list(LOSSES)}")
    init = raw.get("init", "noise")
    if isinstance(init, list):
        init = tuple(init)
    if isinstance(init, tuple):
        if len(init) != 2 or init[0] != "sdedit" or not is_real(init[1]) or not 0 < init[1] <= 1000:
            problems.append(f"init must be 'noise' or [sdedit, tau_star] with 0 < tau_star <= 1000, "
                            f"got {_show(list(init))}")
        elif "metamer" in methods:
            problems.append("metamer has no prior and so no SDEdit start; remove it from methods or use init: noise")
    elif init != "noise":
        problems.append(f"init must be 'noise' or [sdedit, tau_star], got {_show(init)}")
    return preset, loss, init


def _check_method_sections(raw: Mapping[str, Any], methods: list[str],
                           problems: list[str]) -> tuple[dict[str, dict[str, dict]], set[str]]:
    """The ``hyperparameters`` and ``grid`` sections as ``{section: {method: settings}}`` and the set of
    methods whose settings cannot be expanded (a body that is not a mapping, a grid value not a list)."""
    sections: dict[str, dict[str, dict]] = {}
    broken: set[str] = set()
    for section in ("hyperparameters", "grid"):
        sec = raw.get(section)
        sections[section] = {}
        if sec is None:
            continue
        if not isinstance(sec, Mapping):
            problems.append(f"{section} must map method names to settings, e.g. {{ndtm: {{lr: 0.05}}}}; "
                            f"got {_show(sec)}")
            continue
        for m, body in sec.items():
            if m not in methods:
                problems.append(f"{section}: method {_show(m)} is not in methods {methods}")
            elif not isinstance(body, Mapping):
                problems.append(f"{section}.{m} must be a mapping of hyper-parameters, got {_show(body)}")
                broken.add(m)
            else:
                if section == "grid":
                    for k, v in body.items():
                        if not isinstance(v, list) or not v:
                            problems.append(f"grid.{m}.{k} must be a non-empty list of values, got {_show(v)}")
                            broken.add(m)
                sections[section][m] = dict(body)
    return sections, broken


def _expand_settings(methods: list[str], preset: str | None, sections: dict[str, dict[str, dict]],
                     broken: set[str], problems: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Per method, the fixed overrides merged into every grid combination (first grid key outermost),
    keeping those the sampler's own resolver accepts; each rejection is one problem (repeats dropped)."""
    settings: dict[str, list[dict[str, Any]]] = {}
    for m in methods:
        if m in broken:
            continue
        fixed = sections["hyperparameters"].get(m, {})
        grid = sections["grid"].get(m, {})
        size = math.prod(len(v) for v in grid.values())
        if size > MAX_JOBS:
            problems.append(f"grid.{m} has {size} combinations; a sweep runs at most {MAX_JOBS} jobs")
            continue
        combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else [{}]
        settings[m] = []
        seen: set[str] = set()
        for combo in combos:
            hp = {**fixed, **combo}
            try:
                resolve_hyperparameters(m, preset, hp)
            except ConfigError as e:
                msg = f"{m} {_show(combo) if combo else ''}: {e}".replace("  ", " ")
                if msg not in seen:
                    seen.add(msg)
                    problems.append(msg)
                continue
            settings[m].append(hp)
    return settings


def _expand_references(raw: Mapping[str, Any], base: Path, problems: list[str]) -> list[_Reference]:
    """The references of every selection, in file order, at most :data:`MAX_REFERENCES` in all; folder
    paths are relative to ``base``. The same reference id twice is a problem."""
    refs: list[_Reference] = []
    selections = raw.get("references")
    if not selections:
        problems.append("'references' is required: a list of selections such as {toy: {n: 4, seed: 0}} "
                        "or {folder: {path: imgs/}}")
    for i, sel in enumerate(_as_list(selections or [])):
        where = f"references[{i}]"
        if not isinstance(sel, Mapping) or len(sel) != 1 or next(iter(sel)) not in ("toy", "folder"):
            problems.append(f"{where} must be {{toy: {{…}}}} or {{folder: {{…}}}}, got {_show(sel)}")
            continue
        (kind, body), = sel.items()
        if not isinstance(body, Mapping):
            problems.append(f"{where}.{kind} must be a mapping, got {_show(body)}")
            continue
        room = MAX_REFERENCES - len(refs)
        refs += _toy_references(body, f"{where}.toy", problems, room) if kind == "toy" else \
            _folder_references(body, base, f"{where}.folder", problems, room)
    ids = [r[1] for r in refs]
    dup = sorted(i for i, c in Counter(ids).items() if c > 1)
    if dup:
        problems.append(f"references: the same reference is selected twice: {dup[:10]}")
    return refs


def _check_job_count(plan: _Plan, refs: list[_Reference], problems: list[str]) -> None:
    """A problem if references x extractors x priors x settings x seeds exceeds :data:`MAX_JOBS`."""
    settings = sum(len(v) for v in plan.settings.values())
    total = len(refs) * len(plan.extractors) * len(plan.priors) * settings * len(plan.seeds)
    if total > MAX_JOBS:
        problems.append(f"the sweep would run {total} jobs; at most {MAX_JOBS} (fewer references, seeds or "
                        f"grid values)")


def _weights_checksums(specs: list[str], problems: list[str]) -> dict[str, str | None]:
    """``{spec: checksum of its weight files}`` (None where a source has none); missing weights are problems."""
    sums: dict[str, str | None] = {}
    for spec in specs:
        try:
            sums[spec] = weights_checksum(spec)
        except ConfigError as e:
            problems.append(str(e))
    return sums


def _build_jobs(plan: _Plan, refs: list[_Reference], sums: Mapping[str, str | None]) -> list[Job]:
    """One job per (extractor, prior, method, setting, seed, reference), indexed from 0, with its store key."""
    jobs: list[Job] = []
    # model pair outermost: consecutive jobs (and so each worker's queue) reuse the models already loaded
    for ext, pri, m in itertools.product(plan.extractors, plan.priors, plan.methods):
        for hp, seed, (ref, ref_id, cols) in itertools.product(plan.settings[m], plan.seeds, refs):
            job = Job(index=len(jobs), prior=pri, extractor=ext, method=m, seed=int(seed), n=plan.n,
                      steps=plan.steps, loss=plan.loss, preset=plan.preset, init=plan.init,
                      hyperparameters=dict(hp), reference=ref, reference_id=ref_id,
                      columns={"sweep": plan.name, **cols},
                      checksums={"prior": sums.get(pri), "extractor": sums.get(ext)}, threads=plan.threads,
                      batch_size=plan.batch_size, resources=plan.resources)
            job.config = run_config(pri, ext, ref, checksums=job.checksums, spec_checked=True, **job.sample_kwargs())
            job.key = job.config["key"]
            jobs.append(job)
    return jobs


def _check_distinct_keys(jobs: list[Job]) -> None:
    """``ConfigError`` naming up to 10 pairs of jobs with the same store key: the same run twice, e.g. the
    same image selected under two names."""
    keys = [j.key for j in jobs]
    if len(set(keys)) == len(keys):
        return
    seen: dict[str, int] = {}
    clashes = []
    for j in jobs:
        if j.key in seen:
            clashes.append(f"{jobs[seen[j.key]].label()} == {j.label()}")
        seen.setdefault(j.key, j.index)
    raise ConfigError("sweep config has jobs that are the same run:\n"
                      + "\n".join(f"  - {c}" for c in clashes[:10]))


# --------------------------------------------------------------------------- running one job

# per process: (kind, spec, checksum, device) -> model, least recently used first; at most MODEL_CACHE_SIZE
# models stay loaded (FIBERBENCH_MODEL_CACHE overrides it), so a sweep over many big models cannot fill a GPU
_MODELS: "OrderedDict[tuple[str, str, str | None, str], Any]" = OrderedDict()
MODEL_CACHE_SIZE = int(os.environ.get("FIBERBENCH_MODEL_CACHE", "4"))
LOADS: list[str] = []  # specs loaded in this process (a worker loads each model once)


def _model(kind: str, spec: str, checksum: str | None, device: str):
    k = (kind, spec, checksum, device)
    if k in _MODELS:
        _MODELS.move_to_end(k)
    else:
        while len(_MODELS) >= max(2, MODEL_CACHE_SIZE):
            _MODELS.popitem(last=False)
        model = load_prior(spec, device=device) if kind == "prior" else load_extractor(spec, device=device)
        if checksum is not None:  # the files must be what the key was computed from (a model may be retraining)
            now = weights_checksum(spec)
            if now != checksum:
                raise ConfigError(f"the weights of {spec} changed since the sweep was expanded "
                                  f"({checksum[:19]}… -> {now and now[:19]}…); run the sweep again")
        _MODELS[k] = model
        LOADS.append(spec)
    return _MODELS[k]


def clear_model_cache() -> None:
    """Forget the models this process has loaded (the next job loads them again)."""
    _MODELS.clear()


def run_job(job: Job, store_root: str, wait: bool = True) -> dict[str, Any]:
    """Run one job in this process and write it into the store. Never raises: returns an outcome dict
    ``{index, key, status, reason, seconds, started, finished, pid, loads}``.

    ``status`` is ``done`` (computed here), ``cached`` (in the store already, or committed by another process
    while this one waited), ``failed`` (with ``reason``) or, with ``wait=False``, ``busy``: another live process
    holds the job's claim (:meth:`~fiberbench.store.Store.claim`) and is computing it now. With ``wait=True`` the
    job waits for that process, then reads its run (or computes the job if it was given up).
    """
    started = time.time()
    out = {"index": job.index, "key": job.key, "status": "done", "reason": "", "pid": os.getpid(),
           "started": started}
    loads_before = len(LOADS)
    old_threads = torch.get_num_threads()
    try:
        store = Store(store_root)
        claim = None if store.has(job.key) else store.claim(job.key)
        if claim is None and not store.has(job.key) and wait:
            claim = _wait_for_claim(store, job.key)
        if claim is None:
            out["status"] = "cached" if store.has(job.key) else "busy"
            out["owner"] = store.claim_owner(job.key) if out["status"] == "busy" else None
        else:
            with claim:
                if store.has(job.key):  # committed by another process between our check and the claim
                    out["status"] = "cached"
                else:
                    _compute(job, store)
    except Exception as e:  # noqa: BLE001 - a failed job is reported in the summary, the sweep goes on
        out["status"] = "failed"
        out["reason"] = f"{type(e).__name__}: {e}"
        if not isinstance(e, FiberbenchError):
            out["traceback"] = traceback.format_exc(limit=6)
    finally:
        torch.set_num_threads(old_threads)
    out["finished"] = time.time()
    out["seconds"] = out["finished"] - started
    out["loads"] = LOADS[loads_before:]
    return out


def _compute(job: Job, store: Store) -> None:
    """Load the job's models (cached per process), sample its fiber and store the run."""
    if job.threads:
        torch.set_num_threads(job.threads)
    device = "cuda" if torch.cuda.is_available() and job.resources.get("num_gpus", 0) > 0 else "cpu"
    prior = _model("prior", job.prior, job.checksums.get("prior"), device)
    extractor = _model("extractor", job.extractor, job.checksums.get("extractor"), device)
    result = sample_fiber(prior, extractor, job.reference, progress=False, batch_size=job.batch_size,
                          **job.sample_kwargs())
    store.put(result, job.config, extra=job.columns)


CLAIM_POLL_SECONDS = 0.5  # how often a job waiting for another process's claim looks again


def _wait_for_claim(store: Store, key: str):
    """Wait until run ``key`` is in the store (``None``) or its claim is free or stale (the new claim).

    Ends: a live owner commits or releases; a dead one's claim is stale (this host: at once; another host: after
    ``CLAIM_STALE_SECONDS`` without a heartbeat) and taken over."""
    while True:
        if store.has(key):
            return None
        claim = store.claim(key)
        if claim is not None:
            return claim
        time.sleep(CLAIM_POLL_SECONDS)


# --------------------------------------------------------------------------- sweeps

@dataclass
class SweepSummary:
    """What a sweep did: ``done`` (computed by this sweep), ``cached`` (in the store when it started),
    ``elsewhere`` (computed by another process meanwhile, e.g. a second sweep into the same store), ``failed``
    with reasons, and ``not_run`` (stopped by ``max_jobs``). They add up to ``total``."""

    name: str
    total: int
    done: int = 0
    cached: int = 0
    elsewhere: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    backend: str = "local"
    outcomes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def not_run(self) -> int:
        """Jobs with no outcome: left over when ``max_jobs`` stopped the sweep."""
        return self.total - self.done - self.cached - self.elsewhere - len(self.failed)

    def __str__(self) -> str:
        lines = [f"sweep {self.name!r} ({self.backend}): {self.total} jobs — {self.done} done, {self.cached} cached, "
                 f"{len(self.failed)} failed, {self.elsewhere} done by another process, {self.not_run} not run — "
                 f"{self.seconds:.1f} s"]
        for label, reason in self.failed:
            lines.append(f"  FAILED {label}: {reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "total": self.total, "done": self.done,
                "cached": self.cached, "elsewhere": self.elsewhere, "not_run": self.not_run,
                "failed": [{"job": j, "reason": r} for j, r in self.failed], "seconds": self.seconds}


def _ray_task():
    import ray  # noqa: PLC0415 - optional dependency (the [ray] extra), needed only for backend="ray"

    @ray.remote
    def fiber_job(job: Job, store_root: str, wait: bool = True) -> dict[str, Any]:
        return run_job(job, store_root, wait=wait)

    return fiber_job


def run_sweep(config: str | Path | Mapping[str, Any], out: str | Path, *, backend: str = "local",
              address: str | None = None, progress: bool = True, max_jobs: int | None = None) -> SweepSummary:
    """Run the jobs of a sweep whose runs are missing from the store at ``out``.

    ``backend="local"`` runs them one after another in this process (models loaded once);
    ``backend="ray"`` submits each as a Ray task (``resources`` of the config; ``num_gpus`` only when the
    cluster has GPUs) to the running Ray instance, the cluster at ``address``, or a fresh local one.
    Workers write straight into the store, so ``out`` must be on a filesystem every node sees.

    Several sweeps (or Ray workers) can share one store: each job is claimed before it is computed
    (:meth:`~fiberbench.store.Store.claim`), a job another process is computing is skipped at first and waited
    for at the end, so every run is computed once; the summary counts it as ``elsewhere``. ``max_jobs`` (>= 0)
    stops after that many jobs were run here (for smoke runs); the rest are counted as ``not_run``. Returns a
    :class:`SweepSummary`.
    """
    if backend not in ("local", "ray"):
        raise ConfigError(f"unknown backend {show(backend)}; use 'local' or 'ray'")
    if max_jobs is not None:
        max_jobs = check_int("max_jobs", max_jobs, 0)
    name, jobs = expand(config)
    store = Store(out)
    t0 = time.time()
    summary = SweepSummary(name=name, total=len(jobs), backend=backend)
    todo = [job for job in jobs if not store.has(job.key)]
    summary.cached = len(jobs) - len(todo)
    bar = tqdm(total=len(jobs), initial=summary.cached, desc=f"sweep {name}", unit="job", disable=not progress)
    labels = {j.index: j.label() for j in jobs}

    def record(o: dict[str, Any]) -> None:
        o["received"] = time.time()  # when the driver learnt of it (Ray: after transfer and scheduling)
        summary.outcomes.append(o)
        if o["status"] == "done":
            summary.done += 1
        elif o["status"] == "cached":  # missing when the sweep started: another process computed it
            summary.elsewhere += 1
        else:
            summary.failed.append((labels[o["index"]], o["reason"]))
        bar.update(1)
        bar.set_postfix(done=summary.done, cached=summary.cached, elsewhere=summary.elsewhere,
                        failed=len(summary.failed))

    try:
        if backend == "local":
            _run_local(todo, store, record, max_jobs)
        else:
            _run_ray(todo, store, address, record, max_jobs)
    finally:
        bar.close()
    summary.seconds = time.time() - t0
    _write_summary(store, summary)
    return summary


def _run_local(todo: list[Job], store: Store, record, max_jobs: int | None) -> None:
    """Run ``todo`` here: jobs another process is computing are set aside, then waited for at the end."""
    ran, later = 0, []
    for wait, jobs in ((False, todo), (True, later)):
        for job in jobs:
            if max_jobs is not None and ran >= max_jobs:
                return
            o = run_job(job, str(store.root), wait=wait)
            if o["status"] == "busy":
                later.append(job)
                continue
            ran += o["status"] in ("done", "failed")
            record(o)


def start_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """``ray.init`` for sweeps: connect to ``address``, or start a local Ray instance on ``num_cpus``.

    A local instance gets this process's niceness for its workers: Ray's default (``RAY_worker_niceness``
    = 15) makes workers yield to every other process, which on a busy shared machine starves them
    (Ray's own job submission sets it to 0 likewise); an explicit ``RAY_worker_niceness`` is respected.
    ``FIBERBENCH_MODELS`` / ``HF_HUB_OFFLINE`` / ``HF_HOME`` are forwarded to the workers.
    """
    import ray  # noqa: PLC0415 - optional dependency (the [ray] extra)

    env = {k: os.environ[k] for k in ("FIBERBENCH_MODELS", "HF_HUB_OFFLINE", "HF_HOME") if k in os.environ}
    kwargs.setdefault("log_to_driver", False)
    if env:
        kwargs.setdefault("runtime_env", {"env_vars": env})
    if address is not None or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **kwargs)
        return
    kwargs.setdefault("include_dashboard", False)
    preset = "RAY_worker_niceness" in os.environ
    if not preset:
        os.environ["RAY_worker_niceness"] = str(max(0, os.getpriority(os.PRIO_PROCESS, 0)))
    try:
        ray.init(num_cpus=num_cpus, **kwargs)
    finally:
        if not preset:
            os.environ.pop("RAY_worker_niceness", None)


def _run_ray(todo: list[Job], store: Store, address: str | None, record, max_jobs: int | None) -> None:
    """Run ``todo`` as Ray tasks (the first ``max_jobs``); jobs another process is computing come back busy
    and are submitted again, waiting for that process."""
    import ray  # noqa: PLC0415 - optional dependency (the [ray] extra)

    started_here = False
    if not ray.is_initialized():
        start_ray(address=address)
        started_here = True
    try:
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        task = _ray_task()
        busy = _ray_round(todo[:max_jobs] if max_jobs is not None else todo, store, task, has_gpu, record, False)
        _ray_round(busy, store, task, has_gpu, record, True)
    finally:
        if started_here:
            ray.shutdown()


def _ray_round(jobs: list[Job], store: Store, task, has_gpu: bool, record, wait: bool) -> list[Job]:
    """Submit ``jobs`` as Ray tasks and record their outcomes as they finish; returns the jobs that came back
    busy (claimed by another process)."""
    import ray  # noqa: PLC0415 - optional dependency (the [ray] extra)

    pending, busy = {}, []
    for job in jobs:
        opts = {"num_cpus": job.resources.get("num_cpus", 1), "max_retries": 1}
        if has_gpu and job.resources.get("num_gpus", 0) > 0:
            opts["num_gpus"] = job.resources["num_gpus"]
        else:
            job.resources = {k: v for k, v in job.resources.items() if k != "num_gpus"}
        pending[task.options(**opts).remote(job, str(store.root), wait)] = job
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            job = pending.pop(ref)
            try:
                o = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - worker died (OOM-killed, node lost …)
                o = {"index": job.index, "key": job.key, "status": "failed",
                     "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            if o["status"] == "busy":
                busy.append(job)
            else:
                record(o)
    return busy


def _write_summary(store: Store, summary: SweepSummary) -> None:
    folder = store.root / "sweeps"
    folder.mkdir(exist_ok=True)
    path = folder / f"{check_name(summary.name, 'sweep name')}.last.json"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- benchmark

def benchmark(jobs: int = 6, n: int = 8, steps: int | None = None, workers=(1, 2), seed: int = 0,
              out: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Jobs per minute of a toy sweep (``toy/prior-fm`` × ``toy/shape-resnet@logits``, NDTM, ``toy-fast``
    preset: a fixed number of network calls per job, one fiber of ``n`` samples per job) with the local backend
    and with Ray on 1 and 2 workers.

    Each backend starts cold (models loaded inside the timed run, Ray workers import fiberbench in it),
    with a fresh store, one torch thread per job; the local backend runs first and again last (their
    spread is the noise of a shared machine; ratios are to their mean). Reports jobs/min, the ratio to
    local, the mean in-task job time and two Ray overheads per job, as seconds and as a fraction of a
    local job: ``overhead`` = ``(wall - sum of in-task times) / jobs`` (workers x wall for several),
    everything outside the tasks incl. the one-off worker start-up and idle workers at the end; and
    ``steady overhead`` = the median gap between consecutive tasks of one worker + the median delay
    until the driver holds a result (what every further job costs once workers are up).
    ``ray.init`` time is reported apart.
    """
    jobs, n = check_int("jobs", jobs, 1, MAX_REFERENCES), check_int("n", n, 1, MAX_N)
    steps = None if steps is None else check_int("steps", steps, 1, MAX_STEPS)
    seed = check_int("seed", seed, 0, 2 ** 63 - 1 - SWEEP_BENCH_SEED_BASE)
    if not isinstance(workers, (list, tuple)) or not workers:
        raise ConfigError(f"workers must be a non-empty list of worker counts, got {show(workers)}")
    workers = [check_int("workers", w, 1, 1024) for w in workers]
    import ray  # noqa: PLC0415 - optional dependency (the [ray] extra)

    cfg = {"name": "bench", "extractors": ["toy/shape-resnet@logits"], "priors": ["toy/prior-fm"],
           "methods": ["ndtm"], "preset": "toy-fast", "n": n, "seeds": [seed], "threads": 1,
           "references": [{"toy": {"n": jobs, "seed": SWEEP_BENCH_SEED_BASE + seed}}], "resources": {"num_cpus": 1}}
    if steps is not None:
        cfg["steps"] = steps
    base = Path(out or tempfile.mkdtemp(prefix="fiberbench-bench-"))
    res: dict[str, Any] = {"jobs": jobs, "n": n, "steps": steps or "preset", "cpus": os.cpu_count()}

    def timed(label: str, backend: str, num_cpus: int | None = None) -> dict[str, Any]:
        clear_model_cache()
        if num_cpus is not None:
            t_init = time.time()
            start_ray(num_cpus=num_cpus)
            init_s = time.time() - t_init
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        t_sweep = time.time()
        try:
            s = run_sweep(cfg, base / label, backend=backend, progress=progress)
        finally:
            torch.set_num_threads(old)
            if num_cpus is not None:
                ray.shutdown()
        if s.failed or s.done != jobs:
            raise RuntimeError(f"benchmark sweep {label} did not complete: {s}")
        r = _sweep_timings(s, jobs, t_sweep)
        if num_cpus is not None:
            r["ray_init_s"] = init_s
        return r

    res["local"] = timed("local", "local")
    for w in workers:
        res[f"ray{w}"] = timed(f"ray{w}", "ray", num_cpus=w)
    # local again at the end: on a shared machine the spread between the two local runs is the noise floor
    res["local_again"] = timed("local_again", "local")
    _compare_to_local(res, workers)
    _compare_tables(res, base, workers)
    return res


def _sweep_timings(s: SweepSummary, jobs: int, t_sweep: float) -> dict[str, Any]:
    """Throughput and overheads of a benchmark sweep that computed all its ``jobs`` (>= 1) and started at
    ``t_sweep`` (``time.time()``): seconds, jobs/min, the worker count (see :func:`benchmark`)."""
    task = [o["seconds"] for o in s.outcomes]
    first = sorted(s.outcomes, key=lambda o: o["started"])
    per_worker: dict[int, list] = {}
    for o in first:
        per_worker.setdefault(o["pid"], []).append(o)
    steady = [o["seconds"] for w in per_worker.values() for o in w[1:]]  # without each worker's model loads
    # steady-state per-job cost outside the task: gap between one task's end and the next one's start on
    # the same worker (dispatch, argument transfer), plus the delay until the driver holds the outcome
    gaps = [b["started"] - a["finished"] for w in per_worker.values() for a, b in zip(w, w[1:])]
    lag = [o["received"] - o["finished"] for o in s.outcomes]
    return {"wall_s": s.seconds, "jobs_per_min": 60 * jobs / s.seconds, "mean_task_s": sum(task) / len(task),
            "steady_task_s": sum(steady) / len(steady) if steady else float("nan"), "workers": len(per_worker),
            "overhead_per_job_s": (s.seconds * len(per_worker) - sum(task)) / jobs,
            "dispatch_gap_s": float(np.median(gaps)) if gaps else float("nan"),
            "result_lag_s": float(np.median(lag)),
            "first_start_s": min(o["started"] for o in s.outcomes) - t_sweep}


def _compare_to_local(res: dict[str, Any], workers: Sequence[int]) -> None:
    """Add ``ratio_to_local`` to every run and the overhead fractions to the Ray runs, relative to the mean
    of the two local runs (``res["local"]``, ``res["local_again"]``)."""
    base_rate = (res["local"]["jobs_per_min"] + res["local_again"]["jobs_per_min"]) / 2
    base_task = (res["local"]["mean_task_s"] + res["local_again"]["mean_task_s"]) / 2
    for k in ("local", "local_again"):
        res[k]["ratio_to_local"] = res[k]["jobs_per_min"] / base_rate
    for w in workers:
        r = res[f"ray{w}"]
        r["ratio_to_local"] = r["jobs_per_min"] / base_rate
        r["overhead_fraction"] = r["overhead_per_job_s"] / base_task
        r["steady_overhead_fraction"] = (r["dispatch_gap_s"] + r["result_lag_s"] / max(1, r["workers"])) / base_task


def _compare_tables(res: dict[str, Any], base: Path, workers: Sequence[int]) -> None:
    """Set ``same_table``: every backend's store under ``base`` must hold the same rows and distances."""
    local = Store(base / "local").query()
    res["local_again"]["same_table"] = bool(local.equals(Store(base / "local_again").query()))
    for w in workers:
        other = Store(base / f"ray{w}").query()
        res[f"ray{w}"]["same_table"] = bool(local[["store_key", "sample", "feature_distance"]].equals(
            other[["store_key", "sample", "feature_distance"]]))


def format_benchmark(res: dict[str, Any]) -> str:
    """A plain-text table of :func:`benchmark` results."""
    lines = [f"toy sweep: {res['jobs']} jobs, one fiber of n={res['n']} each (steps={res['steps']}), "
             f"{res['cpus']} CPUs",
             f"{'backend':<11} {'wkrs':>4} {'jobs/min':>9} {'vs local':>9} {'task s':>8} {'steady s':>9} "
             f"{'overhead/job s':>15} {'overhead %':>11} {'steady ovh %':>12} {'same table':>10}"]
    for k, r in res.items():
        if not isinstance(r, dict):
            continue
        ratio = r.get("ratio_to_local", 1.0)
        frac, sfrac = r.get("overhead_fraction"), r.get("steady_overhead_fraction")
        lines.append(f"{k:<11} {r['workers']:>4} {r['jobs_per_min']:>9.2f} {ratio:>9.2f} {r['mean_task_s']:>8.2f} "
                     f"{r['steady_task_s']:>9.2f} {r['overhead_per_job_s']:>15.3f} "
                     f"{'' if frac is None else f'{100 * frac:.1f}':>11} "
                     f"{'' if sfrac is None else f'{100 * sfrac:.2f}':>12} {str(r.get('same_table', '')):>10}")
    for k, r in res.items():
        if isinstance(r, dict) and "ray_init_s" in r:
            lines.append(f"{k}: ray.init {r['ray_init_s']:.1f} s (not counted above); first task started "
                         f"{r['first_start_s']:.1f} s after the sweep began; "
                         f"dispatch gap {r['dispatch_gap_s'] * 1e3:.0f} ms, "
                         f"result lag {r['result_lag_s'] * 1e3:.0f} ms per job (medians)")
    return "\n".join(lines)
