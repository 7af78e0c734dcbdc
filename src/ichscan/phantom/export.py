"""A series stored as windowed 8-bit images and turned back into Hounsfield units.

Not every CT that reaches a researcher is the scanner's DICOM. Some public collections and many PACS or
teaching-file exports keep each slice as 8-bit pictures in one or two display windows, JPEG-compressed,
often on a finer matrix than the scanner's; HU are then rebuilt from the narrow (brain) window where it is
not saturated and from the wide (bone) window elsewhere. What survives: about W/255 HU steps inside the
brain window, coarse steps outside it (air floors at the bone window's lower edge), the smoothing of the
resampling and the 8x8-block error of JPEG. ``ichscan phantom --export SHARE`` stores that share of series
this way, so that a model meets such images in training too.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

SATURATED = 2  # grey levels this close to 0 or 255 in the brain image count as clipped: the bone image is used


@dataclass(frozen=True)
class Export:
    """How one series was exported: two windows (level, width in HU), JPEG quality, export pixel size."""

    brain: tuple[float, float]
    bone: tuple[float, float]
    quality: int
    pixel_mm: float

    def describe(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def draw_export(rng: np.random.Generator) -> Export:
    """An export of the kind met in practice: a brain window of level 35-45 and width 80-160 HU, a bone
    window of level 400-800 and width 2,000-4,000 HU, JPEG quality 70-95, pixels of 0.3-0.5 mm."""
    brain = (round(float(rng.uniform(35, 45)), 1), round(float(rng.uniform(80, 160)), 1))
    bone = (round(float(rng.uniform(400, 800)), 1), round(float(rng.uniform(2000, 4000)), 1))
    return Export(brain=brain, bone=bone, quality=int(rng.integers(70, 96)),
                  pixel_mm=round(float(rng.uniform(0.3, 0.5)), 3))


def _to_8bit(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    level, width = window
    return np.clip(np.rint((hu - (level - width / 2)) / width * 255.0), 0, 255).astype(np.uint8)


def _from_8bit(grey: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    level, width = window
    return grey.astype(np.float32) / 255.0 * width + (level - width / 2)


def _jpeg(grey: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(grey, "L").save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def export_slice(hu: np.ndarray, spacing_mm: float, e: Export) -> np.ndarray:
    """One (H, W) HU slice through the export and back, on its own matrix again (float32, not rounded)."""
    h, w = hu.shape
    scale = max(1.0, spacing_mm / e.pixel_mm)
    big = (max(w, int(round(w * scale))), max(h, int(round(h * scale))))  # PIL sizes are (width, height)
    fine = np.asarray(Image.fromarray(np.ascontiguousarray(hu, np.float32), "F").resize(big, Image.BILINEAR))
    brain = _jpeg(_to_8bit(fine, e.brain), e.quality)
    bone = _jpeg(_to_8bit(fine, e.bone), e.quality)
    inside = (brain >= SATURATED) & (brain <= 255 - SATURATED)
    rebuilt = np.where(inside, _from_8bit(brain, e.brain), _from_8bit(bone, e.bone)).astype(np.float32)
    if big == (w, h):
        return rebuilt
    return np.asarray(Image.fromarray(rebuilt, "F").resize((w, h), Image.BOX), dtype=np.float32)


def export_series(hu: np.ndarray, spacing_mm: float, e: Export, hu_range: tuple[float, float]) -> np.ndarray:
    """A (n, H, W) series through the export: integral HU clipped to what the file can store."""
    out = np.stack([export_slice(s, spacing_mm, e) for s in hu]).astype(np.float32)
    np.clip(np.rint(out, out=out), hu_range[0], hu_range[1], out=out)
    return out
