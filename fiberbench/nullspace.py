"""SING's null-space analysis, at its public import path (code: :mod:`fiberbench.analysis.nullspace`)."""
from .analysis.nullspace import (
    LOGIT_RTOL,
    TOY_SING_MODELS,
    HeadDecomposition,
    SteerResult,
    Translator,
    attribute_score,
    concept_embeddings,
    factor_probe,
    fit_translator,
    head_decomposition,
    image_score,
    load_translator,
    pre_logit_features,
    sing_scores,
    sing_summary,
    steer,
    steering_benchmark,
    steering_summary,
    steering_table,
    toy_sing_report,
)
from .analysis.semantics import angle_deg

__all__ = ["angle_deg", "attribute_score", "concept_embeddings", "factor_probe", "fit_translator", "head_decomposition",
           "HeadDecomposition", "image_score", "load_translator", "LOGIT_RTOL", "pre_logit_features",
           "sing_scores", "sing_summary", "steer", "steering_benchmark", "steering_summary",
           "steering_table", "SteerResult", "TOY_SING_MODELS", "toy_sing_report", "Translator"]
