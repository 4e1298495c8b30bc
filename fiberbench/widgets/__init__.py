"""Jupyter widgets of fiberbench (stock ipywidgets + plotly ``FigureWidget``; no front-end code of our own).

- :class:`ModelPicker` — extractor (+ layer), prior and CLIP model from the registry, or any spec string;
- :class:`FiberGallery` — pick a reference, sample its fiber with a live preview, browse the samples;
- :class:`ClassStatsExplorer` — per-class invariance statistics with confidence intervals;
- :class:`NullSpaceExplorer` — SING image/attribute scores per class and image, steering toward a concept.

Every callback runs inside the widget's ``Output`` and shows errors there (``widget.errors`` keeps them).
"""
from ._common import RunStopped, error_html  # noqa: F401
from .gallery import FiberGallery, data_images, default_store_root, toy_reference  # noqa: F401
from .picker import ModelPicker, card_html  # noqa: F401


def __getattr__(name):  # the explorers import stats / nullspace lazily
    if name == "ClassStatsExplorer":
        from .stats import ClassStatsExplorer
        return ClassStatsExplorer
    if name == "NullSpaceExplorer":
        from .nullspace import NullSpaceExplorer
        return NullSpaceExplorer
    raise AttributeError(f"module 'fiberbench.widgets' has no attribute {name!r}")
