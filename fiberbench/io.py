"""Safe loading of checkpoints and images.

Checkpoints: safetensors first; otherwise ``torch.load(weights_only=True)``,
which refuses pickles that would run code — we say so in plain words.
Images: any file PIL reads, converted to ``[3,H,W]`` float in [0,1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import InputError


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file, or a torch checkpoint loaded with ``weights_only=True``.

    Raises ``InputError`` naming the file if it is missing, or if it is a
    pickle that would execute code (refused, never run).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"checkpoint {path} is not a valid safetensors file: {e}") from e
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError and friends
        raise InputError(
            f"refused to load {path}: it is not a plain weights file (torch.load with weights_only=True "
            f"rejected it: {str(e).splitlines()[0]}). Pickles can execute arbitrary code; convert the "
            f"checkpoint to safetensors from a trusted environment.") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Read an image file as ``[3,H,W]`` float in [0,1].

    Grayscale is repeated to RGB, alpha is composited on white, 16-bit images
    are scaled by 65535; ``size`` resizes (bicubic) to ``size x size``.
    Raises ``InputError`` naming the file for missing, unreadable or empty images.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise InputError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            img = im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"cannot read {path} as an image: {e}") from e
    return pil_to_tensor(img, size=size, name=str(path))


def pil_to_tensor(img, size: int | None = None, name: str = "image") -> torch.Tensor:
    """A PIL image -> ``[3,H,W]`` float in [0,1] (conversions as in :func:`load_image`)."""
    from PIL import Image

    if img.width < 1 or img.height < 1:
        raise InputError(f"{name} is empty ({img.width}x{img.height})")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        arr = np.repeat(arr[..., None], 3, axis=-1)
        t = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)
    else:
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        img = img.convert("RGB")
        t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    if size is not None and tuple(t.shape[-2:]) != (size, size):
        t = torch.nn.functional.interpolate(t[None], size=(size, size), mode="bicubic", align_corners=False,
                                            antialias=True)[0].clamp(0, 1)
    return t


def as_image_batch(images, name: str = "reference") -> torch.Tensor:
    """Validate / convert user images to ``[B,3,H,W]`` float32 in [0,1].

    Accepts a ``[3,H,W]`` or ``[B,3,H,W]`` tensor (float in [0,1], or uint8 in
    0..255, converted), ``[H,W]`` / ``[1,H,W]`` grayscale (repeated to RGB), a
    numpy array (HWC or CHW), a PIL image or a path. NaN/inf pixels, float
    values outside [0,1] beyond rounding, and empty images raise ``InputError``.
    """
    from PIL import Image

    if isinstance(images, (str, Path)):
        images = load_image(images)
    elif isinstance(images, Image.Image):
        images = pil_to_tensor(images, name=name)
    if isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3):
            arr = np.moveaxis(arr, -1, 0)
        images = torch.from_numpy(np.ascontiguousarray(arr))
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{name}: expected an image tensor, array, PIL image or path, got {type(images).__name__}")
    x = images
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.dtype in (torch.int16, torch.int32, torch.int64):
        raise InputError(f"{name}: integer images other than uint8 are ambiguous (dtype {x.dtype}); "
                         f"convert to float in [0,1]")
    x = x.float()
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InputError(f"{name}: expected [3,H,W] or [B,3,H,W], got shape {tuple(images.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3] * x[:, 3:] + (1 - x[:, 3:])
    if x.shape[1] != 3:
        raise InputError(f"{name}: expected 3 colour channels, got shape {tuple(images.shape)}")
    if x.shape[-1] < 1 or x.shape[-2] < 1 or x.shape[0] < 1:
        raise InputError(f"{name}: empty image batch {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise InputError(f"{name}: contains NaN or infinite pixels")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise InputError(f"{name}: float pixel values must lie in [0,1], got range [{lo:.3g}, {hi:.3g}] "
                         f"(divide 0-255 data by 255)")
    return x.clamp(0, 1).contiguous()
