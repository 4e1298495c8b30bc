"""``timm/<name>``: any timm model as an extractor, with the preprocessing of its ``pretrained_cfg``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import timm
from safetensors import safe_open
from timm.data import resolve_data_config

from ...errors import ConfigError, close_matches
from ...identity import file_sha256
from ...io import load_state_dict
from ..extractor import Extractor
from ..hubcache import (
    HUB_WEIGHT_FILES,
    cached_hub_file,
    is_missing_weights,
    local_or_cached_checksum,
    weights_unavailable,
)
from ..registry import (
    BUILTIN_LAYERS,
    ModelSource,
    Spec,
    check_layer,
    hub_offline,
    looks_like_path,
    meta_module_names,
    not_downloaded,
    register_source,
)


def _timm_names(name: str) -> tuple[str, str]:
    """``(model name for timm.create_model, base architecture name)`` of a spec's name."""
    model_name = f"local-dir:{name}" if Path(name).is_dir() else name
    base = model_name.split(":", 1)[1] if model_name.startswith(("hf-hub:", "local-dir:")) else model_name
    return model_name, base


def check_timm_name(name: str) -> None:
    """``ConfigError`` with similar names if timm knows no architecture ``name`` (hub ids and folders pass)."""
    model_name, base = _timm_names(name)
    if not model_name.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(base.split(".")[0]) \
            and not timm.is_model(base):
        hint = timm.list_models(f"*{base.split('.')[0]}*")[:8] or close_matches(base, timm.list_models())
        raise ConfigError(f"unknown timm model {base!r} in {'timm/' + name!r}; similar: {hint}")


@register_source
class TimmSource(ModelSource):
    name = "timm"
    kinds = ("extractor",)

    def check(self, spec: Spec, kind: str) -> None:
        """The architecture name (timm's registry), a folder's existence, and a module-name ``@layer`` against
        the model built on the meta device (no weights)."""
        super().check(spec, kind)
        if not spec.name.startswith("hf-hub:") and looks_like_path(spec.name) and not Path(spec.name).is_dir():
            raise ConfigError(f"'timm/{spec.name}': no folder {spec.name} (a timm model name has no '/'; a folder "
                              f"holds config.json and model.safetensors)")
        check_timm_name(spec.name)
        model_name, _ = _timm_names(spec.name)
        if not spec.layer or spec.layer in BUILTIN_LAYERS or model_name.startswith("hf-hub:"):
            return  # hub configs are read at load
        config = Path(spec.name) / "config.json"
        stamp = config.stat().st_mtime_ns if config.is_file() else None
        try:
            names = meta_module_names(("timm", model_name, stamp),
                                      lambda: timm.create_model(model_name, pretrained=False))
        except Exception:  # noqa: BLE001 - an unbuildable folder is reported by the loader, with its reason
            return
        check_layer(f"timm/{spec.name}", spec.layer, names)

    def check_available(self, spec: Spec, kind: str) -> None:
        """Offline, the pretrained weights must be in the local hub cache (architectures without hub weights,
        folders and online loads are not checked)."""
        model_name, base = _timm_names(spec.name)
        if not hub_offline() or model_name.startswith("local-dir:"):
            return
        if model_name.startswith("hf-hub:"):
            repo = base
        else:
            try:
                repo = getattr(timm.models.get_pretrained_cfg(base), "hf_hub_id", None)
            except Exception:  # noqa: BLE001 - no pretrained config: nothing to look for in the cache
                repo = None
        if repo and cached_hub_file(repo, HUB_WEIGHT_FILES) is None:
            raise not_downloaded(f"timm/{spec.name}", repo)

    def load_extractor(self, spec: Spec, device: str, **kwargs: Any) -> Extractor:
        return load_timm_extractor(spec.name, spec.layer, device=device, **kwargs)

    def checksum(self, spec: Spec) -> str | None:
        model_name, base = _timm_names(spec.name)
        if model_name.startswith("local-dir:"):
            return local_or_cached_checksum(base, HUB_WEIGHT_FILES)
        repo = base if model_name.startswith("hf-hub:") else f"timm/{base}"
        hit = cached_hub_file(repo, HUB_WEIGHT_FILES)
        return "sha256:" + file_sha256(hit) if hit else None


