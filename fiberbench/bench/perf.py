"""``bench perf``: where the time of a fiber run goes, and how far it is from what its arithmetic needs.

For each method and preset, one profiled :func:`~fiberbench.sampling.sample_fiber` run (``profile=True``) on one
batch gives

- the split of its sampling loop's wall time into stages (prior forward / backward, decode forward / backward,
  extractor forward / backward, optimiser, other; :class:`~fiberbench.sampling.problem.StageTimer`), their sum
  and the residual against the wall time;
- the arithmetic floor: the network calls the method cannot avoid (:func:`call_counts`), each at the median
  time of that unit operation on the same batch, networks, dtype and threads (:func:`unit_seconds`, timed just
  before and just after the run), per sample; and ``ratio_to_floor = seconds_per_sample / floor``;
- the evaluations per sample the run counted, beside those :func:`call_counts` predicts;
- the growth of peak memory from step 10 to the last step (:class:`PeakMemory`);

and the whole benchmark records its command, date, threads and load averages, so a reader can judge the noise.
:func:`measure_run` is one such row for any prior and extractor (``scripts/gpu_smoke.py`` uses it on CUDA).
"""
from __future__ import annotations

import os
import platform
import resource
import shlex
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from ..models import load_extractor, load_prior
from ..sampling import (
    FiberProblem,
    NoiseSource,
    PresetStepsWarning,
    fiber_distance,
    gamma_at,
    get_sampler,
    resolve_settings,
    sample_fiber,
)
from ..sampling.problem import STAGES, StageTimer
from ..seeds import QUALITY_SEED_BASE
from ..toy import references
from ..version import __version__

PERF_PRIOR, PERF_EXTRACTOR = "toy/prior-fm", "toy/shape-resnet@logits"
# (label, preset, steps): the toy preset at its own 20 steps; its single-particle, fixed-schedule variant toy-fast
# (NDTM only: the other methods ignore particles), which has an arithmetic floor; the fiber paper's ImageNet
# settings (gamma schedule, lr, 5 inner steps, time-dependent target, eta 1) at 50 of its 200 steps, which a CPU
# affords, and the same with the inner loop in 2 steps (imagenet-fast)
PRESET_RUNS = (("toy", "toy", None), ("toy-fast", "toy-fast", None), ("fiber-imagenet@50steps", "fiber-imagenet", 50),
               ("imagenet-fast@50steps", "imagenet-fast", 50))
QUICK_PRESET_RUNS = (("toy@10steps", "toy", 10), ("toy-fast@10steps", "toy-fast", 10),
                     ("fiber-imagenet@10steps", "fiber-imagenet", 10), ("imagenet-fast@10steps", "imagenet-fast", 10))
NDTM_ONLY = ("toy-fast", "imagenet-fast")  # DPS and unguided ignore what these change: their rows would repeat
METHODS = ("ndtm", "dps", "unguided", "metamer")
# unit operations of the floor; the reference_* ones run on the references' batch (target="time": h_t per step)
UNITS = ("prior_forward", "prior_forward_backward", "features_forward_backward", "extractor_forward_backward",
         "reference_prior_forward", "reference_features_forward")
MEMORY_STEP = 10  # memory growth is measured from this step on (the first steps allocate the working set)


