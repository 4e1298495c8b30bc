"""Null-space explorer (SING): image and attribute scores per class and per image; steering toward a concept."""
from __future__ import annotations

import html
from typing import Sequence

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go
import torch

from ... import plots
from ...analysis import nullspace as N
from ...analysis.nullspace import sing_summary, steering_table
from ...errors import ConfigError
from ._common import guarded, html_table

VIEWS = ("per class", "per image")


class NullSpaceExplorer(W.VBox):
    """What the null space of a classifier's linear head carries, in CLIP words (SING, Yadid et al. 2026).

    Args:
        extractor: a classifier :class:`~fiberbench.extractors.Extractor` whose head is one ``nn.Linear``.
        clip: the :class:`~fiberbench.semantics.ClipModel` that gives the words.
        images: ``[N,3,H,W]`` in [0,1] to score.
        concepts: text concepts for the attribute score (AS).
        labels: optional true class per image (default: the classifier's prediction).
        translator: a fitted :class:`~fiberbench.nullspace.Translator` (default: fitted on ``fit_images``,
            else on ``images``).
        norm_bound: initial steering bound, relative to each image's own null component.

    Attributes:
        scores: :func:`fiberbench.nullspace.sing_scores` table (one row per image and concept).
        steering: the last :func:`fiberbench.nullspace.steering_table` (one row per image), or ``None``.
        figure, steer_figure: the current plotly ``FigureWidget`` s.
    """

    def __init__(self, extractor, clip, images: torch.Tensor, concepts: Sequence[str], *,
                 labels: Sequence[str] | None = None, translator=None, fit_images: torch.Tensor | None = None,
                 norm_bound: float = 1.0, steps: int = 200):

        concepts = [concepts] if isinstance(concepts, str) else list(concepts)
        if not concepts:
            raise ConfigError("give at least one concept, e.g. ['red', 'circle']")
        self.errors: list[str] = []
        self.extractor, self.clip, self.images, self.labels = extractor, clip, images, labels
        self.decomposition = N.head_decomposition(extractor)
        self.translator = translator or N.fit_translator(extractor, clip,
                                                         fit_images if fit_images is not None else images)
        self.scores = N.sing_scores(extractor, clip, self.translator, images, concepts,
                                    decomposition=self.decomposition, labels=labels)
        self.steps = steps
        self.steering: pd.DataFrame | None = None
        self.concept = W.Dropdown(options=concepts, value=concepts[0], description="concept")
        self.view = W.ToggleButtons(options=list(VIEWS), value=VIEWS[0])
        self.summary = W.HTML()
        self.target = W.Text(value=concepts[0], description="steer to", placeholder="any text concept")
        # the bound is relative to each image's own null component
        self.bound = W.FloatLogSlider(value=norm_bound, base=10, min=-2, max=1, step=0.1, description="bound")
        self.steer_button = W.Button(description="Steer", icon="location-arrow", button_style="primary")
        self.steer_button.add_class("fb-steer")
        self.steer_result = W.HTML()
        self.out = W.Output()
        self.figure = None
        self.steer_figure = None
        self.plot_box, self.steer_box = W.Box(), W.Box()
        self.plot_box.add_class("fb-nullspace-plot")
        self.concept.observe(self.update, names="value")
        self.view.observe(self.update, names="value")
        self.steer_button.on_click(self._on_steer)
        m = self.translator.metrics
        head = (f"<b>{html.escape(str(getattr(extractor, 'spec', '')))}</b>: head rank {self.decomposition.rank} of "
                f"{self.decomposition.dim} feature dims (null space {self.decomposition.null_dim}); translator "
                f"held-out cosine {m.get('heldout_cosine', float('nan')):.3f}")
        super().__init__([W.HTML(head), W.HBox([self.concept, self.view]), self.summary, self.plot_box,
                          W.HBox([self.target, self.bound, self.steer_button]), self.steer_result, self.steer_box,
                          self.out])
        self.add_class("fb-nullspace")
        self.update()

    def class_summary(self, concept: str | None = None) -> pd.DataFrame:
        """Per-class IS and AS toward ``concept`` (mean, bootstrap CI): the long table of the bar chart."""

        c = concept or self.concept.value
        sub = self.scores[self.scores["concept"] == c]
        return sing_summary(sub, by=["class"], n_boot=500)

    @guarded()
    def update(self, change=None) -> None:


        c = self.concept.value
        if self.view.value == "per class":
            s = self.class_summary(c)
            s = s[s["statistic"].isin(["image_score", "attribute_score"])]
            fig = plots.bars(s, "class", "mean", color="statistic", lo="ci_low", hi="ci_high",
                             title=f"SING per class: IS and AS toward '{c}' (degrees, 95% CI)", y_title="degrees")
        else:
            sub = self.scores[self.scores["concept"] == c].assign(image=lambda d: d["image"].astype(str))
            fig = plots.bars(sub, "image", "attribute_score", color="class", hover=["image_score"],
                             title=f"AS toward '{c}' per image (degrees)", y_title="AS (degrees)")
        self.figure = go.FigureWidget(fig)
        self.plot_box.children = [self.figure]
        sub = self.scores[self.scores["concept"] == c]
        # sing_scores' own flags where present (they carry the thresholds it was called with)
        is_leak = sub["is_leak"] if "is_leak" in sub else sub["image_score"] > N.IS_LEAK_DEG
        as_leak = sub["as_leak"] if "as_leak" in sub else sub["attribute_score"].abs() > N.AS_LEAK_DEG
        mean_is, mean_as = sub["image_score"].mean(), sub["attribute_score"].mean()
        self.summary.value = (f"mean IS {mean_is:.2f}°, mean AS {mean_as:+.2f}°; leakage flagged by "
                              f"sing_scores (default IS > {N.IS_LEAK_DEG:g}° or |AS| > {N.AS_LEAK_DEG:g}°, "
                              f"SING's demo values): {is_leak.mean():.0%} / {as_leak.mean():.0%} of images")

    @guarded()
    def _on_steer(self, button=None) -> None:
        self.steer(self.target.value, self.bound.value)

    def steer(self, concept: str, norm_bound: float | None = None) -> pd.DataFrame:
        """Steer every image's null space toward ``concept``; logits stay equal. Returns the steering table."""


        concept = (concept or "").strip()
        if not concept:
            raise ConfigError("type a concept to steer toward, e.g. 'jellyfish' or 'a red shape'")
        bound = self.bound.value if norm_bound is None else norm_bound
        t = steering_table(self.extractor, self.clip, self.images, concept, translator=self.translator,
                           norm_bound=bound, relative_to="null", decomposition=self.decomposition,
                           labels=self.labels, steps=self.steps)
        self.steering = t
        rows = [(cls, len(g), f"{g['attribute_score_before'].mean():+.2f}", f"{g['attribute_score'].mean():+.2f}",
                 f"{g['cos_before'].mean():.3f} → {g['cos_after'].mean():.3f}")
                for cls, g in t.groupby("class", sort=True)]
        self.steer_result.value = (
            f"<span class='fb-steer-done'>steered toward '<b>{html.escape(concept)}</b>' (bound {bound:.2g} × "
            f"null norm): achieved |AS| {t['abs_attribute_score'].mean():.2f}° ± {t['abs_attribute_score'].std():.2f}; "
            f"max relative logit change {t['logit_change'].max():.1e}</span>"
            + html_table(rows, ("class", "images", "AS before", "AS after", "cos to concept")))
        long = t.melt(id_vars=["class"], value_vars=["attribute_score_before", "attribute_score"],
                      var_name="statistic", value_name="degrees")
        g = long.groupby(["class", "statistic"], sort=False)["degrees"].mean().reset_index()
        fig = plots.bars(g, "class", "degrees", color="statistic", title=f"AS toward '{concept}' before/after steering")
        self.steer_figure = go.FigureWidget(fig)
        self.steer_box.children = [self.steer_figure]
        return t
