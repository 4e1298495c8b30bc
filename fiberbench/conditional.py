"""The trained baseline: a flow-matching generator conditioned on an extractor's features.

The fiber paper's other route (RCDM, Bordes et al. 2022; invertible networks,
Rombach et al. 2020) *trains* a generator ``p(x | f(x))`` per extractor and
samples a fiber by conditioning it on ``f(x_ref)``. NDTM needs no training;
this module is the comparison on equal footing in the shapes world
(``method: "conditional"`` in :func:`fiberbench.groundtruth.run_invariance_bench`).

Model (``toy/cond-fm-shape-resnet``, :class:`FeatureConditionedFlow`): the toy
prior's ``UNet2DModel`` (same config, initialised from ``toy/prior-fm``'s weights)
with ``class_embed_type="identity"``; one small MLP per conditioning layer
(``logits`` [4], ``pre_logits`` [128] of ``toy/shape-resnet``) maps the
standardised features to the time-embedding width and is added to it. The last
layer of every MLP starts at zero, so training starts at the unconditional prior;
a zero embedding is the "no condition" token (classifier-free guidance).

Training (:func:`train_conditional`): rectified flow exactly as the prior
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

Sampling (:func:`sample_conditional`): Euler steps on the sigmas of
``FlowMatchEulerDiscreteScheduler`` (shift from the card), one generator per
sample (as :func:`fiberbench.sampling.sample_fiber`: sample *j* of reference *i*
is the same alone or in any batch), returning a
:class:`~fiberbench.sampling.FiberResult`.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = ["NAME", "SPEC", "LAYERS", "FeatureConditionedFlow", "load_conditional", "trained_for",
           "sample_conditional", "train_conditional", "evaluate_conditional"]

NAME = "cond-fm-shape-resnet"
SPEC = f"toy/{NAME}"
EXTRACTOR = "toy/shape-resnet"
LAYERS = ("logits", "pre_logits")
EVAL_SEED = 70_000  # references of the card's metrics: unused by training (>= 10**6) and the benches


class FeatureConditionedFlow(nn.Module):
    """Velocity network ``v(x_t, t | h)``: a ``UNet2DModel`` whose time embedding gets ``proj[layer](h)`` added.

    Args:
        unet: a ``UNet2DModel`` built with ``class_embed_type="identity"``.
        dims: ``{layer: feature dimension}`` of the conditioning layers.
        hidden: width of each projection MLP.
        feature_mean, feature_std: ``{layer: [D]}`` standardisation of the features (measured on renders).
    """

    def __init__(self, unet: nn.Module, dims: dict[str, int], hidden: int = 256,
                 feature_mean: dict[str, torch.Tensor] | None = None,
                 feature_std: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if getattr(unet.config, "class_embed_type", None) != "identity":
            raise ConfigError("the conditional UNet needs class_embed_type='identity'")
        self.unet = unet
        self.layers = list(dims)
        width = unet.time_embedding.linear_2.out_features
        self.proj = nn.ModuleDict()
        for layer, d in dims.items():
            mlp = nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, width))
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)
            self.proj[layer] = mlp
            mean = (feature_mean or {}).get(layer, torch.zeros(d))
            std = (feature_std or {}).get(layer, torch.ones(d))
            self.register_buffer(f"mean_{layer}", torch.as_tensor(mean, dtype=torch.float32).clone())
            self.register_buffer(f"std_{layer}", torch.as_tensor(std, dtype=torch.float32).clone())
        self.width = width

    def embed(self, feats: torch.Tensor, layer: str, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Condition embedding ``[N, width]``; rows with ``keep`` False get the null (zero) embedding."""
        if layer not in self.proj:
            raise ConfigError(f"the conditional model was trained on layers {self.layers}, not {layer!r}")
        z = (feats.float() - getattr(self, f"mean_{layer}")) / getattr(self, f"std_{layer}")
        e = self.proj[layer](z)
        if keep is not None:
            e = e * keep.to(e.dtype).view(-1, 1)
        return e

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        """Velocity at ``x_t [N,3,32,32]`` (range [-1,1]), model time ``t [N]`` (= 1000 sigma); ``emb`` from
        :meth:`embed` (``None``: unconditional)."""
        if emb is None:
            emb = x_t.new_zeros(x_t.shape[0], self.width)
        return self.unet(x_t, t, class_labels=emb).sample


