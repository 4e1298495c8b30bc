"""The trained baseline: a flow-matching generator conditioned on an extractor's features.

The fiber paper's other route (RCDM, Bordes et al. 2022; invertible networks,
Rombach et al. 2020) *trains* a generator ``p(x | f(x))`` per extractor and
samples a fiber by conditioning it on ``f(x_ref)``. NDTM needs no training;
this module is the comparison on equal footing in the shapes world
(``method: "conditional"``, registered with the samplers).

Model (``toy/cond-fm-shape-resnet``, :class:`FeatureConditionedFlow`): the toy
prior's ``UNet2DModel`` (same config, initialised from ``toy/prior-fm``'s weights)
with ``class_embed_type="identity"``; one small MLP per conditioning layer
(``logits`` [4], ``pre_logits`` [128] of ``toy/shape-resnet``) maps the
standardised features to the time-embedding width and is added to it. The last
layer of every MLP starts at zero, so training starts at the unconditional prior;
a zero embedding is the "no condition" token (classifier-free guidance).

Training (:func:`fiberbench.training.conditional.train_conditional`): rectified flow exactly as the prior
(``x_t = (1 - s) x0 + s eps``, target ``eps - x0``, timestep ``1000 s``, images in
[-1, 1], fresh renders every step, AdamW, EMA, bf16 autocast on CPU); each sample
is conditioned on one layer (half ``logits``, half ``pre_logits``) of
``f(x0)``, the condition is dropped for 10 % of samples, and a **fiber-loss term**
``lambda * (1 - s) * (1 - cos(f(x0_hat), f(x0)))`` with ``x0_hat = x_t - s v_pred``
is added for conditioned samples with ``s < fiber_max_sigma`` (0.8). Measured on
the prior it starts from: below s = 0.5 the unconditional ``x0_hat`` already has
the reference's features (1 - cos <= 0.014 for both layers), so a term limited to
s < 0.5 would be ~0; between 0.5 and 0.8 the shape is being decided (argmax kept
0.98 -> 0.50) and ``x0_hat`` is still an image the extractor can read.

Sampling (``sample_fiber(load_prior("toy/cond-fm-shape-resnet"), extractor, refs,
method="conditional")``, or :func:`sample_conditional`): Euler steps on the sigmas of
``FlowMatchEulerDiscreteScheduler`` (shift from the card), one generator per sample
(sample *j* of reference *i* is the same alone or in any batch), classifier-free
guidance ``u + g (c - u)``; the result is a :class:`~fiberbench.sampling.FiberResult`
like every other method's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..errors import ConfigError
from ..models import FeatureConditionedPrior, load_prior
from ..models.prior import build_scheduler
from ..sampling import FiberProblem, FiberResult, register_sampler, sample_fiber
from ..sampling.base import progress, report
from ..toy import cards
from ..toy.nets import FeatureConditionedFlow

__all__ = ["NAME", "SPEC", "LAYERS", "EXTRACTOR", "CONDITIONAL_DEFAULTS", "FeatureConditionedFlow",
           "load_conditional", "trained_for", "sample_conditional", "sample_conditional_flow"]

NAME = "cond-fm-shape-resnet"
SPEC = f"toy/{NAME}"
EXTRACTOR = "toy/shape-resnet"
LAYERS = ("logits", "pre_logits")
# guidance 2.0: the card's sampling_default, chosen on the card's own seeds (seeds.CONDITIONAL_EVAL_SEED)
CONDITIONAL_DEFAULTS = dict(guidance=2.0, condition=True)


def load_conditional(name: str = NAME, root: Path | None = None, device: str = "cpu"):
    """The shipped conditional model: ``(FeatureConditionedFlow.eval() with frozen weights, card)`` (safetensors,
    no pickle)."""
    card = cards.read_card(name, root)
    if card.get("kind") != "conditional":
        raise ConfigError(f"toy model {name!r} is a {card.get('kind')!r}, not a conditional generator")
    model, card = cards.load_toy_module(name, root)
    model.card = card
    return model.eval().requires_grad_(False).to(device), card


def base_and_layer(spec: str) -> tuple[str, str]:
    """``"toy/shape-resnet@pre_logits"`` -> ``("toy/shape-resnet", "pre_logits")`` (default layer ``logits``)."""
    base, _, layer = str(spec).partition("@")
    return base, layer or "logits"


def trained_for(card: dict[str, Any], extractor_spec: str) -> bool:
    """Whether the model of ``card`` was trained for ``extractor_spec`` (e.g. ``toy/shape-resnet@logits``)."""
    cond = card["architecture"]["config"]["condition"]
    base, layer = base_and_layer(extractor_spec)
    return base == cond["extractor"] and layer in cond["dims"]


def scheduler_sigmas(card: dict[str, Any], steps: int) -> torch.Tensor:
    """``steps + 1`` sigmas of the card's ``FlowMatchEulerDiscreteScheduler``, from ~1 down to 0."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(card["scheduler"]["config"])
    sched.set_timesteps(steps)
    return sched.sigmas.to(torch.float32)


