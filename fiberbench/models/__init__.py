"""Models: spec strings in, extractors, priors and CLIP scorers out (see :mod:`.registry`).

The lowest layer that knows models: nothing here knows of sampling. Every source registers itself on import.
"""
from . import sources  # noqa: F401  (registers every model source)
from .analytic import GaussianPrior, LinearExtractor, conditional_moments
from .clip import ClipModel
from .extractor import Extractor
from .prior import FeatureConditionedPrior, FlowNoise, LatentPrior, PixelPrior, Prior, Schedule, VPNoise
from .registry import (
    REAL_MODELS,
    SOURCES,
    ModelSource,
    Spec,
    canonical_spec,
    check_spec,
    list_models,
    load_clip,
    load_extractor,
    load_prior,
    parse_spec,
    prior_defaults,
    register_source,
    weights_checksum,
)

__all__ = ["REAL_MODELS", "SOURCES", "ClipModel", "Extractor", "FeatureConditionedPrior", "FlowNoise",
           "GaussianPrior", "LatentPrior", "LinearExtractor", "ModelSource", "PixelPrior", "Prior", "Schedule",
           "Spec", "VPNoise", "canonical_spec", "check_spec", "conditional_moments", "list_models", "load_clip",
           "load_extractor", "load_prior", "parse_spec", "prior_defaults", "register_source", "weights_checksum"]
