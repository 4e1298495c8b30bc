"""One checker for the values users pass in, and the limits every entry point applies.

Each ``is_*`` predicate answers a yes/no question about a value; each ``check_*`` function returns the
value in canonical form (numpy scalars become Python numbers) or raises one :class:`ConfigError` that names
the value, shows it (truncated, see :func:`show`) and says what is accepted. Samplers, the results store,
sweeps and the trained baseline all validate through here, so their rules cannot drift apart.
"""
from __future__ import annotations

import math
import reprlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import ConfigError

# Upper limits that catch typos (n: 10000000) before anything is rendered, loaded or run. Every entry point
# (sample_fiber, the store, sweeps, load_image, as_image_batch, the gallery) applies them from here.
MAX_N = 10_000  # samples per reference (per fiber)
MAX_STEPS = 10_000  # denoising steps
MAX_REFERENCES = 10_000  # reference images of one call or sweep
MAX_JOBS = 100_000  # jobs of one sweep
MAX_IMAGE_SIDE = 4096  # pixels per side of an image that is resized on load
MAX_IMAGE_VALUES = 2 ** 30  # values (B x C x H x W) of an image batch passed as an array or tensor (4 GiB float32)
MAX_CONFIG_BYTES = 1 << 20  # bytes of a sweep file
MAX_CONFIG_VALUES = 100_000  # values in a sweep config, every YAML alias expanded where it is used
MAX_CONFIG_DEPTH = 32  # nesting levels of a sweep config
MAX_MODELS = 1_000  # extractor (or prior) specs listed in one sweep
SEED_LIMIT = 2 ** 63  # seeds are in [0, 2**63): numpy's SeedSequence and torch generators take them all

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def show(value: Any, limit: int = 80, typed: bool = True) -> str:
    """A short ``repr`` of a user value for an error message, with its type when the repr hides it (``typed``).

    Containers are abbreviated before they are formatted (``reprlib``), so a huge or deeply nested value
    costs no more than a small one.
    """
    text = _REPR.repr(value) if isinstance(value, (list, tuple, dict, set, frozenset)) else repr_bounded(value)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    plain = not typed or isinstance(value, (int, float, str)) and not isinstance(value, bool)
    return text if plain else f"{text} ({type(value).__name__})"


def repr_bounded(value: Any, limit: int = 2000) -> str:
    """``repr(value)`` cut to ``limit`` characters (strings are sliced before ``repr`` sees them)."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
    try:
        text = repr(value)
    except Exception as e:  # noqa: BLE001 - a user object whose __repr__ fails still gets a message
        text = f"<{type(value).__name__} object (repr failed: {type(e).__name__})>"
    return text[:limit]


def plain_children(value: Any) -> Iterable[Any] | None:
    """The values inside a mapping (keys and values), list, tuple or set; ``None`` for anything else."""
    if isinstance(value, Mapping):
        return [x for kv in value.items() for x in kv]
    if isinstance(value, (list, tuple, set, frozenset)):
        return value
    return None


def check_expanded_size(name: str, root: Any, children: Callable[[Any], Iterable[Any] | None] = plain_children,
                        max_values: int = MAX_CONFIG_VALUES, max_depth: int = MAX_CONFIG_DEPTH) -> int:
    """The number of values in ``root`` with every shared part counted each time it is used; ``ConfigError``
    past ``max_values``, past ``max_depth`` nesting levels, or for a part that contains itself.

    ``children(v)`` lists what ``v`` holds (``None`` for a scalar), so the same walk bounds plain Python data
    and a YAML node graph (where an alias is a shared node). Each distinct part is walked once: a document
    whose aliases would expand to billions of values is refused after a few thousand steps.
    """
    sizes: dict[int, int] = {}
    path: set[int] = set()

    def size(v: Any, depth: int) -> int:
        inner = children(v)
        if inner is None:
            return 1
        if id(v) in path:
            raise ConfigError(f"{name} contains itself (a recursive alias or reference)")
        if id(v) in sizes:
            return sizes[id(v)]
        if depth >= max_depth:
            raise ConfigError(f"{name} is nested more than {max_depth} levels deep")
        path.add(id(v))
        total = 1
        for c in inner:
            total += size(c, depth + 1)
            if total > max_values:
                raise ConfigError(f"{name} holds more than {max_values} values with its aliases expanded "
                                  f"(an alias bomb, or a config far bigger than a sweep needs)")
        path.discard(id(v))
        sizes[id(v)] = total
        return total

    return size(root, 0)


def is_int(value: Any, lo: int | None = None, hi: int | None = None) -> bool:
    """``value`` is an integer (Python or numpy; bools are not) within ``[lo, hi]``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        return False
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def is_number(value: Any) -> bool:
    """``value`` is a real number of any size (Python or numpy; bools are not numbers), finite or not."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """``value`` is a finite real number (Python or numpy; bools are not numbers)."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(float(value))
    except (OverflowError, ValueError, TypeError):  # ints beyond the float range
        return False


def in_choices(value: Any, choices: Sequence[Any]) -> bool:
    """``value`` is one of ``choices`` with the same type (``0`` is not ``False``, ``1.0`` is not ``True``)."""
    return any(type(value) is type(c) and value == c for c in choices)


def as_python(value: Any) -> Any:
    """numpy scalars -> the Python number they hold; anything else unchanged."""
    return value.item() if isinstance(value, (np.integer, np.floating)) else value


def check_int(name: str, value: Any, lo: int = 1, hi: int | None = None, where: str = "") -> int:
    """``value`` as an ``int`` in ``[lo, hi]``, or ``ConfigError`` (``where`` is appended, e.g. a method name)."""
    if not is_int(value, lo, hi):
        what = "a positive integer" if lo == 1 else "a non-negative integer" if lo == 0 else f"an integer >= {lo}"
        bound = f" (at most {hi})" if hi is not None else ""
        raise ConfigError(f"{name} must be {what}{bound}, got {show(value)}{where}")
    return int(value)


def check_seed(name: str, value: Any) -> int:
    """A seed: an integer in ``[0, 2**63)``."""
    if not is_int(value, 0, SEED_LIMIT - 1):
        raise ConfigError(f"{name} must be an integer in [0, 2**63), got {show(value)}")
    return int(value)


def check_real(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
               open_lo: bool = False, where: str = "") -> float:
    """``value`` as a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``), or ``ConfigError``."""
    ok = is_real(value) and (lo is None or (value > lo if open_lo else value >= lo)) and (hi is None or value <= hi)
    if not ok:
        if lo is not None and hi is not None:
            what = f" in [{lo:g}, {hi:g}]"
        elif lo is not None:
            what = f" > {lo:g}" if open_lo else f" >= {lo:g}"
        else:
            what = ""
        raise ConfigError(f"{name} must be a finite number{what}, got {show(value)}{where}")
    return as_python(value)


def check_choice(name: str, value: Any, choices: Sequence[Any], where: str = "") -> Any:
    """``value`` if it is one of ``choices`` (same type), or ``ConfigError`` listing them."""
    if not in_choices(value, choices):
        raise ConfigError(f"{name} must be one of {list(choices)}, got {show(value)}{where}")
    return value
