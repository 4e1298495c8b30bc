"""The shapes world: procedural 32x32 RGB images whose every factor is known.

One image = one coloured shape on a flat background. Factors:

========== ============================================ =========================
factor     values                                       note
========== ============================================ =========================
shape      circle, square, triangle, arrow              ``arrow`` is chiral: a
                                                        half-headed harpoon that no
                                                        rotation turns into its
                                                        mirror image
color      red, green, blue, yellow, magenta, cyan      colour of the shape
background black, gray, white                           flat background
size       (0.18, 0.32)                                 radius / image side
x, y       (0.32, 0.68)                                 centre / image side
                                                        (x to the right, y down)
mirror     False, True                                  arrow points left when
                                                        True; no-op otherwise
========== ============================================ =========================

``mirror`` is the world's analogue of *situs inversus*: it changes which way
the chiral shape points and nothing else.

Rendering evaluates a signed distance function per shape on the pixel grid and
turns it into anti-aliased coverage (``clamp(0.5 - sdf, 0, 1)``, in pixels),
for all images at once.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import ConfigError, InputError

__all__ = [
    "FACTORS", "DISCRETE", "CONTINUOUS", "CHIRAL", "IMAGE_SIZE", "COLORS_RGB",
    "BACKGROUNDS_RGB", "sample_factors", "render", "caption", "validate_factors",
    "factor_index", "intervene", "size_word", "position_words",
]

IMAGE_SIZE = 32

FACTORS: dict[str, Any] = {
    "shape": ["circle", "square", "triangle", "arrow"],
    "color": ["red", "green", "blue", "yellow", "magenta", "cyan"],
    "background": ["black", "gray", "white"],
    "size": (0.18, 0.32),
    "x": (0.32, 0.68),
    "y": (0.32, 0.68),
    "mirror": [False, True],
}
DISCRETE = [k for k, v in FACTORS.items() if isinstance(v, list)]
CONTINUOUS = [k for k, v in FACTORS.items() if isinstance(v, tuple)]
CHIRAL = ["arrow"]

COLORS_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.85, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
BACKGROUNDS_RGB: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
    "white": (0.95, 0.95, 0.95),
}


def validate_factors(factors: pd.DataFrame) -> pd.DataFrame:
    """Check a factor table; return it with canonical dtypes.

    Raises :class:`~fiberbench.errors.InputError` naming the factor and its allowed values when a
    column is missing or holds a value outside ``FACTORS``.
    """
    if not isinstance(factors, pd.DataFrame):
        raise InputError(f"factors must be a pandas DataFrame, got {type(factors).__name__}")
    out = factors.copy()
    for name, allowed in FACTORS.items():
        if name not in out.columns:
            raise InputError(f"factor {name!r} is missing; allowed values: {allowed}")
        col = out[name]
        if isinstance(allowed, list):
            if name == "mirror":
                bad = ~col.isin([True, False, 0, 1])
                if bad.any():
                    raise InputError(
                        f"factor 'mirror' has invalid value {col[bad].iloc[0]!r}; allowed values: {allowed}")
                out[name] = col.astype(bool)
            else:
                bad = ~col.isin(allowed)
                if bad.any():
                    raise InputError(
                        f"factor {name!r} has invalid value {col[bad].iloc[0]!r}; allowed values: {allowed}")
                out[name] = col.astype(str)
        else:
            lo, hi = allowed
            vals = pd.to_numeric(col, errors="coerce")
            bad = vals.isna() | (vals < lo - 1e-9) | (vals > hi + 1e-9)
            if bad.any():
                raise InputError(
                    f"factor {name!r} has invalid value {col[bad].iloc[0]!r}; allowed range: [{lo}, {hi}]")
            out[name] = vals.astype(float)
    return out


def factor_index(factors: pd.DataFrame, name: str) -> np.ndarray:
    """Integer class index of a discrete factor (the order of ``FACTORS[name]``)."""
    values = FACTORS[name]
    lookup = {v: i for i, v in enumerate(values)}
    return np.array([lookup[bool(v) if name == "mirror" else v] for v in factors[name]], dtype=np.int64)


def sample_factors(n: int, seed: int = 0, *, bias: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Draw ``n`` factor rows uniformly (deterministic per ``seed``).

    ``bias={"pair": ("shape", "color"), "strength": 0.9}`` correlates two
    discrete factors: with probability ``strength`` the second factor takes
    the value *paired* with the first (value ``i`` of the first goes with
    value ``i mod len`` of the second), otherwise it stays uniform. Used for
    the shortcut lesson.

    Returns a DataFrame with one row per image and the columns of ``FACTORS``.
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    cols: dict[str, Any] = {}
    for name, allowed in FACTORS.items():
        if isinstance(allowed, list):
            idx = rng.integers(0, len(allowed), size=n)
            cols[name] = [allowed[i] for i in idx]
        else:
            cols[name] = rng.uniform(allowed[0], allowed[1], size=n)
    if bias is not None:
        first, second = bias.get("pair", ("shape", "color"))
        strength = float(bias.get("strength", 0.9))
        if first not in DISCRETE or second not in DISCRETE:
            raise ConfigError(f"bias pair must name two discrete factors of {DISCRETE}, got {(first, second)}")
        if not 0.0 <= strength <= 1.0:
            raise ConfigError(f"bias strength must be in [0, 1], got {strength}")
        keep = rng.random(n) < strength
        a_vals, b_vals = FACTORS[first], FACTORS[second]
        a_idx = [a_vals.index(v) for v in cols[first]]
        cols[second] = [b_vals[i % len(b_vals)] if k else v for i, k, v in zip(a_idx, keep, cols[second])]
    df = pd.DataFrame(cols)
    df["mirror"] = df["mirror"].astype(bool)
    return df


# --------------------------------------------------------------------------- SDFs
# All SDFs take local coordinates p = (px, py) in *pixels*, y pointing up,
# shape radius r in pixels, and return distance (negative inside).

def _sd_box(px: torch.Tensor, py: torch.Tensor, bx, by) -> torch.Tensor:
    qx, qy = px.abs() - bx, py.abs() - by
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    inside = torch.maximum(qx, qy).clamp(max=0)
    return outside + inside


def _sd_triangle(px, py, p0, p1, p2) -> torch.Tensor:
    """Exact SDF of a triangle with vertices p_i = (x_i, y_i) (each [N,1,1] tensors)."""
    def sub(a, b):
        return a[0] - b[0], a[1] - b[1]

    def dot(a, b):
        return a[0] * b[0] + a[1] * b[1]

    p = (px, py)
    e0, e1, e2 = sub(p1, p0), sub(p2, p1), sub(p0, p2)
    v0, v1, v2 = sub(p, p0), sub(p, p1), sub(p, p2)

    def pq(v, e):
        t = (dot(v, e) / dot(e, e)).clamp(0, 1)
        return v[0] - e[0] * t, v[1] - e[1] * t

    pq0, pq1, pq2 = pq(v0, e0), pq(v1, e1), pq(v2, e2)
    s = torch.sign(e0[0] * e2[1] - e0[1] * e2[0])
    d0 = dot(pq0, pq0)
    c0 = s * (v0[0] * e0[1] - v0[1] * e0[0])
    d1 = dot(pq1, pq1)
    c1 = s * (v1[0] * e1[1] - v1[1] * e1[0])
    d2 = dot(pq2, pq2)
    c2 = s * (v2[0] * e2[1] - v2[1] * e2[0])
    d = torch.minimum(torch.minimum(d0, d1), d2)
    c = torch.minimum(torch.minimum(c0, c1), c2)
    return -torch.sqrt(d) * torch.sign(c)


def _shape_sdf(shape_idx: torch.Tensor, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """SDF [N,H,W] of every image's shape. px, py: [N,H,W] local pixel coords; r: [N,1,1]."""
    sdf = torch.empty_like(px)
    names = FACTORS["shape"]
    for k, name in enumerate(names):
        sel = shape_idx == k
        if not sel.any():
            continue
        x, y, rr = px[sel], py[sel], r[sel]
        if name == "circle":
            d = torch.sqrt(x ** 2 + y ** 2) - rr
        elif name == "square":
            d = _sd_box(x, y, 0.82 * rr, 0.82 * rr)
        elif name == "triangle":
            # equilateral, pointing up, centred on its centroid
            d = _sd_triangle(x, y, (0 * rr, 1.0 * rr), (-0.95 * rr, -0.62 * rr), (0.95 * rr, -0.62 * rr))
        elif name == "arrow":
            # half-headed arrow (harpoon) pointing right, barb on top: chiral in 2D
            shaft = _sd_box(x + 0.3 * rr, y + 0.05 * rr, 0.7 * rr, 0.32 * rr)
            head = _sd_triangle(x, y, (-0.1 * rr, 1.0 * rr), (-0.1 * rr, -0.37 * rr), (1.05 * rr, -0.37 * rr))
            d = torch.minimum(shaft, head)
        else:  # pragma: no cover - FACTORS and this switch are kept in sync
            raise AssertionError(name)
        sdf[sel] = d
    return sdf


