"""A results folder of fiber runs: tidy parquet tables + safetensors tensors, keyed by a content hash.

Layout of a store rooted at ``root``::

    root/STORE.json                 format marker
    root/runs/<key>/samples.parquet one row per sample (FiberResult.to_frame() + score / sweep columns)
    root/runs/<key>/tensors.safetensors images [M,3,H,W], reference [B,3,H,W], distances, features, history …
    root/runs/<key>/meta.json       run config, result config, status, and the sha256 of the two files above
    root/.tmp/                      runs being written (never read)
    root/.corrupt/                  runs that failed verification (kept for inspection, never read)
    root/.claims/<key>.lock         a run being computed: the owner's pid, host and a token (see Store.claim)

``key`` is a content hash of the *full run config* (:func:`run_config`): spec strings, the checksums of
the weight files behind them, method, resolved hyper-parameters, n, steps, seed, loss, init, the hash of
the reference pixels and the fiberbench version. Anything that changes the samples changes the key; batch
size, device and progress bars do not (samples are batch-independent by construction).

A run is written into ``.tmp/`` and then moved into ``runs/`` with one ``os.rename`` of its directory, so a
crash mid-write leaves nothing half-written visible. On read, ``meta.json`` must parse and both data files
must match the sizes and sha256 recorded in it; a run that does not is moved to ``.corrupt/`` and reported
as missing, so a sweep recomputes it instead of silently dropping it.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..checks import MAX_N, MAX_STEPS, check_int, check_seed, show
from ..errors import ConfigError, InputError, close_matches
from ..identity import content_key, sha256_hex, tensor_hash
from ..io import as_image_batch
from ..models import canonical_spec, check_spec, weights_checksum
from ..sampling import FiberResult, resolve_settings, sample_fiber
from ..version import __version__

FORMAT = 1
CLAIM_HEARTBEAT_SECONDS = 10.0  # a claim's owner refreshes its lock file this often while it computes
CLAIM_STALE_SECONDS = 1800.0  # a claim of another host with no heartbeat for this long is taken over
KEY_RE = re.compile(r"^[0-9a-f]{32}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TENSOR_FIELDS = ("images", "reference", "feature_distance", "cosine", "loss_history", "trajectory", "features",
                 "reference_features", "latents")
# keyword arguments of sample_fiber that never change the samples (excluded from the key)
NON_CONTENT_KWARGS = ("callback", "progress", "batch_size", "return_trajectory")


# --------------------------------------------------------------------------- run configs

def reference_hash(reference) -> str:
    """Hash (hex, 32 chars) of the reference pixels as ``[B,3,H,W]`` float32 in [0,1]."""
    return tensor_hash(as_image_batch(reference, name="reference"), 32)


def _canon(v: Any) -> Any:
    """JSON-stable form of a hyper-parameter value (tuples -> lists, ints -> floats, never bools)."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _canon(x) for k, x in sorted(v.items())}
    return str(v)


