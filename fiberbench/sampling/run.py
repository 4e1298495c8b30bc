""":func:`sample_fiber`, the public entry point: validate -> load -> prepare -> run batches -> finish.

Everything a user can get wrong is checked before any model is loaded; samples run in batches (one
generator per sample, so batching never changes a sample), split on CUDA out-of-memory; the final decode
and feature pass score every sample against its reference and give each a status.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checks import MAX_N, MAX_STEPS, check_int, check_seed, is_real, show
from ..errors import ConfigError
from ..identity import tensor_hash
from ..io import as_image_batch
from ..models import load_extractor, load_prior
from ..models.registry import check_available
from ..seeds import sample_seed
from .base import Sampler, get_sampler
from .batching import map_chunks, run_in_chunks
from .hyperparams import check_preset_steps, resolve_settings
from .problem import LOSSES, FiberProblem, NoiseSource, StageTimer, checked_features, fiber_distance, finite_rows
from .result import FiberResult, fault_history, run_id, run_versions, sample_status

DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
FAULT_KINDS = ("loss", "gradient", "state")


def sample_fiber(prior, extractor, reference=None, n: int = 16, method: str = "ndtm", steps: int | None = None,
                 seed: int = 0, loss: str | None = None, callback: Callable[[dict], None] | None = None, *,
                 init="noise", preset: str | None = None, batch_size: int = 64, progress: bool = True,
                 return_trajectory: bool = False, dtype: torch.dtype | None = None,
                 reference_ids: Sequence[str] | None = None, profile: bool | StageTimer = False,
                 target_features: torch.Tensor | None = None, **hyperparameters) -> FiberResult:
    """Draw ``n`` samples from the fiber of ``extractor`` through each reference image (or given feature vector).

    Args:
        prior: a :class:`~fiberbench.models.prior.Prior` (or a spec string such as ``"toy/prior-fm"``).
        extractor: an :class:`~fiberbench.models.extractor.Extractor` (or a spec string).
        reference: ``[3,H,W]`` or ``[B,3,H,W]`` in [0,1] (resized to the prior's size if needed). Optional
            when ``target_features`` are given (then, if present, only an SDEdit ``init`` starts from it).
        n: samples per reference.
        method: a registered sampler (:data:`~fiberbench.sampling.base.SAMPLERS`): ``ndtm`` | ``dps`` |
            ``metamer`` | ``unguided`` (and ``conditional``, the trained baseline, on the toy world).
        steps: denoising steps (default: the preset's, else 50).
        seed: run seed; sample j of reference i uses its own generator seeded from (seed, i, j).
        loss: fiber loss ``cosine`` | ``l2`` | ``nl2`` (default: the preset's, else ``cosine``).
        callback: called after every step with ``{"i", "t", "x", "denoised", "images", "loss", "rows"}``.
        init: ``"noise"`` or ``("sdedit", tau_star)``: start from x_ref noised to tau_star in (0, 1000].
        preset: a name in :data:`~fiberbench.sampling.hyperparams.PRESETS` (``toy``, ``fiber-imagenet``, …)
            filling the defaults. ``None`` (default): the prior's recommendation (its card's preset for guided
            methods, its own sampler's settings for ``unguided``); ``"none"``: the method's bare defaults.
            ``result.config`` records the preset used and where it came from (``preset_from``).
        batch_size: samples per batched run; on CUDA out-of-memory the batch is halved and retried (in the
            sampling loop, the reference features and the final decode / feature pass), finished work kept.
        dtype: ``torch.bfloat16`` / ``torch.float16`` autocast for the networks (u and Adam stay fp32).
        profile: split the sampling loop's wall time into stages (prior forward / backward, decode, extractor
            forward / backward, optimiser, other; :class:`~fiberbench.sampling.problem.StageTimer`) into
            ``result.config["profile"]``. The images are bit for bit those of a run without it; on CUDA each
            stage change synchronises the device, which makes the run itself slower. A fresh ``StageTimer``
            instead of ``True`` is used as given (e.g. with its ``on_step`` hook).
        target_features: ``[B,D]`` (or ``[D]``) feature vectors to sample the fibers of, instead of
            ``f(reference)``: e.g. a classifier's pre-logits with their null-space component removed. ``D`` and
            the dtype must be the extractor's (probed on one blank image at the prior's size: ``ConfigError``
            otherwise); a time-dependent target (``target="time"``) needs reference images and is refused.
            ``reference_ids`` then name the targets; ``result.reference_features`` are the targets and, without
            reference images, ``result.reference`` is all zeros (black images of the prior's size, a placeholder
            that ``to_frame`` and the plots accept; compare samples with the targets, not with it).
        **hyperparameters: the method's own (its registered defaults name them).

    Returns:
        :class:`FiberResult` with ``images [B*n,3,H,W]`` in [0,1], reference-major.
    """
    req = validate_request(prior, extractor, reference, n=n, method=method, steps=steps, seed=seed, loss=loss,
                           init=init, preset=preset, batch_size=batch_size, dtype=dtype,
                           reference_ids=reference_ids, profile=profile, hyperparameters=hyperparameters,
                           target_features=target_features, callback=callback)
    prior = load_prior(prior) if isinstance(prior, str) else prior
    extractor = load_extractor(extractor) if isinstance(extractor, str) else extractor
    run = prepare(req, prior, extractor)
    out = run_batches(run, callback, progress, return_trajectory)
    return finish(run, out, return_trajectory)


@dataclass
class Request:
    """A validated :func:`sample_fiber` call (nothing loaded yet)."""

    sampler: Sampler
    hp: dict[str, Any]
    preset: str | None
    preset_from: str  # "chosen", "<spec>'s card" (the prior's recommendation) or "none"
    n: int
    steps: int
    seed: int
    loss: str
    init: Any
    t_star: float | None
    batch_size: int
    dtype: torch.dtype | None
    reference: torch.Tensor | None  # [B,3,H,W] in [0,1]; None: feature targets without images
    reference_ids: list[str] | None
    profile: bool | StageTimer = False
    targets: torch.Tensor | None = None  # [B,D] given target features (None: f(reference))

    @property
    def count(self) -> int:
        """Number of fibers ``B`` (references or target vectors)."""
        return int((self.targets if self.targets is not None else self.reference).shape[0])


def validate_request(prior, extractor, reference, *, n, method, steps, seed, loss, init, preset, batch_size,
                     dtype, reference_ids, hyperparameters, profile=False, target_features=None,
                     callback=None) -> Request:
    """Check every argument of :func:`sample_fiber` (and the specs, without loading them) or raise ``ConfigError``."""
    check_callables(prior, extractor, callback)
    n = check_int("n", n, 1, MAX_N)
    batch_size = check_int("batch_size", batch_size)
    sampler = get_sampler(method)
    hp, run, provenance = resolve_settings(method, preset, hyperparameters, prior)
    given = steps is not None
    steps = check_int("steps", steps if given else run.get("steps", 50), 1, MAX_STEPS)
    if given:  # fewer steps than the preset's: fewer guided updates, unless inner_steps makes up for them
        check_preset_steps(provenance["preset"], steps, None if isinstance(prior, str) else prior,
                           inner_steps=hyperparameters.get("inner_steps"), stacklevel=4)
    loss = loss or run.get("loss", "cosine")
    if loss not in LOSSES:
        raise ConfigError(f"unknown fiber loss {loss!r}; choose one of {LOSSES}")
    t_star = check_init(init, sampler, hp)
    if 0 < hp.get("unclamped_limit", 0) < 1:
        raise ConfigError(f"unclamped_limit must be 0 (no clamp in unclamped_tau) or >= 1 (a multiple of the data "
                          f"range), got {hp['unclamped_limit']!r}; below 1 it would clamp tighter than the data")
    seed = check_seed("seed", seed)
    if not isinstance(profile, (bool, StageTimer)):
        raise ConfigError(f"profile must be True, False or a StageTimer, got {profile!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be None, torch.bfloat16 or torch.float16, got {dtype!r}")
    ref = as_image_batch(reference, name="reference") if reference is not None or target_features is None else None
    targets = check_targets(target_features, ref, hp, t_star)
    count = int((targets if targets is not None else ref).shape[0])
    if reference_ids is not None and len(reference_ids) != count:
        raise ConfigError(f"reference_ids has {len(reference_ids)} entries for {count} references")
    for spec, kind in ((prior, "prior"), (extractor, "extractor")):
        if isinstance(spec, str):  # unknown names, layers, modules, undownloaded hub models fail here, before loading
            check_available(spec, kind)
    return Request(sampler=sampler, hp=hp, preset=provenance["preset"], preset_from=provenance["preset_from"],
                   n=n, steps=steps, seed=seed, loss=loss,
                   init=list(init) if isinstance(init, (tuple, list)) else init, t_star=t_star,
                   batch_size=batch_size, dtype=dtype, reference=ref,
                   reference_ids=list(reference_ids) if reference_ids is not None else None, profile=profile,
                   targets=targets)


def check_targets(target_features, ref: torch.Tensor | None, hp: dict[str, Any],
                  t_star: float | None) -> torch.Tensor | None:
    """Given target features as ``[B,D]`` (a ``[D]`` vector becomes ``[1,D]``), or ``ConfigError``.

    Checked here, before any model loads: shape, finiteness, a floating dtype, agreement with the reference
    images' count, and that no option needs reference images that are not there. The extractor's own ``D``
    and dtype are checked in :func:`prepare`, once it is loaded.
    """
    if target_features is None:
        return None
    t = torch.as_tensor(target_features).detach()
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ConfigError(f"target_features must be [B,D] (or [D]), got shape {tuple(t.shape)}")
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
        raise ConfigError(f"target_features must be finite floating-point values, got dtype {t.dtype}"
                          + ("" if not t.is_floating_point() else " with non-finite entries"))
    if hp.get("target") == "time":
        raise ConfigError("target='time' follows f(x0_hat of x_ref noised to t), which given target_features do "
                          "not have; use target='fixed'")
    if ref is None and t_star is not None:
        raise ConfigError("an SDEdit init starts from the reference images; with target_features alone there are "
                          "none: pass reference= too, or use init='noise'")
    if ref is not None and ref.shape[0] != t.shape[0]:
        raise ConfigError(f"{t.shape[0]} target_features for {ref.shape[0]} reference images: give one per image")
    return t.cpu()


def check_callables(prior, extractor, callback) -> None:
    """``ConfigError`` unless ``prior`` / ``extractor`` are spec strings or models and ``callback`` is callable."""
    if not isinstance(prior, str) and not hasattr(prior, "denoise"):
        raise ConfigError(f"prior must be a spec string such as 'toy/prior-fm' or a loaded Prior "
                          f"(fiberbench.load_prior), got {show(prior)}")
    if not isinstance(extractor, str) and not callable(extractor):
        raise ConfigError(f"extractor must be a spec string such as 'toy/shape-resnet@logits' or a callable (an "
                          f"Extractor / nn.Module) from images [N,3,H,W] to features [N,D], got {show(extractor)}")
    if callback is not None and not callable(callback):
        raise ConfigError(f"callback must be callable (called with a dict after every step) or None, got "
                          f"{show(callback)}")


def check_init(init, sampler: Sampler, hp: dict[str, Any]) -> float | None:
    """``None`` for ``init="noise"``; tau_star for ``("sdedit", tau_star)``; ``ConfigError`` otherwise."""
    if isinstance(init, (tuple, list)):
        if len(init) != 2 or init[0] != "sdedit" or not is_real(init[1]) or not 0 < init[1] <= 1000:
            raise ConfigError(f"init must be 'noise' or ('sdedit', tau_star) with 0 < tau_star <= 1000, got "
                              f"{show(init)}")
        if not sampler.supports_init:
            why = ("has no prior and so no SDEdit start" if not sampler.uses_prior
                   else "cannot start from an SDEdit init")
            raise ConfigError(f"{sampler.name} {why}; use init='noise'")
        if hp.get("grid_shift"):
            raise ConfigError("grid_shift gives a grid from pure noise; it cannot start from an SDEdit init")
        return float(init[1])
    if init != "noise":
        raise ConfigError(f"init must be 'noise' or ('sdedit', tau_star), got {show(init)}")
    return None


@dataclass
class Run:
    """A request with its models loaded: references on the device, their features, seeds and the config."""

    req: Request
    prior: Any
    extractor: Any
    device: torch.device
    ref: torch.Tensor  # [B,3,S,S] in [0,1] on the device, resized to the prior's size S
    ref_feats: torch.Tensor  # [B,D]
    ref_latent: torch.Tensor | None  # [B,C,h,w] encode(ref), for time-dependent targets and SDEdit starts
    seeds: list[int]  # per sample, reference-major
    config: dict[str, Any]
    oom: dict[str, int] = field(default_factory=lambda: {"splits": 0})
    timer: StageTimer | None = None  # profile=True: the stage split of every batch's sampler call

    @property
    def total(self) -> int:
        return len(self.seeds)


def prepare(req: Request, prior, extractor) -> Run:
    """Resize the references to the prior, compute their features (and latents), the seeds and the config."""
    device = next(prior.parameters()).device
    size = prior.image_size
    ref = req.reference if req.reference is not None else torch.zeros(req.count, 3, size, size)
    if tuple(ref.shape[-2:]) != (size, size):
        ref = F.interpolate(ref, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    ref = ref.to(device)
    extractor = extractor.to(device)
    seeds = [sample_seed(req.seed, i, j) for i in range(ref.shape[0]) for j in range(req.n)]
    oom = {"splits": 0}
    with torch.no_grad():  # a batch of B references can run out of memory too: split like the samples
        if req.targets is not None:
            ref_feats = check_target_fit(req.targets, extractor, size, device)
        else:
            ref_feats, _ = map_chunks(lambda c: checked_features(extractor(c), c, extractor), ref, req.batch_size,
                                      device, oom)
        need_latent = req.hp.get("target") == "time" or req.t_star is not None
        ref_latent = map_chunks(prior.encode, ref, req.batch_size, device, oom)[0] if need_latent else None
    config: dict[str, Any] = {
        "method": req.sampler.name, "extractor": getattr(extractor, "spec", type(extractor).__name__),
        "prior": getattr(prior, "spec", type(prior).__name__), "n": req.n, "steps": req.steps, "seed": req.seed,
        "loss": req.loss, "init": req.init, "preset": req.preset, "preset_from": req.preset_from,
        "hyperparameters": req.hp,
        "batch_size": req.batch_size, "dtype": str(req.dtype) if req.dtype else None, "device": str(device),
        "versions": run_versions(), "sample_seeds": seeds, "reference_hash": reference_hash(req, ref),
        "targets": "features" if req.targets is not None else "reference",
    }
    if req.sampler.trained:  # a trained method's cost includes its training (recorded in its model's card)
        config["training_seconds"] = (getattr(prior, "card", {}) or {}).get("training", {}).get("seconds")
    config["run_id"] = run_id(config)
    timer = req.profile if isinstance(req.profile, StageTimer) else StageTimer(device) if req.profile else None
    return Run(req=req, prior=prior, extractor=extractor, device=device, ref=ref, ref_feats=ref_feats,
               ref_latent=ref_latent, seeds=seeds, config=config, oom=oom, timer=timer)


def check_target_fit(targets: torch.Tensor, extractor, size: int, device: torch.device) -> torch.Tensor:
    """``targets`` on the device if their dimension and dtype are the extractor's, probed on one blank
    ``[1,3,size,size]`` image; ``ConfigError`` otherwise."""
    probe = extractor(torch.zeros(1, 3, size, size, device=device))
    dim, dtype = int(probe.flatten(1).shape[1]), probe.dtype
    name = getattr(extractor, "spec", type(extractor).__name__)
    if targets.shape[1] != dim:
        raise ConfigError(f"target_features have dimension {targets.shape[1]}, {name} returns {dim}")
    if targets.dtype != dtype:
        raise ConfigError(f"target_features are {targets.dtype}, {name} returns {dtype}: convert them "
                          f"(e.g. target_features.to({dtype})) so the fiber loss compares like with like")
    return targets.to(device)


def reference_hash(req: Request, ref: torch.Tensor) -> str:
    """What the run's identity knows of its fibers: the reference images, the given targets, or both."""
    if req.targets is None:
        return tensor_hash(ref, 16)
    feats = "features:" + tensor_hash(req.targets, 16)
    return feats if req.reference is None else f"{tensor_hash(ref, 16)}+{feats}"


@dataclass
class Outputs:
    """Per-sample results of the sampling loop, filled chunk by chunk (all ``[M]`` on the CPU)."""

    x0: torch.Tensor  # [M,C,h,w] final x0 in the prior's space ([M,3,S,S] images for pixel-space methods)
    faults: torch.Tensor
    events: dict[str, torch.Tensor]
    halvings: torch.Tensor
    gave_up: torch.Tensor
    updates: torch.Tensor
    histories: list[torch.Tensor | None]
    trajectories: list[torch.Tensor | None]
    calls: dict[str, float] = field(default_factory=lambda: {"denoiser": 0.0, "extractor": 0.0})  # per sample
    seconds: float = 0.0
    batch_size: int = 0

    @classmethod
    def empty(cls, m: int, sample_shape: tuple[int, ...]) -> Outputs:
        return cls(x0=torch.empty(m, *sample_shape), faults=torch.zeros(m, dtype=torch.long),
                   events={k: torch.zeros(m, dtype=torch.long) for k in FAULT_KINDS},
                   halvings=torch.zeros(m, dtype=torch.long), gave_up=torch.full((m,), -1, dtype=torch.long),
                   updates=torch.zeros(m, dtype=torch.long), histories=[None] * m, trajectories=[None] * m)


def run_batches(run: Run, callback, progress: bool, return_trajectory: bool) -> Outputs:
    """Sample every row in chunks of ``batch_size`` (halved on CUDA out-of-memory, finished chunks kept)."""
    prior, req = run.prior, run.req
    pixels = req.sampler.pixel_space and prior.latent
    shape = (3, prior.image_size, prior.image_size) if pixels else tuple(prior.sample_shape)
    out = Outputs.empty(run.total, shape)
    bar = tqdm(total=run.total, desc=f"{req.sampler.name} fiber samples", leave=False) if progress else None
    t0 = time.perf_counter()

    def chunk(start: int, stop: int) -> None:
        run_chunk(run, list(range(start, stop)), out, callback, return_trajectory)

    _, out.batch_size = run_in_chunks(chunk, run.total, req.batch_size, run.device, run.oom,
                                      done=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    out.seconds = time.perf_counter() - t0
    return out


def run_chunk(run: Run, rows: list[int], out: Outputs, callback, return_trajectory: bool) -> None:
    """Sample the rows ``rows`` as one batch and write their results into ``out``."""
    req = run.req
    problem, x, sched = start_problem(run, rows, return_trajectory)

    def cb(info):
        callback({**info, "rows": rows})

    if run.timer is not None:
        problem.attach(run.timer)
        run.timer.start()
    try:
        with torch.enable_grad():
            x0 = req.sampler.fn(problem, x, sched, callback=cb if callback else None, disable=True, **req.hp)
    finally:
        if run.timer is not None:
            run.timer.stop()
    out.x0[rows] = x0.detach().float().cpu()
    out.faults[rows] = problem.faults
    out.halvings[rows], out.gave_up[rows], out.updates[rows] = problem.halvings, problem.gave_up, problem.updates
    for k in out.events:
        out.events[k][rows] = problem.events[k]
    hist = torch.stack(problem.history) if problem.history else None
    for k, r in enumerate(rows):
        out.histories[r] = None if hist is None else hist[:, k]
        if problem.trajectory:
            out.trajectories[r] = torch.stack([tr[k] for tr in problem.trajectory])
    for k in out.calls:  # a chunk's calls are per sample of the chunk: weigh them by its share of the rows
        out.calls[k] += problem.calls[k] * len(rows) / run.total


def start_problem(run: Run, rows: list[int], return_trajectory: bool) -> tuple[FiberProblem, torch.Tensor, Any]:
    """The fiber problem of ``rows``, its starting state (noise, or x_ref noised for SDEdit) and its schedule."""
    req, prior, device = run.req, run.prior, run.device
    noise = NoiseSource([run.seeds[r] for r in rows], prior.sample_shape, device)
    per_ref = torch.tensor([r // req.n for r in rows])
    problem = FiberProblem(prior=prior, extractor=run.extractor, target=run.ref_feats[per_ref.to(device)],
                           metric=req.loss, noise=noise, autocast=req.dtype,
                           trajectory=[] if return_trajectory else None)
    if run.ref_latent is not None:
        uniq, rows_of = torch.unique(per_ref, return_inverse=True)
        problem.ref_latent = run.ref_latent[uniq.to(device)]
        problem.ref_rows = rows_of.to(device)
        # h_t noise: fixed per reference so all samples of a fiber share one target path
        ref_gens = NoiseSource([sample_seed(req.seed, int(i), 1 << 30) for i in uniq.tolist()],
                               prior.sample_shape, device)
        problem.ref_noise = ref_gens.draw()
    if req.t_star is not None:
        sched = prior.schedule(req.steps, t_start=prior.time_at_tau(req.t_star))
        problem.sdedit = True
    else:
        sched = prior.schedule(req.steps, shift=req.hp.get("grid_shift") or None)  # grid_shift: unguided only
    return problem, problem.fresh_start(sched), sched


def finish(run: Run, out: Outputs, return_trajectory: bool) -> FiberResult:
    """The final decode and feature pass (split on OOM too: finished samples are never lost), statuses, result."""
    req, prior, device = run.req, run.prior, run.device
    final_bs = out.batch_size
    with torch.no_grad():
        if req.sampler.pixel_space and prior.latent:
            images = out.x0.clamp(0, 1)
        else:
            images, final_bs = map_chunks(lambda c: prior.decode(c).float(), out.x0, final_bs, device, run.oom,
                                          to="cpu")
        images = images.clamp(0, 1)
        finite = finite_rows(images)
        images[~finite] = 0.0
        feats, final_bs = map_chunks(lambda c: checked_features(run.extractor(c), c, run.extractor), images, final_bs,
                                     device, run.oom, to="cpu")
        tgt = run.ref_feats.cpu().repeat_interleave(req.n, dim=0)
        dist = fiber_distance(feats, tgt, req.loss)
        cos = F.cosine_similarity(feats, tgt, dim=-1)
    status = statuses(run, out, finite, dist)
    run.config.update(
        seconds=out.seconds, seconds_per_sample=out.seconds / run.total, batch_size_used=out.batch_size,
        final_batch_size_used=final_bs, oom_splits=run.oom["splits"], lr_halvings=int(out.halvings.sum()),
        samples_given_up=int((out.gave_up >= 0).sum()), denoiser_evals_per_sample=round(out.calls["denoiser"], 3),
        extractor_evals_per_sample=round(out.calls["extractor"], 3))
    if run.timer is not None:  # after run_id: profiling does not change what a run is
        run.config["profile"] = run.timer.summary(out.seconds)
    hist = torch.stack(out.histories, dim=1) if all(h is not None for h in out.histories) else None
    traj = None
    if return_trajectory and all(t is not None for t in out.trajectories):
        traj = torch.stack(out.trajectories, dim=1)
    return FiberResult(images=images, reference=run.ref.cpu(), feature_distance=dist, cosine=cos, status=status,
                       config=run.config, loss_history=hist, trajectory=traj, reference_ids=req.reference_ids,
                       features=feats, reference_features=run.ref_feats.cpu(), latents=out.x0)


def statuses(run: Run, out: Outputs, finite: torch.Tensor, dist: torch.Tensor) -> list[str]:
    """Each sample's status line (see :class:`FiberResult`), with its fault history."""
    sampler = run.req.sampler
    unit = "iteration" if sampler.iterations else "denoising step"
    total = run.req.hp.get(sampler.iterations, run.req.steps) if sampler.iterations else run.req.steps
    status = []
    for r in range(run.total):
        events = {k: int(v[r]) for k, v in out.events.items()}
        history = fault_history(events, int(out.halvings[r]), int(out.gave_up[r]), unit, total, sampler.step_knob)
        status.append(sample_status(finite=bool(finite[r]), dist_finite=bool(torch.isfinite(dist[r])),
                                    gave_up=int(out.gave_up[r]), faults=int(out.faults[r]),
                                    updates=int(out.updates[r]), guided=sampler.guided, history=history))
    return status
