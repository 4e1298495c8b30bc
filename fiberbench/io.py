"""Safe loading of checkpoints and images.

Checkpoints: safetensors first; otherwise ``torch.load(weights_only=True)``,
which refuses pickles that would run code — we say so in plain words, naming
what the pickle would have called.

Images (:func:`load_image`, :func:`pil_to_tensor`, :func:`as_image_batch`) become
float32 in [0,1] with three channels. Conversions are made only where the
meaning is unambiguous; everything else raises :class:`~fiberbench.errors.InputError`
naming the file (or argument) and the problem:

============================  =====================================================
input                         result
============================  =====================================================
8-bit RGB / grayscale / 1-bit  /255; grayscale repeated to RGB
16-bit grayscale (``I;16*``)   /65535 (always: the file says it is 16-bit)
16-bit RGB(A) PNG              read by Pillow at 8-bit precision (top byte), /255
32-bit int (``I``: 16-bit PGM) /65535 if all values lie in 0..65535, else error
32-bit float (``F``: TIFF)     must already lie in [0,1] and be finite, else error
alpha (RGBA, LA, PA, P+tRNS)   composited on white
palette, CMYK, YCbCr, LAB, HSV Pillow's conversion to RGB
EXIF orientation               applied (the image is shown upright)
uint8 arrays / tensors         /255
uint16 arrays / tensors        /65535
other integer dtypes           error (ambiguous range)
float arrays / tensors         must lie in [0,1] (±1e-3, then clamped), else error
NaN / inf pixels               error
bool arrays / tensors          False -> 0, True -> 1
empty or 0-sized               error
decompression bombs            error (Pillow's ``MAX_IMAGE_PIXELS`` x 2, ~179 Mpx)
pipes, sockets, devices        error (only regular files are opened, never blocking)
two possible layouts           error naming both readings and how to pick one
meta, sparse, quantized        error (no pixel values to read)
> 2**30 values, > 10,000 imgs  error (``MAX_IMAGE_VALUES``, ``MAX_REFERENCES``)
============================  =====================================================

Sizes: images are never resized unless asked (``load_image(size=…)``, at most
``MAX_IMAGE_SIDE`` = 4096) or needed (``sample_fiber`` resizes references to the prior's square size).
Resizing squashes to ``size x size`` (the aspect ratio is not kept) with
antialiased bicubic interpolation, clamped to [0,1]; a huge file is first
box-reduced by an integer factor in Pillow (keeping at least twice the target
size) so memory stays bounded. A 1x1 image is a constant image at any size.
"""
from __future__ import annotations

import io
import os
import pickletools
import stat
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load_file

from .checks import MAX_IMAGE_SIDE, MAX_IMAGE_VALUES, MAX_REFERENCES, is_int, show
from .errors import ConfigError, InputError

# --------------------------------------------------------------------------- checkpoints

_STATE_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")


