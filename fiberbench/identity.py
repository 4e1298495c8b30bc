"""Content hashes: files, folders, tensors and JSON-able configs.

Every hash fiberbench records goes through here: the weights behind a model spec, the pixels of a
reference, the identity of a run. Configs are hashed as canonical JSON (sorted keys, compact separators,
``str`` for anything JSON lacks), so equal content gives equal keys however a dict was built.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def sha256_hex(data: bytes) -> str:
    """sha256 of ``data`` as 64 hex characters."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes; cached per process by (path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    ident = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if ident in _FILE_HASHES:
            return _FILE_HASHES[ident]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _HASH_LOCK:
        _FILE_HASHES[ident] = digest
    return digest


def dir_sha256(folder: Path) -> str:
    """sha256 over (relative path, file sha256) of every non-hidden file below ``folder``."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise ConfigError(f"model folder {folder} holds no files")
    for p in files:
        h.update(str(p.relative_to(folder)).encode() + b"\0" + file_sha256(p).encode() + b"\n")
    return h.hexdigest()


def tensor_hash(t: torch.Tensor, length: int = 32) -> str:
    """Hex hash (``length`` characters) of a tensor's float32 values and its shape."""
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
    return sha256_hex(arr.tobytes() + str(tuple(arr.shape)).encode())[:length]


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and compact separators; values JSON lacks become ``str``."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_key(obj: Any, length: int = 32) -> str:
    """Hex hash (``length`` characters) of ``obj``'s canonical JSON."""
    return sha256_hex(canonical_json(obj).encode())[:length]
