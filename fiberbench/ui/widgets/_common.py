"""Shared pieces of the widgets: readable errors inside an ``Output``, image widgets, stop signals."""
from __future__ import annotations

import functools
import html
import traceback
from typing import Any, Callable

import ipywidgets as W
from IPython.display import HTML

from ...errors import FiberbenchError
from ...plots import image_to_png


class RunStopped(Exception):
    """Raised from a sampling callback when the user pressed Stop (ends the run cleanly)."""


def error_html(exc: BaseException) -> str:
    """A readable error box: the error type and message in bold, the traceback folded away.

    fiberbench's own errors (bad spec, bad hyper-parameter) are the user's to fix, so their
    message is all that shows; anything else also offers the traceback under "details".
    """
    msg = html.escape(str(exc) or type(exc).__name__)
    head = f"<b>{html.escape(type(exc).__name__)}</b>: {msg}"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    details = "" if isinstance(exc, FiberbenchError) else \
        f"<details><summary>details</summary><pre style='font-size:11px'>{html.escape(tb)}</pre></details>"
    return (f"<div class='fb-error' style='border-left:4px solid #d62728;background:#fdecea;padding:6px 10px;"
            f"margin:4px 0;white-space:pre-wrap'>{head}{details}</div>")


def show_error(out: W.Output, exc: BaseException) -> None:
    """Append an error box to ``out`` (safe from any thread: no ``with out:`` capture needed)."""
    out.append_display_data(_html_bundle(error_html(exc)))


def _html_bundle(markup: str) -> dict[str, Any]:
    return HTML(markup)


def guarded(out_attr: str = "out") -> Callable:
    """Decorator for widget callbacks: run inside the widget's ``Output``; show errors there, never raise.

    The widget keeps a list ``self.errors`` of the error messages (what tests assert on).
    """

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            out: W.Output = getattr(self, out_attr)
            # the try sits inside `with out:` so Output.__exit__ never sees the exception (in a kernel it
            # would print the raw traceback and swallow the error before we could record it)
            with out:
                try:
                    return fn(self, *args, **kwargs)
                except Exception as e:  # noqa: BLE001 - a widget callback must never lose an error
                    self.errors.append(f"{type(e).__name__}: {e}")
                    show_error(out, e)
                    return None

        return wrapper

    return deco


def image_widget(image, scale: int = 3, **layout) -> W.Image:
    """An ``ipywidgets.Image`` of one ``[3,H,W]`` image in [0,1] (PNG, nearest-upscaled by ``scale``).

    No ``tooltip`` on purpose: with ipywidgets 8.1.9 / jupyterlab_widgets 3.0.17 an Image with a tooltip
    fails to render in JupyterLab ("Could not create a view", found by tests/test_browser.py); hover
    text goes on the caption (:func:`caption_html`) instead.
    """

    return W.Image(value=image_to_png(image, scale=scale), format="png",
                   layout=W.Layout(width=layout.pop("width", f"{image.shape[-1] * scale}px"), **layout))


def caption_html(markup: str, hover: str = "", css_class: str = "fb-caption") -> str:
    """A caption block whose native hover text (``title``) is ``hover`` (escaped; newlines kept)."""
    return (f"<div class='{css_class}' title='{html.escape(hover, quote=True)}' style='font-size:11px'>"
            f"{markup}</div>")


def html_table(rows: list[tuple], header: tuple) -> str:
    """A small HTML table (escaped) for detail panels."""
    th = "".join(f"<th style='text-align:left;padding:2px 8px'>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style='padding:2px 8px'>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table class='fb-table'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"
