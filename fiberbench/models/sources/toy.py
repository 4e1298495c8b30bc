"""``toy/<name>``: the tiny models shipped in ``data/models/`` (card + safetensors each).

The card's ``kind`` says what a name gives: ``classifier`` / ``encoder`` -> an extractor (default layer
from the card), ``flow`` / ``diffusion`` -> a pixel prior, ``clip`` -> a :class:`ClipModel`, ``oracle`` ->
listed only (load it with :func:`fiberbench.toy.load_oracle`).
"""
from __future__ import annotations

from typing import Any

from ...errors import ConfigError, close_matches
from ...identity import file_sha256
from ...toy import cards
from ...toy.nets import build_module
from ...toy.vocab import toy_tokenizer
from ..clip import ClipModel
from ..extractor import Extractor
from ..prior import FeatureConditionedPrior, PixelPrior, Prior, build_scheduler
from ..registry import BUILTIN_LAYERS, ModelSource, Spec, check_layer, meta_module_names, register_source

# (requested kind, registry kind of the card) pairs that also load: the conditional generator through
# load_prior (method="conditional" samples it); the toy CLIP's image tower as an extractor (@embed)
ALSO = {("prior", "conditional"), ("extractor", "clip")}
# card kind -> registry kind
CARD_KINDS = {"classifier": "extractor", "encoder": "extractor", "flow": "prior", "diffusion": "prior",
              "clip": "clip", "oracle": "oracle", "conditional": "conditional"}


def toy_kind(name: str) -> str | None:
    """The registry kind of shipped toy model ``name`` (``None`` if it is not shipped)."""
    try:
        return CARD_KINDS.get(cards.read_card(name).get("kind"))
    except ConfigError:
        return None


def encode_image(model, x):
    """How a CLIP model turns preprocessed images into its image embedding."""
    return model.encode_image(x)


@register_source
class ToySource(ModelSource):
    name = "toy"
    kinds = ("extractor", "prior", "clip")

    def check(self, spec: Spec, kind: str) -> None:
        if kind == "prior" and spec.layer:
            raise ConfigError(f"priors take no '@layer' ({str(spec)!r})")
        if toy_kind(spec.name) != kind and (kind, toy_kind(spec.name)) not in ALSO:
            known = [s for s, k in self.specs() if k == kind]
            hint = close_matches(f"toy/{spec.name}", known)
            raise ConfigError(f"unknown {kind} 'toy/{spec.name}'; available: {known}"
                              + (f"; did you mean {hint}?" if hint else ""))
        if kind == "extractor" and spec.layer and spec.layer not in BUILTIN_LAYERS:
            card = cards.read_card(spec.name)
            st = cards.card_path(spec.name).stat()  # a retrained card may change the architecture
            names = meta_module_names(("toy", str(cards.card_path(spec.name)), st.st_mtime_ns, st.st_size),
                                      lambda: build_module(card))
            check_layer(f"toy/{spec.name}", spec.layer, names)

    def specs(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for name in cards.available():
            kind = toy_kind(name)
            if kind is None:
                continue
            out.append((f"toy/{name}", kind))
            if kind == "extractor":
                layers = cards.read_card(name).get("layers", ["logits", "pre_logits"])
                out += [(f"toy/{name}@{layer}", "extractor") for layer in layers]
            if kind == "clip":
                out.append((f"toy/{name}@embed", "extractor"))
        return out

    def load_extractor(self, spec: Spec, device: str, **kwargs: Any) -> Extractor:
        """A shipped toy classifier or encoder (default layer from its card, ``logits`` if it names none), or the
        toy CLIP's image tower (``toy/clip@embed``: the image embedding, not unit-normalised, as for open_clip)."""
        module, card = cards.load_toy_module(spec.name)
        inp = card.get("input", {})
        if card.get("kind") == "clip":
            layer = spec.layer or "embed"
            return Extractor(module, spec=f"toy/{spec.name}@{layer}", layer=layer, input_size=inp.get("size", 32),
                             mean=inp.get("mean", [0.5] * 3), std=inp.get("std", [0.5] * 3), card=card,
                             runner=encode_image).to(device)
        layer = spec.layer or card.get("default_layer", "logits")
        return Extractor(module, spec=f"toy/{spec.name}@{layer}", layer=layer, input_size=inp.get("size", 32),
                         mean=inp.get("mean", [0.5] * 3), std=inp.get("std", [0.5] * 3), card=card,
                         classes=card.get("classes")).to(device)

    def load_prior(self, spec: Spec, device: str, **kwargs: Any) -> Prior:
        """``toy/prior-fm`` or ``toy/prior-ddpm``: a pixel ``UNet2DModel`` with the card's scheduler;
        ``toy/cond-fm-shape-resnet``: the feature-conditioned generator (``method="conditional"`` only)."""
        unet, card = cards.load_toy_module(spec.name)
        sched = build_scheduler(card["scheduler"])
        if card.get("kind") == "conditional":
            return FeatureConditionedPrior(unet, sched, spec=card["spec"], card=card).to(device)
        kind = "flow" if card["prediction_type"] == "flow" else "diffusion"
        return PixelPrior(unet, sched, kind=kind, prediction_type=card["prediction_type"], spec=card["spec"],
                          card=card).to(device)

    def load_clip(self, spec: Spec, device: str, **kwargs: Any) -> ClipModel:
        """``toy/clip``: an open_clip ``CLIP`` from the card's config, with open_clip's own tokenizer."""
        module, card = cards.load_toy_module(spec.name)
        cfg = card["architecture"]["config"]
        inp = card["input"]
        return ClipModel(module, toy_tokenizer(cfg["text_cfg"]["context_length"]), spec=f"toy/{spec.name}",
                         preprocess_cfg={"size": inp["size"], "mean": inp["mean"], "std": inp["std"],
                                         "interpolation": "bicubic"}, card=card).to(device)

    def checksum(self, spec: Spec) -> str | None:
        path = cards.weights_path(spec.name)
        if not path.exists():
            raise ConfigError(f"weights of {str(spec)!r} not found at {path}")
        return "sha256:" + file_sha256(path)

    def defaults(self, spec: Spec) -> dict[str, Any]:
        try:
            card = cards.read_card(spec.name)
        except ConfigError:
            return {}
        return {k: card[k] for k in ("preset", "sampling") if k in card}

    def canonical(self, spec: Spec, kind: str) -> str:
        if kind == "extractor" and spec.layer is None:
            card = cards.read_card(spec.name)
            default = "embed" if card.get("kind") == "clip" else card.get("default_layer", "logits")
            return f"{spec}@{default}"
        return str(spec)
