"""What every sampler works on: the fiber problem, per-sample noise, the fiber loss and the guidance schedule.

A sampler never asks which prior or extractor it holds: it calls :meth:`FiberProblem.denoise` (one prior
call, counted), :meth:`FiberProblem.loss` (decode + extractor + fiber distance, counted), draws all its
randomness from :attr:`FiberProblem.noise` (one generator per sample, so a sample is the same alone or in
any batch) and books non-finite values through :meth:`FiberProblem.fault`. With a :class:`StageTimer`
attached (``sample_fiber(..., profile=True)``) those calls also split the run's wall time into stages.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError

LOSSES = ("l2", "cosine", "nl2")

# A sample whose fiber loss or gradient (or, for NDTM/DPS, next state) is non-finite goes back to its last
# finite iterate with a fresh optimiser state and half its step size; a fault after MAX_HALVINGS halvings in a
# row (no finite evaluation in between) gives up its guidance: the sample finishes unguided, marked failed.
MAX_HALVINGS = 4


def gamma_at(gamma, tau: float) -> float:
    """Guidance weight at common time ``tau`` for a constant or a segment list.

    Segments ``(g_start, g_end, tau_from, tau_to)`` with ``tau_from > tau_to``;
    inside one, gamma goes linearly from ``g_start`` (at ``tau_from``) to
    ``g_end`` (at ``tau_to``). Outside every segment gamma is 0.
    """
    if isinstance(gamma, (int, float)):
        return float(gamma)
    for g0, g1, a, b in gamma:
        hi, lo = max(a, b), min(a, b)
        if lo <= tau <= hi and (tau < hi or hi >= 1000 or tau == hi):
            frac = 0.0 if a == b else (a - tau) / (a - b)
            return float(g0 + (g1 - g0) * frac)
    return 0.0


def fiber_distance(feats: torch.Tensor, target: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-sample fiber loss ``[M]`` between features ``[M,D]`` and targets ``[M,D]``.

    ``l2``: ||f - h||_2 (unsquared, the paper's); ``cosine``: 1 - cos(f, h);
    ``nl2``: ||f - h||_2 / ||h||_2.
    """
    if metric == "l2":
        return (feats - target).norm(dim=-1)
    if metric == "cosine":
        return 1 - F.cosine_similarity(feats, target, dim=-1, eps=1e-8)
    if metric == "nl2":
        return (feats - target).norm(dim=-1) / target.norm(dim=-1).clamp(min=1e-8)
    raise ConfigError(f"unknown fiber loss {metric!r}; choose one of {LOSSES}")


class NoiseSource:
    """One ``torch.Generator`` per sample, so sample *i* is the same alone or in any batch.

    Noise is drawn on the CPU (reproducible across devices) and moved to ``device``.
    """

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device, dtype=torch.float32):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device, self.dtype = tuple(shape), device, dtype

    def draw(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Standard normal noise ``[M, *shape]``, one row from each sample's generator."""
        shape = tuple(shape or self.shape)
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens]).to(self.device, self.dtype)

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform noise on [0, 1) ``[M, *shape]``, one row from each sample's generator."""
        return torch.stack([torch.rand(shape, generator=g) for g in self.gens]).to(self.device, self.dtype)

    def subset(self, idx: torch.Tensor) -> NoiseSource:
        """The samples ``idx`` ``[P]``: a source drawing from their generators only (shared, not copied), so the
        other samples' streams do not advance."""
        sub = NoiseSource([], self.shape, self.device, self.dtype)
        sub.gens = [self.gens[int(i)] for i in idx.tolist()]
        return sub