def bench_perf(quick: bool = False, methods: tuple[str, ...] = METHODS, batch: int | None = None,
               reps: int | None = None) -> dict[str, Any]:
    """The perf benchmark on ``toy/prior-fm`` and ``toy/shape-resnet@logits``: one :func:`measure_run` per
    method and preset (metamer, which has no steps and ignores the presets but for the loss, once).

    ``batch``: samples per run (default 8, quick 4); ``reps``: timings of each unit operation before and after
    each run (default 5, quick 2). Returns ``{"benchmark": "perf", <environment>, "runs": [row, ...], ...}``
    (rows as :func:`measure_run`'s); torch's thread count is left as it is (``OMP_NUM_THREADS`` sets it).
    """
    t0 = time.perf_counter()
    batch = batch or (4 if quick else 8)
    reps = reps or (2 if quick else 5)
    env = environment()
    prior, extractor = load_prior(PERF_PRIOR), load_extractor(PERF_EXTRACTOR)
    refs, _ = references(1, seed=QUALITY_SEED_BASE)
    runs = []
    for k, (label, preset, steps) in enumerate(QUICK_PRESET_RUNS if quick else PRESET_RUNS):
        for method in methods:
            if (method == "metamer" and k) or (method != "ndtm" and preset in NDTM_ONLY):
                continue  # metamer has no steps, no gamma: every preset gives the same run
            with warnings.catch_warnings():  # fewer steps than a preset's own is the point of a label "@Nsteps"
                warnings.simplefilter("ignore", PresetStepsWarning)
                runs.append(measure_run(prior, extractor, refs, method=method, preset=preset, steps=steps,
                                        batch=batch, reps=reps, label=label,
                                        **({"iters": 50} if quick and method == "metamer" else {})))
    return {"benchmark": "perf", **env, "loadavg_end": list(os.getloadavg()), "prior": PERF_PRIOR,
            "extractor": PERF_EXTRACTOR, "batch": batch, "unit_reps": 2 * reps, "memory_step": MEMORY_STEP,
            "stages": list(STAGES), "runs": runs, "seconds": time.perf_counter() - t0}


