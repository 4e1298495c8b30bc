"""Hyper-parameters: presets, the rule every value is checked against, and how defaults, a preset and
explicit keyword arguments merge (``defaults < preset < keyword``)."""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

from ..checks import as_python, check_choice, check_int, check_real, is_number, is_real, show
from ..errors import ConfigError, close_matches
from ..models import prior_defaults
from .base import HP_RULES, get_sampler
from .problem import gamma_at

# Gamma schedules are segments (gamma_start, gamma_end, tau_from, tau_to) over the common
# time scale tau in [0, 1000] (1000 = pure noise); gamma is linear inside a segment.
PRESETS: dict[str, dict[str, Any]] = {
    # the fiber paper's sampling scripts (vislearn/InvarianceAuditing; docs/design.md has the table)
    "fiber-imagenet": dict(steps=200, inner_steps=5, lr=2e-3, w_ctrl=0.0, w_score=0.0, w_term=1.0, loss="l2",
                           gamma=[(0, 0, 1000, 800), (3, 3, 800, 600), (1, 0.5, 600, 200), (2, 10, 200, 0)],
                           eta=1.0, target="time", adam_eps=1e-8),
    "fiber-chexpert": dict(steps=100, inner_steps=4, lr=2e-3, w_ctrl=0.0, w_score=0.0, w_term=1.0, loss="l2",
                           gamma=[(0, 0, 1000, 500), (0, 10, 500, 0)], eta=0.5, target="time", adam_eps=1e-8),
    "fiber-vlm": dict(steps=100, inner_steps=7, lr=2e-3, w_ctrl=1e-4, w_score=0.0, w_term=1.0, loss="l2",
                      gamma=[(0, 0, 1000, 600), (10, 10, 600, 200), (20, 20, 200, 0)], eta=0.25, target="time",
                      adam_eps=1e-8),
    "fiber-colormnist": dict(steps=200, inner_steps=10, lr=2e-2, w_ctrl=3e-4, w_score=0.0, w_term=1.0, loss="l2",
                             gamma=[(0, 0, 1000, 500), (5, 5, 500, 0)], eta=1.0, target="fixed", adam_eps=1e-8),
    # ours: the fiber paper's ImageNet settings with its inner loop of 5 Adam steps at lr 2e-3 done in 2 at 5e-3.
    # A fresh Adam's steps are about lr * sign(g) while the gradient keeps its sign, so both move the control about
    # 0.01 per guided step. Side by side on the toy priors at 50 and 200 steps: validity and feature match within 0.05
    # and mean fiber loss within 5 %, at 0.5x the network evaluations (docs/performance.md); 2 steps at the paper's
    # lr end further from the fiber, and so does 1 step at 1e-2 on the DDPM prior. Measured on toy priors only: the
    # hub priors recommend fiber-imagenet
    "imagenet-fast": dict(steps=200, inner_steps=2, lr=5e-3, w_ctrl=0.0, w_score=0.0, w_term=1.0, loss="l2",
                          gamma=[(0, 0, 1000, 800), (3, 3, 800, 600), (1, 0.5, 600, 200), (2, 10, 200, 0)],
                          eta=1.0, target="time", adam_eps=1e-8),
    # ours, tuned on the shapes world with `fiberbench bench` (docs/performance.md). Guided particles down to tau 600,
    # one drawn per sample by its fiber loss (sampling/steering.py): NDTM alone commits to a wrong shape or background
    # at high noise on embeddings (feature match 0.25-0.6 on simclr, CLIP, pre-logits); with several tries it reaches
    # the fiber on every benchmark extractor. The particles are spawned lazily: one per sample first, the other seven
    # only for samples it did not bring to the fiber (a classifier's easy fiber then costs one trajectory). After the
    # draw a realism term (w_real: the prior's denoising residual of x0_hat at tau 300) keeps the guidance from
    # reaching small fibers (CLIP and its mixtures) through grain; with it those fibers need more tries at the layout,
    # hence several particles. The draw is sharp (particle_lambda 1000: the lowest fiber loss wins): a mixture's loss is
    # its parts' weighted mean, so its particles differ by a few hundredths, which exp(-20 L) would weigh almost alike.
    # A sample whose best of 8 still ends the particle phase off the fiber (loss > 0.05, the benchmark's cosine-0.95
    # tolerance) gets 8 more (particle_retry): its misses are near misses that more tries fix, and the others pay
    # nothing. 8 + 8 holds every extractor of the full benchmark at feature match and validity >= 0.92, with 0.6-0.9x
    # the evaluations of 12 + 12 on the embeddings and mixtures; 4 + 8 drops the simclr mixture to 0.85
    # (docs/performance.md).
    # A sample leaves the inner loop once its loss is <= 0.01 and the prior's step reuses that evaluation
    # (exit_tol), and skips the inner loop while it stays on the fiber (skip_tol). After the
    # draw 8 inner steps with unit-norm gradients: small continuous fibers (CLIP) converge slowly. eta 1 (stochastic
    # steps) lets the prior wash out the high-frequency residue of Adam's sign-like updates (validity 0.92 against
    # 0.50 with eta 0); adam_eps 1e-3: Adam moves a component whose gradient is round-off by up to lr/eps times it, so
    # batched and one-by-one runs differ by 5e-5 in pixels with 1e-3 and by 2e-3 with 1e-4, at equal quality.
    "toy": dict(steps=20, inner_steps=8, lr=0.1, w_ctrl=0.0, w_score=0.0, w_term=1.0, loss="cosine",
                gamma=[(0, 0, 1000, 900), (1, 1, 900, 0)], eta=1.0, target="fixed", control_init="zero",
                adam_eps=1e-3, grad_norm="unit", fiber_tol=0.01, particles=8, particle_tau=600.0,
                particle_inner_steps=2, particle_grad_norm="unit", particle_lambda=1000.0, early_draw_tol=0.01,
                skip_tol=0.01, exit_tol=0.01, particle_spawn="lazy", w_real=0.003, real_tau=300.0,
                particle_retry=8, particle_retry_tol=0.05),
    # one NDTM trajectory per sample (80 network evaluations): a quick look, good on classifier logits (feature
    # match 0.96, validity 0.99 on shape-resnet@logits) and not on embeddings (0.25-0.68)
    "toy-fast": dict(steps=20, inner_steps=4, lr=0.1, w_ctrl=0.0, w_score=0.0, w_term=1.0, loss="cosine",
                     gamma=[(0, 0, 1000, 900), (1, 1, 900, 0)], eta=1.0, target="fixed", control_init="zero",
                     adam_eps=1e-3),
}

