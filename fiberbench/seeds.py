"""Every seed base in one place, so that training, the model cards and each benchmark draw disjoint data.

The shapes world renders a scene from an integer seed (:func:`fiberbench.toy.sample_factors`). Training
draws fresh renders from seeds at or above :data:`TRAIN_SEED_BASE`; the cards' metrics use
:data:`CARD_EVAL_SEED`; each benchmark has its own base far from both, so no benchmark reference was ever
seen in training or picked while tuning a card.
"""
from __future__ import annotations

import numpy as np

TRAIN_SEED_BASE = 10 ** 6  # training renders: TRAIN_SEED_BASE + offsets per model and step
CARD_EVAL_SEED = 12_345  # the metrics recorded in the toy models' cards
DEMO_SEED_BASE = 1_000  # `fiberbench demo` references
QUALITY_SEED_BASE = 50_000  # `bench quality` / `bench perf` references
INVARIANCE_SEED_BASE = 60_000  # `bench invariance`: references, interventions and the prior's labels
CONDITIONAL_EVAL_SEED = 70_000  # the conditional baseline's card metrics (and its guidance choice)
REPRODUCE_REFERENCE_SEED = 80_000  # toy references of `fiberbench reproduce`
REPRODUCE_BANK_SEED = 81_000  # its toy bank: nearest-neighbour search set and realism reference
SWEEP_BENCH_SEED_BASE = 90_000  # references of the sweep throughput benchmark
FEATURE_STATS_SEED = 424_242  # renders that standardise the conditional baseline's inputs
DATA_DIVERSITY_SEED = 777  # renders whose spread is the data's diversity (bench quality)
LABEL_PRIOR_SEED = 777  # renders whose CLIP labels are the toy label prior (analysis.toy_scores)


def sample_seed(seed: int, ref: int, j: int) -> int:
    """The generator seed of sample ``j`` of reference ``ref`` in a run with ``seed`` (in [0, 2**63))."""
    return int(np.random.SeedSequence([int(seed), int(ref), int(j)]).generate_state(1, dtype=np.uint64)[0] >> 1)
