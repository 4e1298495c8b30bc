"""GPU smoke test: where the time of a fiber run goes, with random stand-ins of realistic size.

Builds a latent diffusion pipeline with random weights (SD's AutoencoderKL config, a DiT-B/2-sized
DiTTransformer2DModel, DDIM scheduler), saves it as a diffusers pipeline folder and loads it back through
``fiberbench.load_prior("diffusers/<dir>")`` (the real loading path), plus a random ResNet-50 extractor through
``fiberbench.load_extractor("timm/resnet50@pre_logits", pretrained=False)``. For each setting (fp32 and bf16
autocast, ``torch.compile`` off and on, then bf16 weights and fp32 with gradient checkpointing) one NDTM run
of ``fiberbench.bench.perf.measure_run`` (the fiber-imagenet preset at 50 steps, batch 4) reports what
``fiberbench bench perf`` reports on the toy models: the split of the wall time (prior forward / backward, VAE
decode forward / backward, extractor forward / backward, optimiser, other) with its residual, the arithmetic
floor and ``s/sample / floor``, evaluations per sample and the peak CUDA memory growth from step 10. On CUDA
the profile synchronises at every stage change, so a second, plain run gives the unprofiled s/sample too.

    python scripts/gpu_smoke.py                  # CUDA: 256x256 latent DiT prior, ResNet-50 at 224 px
    python scripts/gpu_smoke.py --json gpu.json  # the same, and the rows as JSON
    python scripts/gpu_smoke.py --cpu            # reduced form (automatic without CUDA): 64x64 latent prior,
                                                 # ResNet-18 at 64 px, batch 1, 4 steps x 2 inner, no compile

Record the output in docs/performance.md. Random weights: the numbers measure cost, not quality.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fiberbench as fb  # noqa: E402
from fiberbench.bench.perf import environment, measure_run  # noqa: E402
from fiberbench.bench.report import PERF_SPLIT  # noqa: E402

# full: SD's VAE config (84 M) at 256 px, a DiT-B/2-sized transformer (12 x 768) on the 32x32 latent,
# ResNet-50 at 224 px; small: the same classes scaled down for a CPU
FULL = dict(image=256, vae_channels=[128, 256, 512, 512], vae_layers=2, dit_heads=12, dit_head_dim=64,
            dit_layers=12, extractor="resnet50", extractor_size=224, n=4, steps=50, inner=None)
SMALL = dict(image=64, vae_channels=[32, 64, 64], vae_layers=1, dit_heads=2, dit_head_dim=32, dit_layers=2,
             extractor="resnet18", extractor_size=64, n=1, steps=4, inner=2)
BF16 = torch.bfloat16
# (label, load_prior keywords, autocast dtype, torch.compile)
SETTINGS = (("fp32", {}, None, False), ("bf16 autocast", {}, BF16, False),
            ("fp32 + compile", {}, None, True), ("bf16 autocast + compile", {}, BF16, True),
            ("bf16 weights", {"torch_dtype": BF16}, BF16, False),
            ("fp32 + grad ckpt", {"gradient_checkpointing": True}, None, False))


def build_pipeline(d: Path, cfg: dict) -> None:
    """A random-weight DiT pipeline (AutoencoderKL + DiTTransformer2DModel + DDIM), saved as a diffusers folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel  # noqa: PLC0415 - optional dep

    torch.manual_seed(0)
    n = len(cfg["vae_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=cfg["vae_channels"],
                        layers_per_block=cfg["vae_layers"], latent_channels=4, norm_num_groups=32,
                        sample_size=cfg["image"], scaling_factor=0.18215)
    latent = cfg["image"] // 2 ** (n - 1)
    dit = DiTTransformer2DModel(num_attention_heads=cfg["dit_heads"], attention_head_dim=cfg["dit_head_dim"],
                                in_channels=4, out_channels=8, num_layers=cfg["dit_layers"], sample_size=latent,
                                patch_size=2, num_embeds_ada_norm=1000)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=dit, vae=vae, scheduler=sched).save_pretrained(d)


def params(m: torch.nn.Module) -> float:
    """Parameters of ``m`` in millions."""
    return sum(p.numel() for p in m.parameters()) / 1e6


def load_models(d: Path, cfg: dict, dev: str, load_kw: dict, compile_: bool):
    """The prior from ``d`` and a fresh random extractor (``torch.compile`` mutates modules in place), compiled
    (denoiser, VAE decoder and extractor network, each in place so the prior's type checks still hold) if
    ``compile_``."""
    prior = fb.load_prior(f"diffusers/{d}", device=dev, **load_kw)
    torch.manual_seed(0)
    size = cfg["extractor_size"]
    ex = fb.load_extractor(f"timm/{cfg['extractor']}@pre_logits", device=dev, pretrained=False,
                           pretrained_cfg_overlay=dict(input_size=(3, size, size)))
    if compile_:
        for module in (prior.unet, prior.vae.decoder, ex.model):
            module.compile()
    return prior, ex