def run_config(prior: Any, extractor: Any, reference, *, n: int = 16, method: str = "ndtm",
               steps: int | None = None, seed: int = 0, loss: str | None = None, init="noise",
               preset: str | None = None, reference_ids: Iterable[str] | None = None, dtype=None,
               checksums: Mapping[str, str | None] | None = None, spec_checked: bool = False,
               **hyperparameters) -> dict[str, Any]:
    """The full content-defining config of a :func:`~fiberbench.sampling.sample_fiber` call, with its ``key``.

    Spec strings are checked as :func:`~fiberbench.models.check_spec` checks them, unless ``spec_checked`` says
    the caller did (a sweep checks each spec once, not once per job).

    ``prior`` / ``extractor`` are spec strings or loaded models (their ``.spec`` is used; weights are
    checksummed from the files behind the spec, or taken from ``checksums={"prior": …, "extractor": …}``
    when an in-memory model differs from its files). Defaults, the preset and the overrides are resolved
    exactly as ``sample_fiber`` resolves them, so equal runs get equal keys however they were spelled.
    Keyword arguments that never change samples (``callback``, ``progress``, ``batch_size``) are ignored.

    Returns a JSON-serialisable dict; ``config["key"]`` is 32 hex characters.
    """
    for k in NON_CONTENT_KWARGS:
        hyperparameters.pop(k, None)
    pspec = prior if isinstance(prior, str) else getattr(prior, "spec", None)
    espec = extractor if isinstance(extractor, str) else getattr(extractor, "spec", None)
    if not isinstance(pspec, str) or not isinstance(espec, str) or "?" in (pspec, espec):
        raise ConfigError("run_config needs spec strings (or models loaded from one, with a .spec); "
                          f"got prior={show(prior, 60)}, extractor={show(extractor, 60)}")
    for spec, kind in ((pspec, "prior"), (espec, "extractor")):
        if not spec_checked and isinstance(prior if kind == "prior" else extractor, str):  # models: used as they are
            check_spec(spec, kind)
    pspec, espec = canonical_spec(pspec, "prior"), canonical_spec(espec, "extractor")
    n = check_int("n", n, 1, MAX_N)
    seed = check_seed("seed", seed)
    hp, run, provenance = resolve_settings(method, preset, hyperparameters, prior)
    steps = check_int("steps", steps if steps is not None else run.get("steps", 50), 1, MAX_STEPS)
    loss = loss or run.get("loss", "cosine")
    checksums = dict(checksums or {})
    weights = {"prior": checksums["prior"] if "prior" in checksums else weights_checksum(pspec),
               "extractor": checksums["extractor"] if "extractor" in checksums else weights_checksum(espec)}
    ids = [str(i) for i in reference_ids] if reference_ids is not None else None
    cfg = {
        "prior": pspec, "extractor": espec, "weights": weights, "method": method, "n": n, "steps": int(steps),
        "seed": int(seed), "loss": loss, "init": _canon(list(init)) if isinstance(init, (tuple, list)) else init,
        "preset": provenance["preset"], "hyperparameters": _canon(hp), "overrides": _canon(hyperparameters),
        "reference_hash": reference_hash(reference), "reference_ids": ids,
        "dtype": str(dtype) if dtype is not None else None, "fiberbench": __version__,
    }
    cfg["key"] = config_key(cfg)
    return cfg


def config_key(config: Mapping[str, Any]) -> str:
    """The 32-hex content hash of a :func:`run_config` dict.

    ``key``, ``preset`` and ``overrides`` are left out: the resolved hyper-parameters, steps and loss
    already say everything a preset or an override changes.
    """
    return content_key({k: v for k, v in config.items() if k not in ("key", "preset", "overrides")}, 32)


def check_key(key: Any) -> str:
    """``key`` if it is 32 lowercase hex characters; ``ConfigError`` otherwise (no path can be smuggled in)."""
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ConfigError(f"invalid store key {show(key)}: expected 32 lowercase hex characters")
    return key


def check_name(name: Any, what: str = "name") -> str:
    """A safe file-name component (letters, digits, ``._-``; no separators, no ``..``) or ``ConfigError``."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ConfigError(f"invalid {what} {show(name, typed=False)}: use letters, digits, '.', '_' and '-' only "
                          f"(no path separators or '..'), at most 128 characters")
    return name


# --------------------------------------------------------------------------- the store

def meta_checksum(meta: Mapping[str, Any]) -> str:
    """sha256 of a run's ``meta.json`` content (without its own checksum field), in a canonical JSON form."""
    return sha256_hex(json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=True).encode())


def sealed_meta(meta: Mapping[str, Any]) -> bytes:
    """The bytes of ``meta.json``: ``meta`` as JSON (non-JSON values as strings) with ``meta_sha256``, the checksum
    of that JSON's content, so an edit that keeps the JSON valid is still detected on read."""
    plain = json.loads(json.dumps(meta, default=str))  # the form a reader gets back (tuples -> lists, str keys)
    return json.dumps(dict(plain, meta_sha256=meta_checksum(plain))).encode()