def _pickle_bytes(path: Path) -> bytes | None:
    """The pickle stream(s) of a torch checkpoint (``*/data.pkl`` in a zip) or of a plain/legacy pickle file."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                return zf.read(names[0]) if names else None
        with open(path, "rb") as fh:
            return fh.read(1 << 24)  # legacy checkpoints: a few pickles first, tensor bytes after them
    except (OSError, zipfile.BadZipFile, KeyError):
        return None


_STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING")
_NO_PUSH_OPS = ("PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP")


def pickle_globals(path: str | Path, max_pickles: int = 8) -> list[str]:
    """``module.name`` of every global a pickle file would import (read statically, never executed).

    Works for plain pickles, legacy torch checkpoints (several pickles in a row) and zip checkpoints
    (``data.pkl``); best effort: returns what it found before the stream ended or became unreadable.
    """
    data = _pickle_bytes(Path(path))
    if not data:
        return []
    found: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(max_pickles):
        pushed: list[Any] = []
        memo: dict[int, Any] = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                name = op.name
                if name in _STRING_OPS:
                    pushed.append(str(arg))
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(int(arg)))
                elif name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                    pushed.append(found[-1])
                elif name == "STACK_GLOBAL":
                    mod, attr = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
                    found.append(f"{mod}.{attr}")
                    pushed.append(found[-1])
                elif name not in _NO_PUSH_OPS:
                    pushed.append(None)
                if len(pushed) > 64:
                    del pushed[:-8]
        except Exception:  # noqa: BLE001 - the end of the pickles, or a truncated / odd stream
            break
        if stream.tell() >= len(data):
            break
    return list(dict.fromkeys(found))


# globals a plain torch state dict needs (the weights-only unpickler allows these)
_BENIGN_GLOBALS = ("collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
                   "torch.FloatStorage", "torch.HalfStorage", "torch.BFloat16Storage", "torch.DoubleStorage",
                   "torch.LongStorage", "torch.IntStorage", "torch.ShortStorage", "torch.CharStorage",
                   "torch.ByteStorage", "torch.BoolStorage", "torch.float32", "torch.float16", "torch.bfloat16",
                   "torch._utils._rebuild_tensor", "torch.Size", "torch.device")


def _is_safetensors(path: Path) -> bool:
    """True if the file starts like a safetensors file (u64 header length, then a JSON object)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 27)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file, or a torch checkpoint loaded with ``weights_only=True``.

    A checkpoint holding the weights under ``state_dict`` / ``model`` / ``model_state_dict`` / ``module``
    / ``net`` is unwrapped. Returns ``{name: tensor}`` on the CPU.

    Raises ``InputError`` naming the file if it is missing, corrupt or truncated, if it holds something
    other than a mapping of tensors, or if it is a pickle that would import code (refused, never run;
    the message names the globals it would have imported).
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"checkpoint {path} is a folder, not a weights file")
    with open_regular_file(path, "checkpoint"):  # missing files, pipes and devices are refused here
        pass
    if path.suffix == ".safetensors" or _is_safetensors(path):
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends
            raise InputError(f"checkpoint {path} is not a valid safetensors file: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4 …": noise for the user
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (corrupt zip), EOFError …
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
            risky = [g for g in pickle_globals(path) if g not in _BENIGN_GLOBALS]
            why = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0] \
                if "WeightsUnpickler error:" in text else text.strip().splitlines()[0]
            why = why.split(". ")[0].rstrip(".")
            raise InputError(
                f"refused to load {path}: it is a pickle that would import "
                f"{', '.join(risky[:6]) if risky else 'objects other than tensors'} when loaded, and unpickling "
                f"can execute arbitrary code. torch.load(weights_only=True) rejected it: {why[:200]}. "
                f"Nothing from the file was run. If you trust its source, convert it to safetensors in a "
                f"separate environment (load it there, then safetensors.torch.save_file(state_dict, ...)).") from None
        first_line = text.strip().splitlines()[0][:200] if text.strip() else ""
        raise InputError(f"cannot read checkpoint {path}: not a torch checkpoint, or corrupt/truncated "
                         f"({type(e).__name__}: {first_line})") from None
    if isinstance(state, dict):
        for k in _STATE_KEYS:
            if k in state and isinstance(state[k], dict) and state[k] \
                    and all(isinstance(v, torch.Tensor) for v in state[k].values()):
                state = state[k]
                break
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict (name -> tensor)")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not state:
        raise InputError(f"checkpoint {path} is not a plain state dict: "
                         + (f"entries {bad[:8]} are not tensors (top-level keys: {list(state)[:12]}); "
                            f"pass the state dict inside it" if bad else "it is empty"))
    return state


# --------------------------------------------------------------------------- images

def open_regular_file(path: str | Path, what: str = "file") -> IO[bytes]:
    """``path`` opened for binary reading if it is a regular file, else ``InputError`` naming it.

    Opened non-blocking: a named pipe, socket or device is refused at once instead of blocking the caller
    (an image that never arrives) or being read without end.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a folder") from None
    except OSError as e:
        raise InputError(f"cannot open {what} {path}: {e.strerror or type(e).__name__}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InputError(f"{what} {path} is a folder")
        if not stat.S_ISREG(mode):
            raise InputError(f"{what} {path} is not a regular file (a named pipe, socket or device); "
                             f"save its content to a file first")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Read an image file as ``[3,H,W]`` float32 in [0,1] (``[3,size,size]`` if ``size`` is given).

    Conversions (see the module docstring): grayscale repeated to RGB, alpha composited on white,
    16-bit grayscale scaled by 65535, EXIF orientation applied; ``size`` (at most ``MAX_IMAGE_SIDE``)
    squashes to ``size x size`` with antialiased bicubic interpolation. Raises ``InputError`` naming the
    file for missing, unreadable, truncated, empty, non-finite or ambiguous images, decompression bombs and
    anything but a regular file (a named pipe would block); ``ConfigError`` for a bad ``size``.
    """
    check_size(size)
    path = Path(path)
    with open_regular_file(path, "image file") as fh:
        return decode_image(fh, str(path), size)


