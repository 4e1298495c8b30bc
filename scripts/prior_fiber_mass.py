"""How much of the prior lies on a reference's fiber: the share of plain prior samples within the benchmark's
tolerance (cosine >= 0.95) of each reference's features, and the share that is also a valid image.

It bounds what rejection from the prior would cost (one accepted sample per 1/share draws) and says how rare
the images a fiber sampler must find are. One set of prior samples is scored against every reference.

Usage: python scripts/prior_fiber_mass.py [--n 384] [--references 6] [--seed 5] [extractor spec ...]
Prints per extractor and reference: on-fiber share / on-fiber-and-valid share (the best cosine).
"""
import argparse

import torch
import torch.nn.functional as F

import fiberbench as fb
from fiberbench import load_extractor, load_prior
from fiberbench.toy import balanced_references, load_oracle

DEFAULT = ["toy/clip@embed", "mix/0.79*toy/shape-resnet@logits+0.21*toy/clip@embed",
           "mix/0.7*toy/simclr-resnet@embed+0.3*toy/clip@embed", "toy/simclr-resnet@embed"]

p = argparse.ArgumentParser()
p.add_argument("extractors", nargs="*", default=DEFAULT)
p.add_argument("--n", type=int, default=384, help="prior samples")
p.add_argument("--references", type=int, default=6)
p.add_argument("--reference-seed", type=int, default=7)
p.add_argument("--seed", type=int, default=5, help="seed of the prior samples")
p.add_argument("--prior", default="toy/prior-fm")
args = p.parse_args()

prior, oracle = load_prior(args.prior), load_oracle()
refs = balanced_references(args.references, args.reference_seed)[0]
# unguided ignores the extractor; any one gives the run its target
res = fb.sample_fiber(prior, load_extractor(args.extractors[0]), refs[:1], n=args.n, method="unguided",
                      seed=args.seed, batch_size=128, progress=False)
images = res.images
valid = torch.tensor(oracle.predict(images)["valid"].to_numpy(dtype=bool))
print(f"{args.n} samples of {args.prior}, valid {valid.float().mean():.3f}")
for spec in args.extractors:
    ext = load_extractor(spec)
    with torch.no_grad():
        feats = torch.cat([ext(images[i:i + 128]) for i in range(0, len(images), 128)])
        target = ext(refs)
    cells = []
    for r in range(len(refs)):
        cos = F.cosine_similarity(feats, target[r:r + 1])
        on = cos >= 0.95
        cells.append(f"{on.float().mean():.3f}/{(on & valid).float().mean():.3f} ({cos.max():.3f})")
    print(spec, " ".join(cells), flush=True)