def load_timm_extractor(name: str, layer: str | None, device="cpu", pretrained: bool = True,
                        checkpoint: str | None = None, cache_dir: str | None = None,
                        linear_probe: str | Path | None = None, **kwargs) -> Extractor:
    """Any timm model as an Extractor, with the preprocessing of its ``pretrained_cfg``.

    ``name``: a timm model name (``resnet50.a1_in1k``; weights from the local Hugging Face
    cache), ``hf-hub:<repo>``, ``local-dir:<folder>`` or a folder written by
    ``timm.models.save_for_hf`` (``config.json`` + ``model.safetensors``). ``layer``:
    ``logits`` (default), ``pre_logits`` or any module name (forward hook, e.g. ``layer3``,
    ``blocks.5``). ``checkpoint``: a ``.safetensors`` / plain state-dict file (read with
    ``weights_only=True``) loaded instead of the hub weights; other kwargs go to
    ``timm.create_model`` (e.g. ``num_classes``). Preprocessing follows timm's eval
    transform (``timm.data.resolve_data_config``): resize the short side to
    ``input_size / crop_pct``, centre-crop ``input_size`` (or squash for ``crop_mode='squash'``),
    normalise; done differentiably on [0,1] images of any size. ``linear_probe``: a file holding
    ``weight [C,D]`` and ``bias [C]`` (safetensors or a state dict; ``fiberbench.nullspace.fit_linear_probe``
    writes one) installed as the head, as for a DINO backbone's linear evaluation: ``@logits`` are then the
    probe's, :meth:`Extractor.classifier` finds it, the card records the file and its sha256 (the spec does not
    name the probe: pass the checksum to the results store).
    """
    model_name, base = _timm_names(name)
    spec = f"timm/{name}"
    check_timm_name(name)
    try:
        model = timm.create_model(model_name, pretrained=pretrained and checkpoint is None,
                                  **({"cache_dir": cache_dir} if cache_dir else {}), **kwargs)
    except Exception as e:  # noqa: BLE001 - hub/network errors: one readable message
        if is_missing_weights(e) and not model_name.startswith("local-dir:"):
            repo = base if model_name.startswith("hf-hub:") else f"timm/{base}"
            raise weights_unavailable(spec, repo, e, cache_dir) from None
        raise ConfigError(f"cannot build timm model {spec}: {type(e).__name__}: {e}") from e
    if checkpoint is not None:
        try:
            model.load_state_dict(load_state_dict(checkpoint))
        except RuntimeError as e:
            raise ConfigError(f"{spec}: checkpoint {checkpoint} does not fit the model: {str(e)[:500]}") from e
    data = resolve_data_config({}, model=model)
    size = int(data["input_size"][-1])
    crop_pct = data.get("crop_pct") or 0.875
    crop_mode = data.get("crop_mode") or "center"
    interp = data.get("interpolation", "bilinear")
    interp = interp if interp in ("bilinear", "bicubic", "nearest") else "bicubic"
    layer = layer or "logits"
    cfg = model.pretrained_cfg or {}
    ext = Extractor(model, spec=f"timm/{name}@{layer}", layer=layer, input_size=size, mean=data["mean"],
                    std=data["std"], interpolation=interp, resize="squash" if crop_mode == "squash" else "shortest",
                    resize_size=int(math.floor(size / crop_pct)),
                    card={"data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()},
                          "pretrained_cfg": {k: v for k, v in cfg.items()
                                             if isinstance(v, (str, int, float, tuple, list))}})
    if linear_probe is not None:
        install_linear_probe(ext, linear_probe)
    return ext.to(device)


def install_linear_probe(ext: Extractor, path: str | Path) -> None:
    """Install the probe in ``path`` (``weight [C,D]``, ``bias [C]``) as ``ext``'s head; its class names (a
    safetensors file's ``classes`` metadata, JSON) become ``ext.classes``."""
    path = Path(path)
    sd = load_state_dict(path)
    if "weight" not in sd:
        raise ConfigError(f"{ext.spec}: linear probe {path} holds {sorted(sd)[:6]}, not 'weight' [C,D] and 'bias' [C]")
    ext.set_linear_head(sd["weight"], sd.get("bias"))
    classes = None
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            classes = json.loads((f.metadata() or {}).get("classes", "null"))
    if classes is not None:
        if len(classes) != sd["weight"].shape[0]:
            raise ConfigError(f"{ext.spec}: linear probe {path} names {len(classes)} classes for "
                              f"{sd['weight'].shape[0]} rows")
        ext.classes = [str(c) for c in classes]
    ext.card["linear_probe"] = {"file": str(path), "sha256": file_sha256(path), "classes": int(sd["weight"].shape[0])}