def run_setting(d: Path, cfg: dict, args, label: str, load_kw: dict, amp, compile_: bool) -> dict:
    """One setting: load, warm up (the shapes and grad modes a run meets, compiled graphs included), measure."""
    prior, ex = load_models(d, cfg, args.device, load_kw, compile_)
    ref = torch.rand(1, 3, cfg["image"], cfg["image"], generator=torch.Generator().manual_seed(0))
    hp = {"inner_steps": args.inner} if args.inner else {}
    fb.sample_fiber(prior, ex, ref, n=args.n, method="ndtm", preset=args.preset, steps=2, progress=False,
                    batch_size=args.n, dtype=amp, callback=lambda info: None, **hp)
    row = measure_run(prior, ex, ref, method="ndtm", preset=args.preset, steps=args.steps, batch=args.n, dtype=amp,
                      reps=args.reps, label=label, unprofiled=args.device.startswith("cuda"), **hp)
    row["compile"] = compile_
    row["prior_params_m"] = {"denoiser": params(prior.unet), "vae": params(prior.vae)}
    row["extractor_params_m"] = params(ex.model)
    del prior, ex
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> list[str]:
    """The markdown table of the rows (split in % of the sampling loop's wall time)."""
    heads = ["setting", "s / sample", "unprofiled", "floor", "ratio", *(h for h, _ in PERF_SPLIT), "resid%",
             "evals (den/ext)", "mem growth MiB", "ok"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        frac = r["split_fraction"]
        plain = r.get("seconds_per_sample_unprofiled")
        mem = r["memory"]["growth_mib"]
        cells = [r["label"], f"{r['seconds_per_sample']:.3f}", "-" if plain is None else f"{plain:.3f}",
                 f"{r['floor_seconds_per_sample']:.3f}", f"{r['ratio_to_floor']:.2f}",
                 *(f"{100 * sum(frac[k] for k in keys):.1f}" for _, keys in PERF_SPLIT),
                 f"{100 * r['residual_fraction']:.1f}",
                 f"{r['denoiser_evals_per_sample']}/{r['extractor_evals_per_sample']}",
                 "-" if mem is None else f"{mem:.0f}", str(r["all_ok"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def header(env: dict, args, cfg: dict, rows: list[dict], gpu: str, build_s: float) -> list[str]:
    """What was run, where, when and under which load (1/5/15-minute averages at start and end)."""
    r0 = rows[0]
    load = " -> ".join("/".join(f"{v:.1f}" for v in env[k]) for k in ("loadavg_start", "loadavg_end"))
    return [f"# gpu_smoke: {env['command']}  {env['date']}  device={args.device} ({gpu}), torch {env['torch']}, "
            f"threads {args.threads}, load {load}",
            f"prior: latent -> {cfg['image']}x{cfg['image']} px; DiT denoiser {r0['prior_params_m']['denoiser']:.1f} "
            f"M, VAE {r0['prior_params_m']['vae']:.1f} M params (random weights; built + saved in {build_s:.1f} s); "
            f"extractor: timm {cfg['extractor']} ({r0['extractor_params_m']:.1f} M) at {cfg['extractor_size']} px",
            f"run: NDTM, preset {args.preset} at {args.steps} steps ({r0['floor']['guided_steps']} guided"
            f"{', inner steps %d' % args.inner if args.inner else ''}), batch {args.n}; split in % of the sampling "
            f"loop; floor = unavoidable network calls at their median time; memory: {r0['memory']['measure']} "
            f"growth from step {r0['memory']['from_step']}"]


def parse(argv) -> argparse.Namespace:
    """Arguments, with the reduced CPU form filled in when there is no CUDA device (or ``--cpu``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu (reduced form)")
    ap.add_argument("--cpu", action="store_true", help="the reduced CPU form (--device cpu --small)")
    ap.add_argument("--small", action="store_true", help="64x64 prior + ResNet-18 at 64 px (CPU-sized)")
    ap.add_argument("--preset", default="fiber-imagenet",
                    help="NDTM preset (gamma schedule, lr, inner steps); imagenet-fast: the same in half the passes")
    ap.add_argument("--n", type=int, default=None, help="samples in the batch (default 4, small: 1)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 50, small: 4)")
    ap.add_argument("--inner", type=int, default=None, help="NDTM inner steps (default: the preset's, small: 2)")
    ap.add_argument("--reps", type=int, default=5, help="timings of each unit operation before and after a run")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="the torch.compile settings (auto: on CUDA only; inductor on a CPU takes minutes)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="also write the environment and rows to this JSON file")
    args = ap.parse_args(argv)
    if args.cpu or (args.device is None and not torch.cuda.is_available()):
        if not args.cpu:
            print("no CUDA device: running the reduced CPU form (--cpu)", file=sys.stderr)
        args.device, args.small = "cpu", True
    args.device = args.device or "cuda"
    cfg = SMALL if args.small else FULL
    args.n, args.steps = args.n or cfg["n"], args.steps or cfg["steps"]
    args.inner = args.inner or cfg["inner"]
    args.compile = args.compile == "on" or (args.compile == "auto" and args.device.startswith("cuda"))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device; use --cpu", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cfg = SMALL if args.small else FULL
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "latent-prior"
        t0 = time.perf_counter()
        build_pipeline(d, cfg)
        build_s = time.perf_counter() - t0
        rows = [run_setting(d, cfg, args, label, kw, amp, comp) for label, kw, amp, comp in SETTINGS
                if args.compile or not comp]
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    env["loadavg_end"] = list(os.getloadavg())
    print("\n".join(header(env, args, cfg, rows, gpu, build_s) + [""] + table(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps({**env, "device": args.device, "gpu": gpu, "rows": rows}, indent=2,
                                              default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
