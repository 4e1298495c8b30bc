"""Model picker: extractor (+ layer), prior and CLIP scorer from the registry, or any spec string."""
from __future__ import annotations

import html
import json
from typing import Any

import ipywidgets as W

from ... import models as zoo
from ...errors import ConfigError
from ...models import REAL_MODELS, list_models, parse_spec
from ...toy import cards as M
from ._common import guarded

KINDS = ("extractor", "prior", "clip")
DEFAULT_LAYERS = ["logits", "pre_logits"]


def _card_of(spec: str) -> dict[str, Any]:
    """What the registry knows about a spec: the toy card's main fields, or the curated hub entry."""

    try:
        s = parse_spec(spec)
    except Exception:  # noqa: BLE001 - a model added by hand may carry any spec
        return {"spec": spec, "note": "added by hand in this picker (not a registry spec)"}
    if s.source == "toy":
        try:
            card = M.read_card(s.name)
        except Exception as e:  # noqa: BLE001 - a missing card is shown, not raised
            return {"spec": spec, "note": str(e)}
        keep = {k: card[k] for k in ("kind", "description", "classes", "target", "augment", "metrics", "params",
                                     "parameters", "seconds", "training_seconds") if k in card}
        return {"spec": spec, **keep}
    for m in REAL_MODELS:
        if m["spec"] == str(s) or m["spec"] == f"{s.source}/{s.name}":
            return {"spec": spec, **{k: v for k, v in m.items() if k != "spec"},
                    "note": "hub weights: needs the local Hugging Face cache (or a network) to load"}
    return {"spec": spec, "note": "not in the registry's curated list; loaded through its source's own loader"}


def card_html(spec: str) -> str:
    """The model card of ``spec`` as a compact HTML block."""
    card = _card_of(spec)
    rows = []
    for k, v in card.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
            v = v if len(v) < 300 else v[:300] + " …"
        rows.append(f"<tr><td style='padding:1px 8px;color:#555'>{html.escape(k)}</td>"
                    f"<td style='padding:1px 8px'>{html.escape(str(v))}</td></tr>")
    return f"<table class='fb-card' style='font-size:12px'>{''.join(rows)}</table>"


