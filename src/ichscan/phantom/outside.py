"""Domain randomisation outside the cranial cavity: random texture in place of scalp, face and outer skull.

A phantom's cranial contents are about as far from real CT as its intensity histograms say; most of what
tells a phantom slice from a real one lies outside them (``bench/realism.py --cnn-region intracranial``,
docs/phantom.md). Blood lies inside the inner table, so a model has no need of the outside, but it still
reacts to what it sees there, and on real CT that is something it never saw. ``ichscan phantom
--randomize-outside SHARE`` replaces, in that share of series, everything more than a few millimetres
outside the inner table by smooth random texture of a random density range, new on every slice, so that
a model trained on them learns that nothing out there predicts blood. The inner table, the dura and the
first millimetres of bone stay, so extra-axial blood keeps the edge it lies against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from ichscan.phantom.geometry import parse_mm_range


@dataclass(frozen=True)
class Outside:
    """How one series' outside is replaced: kept within ``margin_mm`` of the inner table; beyond it texture
    of correlation length ``grain_mm`` spanning ``low``..``high`` HU, with white noise of ``noise_hu``."""

    margin_mm: float
    low: float
    high: float
    grain_mm: float
    noise_hu: float

    def describe(self) -> dict:
        return asdict(self)


DEFAULT_MARGIN = (1.5, 4.0)  # mm beyond the inner table kept: the dura's edge and the first bone
MAX_MARGIN = 100.0


def parse_margin(value: float | str | tuple[float, float]) -> tuple[float, float]:
    """``--outside-margin``: ``3``, ``"25-40"`` or ``(25, 40)`` as a (low, high) range in mm, 0 to ``MAX_MARGIN``."""
    return parse_mm_range(value, "outside-margin", 0.0, MAX_MARGIN, "3 or 25-40")


def draw_outside(rng: np.random.Generator, margin: tuple[float, float] = DEFAULT_MARGIN) -> Outside:
    """The kept margin from ``margin`` (mm; by default 1.5-4: the inner table's edge, with skull and scalp
    randomised; 25-40 keeps the vault's skull and scalp, a scalp swelling included, and randomises air, head
    holder, face and the slices above and below the cranial cavity); a density range anywhere from air to
    dense bone (-1000 to 2000 HU); texture 2-25 mm."""
    low, high = np.sort(rng.uniform(-1000, 2000, 2))
    return Outside(margin_mm=round(float(rng.uniform(*margin)), 2), low=round(float(low), 1),
                   high=round(float(high), 1), grain_mm=round(float(rng.uniform(2.0, 25.0)), 2),
                   noise_hu=round(float(rng.uniform(2.0, 20.0)), 2))


def randomize_outside(hu: np.ndarray, depth: np.ndarray, spacing_mm: float, o: Outside,
                      rng: np.random.Generator, hu_range: tuple[float, float]) -> np.ndarray:
    """``hu`` (n, H, W) with every pixel deeper than ``o.margin_mm`` outside the inner table (``depth`` in mm,
    negative outside; the whole slice below the cranial cavity) replaced by a fresh random field per slice,
    scaled to ``o.low``..``o.high``; integral HU clipped to ``hu_range``."""
    out = hu.copy()
    sigma = max(o.grain_mm / spacing_mm, 0.5)
    for k in range(hu.shape[0]):
        away = depth[k] < -o.margin_mm
        if not away.any():
            continue
        field = ndi.gaussian_filter(rng.standard_normal(hu.shape[1:]).astype(np.float32), sigma)
        lo, hi = float(field.min()), float(field.max())
        field = (field - lo) / (hi - lo) if hi > lo else np.zeros_like(field)
        field = o.low + (o.high - o.low) * field + rng.normal(0.0, o.noise_hu, field.shape).astype(np.float32)
        out[k][away] = field[away]
    np.clip(np.rint(out, out=out), hu_range[0], hu_range[1], out=out)
    return out