@register_sampler("conditional", defaults=CONDITIONAL_DEFAULTS, uses_prior=False, supports_init=False,
                  guided=False, trained=True,
                  rules={"guidance": dict(kind="real", lo=0.0),
                         "condition": dict(kind="choice", choices=(True, False))})
@torch.no_grad()
def sample_conditional_flow(problem: FiberProblem, x: torch.Tensor, sched, callback=None, disable=None, *,
                            guidance: float = 2.0, condition: bool = True) -> torch.Tensor:
    """The trained baseline: Euler steps of ``v(x_t, t | f(x_ref))``, classifier-free guided ``u + g (c - u)``.

    ``problem.prior`` must be the feature-conditioned generator (``load_prior("toy/cond-fm-shape-resnet")``)
    and ``problem.extractor`` one it was trained for; ``condition=False`` gives its unconditional samples.
    The prior's own schedule is replaced by the card's sigmas over the same number of steps.
    """
    prior = problem.prior
    if not isinstance(prior, FeatureConditionedPrior):
        raise ConfigError(f"method 'conditional' samples a trained feature-conditioned generator; pass "
                          f"load_prior({SPEC!r}) as the prior, not {getattr(prior, 'spec', type(prior).__name__)!r}")
    spec = getattr(problem.extractor, "spec", type(problem.extractor).__name__)
    if not trained_for(prior.card, spec):
        cond = prior.condition_info()
        raise ConfigError(f"{prior.card['spec']} was not trained for extractor {spec!r}; it conditions on "
                          f"{cond['extractor']} layers {list(cond['dims'])} (a trained baseline needs training "
                          f"per extractor)")
    model = prior.model
    sigmas = scheduler_sigmas(prior.card, len(sched)).to(x.device)
    x = x / sched.sigmas[0] * sigmas[0]
    cond = model.embed(problem.target, base_and_layer(spec)[1]) if condition else None
    guided = condition and guidance != 1.0
    for i in progress(len(sigmas) - 1, disable):
        s, s_next = sigmas[i], sigmas[i + 1]
        t = (s * 1000).expand(x.shape[0])
        problem.calls["denoiser"] += 2 if guided else 1
        if guided:
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))
            vc, vu = both.chunk(2)
            v = vu + guidance * (vc - vu)
        else:
            v = model(x, t, cond)
        x0_hat = x - s * v.float()
        x = x + (s_next - s) * v.float()
        problem.record(None, x0_hat)
        report(callback, i, s * 1000, x, x0_hat, problem)
    return x


def as_prior(model: FeatureConditionedPrior | FeatureConditionedFlow) -> FeatureConditionedPrior:
    """The generator as :func:`sample_fiber` takes it (a network from :func:`load_conditional` is wrapped)."""
    if isinstance(model, FeatureConditionedPrior):
        return model
    card = getattr(model, "card", None)
    if not isinstance(model, FeatureConditionedFlow) or card is None:
        raise ConfigError("model must come from load_prior('toy/cond-fm-shape-resnet') or load_conditional()")
    return FeatureConditionedPrior(model, build_scheduler(card["scheduler"]), spec=card["spec"], card=card)


def sample_conditional(model: FeatureConditionedPrior | FeatureConditionedFlow | None, extractor, reference,
                       n: int = 8, steps: int = 20,
                       seed: int = 0, guidance: float | None = None, batch_size: int = 64,
                       reference_ids: Sequence[str] | None = None, condition: bool = True) -> FiberResult:
    """Draw ``n`` samples of the conditional generator for each reference, conditioned on ``extractor(ref)``.

    A shorthand for ``sample_fiber(model, extractor, reference, method="conditional", ...)``.

    Args:
        model: the generator (``load_prior("toy/cond-fm-shape-resnet")`` or :func:`load_conditional`'s network;
            ``None`` loads it).
        extractor: the extractor whose fiber is sampled (an Extractor or a spec string); its spec must be one
            the model was trained for (``toy/shape-resnet@logits`` / ``@pre_logits``), else ``ConfigError``.
        reference: ``[3,32,32]`` or ``[B,3,32,32]`` in [0,1].
        steps: Euler steps on the card's scheduler sigmas.
        seed: sample ``j`` of reference ``i`` draws its noise from ``sample_seed(seed, i, j)`` (as ``sample_fiber``).
        guidance: classifier-free guidance scale (1 = the plain conditional model); ``None``: the default (2.0).
        condition: ``False`` gives the model's unconditional samples (null embedding), for comparison.

    Returns:
        a :class:`~fiberbench.sampling.FiberResult` (method ``conditional``): images ``[B*n,3,32,32]`` in [0,1],
        reference-major, with ``cosine`` / ``feature_distance`` (cosine loss) to ``extractor(ref)``.
    """
    model = load_prior(SPEC) if model is None else as_prior(model)
    kw = {} if guidance is None else {"guidance": guidance}
    return sample_fiber(model, extractor, reference, n=n, method="conditional", steps=steps, seed=seed,
                        batch_size=batch_size, reference_ids=reference_ids, progress=False, loss="cosine",
                        condition=condition, **kw)
