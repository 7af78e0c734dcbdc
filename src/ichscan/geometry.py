"""Slice geometry in the patient coordinate system (DICOM LPS, mm): one home for the slice normal, the
position along it, the stack's tilt and the plane's obliquity, and the tolerances that decide them.

What highdicom's ``spatial`` module does for volumes, kept to what ichscan needs: ingest sorts and checks
series with it, selection judges obliquity with it, and prediction and the training index record slice
positions with it, so all of them agree. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

# Slices whose normals differ by more than this are not one stack (a localizer, a reformat, a re-scan).
ORIENTATION_TOLERANCE_DEG = 1.0
# Positions along the normal equal to this many decimals (1 um) are the same position: slices can't be
# ordered by them.
POSITION_DECIMALS = 3


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal (row x column direction cosines of ImageOrientationPatient), turned so that its largest
    component is positive: axial stacks then run inferior to superior whatever the scanner's row order.
    All zeros for a degenerate orientation."""
    o = np.asarray(orientation, dtype=float)
    n = np.cross(o[:3], o[3:])
    norm = np.linalg.norm(n)
    if norm == 0:
        return n
    n = n / norm
    return -n if n[np.argmax(np.abs(n))] < 0 else n


def series_normal(orientations: Iterable[Sequence[float] | None]) -> np.ndarray | None:
    """The normal of the first usable orientation (slices of an assembled series agree within the
    tolerance); None when no slice has one."""
    for orientation in orientations:
        if orientation is not None:
            n = slice_normal(orientation)
            if np.linalg.norm(n) > 0:
                return n
    return None


def same_plane(a: np.ndarray, b: np.ndarray, tolerance_deg: float = ORIENTATION_TOLERANCE_DEG) -> bool:
    """Whether two unit normals describe parallel planes (either direction) within ``tolerance_deg``."""
    return abs(float(a @ b)) >= math.cos(math.radians(tolerance_deg))


def position_along(position: Sequence[float], normal: np.ndarray | None) -> float:
    """Where a slice lies along ``normal`` in mm (its patient z for an axial slice). Without a usable
    normal, the position's z: the best guess for the axial scans this tool reads."""
    if normal is None or not np.any(normal):
        return float(position[2])
    return float(np.dot(position, normal))


def stack_tilt_degrees(first: Sequence[float], last: Sequence[float], normal: np.ndarray) -> float:
    """Angle between the stacking direction (first to last slice position) and the slice normal: the
    gantry tilt of a tilted acquisition, 0 for a straight stack."""
    d = np.subtract(last, first)
    cos = min(1.0, abs(float(d @ normal)) / float(np.linalg.norm(d)))
    return round(math.degrees(math.acos(cos)), 3)


def obliquity_degrees(orientation: Sequence[float]) -> float:
    """Angle between the slice normal and the patient's head-foot axis: 0 for axial, 90 for sagittal or
    coronal slices."""
    normal = slice_normal(orientation)
    return float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))


# Spacings within this of each other are one spacing (scanners write positions to 0.01 mm or so).
SPACING_TOLERANCE_MM = 0.05


def spacing_summary(z: Sequence[float] | np.ndarray | None, thicknesses: Iterable[float | None] = ()) -> dict:
    """How a stack is sampled along its normal, from slice positions ``z`` (sorted) and thicknesses:
    ``spacing`` (min, median, max distance between neighbours, mm), ``thickness`` (min, max), and the
    warnings a reader needs: ``uneven`` (spacing differs by more than SPACING_TOLERANCE_MM along the
    stack, e.g. 4 mm then 7 mm) and ``overlap_mm`` (how far the thickest slice exceeds the smallest
    spacing, when slices overlap: common in overlapping reconstructions, but then neighbours share data)
    and ``gap_mm`` (how far the largest spacing exceeds the thinnest slice: tissue between slices unseen)."""
    t = [float(x) for x in thicknesses if x is not None and x > 0]
    out: dict = {"spacing": None, "thickness": (min(t), max(t)) if t else None, "uneven": False,
                 "overlap_mm": None, "gap_mm": None}
    if z is None or len(z) < 2:
        return out
    d = np.abs(np.diff(np.asarray(z, dtype=float)))
    lo, mid, hi = float(d.min()), float(np.median(d)), float(d.max())
    out["spacing"] = (lo, mid, hi)
    out["uneven"] = hi - lo > SPACING_TOLERANCE_MM
    if t:
        if max(t) - lo > SPACING_TOLERANCE_MM:
            out["overlap_mm"] = round(max(t) - lo, 3)
        if hi - min(t) > SPACING_TOLERANCE_MM:
            out["gap_mm"] = round(hi - min(t), 3)
    return out


# Two series are reconstructions of one scan (a soft-tissue and a bone kernel, thin and thick slices) when they
# share study, frame of reference (where both name one) and plane within this many degrees, and their z ranges
# overlap by this share of the shorter one or more.
SAME_SCAN_PLANE_DEG = 5.0
SAME_SCAN_Z_OVERLAP = 0.5


def same_scan(a, b) -> bool:
    """Whether series ``a`` and ``b`` (``ichscan.dicom.CTSeries``) are reconstructions of one scan: the same
    study, the same frame of reference where both name one, the same plane (normals within
    ``SAME_SCAN_PLANE_DEG``) and z ranges that overlap by ``SAME_SCAN_Z_OVERLAP`` of the shorter one. Series
    without geometry are never the same scan."""
    if not a.slices or not b.slices or str(a.study_uid) != str(b.study_uid):
        return False
    fa = getattr(a.slices[0], "frame_of_reference_uid", "")
    fb = getattr(b.slices[0], "frame_of_reference_uid", "")
    if fa and fb and fa != fb:
        return False
    na, nb = a.slices[0].normal, b.slices[0].normal
    if na is None or nb is None or not same_plane(na, nb, SAME_SCAN_PLANE_DEG):
        return False
    za, zb = a.z, b.z
    if za is None or zb is None:
        return False
    a0, a1, b0, b1 = float(za.min()), float(za.max()), float(zb.min()), float(zb.max())
    overlap = min(a1, b1) - max(a0, b0)
    shorter = min(a1 - a0, b1 - b0)
    return bool(overlap >= SAME_SCAN_Z_OVERLAP * shorter) if shorter > 0 else bool(overlap >= 0)