def environment() -> dict[str, Any]:
    """What a reader needs to judge the noise: command, date (UTC), versions, device, threads, load at start."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
    return {"command": shlex.join(argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "fiberbench": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg_start": list(os.getloadavg())}


def measure_run(prior, extractor, reference: torch.Tensor, *, method: str, preset: str | None = None,
                steps: int | None = None, batch: int = 8, dtype: torch.dtype | None = None, reps: int = 5,
                label: str | None = None, seed: int = 0, unprofiled: bool = False, **hp) -> dict[str, Any]:
    """One profiled run of ``batch`` samples of the first reference ``[1,3,H,W]``, its floor and its memory.

    Returns a row: ``method``, ``preset``, ``label``, ``steps``, ``batch``, ``dtype``, ``loss``,
    ``seconds_per_sample`` and ``wall_seconds`` (the sampling loop), ``split_seconds`` / ``split_fraction`` (per
    stage, fraction of the wall time), ``split_sum_seconds``, ``residual_seconds`` / ``residual_fraction`` (wall
    minus the sum), ``stage_entries``, ``floor_seconds_per_sample``, ``ratio_to_floor``, ``floor`` (``counts``
    per unit operation, their median ``unit_seconds`` on the batch, ``guided_steps``),
    ``denoiser_evals_per_sample``, ``extractor_evals_per_sample``, ``expected_evals`` (from the counts),
    ``memory`` (:meth:`PeakMemory.report`), ``loadavg`` (1-minute load before and after), ``cosine_mean`` (of the
    samples' features to the reference's) and ``all_ok`` (every sample's status ``ok``). With ``unprofiled``
    a second, plain run adds ``seconds_per_sample_unprofiled`` and ``ratio_to_floor_unprofiled`` (on CUDA the
    profile's synchronisation removes the host/device overlap). ``hp``: the method's hyper-parameters.
    """
    ref = reference[:1]
    load0 = os.getloadavg()[0]
    settings, run_settings, _ = resolve_settings(method, preset, hp, prior)
    steps = steps or run_settings.get("steps", 50)
    loss = run_settings.get("loss", "cosine")
    counts = call_counts(method, settings, prior.schedule(steps).taus.tolist(), steps)
    needed = [u for u in UNITS if counts is not None and counts[u] > 0]
    ops = unit_ops(prior, extractor, ref, batch=batch, dtype=dtype, metric=loss, steps=steps)
    times = unit_seconds({u: ops[u] for u in needed}, reps, device=ops["device"], warmup=1)
    memory = PeakMemory(ops["device"], at_step=min(MEMORY_STEP, steps // 2))  # short (quick) runs: half-way
    memory.reset()
    kw = dict(n=batch, method=method, steps=steps, seed=seed, preset=preset, batch_size=batch, dtype=dtype,
              progress=False, **hp)
    # memory is read at the end of each denoising step; a callback would decode x0_hat at every step (a VAE pass
    # on latent priors) inside the timed loop. Metamer has no steps: its callback (which decodes nothing) reads it
    callback = None if get_sampler(method).uses_prior else memory.callback
    res = sample_fiber(prior, extractor, ref, callback=callback, profile=StageTimer(ops["device"], memory.step),
                       **kw)
    memory.finish()
    for u, v in unit_seconds({u: ops[u] for u in needed}, reps, device=ops["device"], warmup=0).items():
        times[u] += v
    row = run_row(res.config, counts, {u: statistics.median(v) for u, v in times.items()}, batch)
    row.update(label=label or preset or "none", batch=batch, dtype=str(dtype) if dtype else None,
               memory=memory.report(), loadavg=[load0, os.getloadavg()[0]], cosine_mean=float(res.cosine.mean()),
               all_ok=all(s == "ok" for s in res.status))
    if unprofiled:
        plain = sample_fiber(prior, extractor, ref, **kw).config["seconds_per_sample"]
        row["seconds_per_sample_unprofiled"] = plain
        row["ratio_to_floor_unprofiled"] = plain / row["floor_seconds_per_sample"] if counts else None
    return row


def run_row(config: dict[str, Any], counts: dict[str, int] | None, units: dict[str, float],
            batch: int) -> dict[str, Any]:
    """The row of one profiled run: its ``config`` (with ``profile``), the floor from ``counts`` and the median
    ``units`` (seconds per call on the batch), per sample of the ``batch``."""
    prof = config["profile"]
    wall = prof["wall_seconds"]
    floor = floor_seconds(counts, units, batch) if counts is not None else None
    spp = config["seconds_per_sample"]
    return {"method": config["method"], "preset": config["preset"], "steps": config["steps"],
            "loss": config["loss"], "seconds_per_sample": spp, "wall_seconds": wall,
            "split_seconds": prof["seconds"], "split_fraction": {k: v / wall for k, v in prof["seconds"].items()},
            "split_sum_seconds": prof["sum_seconds"], "residual_seconds": prof["residual_seconds"],
            "residual_fraction": prof["residual_seconds"] / wall, "stage_entries": prof["entries"],
            "floor_seconds_per_sample": floor, "ratio_to_floor": spp / floor if floor else None,
            "floor": {"counts": counts, "unit_seconds": units,
                      "guided_steps": counts.get("guided_steps") if counts else None},
            "denoiser_evals_per_sample": config["denoiser_evals_per_sample"],
            "extractor_evals_per_sample": config["extractor_evals_per_sample"],
            "expected_evals": expected_evals(counts, 1 / batch) if counts is not None else None}


def call_counts(method: str, hp: dict[str, Any], taus: list[float], steps: int) -> dict[str, int] | None:
    """The network calls a run of ``method`` with hyper-parameters ``hp`` must make, per unit of :data:`UNITS`
    (each call on the whole batch), plus ``guided_steps``; ``None`` for a method it does not know.

    ``taus``: the schedule's common times (first ``steps`` used). NDTM: every guided step (gamma > 0, lr > 0;
    recurrence repeats it) makes ``inner_steps`` prior and feature forward+backward passes, every step one prior
    forward (plus one for ``w_score``, and one per inner step for ``w_real``); DPS: a guided step is one prior and
    feature forward+backward, the others one prior forward; a time-dependent target costs one reference prior and
    feature forward per guided step; unguided: one prior forward per step; metamer: one extractor forward+backward per
    iteration. ``None`` too for an adaptive NDTM run (``particles`` or ``branches`` > 1, ``skip_tol``,
    ``early_draw_tol`` or ``exit_tol``): which rows it guides depends on the data, so it has no fixed floor; its row
    reports the evaluations it counted.
    """
    if method == "ndtm" and adaptive(hp):
        return None
    counts = dict.fromkeys(UNITS, 0)
    if method == "metamer":
        counts["extractor_forward_backward"] = int(hp["iters"])
        return {**counts, "guided_steps": 0}
    if method == "unguided":
        counts["prior_forward"] = steps
        return {**counts, "guided_steps": 0}
    if method not in ("ndtm", "dps"):
        return None
    guided = executed = 0
    for i, tau in enumerate(taus[:steps]):
        g = gamma_at(hp["gamma"], float(tau))
        if method == "ndtm":
            rate = hp["lr"] * (1.0 - i / steps) if hp["lr_decay"] == "linear" else hp["lr"]
            reps = int(hp["recurrence"]) if g > 0 and float(tau) >= hp["recurrence_tau"] else 1
            on = g > 0 and hp["inner_steps"] > 0 and rate > 0
        else:
            reps, on = 1, g > 0 and hp["scale"] > 0
        executed += reps
        guided += reps if on else 0
    inner = int(hp["inner_steps"]) if method == "ndtm" else 1
    counts["prior_forward_backward"] = counts["features_forward_backward"] = guided * inner
    counts["prior_forward"] = executed if method == "ndtm" else executed - guided
    if method == "ndtm" and hp["w_score"]:
        counts["prior_forward"] += guided
    if method == "ndtm" and hp["w_real"]:  # the realism term's denoiser forward at every inner step
        counts["prior_forward"] += guided * inner
    if hp["target"] == "time":
        counts["reference_prior_forward"] = counts["reference_features_forward"] = guided
    return {**counts, "guided_steps": guided}


def adaptive(hp: dict[str, Any]) -> bool:
    """Whether NDTM hyper-parameters ``hp`` make the network calls data-dependent (particles, branches, skips,
    exits)."""
    return (int(hp.get("particles", 1)) > 1 or int(hp.get("branches", 1)) > 1 or bool(hp.get("skip_tol"))
            or bool(hp.get("early_draw_tol")) or bool(hp.get("exit_tol")))


def expected_evals(counts: dict[str, int], share: float = 1.0) -> dict[str, float]:
    """Denoiser and extractor evaluations per sample that ``counts`` (:func:`call_counts`) imply.

    ``share``: references per sample in a batch (a call on the references' rows counts that fraction of a call
    on the samples': ``1 / n`` when a batch holds ``n`` samples of each of its references).
    """
    return {"denoiser": counts["prior_forward"] + counts["prior_forward_backward"]
            + counts["reference_prior_forward"] * share,
            "extractor": counts["features_forward_backward"] + counts["extractor_forward_backward"]
            + counts["reference_features_forward"] * share}


def floor_seconds(counts: dict[str, int], units: dict[str, float], batch: int) -> float:
    """Seconds per sample of the unavoidable calls: sum over units of count x median seconds, over ``batch``."""
    return sum(counts[u] * units[u] for u in UNITS if counts[u]) / batch


def unit_ops(prior, extractor, ref: torch.Tensor, *, batch: int, dtype: torch.dtype | None, metric: str,
             steps: int) -> dict[str, Any]:
    """The unit operations of :data:`UNITS` as closures on a batch of ``batch`` (references: ``ref`` ``[R,3,H,W]``),
    through :class:`FiberProblem` as the samplers call them, at the middle time of a ``steps``-step schedule;
    ``"device"``: the prior's device."""
    device = next(prior.parameters()).device
    ref = ref.to(device)
    with torch.no_grad():
        target = extractor.to(device)(ref).float()
        ref_x0 = prior.encode(ref)
    noise = NoiseSource(range(batch), prior.sample_shape, device)
    problem = FiberProblem(prior=prior, extractor=extractor, target=target.expand(batch, -1), metric=metric,
                           noise=noise, autocast=dtype)
    t = prior.schedule(steps).times[steps // 2]
    x = noise.draw()
    x0 = ref_x0[:1].expand(batch, *ref_x0.shape[1:]).contiguous()  # the calls' cost does not depend on values
    images = prior.decode(x0).detach()

    def grad_of(fn: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor) -> None:
        with torch.enable_grad():
            leaf = inp.detach().requires_grad_(True)
            torch.autograd.grad(fn(leaf).sum(), leaf)

    def pixels_loss(img: torch.Tensor) -> torch.Tensor:
        with problem.amp():
            feats = extractor(img).float()
        return fiber_distance(feats, problem.target, metric)

    @torch.no_grad()
    def forward(fn: Callable[[], Any]) -> None:
        fn()

    return {"device": device,
            "prior_forward": lambda: forward(lambda: problem.denoise(x, t)),
            "prior_forward_backward": lambda: grad_of(lambda v: problem.denoise(v, t)[0], x),
            "features_forward_backward": lambda: grad_of(lambda v: problem.loss(v, problem.target), x0),
            "extractor_forward_backward": lambda: grad_of(pixels_loss, images),
            "reference_prior_forward": lambda: forward(lambda: problem.denoise(x[:ref.shape[0]], t)),
            "reference_features_forward": lambda: forward(lambda: problem.features(x0[:ref.shape[0]]))}


def unit_seconds(ops: dict[str, Callable[[], None]], reps: int, device, warmup: int = 1) -> dict[str, list[float]]:
    """``reps`` wall times (seconds) of each operation in ``ops`` after ``warmup`` untimed calls, interleaved (one
    of each per round, so a change of load hits all alike); CUDA is synchronised around each."""
    sync = torch.device(device).type == "cuda"

    def clock() -> float:
        if sync:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    for _ in range(warmup):
        for op in ops.values():
            op()
    out: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(reps):
        for k, op in ops.items():
            t0 = clock()
            op()
            out[k].append(clock() - t0)
    return out


class PeakMemory:
    """Peak memory of this process at step :data:`MEMORY_STEP` of a run, at its last step and after it.

    CPU: ``ru_maxrss``, its high-water mark reset at the run's start through ``/proc/self/clear_refs`` where
    Linux allows (``peak_reset``; otherwise the peak is the process's since it started, so growth shows only
    above earlier peaks). CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
    :meth:`step` is a :class:`StageTimer`'s ``on_step``; :meth:`callback` the same as a run's callback.
    """

    def __init__(self, device, at_step: int = MEMORY_STEP):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.at = at_step
        self.peak_reset = False
        self.read_step: int | None = None  # the step of the first reading (metamer: an iteration)
        self.at_step = self.last_step = self.after_run = None

    def reset(self) -> None:
        """Start a run: reset the high-water mark where possible and forget earlier readings."""
        self.read_step = self.at_step = self.last_step = self.after_run = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak_reset = True
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # 5: reset the peak RSS (Linux >= 4.0)
            self.peak_reset = True
        except OSError:
            self.peak_reset = False

    def peak(self) -> int:
        """Peak bytes so far (see the class docstring)."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux

    def step(self, i: int) -> None:
        """Step ``i`` has ended: the first reading at step ``at_step`` or the first after it, then every step."""
        if i < self.at:
            return
        if self.at_step is None:
            self.read_step, self.at_step = int(i), self.peak()
        self.last_step = self.peak()

    def callback(self, info: dict[str, Any]) -> None:
        """:meth:`step` as a run's callback (``info["i"]``)."""
        self.step(info["i"])

    def finish(self) -> None:
        """After the run (its final decode and feature pass included)."""
        self.after_run = self.peak()

    def report(self) -> dict[str, Any]:
        """``measure``, ``peak_reset``, ``from_step`` (asked), ``step`` (read) and, in MiB, the peak there, at the
        last step and after the run, and ``growth_mib`` (last step - step; ``None`` if the run had fewer steps)."""
        def mib(v: int | None) -> float | None:
            return None if v is None else v / 2 ** 20

        growth = None if self.at_step is None else mib(self.last_step - self.at_step)
        return {"measure": "torch.cuda.max_memory_allocated" if self.cuda else "ru_maxrss",
                "peak_reset": self.peak_reset, "from_step": self.at, "step": self.read_step,
                "at_step_mib": mib(self.at_step), "last_step_mib": mib(self.last_step),
                "after_run_mib": mib(self.after_run), "growth_mib": growth}
