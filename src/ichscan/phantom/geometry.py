"""Soft shapes on a pixel grid: the fraction of each pixel a shape covers (partial volume).

Every function takes head-frame coordinates in millimetres (arrays that broadcast: ``(1, H, W)`` for the
plane, ``(n, 1, 1)`` for per-slice sizes) and returns float32 fractions in [0, 1]. A boundary is ramped
over ``width`` millimetres, about one pixel, plus the through-plane smear of a surface that is oblique
to the slice, which is what makes the vertex and the skull base look soft on thick slices.
"""

from __future__ import annotations

import numpy as np

from ichscan.errors import IchscanError


def parse_mm_range(value, what: str, low: float, high: float, example: str) -> tuple[float, float]:
    """``5``, ``"5"``, ``"2.5-8"`` or ``(2.5, 8)`` as a (low, high) range in mm within ``low``..``high``;
    ``what`` and ``example`` name the option in the one-line error."""
    text = value
    try:
        if isinstance(value, str):
            lo, sep, hi = value.partition("-")
            value = (float(lo), float(hi)) if sep else float(lo)
        lo, hi = (float(value[0]), float(value[1])) if isinstance(value, (tuple, list)) else (float(value),) * 2
    except (TypeError, ValueError, IndexError):
        raise IchscanError(f"{what} {text!r}: expected mm, e.g. {example}") from None
    if not low <= lo <= hi <= high:
        raise IchscanError(f"{what} {lo:g}-{hi:g} mm: expected {low:g} <= low <= high <= {high:g}")
    return lo, hi


def ramp(signed_distance, width):
    """Fraction inside for a signed distance (negative inside), ramped over ``width`` mm."""
    return np.clip(0.5 - signed_distance / width, 0.0, 1.0).astype(np.float32, copy=False)


def ellipse_distance(X, Y, cx, cy, a, b, angle=0.0):
    """First-order signed distance (mm, negative inside) to an ellipse; exact enough near its boundary."""
    dx = X - cx
    dy = Y - cy
    if np.any(angle):
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    a = np.maximum(a, 1e-3)
    b = np.maximum(b, 1e-3)
    u = dx / a
    v = dy / b
    q = np.sqrt(u * u + v * v)
    grad = np.sqrt((u / a) ** 2 + (v / b) ** 2) + 1e-6
    # (q - 1) / |grad q| with |grad q| = grad / q; written to stay finite at the centre.
    return (q - 1.0) * q / grad


def ellipse(X, Y, cx, cy, a, b, width, angle=0.0):
    """Fraction of each pixel inside the ellipse, shape (n, H, W).

    Work is done only where the ellipse can be: on slices where its half-axes exceed 0.05 mm (a
    structure absent from a level is not drawn as a dot) and inside its bounding square in plane.
    """
    if np.ndim(X) == 2:  # one plane
        return ellipse(X[None], Y[None], cx, cy, a, b, width, angle)[0]
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    shape = np.broadcast_shapes(np.shape(X), a.shape, b.shape, np.shape(width), np.shape(cx), np.shape(cy))
    n, H, W = shape[0], X.shape[1], X.shape[2]
    out = np.zeros((n, H, W), np.float32)
    present = (np.broadcast_to(a, (n, 1, 1)) > 0.05) & (np.broadcast_to(b, (n, 1, 1)) > 0.05)
    idx = np.nonzero(present[:, 0, 0])[0]
    if len(idx) == 0:
        return out
    rs = cs = slice(None)
    if np.ndim(cx) == 0 and np.ndim(cy) == 0:
        # Warped grids (one per slice) move by up to ~12 mm: keep a margin for them.
        r = float(max(a.max(), b.max())) + 3 * float(np.max(width)) + (15.0 if X.shape[0] > 1 else 1.0)
        near = (np.abs(X[0] - cx) <= r) & (np.abs(Y[0] - cy) <= r)
        rows, cols = np.nonzero(near.any(axis=1))[0], np.nonzero(near.any(axis=0))[0]
        if len(rows) == 0 or len(cols) == 0:
            return out
        rs, cs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)

    def take(v):
        v = np.asarray(v)
        return v[idx] if v.ndim == 3 and v.shape[0] == n and n > 1 else v

    Xs, Ys = take(X)[:, rs, cs], take(Y)[:, rs, cs]
    d = ellipse_distance(Xs, Ys, take(cx), take(cy), take(a), take(b), angle)
    out[idx, rs, cs] = ramp(d, take(width))
    return out


def segment_distance(X, Y, x0, y0, x1, y1):
    """Distance (mm) from each point to the segment (x0, y0)-(x1, y1)."""
    vx, vy = x1 - x0, y1 - y0
    length2 = vx * vx + vy * vy + 1e-9
    t = np.clip(((X - x0) * vx + (Y - y0) * vy) / length2, 0.0, 1.0)
    return np.hypot(X - (x0 + t * vx), Y - (y0 + t * vy))


def capsule(X, Y, x0, y0, x1, y1, radius, width):
    return ramp(segment_distance(X, Y, x0, y0, x1, y1) - radius, width)


def metal_streaks(hu, X, Y, at, angles, strength, *, width_mm: float, fade_mm: float, where=None) -> None:
    """Streak artifacts through metal at ``at`` (x, y mm) on one slice ``hu``, in place: a line at each of
    ``angles`` (radians), dark and bright in turn, ``strength`` HU at the metal, a Gaussian ``width_mm`` across
    and fading over ``fade_mm``; only where ``where`` (a 0/1 mask) holds, if given."""
    r = np.hypot(X - at[0], Y - at[1])
    th = np.arctan2(Y - at[1], X - at[0])
    for k, a in enumerate(angles):
        sign = 1.0 if k % 2 else -1.0
        dist = np.abs(np.sin(th - a)) * r
        line = sign * strength * np.exp(-0.5 * (dist / width_mm) ** 2) * np.exp(-r / fade_mm)
        hu += (line if where is None else line * where).astype(np.float32)


def wrap_angle(a):
    return (a + np.pi) % (2 * np.pi) - np.pi


def paint(hu, tissue, value, fraction, code=None):
    """Lay ``fraction`` of a tissue of ``value`` HU over ``hu`` in place; label pixels it mostly fills."""
    hu += fraction * (value - hu)
    if code is not None:
        tissue[np.broadcast_to(fraction >= 0.5, tissue.shape)] = code