# --------------------------------------------------------------------------- card, build, load

def _card_template(unet_cfg: dict, dims: dict[str, int], hidden: int, shift: float) -> dict[str, Any]:
    return {
        "name": NAME, "spec": SPEC, "kind": "conditional",
        "description": "Flow-matching generator of the shapes world conditioned on toy/shape-resnet's features "
                       "(logits or pre-logits), trained with the flow loss plus a fiber-loss term: the trained "
                       "baseline (RCDM family) of the ground-truth invariance benchmark",
        "architecture": {"library": "fiberbench", "class": "FeatureConditionedFlow",
                         "config": {"unet": {**unet_cfg, "class_embed_type": "identity"},
                                    "condition": {"extractor": EXTRACTOR, "dims": dims, "hidden": hidden,
                                                  "standardised": "per-dimension mean/std of the features of "
                                                                  "fresh renders (stored as buffers)",
                                                  "null": "zero embedding (condition dropout / CFG)"}}},
        "data_range": [-1.0, 1.0],
        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler",
                      "config": {"num_train_timesteps": 1000, "shift": shift}},
        "prediction_type": "flow",
    }


def build_model(card: dict[str, Any]) -> FeatureConditionedFlow:
    """A :class:`FeatureConditionedFlow` with the card's architecture (random weights, zero projections)."""
    from .toy.models import build_unet

    cfg = card["architecture"]["config"]
    cond = cfg["condition"]
    return FeatureConditionedFlow(build_unet(cfg["unet"]), {k: int(v) for k, v in cond["dims"].items()},
                                  hidden=int(cond["hidden"]))


def load_conditional(name: str = NAME, root: Path | None = None, device: str = "cpu"):
    """The shipped conditional model: ``(FeatureConditionedFlow.eval() with frozen weights, card)`` (safetensors,
    no pickle)."""
    from .toy import models as M

    card = M.read_card(name, root)
    if card.get("kind") != "conditional":
        raise ConfigError(f"toy model {name!r} is a {card.get('kind')!r}, not a conditional generator")
    model = build_model(card)
    M.load_weights(name, model, root)
    model.card = card
    return model.eval().requires_grad_(False).to(device), card


def _base_and_layer(spec: str) -> tuple[str, str]:
    base, _, layer = str(spec).partition("@")
    return base, layer or "logits"


def trained_for(card: dict[str, Any], extractor_spec: str) -> bool:
    """Whether the model of ``card`` was trained for ``extractor_spec`` (e.g. ``toy/shape-resnet@logits``)."""
    cond = card["architecture"]["config"]["condition"]
    base, layer = _base_and_layer(extractor_spec)
    return base == cond["extractor"] and layer in cond["dims"]


def _scheduler_sigmas(card: dict[str, Any], steps: int) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(card["scheduler"]["config"])
    sched.set_timesteps(steps)
    return sched.sigmas.to(torch.float32)  # steps + 1 values, from ~1 down to 0


