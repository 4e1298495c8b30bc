"""Trained baselines the training-free samplers are measured against (registered as sampler methods)."""
from .conditional import (
                          CONDITIONAL_DEFAULTS,
                          EXTRACTOR,
                          LAYERS,
                          NAME,
                          SPEC,
                          load_conditional,
                          sample_conditional,
                          sample_conditional_flow,
                          trained_for,
)

__all__ = ["CONDITIONAL_DEFAULTS", "EXTRACTOR", "LAYERS", "NAME", "SPEC", "load_conditional", "sample_conditional",
           "sample_conditional_flow", "trained_for"]
