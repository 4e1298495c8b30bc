"""Fiber samplers: draw images ``x`` with ``f(x) ~ f(x_ref)`` under a pretrained prior.

Every method is a plain function of one signature (as in k-diffusion), registered with its defaults and
capabilities (:mod:`.base`)::

    x0 = sample_<method>(problem, x, sched, callback=None, disable=None, **hp)

- ``ndtm``: Non-linear Diffusion Trajectory Matching with the fiber loss as terminal cost
  (Pandey et al. 2025; Rousselot et al. 2026);
- ``dps``: one gradient step of the fiber loss w.r.t. x_t through x0_hat per step (Chung et al. 2023);
- ``metamer``: gradient descent on pixels from noise, no prior (Feather et al. 2023);
- ``unguided``: plain sampling from the prior.

:func:`sample_fiber` is the public entry point: it validates the request, builds targets and per-sample
generators, batches, recovers from faults and returns a :class:`FiberResult`.
"""
from collections.abc import Mapping
from typing import Any, Iterator

# isort: off
# registration; this order is the order of METHODS (the default method first)
from . import ndtm, dps, metamer, unguided  # noqa: F401
# isort: on
from .base import HP_RULES, SAMPLERS, Sampler, get_sampler, register_sampler
from .batching import is_oom, map_chunks, run_in_chunks
from .dps import DPS_DEFAULTS, sample_dps
from .hyperparams import (
    NO_PRESET,
    PRESETS,
    PresetStepsWarning,
    check_hyperparameter,
    check_preset_steps,
    guidance_budget,
    resolve_hyperparameters,
    resolve_settings,
)
from .metamer import METAMER_DEFAULTS, sample_metamer
from .ndtm import NDTM_DEFAULTS, sample_ndtm
from .optim import RowAdam
from .problem import LOSSES, MAX_HALVINGS, FiberProblem, NoiseSource, fiber_distance, finite_rows, gamma_at
from .result import FiberResult, run_id, run_versions
from .run import sample_fiber
from .unguided import UNGUIDED_DEFAULTS, sample_unguided

# the training-free methods (the registry may also hold trained baselines, e.g. "conditional")
METHODS = tuple(name for name, s in SAMPLERS.items() if not s.trained)


class _Defaults(Mapping):
    """``{method: its default hyper-parameters}`` for every registered sampler, read live from the registry."""

    def __getitem__(self, name: str) -> dict[str, Any]:
        return dict(SAMPLERS[name].defaults)

    def __iter__(self) -> Iterator[str]:
        return iter(SAMPLERS)

    def __len__(self) -> int:
        return len(SAMPLERS)


DEFAULTS: Mapping[str, dict[str, Any]] = _Defaults()

__all__ = ["check_hyperparameter", "DEFAULTS", "DPS_DEFAULTS", "fiber_distance", "FiberProblem",
           "FiberResult", "finite_rows", "gamma_at", "get_sampler", "HP_RULES", "is_oom", "LOSSES",
           "map_chunks", "MAX_HALVINGS", "METAMER_DEFAULTS", "METHODS", "NDTM_DEFAULTS", "NO_PRESET",
           "NoiseSource", "PRESETS", "PresetStepsWarning", "check_preset_steps", "guidance_budget",
           "register_sampler", "resolve_hyperparameters", "resolve_settings",
           "RowAdam", "run_id", "run_in_chunks", "run_versions", "sample_dps", "sample_fiber",
           "sample_metamer", "sample_ndtm", "sample_unguided", "Sampler", "SAMPLERS", "UNGUIDED_DEFAULTS"]