# --------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample_conditional(model: FeatureConditionedFlow, extractor, reference, n: int = 8, steps: int = 20,
                       seed: int = 0, guidance: float | None = None, batch_size: int = 64,
                       reference_ids: Sequence[str] | None = None, condition: bool = True):
    """Draw ``n`` samples of the conditional generator for each reference, conditioned on ``extractor(ref)``.

    Args:
        model: from :func:`load_conditional`.
        extractor: the extractor whose fiber is sampled (an Extractor or a spec string); its spec must be one
            the model was trained for (``toy/shape-resnet@logits`` / ``@pre_logits``), else ``ConfigError``.
        reference: ``[3,32,32]`` or ``[B,3,32,32]`` in [0,1].
        steps: Euler steps on the card's scheduler sigmas.
        seed: sample ``j`` of reference ``i`` draws its noise from ``sample_seed(seed, i, j)`` (as ``sample_fiber``).
        guidance: classifier-free guidance scale (1 = the plain conditional model; ``g``: ``u + g (c - u)``);
            ``None``: the card's ``sampling_default`` (2.0 for the shipped model, chosen on the card's seeds).
        condition: ``False`` gives the model's unconditional samples (null embedding), for comparison.

    Returns:
        a :class:`~fiberbench.sampling.FiberResult` (method ``conditional``): images ``[B*n,3,32,32]`` in [0,1],
        reference-major, with ``cosine`` / ``feature_distance`` (cosine loss) to ``extractor(ref)`` and a
        config recording the model, its training seconds and the settings.
    """
    from . import zoo
    from .io import as_image_batch
    from .sampling import FiberResult, NoiseSource, _finite_rows, _run_id, _versions, fiber_distance, sample_seed

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    card = getattr(model, "card", None)
    if card is None:
        raise ConfigError("model has no card; load it with fiberbench.conditional.load_conditional")
    if guidance is None:
        guidance = float(card.get("sampling_default", {}).get("guidance", 1.0))
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not np.isfinite(guidance) \
            or guidance < 0:
        raise ConfigError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if isinstance(extractor, str):
        extractor = zoo.load_extractor(extractor)
    spec = getattr(extractor, "spec", type(extractor).__name__)
    if not trained_for(card, spec):
        raise ConfigError(f"{card['spec']} was not trained for extractor {spec!r}; it conditions on "
                          f"{card['architecture']['config']['condition']['extractor']} layers "
                          f"{list(card['architecture']['config']['condition']['dims'])} (a trained baseline "
                          f"needs training per extractor)")
    layer = _base_and_layer(spec)[1]
    ref = as_image_batch(reference, name="reference")
    if tuple(ref.shape[-2:]) != (32, 32):
        raise ConfigError(f"the conditional toy model makes 32x32 images; reference is {tuple(ref.shape[-2:])}")
    device = next(model.parameters()).device
    ref = ref.to(device)
    extractor = extractor.to(device)
    B, M = ref.shape[0], ref.shape[0] * n
    if reference_ids is not None and len(reference_ids) != B:
        raise ConfigError(f"reference_ids has {len(reference_ids)} entries for {B} references")
    seeds = [sample_seed(seed, i, j) for i in range(B) for j in range(n)]
    ref_feats = extractor(ref).float()
    sigmas = _scheduler_sigmas(card, int(steps)).to(device)
    hp = {"guidance": float(guidance), "layer": layer, "condition": bool(condition),
          "shift": card["scheduler"]["config"].get("shift", 1.0)}
    config: dict[str, Any] = {
        "method": "conditional", "extractor": spec, "prior": card["spec"], "n": n, "steps": int(steps),
        "seed": seed, "loss": "cosine", "init": "noise", "preset": None, "hyperparameters": hp,
        "batch_size": batch_size, "dtype": None, "device": str(device), "versions": _versions(),
        "sample_seeds": seeds, "training_seconds": card["training"]["seconds"],
        "reference_hash": hashlib.sha256(ref.detach().cpu().numpy().tobytes()).hexdigest()[:16],
    }
    config["run_id"] = _run_id(config)
    t0 = time.perf_counter()
    x0s = []
    for start in range(0, M, batch_size):
        rows = list(range(start, min(M, start + batch_size)))
        noise = NoiseSource([seeds[r] for r in rows], (3, 32, 32), device)
        x = noise.draw() * sigmas[0]
        h = ref_feats[torch.tensor([r // n for r in rows], device=device)]
        cond = model.embed(h, layer) if condition else None
        guided = condition and guidance != 1.0
        for i in range(len(sigmas) - 1):
            s, s_next = sigmas[i], sigmas[i + 1]
            t = (s * 1000).expand(x.shape[0])
            if guided:
                both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))
                vc, vu = both.chunk(2)
                v = vu + guidance * (vc - vu)
            else:
                v = model(x, t, cond)
            x = x + (s_next - s) * v.float()
        x0s.append(x.cpu())
    seconds = time.perf_counter() - t0
    x0 = torch.cat(x0s)
    images = ((x0 + 1) / 2).clamp(0, 1)
    finite = _finite_rows(images)
    images[~finite] = 0.0
    feats = torch.cat([extractor(c.to(device)).float().cpu() for c in images.split(batch_size)])
    tgt = ref_feats.cpu().repeat_interleave(n, dim=0)
    dist = fiber_distance(feats, tgt, "cosine")
    cos = F.cosine_similarity(feats, tgt, dim=-1)
    status = ["ok" if bool(finite[r]) else "failed: the sample's image is non-finite (set to 0)" for r in range(M)]
    config.update(seconds=seconds, seconds_per_sample=seconds / M, batch_size_used=batch_size, oom_splits=0,
                  denoiser_evals_per_sample=int(steps) * (2 if condition and guidance != 1.0 else 1),
                  extractor_evals_per_sample=0)
    return FiberResult(images=images, reference=ref.cpu(), feature_distance=dist, cosine=cos, status=status,
                       config=config, reference_ids=list(reference_ids) if reference_ids is not None else None,
                       features=feats, reference_features=ref_feats.cpu(), latents=x0)


# --------------------------------------------------------------------------- training

def _feature_stats(ext, n: int = 2048, seed: int = 424_242) -> tuple[dict, dict]:
    """Per-dimension mean/std of both layers on fresh renders (training seeds: ``>= 10**6``)."""
    from .toy.train import world_batch

    x, _ = world_batch(n, seed)
    with torch.no_grad():
        pre = torch.cat([ext.pre_logits(c) for c in x.split(256)]).float()
        logits = ext.classifier()(pre)
    mean = {"logits": logits.mean(0), "pre_logits": pre.mean(0)}
    std = {"logits": logits.std(0).clamp_min(1e-3), "pre_logits": pre.std(0).clamp_min(1e-3)}
    return mean, std


def train_conditional(*, minutes: float = 22.0, max_steps: int | None = None, batch: int = 64, lr: float = 1e-3,
                      warmup: int = 100, ema_decay: float = 0.999, seed: int = 0, fiber_lambda: float = 0.1,
                      fiber_max_sigma: float = 0.8, cond_dropout: float = 0.1, hidden: int = 256,
                      shift: float = 3.0, init_weights: str | Path | None = None,
                      init_card: str | Path | None = None, save_every: int = 250, bf16: bool = True,
                      root: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``toy/cond-fm-shape-resnet``; save EMA weights + card every ``save_every`` steps and at the end.

    Args:
        minutes: wall-time budget (ignored when ``max_steps`` is given); ``touch <root>/cond-fm-shape-resnet.stop``
            ends the run cleanly at the next multiple of 25 steps.
        fiber_lambda: weight of the fiber-loss term ``(1 - sigma) (1 - cos(f(x0_hat), f(x0)))`` in the chosen layer.
        fiber_max_sigma: the term applies to conditioned samples with ``sigma < fiber_max_sigma``.
        cond_dropout: fraction of samples trained with the null condition (for classifier-free guidance).
        init_weights / init_card: a copy of ``toy/prior-fm``'s safetensors and card to start from (default: the
            shipped ones; the flow prior may be retraining in the background, so pass a copy).
        shift: the scheduler shift written to the card (sampling only; training draws sigma uniformly).

    Returns the card (training section filled; :func:`evaluate_conditional` adds metrics).
    """
    import json

    from safetensors.torch import load_file

    from . import zoo
    from .toy import models as M
    from .toy.train import EMA, TRAIN_SEED_BASE, _env, _warmup_step, world_batch

    torch.manual_seed(seed)
    ext = zoo.load_extractor(f"{EXTRACTOR}@pre_logits")
    head = ext.classifier()
    dims = {"logits": head.out_features, "pre_logits": head.in_features}
    mean, std = _feature_stats(ext)
    init_weights = Path(init_weights) if init_weights else M.weights_path("prior-fm")
    init_card = Path(init_card) if init_card else M.card_path("prior-fm")
    src = json.loads(Path(init_card).read_text())
    card = _card_template(src["architecture"]["config"], dims, hidden, shift)
    net = FeatureConditionedFlow(M.build_unet(card["architecture"]["config"]["unet"]), dims, hidden, mean, std)
    missing, unexpected = net.unet.load_state_dict(load_file(str(init_weights)), strict=False)
    if missing or unexpected:
        raise ConfigError(f"prior weights do not fit the conditional UNet: missing {missing}, unexpected {unexpected}")
    card["initialised_from"] = {"model": "toy/prior-fm", "steps": src.get("training", {}).get("steps"),
                                "seconds": src.get("training", {}).get("seconds"),
                                "sha256": hashlib.sha256(Path(init_weights).read_bytes()).hexdigest()}
    ema = EMA(net, ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    step, losses, flows, fibers = 0, [], [], []
    layer_names = list(dims)

    def save(final: bool) -> None:
        card["training"] = {
            "objective": "flow matching (velocity MSE) + fiber_lambda * mean over the batch of (1 - sigma) * "
                         "(1 - cos(f(x0_hat), f(x0))) for conditioned samples with sigma < fiber_max_sigma "
                         "(others 0), x0_hat = x_t - sigma v, cosine in the sample's conditioning layer",
            "fiber_weight": "(1 - sigma) for sigma < fiber_max_sigma, 0 above",
            "extractor": EXTRACTOR, "condition_layers": layer_names, "layer_choice": "uniform per sample",
            "fiber_lambda": fiber_lambda, "fiber_max_sigma": fiber_max_sigma, "cond_dropout": cond_dropout,
            "batch": batch, "optimizer": "AdamW", "lr": lr, "warmup_steps": warmup, "grad_clip": 1.0,
            "ema_decay": ema_decay, "autocast": "bf16" if bf16 else None, "steps": step, "seed": seed,
            "seconds": round(time.time() - t0, 1),
            "final_loss": float(np.mean(losses[-200:])) if losses else None,
            "final_flow_loss": float(np.mean(flows[-200:])) if flows else None,
            "final_fiber_loss": float(np.nanmean(fibers[-200:])) if fibers else None,
            "data": f"fresh renders every step: sample_factors(batch, {TRAIN_SEED_BASE} + 2000000 + step), "
                    f"{step * batch} images in all",
            "env": _env(), "finished": final,
        }
        card["parameters"] = M.count_params(net)
        M.save_weights(NAME, ema.shadow, root)
        M.write_card(NAME, card, root)

    stop_file = (root or M.models_dir()) / f"{NAME}.stop"
    while True:
        if max_steps is not None and step >= max_steps:
            break
        if max_steps is None and time.time() - t0 > minutes * 60:
            break
        if step % 25 == 0 and stop_file.exists():
            stop_file.unlink()
            log(f"[{NAME}] stop file found at step {step}")
            break
        img, _ = world_batch(batch, 2_000_000 + step)  # seeds disjoint from the prior's training stream
        with torch.no_grad():
            pre = ext.pre_logits(img).float()
            feats = {"logits": head(pre), "pre_logits": pre}
        x0 = img * 2 - 1
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(batch, generator=gen)
        which = torch.rand(batch, generator=gen) < 0.5  # True: logits, False: pre_logits
        keep = torch.rand(batch, generator=gen) >= cond_dropout
        s4 = sigma.view(-1, 1, 1, 1)
        xt = (1 - s4) * x0 + s4 * noise
        target = noise - x0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = torch.where(which.view(-1, 1), net.embed(feats["logits"], "logits", keep),
                              net.embed(feats["pre_logits"], "pre_logits", keep))
            pred = net(xt, sigma * 1000, emb).float()
        flow = F.mse_loss(pred, target)
        loss = flow
        sel = keep & (sigma < fiber_max_sigma)
        fib_val = float("nan")
        if fiber_lambda > 0 and bool(sel.any()):
            x0_hat = xt[sel] - s4[sel] * pred[sel]
            im = ((x0_hat + 1) / 2).clamp(0, 1)
            p_hat = ext.pre_logits(im).float()
            l_hat = head(p_hat)
            w = which[sel]
            cos = torch.where(w, F.cosine_similarity(l_hat, feats["logits"][sel], dim=-1),
                              F.cosine_similarity(p_hat, feats["pre_logits"][sel], dim=-1))
            fib = ((1 - sigma[sel]) * (1 - cos)).sum() / batch  # over the whole batch: rows outside count 0
            loss = loss + fiber_lambda * fib
            fib_val = float((1 - cos).detach().mean())
        _warmup_step(opt, net, loss, step, lr, warmup, ema, step)
        losses.append(loss.item())
        flows.append(flow.item())
        fibers.append(fib_val)
        step += 1
        if step % 25 == 0:
            log(f"[{NAME}] step {step} loss {np.mean(losses[-25:]):.4f} flow {np.mean(flows[-25:]):.4f} "
                f"fiber(1-cos, s<{fiber_max_sigma}) {np.nanmean(fibers[-25:]):.4f} {time.time() - t0:.0f}s")
        if step % save_every == 0:
            save(False)
    save(True)
    return card


# --------------------------------------------------------------------------- evaluation (the card's metrics)

def evaluate_conditional(model: FeatureConditionedFlow | None = None, *, references: int = 16, n: int = 8,
                         steps: int = 20, seed: int = EVAL_SEED, guidance: float | None = None) -> dict[str, Any]:
    """Card metrics on fresh references (shapes cycled): per conditioning layer ``feature_match`` (cosine >= 0.95),
    ``mean_cosine``, ``validity`` (oracle), ``shape_kept`` and ``color_changed``; and the same model with the
    null condition (``unconditional_*``: what the conditioning buys). ``guidance=None``: the card's default."""
    from . import zoo
    from .bench import judge
    from .groundtruth import balanced_references
    from .toy import load_oracle

    if model is None:
        model, _ = load_conditional()
    if guidance is None:
        guidance = float(model.card.get("sampling_default", {}).get("guidance", 1.0))
    oracle = load_oracle()
    refs, factors = balanced_references(references, seed=seed)
    out: dict[str, Any] = {}
    for layer in LAYERS:
        ext = zoo.load_extractor(f"{EXTRACTOR}@{layer}")
        t0 = time.perf_counter()
        res = sample_conditional(model, ext, refs, n=n, steps=steps, seed=seed, guidance=guidance)
        secs = time.perf_counter() - t0
        m = judge(res, oracle, factors)
        for k, v in m.items():
            out[f"{layer}_{k}"] = v
        out[f"{layer}_seconds_per_sample"] = secs / (references * n)
        un = sample_conditional(model, ext, refs, n=n, steps=steps, seed=seed, condition=False)
        mu = judge(un, oracle, factors)
        for k in ("feature_match", "validity", "shape_kept"):
            out[f"{layer}_unconditional_{k}"] = mu[k]
    out["eval"] = {"references": references, "n": n, "steps": steps, "seed": seed, "guidance": guidance,
                   "references_from": "groundtruth.balanced_references (shapes cycled)"}
    return out