def load_image_bytes(data: bytes | bytearray | memoryview, name: str = "uploaded image",
                     size: int | None = None) -> torch.Tensor:
    """:func:`load_image` for the bytes of an image file (an upload): the same conversions, limits and errors,
    which name ``name`` (e.g. the uploaded file's name)."""
    check_size(size)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"{name}: expected the bytes of an image file, got {type(data).__name__}")
    if len(data) == 0:
        raise InputError(f"cannot read {name} as an image: the file is empty (0 bytes)")
    return decode_image(io.BytesIO(bytes(data)), name, size)


def decode_image(fh: IO[bytes], name: str, size: int | None = None) -> torch.Tensor:
    """An open image file (``fh``, named ``name`` in errors) as ``[3,H,W]`` float32 in [0,1] (see
    :func:`load_image`)."""
    try:
        with Image.open(fh) as im:
            if size is not None and im.format == "JPEG":
                im.draft("RGB", (2 * size, 2 * size))  # decode a huge JPEG at a reduced scale
            im.load()
            img = im.copy()
        try:
            img = ImageOps.exif_transpose(img)  # upright as a viewer shows it
        except Exception:  # noqa: BLE001 - broken EXIF: keep the pixels as stored
            pass
    except Image.DecompressionBombError as e:
        raise InputError(f"{name} is too large to read safely ({e}); resize it first") from None
    except UnidentifiedImageError:
        raise InputError(f"cannot read {name} as an image: not a format Pillow recognises "
                         f"(or not an image at all)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise InputError(f"cannot read {name} as an image: {type(e).__name__}: {e}") from None
    return pil_to_tensor(img, size=size, name=name)


def check_size(size: Any) -> None:
    """``ConfigError`` unless ``size`` is ``None`` or an integer in ``[1, MAX_IMAGE_SIDE]``."""
    if size is not None and not is_int(size, 1, MAX_IMAGE_SIDE):
        raise ConfigError(f"size must be a positive integer (at most {MAX_IMAGE_SIDE}) or None, got {show(size)}")


def _resize(t: torch.Tensor, size: int) -> torch.Tensor:
    """``[C,H,W]`` -> ``[C,size,size]``, antialiased bicubic, clamped to [0,1]."""
    if tuple(t.shape[-2:]) == (size, size):
        return t
    return torch.nn.functional.interpolate(t[None], size=(size, size), mode="bicubic", align_corners=False,
                                           antialias=True)[0].clamp(0, 1)


def pil_to_tensor(img, size: int | None = None, name: str = "image") -> torch.Tensor:
    """A PIL image -> ``[3,H,W]`` float32 in [0,1] (conversions as in :func:`load_image`)."""
    check_size(size)
    if img.width < 1 or img.height < 1:
        raise InputError(f"{name} is empty ({img.width}x{img.height})")
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode == "F":
            if not np.isfinite(arr).all():
                raise InputError(f"{name}: float image contains NaN or infinite pixels")
            lo, hi = float(arr.min()), float(arr.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise InputError(f"{name}: float image values must lie in [0,1], got [{lo:.4g}, {hi:.4g}]")
        else:
            lo, hi = float(arr.min()), float(arr.max())
            if lo < 0 or hi > 65535:
                raise InputError(f"{name}: 32-bit integer image with values in [{lo:.0f}, {hi:.0f}]; only "
                                 f"0..65535 (16-bit data) has an unambiguous scale")
            arr = arr / 65535.0
        arr = np.clip(arr, 0.0, 1.0)
        t = torch.from_numpy(np.repeat(arr[None], 3, axis=0).astype(np.float32))
    else:
        if img.has_transparency_data or "A" in img.getbands() or "a" in img.getbands():
            img = img.convert("RGBA")
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        img = img.convert("RGB")
        if size is not None:  # bound memory for huge images: integer box reduction, keeping >= 2x the target
            factor = min(img.width, img.height) // (2 * size)
            if factor >= 2:
                img = img.reduce(int(factor))
        t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return _resize(t, size) if size is not None else t


def _to_tensor(images: Any, name: str, depth: int = 0) -> torch.Tensor:
    """numpy arrays, PIL images, paths and lists of them -> a tensor (no value conversion yet)."""
    if isinstance(images, (str, Path)):
        return load_image(images)
    if isinstance(images, Image.Image):
        return pil_to_tensor(images, name=name)
    if isinstance(images, (list, tuple)):
        return _stack_list(images, name, depth)
    if isinstance(images, np.ndarray):
        return _numpy_to_tensor(images, name)
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{name}: expected an image tensor, array, PIL image, path or a list of them, "
                         f"got {type(images).__name__}")
    return images


def _stack_list(images: list | tuple, name: str, depth: int) -> torch.Tensor:
    """A list of images (each anything :func:`as_image_batch` takes) of one size -> one batch."""
    if not images:
        raise InputError(f"{name}: empty list of images")
    if len(images) > MAX_REFERENCES or depth >= 4:
        raise InputError(f"{name}: a list of {len(images)} images nested {depth + 1} deep; at most "
                         f"{MAX_REFERENCES} images in lists at most 4 deep")
    items, values = [], 0
    for i, im in enumerate(images):
        items.append(_as_batch(im, f"{name}[{i}]", depth + 1))
        values += items[-1].numel()
        if values > MAX_IMAGE_VALUES:
            raise InputError(f"{name}: the images hold more than {MAX_IMAGE_VALUES} values in all; pass fewer "
                             f"or smaller images (load_image(path, size=...))")
    sizes = sorted({tuple(x.shape[-2:]) for x in items})
    if len(sizes) > 1:
        raise InputError(f"{name}: images of different sizes {sizes[:6]}; load them with "
                         f"fiberbench.io.load_image(path, size=...) to one size first")
    return torch.cat(items)


def _numpy_to_tensor(arr: np.ndarray, name: str) -> torch.Tensor:
    """A numpy image array -> a channels-first tensor (uint16 already scaled to [0,1])."""
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InputError(f"{name}: numpy array of dtype {arr.dtype} is not an image")
    if arr.size > MAX_IMAGE_VALUES:  # before any copy: a broadcast view can be far bigger than its memory
        raise InputError(f"{name}: array of shape {arr.shape} holds {arr.size} values; at most {MAX_IMAGE_VALUES}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    arr = np.moveaxis(arr, -1, -3) if _numpy_channels_last(arr.shape, name) else arr
    if arr.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32) / 65535.0)
    if arr.dtype.kind == "f" and arr.dtype not in (np.float16, np.float32, np.float64):
        arr = arr.astype(np.float64)  # e.g. longdouble
    try:
        return torch.from_numpy(np.ascontiguousarray(arr))
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: numpy array of dtype {arr.dtype} cannot be used as an image ({e})") from None


