"""Class statistics explorer: per-class attribute change rates inside fibers, with confidence intervals."""
from __future__ import annotations

from typing import Sequence

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go

from ... import plots
from ...analysis.stats import per_class
from ...errors import ConfigError, InputError
from ._common import guarded

KINDS = ("bars", "heatmap", "box")


def changed_columns(frame: pd.DataFrame) -> list[str]:
    """The ``<group>_changed`` columns of a score table (``score_fiber`` / ``score_fiber_oracle`` output)."""
    return [c for c in frame.columns if c.endswith("_changed")]


def per_fiber_rates(frame: pd.DataFrame, statistics: Sequence[str], by: Sequence[str],
                    fiber: str = "reference_id") -> pd.DataFrame:
    """Change rate of each statistic per fiber, long format: ``*by, fiber, statistic, rate`` (rates in [0,1])."""
    keys = list(by) + ([fiber] if fiber in frame.columns else [])
    if "run_id" in frame.columns and "run_id" not in keys:
        keys.append("run_id")
    num = frame[keys].copy()
    for s in statistics:
        num[s] = pd.to_numeric(frame[s].astype("Float64"), errors="coerce")
    g = num.groupby(keys, sort=True, dropna=False)[list(statistics)].mean().reset_index()
    return g.melt(id_vars=keys, value_vars=list(statistics), var_name="statistic", value_name="rate")


class ClassStatsExplorer(W.VBox):
    """Per-class invariance statistics of a results table, for one or more extractors side by side.

    Args:
        frame: one row per sample with ``extractor``, ``class`` and ``<group>_changed`` columns (the output
            of :func:`fiberbench.semantics.score_fiber` or ``score_fiber_oracle``, concatenated over runs).
        statistics: columns to summarise (default: every ``<group>_changed`` column).
        cluster: column resampled as a whole in the bootstrap (samples of one fiber are correlated).
        n_boot, ci: bootstrap settings of :func:`fiberbench.stats.per_class`.

    Attributes:
        stats: the long table from :func:`fiberbench.stats.per_class` (``extractor, class, statistic, mean,
            ci_low, ci_high, n``) that the bar chart and heatmap show.
        figure: the current plotly ``FigureWidget``.
    """

    def __init__(self, frame: pd.DataFrame, *, statistics: Sequence[str] | None = None, by_class: str = "class",
                 extractor: str = "extractor", cluster: str | None = "reference_id", n_boot: int = 1000,
                 ci: float = 0.95, kind: str = "bars"):

        if not isinstance(frame, pd.DataFrame) or frame.empty:
            raise InputError("ClassStatsExplorer needs a non-empty results table (one row per sample)")
        missing = [c for c in (by_class, extractor) if c not in frame.columns]
        if missing:
            raise InputError(f"results table lacks column(s) {missing}; columns: {list(frame.columns)}")
        statistics = list(statistics) if statistics is not None else changed_columns(frame)
        if not statistics:
            raise InputError("no statistics to show: the table has no <group>_changed columns (score it with "
                             "fiberbench.semantics.score_fiber first) and none were named")
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
        self.errors: list[str] = []
        self.frame, self.by_class, self.extractor_col = frame, by_class, extractor
        self.cluster = cluster if cluster in frame.columns else None
        num = frame.copy()
        for s in statistics:  # nullable booleans (NA = label unknown) -> floats with NaN
            num[s] = pd.to_numeric(frame[s].astype("Float64"), errors="coerce").astype(float)
        self.stats = per_class(num, by=[extractor, by_class], stats=statistics, n_boot=n_boot, ci=ci,
                               cluster=self.cluster)
        self.fibers = per_fiber_rates(frame, statistics, [extractor, by_class],
                                      fiber=self.cluster or "reference_id")
        names = [str(e) for e in pd.unique(frame[extractor])]
        self.extractors = W.SelectMultiple(options=names, value=tuple(names), description="extractors",
                                           rows=min(4, len(names)), layout=W.Layout(width="380px"))
        self.statistics = W.SelectMultiple(options=statistics, value=tuple(statistics), description="attributes",
                                           rows=min(6, len(statistics)), layout=W.Layout(width="300px"))
        self.kind = W.ToggleButtons(options=list(KINDS), value=kind)
        self.out = W.Output()
        self.figure = None
        self.plot_box = W.Box()
        self.plot_box.add_class("fb-class-stats-plot")
        for w in (self.extractors, self.statistics, self.kind):
            w.observe(self.update, names="value")
        super().__init__([W.HBox([self.extractors, self.statistics]), self.kind, self.out, self.plot_box])
        self.add_class("fb-class-stats")
        self.update()

    def selection(self) -> pd.DataFrame:
        """Rows of :attr:`stats` for the selected extractors and attributes."""
        s = self.stats
        return s[s[self.extractor_col].astype(str).isin(self.extractors.value)
                 & s["statistic"].isin(self.statistics.value)]

    @guarded()
    def update(self, change=None) -> None:
        """Redraw the chart for the current selection."""


        if not self.extractors.value or not self.statistics.value:
            raise InputError("select at least one extractor and one attribute")
        kind = self.kind.value
        if kind == "bars":
            fig = plots.change_rates(self.selection(), x=self.by_class, facet=self.extractor_col)
        elif kind == "heatmap":
            fig = plots.change_heatmap(self.selection(), row=self.by_class, facet=self.extractor_col)
        else:
            f = self.fibers
            f = f[f[self.extractor_col].astype(str).isin(self.extractors.value)
                  & f["statistic"].isin(self.statistics.value)]
            stat = self.statistics.value[0]
            f = f[f["statistic"] == stat]
            fig = plots.boxes(f, self.by_class, "rate", color=self.extractor_col,
                              title=f"per-fiber change rate of {stat.removesuffix('_changed')}",
                              y_title="change rate")
        self.figure = go.FigureWidget(fig)
        self.plot_box.children = [self.figure]
