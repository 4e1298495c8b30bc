"""GPU smoke test: the fiber sampler with random stand-ins of realistic size, fp32 vs bf16.

Builds a latent diffusion pipeline with random weights (SD's AutoencoderKL config, a
DiT-B/2-sized DiTTransformer2DModel, DDIM scheduler), saves it as a diffusers pipeline folder and loads it
back through ``fiberbench.load_prior("diffusers/<dir>")`` (the real loading path), plus a
random ResNet-50 extractor through ``fiberbench.load_extractor("timm/resnet50", pretrained=False)``.
Then it runs ``sample_fiber`` (NDTM) and prints seconds per sample and peak memory for
fp32 weights, bf16 autocast, and fp32 with gradient checkpointing.

    python scripts/gpu_smoke.py                       # CUDA if present: 256x256 latent DiT prior, ResNet-50
    python scripts/gpu_smoke.py --device cpu --small  # CPU: 64x64 latent prior, ResNet-18 at 64 px

Record the output in docs/performance.md. Random weights: the numbers measure cost, not quality.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fiberbench as fb  # noqa: E402

# full: SD's VAE config (84 M) at 256 px, a DiT-B/2-sized transformer (12 x 768) on the 32x32 latent,
# ResNet-50 at 224 px; small: the same classes scaled down for a CPU
FULL = dict(image=256, vae_channels=[128, 256, 512, 512], vae_layers=2, dit_heads=12, dit_head_dim=64,
            dit_layers=12, extractor="resnet50", extractor_size=224)
SMALL = dict(image=64, vae_channels=[32, 64, 64], vae_layers=1, dit_heads=2, dit_head_dim=32, dit_layers=2,
             extractor="resnet18", extractor_size=64)


def build_pipeline(d: Path, cfg: dict) -> None:
    """A random-weight DiT pipeline (AutoencoderKL + DiTTransformer2DModel + DDIM), saved as a diffusers folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

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


class PeakRSS:
    """Peak resident memory of this process while the block runs (CPU), polled every 5 ms."""

    def __enter__(self):
        import psutil

        self.proc = psutil.Process(os.getpid())
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def params(m: torch.nn.Module) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


def run(prior, ex, ref, *, n: int, steps: int, inner: int, dtype, device: str) -> dict:
    kwargs = dict(n=n, method="ndtm", steps=steps, seed=0, progress=False, batch_size=n, dtype=dtype,
                  inner_steps=inner, lr=0.05, gamma=1.0, loss="cosine")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res = fb.sample_fiber(prior, ex, ref, **kwargs)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        peak_label = "peak CUDA alloc above weights"
    else:
        with PeakRSS() as m:
            res = fb.sample_fiber(prior, ex, ref, **kwargs)
        peak = (m.peak - m.base) / 2 ** 20
        peak_label = "peak RSS growth"
    ok = bool(torch.isfinite(res.images).all()) and all(s == "ok" for s in res.status)
    return {"s/sample": res.config["seconds_per_sample"], "peak MiB": peak, "peak_label": peak_label,
            "cosine": float(res.cosine.mean()), "finite": ok,
            "denoiser evals": res.config["denoiser_evals_per_sample"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="64x64 prior + ResNet-18 at 64 px (CPU-sized)")
    ap.add_argument("--n", type=int, default=None, help="samples per run (default 4, small: 1)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 20, small: 4)")
    ap.add_argument("--inner", type=int, default=None, help="NDTM inner steps (default 4, small: 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = SMALL if args.small else FULL
    n = args.n or (1 if args.small else 4)
    steps = args.steps or (4 if args.small else 20)
    inner = args.inner or (2 if args.small else 4)
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --small", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "latent-prior"
        t0 = time.perf_counter()
        build_pipeline(d, cfg)
        build_s = time.perf_counter() - t0
        size = cfg["extractor_size"]
        ex = fb.load_extractor(f"timm/{cfg['extractor']}@pre_logits", device=dev, pretrained=False,
                               pretrained_cfg_overlay=dict(input_size=(3, size, size)))
        ref = torch.rand(1, 3, cfg["image"], cfg["image"], generator=torch.Generator().manual_seed(0))
        rows = []
        for label, load_kw, amp in [("fp32", {}, None),
                                    ("bf16 autocast", {}, torch.bfloat16),
                                    ("bf16 weights", {"torch_dtype": torch.bfloat16}, torch.bfloat16),
                                    ("fp32 + grad ckpt", {"gradient_checkpointing": True}, None)]:
            prior = fb.load_prior(f"diffusers/{d}", device=dev, **load_kw)
            run(prior, ex, ref, n=1, steps=1, inner=1, dtype=amp, device=dev)  # warm-up
            r = run(prior, ex, ref, n=n, steps=steps, inner=inner, dtype=amp, device=dev)
            rows.append((label, r))
            del prior
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
        prior = fb.load_prior(f"diffusers/{d}")
        print(f"# gpu_smoke: device={dev} ({torch.cuda.get_device_name() if dev.startswith('cuda') else 'cpu'}), "
              f"torch {torch.__version__}, threads {args.threads}")
        print(f"prior: latent {prior.sample_shape} -> {prior.image_size}x{prior.image_size} px; "
              f"DiT denoiser {params(prior.unet):.1f} M, VAE {params(prior.vae):.1f} M params (random weights; "
              f"built + saved in {build_s:.1f} s)")
        print(f"extractor: timm {cfg['extractor']} ({params(ex.model):.1f} M) at {ex.input_size} px, pre_logits")
        print(f"run: NDTM, n={n} samples in one batch, {steps} steps x {inner} inner steps, cosine loss")
        print()
        print(f"| setting | s / sample | {rows[0][1]['peak_label']} (MiB) | denoiser evals / sample | finite |")
        print("|---|---|---|---|---|")
        for label, r in rows:
            print(f"| {label} | {r['s/sample']:.2f} | {r['peak MiB']:.0f} | {r['denoiser evals']} | {r['finite']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
