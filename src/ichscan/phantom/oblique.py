"""Scan planes tilted against the head: a flexed or extended head in its holder, or a tilted gantry.

The anatomy code draws slices perpendicular to the head's axis. A tilted series is drawn on thin slices
of that kind (``fine_frame``), over every level its planes pass through, and each of its slices is then
the mean through an oblique slab (``resample``): at image point (x, y) slice i covers head levels
``z_i + tan(pitch) y + tan(roll) x`` plus or minus half the slice thickness. Partial volume through the
slab, the obliquely cut vault and skull base, and orbits, sinuses and posterior fossa on one slice all
follow from that geometry. The in-plane foreshortening (cos 20 degrees = 0.94) is left out: it is
smaller than the spread of head sizes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ichscan.labels import SUBTYPES
from ichscan.phantom.anatomy import Anatomy, Frame

MASK_FRACTION = 0.5  # a voxel is labelled blood when blood fills at least this share of its slab


def level_offset(fr: Frame) -> np.ndarray:
    """(1, H, W) head level (mm) of each image point relative to the slice centre's level."""
    return (np.float32(np.tan(fr.pitch)) * fr.y_img + np.float32(np.tan(fr.roll)) * fr.x_img).astype(np.float32)


def fine_frame(fr: Frame) -> Frame:
    """Thin slices along the head's axis covering every level the tilted slabs of ``fr`` reach: half the
    slice thickness apart (0.5-2 mm; each is drawn with its own partial volume), and at most four times as
    many as ``fr`` has."""
    off = level_offset(fr)
    lo = float(fr.z.min()) + float(off.min()) - fr.thickness / 2
    hi = float(fr.z.max()) + float(off.max()) + fr.thickness / 2
    step = max(float(np.clip(fr.thickness / 2, 0.5, 2.0)), (hi - lo) / (4 * max(fr.n, 8)))
    m = int(np.ceil((hi - lo) / step)) + 1
    z = (lo - step / 2 + step * np.arange(m + 1)).astype(np.float32)  # a spare slice at each end
    return dataclasses.replace(fr, z=z, thickness=step, pitch=0.0, roll=0.0)


class _Slabs:
    """Means of fine-slice volumes over the tilted slabs of ``out``, by cumulative sums along z."""

    def __init__(self, fine: Frame, out: Frame):
        self.m = fine.n
        self.step = fine.thickness
        self.base = float(fine.z[0]) - fine.thickness / 2  # lower face of the first fine slice
        self.centre = out.z[:, None, None] + level_offset(out)[0][None]  # (n, H, W) level of each output voxel
        self.half = out.thickness / 2
        # where each slab's faces fall among the fine slices: the same for every volume resampled
        self.faces = [self._face(self.centre + self.half), self._face(self.centre - self.half)]

    def _face(self, level: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fine-slice index and fraction of ``level`` (n, H, W), counted from ``base``."""
        f = np.clip((level - self.base) / self.step, 0.0, float(self.m))
        k = np.minimum(np.floor(f).astype(np.intp), self.m - 1)
        return k, (f - k).astype(np.float32)

    @staticmethod
    def _at(cum: np.ndarray, face: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Integral (in fine slices) of the volume from ``base`` up to a face."""
        k, frac = face
        lo = np.take_along_axis(cum, k, axis=0)
        return lo + frac * (np.take_along_axis(cum, k + 1, axis=0) - lo)

    def mean(self, vol: np.ndarray) -> np.ndarray:
        """Slab means of a (m, H, W) fine volume: (n, H, W) float32."""
        cum = np.zeros((self.m + 1, *vol.shape[1:]), np.float64)
        np.cumsum(vol, axis=0, dtype=np.float64, out=cum[1:])
        top, bottom = (self._at(cum, face) for face in self.faces)
        return ((top - bottom) * (self.step / (2 * self.half))).astype(np.float32)

    def nearest(self, vol: np.ndarray) -> np.ndarray:
        """The fine voxel at each output voxel's centre (for codes, depth and sectors)."""
        k = np.clip(np.floor((self.centre - self.base) / self.step).astype(np.intp), 0, self.m - 1)
        return np.take_along_axis(vol, k, axis=0)


def resample(anat: Anatomy, masks: dict[str, np.ndarray], fine: Frame, out: Frame) -> tuple[Anatomy, dict]:
    """The tilted series ``out`` from the thin slices ``fine`` it was drawn on: HU as slab means, tissue
    codes, depth and sectors at each slab's centre, and a voxel of blood where blood fills at least
    ``MASK_FRACTION`` of its slab. Masks of later paint already exclude what they cover, so they stay
    disjoint up to voxels that two kinds of blood share half and half."""
    slabs = _Slabs(fine, out)
    hu = slabs.mean(anat.hu)
    new_masks = {s: (slabs.mean(masks[s].astype(np.float32)) >= MASK_FRACTION) if masks[s].any()
                 else np.zeros(hu.shape, bool) for s in SUBTYPES}
    res = Anatomy(hu=hu, tissue=slabs.nearest(anat.tissue), depth=slabs.nearest(anat.depth),
                  sector=slabs.nearest(anat.sector), cerebrum=slabs.nearest(anat.cerebrum), side_x=anat.side_x,
                  sulcal_effacement=None, tissue0=slabs.nearest(anat.tissue0))
    return res, new_masks
