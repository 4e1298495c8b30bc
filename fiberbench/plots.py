"""Figures from tidy tables: plotly figures that widgets show and papers print.

Every plot function takes a tidy :class:`pandas.DataFrame` (or image tensors),
returns a :class:`plotly.graph_objects.Figure` (never calls ``show()``) and
takes ``save_to=`` (a path ending in ``.png``, ``.svg`` or ``.pdf``, or a list
of such paths) to write it at once.

Static export works offline: :func:`save_figure` and :func:`export_figures`
use kaleido >= 1, which drives the machine's Chromium (Debian's ``chromium`` is
found by itself), with a timeout; where kaleido or a browser is missing or
hangs they fall back to matplotlib (:func:`to_matplotlib`), which redraws the
figure types made here (bars with error bars, lines, heatmaps, boxes, image
grids) from the figure's own data.

Sizes: ``width``/``height`` are layout pixels (CSS px, 1/96 inch); ``dpi``
sets the raster resolution of PNGs (``dpi=300`` -> 300/96 device pixels per
layout pixel). SVG and PDF are vector at the same physical size.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib.patches as mp
import numpy as np
import pandas as pd
import plotly.colors as pc
import plotly.graph_objects as go
import torch
from matplotlib.figure import Figure
from PIL import Image
from plotly.subplots import make_subplots

from .errors import ConfigError, InputError

try:  # static export: kaleido drives a Chromium; without either, figures fall back to matplotlib (Agg)
    import kaleido
except ImportError:  # pragma: no cover - a declared dependency, absent only in a trimmed environment
    kaleido = None

FORMATS = ("png", "svg", "pdf")
CSS_DPI = 96.0
# one colour per category, shared by plotly and the matplotlib fallback (plotly's default colorway)
PALETTE = ["#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880",
           "#FF97FF", "#FECB52"]
_MPL_CMAPS = {"viridis": "viridis", "blues": "Blues", "reds": "Reds", "rdbu": "RdBu", "rdbu_r": "RdBu_r",
              "greys": "Greys", "magma": "magma", "cividis": "cividis", "ylorrd": "YlOrRd", "purples": "Purples"}


# --------------------------------------------------------------------------- export

def kaleido_available() -> str | None:
    """Why kaleido export cannot work here (a sentence), or ``None`` if it can be tried."""
    if kaleido is None:
        return "kaleido is not installed"
    if os.environ.get("BROWSER_PATH"):
        browser = os.environ["BROWSER_PATH"]
        return None if Path(browser).exists() else f"BROWSER_PATH={browser} missing"
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if shutil.which(name):
            return None
    return "no Chromium/Chrome executable on PATH (Debian: apt-get install chromium)"


def _paths(save_to) -> list[Path]:
    if save_to is None:
        return []
    items = [save_to] if isinstance(save_to, (str, os.PathLike)) else list(save_to)
    out = []
    for p in items:
        p = Path(p)
        fmt = p.suffix.lstrip(".").lower()
        if fmt not in FORMATS:
            raise ConfigError(f"cannot save a figure as {p.name!r}: the suffix must be one of "
                              f"{['.' + f for f in FORMATS]}")
        out.append(p)
    return out


def _size(fig, width, height) -> tuple[int, int]:
    w = width or fig.layout.width or 700
    h = height or fig.layout.height or 450
    if w <= 0 or h <= 0:
        raise ConfigError(f"figure size must be positive, got width={w}, height={h}")
    return int(w), int(h)


def _kaleido_bytes(fig, fmt: str, width: int, height: int, scale: float, timeout: float) -> bytes:
    """One figure through kaleido, with a hard wall-clock ``timeout`` (kaleido #134/#145: export can hang)."""
    opts = dict(format=fmt, width=width, height=height, scale=scale)
    if _batch["on"]:
        job = lambda: kaleido.calc_fig_sync(fig, opts=opts)  # noqa: E731
    else:
        job = lambda: kaleido.calc_fig_sync(fig, opts=opts, kopts=dict(timeout=timeout, mathjax=False))  # noqa: E731
    pool = cf.ThreadPoolExecutor(max_workers=1)
    try:
        data = pool.submit(job).result(timeout=timeout)
    except cf.TimeoutError:
        raise TimeoutError(f"kaleido did not export the figure within {timeout:.0f} s") from None
    finally:
        pool.shutdown(wait=False)
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise RuntimeError("kaleido returned no image data")
    return bytes(data)


_batch = {"on": False}


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_figure(fig, path: str | os.PathLike, *, width: int | None = None, height: int | None = None,
                dpi: float = 2 * CSS_DPI, engine: str = "auto", timeout: float = 60.0) -> dict[str, Any]:
    """Write ``fig`` to ``path`` (``.png`` / ``.svg`` / ``.pdf``), offline.

    Args:
        fig: a plotly figure made by this module (or any plotly figure for ``engine="kaleido"``).
        width, height: layout size in CSS pixels (default: the figure's, else 700 x 450).
        dpi: PNG resolution; the PNG is ``width * dpi / 96`` pixels wide.
        engine: ``"kaleido"`` (Chromium), ``"matplotlib"`` (no browser) or ``"auto"`` (kaleido,
            falling back to matplotlib when kaleido/Chromium is missing, fails or exceeds ``timeout``).
        timeout: seconds before a kaleido export is abandoned.

    Returns:
        ``{"path", "format", "engine", "bytes", "seconds", "fallback_reason"}``.
    """
    (path,) = _paths(path)
    if engine not in ("auto", "kaleido", "matplotlib"):
        raise ConfigError(f"engine must be 'auto', 'kaleido' or 'matplotlib', got {engine!r}")
    if not (isinstance(dpi, (int, float)) and 10 <= dpi <= 2400):
        raise ConfigError(f"dpi must be a number in [10, 2400], got {dpi!r}")
    fmt = path.suffix.lstrip(".").lower()
    w, h = _size(fig, width, height)
    t0 = time.perf_counter()
    reason = None
    if engine in ("auto", "kaleido"):
        reason = kaleido_available()
        if reason is None:
            try:
                data = _kaleido_bytes(fig, fmt, w, h, dpi / CSS_DPI if fmt == "png" else 1.0, timeout)
                _write_atomic(path, data)
                return dict(path=path, format=fmt, engine="kaleido", bytes=len(data),
                            seconds=time.perf_counter() - t0, fallback_reason=None)
            except Exception as e:  # noqa: BLE001 - any kaleido/browser failure falls back (reported)
                reason = f"kaleido failed: {type(e).__name__}: {e}"
        if engine == "kaleido":
            raise RuntimeError(f"cannot export {path.name} with kaleido: {reason}")
    mfig = to_matplotlib(fig, width=w, height=h, dpi=dpi)
    buf = io.BytesIO()
    mfig.savefig(buf, format=fmt, dpi=dpi)
    data = buf.getvalue()
    _write_atomic(path, data)
    return dict(path=path, format=fmt, engine="matplotlib", bytes=len(data), seconds=time.perf_counter() - t0,
                fallback_reason=reason)


def export_figures(figures: Mapping[str, Any], out_dir: str | os.PathLike, *, formats: Sequence[str] = FORMATS,
                   width: int | None = None, height: int | None = None, dpi: float = 300,
                   engine: str = "auto", timeout: float = 60.0) -> pd.DataFrame:
    """Write many figures in many formats (``<out_dir>/<name>.<fmt>``) through one kaleido browser.

    Returns a tidy frame, one row per file: ``name, format, path, engine, bytes, seconds, fallback_reason``.
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    out_dir = Path(out_dir)
    rows = []
    started = False
    if engine in ("auto", "kaleido") and kaleido_available() is None:
        try:
            kaleido.start_sync_server(n=1, timeout=timeout, mathjax=False, silence_warnings=True)
            started = _batch["on"] = True
        except Exception:  # noqa: BLE001 - per-figure export below retries / falls back
            started = False
    try:
        for name, fig in figures.items():
            for fmt in formats:
                info = save_figure(fig, out_dir / f"{name}.{fmt}", width=width, height=height, dpi=dpi,
                                   engine=engine, timeout=timeout)
                rows.append({"name": name, **info, "path": str(info["path"])})
    finally:
        if started:
            _batch["on"] = False
            kaleido.stop_sync_server(silence_warnings=True)
    return pd.DataFrame(rows, columns=["name", "path", "format", "engine", "bytes", "seconds", "fallback_reason"])


def finish(fig, save_to, **kw):
    """Export ``fig`` to every path in ``save_to`` (see :func:`save_figure`) and return it."""
    for p in _paths(save_to):
        save_figure(fig, p, **kw)
    return fig


# --------------------------------------------------------------------------- images

def image_to_png(image, scale: int = 1) -> bytes:
    """PNG bytes of one image ``[3,H,W]`` (tensor or array) in [0,1], nearest-upscaled by ``scale``."""
    arr = _to_hwc_uint8(image)
    im = Image.fromarray(arr)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image, path: str | os.PathLike, scale: int = 4) -> Path:
    """Write one image ``[3,H,W]`` in [0,1] as a PNG file (nearest-upscaled by ``scale``), atomically."""
    path = Path(path)
    _write_atomic(path, image_to_png(image, scale=scale))
    return path


def _to_hwc_uint8(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise InputError(f"expected one image [3,H,W] in [0,1], got shape {arr.shape}")
    arr = np.nan_to_num(arr, nan=0.0)
    return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)


def image_grid(images, captions: Sequence[str] | None = None, *, ncols: int = 8, hover: Sequence[str] | None = None,
               title: str | None = None, tile: int = 96, outline: Sequence[str | None] | None = None,
               save_to=None, **save_kw):
    """A grid of images as one figure (for papers): one ``go.Image`` per cell, caption under each.

    Args:
        images: ``[N,3,H,W]`` in [0,1] (tensor or array).
        captions: N short strings printed under the images (``<br>`` breaks lines).
        ncols: images per row.
        hover: N strings shown on hover.
        tile: side of one cell in layout pixels.
        outline: N colours (or ``None``) framing individual cells (e.g. the reference).
    """
    n = len(images)
    if n == 0:
        raise InputError("image_grid needs at least one image")
    if captions is not None and len(captions) != n:
        raise InputError(f"{len(captions)} captions for {n} images")
    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    cap_lines = max((str(c).count("<br>") + 1 for c in captions), default=0) if captions else 0
    vgap = 0.02 + 0.05 * cap_lines / max(nrows, 1)
    fig = make_subplots(rows=nrows, cols=ncols, horizontal_spacing=0.02 / max(ncols / 4, 1),
                        vertical_spacing=min(vgap, 0.9 / max(nrows - 1, 1)) if nrows > 1 else 0.0)
    for k in range(n):
        r, c = k // ncols + 1, k % ncols + 1
        src = "data:image/png;base64," + base64.b64encode(image_to_png(images[k])).decode()
        fig.add_trace(go.Image(source=src, hovertext=None if hover is None else hover[k],
                               hoverinfo="text" if hover is not None else "skip", name=f"image {k}"), row=r, col=c)
        if captions is not None:
            fig.update_xaxes(title_text=str(captions[k]), title_font_size=10, title_standoff=2, row=r, col=c)
        if outline is not None and outline[k]:
            h, w = np.asarray(images[k].shape[-2:])
            fig.add_shape(type="rect", x0=-0.5, y0=-0.5, x1=w - 0.5, y1=h - 0.5,
                          line=dict(color=outline[k], width=3), row=r, col=c)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)
    extra = 14 * cap_lines
    fig.update_layout(width=ncols * tile + 40, height=nrows * (tile + extra) + (60 if title else 30),
                      margin=dict(l=10, r=10, t=40 if title else 10, b=10 + extra), title=title,
                      template="plotly_white")
    return finish(fig, save_to, **save_kw)


def fiber_grid(result, frame: pd.DataFrame | None = None, *, reference: int = 0, max_samples: int = 15,
               ncols: int = 8, caption_columns: Sequence[str] = ("feature_distance",), title: str | None = None,
               save_to=None, **save_kw):
    """The reference (framed red) then its samples sorted by feature distance, captions from ``frame``.

    Args:
        result: a :class:`~fiberbench.sampling.FiberResult`.
        frame: per-sample table (default ``result.to_frame()``) with ``reference`` and ``sample`` columns;
            ``caption_columns`` of it are printed under each sample (floats with 3 decimals).
        reference: which reference of the result to show.
    """
    df = result.to_frame() if frame is None else frame
    sub = df[df["reference"] == reference].sort_values("feature_distance").head(max_samples)
    if sub.empty:
        raise InputError(f"no samples of reference {reference} in the result")
    n = result.n
    imgs = [result.reference[reference]] + [result.images[reference * n + int(s)] for s in sub["sample"]]
    caps = ["reference"]
    for _, row in sub.iterrows():
        parts = []
        for col in caption_columns:
            if col in row.index:
                v = row[col]
                parts.append(f"{_short(col)}={v:.3f}" if isinstance(v, (float, np.floating)) else f"{v}")
        caps.append("<br>".join(parts))
    return image_grid(torch.stack([torch.as_tensor(i) for i in imgs]), caps, ncols=ncols, title=title,
                      outline=["#d62728"] + [None] * len(sub), save_to=save_to, **save_kw)


def _short(col: str) -> str:
    return {"feature_distance": "d", "clip_angle": "angle", "cosine": "cos"}.get(col, col)


# --------------------------------------------------------------------------- curves and bars

def loss_curve(loss_history, *, title: str = "fiber loss per denoising step", band: bool = True,
               save_to=None, **save_kw):
    """Mean fiber loss per step with a min-max band. ``loss_history``: ``[steps, M]`` (NaN where not computed)
    or a frame with columns ``step`` and ``loss`` (one row per step and sample)."""
    if isinstance(loss_history, pd.DataFrame):
        if not {"step", "loss"} <= set(loss_history.columns):
            raise InputError("loss frame needs columns 'step' and 'loss'")
        g = loss_history.groupby("step")["loss"]
        steps, mean, lo, hi = g.mean().index.to_numpy(), g.mean().to_numpy(), g.min().to_numpy(), g.max().to_numpy()
    else:
        arr = np.asarray(loss_history.detach().cpu() if hasattr(loss_history, "detach") else loss_history, float)
        if arr.ndim != 2:
            raise InputError(f"loss_history must be [steps, M], got shape {arr.shape}")
        keep = np.isfinite(arr).any(axis=1)
        steps = np.arange(arr.shape[0])[keep]
        a = arr[keep]
        mean, lo, hi = np.nanmean(a, 1), np.nanmin(a, 1), np.nanmax(a, 1)
    fig = go.Figure()
    if band and len(steps):
        fig.add_trace(go.Scatter(x=np.r_[steps, steps[::-1]], y=np.r_[hi, lo[::-1]], fill="toself", mode="lines",
                                 line=dict(width=0), fillcolor="rgba(99,110,250,0.2)", name="min-max",
                                 hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=steps, y=mean, mode="lines+markers", name="mean", line=dict(color=PALETTE[0])))
    fig.update_layout(title=title, xaxis_title="denoising step", yaxis_title="fiber loss", template="plotly_white",
                      width=600, height=350)
    return finish(fig, save_to, **save_kw)


def require_columns(frame: pd.DataFrame, cols: Iterable[str | None], what: str) -> None:
    """``InputError`` naming the columns of ``cols`` that ``frame`` lacks (``None`` entries are skipped)."""
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"{what} takes a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in cols if c is not None and c not in frame.columns]
    if missing:
        raise InputError(f"{what}: missing column(s) {missing}; the frame has {list(frame.columns)}")


def bars(frame: pd.DataFrame, x: str, y: str, *, color: str | None = None, facet: str | None = None,
         lo: str | None = None, hi: str | None = None, title: str | None = None, y_title: str | None = None,
         y_range: tuple[float, float] | None = None, hover: Sequence[str] = (), save_to=None, **save_kw):
    """Grouped bars of ``y`` over categories ``x``, one colour per ``color`` value, one panel per ``facet``
    value, with asymmetric error bars from columns ``lo``/``hi`` (absolute interval bounds)."""
    require_columns(frame, [x, y, color, facet, lo, hi, *hover], "bars")
    if frame.empty:
        raise InputError("bars: the frame is empty")
    facets = list(pd.unique(frame[facet])) if facet else [None]
    groups = list(pd.unique(frame[color])) if color else [None]
    cats = [str(c) for c in pd.unique(frame[x])]
    fig = make_subplots(rows=1, cols=len(facets), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[str(f) for f in facets] if facet else None)
    for j, fv in enumerate(facets):
        sub = frame if fv is None else frame[frame[facet] == fv]
        for gi, gv in enumerate(groups):
            d = sub if gv is None else sub[sub[color] == gv]
            d = d.set_index(d[x].astype(str)).reindex(cats)
            err = None
            if lo and hi:
                err = dict(type="data", symmetric=False, array=(d[hi] - d[y]).to_numpy(float),
                           arrayminus=(d[y] - d[lo]).to_numpy(float), thickness=1.2, width=3)
            custom = d[list(hover)].to_numpy() if hover else None
            tmpl = f"{x}=%{{x}}<br>{y}=%{{y:.3f}}" + "".join(
                f"<br>{h}=%{{customdata[{k}]}}" for k, h in enumerate(hover)) + "<extra>%{fullData.name}</extra>"
            fig.add_trace(go.Bar(x=cats, y=d[y].to_numpy(float), error_y=err, name=str(gv) if gv is not None else y,
                                 marker_color=PALETTE[gi % len(PALETTE)], legendgroup=str(gv), showlegend=j == 0,
                                 customdata=custom, hovertemplate=tmpl), row=1, col=j + 1)
    fig.update_layout(barmode="group", title=title, template="plotly_white", legend_title_text=color or "",
                      width=max(420, 90 + 260 * len(facets) + 14 * len(cats) * len(groups)), height=380)
    fig.update_yaxes(title_text=y_title or y, row=1, col=1)
    if y_range is not None:
        fig.update_yaxes(range=list(y_range))
    return finish(fig, save_to, **save_kw)


def change_rates(stats: pd.DataFrame, *, x: str = "class", y: str = "mean", color: str = "statistic",
                 facet: str | None = "extractor", lo: str | None = "ci_low", hi: str | None = "ci_high",
                 title: str = "attribute change rate inside fibers (95% CI)", save_to=None, **save_kw):
    """Per-class change rates of attributes, with confidence intervals, one panel per extractor.

    ``stats``: long format, one row per (``facet``, ``x``, ``color``) with the rate in [0,1] and its
    interval ``[lo, hi]``; the defaults read :func:`fiberbench.stats.per_class` output
    (``statistic, mean, ci_low, ci_high``; a ``_changed`` suffix is dropped from legend names).
    """
    if facet is not None and facet not in stats.columns:
        facet = None
    stats = _strip_changed(stats, color)
    have_ci = lo in stats.columns and hi in stats.columns if lo and hi else False
    return bars(stats, x, y, color=color, facet=facet, lo=lo if have_ci else None, hi=hi if have_ci else None,
                title=title, y_title="change rate", y_range=(0, 1.05), save_to=save_to, **save_kw)


def _strip_changed(frame: pd.DataFrame, col: str | None) -> pd.DataFrame:
    if col and col in frame.columns and not pd.api.types.is_numeric_dtype(frame[col]):
        frame = frame.assign(**{col: frame[col].astype(str).str.replace(r"_changed$", "", regex=True)})
    return frame


def heatmap(frame: pd.DataFrame, row: str, col: str, value: str, *, facet: str | None = None,
            zmin: float | None = 0.0, zmax: float | None = 1.0, colorscale: str = "Viridis",
            title: str | None = None, fmt: str = ".2f", save_to=None, **save_kw):
    """``row`` x ``col`` heatmap of ``value`` (mean over duplicates), values printed in the cells,
    one panel per ``facet`` value."""
    require_columns(frame, [row, col, value, facet], "heatmap")
    if frame.empty:
        raise InputError("heatmap: the frame is empty")
    facets = list(pd.unique(frame[facet])) if facet else [None]
    rows_ = [str(v) for v in pd.unique(frame[row])]
    cols_ = [str(v) for v in pd.unique(frame[col])]
    fig = make_subplots(rows=1, cols=len(facets), shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=[str(f) for f in facets] if facet else None)
    for j, fv in enumerate(facets):
        sub = frame if fv is None else frame[frame[facet] == fv]
        z = (sub.assign(_r=sub[row].astype(str), _c=sub[col].astype(str))
             .pivot_table(index="_r", columns="_c", values=value, aggfunc="mean").reindex(index=rows_, columns=cols_))
        zz = z.to_numpy(float)
        text = [[("" if not np.isfinite(v) else format(v, fmt)) for v in r] for r in zz]
        fig.add_trace(go.Heatmap(z=zz, x=cols_, y=rows_, zmin=zmin, zmax=zmax, colorscale=colorscale, text=text,
                                 texttemplate="%{text}", showscale=j == len(facets) - 1, name=str(fv),
                                 hovertemplate=f"{row}=%{{y}}<br>{col}=%{{x}}<br>{value}=%{{z:.3f}}<extra></extra>"),
                      row=1, col=j + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, template="plotly_white",
                      width=max(420, 120 + len(facets) * (60 * len(cols_) + 40)), height=140 + 34 * len(rows_))
    return finish(fig, save_to, **save_kw)


def change_heatmap(stats: pd.DataFrame, *, row: str = "class", col: str = "statistic", value: str = "mean",
                   facet: str | None = "extractor", title: str = "change rate: class x attribute",
                   save_to=None, **save_kw):
    """Class x attribute heatmap of change rates in [0,1], one panel per extractor (if that column exists).

    Defaults read :func:`fiberbench.stats.per_class` output."""
    if facet is not None and facet not in stats.columns:
        facet = None
    stats = _strip_changed(stats, col)
    return heatmap(stats, row, col, value, facet=facet, title=title, save_to=save_to, **save_kw)


def boxes(frame: pd.DataFrame, x: str, y: str, *, color: str | None = None, title: str | None = None,
          y_title: str | None = None, points: bool = True, save_to=None, **save_kw):
    """Box plots of ``y`` per category ``x`` (one box colour per ``color`` value), with the points."""
    require_columns(frame, [x, y, color], "boxes")
    if frame.empty:
        raise InputError("boxes: the frame is empty")
    groups = list(pd.unique(frame[color])) if color else [None]
    fig = go.Figure()
    for gi, gv in enumerate(groups):
        d = frame if gv is None else frame[frame[color] == gv]
        fig.add_trace(go.Box(x=d[x].astype(str), y=d[y].astype(float), name=str(gv) if gv is not None else y,
                             marker_color=PALETTE[gi % len(PALETTE)], boxpoints="all" if points else False,
                             jitter=0.3, pointpos=0))
    fig.update_layout(boxmode="group", title=title, yaxis_title=y_title or y, xaxis_title=x, template="plotly_white",
                      width=max(480, 120 + 40 * frame[x].nunique() * len(groups)), height=380)
    return finish(fig, save_to, **save_kw)


def distances(frame: pd.DataFrame, *, x: str = "extractor", y: str = "feature_distance", color: str | None = "method",
              title: str = "feature distance to the reference", save_to=None, **save_kw):
    """Box plot of per-sample feature distances (default: per extractor, coloured by method)."""
    if color is not None and color not in frame.columns:
        color = None
    return boxes(frame, x, y, color=color, title=title, save_to=save_to, **save_kw)


# --------------------------------------------------------------------------- matplotlib fallback

def _axis_names(trace) -> tuple[str, str]:
    xa = (trace.xaxis or "x").replace("x", "xaxis", 1)
    ya = (trace.yaxis or "y").replace("y", "yaxis", 1)
    return xa, ya


def _cmap(name) -> str:
    if isinstance(name, str):
        return _MPL_CMAPS.get(name.lower(), "viridis")
    return "viridis"


def to_matplotlib(fig, *, width: int | None = None, height: int | None = None, dpi: float = CSS_DPI):
    """Redraw a plotly figure of this module with matplotlib (Agg), no browser needed.

    Supports Bar (grouped, error bars), Scatter (lines/markers/filled bands), Heatmap, Box and Image
    traces on any subplot layout (axes placed at their plotly domains), titles, axis titles and
    paper-referenced annotations (subplot titles). Returns a ``matplotlib.figure.Figure``.
    """
    w, h = _size(fig, width, height)
    mfig = Figure(figsize=(w / CSS_DPI, h / CSS_DPI), dpi=dpi)
    lay = fig.layout
    m = lay.margin
    ml, mr = (m.l if m.l is not None else 80) / w, (m.r if m.r is not None else 80) / w
    mt, mb = (m.t if m.t is not None else 100) / h, (m.b if m.b is not None else 80) / h
    pw, ph = max(1 - ml - mr, 0.05), max(1 - mt - mb, 0.05)
    axes: dict[tuple[str, str], Any] = {}
    by_axes: dict[tuple[str, str], list] = {}
    for tr in fig.data:
        by_axes.setdefault(_axis_names(tr), []).append(tr)
    for key in by_axes:
        xa, ya = lay[key[0]], lay[key[1]]
        xd = list(xa.domain) if xa and xa.domain else [0, 1]
        yd = list(ya.domain) if ya and ya.domain else [0, 1]
        ax = mfig.add_axes([ml + xd[0] * pw, mb + yd[0] * ph, (xd[1] - xd[0]) * pw, (yd[1] - yd[0]) * ph])
        axes[key] = ax
    for key, traces in by_axes.items():
        ax = axes[key]
        xa, ya = lay[key[0]], lay[key[1]]
        bar_traces = [t for t in traces if t.type == "bar"]
        box_traces = [t for t in traces if t.type == "box"]
        cats: list[str] = []
        for t in bar_traces + box_traces:
            for c in (t.x if t.x is not None else []):
                if str(c) not in cats:
                    cats.append(str(c))
        pos = {c: i for i, c in enumerate(cats)}
        nb = max(len(bar_traces), 1)
        width = 0.8 / nb
        for k, t in enumerate(bar_traces):
            xs = np.array([pos[str(c)] for c in t.x], float) + (k - (nb - 1) / 2) * width
            ys = np.asarray(t.y, float)
            yerr = None
            e = t.error_y
            if e is not None and e.array is not None:
                up = np.asarray(e.array, float)
                dn = np.asarray(e.arrayminus if e.arrayminus is not None else e.array, float)
                yerr = np.vstack([np.nan_to_num(dn), np.nan_to_num(up)])
            ax.bar(xs, np.nan_to_num(ys), width=width * 0.95, color=t.marker.color or PALETTE[k % len(PALETTE)],
                   yerr=yerr, capsize=2, label=t.name if t.showlegend is not False else None, error_kw=dict(lw=0.8))
        nx = max(len(box_traces), 1)
        for k, t in enumerate(box_traces):
            xs_all = np.asarray([str(v) for v in t.x])
            ys_all = np.asarray(t.y, float)
            data, where = [], []
            for c in cats:
                vals = ys_all[xs_all == c]
                if len(vals):
                    data.append(vals)
                    where.append(pos[c] + (k - (nx - 1) / 2) * (0.8 / nx))
            col = t.marker.color or PALETTE[k % len(PALETTE)]
            bp = ax.boxplot(data, positions=where, widths=0.7 / nx, patch_artist=True, manage_ticks=False)
            for patch in bp["boxes"]:
                patch.set_facecolor(col)
                patch.set_alpha(0.5)
            ax.plot([], [], color=col, lw=6, alpha=0.5, label=t.name)
        if cats:
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, rotation=30 if len(cats) > 5 else 0, fontsize=8)
            ax.set_xlim(-0.6, len(cats) - 0.4)
        for k, t in enumerate(traces):
            if t.type == "scatter":
                xs = np.asarray(t.x if t.x is not None else np.arange(len(t.y)), float)
                ys = np.asarray(t.y, float)
                col = (t.line.color if t.line and t.line.color else None) or PALETTE[k % len(PALETTE)]
                if t.fill == "toself":
                    ax.fill(xs, ys, color=t.fillcolor if t.fillcolor and not str(t.fillcolor).startswith("rgba")
                            else col, alpha=0.2, lw=0)
                else:
                    style = "-o" if t.mode and "markers" in t.mode and "lines" in t.mode else \
                        ("o" if t.mode == "markers" else "-")
                    ax.plot(xs, ys, style, color=col, ms=3, label=t.name)
            elif t.type == "heatmap":
                z = np.asarray(t.z, float)
                im = ax.imshow(z, cmap=_cmap(_heat_name(t)), vmin=t.zmin, vmax=t.zmax, aspect="auto")
                xs, ys = list(t.x) if t.x is not None else None, list(t.y) if t.y is not None else None
                if xs:
                    ax.set_xticks(range(len(xs)))
                    ax.set_xticklabels(xs, rotation=30, fontsize=8)
                if ys:
                    ax.set_yticks(range(len(ys)))
                    ax.set_yticklabels(ys, fontsize=8)
                if t.text is not None:
                    for i, r in enumerate(t.text):
                        for j, s in enumerate(r):
                            if s:
                                v = z[i, j]
                                span = (t.zmax or 1) - (t.zmin or 0) or 1
                                dark = np.isfinite(v) and (v - (t.zmin or 0)) / span < 0.6
                                ax.text(j, i, s, ha="center", va="center", fontsize=7,
                                        color="white" if dark else "black")
                if t.showscale is not False:
                    mfig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
            elif t.type == "image":
                if t.source:
                    raw = base64.b64decode(t.source.split(",", 1)[1])
                    arr = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
                else:
                    arr = np.asarray(t.z, np.uint8)
                ax.imshow(arr, interpolation="nearest")
        if xa and xa.title and xa.title.text:
            ax.set_xlabel(xa.title.text.replace("<br>", "\n"), fontsize=8)
        if ya and ya.title and ya.title.text:
            ax.set_ylabel(ya.title.text.replace("<br>", "\n"), fontsize=9)
        if ya and ya.range is not None:
            ax.set_ylim(*ya.range)
        if ya and ya.autorange == "reversed" and not any(t.type == "heatmap" for t in traces):
            ax.invert_yaxis()
        if any(t.type == "image" for t in traces) or (xa and xa.showticklabels is False):
            ax.set_xticks([])
            ax.set_yticks([])
            if any(t.type == "image" for t in traces):
                for s in ax.spines.values():
                    s.set_visible(False)
    for shape in lay.shapes or []:  # rectangles framing image cells
        if shape.type == "rect" and shape.xref and shape.xref != "paper":
            key = (shape.xref.replace("x", "xaxis", 1), shape.yref.replace("y", "yaxis", 1))
            if key in axes:
                axes[key].add_patch(mp.Rectangle((shape.x0, shape.y0), shape.x1 - shape.x0, shape.y1 - shape.y0,
                                                 fill=False, ec=shape.line.color or "red", lw=2))
    for ann in lay.annotations or []:
        if ann.xref == "paper" and ann.yref == "paper" and ann.text:
            mfig.text(ml + ann.x * pw, mb + ann.y * ph + 0.01, ann.text.replace("<br>", "\n"), ha="center",
                      va="bottom", fontsize=9)
    title = lay.title.text if lay.title else None
    if title:
        mfig.suptitle(title, fontsize=11)
    handles = {}
    for ax in axes.values():
        for hnd, lab in zip(*ax.get_legend_handles_labels()):
            if lab and not lab.startswith("_"):
                handles.setdefault(lab, hnd)
    if len(handles) > 1:
        mfig.legend(list(handles.values()), list(handles.keys()), loc="upper right", fontsize=8, frameon=False)
    return mfig


def _heat_name(trace) -> str:
    """Name of the colorscale a heatmap was made with (plotly expands names into lists)."""
    cs = trace.colorscale
    if isinstance(cs, str):
        return cs
    try:
        seq = [c for _, c in cs]
        for name in ("Viridis", "Blues", "Reds", "RdBu", "Greys", "Magma", "Cividis", "YlOrRd", "Purples"):
            ref = pc.get_colorscale(name)
            if [c for _, c in ref] == seq:
                return name
    except Exception:  # noqa: BLE001
        pass
    return "viridis"
