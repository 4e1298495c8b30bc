"""Fiber gallery: pick a reference, sample its fiber with a live preview, browse the samples.

Layout (top to bottom): model picker; reference chooser (toy world factors / an image in ``data/`` /
an uploaded file) with its preview; method, n, steps, seed, preset; Run and Stop with a progress bar,
a live x0-hat preview of the first samples and a live fiber-loss curve; then the gallery (the
reference first, the samples sorted by feature distance, each captioned with its distance, CLIP angle
and changed attributes, hover for more, "Δ" for the attribute deltas) and a bar chart of the distances.

Sampling runs in a background thread when started from the Run button, so the notebook stays
responsive and Stop works (it ends the run at the next denoising step). Results go through a
:class:`fiberbench.store.Store`: a re-run with the same configuration is loaded, not recomputed.
"""
from __future__ import annotations

import html
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import ipywidgets as W
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from ... import plots, toy
from ...analysis.semantics import score_fiber
from ...checks import show
from ...errors import InputError
from ...io import as_image_batch, load_image, load_image_bytes
from ...plots import image_to_png
from ...runs.store import Store, cached_sample_fiber
from ...sampling import METHODS, NO_PRESET, PRESETS, resolve_settings
from ...toy import FACTORS
from ._common import RunStopped, caption_html, guarded, html_table, image_widget, show_error
from .picker import ModelPicker

ANY = "any"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def default_store_root() -> Path:
    """``$FIBERBENCH_STORE`` or ``~/.cache/fiberbench/store``."""
    return Path(os.environ.get("FIBERBENCH_STORE", "~/.cache/fiberbench/store")).expanduser()