class RowNoise:
    """The noise of some rows of a problem: every draw is taken from *all* of ``base``'s generators (so each
    sample's stream advances as in a full batch) and then restricted to the rows ``idx``."""

    def __init__(self, base: Any, idx: torch.Tensor):
        self.base, self.idx = base, idx
        self.shape = base.shape

    def draw(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        return self.base.draw(shape)[self.idx.to(self.base.device)]

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.base.uniform(shape)[self.idx.to(self.base.device)]

    def subset(self, idx: torch.Tensor) -> Any:
        """The rows ``idx`` of these rows, drawing from their generators only (see :meth:`NoiseSource.subset`)."""
        return self.base.subset(self.idx.to(idx.device)[idx])

    @property
    def device(self):
        return self.base.device


class ParticleNoise:
    """``k`` particles per sample: a draw is ``[M*k, *shape]``, rows ``i*k .. i*k+k-1`` from sample i's generator
    (so a sample's particles are the same alone or in any batch)."""

    def __init__(self, base: NoiseSource, k: int):
        self.base, self.k = base, int(k)
        self.shape, self.device = base.shape, base.device

    def draw(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        shape = tuple(shape or self.shape)
        return self.base.draw((self.k,) + shape).reshape(-1, *shape)

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.base.uniform((self.k,) + tuple(shape)).reshape(-1, *shape)


# The stages of a profiled run, in the order a guided inner step goes through them (see StageTimer).
STAGES = ("prior_forward", "decode_forward", "extractor_forward", "extractor_backward", "decode_backward",
          "prior_backward", "optimiser", "other")


class StageTimer:
    """Wall time per stage of a sampling run (``sample_fiber(..., profile=True)``), from timestamps at stage changes.

    The stages tile the run: every moment belongs to the stage entered last, so their sum is the time between
    :meth:`start` and :meth:`stop`. :meth:`FiberProblem.denoise` and :meth:`FiberProblem.features` (and the
    extractor, wrapped in :class:`TimedExtractor`) enter the forward stages; gradient hooks on the tensors
    between the networks enter the backward ones. In one ``backward()`` the gradient of the extractor's output is
    complete first (its backward starts), then that of its input images (decode backward starts), then that of
    x0_hat (prior backward starts), then that of the prior's input: from there to the next network call is
    ``optimiser`` (NDTM and metamer: the fault guard, gradient clipping and RowAdam; DPS: its guided update and
    prior step). ``other`` is the rest: prior steps outside DPS's guided update, noise draws, the fiber distance,
    recording and callbacks. On CUDA every timestamp synchronises the device, so a stage is charged with its
    kernels and not only their launch (which also removes the host/device overlap a plain run has).
    ``on_step(i)`` is called at the end of every denoising step ``i`` (from :meth:`FiberProblem.record`), e.g. to
    read the peak memory without a callback, which would decode x0_hat at every step.
    """

    def __init__(self, device: torch.device | str, on_step: Callable[[int], None] | None = None):
        self.device = torch.device(device)
        self.sync = self.device.type == "cuda"
        self.on_step = on_step
        self.seconds = dict.fromkeys(STAGES, 0.0)  # stage -> seconds spent in it
        self.entries = dict.fromkeys(STAGES, 0)  # stage -> times entered (forward stages: network calls)
        self.stage, self.since = "other", None
        self.spent: list[Any] = []  # handles of hooks that have fired; removed outside backward

    def now(self) -> float:
        """``time.perf_counter()`` after the device's queued work is done."""
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        """Start timing (in ``other``)."""
        self.stage, self.since = "other", self.now()

    def stop(self) -> None:
        """Charge the open stage up to now and stop; stages entered until the next :meth:`start` are ignored."""
        if self.since is not None:
            self.seconds[self.stage] += self.now() - self.since
        self.stage, self.since = "other", None

    def enter(self, stage: str) -> None:
        """Charge the open stage up to now and open ``stage``."""
        if self.since is None:
            return
        now = self.now()
        self.seconds[self.stage] += now - self.since
        self.stage, self.since = stage, now
        self.entries[stage] += 1

    def forward(self, stage: str, inputs: torch.Tensor, then: str) -> None:
        """Enter forward ``stage`` of a network whose ``inputs`` open stage ``then`` once their gradient is complete."""
        while self.spent:  # not inside backward: a hook must not remove itself while autograd runs it
            self.spent.pop().remove()
        self.enter(stage)
        self.watch(inputs, then)

    def watch(self, tensor: torch.Tensor, stage: str) -> None:
        """Enter ``stage`` when the gradient of ``tensor`` is complete (once; nothing if it needs no gradient)."""
        if not tensor.requires_grad:
            return
        handle = None

        def hook(grad: torch.Tensor) -> None:
            self.enter(stage)
            self.spent.append(handle)  # a leaf (metamer's image) is hooked again each iteration

        handle = tensor.register_hook(hook)

    def step(self, i: int) -> None:
        """Step ``i`` of a batch has ended (calls ``on_step``)."""
        if self.on_step is not None:
            self.on_step(i)

    def summary(self, wall_seconds: float) -> dict[str, Any]:
        """Seconds and entries per stage, their sum, the run's ``wall_seconds`` and the residual (wall - sum:
        the time outside the sampler functions, e.g. setting up each batch)."""
        total = sum(self.seconds.values())
        return {"seconds": dict(self.seconds), "entries": dict(self.entries), "sum_seconds": total,
                "wall_seconds": wall_seconds, "residual_seconds": wall_seconds - total, "synchronized": self.sync}


class TimedExtractor:
    """An extractor whose calls enter the :class:`StageTimer`'s extractor stages; other attributes are the
    extractor's. A sampler calling ``problem.extractor`` directly (``metamer``) is timed through it too."""

    def __init__(self, inner: Any, timer: StageTimer):
        self.inner, self.timer = inner, timer

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "timer"):  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, images: torch.Tensor, then: str = "optimiser") -> torch.Tensor:
        """Features ``[N,D]`` of images ``[N,3,H,W]``; ``then``: the stage after the gradient of ``images``."""
        self.timer.forward("extractor_forward", images, then)
        feats = self.inner(images)
        self.timer.watch(feats, "extractor_backward")
        self.timer.enter("other")
        return feats



