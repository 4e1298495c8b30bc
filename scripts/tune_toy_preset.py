"""Grid over NDTM settings on the shapes world (the search behind the `toy` preset).

Usage: python scripts/tune_toy_preset.py [--refs 16] [--n 4]
Prints one line per setting: feature_match, validity, diversity, shape_kept, seconds/sample.
"""
import argparse
import json
import time

import torch

from fiberbench.bench import bench_quality

p = argparse.ArgumentParser()
p.add_argument("--refs", type=int, default=16)
p.add_argument("--n", type=int, default=4)
p.add_argument("--grid", default="default")
args = p.parse_args()
torch.set_num_threads(1)

G = {
    "default": [
        dict(gamma=[(0, 0, 1000, 900), (1, 1, 900, 0)], lr=0.05, inner_steps=4),
        dict(gamma=[(0, 0, 1000, 950), (1, 1, 950, 250), (0, 0, 250, 0)], lr=0.05, inner_steps=4),
        dict(gamma=[(0, 0, 1000, 950), (1, 1, 950, 250), (0, 0, 250, 0)], lr=0.1, inner_steps=4),
        dict(gamma=[(0, 0, 1000, 950), (1, 1, 950, 400), (0, 0, 400, 0)], lr=0.1, inner_steps=4),
        dict(gamma=[(0, 0, 1000, 950), (1, 1, 950, 250), (0, 0, 250, 0)], lr=0.05, inner_steps=4, control_init="warm"),
    ],
}
for setting in G[args.grid]:
    t0 = time.time()
    out = bench_quality(methods=("ndtm",), references=args.refs, n=args.n, settings={"ndtm": setting})["ndtm"]
    keep = {k: round(v, 3) for k, v in out.items() if isinstance(v, float)}
    print(json.dumps({"setting": setting, **keep, "wall": round(time.time() - t0)}), flush=True)
