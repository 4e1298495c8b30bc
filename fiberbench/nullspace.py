"""SING's null-space analysis, at its public import path (code: :mod:`fiberbench.analysis.nullspace`, pictures
of equivalent pairs in :mod:`fiberbench.analysis.sing_fibers`, head vs backbone in
:mod:`fiberbench.analysis.head_backbone`)."""
from .analysis.head_backbone import (
    HeadBackbone,
    change_table,
    head_backbone_plot,
    head_invariance_truth,
    head_vs_backbone,
    sign_agreement,
)
from .analysis.nullspace import (
    AS_LEAK_DEG,
    IS_LEAK_DEG,
    LOGIT_RTOL,
    TOY_SING_MODELS,
    HeadDecomposition,
    LinearProbe,
    SteerResult,
    Translator,
    attribute_score,
    concept_embeddings,
    factor_probe,
    fit_linear_probe,
    fit_translator,
    head_decomposition,
    image_score,
    load_sing_extractors,
    load_translator,
    pre_logit_features,
    predicted_classes,
    sing_images,
    sing_scores,
    sing_summary,
    steer,
    steering_benchmark,
    steering_summary,
    steering_table,
    toy_labels,
    toy_sing_report,
)
from .analysis.semantics import angle_deg
from .analysis.sing_fibers import (
    EquivalentPictures,
    equivalent_targets,
    equivalents_summary,
    nonnegative_equivalent,
    visualize_equivalents,
)

__all__ = ["angle_deg", "AS_LEAK_DEG", "attribute_score", "change_table", "concept_embeddings", "equivalent_targets",
           "EquivalentPictures", "equivalents_summary", "factor_probe", "fit_linear_probe", "fit_translator",
           "head_backbone_plot", "head_decomposition", "head_invariance_truth", "head_vs_backbone", "HeadBackbone",
           "HeadDecomposition", "image_score", "IS_LEAK_DEG", "LinearProbe", "load_sing_extractors",
           "load_translator", "LOGIT_RTOL", "nonnegative_equivalent", "pre_logit_features", "predicted_classes",
           "sign_agreement", "sing_images", "sing_scores", "sing_summary", "steer", "steering_benchmark",
           "steering_summary", "steering_table", "SteerResult", "toy_labels", "TOY_SING_MODELS", "toy_sing_report",
           "Translator", "visualize_equivalents"]