def file_stamp(path: Path) -> tuple[int, int, int, int]:
    """``(size, mtime_ns, ctime_ns, inode)`` of a file: any write, rename or ``utime`` changes one of them (the
    ctime is set by the kernel on every change and cannot be set back by a user)."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Claim:
    """This process's claim of one run: the lock file ``<store>/.claims/<key>.lock`` (see :meth:`Store.claim`).

    While held, a thread refreshes the file's mtime every :data:`CLAIM_HEARTBEAT_SECONDS` (the heartbeat another
    host goes by); :meth:`release` stops it and removes the file if it is still this claim's.
    """

    path: Path
    token: str
    stop: threading.Event = field(default_factory=threading.Event)

    def start_heartbeat(self) -> None:
        """Refresh the lock's mtime in a daemon thread until :meth:`release`."""
        def beat() -> None:
            while not self.stop.wait(CLAIM_HEARTBEAT_SECONDS):
                try:
                    os.utime(self.path)
                except OSError:
                    return
        threading.Thread(target=beat, name=f"fiberbench-claim-{self.path.stem[:8]}", daemon=True).start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file, unless another process has taken it over meanwhile."""
        self.stop.set()
        if (read_claim(self.path) or {}).get("token") == self.token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_claim(path: Path) -> dict[str, Any] | None:
    """The owner record of a lock file (``{pid, host, token, started}``), or ``None`` if it is gone or unreadable."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def claim_is_stale(info: dict[str, Any] | None, age: float) -> bool:
    """Whether a lock whose owner record is ``info`` and whose heartbeat is ``age`` seconds old is abandoned:
    its owner on this host is no longer running, or another host's owner stopped beating."""
    if info is None:  # never written in full (locks are created whole, so only by damage): give it a minute
        return age > 60
    if info.get("host") == socket.gethostname():
        pid = info.get("pid")
        return not (isinstance(pid, int) and _pid_alive(pid))
    return age > CLAIM_STALE_SECONDS


class CorruptRun(InputError):
    """A stored run failed verification (missing file, size or checksum mismatch, unreadable)."""


