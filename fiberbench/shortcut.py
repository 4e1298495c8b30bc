"""The shortcut audit, at its public import path (code: :mod:`fiberbench.analysis.shortcut`)."""
from .analysis.shortcut import (
    FACTORS_JUDGED,
    describe,
    fiber_gallery,
    intervention,
    judge_labels,
    label_agreement,
    retention,
    retention_plot,
    retention_summary,
)

__all__ = ["describe", "FACTORS_JUDGED", "fiber_gallery", "intervention", "judge_labels", "label_agreement",
           "retention", "retention_plot", "retention_summary"]
