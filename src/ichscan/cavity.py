"""The cranial cavity of one axial CT slice, found without labels, and a slice cut down to it.

A model that sees only what the skull encloses cannot learn anything from the scalp, the face, the head
holder or the background, which differ from scanner to scanner and from phantom to patient far more than
the brain does (docs/phantom.md, "Realism, measured": a small CNN tells phantom slices from real ones at
AUC 0.99+ on whole slices, about 0.8 inside the cavity). Every hemorrhage ichscan classifies lies inside it:
epidural and subdural blood between the brain and the inner table, the rest within the brain and its
spaces. A model trained with ``Window(..., region="cavity")`` channels (``ichscan.windows``) sees each slice
through ``cut_to_cavity``: the cavity as it is, every other pixel air (-1000 HU).

How the cavity is found (``cavity_mask``): bone is HU above ``bone_hu``; on a grid of about ``grid_mm``
(a block counts as bone when any of its pixels is) gaps in the bone up to about 2 x ``close_mm`` wide
(sutures, foramina, a fracture line) are closed; the regions of non-bone that do not reach the image's
border are what the bone encloses. The cavity is every enclosed region of at least ``min_part_mm2``
whose median HU is brain-like (the posterior and both middle cranial fossae at the skull base; not the
sinuses, mastoid cells or orbits, nor the air between a head and a ring-shaped holder), each with its
holes filled (calcified pineal gland, choroid plexus and falx lie inside it), provided the largest of
them has ``min_area_mm2``. The grid's edge is then refined at full resolution: pixels within one block of
it that are not bone join it, so blood against the inner table is kept to the pixel. About 19 ms for a
512 x 512 slice on one core.

Where the skull has a gap wider than that (a displaced fracture, a bone flap, a craniectomy), a slice
with plenty of brain density but no cavity is tried again with wider closings (16, then 24 mm), and last
with the convex hull of its skull (the bone within the head) as the enclosure, kept only where three
quarters of what it encloses is brain or blood. Limits, said plainly: a wide closing trims concave
stretches of the cavity's edge, and the hull cuts off brain that bulges out through a defect beyond the
chord across it (and takes in the orbits and sinuses where it is used at the skull base). Slices below
the skull base and above the vertex have no cavity.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BONE_HU", "BRAIN_HU", "CAVITY_HU", "cavity_mask", "cut_to_cavity", "enclosed_by_bone"]

BONE_HU = 300.0  # above it: bone (the inner table, even partial-volumed on thick slices, reads higher)
CAVITY_HU = (0.0, 100.0)  # median HU of an enclosed region that is brain (or blood), not air, fat or bone
AIR_HU = -1000.0
TISSUE_HU = -300.0  # above it: the head (scalp fat included), below it air
BRAIN_HU = (15.0, 45.0)  # grey and white matter
HULL_FILL = 0.75  # a cavity found by the skull's hull must be this much brain or blood (part_hu), not scalp or air
BRAIN_AREA_MM2 = 5000.0  # brain density on a slice through the cerebrum: a disc of 80 mm and more


def _blocks_above(hu: np.ndarray, spacing: tuple[float, float], threshold: float, grid_mm: float
                  ) -> tuple[np.ndarray, tuple[float, float], int]:
    """Blocks of k x k pixels (about ``grid_mm``), True where any of a block's pixels is above ``threshold``:
    (grid, its (row, column) spacing in mm, k)."""
    h, w = hu.shape
    k = max(1, int(round(grid_mm / min(spacing))))
    ph, pw = -(-h // k) * k, -(-w // k) * k
    full = np.zeros((ph, pw), bool)
    full[:h, :w] = hu > threshold
    bone = full[::k, ::k].copy()
    for i in range(k):
        for j in range(k):
            bone |= full[i::k, j::k]
    return bone, (float(spacing[0]) * k, float(spacing[1]) * k), k


def enclosed_by_bone(hu: np.ndarray, spacing: tuple[float, float], *, bone_hu: float = BONE_HU,
                     close_mm: float = 8.0, grid_mm: float = 1.0
                     ) -> tuple[np.ndarray, tuple[float, float], int] | None:
    """Non-bone regions the bone encloses, on a grid of blocks of k x k pixels (about ``grid_mm``):
    (bool grid, the grid's (row, column) spacing in mm, k), or None when the slice has no bone. Gaps in
    the bone up to about 2 x ``close_mm`` are closed first (a closing by distance transforms)."""
    bone, sampling, k = _blocks_above(hu, spacing, bone_hu, grid_mm)
    if not bone.any():
        return None
    return _enclosed(bone, sampling, close_mm), sampling, k


def _enclosed(bone: np.ndarray, sampling: tuple[float, float], close_mm: float) -> np.ndarray:
    """Grid cells of non-bone that do not reach the border once gaps up to about 2 x ``close_mm`` are closed."""
    from scipy import ndimage as ndi

    dilated = ndi.distance_transform_edt(~bone, sampling=sampling) <= close_mm
    closed = (ndi.distance_transform_edt(dilated, sampling=sampling) > close_mm) | bone  # closing
    labels, _ = ndi.label(~closed)
    border = np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return ~closed & ~np.isin(labels, border)


def _inside_hull(bone: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Grid cells inside the convex hull of the skull and not bone themselves; the skull is the bone within
    the head (the largest piece of ``tissue``, holes filled), so that a head holder or a table is not. All
    False when there is too little bone, or it is too straight, to have a hull."""
    from scipy import ndimage as ndi
    from scipy.spatial import ConvexHull, QhullError

    labels, n = ndi.label(tissue)
    if n == 0:
        return np.zeros(bone.shape, bool)
    head = ndi.binary_fill_holes(labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1)
    points = np.argwhere(bone & head).astype(np.float64)
    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):
        return np.zeros(bone.shape, bool)
    rows, cols = np.mgrid[:bone.shape[0], :bone.shape[1]]
    grid = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)
    inside = np.all(grid @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9, axis=1)
    return inside.reshape(bone.shape) & ~bone