RUN_KEYS = ("steps", "loss")  # preset entries that are settings of the run, not of the method
NO_PRESET = "none"  # preset="none": the method's own defaults, not the prior's recommendation


def prior_settings(prior) -> tuple[dict[str, Any], str]:
    """The prior's recommended settings (``{"preset": name, "sampling": {...}}``) and where they come from.

    ``prior``: a spec string (read from its card or source, nothing loaded) or a loaded prior (its ``card``).
    """
    if isinstance(prior, str):
        try:
            return prior_defaults(prior), f"{prior}'s card"
        except ConfigError:  # a bad spec is reported where specs are checked, after the other arguments
            return {}, ""
    card = getattr(prior, "card", None) or {}
    spec = getattr(prior, "spec", type(prior).__name__)
    return {k: card[k] for k in ("preset", "sampling") if k in card}, f"{spec}'s card"


def resolve_settings(method: str, preset: str | None, overrides: Mapping[str, Any],
                     prior=None) -> tuple[dict, dict, dict[str, Any]]:
    """:func:`resolve_hyperparameters` with the prior's recommendation as the default.

    ``preset=None`` takes the preset the prior recommends for guided methods (its card's ``preset``; a hub
    prior's source names one), and for its own sampler (``unguided``) the card's ``sampling`` section under
    the keyword arguments; ``preset="none"`` takes neither. Returns ``(hp, run, provenance)`` with provenance
    ``{"preset": name or None, "preset_from": "chosen" | "<spec>'s card" | "none"}``.
    """
    sampler = get_sampler(method)
    recommended, where = prior_settings(prior) if prior is not None else ({}, "")
    chosen = preset
    if preset is None and sampler.guided and recommended.get("preset"):
        chosen, source = recommended["preset"], where
    elif preset in (None, NO_PRESET):
        chosen, source = None, "none"
    else:
        source = "chosen"
    extra: dict[str, Any] = {}
    if preset is None and not sampler.guided and isinstance(recommended.get("sampling"), Mapping):
        extra = {k: v for k, v in recommended["sampling"].items() if k in sampler.defaults}
        source = where if extra else source
    hp, run = resolve_hyperparameters(method, chosen, {**extra, **dict(overrides)} if isinstance(overrides, Mapping)
                                      else overrides)
    return hp, run, {"preset": chosen, "preset_from": source}