def data_images(root: str | os.PathLike | None = None) -> list[Path]:
    """Image files under the package's ``data/`` folder (model weights excluded), sorted."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2] / "data"
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "models" not in p.parts)


def toy_reference(seed: int = 0, **factors: Any) -> tuple[torch.Tensor, pd.DataFrame]:
    """One shapes-world reference ``([3,32,32] in [0,1], factor row)``; ``factors`` pin shape/colour/…
    (the value ``"any"`` leaves a factor random)."""
    df = toy.sample_factors(1, seed=seed)
    for k, v in factors.items():
        if v is not None and v != ANY:
            df[k] = v
    df = toy.validate_factors(df)
    return toy.render(df)[0], df


def changed_attributes(row: pd.Series, groups: Sequence[str]) -> list[tuple[str, str, str]]:
    """``[(group, reference label, sample label)]`` for every group whose label changed in this sample row."""
    out = []
    for g in groups:
        flag = row.get(f"{g}_changed")
        if flag is not None and not pd.isna(flag) and bool(flag):
            out.append((g, str(row.get(f"{g}_ref_label")), str(row.get(f"{g}_label"))))
    return out


def fiber_table(result, scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """``result.to_frame()`` joined with per-sample CLIP scores (on ``reference, sample``), sorted by
    reference then feature distance."""
    df = result.to_frame()
    if scores is not None:
        extra = [c for c in scores.columns if c not in df.columns or c in ("reference", "sample")]
        df = df.merge(scores[extra], on=["reference", "sample"], how="left")
    return df.sort_values(["reference", "feature_distance"], kind="stable").reset_index(drop=True)


class FiberGallery(W.VBox):
    """The fiber gallery widget (see the module docstring).

    Args:
        picker: a :class:`~fiberbench.widgets.ModelPicker` (default: a new one, toy models preselected).
        store: a :class:`~fiberbench.store.Store`, a folder, ``"default"`` (:func:`default_store_root`)
            or ``None`` (no caching).
        n, steps, method, seed, preset: initial sampling settings (``steps=None``: the preset's).
        vocab: CLIP vocabulary for the captions (default :data:`fiberbench.semantics.TOY_VOCAB`).
        threaded: run from the Run button in a background thread (Stop works); ``False`` runs inline.
        preview: how many samples the live preview shows.
        scale: pixel upscaling of the 32x32 toy images in the grid.

    After a run: ``result`` (FiberResult), ``frame`` (one row per sample, sorted by distance, with CLIP
    columns), ``cells`` (gallery cell widgets, reference first), ``distance_figure`` (FigureWidget),
    ``last_run`` (``from_store``, ``seconds``, ``stopped``) and ``errors`` (messages shown in the widget).
    """

    def __init__(self, picker=None, *, store: Any = "default", n: int = 8, steps: int | None = None,
                 method: str = "ndtm", seed: int = 0, preset: str | None = None, vocab: dict | None = None,
                 threaded: bool = True, preview: int = 8, scale: int = 3, batch_size: int = 64):
        self.errors: list[str] = []
        self.picker = picker if picker is not None else ModelPicker()
        self.store = self._open_store(store)
        self.vocab = vocab
        self.threaded, self.preview_n, self.scale, self.batch_size = threaded, preview, scale, batch_size
        self.result = None
        self.frame: pd.DataFrame | None = None
        self.cells: list[W.Widget] = []
        self.last_run: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._uploaded: torch.Tensor | None = None
        self._step_calls = 0
        self._last_preview = 0.0

        self._build_reference_chooser(seed)
        self._build_settings(n=n, steps=steps, method=method, seed=seed, preset=preset)
        self._build_live_view()
        self._build_results(scale)
        self._connect()
        super().__init__(self._layout())
        self.add_class("fb-fiber-gallery")

    # ---------------------------------------------------------------- building
    def _build_reference_chooser(self, seed: int) -> None:
        """Source toggle, toy factor dropdowns, reference seed, ``data/`` image list, upload, preview."""
        self.ref_source = W.ToggleButtons(options=["toy world", "data/ image", "upload"], value="toy world",
                                          style={"button_width": "110px"})
        self.factor = {k: W.Dropdown(options=[ANY] + [str(v) for v in FACTORS[k]], value=ANY, description=k,
                                     layout=W.Layout(width="200px"))
                       for k in ("shape", "color", "background", "mirror")}
        self.ref_seed = W.IntText(value=seed, description="ref seed", layout=W.Layout(width="180px"))
        self.data_file = W.Dropdown(options=[(p.name, str(p)) for p in data_images()], description="image",
                                    layout=W.Layout(width="380px"))
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="upload")
        self.ref_view = W.Box(layout=W.Layout(min_height="100px"))
        self.ref_caption = W.HTML()

    def _build_settings(self, *, n: int, steps: int | None, method: str, seed: int, preset: str | None) -> None:
        """Method, preset, n (1..256), steps (0..2000, 0 = the preset's) and seed inputs."""
        self.method = W.Dropdown(options=list(METHODS), value=method, description="method",
                                 layout=W.Layout(width="200px"))
        self.preset = W.Dropdown(options=[("recommended", None), ("none", NO_PRESET)] + [(p, p) for p in PRESETS],
                                 value=preset, description="preset", layout=W.Layout(width="220px"))
        self.n = W.BoundedIntText(value=n, min=1, max=256, description="n", layout=W.Layout(width="150px"))
        self.steps = W.BoundedIntText(value=steps or 0, min=0, max=2000, description="steps",
                                      layout=W.Layout(width="160px"))  # 0: the preset's
        self.seed = W.IntText(value=seed, description="seed", layout=W.Layout(width="160px"))

    def _build_live_view(self) -> None:
        """Run and Stop, the step progress bar, the status line, the x0-hat preview row, the live loss curve."""
        self.run_button = W.Button(description="Run", icon="play", button_style="primary")
        self.stop_button = W.Button(description="Stop", icon="stop", button_style="warning", disabled=True)
        self.run_button.add_class("fb-run")
        self.stop_button.add_class("fb-stop")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="steps", layout=W.Layout(width="420px"))
        self.status = W.HTML()
        self.status.add_class("fb-status")
        self.preview_box = W.HBox()
        self.preview_box.add_class("fb-preview")
        self.loss_figure = go.FigureWidget(go.Figure(
            go.Scatter(x=[], y=[], mode="lines+markers", name="mean fiber loss"),
            layout=dict(height=220, width=420, margin=dict(l=50, r=10, t=30, b=40), template="plotly_white",
                        title="fiber loss per step (live)", xaxis_title="step", yaxis_title="loss")))
        self.loss_figure.add_class("fb-loss-plot")

    def _build_results(self, scale: int) -> None:
        """The gallery grid (columns fit 32 x ``scale`` pixel images), details, distance chart, message output."""
        self.grid = W.GridBox(layout=W.Layout(grid_template_columns=f"repeat(auto-fill, {32 * scale + 40}px)",
                                              grid_gap="6px"))
        self.grid.add_class("fb-gallery-grid")
        self.details = W.HTML()
        self.details.add_class("fb-details")
        self.distance_figure = go.FigureWidget()
        self.distance_box = W.Box([self.distance_figure])
        self.out = W.Output()
        self.out.add_class("fb-output")

    def _connect(self) -> None:
        """Wire the callbacks and show the initial reference (needs ``self.out`` for its errors)."""
        self.ref_source.observe(self._on_reference_change, names="value")
        for w in (*self.factor.values(), self.ref_seed, self.data_file):
            w.observe(self._on_reference_change, names="value")
        self.upload.observe(self._on_upload, names="value")
        self.run_button.on_click(self._on_run)
        self.stop_button.on_click(self._on_stop)
        self._on_reference_change()

    def _layout(self) -> list[W.Widget]:
        """The rows of the widget, top to bottom (see the module docstring)."""
        factors = list(self.factor.values())
        ref_panel = W.VBox([
            self.ref_source,
            W.HBox([W.VBox([W.HBox(factors[:2]), W.HBox(factors[2:]),
                            W.HBox([self.ref_seed, self.data_file]), self.upload]),
                    W.VBox([self.ref_view, self.ref_caption])]),
        ])
        settings = W.HBox([self.method, self.preset, self.n, self.steps, self.seed])
        live = W.HBox([W.VBox([W.HBox([self.run_button, self.stop_button]), self.progress, self.status,
                               self.preview_box]), self.loss_figure])
        return [self.picker, ref_panel, settings, live, self.out, self.grid, self.details, self.distance_box]

    # ---------------------------------------------------------------- reference
    @staticmethod
    def _open_store(store):
        if store is None:
            return None
        if isinstance(store, Store):
            return store
        return Store(default_store_root() if store == "default" else store)

    def reference(self) -> tuple[torch.Tensor, str, str]:
        """The current reference ``([3,H,W] in [0,1], id, class label)``; ``InputError`` if none is chosen."""
        src = self.ref_source.value
        if src == "toy world":
            factors = {k: (w.value == "True" if k == "mirror" and w.value != ANY else w.value)
                       for k, w in self.factor.items()}
            img, df = toy_reference(self.ref_seed.value, **factors)

            ref_id = f"toy-{self.ref_seed.value}-" + "-".join(str(df.iloc[0][k]) for k in self.factor)
            return img, ref_id, toy.caption(df)[0]
        if src == "data/ image":
            if not self.data_file.value:
                raise InputError("there are no images under data/; choose 'toy world' or upload a file")
            return load_image(self.data_file.value), Path(self.data_file.value).stem, Path(self.data_file.value).stem
        if self._uploaded is None:
            raise InputError("no file uploaded yet: use the upload button (PNG, JPEG, …)")
        return self._uploaded, "upload", "uploaded image"

    def set_reference(self, image: torch.Tensor, label: str = "reference") -> None:
        """Use ``image`` (``[3,H,W]`` in [0,1]) as the reference, as if it had been uploaded."""
        self._uploaded = as_image_batch(image, name="reference")[0]
        self.ref_source.value = "upload"
        self._on_reference_change()
        self.ref_caption.value = html.escape(label)

    @guarded()
    def _on_upload(self, change=None) -> None:
        files = self.upload.value
        if not files:
            return
        f = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
        content = bytes(f["content"]) if isinstance(f, dict) else bytes(f.content)
        name = f["name"] if isinstance(f, dict) else f.name
        # the same checks, conversions and limits as a file on disk; errors name the uploaded file
        self._uploaded = load_image_bytes(content, name=f"uploaded file {show(str(name), typed=False)}")
        self.ref_source.value = "upload"
        self._on_reference_change()

    @guarded()
    def _on_reference_change(self, change=None) -> None:
        toy_mode = self.ref_source.value == "toy world"
        for w in (*self.factor.values(), self.ref_seed):
            w.disabled = not toy_mode
        self.data_file.disabled = self.ref_source.value != "data/ image"
        try:
            img, _, caption = self.reference()
        except Exception as e:  # noqa: BLE001 - no reference yet is a normal state
            self.ref_view.children = []
            self.ref_caption.value = f"<i>{html.escape(str(e))}</i>"
            return
        scale = max(1, 96 // max(img.shape[-1], 1))
        self.ref_view.children = [image_widget(img, scale=scale, width="96px")]
        self.ref_caption.value = f"<small>{html.escape(caption)}</small>"

    # ---------------------------------------------------------------- running
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @guarded()
    def _on_run(self, button=None) -> None:
        if self.running:
            return
        if self.threaded:
            self._prepare()
            self._thread = threading.Thread(target=self._run_safe, name="fiberbench-gallery", daemon=True)
            self._thread.start()
        else:
            self._prepare()
            self._run_safe()

    def _on_stop(self, button=None) -> None:
        self._stop.set()
        self.status.value = "stopping at the next step …"

    def stop(self) -> None:
        """Ask the running job to stop at its next denoising step."""
        self._on_stop()

    def wait(self, timeout: float | None = None):
        """Block until a run started by the Run button has finished; returns :attr:`result`."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.result

    def run(self, block: bool = True):
        """Run with the current settings (as the Run button does); ``block=True`` waits in this thread."""
        if not block:
            self.run_button.click()
            return None
        self._prepare()
        self._run_safe()
        return self.result

    def _prepare(self) -> None:
        self._stop.clear()
        self.last_run = {}
        self.run_button.disabled, self.stop_button.disabled = True, False
        self.status.value = "loading models …"

    def _settings(self) -> dict[str, Any]:
        """The sampling settings; steps 0 takes the preset's (the prior's recommended preset when none is chosen)."""
        steps = int(self.steps.value)
        if not steps:
            _, run, _ = resolve_settings(self.method.value, self.preset.value, {}, self.picker.prior_spec)
            steps = int(run.get("steps", 50))
        return dict(n=int(self.n.value), method=self.method.value, steps=steps, seed=int(self.seed.value),
                    preset=self.preset.value)

    def _run_safe(self) -> None:
        try:
            self._run_body()
        except RunStopped as e:
            self.last_run = {**self.last_run, "stopped": True}
            self.status.value = f"<span class='fb-stopped'>stopped: {html.escape(str(e))}</span>"
        except Exception as e:  # noqa: BLE001 - shown in the widget, kept in .errors
            self.errors.append(f"{type(e).__name__}: {e}")
            self.status.value = "<span class='fb-failed'>failed (see the message below)</span>"
            show_error(self.out, e)
        finally:
            self.run_button.disabled, self.stop_button.disabled = False, True

    def _run_body(self) -> None:
        t0 = time.perf_counter()
        cfg = self._settings()
        ref, ref_id, caption = self.reference()
        prior, extractor = self.picker.load_prior(), self.picker.load_extractor()
        chunks = math.ceil(cfg["n"] / self.batch_size)
        self.progress.max, self.progress.value = cfg["steps"] * chunks, 0
        self._step_calls, self._last_preview = 0, 0.0
        self._start_preview(min(self.preview_n, cfg["n"]))
        with self.loss_figure.batch_update():
            self.loss_figure.data[0].x, self.loss_figure.data[0].y = [], []
        self.status.value = (f"sampling {cfg['n']} × {cfg['method']} on <code>{html.escape(extractor.spec)}</code> "
                             f"({cfg['steps']} steps) …")
        result = cached_sample_fiber(self.store, prior, extractor, ref[None], callback=self._on_step, progress=False,
                                     reference_ids=[ref_id], batch_size=self.batch_size, **cfg)
        from_store = bool(result.config.get("from_store"))
        self.progress.value = self.progress.max
        if from_store:  # no steps ran: show the stored final samples and loss curve instead
            if result.loss_history is not None:
                self._set_loss_curve(result.loss_history)
            for k, w in enumerate(self._preview_images):
                w.value = image_to_png(result.images[k], scale=2)
        scores = self._score(result, caption)
        self.result = result
        self.frame = fiber_table(result, scores)
        self._show_gallery(result, self.frame)
        seconds = time.perf_counter() - t0
        self.last_run = {"from_store": from_store, "seconds": seconds, "stopped": False,
                         "store_key": result.config.get("store_key")}
        where = ("loaded from the store" if from_store
                 else f"sampled ({result.config['seconds_per_sample']:.2f} s/sample)")
        self.status.value = (f"<span class='fb-done'>{len(self.frame)} samples {where} in {seconds:.2f} s; "
                             f"median distance {self.frame['feature_distance'].median():.3g}</span>")

    def _score(self, result, caption: str) -> pd.DataFrame | None:
        try:
            clip = self.picker.load_clip()
        except Exception as e:  # noqa: BLE001 - the gallery still works without CLIP captions
            self.errors.append(f"CLIP scoring skipped: {type(e).__name__}: {e}")
            show_error(self.out, e)
            return None
        if clip is None:
            return None
        return score_fiber(result, clip, self.vocab, classes=[caption.split(" on ")[0]])

    # ---------------------------------------------------------------- live updates (sampling thread)
    def _start_preview(self, k: int) -> None:
        blank = torch.full((3, 32, 32), 0.5)
        self._preview_images = [image_widget(blank, scale=2, width="64px") for _ in range(k)]
        self.preview_box.children = self._preview_images

    def _on_step(self, info: dict) -> None:
        """``sample_fiber`` callback: progress, throttled x0-hat preview, loss curve; raises to stop."""
        if self._stop.is_set():
            raise RunStopped(f"by the user at step {info['i'] + 1}")
        self._step_calls += 1
        self.progress.value = min(self._step_calls, self.progress.max)
        loss = info.get("loss")
        finite = loss.float()[torch.isfinite(loss.float())] if loss is not None else None
        # samples that skipped the step (already on the fiber) have no loss: the mean of the others; a step
        # without any is a gap (None: a NaN cannot cross the widget's JSON channel)
        y = float(finite.mean()) if finite is not None and finite.numel() else None
        fig = self.loss_figure
        with fig.batch_update():
            fig.data[0].x = tuple(fig.data[0].x or ()) + (self._step_calls,)
            fig.data[0].y = tuple(fig.data[0].y or ()) + (y,)
        now = time.perf_counter()
        last = self._step_calls % max(self.progress.max // max(1, math.ceil(self.n.value / self.batch_size)), 1) == 0
        if now - self._last_preview > 0.3 or last:
            self._last_preview = now
            imgs = info["images"]
            for k, row in enumerate(info["rows"]):
                if row < len(self._preview_images):
                    self._preview_images[row].value = image_to_png(imgs[k], scale=2)

    def _set_loss_curve(self, history: torch.Tensor) -> None:
        h = history.float().numpy()
        mean = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in h]) if h.size else np.array([])
        with self.loss_figure.batch_update():
            self.loss_figure.data[0].x = tuple(range(1, len(mean) + 1))
            self.loss_figure.data[0].y = tuple(float(v) if np.isfinite(v) else None for v in mean)

    # ---------------------------------------------------------------- gallery
    def _groups(self, frame: pd.DataFrame) -> list[str]:
        return [c[:-len("_changed")] for c in frame.columns if c.endswith("_changed")]

    def _caption(self, row: pd.Series, groups: Sequence[str]) -> tuple[str, str]:
        parts = [f"d={row['feature_distance']:.3g}"]  # distances of logits can be ~1e-4: significant digits
        if "clip_angle" in row and pd.notna(row.get("clip_angle")):
            parts.append(f"{row['clip_angle']:.1f}°")
        ch = changed_attributes(row, groups)
        short = ", ".join(f"{g}→{new}" for g, _, new in ch) or ("no change" if groups else "")
        hover = [f"sample {int(row['sample'])}", f"feature distance {row['feature_distance']:.4f}",
                 f"cosine {row['cosine']:.4f}"]
        if "clip_angle" in row and pd.notna(row.get("clip_angle")):
            hover.append(f"CLIP angle {row['clip_angle']:.2f}°")
        hover += [f"{g}: {old} → {new}" for g, old, new in ch]
        return " · ".join(parts) + (f"<br><small>{html.escape(short)}</small>" if short else ""), "\n".join(hover)

    def _show_gallery(self, result, frame: pd.DataFrame) -> None:
        groups = self._groups(frame)
        n = result.n
        ref_cell = W.VBox([image_widget(result.reference[0], scale=self.scale),
                           W.HTML(caption_html("<b>reference</b>", "the reference image"))],
                          layout=W.Layout(border="3px solid #d62728", padding="2px"))
        ref_cell.add_class("fb-gallery-cell")
        ref_cell.add_class("fb-gallery-reference")
        cells = [ref_cell]
        for _, row in frame.iterrows():
            k = int(row["reference"]) * n + int(row["sample"])
            cap, hover = self._caption(row, groups)
            img = image_widget(result.images[k], scale=self.scale)
            img.add_class("fb-gallery-image")
            btn = W.Button(description="Δ", tooltip="attribute deltas of this sample",
                           layout=W.Layout(width="40px", height="24px"))
            btn.on_click(self._details_handler(int(row["sample"])))
            cell = W.VBox([img, W.HTML(caption_html(cap, hover)), btn],
                          layout=W.Layout(padding="2px"))
            cell.add_class("fb-gallery-cell")
            cells.append(cell)
        self.cells = cells
        self.grid.children = cells
        self.details.value = "<i>press Δ under a sample to see what changed</i>"
        plot_frame = frame.assign(label=[f"s{int(s)}" for s in frame["sample"]])
        hover = [c for c in ("clip_angle", "cosine") if c in plot_frame.columns]
        fig = plots.bars(plot_frame, x="label", y="feature_distance", hover=hover,
                         title="feature distance to the reference (sorted)", y_title="feature distance")
        fig.update_layout(showlegend=False, width=max(420, 40 * len(frame) + 120), height=300)
        self.distance_figure = _figure_widget(fig)
        self.distance_figure.add_class("fb-distance-plot")
        self.distance_box.children = [self.distance_figure]

    def _details_handler(self, sample: int):
        def handler(button=None):
            self.show_details(sample)

        return handler

    @guarded()
    def show_details(self, sample: int) -> None:
        """Show the attribute deltas of sample ``sample`` (of the first reference) in the details panel."""
        if self.frame is None:
            raise InputError("run the sampler first")
        rows = self.frame[(self.frame["reference"] == 0) & (self.frame["sample"] == sample)]
        if rows.empty:
            raise InputError(f"no sample {sample} in the last run (n={self.result.n})")
        row = rows.iloc[0]
        table = [(g, row.get(f"{g}_ref_label"), row.get(f"{g}_label"),
                  f"{row.get(f'{g}_prob'):.2f}" if pd.notna(row.get(f"{g}_prob")) else "",
                  "yes" if pd.notna(row.get(f"{g}_changed")) and bool(row.get(f"{g}_changed")) else "no")
                 for g in self._groups(self.frame)]
        head = (f"<b>sample {sample}</b>: feature distance {row['feature_distance']:.4f}, cosine {row['cosine']:.4f}"
                + (f", CLIP angle {row['clip_angle']:.2f}°" if "clip_angle" in row and pd.notna(row['clip_angle'])
                   else "") + f", status {html.escape(str(row['status']))}")
        self.details.value = head + (html_table(table, ("attribute", "reference", "sample", "p", "changed"))
                                     if table else "<br><i>no CLIP scores (choose a CLIP model)</i>")


def _figure_widget(fig):
    return go.FigureWidget(fig)