def render(factors: pd.DataFrame, *, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render factor rows to images.

    Args:
        factors: DataFrame with the columns of ``FACTORS`` (one row per image).
        size: output side in pixels (the world is defined at 32; other sizes
            render the same scene at another resolution).

    Returns:
        ``[N, 3, size, size]`` float32 tensor in [0, 1]; deterministic.
    """
    f = validate_factors(factors)
    n = len(f)
    if n == 0:
        return torch.zeros(0, 3, size, size)
    shape_idx = torch.from_numpy(factor_index(f, "shape"))
    col = torch.tensor([COLORS_RGB[c] for c in f["color"]], dtype=torch.float32)
    bg = torch.tensor([BACKGROUNDS_RGB[b] for b in f["background"]], dtype=torch.float32)
    s = float(size)
    cx = torch.tensor(f["x"].to_numpy(), dtype=torch.float32).view(n, 1, 1) * s
    cy = torch.tensor(f["y"].to_numpy(), dtype=torch.float32).view(n, 1, 1) * s
    r = torch.tensor(f["size"].to_numpy(), dtype=torch.float32).view(n, 1, 1) * s
    # mirroring only touches chiral shapes, so it is an exact no-op elsewhere
    flip = torch.tensor((f["mirror"] & f["shape"].isin(CHIRAL)).to_numpy(), dtype=torch.bool).view(n, 1, 1)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    gx = coords.view(1, 1, size).expand(n, size, size)
    gy = coords.view(1, size, 1).expand(n, size, size)
    px = gx - cx
    px = torch.where(flip, -px, px)
    py = cy - gy  # y up in local coordinates
    sdf = _shape_sdf(shape_idx, px, py, r)
    alpha = (0.5 - sdf).clamp(0.0, 1.0).unsqueeze(1)  # [N,1,H,W] anti-aliased coverage
    img = bg.view(n, 3, 1, 1) * (1 - alpha) + col.view(n, 3, 1, 1) * alpha
    return img.clamp(0.0, 1.0).contiguous()


def size_word(v: float) -> str:
    lo, hi = FACTORS["size"]
    t = (v - lo) / (hi - lo)
    return "small" if t < 1 / 3 else ("medium" if t < 2 / 3 else "large")


def position_words(x: float, y: float) -> str:
    lo, hi = FACTORS["x"]

    def third(v):
        t = (v - lo) / (hi - lo)
        return 0 if t < 1 / 3 else (1 if t < 2 / 3 else 2)

    vert = ["top", "", "bottom"][third(y)]
    horiz = ["left", "", "right"][third(x)]
    words = " ".join(w for w in (vert, horiz) if w)
    return words or "center"


def caption(factors: pd.DataFrame) -> list[str]:
    """One English caption per row, e.g. ``"a small red arrow pointing left on a gray background, top left"``."""
    f = validate_factors(factors)
    out = []
    for row in f.itertuples(index=False):
        shape = row.shape
        if shape in CHIRAL:
            shape = f"{shape} pointing {'left' if row.mirror else 'right'}"
        out.append(
            f"a {size_word(row.size)} {row.color} {shape} on a {row.background} background, "
            f"{position_words(row.x, row.y)}")
    return out


def intervene(factors: pd.DataFrame, factor: str, seed: int = 0) -> pd.DataFrame:
    """Copy of ``factors`` with only ``factor`` changed (discrete: to a different value; continuous: resampled).

    For ``mirror`` the flag is flipped (a visible change only for chiral shapes).
    """
    if factor not in FACTORS:
        raise ConfigError(f"unknown factor {factor!r}; factors: {list(FACTORS)}")
    rng = np.random.default_rng(seed)
    out = factors.copy().reset_index(drop=True)
    allowed = FACTORS[factor]
    if factor == "mirror":
        out["mirror"] = ~out["mirror"].astype(bool)
    elif isinstance(allowed, list):
        new = []
        for v in out[factor]:
            others = [a for a in allowed if a != v]
            new.append(others[rng.integers(len(others))])
        out[factor] = new
    else:
        out[factor] = rng.uniform(allowed[0], allowed[1], size=len(out))
    return out


def as_frame(rows: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> pd.DataFrame:
    """Factor rows (dicts) to a validated DataFrame; missing continuous factors take their midpoint."""
    if isinstance(rows, Mapping):
        rows = [rows]
    full = []
    for row in rows:
        r = dict(row)
        for name, allowed in FACTORS.items():
            if name not in r:
                r[name] = (allowed[0] + allowed[1]) / 2 if isinstance(allowed, tuple) else allowed[0]
        full.append(r)
    return validate_factors(pd.DataFrame(full))