class ModelPicker(W.VBox):
    """Dropdowns for extractor (with layer), prior and CLIP model, filled from :func:`fiberbench.list_models`
    (toy models first, then the curated hub models); a text box takes any spec string.

    Attributes:
        extractor_spec, prior_spec, clip_spec: the current choices (spec strings).
        errors: messages of the errors shown in :attr:`out` (newest last).

    ``load_extractor()`` / ``load_prior()`` / ``load_clip()`` return the loaded models (kept per spec: frozen
    weights only, never tensors with graphs).
    """

    def __init__(self, extractor: str | None = None, prior: str | None = None, clip: str | None = None,
                 real: bool = True):

        self.errors: list[str] = []
        self._models: dict[tuple[str, str], Any] = {}
        bases = [s for s in list_models(kind="extractor", real=real) if "@" not in s]
        priors = list_models(kind="prior", real=real)
        clips = list_models(kind="clip", real=real)
        self.extractor = W.Dropdown(options=bases, description="extractor", layout=W.Layout(width="380px"))
        self.layer = W.Dropdown(options=DEFAULT_LAYERS, description="layer", layout=W.Layout(width="220px"))
        self.prior = W.Dropdown(options=priors, description="prior", layout=W.Layout(width="380px"))
        # "none" is a valid choice (no CLIP captions); the default is a toy CLIP if one is shipped, since
        # hub models need their weights in the local cache
        toy_clips = [c for c in clips if c.startswith("toy/")]
        self.clip = W.Dropdown(options=[("none", None)] + [(c, c) for c in clips],
                               value=toy_clips[0] if toy_clips else None, description="CLIP",
                               layout=W.Layout(width="380px"))
        self.custom = W.Text(placeholder="any spec, e.g. timm/resnet50.a1_in1k@pre_logits", description="spec",
                             layout=W.Layout(width="420px"))
        self.custom_kind = W.Dropdown(options=KINDS, value="extractor", layout=W.Layout(width="110px"))
        self.load_button = W.Button(description="Load", icon="download", tooltip="load the spec to check it")
        self.card = W.HTML()
        self.out = W.Output()
        self.status = W.HTML()
        for w, v in ((self.extractor, extractor), (self.prior, prior), (self.clip, clip)):
            if v:
                self._select(w, v)
        self.extractor.observe(self._on_extractor, names="value")
        self.layer.observe(self._show_card, names="value")
        self.prior.observe(self._show_card, names="value")
        self.clip.observe(self._show_card, names="value")
        self.load_button.on_click(self._on_load)
        self._refresh_layers(extractor)
        self._show_card()
        super().__init__([
            W.HBox([self.extractor, self.layer]), self.prior, self.clip,
            W.HBox([self.custom, self.custom_kind, self.load_button]), self.status, self.card, self.out])
        self.add_class("fb-model-picker")

    # ---- choices
    @staticmethod
    def _select(dropdown: W.Dropdown, spec: str) -> None:
        base = spec.split("@", 1)[0] if dropdown.description == "extractor" else spec
        values = [o[1] if isinstance(o, tuple) else o for o in dropdown.options]
        if base not in values:
            dropdown.options = [o if isinstance(o, tuple) else (o, o) for o in dropdown.options] + [(base, base)]
        dropdown.value = base

    @property
    def extractor_spec(self) -> str:
        return f"{self.extractor.value}@{self.layer.value}" if self.layer.value else self.extractor.value

    @property
    def prior_spec(self) -> str:
        return self.prior.value

    @property
    def clip_spec(self) -> str | None:
        return self.clip.value

    def _refresh_layers(self, requested: str | None = None) -> None:

        s = parse_spec(self.extractor.value) if self.extractor.value else None
        layers = list(DEFAULT_LAYERS)
        if s is not None and s.source == "toy":
            try:
                layers = list(M.read_card(s.name).get("layers", DEFAULT_LAYERS))
            except Exception:  # noqa: BLE001
                pass
        elif s is not None and s.source == "open_clip":
            layers = ["embed"]
        want = requested.split("@", 1)[1] if requested and "@" in requested else None
        if want and want not in layers:
            layers.append(want)
        self.layer.options = layers
        self.layer.value = want or layers[0]

    def _on_extractor(self, change=None) -> None:
        self._refresh_layers()
        self._show_card()

    def _show_card(self, change=None) -> None:
        parts = []
        for title, spec in (("extractor", self.extractor_spec), ("prior", self.prior_spec), ("CLIP", self.clip_spec)):
            if spec:
                parts.append(f"<details><summary><b>{title}</b>: <code>{html.escape(spec)}</code></summary>"
                             f"{card_html(spec)}</details>")
        self.card.value = "".join(parts)

    # ---- loading
    def _load(self, kind: str, spec: str):

        key = (kind, spec)
        if key not in self._models:
            loader = {"extractor": zoo.load_extractor, "prior": zoo.load_prior, "clip": zoo.load_clip}[kind]
            self._models[key] = loader(spec)
        return self._models[key]

    def add_model(self, kind: str, model, select: bool = True) -> None:
        """Offer an already-loaded model (anything with a ``.spec``) under its spec, e.g. one built in the
        notebook; ``select`` makes it the current choice."""

        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
        spec = getattr(model, "spec", None)
        if not isinstance(spec, str) or not spec:
            raise ConfigError(f"a {kind} needs a .spec string to be offered in the picker")
        dropdown = {"extractor": self.extractor, "prior": self.prior, "clip": self.clip}[kind]
        if select:
            self._select(dropdown, spec)
            if kind == "extractor":
                self._refresh_layers(spec)
        key_spec = self.extractor_spec if kind == "extractor" and select else spec
        self._models[(kind, key_spec)] = model
        self._show_card()

    def load_extractor(self):
        """The chosen :class:`~fiberbench.extractors.Extractor` (loaded once per spec)."""
        return self._load("extractor", self.extractor_spec)

    def load_prior(self):
        """The chosen :class:`~fiberbench.priors.Prior` (loaded once per spec)."""
        return self._load("prior", self.prior_spec)

    def load_clip(self):
        """The chosen :class:`~fiberbench.semantics.ClipModel`, or ``None`` if no CLIP model is available."""
        return self._load("clip", self.clip_spec) if self.clip_spec else None

    @guarded()
    def _on_load(self, button=None) -> None:
        self.load_custom()

    def load_custom(self):
        """Load the spec typed in the text box as ``custom_kind``; on success select it in its dropdown.

        Raises the loader's ``ConfigError`` (shown in the widget when triggered by the button).
        """

        spec = self.custom.value.strip()
        kind = self.custom_kind.value
        if not spec:
            raise ConfigError("type a spec string first, e.g. 'toy/shape-resnet@pre_logits' or "
                              "'timm/resnet50.a1_in1k@pre_logits'")
        self.status.value = f"loading <code>{html.escape(spec)}</code> …"
        try:
            parse_spec(spec)
            model = self._load(kind, spec)
        except Exception:
            self.status.value = f"<span class='fb-load-failed'>could not load <code>{html.escape(spec)}</code></span>"
            raise
        dropdown = {"extractor": self.extractor, "prior": self.prior, "clip": self.clip}[kind]
        self._select(dropdown, spec)
        if kind == "extractor":
            self._refresh_layers(spec)
            self._models[("extractor", self.extractor_spec)] = model
        self.status.value = f"<span class='fb-loaded'>loaded <code>{html.escape(spec)}</code> as {kind}</span>"
        self._show_card()
        return model
