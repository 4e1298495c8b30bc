"""CLIP scoring and the oracle's twin, at their public import path.

The code lives in :mod:`fiberbench.analysis.semantics` (generic) and :mod:`fiberbench.analysis.toy_scores`
(the shapes world); :class:`ClipModel` in :mod:`fiberbench.models.clip`; the toy vocabulary in
:mod:`fiberbench.toy.vocab`.
"""
from .analysis.semantics import (
    TEMPLATES,
    angle_deg,
    change_rate_agreement,
    change_rates,
    check_vocab,
    class_embeddings,
    clip_labels,
    entropy_bits,
    expected_plugin_entropy,
    fiber_ids,
    label_distribution,
    label_prior,
    make_vocab,
    score_fiber,
    summarize_fiber,
    with_changes,
    zero_shot,
)
from .analysis.toy_scores import (
    ORACLE_GROUPS,
    oracle_fiber_metrics,
    oracle_labels,
    score_fiber_oracle,
    toy_label_prior,
)
from .models.clip import (
    ClipModel,
)
from .toy.vocab import (
    TOY_VOCAB,
    Vocabulary,
    toy_tokenizer,
)

__all__ = ["angle_deg", "change_rate_agreement", "change_rates", "check_vocab", "class_embeddings",
           "clip_labels", "ClipModel", "entropy_bits", "expected_plugin_entropy", "fiber_ids",
           "label_distribution", "label_prior", "make_vocab", "oracle_fiber_metrics", "ORACLE_GROUPS",
           "oracle_labels", "score_fiber", "score_fiber_oracle", "summarize_fiber", "TEMPLATES",
           "toy_label_prior", "toy_tokenizer", "TOY_VOCAB", "Vocabulary", "with_changes", "zero_shot"]