def check_hyperparameter(name: str, value: Any, method: str = "") -> Any:
    """``value`` checked against :data:`HP_RULES` (numpy scalars become Python numbers), or ``ConfigError``
    naming the hyper-parameter, the bad value and what is accepted."""
    rule = HP_RULES[name]
    kind = rule["kind"]
    where = f" (method {method!r})" if method else ""  # after the value: "lr must …" stays greppable
    if kind == "int":
        return check_int(name, value, rule["lo"], rule["hi"], where=where)
    if kind == "real":
        return check_real(name, value, rule["lo"], rule.get("hi"), open_lo=rule.get("open_lo", False), where=where)
    if kind == "choice":
        return check_choice(name, value, rule["choices"], where=where)
    if kind == "tau_band":
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(is_real(v) for v in value)
                and 0 <= float(value[0]) <= float(value[1]) <= 1000):
            raise ConfigError(f"{name} must be a pair (lo, hi) of numbers with 0 <= lo <= hi <= 1000, "
                              f"got {show(value)}{where}")
        return (float(value[0]), float(value[1]))
    return check_gamma(value, where)


def check_gamma(value: Any, where: str = "") -> float | list[tuple[float, float, float, float]]:
    """A guidance weight: a constant >= 0, or segments ``(g_start, g_end, tau_from, tau_to)`` with g >= 0 and
    tau in [0, 1000]."""
    if is_number(value):
        if not is_real(value) or value < 0:
            raise ConfigError(f"gamma must be a finite number >= 0 or a list of segments "
                              f"(g_start, g_end, tau_from, tau_to), got {show(value)}{where}")
        return as_python(value)
    segs: list[tuple[float, float, float, float]] | None = None
    if isinstance(value, (list, tuple)) and value:
        segs = []
        for seg in value:
            if not isinstance(seg, (list, tuple)) or len(seg) != 4 or not all(is_real(v) for v in seg):
                segs = None
                break
            g0, g1, a, b = (float(v) for v in seg)
            if g0 < 0 or g1 < 0 or not (0 <= a <= 1000 and 0 <= b <= 1000):
                segs = None
                break
            segs.append((g0, g1, a, b))
    if segs is None:
        raise ConfigError(f"gamma must be a finite number >= 0 or a non-empty list of segments "
                          f"(g_start, g_end, tau_from, tau_to) of finite numbers with g_start, g_end >= 0 and "
                          f"tau_from, tau_to in [0, 1000], e.g. [(0, 0, 1000, 900), (1, 1, 900, 0)]; "
                          f"got {show(value)}{where}")
    return segs


def resolve_hyperparameters(method: str, preset: str | None, overrides: Mapping[str, Any]) -> tuple[dict, dict]:
    """Merge method defaults < preset < explicit keyword arguments and check every value.

    Unknown names, and values outside :data:`HP_RULES` (wrong type, NaN/inf, out of range, unknown
    strings; bools are not numbers), raise one ``ConfigError`` naming the hyper-parameter, its value and
    what is accepted; no other exception escapes. Returns ``(hyperparameters for the sampler function,
    run-level settings from the preset)``.
    """
    allowed = get_sampler(method).defaults
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"hyper-parameters must be a mapping of names to values, got {show(overrides)}")
    hp = dict(allowed)
    run: dict[str, Any] = {}
    if preset is not None and preset != NO_PRESET:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"unknown preset {show(preset)}; presets: {sorted(PRESETS)}")
        for k, v in PRESETS[preset].items():
            if k in RUN_KEYS:
                run[k] = v
            elif k in allowed:
                hp[k] = v
    unknown = sorted((k for k in overrides if k not in allowed), key=repr)
    if unknown:
        hint = [h for k in unknown if isinstance(k, str) for h in close_matches(k, allowed, n=1)]
        raise ConfigError(f"unknown hyper-parameter(s) {unknown} for method {method!r}; valid: {sorted(allowed)}"
                          + (f" (did you mean {hint}?)" if hint else ""))
    hp.update(overrides)
    for k in hp:
        hp[k] = check_hyperparameter(k, hp[k], method)
    return hp, run


