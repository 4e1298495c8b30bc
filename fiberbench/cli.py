"""Command line: ``fiberbench list-models | train-toy | demo | bench | sweep`` (the only argparse entry point)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from . import bench
from .bench.reproduce import QUICK, QUICK_EXTRACTORS, reproduce
from .errors import FiberbenchError
from .models import REAL_MODELS, list_models
from .runs.sweep import benchmark as sweep_benchmark
from .runs.sweep import format_benchmark, run_sweep
from .training import train_all
from .ui.demo import run_demo


def _cmd_list(args) -> int:
    for spec in list_models(args.pattern, kind=args.kind):
        print(spec)
    if args.real:
        print("\n# real models (weights from the Hugging Face hub / local cache):")
        for m in REAL_MODELS:
            if args.kind in (None, m["kind"]):
                print(f"{m['spec']:<80} {m['kind']:<9} {m['size']:<14} {m['for']}")
    return 0


def _cmd_train_toy(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    train_all(only=args.only, quick=args.quick, minutes=args.minutes)
    return 0


def _cmd_demo(args) -> int:
    path = run_demo(args.out, n=args.n, references=args.references, steps=args.steps, seed=args.seed)
    print(f"report: {path}")
    return 0


def _cmd_bench(args) -> int:
    t0 = time.time()
    if args.what == "quality":
        out = bench.bench_quality(quick=args.quick, seed=args.seed)
    elif args.what == "invariance":
        out = bench.bench_invariance(quick=args.quick, seed=args.seed)
    else:
        out = bench.bench_perf(quick=args.quick)
    if args.json:
        print(json.dumps(out, indent=2, default=float))
    else:
        print(bench.format_table(out))
        print(f"({time.time() - t0:.0f} s)")
    return 0


def _reproduce_command(args) -> str:
    """The command line of a ``reproduce`` call, rebuilt from its parsed options (for the provenance line)."""
    words = ["fiberbench", "reproduce"]
    for name, value in vars(args).items():
        if name in ("cmd", "fn") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        else:
            words += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return shlex.join(words)


def _cmd_reproduce(args) -> int:
    command = _reproduce_command(args)
    if args.quick:  # the reduced form `make test` runs; explicit flags still override it
        for k, v in QUICK.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        args.extractors = args.extractors or list(QUICK_EXTRACTORS)
        args.preset = args.preset or "toy"
    if not args.extractors:
        print("fiberbench: error: reproduce needs --extractors (or --quick)", file=sys.stderr)
        return 2
    defaults = dict(n=4, n_references=8, draws=3, bank_size=512, kid_subsets=50)
    kw = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    rep = reproduce(args.extractors, args.prior, args.references, bank=args.bank, preset=args.preset,
                    method=args.method, seed=args.seed, steps=args.steps, spaces=args.spaces,
                    baseline=not args.no_baseline, out=args.out, batch_size=args.batch_size, device=args.device,
                    command=command, progress=not args.quiet, **kw)
    print(rep.files["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in rep.files.values())} ({rep.provenance['seconds']:.0f} s)")
    return 0


def _cmd_sweep(args) -> int:
    summary = run_sweep(args.config, args.out, backend=args.backend, address=args.address,
                        max_jobs=args.max_jobs)
    print(summary)
    return 1 if summary.failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fiberbench", description="What is a vision model blind to?")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("list-models", help="print every spec string the registry knows")
    q.add_argument("pattern", nargs="?", default="*", help="shell wildcard, e.g. 'toy/*'")
    q.add_argument("--kind", choices=["extractor", "prior", "clip", "oracle", "conditional"])
    q.add_argument("--real", action="store_true", help="also list curated hub models")
    q.set_defaults(fn=_cmd_list)

    q = sub.add_parser("train-toy", help="train the shipped toy models from scratch on the CPU")
    q.add_argument("--only", action="append", help="train only this model (repeatable)")
    q.add_argument("--quick", action="store_true", help="a few steps each (smoke test, does not overwrite)")
    q.add_argument("--minutes", type=float, default=None,
                   help="train each prior for this many minutes instead of replaying the runs in its card")
    q.add_argument("--threads", type=int, default=None)
    q.set_defaults(fn=_cmd_train_toy)

    q = sub.add_parser("demo", help="sample fibers of the toy classifiers and write an HTML report")
    q.add_argument("--out", default="out/demo")
    q.add_argument("--n", type=int, default=6, help="samples per reference")
    q.add_argument("--references", type=int, default=4)
    q.add_argument("--steps", type=int, default=None)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=_cmd_demo)

    q = sub.add_parser("bench", help="benchmarks on the shapes world")
    q.add_argument("what", nargs="?", default="quality", choices=["quality", "invariance", "perf"])
    q.add_argument("--quick", action="store_true")
    q.add_argument("--json", action="store_true")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=_cmd_bench)

    q = sub.add_parser("reproduce", help="the fiber paper's tables (fiber loss, nearest neighbour, realism, "
                                         "spread) for any extractors, as CSV, Markdown and LaTeX")
    q.add_argument("--extractors", nargs="+", help="extractor specs (default with --quick: the toy classifiers)")
    q.add_argument("--prior", default="toy/prior-fm")
    q.add_argument("--references", default="toy", help="'toy' (fresh renders) or an image folder")
    q.add_argument("--bank", default=None, help="nearest-neighbour and realism images: 'toy' or a folder "
                                                "(default: the references' source)")
    q.add_argument("--preset", default=None, help="default: the prior's recommendation")
    q.add_argument("--method", default="ndtm")
    q.add_argument("--steps", type=int, default=None, help="default: the preset's (fewer warns)")
    q.add_argument("--n", type=int, default=None, help="samples per reference (default 4)")
    q.add_argument("--n-references", type=int, default=None, help="default 8")
    q.add_argument("--draws", type=int, default=None, help="independent sets of fibers, seeds seed.. (default 3)")
    q.add_argument("--bank-size", type=int, default=None, help="toy bank renders (default 512)")
    q.add_argument("--kid-subsets", type=int, default=None, help="default 50")
    q.add_argument("--spaces", nargs="+", default=None,
                   help="realism feature spaces: oracle, inception, clip:<spec>, an extractor spec, name=<spec> "
                        "(default: oracle and clip:toy/clip on the toy world, inception on folders)")
    q.add_argument("--no-baseline", action="store_true", help="skip the prior's own (unguided) samples")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--device", default="cpu")
    q.add_argument("--out", default="out/reproduce")
    q.add_argument("--quick", action="store_true", help="2 toy classifiers x 2 references x 2 samples x 2 draws")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(fn=_cmd_reproduce)

    q = sub.add_parser("sweep", help="run the missing jobs of a YAML/TOML sweep into a results store")
    q.add_argument("config", help="sweep file (.yaml/.yml/.toml), see fiberbench.sweep")
    q.add_argument("--out", required=True, help="results store folder (shared by all Ray nodes)")
    q.add_argument("--backend", choices=["local", "ray"], default="local")
    q.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray instance)")
    q.add_argument("--max-jobs", type=int, default=None, help="compute at most this many jobs, then stop")
    q.set_defaults(fn=_cmd_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except FiberbenchError as e:
        print(f"fiberbench: error: {e}", file=sys.stderr)
        return 2


def sweep_main(argv: list[str] | None = None) -> int:
    """``python -m fiberbench.sweep bench [--jobs J] [--n N] [--steps S] [--json]``: sweep throughput."""
    p = argparse.ArgumentParser(prog="python -m fiberbench.sweep")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="jobs per minute: local vs Ray on 1 and 2 workers (toy sweep)")
    b.add_argument("--jobs", type=int, default=6)
    b.add_argument("--n", type=int, default=8)
    b.add_argument("--steps", type=int, default=None)
    b.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        res = sweep_benchmark(jobs=args.jobs, n=args.n, steps=args.steps)
    except FiberbenchError as e:
        print(f"python -m fiberbench.sweep: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2) if args.json else format_benchmark(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
