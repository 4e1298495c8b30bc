"""The local Hugging Face hub cache: where hub weights are, and one clear error when they are not.

Every hub-backed model source (timm, open_clip, transformers, diffusers) reads weights from the local
cache or a folder. When they are missing (no network, not pre-downloaded) the user gets one
:class:`~fiberbench.errors.ConfigError` naming the spec, the cache folder and the download command.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from huggingface_hub import constants, try_to_load_from_cache

from ..errors import ConfigError
from ..identity import dir_sha256, file_sha256

# weight files of hub repos, in the order a checksum prefers them
HUB_WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                    "pytorch_model.bin", "diffusion_pytorch_model.safetensors")


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The Hugging Face hub cache folder in use (``cache_dir`` if given, else ``$HF_HUB_CACHE``)."""
    if cache_dir is not None:
        return str(cache_dir)
    return str(constants.HF_HUB_CACHE)


HUB_ERROR_NAMES = ("LocalEntryNotFoundError", "EntryNotFoundError", "RepositoryNotFoundError",
                    "RevisionNotFoundError", "OfflineModeIsEnabled", "HfHubHTTPError", "GatedRepoError",
                    "ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "Timeout")
HUB_ERROR_WORDS = ("local cache", "cached", "couldn't connect", "could not connect", "offline",
                    "failed to download", "does not appear to have", "not found on the hub", "connection",
                    "no such file", "not a local folder", "is not a valid model identifier", "snapshot")


def is_missing_weights(err: BaseException) -> bool:
    """True when ``err`` (or an exception it was raised from) says the weights are not available locally."""
    seen = 0
    e: BaseException | None = err
    while e is not None and seen < 8:
        if type(e).__name__ in HUB_ERROR_NAMES or any(type(c).__name__ in HUB_ERROR_NAMES for c in type(e).__mro__):
            return True
        msg = str(e).lower()
        if isinstance(e, (OSError, RuntimeError, ValueError)) and any(w in msg for w in HUB_ERROR_WORDS):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def weights_unavailable(spec: str, repo: str, err: BaseException, cache_dir=None) -> ConfigError:
    """One readable error for weights that are neither in a folder nor in the local hub cache."""
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    return ConfigError(
        f"cannot load {spec}: the weights of {repo!r} are not in the local Hugging Face cache "
        f"({hub_cache_dir(cache_dir)}){' and HF_HUB_OFFLINE is set' if offline else ' and the hub is unreachable'}. "
        f"Pre-download them on a machine with network: `hf download {repo}` (huggingface_hub < 1.0: "
        f"`huggingface-cli download {repo}`), copy the cache folder here (or set HF_HUB_CACHE / pass cache_dir=), "
        f"or pass a local folder instead of the hub id. [{type(err).__name__}: {first}]")


def cached_hub_file(repo: str, names: Iterable[str]) -> Path | None:
    """The first of ``names`` that ``repo`` has in the local hub cache, or ``None`` (never downloads)."""
    for name in names:
        try:
            hit = try_to_load_from_cache(repo, name)
        except Exception:  # noqa: BLE001 - malformed repo ids are simply not cached
            return None
        if isinstance(hit, str) and os.path.exists(hit):
            return Path(hit)
    return None


def local_or_cached_checksum(name: str, hub_names: Sequence[str]) -> str | None:
    """Checksum of a local folder / file ``name``, else of the first of ``hub_names`` in the hub cache."""
    local = Path(name).expanduser()
    if local.is_dir():
        return "sha256:" + dir_sha256(local)
    if local.is_file():
        return "sha256:" + file_sha256(local)
    hit = cached_hub_file(name, hub_names)
    return "sha256:" + file_sha256(hit) if hit else None