def cavity_mask(hu: np.ndarray, spacing: tuple[float, float], *, bone_hu: float = BONE_HU,
                close_mm: float = 8.0, wider_close_mm: tuple[float, ...] = (16.0, 24.0),
                min_brain_mm2: float = BRAIN_AREA_MM2, min_area_mm2: float = 500.0,
                min_part_mm2: float = 150.0, part_hu: tuple[float, float] = CAVITY_HU,
                grid_mm: float = 1.0) -> np.ndarray:
    """The cranial cavity of one slice (HU (H, W), pixel spacing (row, column) in mm): a bool (H, W)
    mask, all False where no enclosed region of ``min_area_mm2`` is found. See the module's docstring.

    A slice that holds at least ``min_brain_mm2`` of brain density (``BRAIN_HU``) but no cavity at
    ``close_mm`` (a fracture or defect wider than the closing bridges) is tried again with each of
    ``wider_close_mm`` in turn, and last with the convex hull of its bone as what encloses."""
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"expected one (H, W) slice, got shape {hu.shape}")
    if spacing is None or len(spacing) != 2 or min(spacing) <= 0:
        raise ValueError(f"the cavity needs the pixel spacing in mm, got {spacing!r}")
    keep = dict(bone_hu=bone_hu, min_area_mm2=min_area_mm2, min_part_mm2=min_part_mm2, part_hu=part_hu)
    bone, sampling, k = _blocks_above(hu, spacing, bone_hu, grid_mm)
    if not bone.any():
        return np.zeros(hu.shape, bool)
    mask = _keep_cavity(hu, _enclosed(bone, sampling, close_mm), sampling, k, **keep)
    if mask.any():
        return mask
    brain = np.count_nonzero((hu >= BRAIN_HU[0]) & (hu <= BRAIN_HU[1])) * float(spacing[0]) * float(spacing[1])
    if brain < min_brain_mm2:
        return mask  # below the skull base, above the vertex: nothing to look for
    for wider in wider_close_mm:
        mask = _keep_cavity(hu, _enclosed(bone, sampling, wider), sampling, k, **keep)
        if mask.any():
            return mask
    tissue, _, _ = _blocks_above(hu, spacing, TISSUE_HU, grid_mm)
    mask = _keep_cavity(hu, _inside_hull(bone, tissue), sampling, k, **keep)
    share = np.count_nonzero((hu[mask] >= part_hu[0]) & (hu[mask] <= part_hu[1])) / max(1, mask.sum())
    return mask if share >= HULL_FILL else np.zeros(hu.shape, bool)


def _keep_cavity(hu: np.ndarray, inside: np.ndarray, sampling: tuple[float, float], k: int, *, bone_hu: float,
                 min_area_mm2: float, min_part_mm2: float, part_hu: tuple[float, float]) -> np.ndarray:
    """From the enclosed grid cells ``inside``, the regions of at least ``min_part_mm2`` whose median HU lies
    in ``part_hu`` (brain or blood, not air or fat), each with its holes filled, when the largest of them has
    ``min_area_mm2``; at full resolution with the edge refined. Empty otherwise."""
    from scipy import ndimage as ndi

    empty = np.zeros(hu.shape, bool)
    labels, n = ndi.label(inside)
    if n == 0:
        return empty
    h, w = hu.shape
    sizes = np.bincount(labels.ravel())[1:] * (sampling[0] * sampling[1])
    small = np.zeros(inside.shape, bool)
    largest = 0.0
    for part in np.argsort(-sizes) + 1:
        if sizes[part - 1] < min_part_mm2:
            break
        region = ndi.binary_fill_holes(labels == part)
        if region[small].any():
            continue  # inside a region kept already (its holes are filled)
        up = np.repeat(np.repeat(region, k, axis=0), k, axis=1)[:h, :w]
        if not part_hu[0] <= float(np.median(hu[up])) <= part_hu[1]:
            continue  # air cells, sinuses, orbits, the air between a head and a holder: enclosed, but not brain
        largest = max(largest, float(sizes[part - 1]))
        small |= region
    if largest < min_area_mm2:
        return empty
    mask = np.repeat(np.repeat(small, k, axis=0), k, axis=1)[:h, :w]
    # the grid's edge sits up to a block inside the bone: the pixels between, where they are not bone, join it
    edge = ndi.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=k) & ~mask
    return mask | (edge & (hu <= bone_hu))


def cut_to_cavity(hu: np.ndarray, spacing: tuple[float, float], **kwargs) -> np.ndarray:
    """HU with every pixel outside ``cavity_mask`` set to air (-1000 HU); float32, same shape."""
    hu = np.asarray(hu, dtype=np.float32)
    return np.where(cavity_mask(hu, spacing, **kwargs), hu, np.float32(AIR_HU))