def _numpy_channels_last(shape: tuple[int, ...], name: str) -> bool:
    """Whether a 3-D / 4-D numpy image array is channels-last (``[H,W,C]`` / ``[B,H,W,C]``, as PIL and most
    numpy code hold images) rather than channels-first; ``InputError`` when both readings fit and differ.

    Channels-last fits when the last axis has 1-4 entries, channels-first when the channel axis has 1 or 3
    (numpy RGBA is always channels-last). A thin image (1-3 rows, ``np.asarray`` of a 500x1 PNG is
    ``(1, 500, 3)``) or a narrow one (width 1-4) fits both, and no rule can tell them apart, so the caller
    says which.
    """
    if len(shape) not in (3, 4):
        return False
    last, first = shape[-1] in (1, 2, 3, 4), shape[-3] in (1, 3)
    if not (last and first) or tuple(shape[-3:]) == (1, 1, 1):  # (1,1,1): one gray pixel either way
        return last
    batch = f"{shape[0]} images" if len(shape) == 4 else "one image"
    h, w, c = shape[-3:]
    raise InputError(
        f"{name}: numpy array of shape {tuple(shape)} has two readings: channels-last [..., H, W, C] ({batch} of "
        f"{h}x{w} pixels with {c} channel(s)) or channels-first [..., C, H, W] ({batch} of {w}x{c} pixels with "
        f"{h} channel(s)). Say which: pass np.moveaxis(x, -1, -3) if it is channels-last, or torch.from_numpy(x) "
        f"if it is channels-first (tensors are always channels-first); a PIL image or a file path needs neither")


def _check_tensor(x: torch.Tensor, name: str) -> None:
    """``InputError`` for tensors without readable pixel values or too big to convert."""
    if x.is_meta:
        raise InputError(f"{name}: a tensor on the meta device has no values; pass a tensor with data")
    if x.is_nested or x.layout != torch.strided:
        layout = "nested" if x.is_nested else str(x.layout).replace("torch.", "")
        raise InputError(f"{name}: a {layout} tensor is not an image; pass a dense tensor (x.to_dense())")
    if x.is_quantized:
        raise InputError(f"{name}: a quantized tensor is not an image; pass x.dequantize()")
    if x.numel() > MAX_IMAGE_VALUES:
        raise InputError(f"{name}: tensor of shape {tuple(x.shape)} holds {x.numel()} values; at most "
                         f"{MAX_IMAGE_VALUES}")