class Store:
    """A folder of fiber runs (see the module docstring for the layout).

    ``Store(root)`` creates the folder if needed. Safe for several processes (and Ray workers on a
    shared filesystem) writing at once: runs are committed by renaming a finished directory.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"store path {self.root} exists and is not a folder")
        marker = self.root / "STORE.json"
        ours = {"runs", ".tmp", ".corrupt", ".claims", "sweeps", "STORE.json"}  # a store another process is creating
        if self.root.exists() and not marker.exists() and any(
                p.name not in ours and not p.name.startswith(".STORE.json.") for p in self.root.iterdir()):
            raise ConfigError(f"{self.root} is a non-empty folder that is not a fiberbench store; "
                              f"choose an empty or new folder")
        for sub in ("runs", ".tmp", ".corrupt", ".claims"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            tmp = self.root / f".STORE.json.{uuid.uuid4().hex}"
            tmp.write_text(json.dumps({"format": FORMAT, "kind": "fiberbench-store"}) + "\n")
            os.replace(tmp, marker)
        self._verified: dict[str, tuple] = {}
        self._clean_stale_tmp()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---- paths
    def run_dir(self, key: str) -> Path:
        return self.root / "runs" / check_key(key)

    def keys(self) -> list[str]:
        """Keys of the committed runs (not yet verified), sorted."""
        return sorted(p.name for p in (self.root / "runs").iterdir() if KEY_RE.match(p.name))

    def _clean_stale_tmp(self) -> None:
        """Remove temp dirs of writers on this host whose process is gone (killed mid-write), and claim temp
        files over an hour old (a claimant killed between writing and linking one)."""
        host = socket.gethostname()
        for p in (self.root / ".tmp").iterdir():
            parts = p.name.split(".")
            if len(parts) >= 4 and parts[1] == host and parts[2].isdigit() and not _pid_alive(int(parts[2])):
                shutil.rmtree(p, ignore_errors=True)
        for p in (self.root / ".claims").glob(".*"):
            try:
                if time.time() - p.stat().st_mtime > 3600:
                    p.unlink()
            except OSError:
                pass

    # ---- claims
    def claim(self, key: str) -> Claim | None:
        """Claim the computation of run ``key`` for this process, or ``None`` if another live process holds it.

        The claim is a lock file ``.claims/<key>.lock`` holding this process's pid, host and a fresh token,
        created whole in one step (a hard link of a finished temp file), so two processes never both hold
        it. A stale claim (:func:`claim_is_stale`: a dead pid on this host, or another host silent for
        :data:`CLAIM_STALE_SECONDS`) is taken over: renamed aside, checked to be the stale one, removed. The
        heartbeat starts at once; release the claim with :meth:`Claim.release` (or use it in a ``with``).
        """
        lock = self.root / ".claims" / f"{check_key(key)}.lock"
        token = uuid.uuid4().hex
        tmp = lock.with_name(f".{lock.name}.{token}")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": token,
                                   "started": time.time()}))
        try:
            for _ in range(5):
                try:
                    os.link(tmp, lock)
                except FileExistsError:
                    if not self._take_over(lock):
                        return None
                    continue
                claim = Claim(lock, token)
                claim.start_heartbeat()
                return claim
            return None
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, lock: Path) -> bool:
        """Remove ``lock`` if it is stale (True: try to create it again); False while a live owner holds it."""
        info = read_claim(lock)
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile
        if not claim_is_stale(info, age):
            return False
        aside = lock.with_name(f".{lock.name}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            return True  # another process took it over first
        moved = read_claim(aside)
        if (moved or {}).get("token") != (info or {}).get("token"):
            # a fresh claim replaced the stale one between our read and the rename: put it back
            try:
                os.link(aside, lock)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def claim_owner(self, key: str) -> dict[str, Any] | None:
        """The owner record of run ``key``'s claim (``{pid, host, token, started}``), or ``None`` if unclaimed."""
        return read_claim(self.root / ".claims" / f"{check_key(key)}.lock")

    # ---- writing
    def put(self, result, config: Mapping[str, Any] | None = None, *, key: str | None = None,
            extra: Mapping[str, Any] | pd.DataFrame | None = None) -> str:
        """Store a :class:`~fiberbench.sampling.FiberResult`; returns its key.

        ``config``: the :func:`run_config` the result was computed from (gives the key). Without it, ``key``
        must be given, or the key is derived from ``result.config`` (spec strings, hyper-parameters, seed,
        reference pixels and the weights behind the specs). ``extra``: columns added to every row (a mapping
        of scalars) or row-aligned (a frame with one row per sample), e.g. score or sweep columns; a
        ``result.scores`` frame, if present, is added too. Writing a key that already exists and verifies
        is a no-op (the first writer wins; runs are deterministic).
        """
        if config is None and key is None:
            config = config_from_result(result)
        key = check_key(key if key is not None else (config.get("key") or config_key(config)))
        frame = result.to_frame()
        m = len(frame)
        frame.insert(0, "store_key", key)
        for source in (getattr(result, "scores", None), extra):
            if source is None:
                continue
            add = source if isinstance(source, pd.DataFrame) else pd.DataFrame({k: [v] * m for k, v in source.items()})
            if len(add) != m:
                raise InputError(f"extra columns have {len(add)} rows for {m} samples")
            clash = sorted(set(add.columns) & set(frame.columns))
            if clash:
                raise ConfigError(f"extra columns {clash} clash with the result's own columns")
            frame = pd.concat([frame.reset_index(drop=True), add.reset_index(drop=True)], axis=1)
        tensors = {}
        for name in TENSOR_FIELDS:
            t = getattr(result, name, None)
            if isinstance(t, torch.Tensor):
                tensors[name] = t.detach().cpu().contiguous()
        meta = {"format": FORMAT, "key": key, "run_config": dict(config) if config is not None else None,
                "result_config": result.config, "status": list(result.status),
                "reference_ids": list(result.reference_ids) if result.reference_ids is not None else None,
                "rows": m}
        return self._commit(key, frame, tensors, meta)

    def _commit(self, key: str, frame: pd.DataFrame, tensors: dict[str, torch.Tensor], meta: dict) -> str:
        final = self.run_dir(key)
        if final.exists() and self._verify(key, deep=False):
            return key
        tmp = self.root / ".tmp" / f"{key}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            buf = io.BytesIO()
            frame.to_parquet(buf, index=False)
            files = {"samples.parquet": buf.getvalue(), "tensors.safetensors": st_save(tensors)}
            meta = dict(meta, files={name: {"bytes": len(b), "sha256": sha256_hex(b)}
                                     for name, b in files.items()})
            for name, b in files.items():
                _fsync_write(tmp / name, b)
            _fsync_write(tmp / "meta.json", sealed_meta(meta))
            for _ in range(3):
                try:
                    os.rename(tmp, final)
                    return key
                except OSError:
                    # someone else committed this key meanwhile: keep theirs if it verifies
                    if self._verify(key, deep=False):
                        return key
                    self._quarantine(key, "replaced by a fresh write")
            raise OSError(f"could not commit run {key} into {final}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # ---- reading
    def _read_meta(self, key: str) -> dict:
        d = self.run_dir(key)
        try:
            meta = json.loads((d / "meta.json").read_text())
            files = meta["files"]
            assert meta["key"] == key and set(files) == {"samples.parquet", "tensors.safetensors"}
            want = meta.pop("meta_sha256")
        except (OSError, ValueError, KeyError, AssertionError, TypeError, AttributeError) as e:
            raise CorruptRun(f"run {key}: meta.json missing or unreadable ({type(e).__name__})") from None
        if want != meta_checksum(meta):
            raise CorruptRun(f"run {key}: meta.json does not match its own recorded sha256 (edited or corrupted)")
        return meta

    def _check_file(self, key: str, meta: dict, name: str) -> bytes:
        path = self.run_dir(key) / name
        try:
            data = path.read_bytes()
        except OSError:
            raise CorruptRun(f"run {key}: {name} is missing") from None
        want = meta["files"][name]
        if len(data) != want["bytes"]:
            raise CorruptRun(f"run {key}: {name} has {len(data)} bytes, {want['bytes']} were written (truncated?)")
        if sha256_hex(data) != want["sha256"]:
            raise CorruptRun(f"run {key}: {name} does not match its recorded sha256 (corrupted)")
        return data

    def _verify(self, key: str, deep: bool = True) -> bool:
        """True if the run exists and all its files check out; a corrupt run is quarantined (False)."""
        d = self.run_dir(key)
        if not d.exists():
            return False
        try:
            st = tuple((p.name, *file_stamp(p)) for p in sorted(d.iterdir()))
        except OSError:
            return False
        if self._verified.get(key) == st:  # unchanged since verified: ctime moves on every write, and cannot be set
            return True
        try:
            meta = self._read_meta(key)
            for name in meta["files"]:
                self._check_file(key, meta, name)
        except CorruptRun as e:
            self._quarantine(key, str(e))
            return False
        self._verified[key] = st
        return True

    def _quarantine(self, key: str, reason: str) -> None:
        d = self.run_dir(key)
        dest = self.root / ".corrupt" / f"{key}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(d, dest)
            (dest / "REASON.txt").write_text(reason + "\n")
        except OSError:
            return  # already moved by another reader
        self._verified.pop(key, None)
        warnings.warn(f"fiberbench store {self.root}: {reason}; moved to {dest.name} in .corrupt/ "
                      f"(the run will be recomputed)", stacklevel=3)

    def has(self, key_or_config: str | Mapping[str, Any]) -> bool:
        """True if a verified run exists for this key or :func:`run_config` dict."""
        return self._verify(self._key_of(key_or_config))

    def __contains__(self, key_or_config) -> bool:
        return self.has(key_or_config)

    def __len__(self) -> int:
        return len(self.keys())

    @staticmethod
    def _key_of(key_or_config) -> str:
        if isinstance(key_or_config, str):
            return check_key(key_or_config)
        if isinstance(key_or_config, Mapping):
            return check_key(key_or_config.get("key") or config_key(key_or_config))
        raise ConfigError(f"invalid store key {show(key_or_config)}: expected a 32-hex key or a run_config dict")

    def get(self, key_or_config: str | Mapping[str, Any]):
        """The stored :class:`~fiberbench.sampling.FiberResult` for a key / :func:`run_config`, or ``None``.

        Everything is rebuilt from disk: images ``[B*n,3,H,W]`` in [0,1], reference, distances, features,
        loss history, status, config (plus ``config["store_key"]``). A run that fails verification is
        quarantined and ``None`` is returned, so the caller recomputes it.
        """
        key = self._key_of(key_or_config)
        if not self.run_dir(key).exists():
            return None
        try:
            meta = self._read_meta(key)
            self._check_file(key, meta, "samples.parquet")
            tensors = st_load(self._check_file(key, meta, "tensors.safetensors"))
        except CorruptRun as e:
            self._quarantine(key, str(e))
            return None
        config = dict(meta["result_config"], store_key=key)
        return FiberResult(images=tensors["images"], reference=tensors["reference"],
                           feature_distance=tensors["feature_distance"], cosine=tensors["cosine"],
                           status=list(meta["status"]), config=config,
                           loss_history=tensors.get("loss_history"), trajectory=tensors.get("trajectory"),
                           reference_ids=meta["reference_ids"], features=tensors.get("features"),
                           reference_features=tensors.get("reference_features"), latents=tensors.get("latents"))

    def frame(self, key_or_config) -> pd.DataFrame | None:
        """The stored table of one run (``None`` if missing or corrupt)."""
        key = self._key_of(key_or_config)
        if not self.run_dir(key).exists():
            return None
        try:
            meta = self._read_meta(key)
            return pd.read_parquet(io.BytesIO(self._check_file(key, meta, "samples.parquet")))
        except CorruptRun as e:
            self._quarantine(key, str(e))
            return None

    def run_config(self, key: str) -> dict | None:
        """The :func:`run_config` a run was stored with (``None`` if it was stored without one)."""
        try:
            return self._read_meta(check_key(key)).get("run_config")
        except CorruptRun:
            return None

    def query(self, columns: Iterable[str] | None = None, **filters) -> pd.DataFrame:
        """One tidy frame across all runs (one row per sample), sorted by key, reference, sample.

        ``filters``: ``column=value`` keeps rows equal to value; ``column=[v1, v2]`` rows in the list;
        ``column=callable`` rows where ``callable(series)`` is true. ``columns`` selects columns
        (``store_key`` is always kept). Corrupt runs are quarantined with a warning and left out.
        """
        frames = []
        for key in self.keys():
            df = self.frame(key)
            if df is not None:
                frames.append(df)
        if not frames:
            return pd.DataFrame(columns=["store_key"])
        df = pd.concat(frames, ignore_index=True, sort=False)
        for col, want in filters.items():
            if col not in df.columns:
                hint = close_matches(col, df.columns)
                raise ConfigError(f"no column {col!r} in the store" + (f"; did you mean {hint}?" if hint else ""))
            if callable(want):
                mask = want(df[col])
            elif isinstance(want, (list, tuple, set)):
                mask = df[col].isin(list(want))
            else:
                mask = df[col] == want
            df = df[mask]
        df = df.sort_values(["store_key", "reference", "sample"], kind="stable").reset_index(drop=True)
        if columns is not None:
            cols = ["store_key"] + [c for c in columns if c != "store_key"]
            missing = [c for c in cols if c not in df.columns]
            if missing:
                raise ConfigError(f"no column(s) {missing} in the store")
            df = df[cols]
        return df

    def corrupt(self) -> list[str]:
        """Names of the quarantined runs in ``.corrupt/``."""
        return sorted(p.name for p in (self.root / ".corrupt").iterdir())


def config_from_result(result) -> dict[str, Any]:
    """A :func:`run_config` rebuilt from a FiberResult's own config (weights checksummed from the specs)."""
    c = result.config
    return run_config(c["prior"], c["extractor"], result.reference, n=c["n"], method=c["method"],
                      steps=c["steps"], seed=c["seed"], loss=c["loss"], init=c["init"], preset=None,
                      reference_ids=result.reference_ids, dtype=c.get("dtype"), **c["hyperparameters"])


def cached_sample_fiber(store: Store | str | Path | None, prior, extractor, reference, **kwargs):
    """:func:`~fiberbench.sampling.sample_fiber` through a store: return the stored result if this exact
    run (same specs, weights, hyper-parameters, seed, reference pixels, version) was computed before,
    else compute it, store it and return it. ``store=None`` just calls ``sample_fiber``.

    ``prior`` / ``extractor``: spec strings or loaded models (loaded models are reused as given; their
    spec's weight files are checksummed). ``result.config["from_store"]`` says whether it was a hit.
    """
    if store is None:
        return sample_fiber(prior, extractor, reference, **kwargs)
    store = store if isinstance(store, Store) else Store(store)
    content = {k: v for k, v in kwargs.items() if k not in NON_CONTENT_KWARGS}
    checksums = content.pop("checksums", None)
    kwargs.pop("checksums", None)
    cfg = run_config(prior, extractor, reference, checksums=checksums, **content)
    hit = store.get(cfg)
    if hit is not None:
        hit.config["from_store"] = True
        return hit
    result = sample_fiber(prior, extractor, reference, **kwargs)
    store.put(result, cfg)
    result.config["store_key"] = cfg["key"]
    result.config["from_store"] = False
    return result