# --------------------------------------------------------------------------- the guidance budget of a preset

class PresetStepsWarning(UserWarning):
    """A preset runs with fewer steps than it was tuned for, so with fewer guidance updates."""


def guidance_budget(gamma: Any, steps: int, prior=None) -> dict[str, float]:
    """How much guidance a gamma schedule gives over ``steps`` denoising steps.

    Gamma is a function of diffusion time, so the number of guided updates grows with the step count. Counted
    on the prior's own time grid (``prior.schedule(steps).taus``) when a prior is given, else on a uniform grid
    from tau 1000 down to 0. Returns ``{"steps", "guided_steps" (steps with gamma > 0), "gamma_sum" (sum of
    gamma over the steps: the accumulated control scale)}``.
    """
    if prior is not None:
        taus = [float(t) for t in prior.schedule(int(steps)).taus[:-1]]
    else:
        taus = [1000.0 * (1 - i / steps) for i in range(int(steps))]
    gammas = [gamma_at(gamma, t) for t in taus]
    return {"steps": int(steps), "guided_steps": int(sum(g > 0 for g in gammas)), "gamma_sum": float(sum(gammas))}


def check_preset_steps(preset: str | None, steps: int | None, prior=None, *, strict: bool = False,
                       inner_steps: int | None = None, stacklevel: int = 2) -> dict[str, Any] | None:
    """Warn (:class:`PresetStepsWarning`), or with ``strict`` raise ``ConfigError``, when ``steps`` gives the
    preset's gamma schedule fewer guided updates than the preset's own step count does.

    Returns ``None`` for no preset / no ``steps`` override, else ``{"preset", "steps", "preset_steps",
    "guided_steps", "preset_guided_steps", "gamma_sum", "preset_gamma_sum", "inner_steps_needed", "short"}``;
    ``inner_steps_needed`` is the preset's ``inner_steps`` scaled by the lost guided steps (what keeps the
    number of control updates, the README's advice). ``inner_steps`` (the caller's override) counts too: a
    run that lowers steps but raises inner_steps enough is not short. ``stacklevel``: of the warning (2: the
    caller of this function).
    """
    if preset is None or preset == "none" or steps is None or preset not in PRESETS:
        return None
    p = PRESETS[preset]
    if "gamma" not in p or "steps" not in p:
        return None
    have, want = guidance_budget(p["gamma"], steps, prior), guidance_budget(p["gamma"], p["steps"], prior)
    base_inner = int(p.get("inner_steps", 1))
    inner = int(inner_steps) if inner_steps is not None else base_inner
    needed = math.ceil(base_inner * want["guided_steps"] / max(have["guided_steps"], 1))
    short = have["guided_steps"] * inner < want["guided_steps"] * base_inner
    out = {"preset": preset, "steps": int(steps), "preset_steps": int(p["steps"]),
           "guided_steps": have["guided_steps"], "preset_guided_steps": want["guided_steps"],
           "gamma_sum": have["gamma_sum"], "preset_gamma_sum": want["gamma_sum"], "inner_steps_needed": needed,
           "short": short}
    if short:
        msg = (f"preset {preset!r} is tuned for {p['steps']} steps: {want['guided_steps']} guided updates "
               f"(x {base_inner} inner steps, accumulated gamma {want['gamma_sum']:.0f}); steps={steps} gives "
               f"{have['guided_steps']} guided updates (x {inner}, accumulated gamma {have['gamma_sum']:.0f}). "
               f"Keep steps={p['steps']}, or raise inner_steps to {needed}")
        if strict:
            raise ConfigError(msg)
        warnings.warn(msg, PresetStepsWarning, stacklevel=stacklevel)
    return out
