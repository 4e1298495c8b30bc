"""Per-class statistics with bootstrap CIs, at their public import path (code: :mod:`fiberbench.analysis.stats`)."""
from .analysis.stats import (
    ID_COLUMNS,
    bootstrap_mean,
    per_class,
)

__all__ = ["bootstrap_mean", "ID_COLUMNS", "per_class"]
