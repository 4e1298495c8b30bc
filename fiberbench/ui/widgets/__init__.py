"""Jupyter widgets of fiberbench (stock ipywidgets + plotly ``FigureWidget``; no front-end code of our own).

- :class:`ModelPicker` — extractor (+ layer), prior and CLIP model from the registry, or any spec string;
- :class:`FiberGallery` — pick a reference, sample its fiber with a live preview, browse the samples;
- :class:`ClassStatsExplorer` — per-class invariance statistics with confidence intervals;
- :class:`NullSpaceExplorer` — SING image/attribute scores per class and image, steering toward a concept.

Every callback runs inside the widget's ``Output`` and shows errors there (``widget.errors`` keeps them).
"""
from ._common import RunStopped, error_html
from .gallery import FiberGallery, data_images, default_store_root, toy_reference
from .nullspace import NullSpaceExplorer
from .picker import ModelPicker, card_html
from .stats import ClassStatsExplorer

__all__ = ["ClassStatsExplorer", "FiberGallery", "ModelPicker", "NullSpaceExplorer", "RunStopped", "card_html",
           "data_images", "default_store_root", "error_html", "toy_reference"]
