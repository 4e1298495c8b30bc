"""The sampler registry: every fiber method is one function of one signature, plus what it can do.

::

    x0 = fn(problem, x, sched, callback=None, disable=None, **hp)

``problem`` (:class:`~fiberbench.sampling.problem.FiberProblem`) holds the prior, the fiber loss and the
per-sample noise; ``x`` is the starting state ``[M,C,H,W]`` in the prior's space; ``sched`` the prior's
:class:`~fiberbench.models.prior.Schedule`; the result is x0 in the prior's space (``[M,3,H,W]`` images
in [0,1] for a method with ``pixel_space``). A method registers itself with :func:`register_sampler`,
naming its default hyper-parameters and its capabilities, so :func:`~fiberbench.sampling.sample_fiber`
never branches on a method's name (as captum's attribution methods declare theirs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from tqdm.auto import trange

from ..checks import show
from ..errors import ConfigError, close_matches

SamplerFn = Callable[..., torch.Tensor]

# What every hyper-parameter accepts; resolve_hyperparameters checks each value against its rule (a test
# asserts every registered default has one). Bools are not numbers, numbers must be finite, counts must be
# integers (4.0 is refused: ``range(4.0)`` would fail deep inside the sampler), strings one of the choices.
# Upper bounds on counts catch typos such as inner_steps=40000 before hours of compute.
HP_RULES: dict[str, dict[str, Any]] = {
    "inner_steps": dict(kind="int", lo=0, hi=1000),
    "iters": dict(kind="int", lo=1, hi=1_000_000),
    "lr": dict(kind="real", lo=0.0),
    "scale": dict(kind="real", lo=0.0),
    "w_ctrl": dict(kind="real", lo=0.0),
    "w_score": dict(kind="real", lo=0.0),
    "w_term": dict(kind="real", lo=0.0),
    "eta": dict(kind="real", lo=0.0, hi=1.0),
    "grad_clip": dict(kind="real", lo=0.0, open_lo=True),  # 0 would zero every update
    "adam_eps": dict(kind="real", lo=0.0, open_lo=True),  # 0 gives 0/0 = NaN in Adam for a row whose gradient is 0
    "lr_decay": dict(kind="choice", choices=("linear", "constant")),
    "grad_norm": dict(kind="choice", choices=("clip", "unit")),
    "fiber_tol": dict(kind="real", lo=0.0),
    "target": dict(kind="choice", choices=("fixed", "time")),
    "control_init": dict(kind="choice", choices=("zero", "warm")),
    "gamma": dict(kind="gamma"),
    "recurrence": dict(kind="int", lo=1, hi=100),
    "recurrence_tau": dict(kind="real", lo=0.0, hi=1000.0),
    "deterministic_above_tau": dict(kind="real", lo=0.0, hi=1000.0),
    "grid_shift": dict(kind="real", lo=0.0),
    "unclamped_tau": dict(kind="tau_band"),
    "unclamped_limit": dict(kind="real", lo=0.0),  # 0 or >= 1, checked by sample_fiber
}


@dataclass(frozen=True)
class Sampler:
    """A registered fiber method and its capabilities.

    Attributes:
        name: the ``method=`` string.
        fn: the sampler function (signature in the module docstring).
        defaults: its hyper-parameters with their default values (every name needs an :data:`HP_RULES` rule).
        uses_prior: draws from the prior (``metamer`` optimises pixels and does not).
        supports_init: can start from an SDEdit init ``("sdedit", tau)``.
        guided: uses the extractor while sampling (``unguided`` does not).
        pixel_space: returns images ``[M,3,H,W]`` in [0,1] instead of prior-space x0 on latent priors.
        iterations: the hyper-parameter that counts its iterations when it has no denoising steps
            (``metamer``: ``iters``); fault reports then speak of iterations.
        step_knob: the step size a fault halves (``lr``; ``scale`` for DPS), named in the sample's status.
        trained: needs a model trained for the extractor (the conditional baseline), not training-free.
    """

    name: str
    fn: SamplerFn
    defaults: Mapping[str, Any] = field(default_factory=dict)
    uses_prior: bool = True
    supports_init: bool = True
    guided: bool = True
    pixel_space: bool = False
    iterations: str | None = None
    step_knob: str = "lr"
    trained: bool = False


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str, *, defaults: Mapping[str, Any], rules: Mapping[str, dict] | None = None,
                     **capabilities: Any) -> Callable[[SamplerFn], SamplerFn]:
    """Decorator: register ``fn`` as fiber method ``name`` with its ``defaults`` and ``capabilities``.

    ``rules``: :data:`HP_RULES` entries for hyper-parameters no other method has (a name already ruled
    must keep its rule).
    """
    def deco(fn: SamplerFn) -> SamplerFn:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is registered twice")
        for key, rule in (rules or {}).items():
            if HP_RULES.get(key, rule) != rule:
                raise ValueError(f"sampler {name!r} redefines the rule of hyper-parameter {key!r}")
            HP_RULES[key] = dict(rule)
        unruled = sorted(k for k in defaults if k not in HP_RULES)
        if unruled:
            raise ValueError(f"sampler {name!r}: hyper-parameters without a rule: {unruled}")
        SAMPLERS[name] = Sampler(name=name, fn=fn, defaults=dict(defaults), **capabilities)
        return fn
    return deco


def get_sampler(name: Any) -> Sampler:
    """The registered sampler ``name``, or ``ConfigError`` listing the methods."""
    if not isinstance(name, str) or name not in SAMPLERS:
        hint = close_matches(name, SAMPLERS) if isinstance(name, str) else []
        raise ConfigError(f"unknown method {show(name)}; choose one of {tuple(SAMPLERS)}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return SAMPLERS[name]


def report(callback, i: int, t, x: torch.Tensor, x0: torch.Tensor, problem, loss: torch.Tensor | None = None) -> None:
    """Hand one step to ``callback`` (``i``, ``t``, state ``x``, ``denoised`` x0, decoded ``images``, ``loss``)."""
    if callback is not None:
        callback({"i": i, "t": float(t), "x": x.detach(), "denoised": x0.detach(),
                  "images": problem.prior.decode(x0.detach()), "loss": None if loss is None else loss.detach()})


def progress(total: int, disable: bool | None, start: int = 0):
    """The step loop of a sampler, steps ``start .. total - 1`` (a tqdm range, silent when ``disable``)."""
    return trange(start, total, disable=disable, leave=False, desc="fiber")