def _to_float(x: torch.Tensor, name: str) -> torch.Tensor:
    """Pixel values as float32: uint8 /255, uint16 /65535, bool 0/1, floats as they are; others refused."""
    if x.is_complex():
        raise InputError(f"{name}: complex-valued tensor is not an image")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if x.dtype == torch.uint16:
        return x.float() / 65535.0
    if x.dtype == torch.bool:
        return x.float()
    if not x.is_floating_point():
        raise InputError(f"{name}: integer images other than uint8/uint16 have no unambiguous range "
                         f"(dtype {x.dtype}); convert to float in [0,1] or to uint8")
    return x.detach().float()


def _to_bchw(x: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``[H,W]`` / ``[C,H,W]`` / ``[B,C,H,W]`` -> ``[B,C,H,W]`` with 1-4 channels, or ``InputError``."""
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3 and x.shape[0] in (2, 4):
        c = x.shape[0]
        raise InputError(
            f"{name}: shape {shape} has two readings: one {shape[1]}x{shape[2]} image with {c} channels "
            f"[C,H,W] ({'gray + alpha' if c == 2 else 'RGBA'}), or {c} grayscale images [B,H,W]. Say which: "
            f"x[None] for one image ([1,C,H,W]), x[:, None] for {c} grayscale images ([B,1,H,W])")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InputError(f"{name}: expected an image [3,H,W] / [H,W] or a batch [B,3,H,W], got shape {shape}")
    if x.shape[0] < 1 or x.shape[-1] < 1 or x.shape[-2] < 1:
        raise InputError(f"{name}: empty image batch, shape {shape}")
    if x.shape[1] not in (1, 2, 3, 4):
        hint_last = "; channels-last? permute to [C,H,W]"
        raise InputError(f"{name}: expected 1, 3 (RGB) or 4 (RGBA) colour channels first ([B,C,H,W] / [C,H,W]), "
                         f"got shape {shape}" + (hint_last if shape[-1] in (1, 3, 4) else ""))
    if x.shape[0] > MAX_REFERENCES:
        raise InputError(f"{name}: {x.shape[0]} images in one batch; at most {MAX_REFERENCES}")
    return x


def as_image_batch(images: Any, name: str = "reference") -> torch.Tensor:
    """Validate / convert user images to ``[B,3,H,W]`` float32 in [0,1] (detached, contiguous).

    Accepts a ``[3,H,W]`` or ``[B,C,H,W]`` tensor (float in [0,1]; uint8 0..255 and uint16
    0..65535 are scaled; bool is 0/1), ``[H,W]`` / ``[1,H,W]`` grayscale (repeated to RGB),
    2 (gray + alpha) or 4 (RGBA) channels in a batch ``[B,C,H,W]`` (composited on white), a numpy array
    (HWC / BHWC when the last axis has 1-4 entries and the channel-first axis not 1 or 3, else CHW / BCHW),
    a PIL image, a path, or a list/tuple of those with one size. Layouts with two readings raise
    ``InputError`` naming both and how to pick one: a numpy array that fits both HWC and CHW (a 1-3 row or
    1-4 column image) and a ``[2,H,W]`` / ``[4,H,W]`` tensor (one image with alpha, or a batch of grayscale
    images). NaN/inf pixels, float values outside [0,1] beyond rounding (±1e-3), other integer dtypes,
    complex values, meta / sparse / quantized tensors, empty images, more than ``MAX_REFERENCES`` images
    and more than ``MAX_IMAGE_VALUES`` values raise ``InputError`` naming ``name``.
    """
    return _as_batch(images, name, 0)


def _as_batch(images: Any, name: str, depth: int) -> torch.Tensor:
    """:func:`as_image_batch` of an item ``depth`` lists deep."""
    x = _to_tensor(images, name, depth)
    shape = tuple(x.shape)
    _check_tensor(x, name)
    x = _to_bchw(_to_float(x, name), name, shape)
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name}: contains {bad} NaN or infinite pixel value(s)")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        hint = ("values look like [-1,1] data: pass (x + 1) / 2" if lo >= -1.001 and hi <= 1.001
                else "values look like 0-255 data: divide by 255" if lo >= 0 and hi <= 255.5
                else "rescale to [0,1]")
        raise InputError(f"{name}: float pixel values must lie in [0,1], got range [{lo:.4g}, {hi:.4g}]; {hint}")
    x = x.clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 2:
        x = (x[:, :1] * x[:, 1:] + (1 - x[:, 1:])).expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3] * x[:, 3:] + (1 - x[:, 3:])
    return x.contiguous()
