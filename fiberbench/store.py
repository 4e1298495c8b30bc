"""The content-keyed results store, at its public import path (code: :mod:`fiberbench.runs.store`)."""
from .identity import (
    file_sha256,
)
from .models import (
    canonical_spec,
    weights_checksum,
)
from .runs.store import (
    FORMAT,
    KEY_RE,
    NAME_RE,
    NON_CONTENT_KWARGS,
    TENSOR_FIELDS,
    CorruptRun,
    Store,
    cached_sample_fiber,
    check_key,
    check_name,
    config_from_result,
    config_key,
    reference_hash,
    run_config,
)

__all__ = ["cached_sample_fiber", "canonical_spec", "check_key", "check_name", "config_from_result",
           "config_key", "CorruptRun", "file_sha256", "FORMAT", "KEY_RE", "NAME_RE", "NON_CONTENT_KWARGS",
           "reference_hash", "run_config", "Store", "TENSOR_FIELDS", "weights_checksum"]