BOOKKEEPING = ("halvings", "scale_exp", "streak", "gave_up", "updates")  # [M] tensors beside faults and events


@dataclass
class FiberProblem:
    """What a sampler needs: the prior, the fiber loss, targets and per-sample noise, plus bookkeeping."""

    prior: Any
    extractor: Any
    target: torch.Tensor  # [M,D] fixed targets f(x_ref) per sample
    metric: str
    noise: NoiseSource
    ref_latent: torch.Tensor | None = None  # [R,C,H,W] encode(x_ref) of the R references in this batch
    ref_noise: torch.Tensor | None = None  # [R,C,H,W] fixed noise per reference used for h_t
    ref_rows: torch.Tensor | None = None  # [M] which of the R references each sample belongs to
    autocast: torch.dtype | None = None
    calls: dict[str, float] = field(default_factory=lambda: {"denoiser": 0, "extractor": 0})
    faults: torch.Tensor | None = None  # [M] count of non-finite events per sample
    history: list[torch.Tensor] = field(default_factory=list)  # per step: [M] fiber loss (NaN where not computed)
    trajectory: list[torch.Tensor] | None = None
    # fault bookkeeping, all [M] on the CPU (see fault()):
    events: dict[str, torch.Tensor] = field(default_factory=dict)  # "loss" | "gradient" | "state" -> count
    halvings: torch.Tensor | None = None  # step-size halvings in all
    scale_exp: torch.Tensor | None = None  # the current step scale is 0.5 ** scale_exp (NDTM: reset every step)
    streak: torch.Tensor | None = None  # faults since the last finite evaluation
    gave_up: torch.Tensor | None = None  # step/iteration at which guidance was given up, -1 while guided
    updates: torch.Tensor | None = None  # guided updates taken with a finite loss and gradient
    timer: StageTimer | None = None  # profiling only (see attach)
    sdedit: bool = False  # starts from the references noised to the schedule's first time (see fresh_start)

    def __post_init__(self):
        m = self.target.shape[0]
        if self.faults is None:
            self.faults = torch.zeros(m, dtype=torch.long)
        self.events = {k: torch.zeros(m, dtype=torch.long) for k in ("loss", "gradient", "state")}
        self.halvings = torch.zeros(m, dtype=torch.long)
        self.scale_exp = torch.zeros(m, dtype=torch.long)
        self.streak = torch.zeros(m, dtype=torch.long)
        self.gave_up = torch.full((m,), -1, dtype=torch.long)
        self.updates = torch.zeros(m, dtype=torch.long)

    def fresh_start(self, sched) -> torch.Tensor:
        """A starting state for every row from its noise: pure noise at the schedule's top time, or (SDEdit)
        the row's reference noised to the schedule's first time."""
        if self.sdedit:
            return self.prior.add_noise(self.ref_latent[self.ref_rows], sched.times[0], self.noise.draw())
        return self.noise.draw() * sched.sigmas[0]  # alpha ~ 0 at the top time: pure noise

    def rows(self, idx: torch.Tensor, noise: Any = None) -> FiberProblem:
        """The problem of the rows ``idx`` ``[P]`` (int64; repeats allowed) of this one: targets, reference rows and
        fault bookkeeping copied, its own call counts (see :meth:`merge`), ``noise`` or this problem's noise
        drawn in full and restricted to ``idx`` (:class:`RowNoise`)."""
        dev = self.target.device
        sub = FiberProblem(prior=self.prior, extractor=self.extractor, target=self.target[idx.to(dev)],
                           metric=self.metric, noise=noise if noise is not None else RowNoise(self.noise, idx),
                           ref_latent=self.ref_latent, ref_noise=self.ref_noise,
                           ref_rows=None if self.ref_rows is None else self.ref_rows[idx.to(dev)],
                           autocast=self.autocast, faults=self.faults[idx.cpu()].clone(), sdedit=self.sdedit)
        sub.timer = self.timer  # the extractor is already wrapped when profiling
        for name in BOOKKEEPING:
            setattr(sub, name, getattr(self, name)[idx.cpu()].clone())
        sub.events = {k: v[idx.cpu()].clone() for k, v in self.events.items()}
        return sub

    def merge(self, sub: FiberProblem, idx: torch.Tensor | None = None) -> None:
        """Take back the work of ``sub``: its network calls, counted per row of this problem (a call on P rows
        costs ``P / M`` evaluations per sample here), and, for ``idx`` ``[P]``, its fault bookkeeping into those
        rows (``None``: calls only)."""
        m, p = self.target.shape[0], sub.target.shape[0]
        for k in self.calls:
            self.calls[k] += sub.calls[k] * p / m
            sub.calls[k] = 0
        if idx is None:
            return
        ic = idx.cpu()
        self.faults[ic] = sub.faults
        for name in BOOKKEEPING:
            getattr(self, name)[ic] = getattr(sub, name)
        for k in self.events:
            self.events[k][ic] = sub.events[k]

    def live(self) -> torch.Tensor:
        """``[M]`` bool (on the targets' device): samples still guided (not given up)."""
        return (self.gave_up < 0).to(self.target.device)

    def step_scales(self) -> list[float]:
        """Per-sample step-size factor ``0.5 ** scale_exp`` (exactly 1.0 for a sample without faults)."""
        return [0.5 ** int(h) for h in self.scale_exp]

    def fault(self, bad: torch.Tensor, kind: str, step: int, halve: bool = True) -> None:
        """Book a non-finite ``kind`` (``loss`` | ``gradient`` | ``state``) for the samples in ``bad`` ([M] bool).

        Each fault halves that sample's step scale (when ``halve``); a fault that follows ``MAX_HALVINGS``
        others with no finite evaluation in between gives up its guidance at ``step`` instead. Samples
        already given up are not booked again.
        """
        bad = bad.detach().cpu() & (self.gave_up < 0)
        if not bad.any():
            return
        self.faults[bad] += 1
        self.events[kind][bad] += 1
        give_up = bad & (self.streak >= MAX_HALVINGS)
        self.streak[bad] += 1
        if halve:
            self.halvings[bad & ~give_up] += 1
            self.scale_exp[bad & ~give_up] += 1
        self.gave_up[give_up] = step

    def finite(self, ok: torch.Tensor) -> None:
        """The samples in ``ok`` ([M] bool) had a finite evaluation and take their update: their streak ends."""
        ok = ok.detach().cpu()
        self.streak[ok] = 0
        self.updates[ok] += 1

    def attach(self, timer: StageTimer) -> None:
        """Profile this problem's network calls with ``timer`` (the extractor is wrapped in a
        :class:`TimedExtractor`); nothing else changes, outputs are bit for bit those of a plain run."""
        self.timer = timer
        self.extractor = TimedExtractor(self.extractor, timer)

    def amp(self):
        """The autocast context of the networks (``autocast`` dtype on the targets' device; off when None)."""
        dev = self.target.device.type
        return torch.autocast(dev, dtype=self.autocast, enabled=self.autocast is not None)

    def count(self, network: str, x: torch.Tensor) -> None:
        """Book one call of ``network`` on the ``P`` rows of ``x`` as ``P / M`` evaluations per sample of this
        problem's ``M`` (the references' rows of h_t, or the few rows a fault redoes, cost that fraction)."""
        self.calls[network] += x.shape[0] / self.target.shape[0]

    def denoise(self, x_t: torch.Tensor, t, clamp: bool | float = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One counted prior call under the run's autocast: ``(x0_hat, eps_hat)`` in float32."""
        self.count("denoiser", x_t)
        if self.timer is not None:
            self.timer.forward("prior_forward", x_t, then="optimiser")
        with self.amp():
            x0, eps = self.prior.denoise(x_t, t, clamp=clamp)
        x0, eps = x0.float(), eps.float()
        if self.timer is not None:
            self.timer.enter("other")
        return x0, eps

    def features(self, x0: torch.Tensor) -> torch.Tensor:
        """Extractor features ``[M,D]`` of prior-space x0 (decoded to [0,1] images first); see
        :func:`checked_features`."""
        self.count("extractor", x0)
        with self.amp():
            if self.timer is None:
                return checked_features(self.extractor(self.prior.decode(x0)), x0, self.extractor)
            self.timer.forward("decode_forward", x0, then="prior_backward")
            return checked_features(self.extractor(self.prior.decode(x0), then="decode_backward"), x0,
                                    self.extractor)

    def target_at(self, t, mode: str) -> torch.Tensor:
        """The fiber target at model time ``t``: fixed f(x_ref), or h_t = f(x0_hat(x_ref noised to t)) (one prior and
        one extractor call on the R references, counted as R/M of a call on the M samples)."""
        if mode == "fixed" or self.ref_latent is None:
            return self.target
        if mode != "time":
            raise ConfigError(f"unknown target mode {mode!r}; use 'fixed' or 'time'")
        with torch.no_grad():  # once per reference, not once per sample: samples of a fiber share h_t
            x_t = self.prior.add_noise(self.ref_latent, t, self.ref_noise)
            x0, _ = self.denoise(x_t, t)
            return self.features(x0)[self.ref_rows]

    def loss(self, x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample fiber loss ``[M]`` of prior-space x0."""
        return fiber_distance(self.features(x0), target, self.metric)

    def rows_loss(self, x0: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Fiber loss ``[P]`` of the x0_hat ``x0`` ``[P,...]`` of rows ``idx`` against their fixed targets; the
        extractor's calls are counted for those rows only."""
        sub = self.rows(idx)
        out = sub.loss(x0, sub.target)
        self.merge(sub)
        return out

    def record(self, loss: torch.Tensor | None, x0: torch.Tensor | None = None) -> None:
        """End of a step: its per-sample loss ``[M]`` (NaN where none was computed) and, when a trajectory is
        kept, the decoded x0_hat."""
        m = self.target.shape[0]
        self.history.append(loss.detach().float().cpu() if loss is not None else torch.full((m,), float("nan")))
        if self.trajectory is not None and x0 is not None:
            self.trajectory.append(self.prior.decode(x0.detach()).cpu())
        if self.timer is not None:
            self.timer.step(len(self.history) - 1)


def checked_features(feats: Any, images: torch.Tensor, extractor: Any) -> torch.Tensor:
    """An extractor's output for ``images`` ``[N,...]`` as float32 ``[N,D]``, or ``ConfigError`` naming the extractor.

    One row per image: an output broadcast over the batch (``[1,D]`` for any ``N``) would otherwise compare every
    sample with the same features and report it ``ok``. Real-valued: integer outputs (class indices) have no
    gradient and no fiber distance. Higher-dimensional outputs are flattened per image, as ``Extractor`` does.
    """
    spec = getattr(extractor, "spec", type(extractor).__name__)
    if not isinstance(feats, torch.Tensor):
        raise ConfigError(f"extractor {spec} returned a {type(feats).__name__}, not a tensor of features [N,D]")
    if not feats.is_floating_point():
        kind = "complex" if feats.is_complex() else "boolean" if feats.dtype == torch.bool else "integer"
        raise ConfigError(f"extractor {spec} returned {kind} features ({feats.dtype}); fibers need real-valued "
                          f"features such as logits or embeddings, not class indices")
    n = images.shape[0]
    if feats.ndim < 2 or feats.shape[0] != n:
        raise ConfigError(f"extractor {spec} returned features of shape {tuple(feats.shape)} for {n} images: an "
                          f"extractor must return one row per image, [N,D] (feats[:, None] for one value per image)")
    return feats.flatten(1).float()


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the rows of ``t`` ``[N,...]`` whose values are all finite."""
    return torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
