"""Jupyter widgets, at their public import path (code: :mod:`fiberbench.ui.widgets`)."""
from .ui.widgets import (
    ClassStatsExplorer,
    FiberGallery,
    ModelPicker,
    NullSpaceExplorer,
    RunStopped,
    card_html,
    data_images,
    default_store_root,
    error_html,
    toy_reference,
)

__all__ = ["card_html", "ClassStatsExplorer", "data_images", "default_store_root", "error_html",
           "FiberGallery", "ModelPicker", "NullSpaceExplorer", "RunStopped", "toy_reference"]
