"""How far ichscan's synthetic head CT is from real head CT, as numbers; prints one JSON object.

    .venv/bin/python bench/realism.py [--realct ../shared/realct] [--phantoms 41] [--out realism.json]

Real CT comes from outside the repository (``--realct``, see its README.md): ``ctich-dev`` (41 real series
kept as windowed 8-bit JPGs; its ``ctich_to_dicom.py`` rebuilds approximate HU as DICOM under ``--work``)
and ``ge-normal`` (one real DICOM series). Phantoms are drawn afresh by ``ichscan.phantom.generate_dataset``
on every run (they are what is measured, so they must come from the code as it is). Every source is read
the same way: ``ichscan.dicom.find_series`` -> ``CTSeries.volume()`` (HU) -> the measures below, and
``ichscan.windows.window_image`` for the discriminator, so nothing differs but the source.

* ``intracranial_hu``: per slice an intracranial mask made without labels (``intracranial_mask``), pooled
  HU histograms per source; Wasserstein and Jensen-Shannon distances over -20..100 HU (1 HU bins), and
  each source's median, 5th/95th percentiles and share of intracranial pixels in 50-90 HU.
* ``inner_table``: the width of the brain-to-bone transition at the inner table along rays (partial volume
  of the vault cut obliquely), by third of each series: median, 90th percentile, share of rays >= 3 mm.
* ``vault``: the vault's width and peak HU along rays from the intracranial mask's centroid (the first run
  of bone, over 300 HU, beyond it), by third of each series and by direction in the image (straight ahead,
  the sides, straight back): at the discriminator's 128 px a thin bone is grey, a thick one white.
* ``scalp``: the median HU by millimetre in from the skin (the head's edge) along rays where bone lies
  under it, by third of each series: the skin, the fat under it and the vault.
* ``small_bands``: each slice at the discriminator's size (HU resized as its windows are), the share of its
  pixels at -20..20 HU (skin, soft tissue), 130..229 (thin, partial-volumed bone: grey in every paper
  window) and 230 up; per mille by third, and the AUC of each share alone for phantom against ctich-dev
  slices (and the GE head against ctich-dev): one-number tells a person can read.
* ``nps``: noise power spectrum from flat brain patches (fully inside the mask, mean 15-45 HU, a fitted
  plane subtracted), radially averaged in cycles/mm (PixelSpacing); noise std, mean frequency, peak
  frequency and the distance between the normalised curves.
* ``discriminator``: the headline. Out-of-fold ROC AUC of classifiers telling phantom slices from
  ctich-dev slices, folds grouped by patient (none in both train and test), classes balanced: a small CNN
  on the three paper windows, and logistic regression on per-slice hand features (histogram quantiles,
  noise). 0.5: indistinguishable; 1.0: trivially told apart. Each is also reported within the lower,
  middle and upper third of the series (``oof_auc_by_level``: skull base, mid-brain, vertex), to show where
  phantoms and real heads differ most. ``cnn.where``: where in the slice the CNN found each slice's own
  class (Grad-CAM of each fold's model on its test slices), as shares of its evidence in the intracranial
  mask, the band of vault and scalp around it, the rest of the body and the air, beside the share of the
  image each covers; ``--cam-picture PNG`` draws it over a few slices per class and third. ``repeats``: both
  discriminators run again on the same slices with other fold and weight seeds (``--repeats``, default 3),
  their AUCs' mean, SD and range: how far a change must move them to be more than their own noise (also
  for their scoring of the GE head, ``logreg_unseen`` and ``cnn_unseen``, below).

``ge-normal`` enters the histogram and NPS comparisons (reported separately, and against ctich-dev as a
real-versus-real yardstick). No discriminator trains on it: each fold's models score its slices, unseen
(``unseen_real``), which says whether a discriminator that tells phantoms from ctich-dev tells them from
another real scanner too, or has learnt one site's images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from ichscan.cavity import enclosed_by_bone
from ichscan.windows import AIR_HU, PAPER_WINDOWS, resize_keep_aspect, window_image

log = logging.getLogger("bench.realism")

REPO = Path(__file__).resolve().parent.parent

HIST_LOW, HIST_HIGH = -100, 200  # intracranial HU kept by the mask; histograms in 1 HU bins over this range
COMPARE_RANGE = (-20, 100)  # where ctich-dev's HU come from the brain-window JPG (about 0.5 HU a grey level)
NPS_BIN = 0.05  # cycles/mm, width of the radial bins
CRANIUM_MM = 20.0  # --cnn-region cranium: reach beyond the (3 mm eroded) mask: inner table, vault, scalp
NPS_MAX = 1.5  # cycles/mm, last radial bin edge (above every Nyquist met here: 0.35 mm pixels -> 1.43)
MID_F = 0.25  # cycles/mm: above it, the patches' power is mostly noise, below it mostly anatomy
HIGH_F = 0.5  # cycles/mm: the fine-grain noise texture (reconstruction kernel, JPEG)
SLICE_NPS_FMAX = 0.7  # cycles/mm: per-slice NPS features use only frequencies every source resolves
FEATURES = ("hu_q05", "hu_q25", "hu_q50", "hu_q75", "hu_q95", "share_50_90", "noise_std", "nps_centroid")


# ------------------------------------------------------------------------------------------ the measures


def intracranial_mask(hu: np.ndarray, spacing: tuple[float, float], *, bone_hu: float = 300.0,
                      close_mm: float = 8.0, erode_mm: float = 3.0, keep: tuple[float, float] = (HIST_LOW, HIST_HIGH),
                      min_area_mm2: float = 500.0, grid_mm: float = 1.0) -> np.ndarray:
    """Pixels inside the skull, without labels: the largest region the bone (> ``bone_hu``) encloses, after
    closing gaps up to about 2 x ``close_mm`` wide (sutures, foramina) and eroding ``erode_mm`` off the
    inner table (partial volume), keeping HU in ``keep``; empty when no region of ``min_area_mm2`` is enclosed.
    The shape is found on a grid of about ``grid_mm`` (blocks of pixels; bone wherever a block holds some),
    so it costs the same at any matrix and its edge is good to about one block."""
    empty = np.zeros(hu.shape, bool)
    found = enclosed_by_bone(hu, spacing, bone_hu=bone_hu, close_mm=close_mm, grid_mm=grid_mm)
    if found is None:
        return empty
    inside, sampling, k = found
    h, w = hu.shape
    inside = ndi.distance_transform_edt(inside, sampling=sampling) > erode_mm
    labels, n = ndi.label(inside)
    if n == 0:
        return empty
    sizes = np.bincount(labels.ravel())[1:]
    biggest = int(np.argmax(sizes)) + 1
    if sizes[biggest - 1] * sampling[0] * sampling[1] < min_area_mm2:
        return empty
    region = np.repeat(np.repeat(labels == biggest, k, axis=0), k, axis=1)[:h, :w]
    return region & (hu >= keep[0]) & (hu <= keep[1])


INNER_TABLE_RAYS = 90
INNER_TABLE_STEP_MM = 0.5
INNER_TABLE_WIDE_MM = 3.0


def inner_table_widths(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float], *,
                       rays: int = INNER_TABLE_RAYS, step_mm: float = INNER_TABLE_STEP_MM,
                       brain_below: float = 60.0, bone_above: float = 300.0) -> np.ndarray:
    """Width (mm) of the brain-to-bone transition at the inner table on ``rays`` rays out from the centroid of
    ``mask`` (the intracranial pixels): on each, from the last sample below ``brain_below`` HU to the first
    above ``bone_above`` HU, sampled every ``step_mm`` (nearest pixel). A thick slice that cuts the vault
    obliquely widens it: partial volume of bone along the inner table, the band a model can read as a
    thin extra-axial collection. Rays that meet no bone, or no brain before it, give nothing; empty without
    a mask."""
    if not mask.any():
        return np.zeros(0)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    reach = np.hypot(*hu.shape) * min(spacing)
    r = np.arange(0.0, reach, step_mm)
    out = []
    for ang in np.linspace(0, 2 * np.pi, rays, endpoint=False):
        py = np.rint(cy + np.sin(ang) * r / spacing[0]).astype(int)
        px = np.rint(cx + np.cos(ang) * r / spacing[1]).astype(int)
        keep = (py >= 0) & (py < hu.shape[0]) & (px >= 0) & (px < hu.shape[1])
        prof = hu[py[keep], px[keep]]
        bone = np.nonzero(prof > bone_above)[0]
        if not len(bone):
            continue
        brain = np.nonzero(prof[:bone[0]] < brain_below)[0]
        if len(brain):
            out.append((bone[0] - brain[-1]) * step_mm)
    return np.asarray(out, float)


VAULT_RAYS = 36
VAULT_STEP_MM = 0.25
# directions in the image (radians from +x, rows growing backwards in a head scanned face up): within 30
# degrees of straight ahead, of either side, of straight back
VAULT_SECTORS = {"front": (1.5 * np.pi,), "sides": (0.0, np.pi), "back": (0.5 * np.pi,)}
VAULT_SECTOR_HALF = np.pi / 6


def _rays(shape: tuple[int, int], centre: tuple[float, float], spacing: tuple[float, float], rays: int,
          step_mm: float):
    """For each of ``rays`` angles (radians from +x) out from ``centre`` (row, column): the angle and the
    fractional (row, column) of its samples every ``step_mm`` (PixelSpacing's mm) while they lie in the image."""
    cy, cx = centre
    r = np.arange(0.0, np.hypot(*shape) * min(spacing), step_mm)
    for ang in np.linspace(0, 2 * np.pi, rays, endpoint=False):
        py, px = cy + np.sin(ang) * r / spacing[0], cx + np.cos(ang) * r / spacing[1]
        keep = (py >= 0) & (py <= shape[0] - 1) & (px >= 0) & (px <= shape[1] - 1)
        yield ang, py[keep], px[keep]


def vault_widths(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float], *, rays: int = VAULT_RAYS,
                 step_mm: float = VAULT_STEP_MM, bone_above: float = 300.0) -> np.ndarray:
    """(ray angle in radians, width in mm, peak HU) of the vault on ``rays`` rays out from the centroid of
    ``mask`` (the intracranial pixels): the first run of samples over ``bone_above`` HU once the ray has
    left the mask, sampled every ``step_mm`` (bilinear). A ray that meets no bone gives nothing; a run still
    open at the image's edge is not a vault and gives nothing. (0, 3) without a mask."""
    if not mask.any():
        return np.zeros((0, 3))
    ys, xs = np.nonzero(mask)
    out = []
    for ang, py, px in _rays(hu.shape, (ys.mean(), xs.mean()), spacing, rays, step_mm):
        inside = mask[np.rint(py).astype(int), np.rint(px).astype(int)]
        left = np.nonzero(inside)[0]
        if not len(left):
            continue
        prof = ndi.map_coordinates(hu.astype(np.float32), [py, px], order=1)[left[-1]:]
        bone = np.nonzero(prof > bone_above)[0]
        if not len(bone):
            continue
        end = np.nonzero(prof[bone[0]:] <= bone_above)[0]
        if not len(end):
            continue
        run = prof[bone[0]:bone[0] + end[0]]
        out.append((ang, end[0] * step_mm, float(run.max())))
    return np.asarray(out, float).reshape(-1, 3)


def vault_sector(angles: np.ndarray) -> np.ndarray:
    """Each angle's ``VAULT_SECTORS`` name ('' between them)."""
    names = np.full(np.shape(angles), "", dtype=object)
    for name, centres in VAULT_SECTORS.items():
        for c in centres:
            off = np.abs((np.asarray(angles) - c + np.pi) % (2 * np.pi) - np.pi)
            names[off <= VAULT_SECTOR_HALF] = name
    return names


def vault_summary(slices: list) -> dict:
    """Per third of the series (``LEVEL_BANDS``) and direction (``VAULT_SECTORS``): rays, the 10th, 25th,
    50th and 75th percentiles of the vault's width (mm) and the median peak HU, from (level, rays) per slice
    (``vault_widths``' rows)."""
    out = {}
    for k, band in enumerate(LEVEL_BANDS):
        rows = [v for lv, v in slices if level_third(lv) == k and len(v)]
        rows = np.concatenate(rows) if rows else np.zeros((0, 3))
        sector = vault_sector(rows[:, 0])
        out[band] = {}
        for name in VAULT_SECTORS:
            sel = rows[sector == name]
            out[band][name] = ({"rays": int(len(sel)),
                                "width_mm_p10_p25_p50_p75": [round(float(q), 2) for q in
                                                             np.percentile(sel[:, 1], [10, 25, 50, 75])],
                                "peak_hu_median": round(float(np.median(sel[:, 2])), 1)} if len(sel) else None)
    return out


SCALP_RAYS = 72
SCALP_STEP_MM = 0.5
SCALP_DEPTH_MM = 8.0  # how far in from the skin the profile reads
SCALP_BONE_MM = 12.0  # a ray counts only if bone (> 400 HU) lies within this of the skin: scalp over the vault


def scalp_profiles(hu: np.ndarray, spacing: tuple[float, float], *, rays: int = SCALP_RAYS,
                   step_mm: float = SCALP_STEP_MM, depth_mm: float = SCALP_DEPTH_MM,
                   bone_mm: float = SCALP_BONE_MM) -> np.ndarray:
    """HU (bilinear) every ``step_mm`` from the skin inwards, to ``depth_mm``, on ``rays`` rays out from the
    centre of the head (the largest region over -300 HU, holes filled): the skin is the ray's last sample in
    that region. Only rays with bone (over 400 HU) within ``bone_mm`` of the skin count (the scalp over the
    vault, not the face, neck or ears). (k, depth_mm / step_mm + 1); (0, ...) without a head."""
    n = int(round(depth_mm / step_mm)) + 1
    body, count = ndi.label(hu > -300)
    if count == 0:
        return np.zeros((0, n))
    body = ndi.binary_fill_holes(body == 1 + int(np.argmax(np.bincount(body.ravel())[1:])))
    out = []
    for _, py, px in _rays(hu.shape, ndi.center_of_mass(body), spacing, rays, step_mm):
        inside = np.nonzero(body[np.rint(py).astype(int), np.rint(px).astype(int)])[0]
        if len(inside) == 0 or inside[-1] < n:
            continue
        prof = ndi.map_coordinates(hu.astype(np.float32), [py, px], order=1)
        edge = inside[-1]
        if not (prof[edge - int(round(bone_mm / step_mm)):edge + 1] > 400).any():
            continue
        out.append(prof[edge - np.arange(n)])
    return np.asarray(out, float).reshape(-1, n)


def scalp_summary(slices: list) -> dict:
    """Per third of the series (``LEVEL_BANDS``): rays and the median HU at each ``SCALP_STEP_MM`` in from
    the skin, from (level, ``scalp_profiles`` rows) per slice."""
    out = {}
    for k, band in enumerate(LEVEL_BANDS):
        rows = [p for lv, p in slices if level_third(lv) == k and len(p)]
        out[band] = ({"rays": int(sum(len(p) for p in rows)),
                      "median_hu": [round(float(v), 1) for v in np.median(np.concatenate(rows), axis=0)]}
                     if rows else None)
    steps = int(round(SCALP_DEPTH_MM / SCALP_STEP_MM)) + 1
    out["mm_in_from_skin"] = [round(i * SCALP_STEP_MM, 2) for i in range(steps)]
    return out


# HU bands counted on each slice at the discriminator's scale, each [low, high) so that the resized (no longer
# whole) HU fall in one band or between bands only where a gap is meant: soft tissue and skin, partial-volumed
# bone (every paper window is white from 230 HU up, so thin bone is what shows grey), and bone.
SMALL_BANDS = {"-20_to_20": (-20.0, 20.5), "130_to_229": (130.0, 230.0), "230_up": (230.0, np.inf)}


def small_band_shares(hu: np.ndarray, size: int) -> list[float]:
    """The slice's HU resized to ``size`` as ``window_image`` resizes a window (longer side to ``size``,
    bilinear, padded with air), and the share of all its pixels in each of ``SMALL_BANDS``: what the
    discriminator's input holds of each, as one number per band."""
    small = resize_keep_aspect(np.asarray(hu, np.float32), int(size), float(AIR_HU))
    return [float(((small >= lo) & (small < hi)).mean()) for lo, hi in SMALL_BANDS.values()]


def _slice_auc(a: np.ndarray, b: np.ndarray) -> float | None:
    """AUC of one per-slice number for ``a``'s slices (positive) against ``b``'s; None if either is empty."""
    if not (len(a) and len(b)):
        return None
    return round(float(roc_auc_score(np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b])), 3)


def small_band_summary(sources: list, reference: str = "ctich_dev") -> dict:
    """Per source and third of the series: the mean per mille of pixels in each band; and for each other
    source, the AUC of that one number per slice for the source against ``reference`` (0.5: no tell; below
    0.5: the source holds fewer such pixels), all slices and by third."""
    by = {}
    for s in sources:  # per source: (all slices, then each third) -> the slices' band shares
        v = np.array(s.small_bands, float).reshape(-1, len(SMALL_BANDS))
        thirds = level_third(np.array(s.levels, float))
        by[s.name] = {"all": v, **{t: v[thirds == k] for k, t in enumerate(LEVEL_BANDS)}}
    out = {"per_mille": {name: {band: {part: round(1000 * float(v[:, j].mean()), 1) if len(v) else None
                                       for part, v in parts.items()}
                                for j, band in enumerate(SMALL_BANDS)}
                         for name, parts in by.items()},
           f"auc_against_{reference}": {}}
    ref = by.get(reference)
    for name, parts in by.items():
        if ref is None or name == reference:
            continue
        out[f"auc_against_{reference}"][name] = {
            band: {part: _slice_auc(v[:, j], ref[part][:, j]) for part, v in parts.items()}
            for j, band in enumerate(SMALL_BANDS)}
    return out


CAVITY_BANDS = ((0.0, 0.0), (0.0, 40.0), (40.0, 100.0), (100.0, np.inf))  # cm2 of intracranial mask


def cavity_band_names() -> list[str]:
    return ["none" if hi == 0 else f"{lo:g}-{hi:g}cm2" if np.isfinite(hi) else f">={lo:g}cm2"
            for lo, hi in CAVITY_BANDS]


def inner_table_summary(slices: list) -> dict:
    """Median, 90th percentile and share of rays at least ``INNER_TABLE_WIDE_MM`` wide, per third of the
    series (``LEVEL_BANDS``) and, under ``by_cavity_area``, per band of intracranial area (``CAVITY_BANDS``
    with a mask: slices alike in brain content whatever stretch of the head the series cover), from
    (level, intracranial cm2, widths) per slice."""
    def stats(w):
        w = np.concatenate(w or [np.zeros(0)])
        return ({"rays": int(w.size), "median_mm": float(np.median(w)), "p90_mm": float(np.percentile(w, 90)),
                 "share_wide": round(float(np.mean(w >= INNER_TABLE_WIDE_MM)), 4)} if w.size else None)

    out = {name: stats([ws for lv, _, ws in slices if level_third(lv) == k]) for k, name in enumerate(LEVEL_BANDS)}
    out["by_cavity_area"] = {name: stats([ws for _, a, ws in slices if lo < a <= hi])
                             for (lo, hi), name in zip(CAVITY_BANDS, cavity_band_names()) if hi > 0}
    return out


def detrend_plane(patches: np.ndarray) -> np.ndarray:
    """(n, p, q) -> the same with each patch's least-squares plane a + b*y + c*x subtracted. On a full grid
    the centred coordinates and the constant are orthogonal, so the fit is three projections."""
    _, h, w = patches.shape
    y = np.arange(h) - (h - 1) / 2
    x = np.arange(w) - (w - 1) / 2
    p = patches.astype(np.float64)
    p = p - p.mean(axis=(1, 2), keepdims=True)
    p = p - np.einsum("nij,i->n", p, y)[:, None, None] * y[None, :, None] / (w * (y ** 2).sum())
    return p - np.einsum("nij,j->n", p, x)[:, None, None] * x[None, None, :] / (h * (x ** 2).sum())


def flat_patches(hu: np.ndarray, mask: np.ndarray, size: int = 64, mean_range=(15.0, 45.0)) -> np.ndarray:
    """Non-overlapping ``size`` x ``size`` patches on a grid, fully inside ``mask`` with mean HU in
    ``mean_range`` (brain, not CSF or blood-bright regions), detrended by a fitted plane: (n, size, size)."""
    h, w = hu.shape
    out = []
    for y in range(0, h - size + 1, size):
        for x in range(0, w - size + 1, size):
            if mask[y:y + size, x:x + size].all():
                p = hu[y:y + size, x:x + size]
                if mean_range[0] <= p.mean() <= mean_range[1]:
                    out.append(p)
    if not out:
        return np.zeros((0, size, size))
    return detrend_plane(np.stack(out))


def nps_2d(patches: np.ndarray, spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean 2-D noise power spectrum of zero-mean patches (n, ny, nx), in HU^2 mm^2, with the frequency
    axes (cycles/mm, numpy's FFT order): NPS = dy dx / (ny nx) |DFT|^2, so that summing it over all
    frequencies times df_y df_x = 1 / (ny dy nx dx) gives the variance (Parseval)."""
    _, ny, nx = patches.shape
    dy, dx = float(spacing[0]), float(spacing[1])
    power = np.abs(np.fft.fft2(patches)) ** 2
    nps = power.mean(axis=0) * dy * dx / (ny * nx)
    return nps, np.fft.fftfreq(ny, dy), np.fft.fftfreq(nx, dx)


def radial_bins(nps: np.ndarray, fy: np.ndarray, fx: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of the 2-D NPS in radial frequency bins (``edges``, cycles/mm), leaving out zero
    frequency (the detrending removed it) and the corners beyond the Nyquist of the coarser axis."""
    f = np.hypot(fy[:, None], fx[None, :])
    nyquist = min(np.abs(fy).max(), np.abs(fx).max())
    keep = (f > 0) & (f <= nyquist + 1e-9)
    idx = np.digitize(f[keep], edges) - 1
    ok = (idx >= 0) & (idx < len(edges) - 1)
    sums = np.bincount(idx[ok], weights=nps[keep][ok], minlength=len(edges) - 1)
    counts = np.bincount(idx[ok], minlength=len(edges) - 1).astype(float)
    return sums, counts


def curve_summary(f: np.ndarray, nps: np.ndarray) -> dict:
    """Mean frequency (centroid of the 1-D radial NPS, as AAPM TG-233's f_av) and peak frequency."""
    ok = np.isfinite(nps)
    f, nps = f[ok], nps[ok]
    if nps.sum() <= 0:
        return {"centroid_cpmm": None, "peak_cpmm": None}
    return {"centroid_cpmm": round(float((f * nps).sum() / nps.sum()), 4),
            "peak_cpmm": round(float(f[np.argmax(nps)]), 4)}


def hist_stats(counts: np.ndarray, low: int = HIST_LOW) -> dict:
    """Median, 5th/95th percentile and share in 50-90 HU of integer-HU counts starting at ``low``."""
    total = counts.sum()
    if total == 0:
        return {"pixels": 0, "median_hu": None, "p5_hu": None, "p95_hu": None, "share_50_90": None,
                "share_per_5hu_-20_to_100": None}
    hu = np.arange(low, low + len(counts))
    cdf = np.cumsum(counts) / total
    q = lambda p: float(hu[np.searchsorted(cdf, p)])  # noqa: E731  (integer data: exact)
    band = counts[(hu >= 50) & (hu <= 90)].sum()
    sel = (hu >= COMPARE_RANGE[0]) & (hu < COMPARE_RANGE[1])
    density = np.add.reduceat(counts[sel], np.arange(0, sel.sum(), 5)) / max(1, counts[sel].sum())
    return {"pixels": int(total), "median_hu": q(0.5), "p5_hu": q(0.05), "p95_hu": q(0.95),
            "share_50_90": round(float(band / total), 5),
            "share_per_5hu_-20_to_100": [round(float(v), 4) for v in density]}


def hist_distance(a: np.ndarray, b: np.ndarray, low: int = HIST_LOW, rng=COMPARE_RANGE) -> dict:
    """Wasserstein (HU) and Jensen-Shannon (base 2, 0..1) distances between two integer-HU histograms
    restricted to ``rng``; JS also with 5 HU bins, which averages out 8-bit quantisation combs."""
    hu = np.arange(low, low + len(a))
    sel = (hu >= rng[0]) & (hu <= rng[1])
    a, b, hu = a[sel].astype(float), b[sel].astype(float), hu[sel]
    if a.sum() == 0 or b.sum() == 0:
        return {"wasserstein_hu": None, "js_distance": None, "js_distance_5hu_bins": None}
    coarse = lambda c: np.add.reduceat(c, np.arange(0, len(c), 5))  # noqa: E731
    return {"wasserstein_hu": round(float(wasserstein_distance(hu, hu, a, b)), 3),
            "js_distance": round(float(jensenshannon(a, b, base=2)), 4),
            "js_distance_5hu_bins": round(float(jensenshannon(coarse(a), coarse(b), base=2)), 4)}


# ----------------------------------------------------------------------------------------- one source


@dataclass
class SourceStats:
    """What one source contributes: pooled histogram and NPS, per-slice features and windowed images."""

    name: str
    series: int = 0
    slices: int = 0
    slices_with_mask: int = 0
    spacings: list = field(default_factory=list)
    matrices: set = field(default_factory=set)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_HIGH - HIST_LOW + 1, np.int64))
    nps_sum: np.ndarray = field(default_factory=lambda: np.zeros(int(round(NPS_MAX / NPS_BIN))))
    nps_count: np.ndarray = field(default_factory=lambda: np.zeros(int(round(NPS_MAX / NPS_BIN))))
    patches: int = 0
    patch_var_sum: float = 0.0
    min_nyquist: float = np.inf
    features: list = field(default_factory=list)
    images: dict = field(default_factory=dict)  # running slice index -> (3, size, size) uint8
    regions: dict = field(default_factory=dict)  # running slice index -> (size, size) uint8 region_labels
    groups: list = field(default_factory=list)
    levels: list = field(default_factory=list)  # each slice's place in its series: 0 first (lowest), 1 last
    cavity_cm2: list = field(default_factory=list)  # each slice's intracranial mask area
    ends_cm2: list = field(default_factory=list)  # per series, (first, last) slice's head_section_cm2
    inner_table: list = field(default_factory=list)  # (level, cavity cm2, widths in mm) of the slices with a mask
    vault: list = field(default_factory=list)  # (level, vault_widths rows) of the slices with a mask
    scalp: list = field(default_factory=list)  # (level, scalp_profiles rows) of the slices with a mask
    small_bands: list = field(default_factory=list)  # each slice's small_band_shares, in ``levels``' order


def slice_features(inside: np.ndarray, patches: np.ndarray, f: np.ndarray, profile: np.ndarray) -> list[float]:
    """The hand features of one slice (``FEATURES``) from its intracranial HU, its flat patches and their
    radial NPS ``profile`` at bin centres ``f``; NaN where the slice has no mask or no flat patch."""
    if inside.size:
        q = np.percentile(inside, [5, 25, 50, 75, 95]).tolist()
        share = float(((inside >= 50) & (inside <= 90)).mean())
    else:
        q, share = [np.nan] * 5, np.nan
    if len(patches):
        low = f <= SLICE_NPS_FMAX  # frequencies every source resolves: the centroid must not see the Nyquist
        centroid = curve_summary(f[low], profile[low])["centroid_cpmm"]
        noise = [float(np.sqrt(patches.var(axis=(1, 2)).mean())), np.nan if centroid is None else centroid]
    else:
        noise = [np.nan, np.nan]
    return [*q, share, *noise]


def around(mask: np.ndarray, spacing: tuple[float, float], mm: float) -> np.ndarray:
    """``mask`` grown by ``mm`` (Euclidean, in PixelSpacing's millimetres); empty when ``mask`` is."""
    if not mask.any():
        return mask.copy()
    return ndi.distance_transform_edt(~mask, sampling=(float(spacing[0]), float(spacing[1]))) <= mm


def region_view(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float], region: str,
                cranium_mm: float = CRANIUM_MM) -> np.ndarray:
    """What the CNN discriminator is shown of a slice (HU): ``whole``; ``intracranial``, the intracranial
    mask's pixels and 0 HU elsewhere; ``cranium``, everything within ``cranium_mm`` of that mask (the cranial
    contents, the inner table's edge, the vault and the scalp over it) and air (-1000 HU) beyond (face,
    head holder, background); ``cavity``, exactly what a model trained with ``--region cavity`` sees
    (``ichscan.cavity.cut_to_cavity``: the cranial cavity, not eroded, air elsewhere). A slice without a
    mask (or cavity) is all 0 HU or all air."""
    if region == "whole":
        return hu
    if region == "cavity":
        from ichscan.cavity import cut_to_cavity

        return cut_to_cavity(hu, spacing)
    if region == "intracranial":
        return np.where(mask, hu, 0.0)
    if region == "cranium":
        return np.where(around(mask, spacing, cranium_mm), hu, -1000.0)
    raise ValueError(f"unknown region {region!r}")


REGIONS = ("air", "outside_cranium", "cranium_band", "intracranial")  # region_labels' codes 0..3
BODY_HU = -300.0  # region_labels: denser than this is body (or head holder), not air


def region_labels(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float], size: int,
                  cranium_mm: float = CRANIUM_MM) -> np.ndarray:
    """Each pixel's region (codes index ``REGIONS``), resized like ``window_image`` to ``size``: 3 the
    intracranial mask; 2 the band within ``cranium_mm`` of it (the 3 mm under the inner table, the vault,
    the scalp, and the air just beyond the skin); 1 anything else denser than ``BODY_HU`` (face, neck, skull
    base and scalp of slices without a mask, head holder); 0 air. Where the CNN's evidence lies."""
    from PIL import Image

    lab = (hu > BODY_HU).astype(np.uint8)
    lab[around(mask, spacing, cranium_mm)] = 2
    lab[mask] = 3
    return np.asarray(Image.fromarray(lab).resize((size, size), Image.NEAREST))


def scan_source(name: str, series_list, *, patch: int, image_size: int = 128, window_at=(),
                region: str = "whole", cranium_mm: float = CRANIUM_MM) -> SourceStats:
    """Read ``series_list`` (``CTSeries``) through ichscan and accumulate the measures; the slices whose
    running index is in ``window_at`` are also kept as the three paper windows at ``image_size``, of the
    region ``region_view`` names: the whole slice, the cranial contents alone, or the cranium (contents,
    vault and scalp) without what lies beyond, to ask where phantoms give themselves away."""
    st = SourceStats(name)
    window_at = set(int(i) for i in window_at)
    edges = np.arange(0, NPS_MAX + NPS_BIN / 2, NPS_BIN)
    f = (edges[:-1] + edges[1:]) / 2
    t0 = time.perf_counter()
    for k, series in enumerate(series_list):
        spacing = series.pixel_spacing or (1.0, 1.0)
        vol = series.volume()
        st.series += 1
        st.spacings.append(float(spacing[0]))
        st.matrices.add(f"{vol.shape[1]}x{vol.shape[2]}")
        for i, hu in enumerate(vol):
            hu = np.rint(hu)
            mask = intracranial_mask(hu, spacing)
            inside = hu[mask]
            st.slices_with_mask += bool(inside.size)
            st.hist += np.bincount((inside - HIST_LOW).astype(np.int64), minlength=len(st.hist))
            ps = flat_patches(hu, mask, patch)
            profile = np.full(len(f), np.nan)
            if len(ps):
                s, c = radial_bins(*nps_2d(ps, spacing), edges)
                profile[c > 0] = s[c > 0] / c[c > 0]
                # the pooled curve is a mean per patch: each slice's profile weighs as many patches as it has
                st.nps_sum += np.nan_to_num(profile) * len(ps)
                st.nps_count += len(ps) * (c > 0)
                st.patches += len(ps)
                st.patch_var_sum += float(ps.var(axis=(1, 2)).sum())
                st.min_nyquist = min(st.min_nyquist, 1 / (2 * max(spacing)))
            st.features.append(slice_features(inside, ps, f, profile))
            st.groups.append(f"{name}:{series.patient_id}")
            st.levels.append(i / max(len(vol) - 1, 1))
            st.small_bands.append(small_band_shares(hu, image_size))
            st.cavity_cm2.append(float(mask.sum()) * float(spacing[0]) * float(spacing[1]) / 100.0)
            if inside.size:
                st.inner_table.append((st.levels[-1], st.cavity_cm2[-1], inner_table_widths(hu, mask, spacing)))
                st.vault.append((st.levels[-1], vault_widths(hu, mask, spacing)))
                st.scalp.append((st.levels[-1], scalp_profiles(hu, spacing)))
            if st.slices in window_at:
                shown = region_view(hu, mask, spacing, region, cranium_mm)
                st.images[st.slices] = window_image(shown, PAPER_WINDOWS, image_size, np.uint8)
                st.regions[st.slices] = region_labels(hu, mask, spacing, image_size, cranium_mm)
            st.slices += 1
        st.ends_cm2.append((head_section_cm2(vol[0], spacing), head_section_cm2(vol[-1], spacing)))
        log.info("%s: series %d/%d, %d slices, %.0f s", name, k + 1, len(series_list), st.slices,
                 time.perf_counter() - t0)
    return st


def head_section_cm2(hu: np.ndarray, spacing: tuple[float, float]) -> float:
    """Area of the largest connected region above ``BODY_HU`` (the head's section; a head holder's arc or a
    cable is smaller), cm2: how far up or down the head a slice lies, whatever its place in its series."""
    lab, n = ndi.label(hu > BODY_HU)
    if not n:
        return 0.0
    return float(np.bincount(lab.ravel())[1:].max()) * float(spacing[0]) * float(spacing[1]) / 100.0


def source_summary(st: SourceStats) -> dict:
    """Counts and geometry of a source; ``coverage``: the head's section on each series' first (lowest) and
    last slice, median and quartiles, so that one sees whether sources cover the same stretch of the head
    (a series that ends at the vertex ends on a small section, one that stops short of it on a large one)."""
    sp = np.array(st.spacings) if st.spacings else np.array([np.nan])
    ends = np.array(st.ends_cm2, float).reshape(-1, 2)

    def quartiles(v):
        return [round(float(q), 1) for q in np.percentile(v, [25, 50, 75])] if len(v) else None

    return {"series": st.series, "patients": len(set(st.groups)), "slices": st.slices,
            "slices_with_intracranial_mask": st.slices_with_mask,
            "coverage": {"first_slice_head_cm2_q25_q50_q75": quartiles(ends[:, 0]),
                         "last_slice_head_cm2_q25_q50_q75": quartiles(ends[:, 1])},
            "pixel_spacing_mm": {"min": round(float(sp.min()), 4), "median": round(float(np.median(sp)), 4),
                                 "max": round(float(sp.max()), 4)},
            "matrices": sorted(st.matrices)}


def nps_curve(st: SourceStats) -> tuple[np.ndarray, np.ndarray]:
    f = np.arange(len(st.nps_sum)) * NPS_BIN + NPS_BIN / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return f, np.where(st.nps_count > 0, st.nps_sum / np.maximum(st.nps_count, 1), np.nan)


def nps_source(st: SourceStats) -> dict:
    """A source's pooled NPS up to the Nyquist of its coarsest series (finer series add the bins above)."""
    f, curve = nps_curve(st)
    own = f <= st.min_nyquist
    return {"patches": st.patches,
            "noise_std_hu": round(float(np.sqrt(st.patch_var_sum / st.patches)), 3) if st.patches else None,
            "nyquist_cpmm_coarsest_series": round(float(st.min_nyquist), 4) if st.patches else None,
            **curve_summary(f[own], curve[own]),
            "curve": {"f_cpmm": [round(float(v), 3) for v in f[own]],
                      "nps_hu2mm2": [None if not np.isfinite(v) else round(float(v), 4) for v in curve[own]]}}


def nps_distance(a: SourceStats, b: SourceStats) -> dict:
    """Both curves (pairs: [a, b]) on the bins both resolve (up to the lower Nyquist), each normalised to
    unit area: total-variation distance (0 same shape, 1 disjoint); each one's centroid and peak there, share
    of power above 0.5 cycles/mm, noise std above 0.25 cycles/mm, and the ratio of their total power."""
    f, ca = nps_curve(a)
    _, cb = nps_curve(b)
    common = (f <= min(a.min_nyquist, b.min_nyquist)) & np.isfinite(ca) & np.isfinite(cb)
    if not common.any():
        return {"common_max_cpmm": None}
    f, ca, cb = f[common], ca[common], cb[common]
    na, nb = ca / ca.sum(), cb / cb.sum()
    high, mid = f > HIGH_F, f > MID_F

    def ring_std(c):  # the 2-D NPS integrated over the ring MID_F..common_max: noise with little anatomy
        return round(float(np.sqrt((c[mid] * 2 * np.pi * f[mid] * NPS_BIN).sum())), 3)

    return {"common_max_cpmm": round(float(f.max() + NPS_BIN / 2), 3),
            "tv_distance": round(float(0.5 * np.abs(na - nb).sum()), 4),
            "centroid_cpmm": [curve_summary(f, ca)["centroid_cpmm"], curve_summary(f, cb)["centroid_cpmm"]],
            "peak_cpmm": [curve_summary(f, ca)["peak_cpmm"], curve_summary(f, cb)["peak_cpmm"]],
            "power_share_above_0.5_cpmm": [round(float(na[high].sum()), 4), round(float(nb[high].sum()), 4)],
            "noise_std_above_0.25_cpmm_hu": [ring_std(ca), ring_std(cb)],
            "power_ratio": round(float(ca.sum() / cb.sum()), 3)}


# -------------------------------------------------------------------------------------- discriminators


def grouped_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds with every group (patient) wholly in train or in test."""
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(y)), y, groups))


LEVEL_BANDS = ("lower_third", "middle_third", "upper_third")


def level_third(levels):
    """Which of ``LEVEL_BANDS`` each place in its series (0 lowest slice, 1 highest) falls in: 0, 1 or 2
    (the top slice counts as upper)."""
    return np.minimum((np.asarray(levels) * 3).astype(int), 2)


def auc_report(scores: np.ndarray, y: np.ndarray, splits, brain: np.ndarray | None = None,
               levels: np.ndarray | None = None, cavity: np.ndarray | None = None) -> dict:
    """AUC of the pooled out-of-fold scores, and per fold; with ``brain`` (a mask of slices), also the
    pooled AUC over those slices alone; with ``levels`` (each slice's place in its series, 0 lowest to 1
    highest), the pooled AUC within each third of the series (skull base, middle, vertex), so that one
    sees where the sources differ most; with ``cavity`` (each slice's intracranial mask in cm2), within each
    of ``CAVITY_BANDS``: slices alike in how much brain they hold, whatever stretch of the head each
    source's series cover. Same scores throughout, no retraining."""
    fold = [round(float(roc_auc_score(y[te], scores[te])), 4) for _, te in splits if len(set(y[te])) == 2]
    out = {"oof_auc": round(float(roc_auc_score(y, scores)), 4), "fold_aucs": fold}
    if brain is not None and len(set(y[brain])) == 2:
        out["oof_auc_slices_with_intracranial_mask"] = round(float(roc_auc_score(y[brain], scores[brain])), 4)
    if levels is not None:
        by_level = {}
        third = level_third(levels)
        for k, name in enumerate(LEVEL_BANDS):
            band = third == k
            if len(set(y[band])) == 2:
                by_level[name] = {"oof_auc": round(float(roc_auc_score(y[band], scores[band])), 4),
                                  "slices": {"positive": int(y[band].sum()), "negative": int((1 - y[band]).sum())}}
        out["oof_auc_by_level"] = by_level
    if cavity is not None:
        cavity = np.asarray(cavity, float)
        by_area = {}
        for (lo, hi), name in zip(CAVITY_BANDS, cavity_band_names()):
            band = (cavity == 0) if hi == 0 else (cavity > lo) & (cavity <= hi)
            entry = {"slices": {"positive": int(y[band].sum()), "negative": int((1 - y[band]).sum())}}
            if len(set(y[band])) == 2:
                entry["oof_auc"] = round(float(roc_auc_score(y[band], scores[band])), 4)
            by_area[name] = entry
        out["oof_auc_by_cavity_area"] = by_area
    return out


def logreg_oof(features: np.ndarray, y: np.ndarray, splits, extra: np.ndarray | None = None):
    """Out-of-fold probabilities of a standardised logistic regression (missing features: train median).
    With ``extra`` (features of slices in no fold), also the mean over the folds' models of each one's
    probability: ``(scores, extra_scores)``."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = np.zeros(len(y))
    unseen = np.zeros(0 if extra is None else len(extra))
    for tr, te in splits:
        model = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                              LogisticRegression(max_iter=2000))
        model.fit(features[tr], y[tr])
        scores[te] = model.predict_proba(features[te])[:, 1]
        if extra is not None:
            unseen += model.predict_proba(extra)[:, 1] / len(splits)
    return scores if extra is None else (scores, unseen)


def small_cnn(in_channels: int = 3, widths=(16, 32, 64, 64)):
    """Four conv blocks (3x3 conv, batch norm, ReLU, 2x2 max pool; the first conv strided, so 128 px costs
    what 64 px would), global average pool, one logit."""
    import torch.nn as nn

    layers, c = [], in_channels
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, stride=2 if i == 0 else 1, padding=1, bias=False), nn.BatchNorm2d(w),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1), nn.Flatten(0))


def cnn_oof(images: np.ndarray, y: np.ndarray, splits, *, seed: int, epochs: int = 3, batch: int = 32,
            lr: float = 2e-3, threads: int = 1, cam: bool = False, cam_blocks: int = 2,
            extra: np.ndarray | None = None):
    """Out-of-fold logits of ``small_cnn`` trained per fold from scratch (seeded; horizontal flips), on
    ``threads`` CPU threads (one is faster than two on a machine whose cores are busy). With ``cam``, also
    each slice's out-of-fold ``grad_cam`` map towards its own class, read ``cam_blocks`` conv blocks in (a
    map of side/2^(cam_blocks+1) cells): ``(scores, maps)``. With ``extra`` (images in no fold), also the
    mean over the folds' models of each one's logit: ``(what it returns without, extra_scores)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scores, maps, unseen = _cnn_oof(images, y, splits, seed, epochs, batch, lr, cam_blocks if cam else 0,
                                        extra)
    finally:
        torch.set_num_threads(before)
    out = (scores, maps) if cam else scores
    return out if extra is None else (out, unseen)


CAM_BLOCKS = 2  # grad_cam's default: the second conv block's output, a 16x16 map of 8x8 px cells at 128 px


def grad_cam(model, x, sign, blocks: int = CAM_BLOCKS):
    """Grad-CAM (Selvaraju et al. 2017) of ``small_cnn`` at ``blocks`` conv blocks in: for each image, the
    ReLU of that block's feature maps weighted by the spatial mean of their gradient of ``sign`` x logit
    (+1: evidence for phantom, -1: for real), so each map shows where the model found its image's own
    class. (N, h, w) float, not normalised."""
    import torch

    cut = 4 * blocks  # conv, batch norm, ReLU, pool per block
    with torch.enable_grad():
        feats = model[:cut](x).detach().requires_grad_(True)
        (model[cut:](feats) * sign).sum().backward()
        weights = feats.grad.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * feats).sum(1)).detach()


def _as_input(x):
    """uint8 windows -> the CNN's input: 0..1, then centred at 0.5 and scaled by 4."""
    return x.float().div_(255.0).sub_(0.5).div_(0.25)


def _cells_to_pixels(maps: np.ndarray, scale: int) -> np.ndarray:
    """Each cell of (..., h, w) maps spread over the ``scale`` x ``scale`` pixels it covers."""
    return np.repeat(np.repeat(maps, scale, axis=-2), scale, axis=-1)


def _cnn_oof(images, y, splits, seed, epochs, batch, lr, cam_blocks=0, extra=None):
    import torch

    x_all = torch.from_numpy(np.ascontiguousarray(images))
    x_extra = None if extra is None else torch.from_numpy(np.ascontiguousarray(extra))
    unseen = np.zeros(0 if extra is None else len(extra))
    y_all = torch.from_numpy(y.astype(np.float32))
    scores = np.zeros(len(y))
    cam = cam_blocks > 0
    side = images.shape[-1] // 2 ** (cam_blocks + 1)
    maps = np.zeros((len(y), side, side), np.float32) if cam else None
    for k, (tr, te) in enumerate(splits):
        torch.manual_seed(seed * 1000 + k)
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        model = small_cnn(images.shape[1])
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * max(1, -(-len(tr) // batch))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        tr_t = torch.from_numpy(tr)
        model.train()
        for _ in range(epochs):
            for idx in tr_t[torch.randperm(len(tr_t), generator=gen)].split(batch):
                x = _as_input(x_all[idx])
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x[flip] = x[flip].flip(-1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.inference_mode():
            te_t = torch.from_numpy(te)
            out = [model(_as_input(x_all[i])) for i in te_t.split(256)]
            scores[te] = torch.cat(out).numpy()
            if x_extra is not None:
                unseen += torch.cat([model(_as_input(x)) for x in x_extra.split(256)]).numpy() / len(splits)
        if cam:
            for i in te_t.split(256):
                sign = y_all[i] * 2 - 1
                maps[i.numpy()] = grad_cam(model, _as_input(x_all[i]), sign, cam_blocks).numpy()
        log.info("cnn fold %d/%d: test AUC %.3f", k + 1, len(splits),
                 roc_auc_score(y[te], scores[te]) if len(set(y[te])) == 2 else float("nan"))
    return scores, maps, unseen


def unseen_real_report(scores: np.ndarray, y: np.ndarray, unseen: np.ndarray, name: str,
                       brain: np.ndarray | None = None, unseen_brain: np.ndarray | None = None) -> dict:
    """How a phantom-vs-real discriminator reads real slices of a source it never trained on (``unseen``:
    the folds' mean score of each; higher = more phantom-like). ``auc_phantom_vs_it``: the out-of-fold
    phantom slices against them, the discriminator's AUC as it would be had that source been the real
    class; ``auc_real_vs_it``: the out-of-fold real slices against them, 0.5 where the unseen source
    looks to it like the real one it learnt, 1.0 where it reads it as wholly unlike (it separates one
    site's images, not real from synthetic). ``share_above_median_phantom``: how many unseen slices score
    above the median out-of-fold phantom slice. With ``brain`` and ``unseen_brain`` (slices with an
    intracranial mask), the same over those slices alone."""
    def block(s, yy, u):
        ph, re = s[yy == 1], s[yy == 0]
        return {"slices": int(len(u)),
                "auc_phantom_vs_it": round(float(roc_auc_score(np.r_[np.ones(len(ph)), np.zeros(len(u))],
                                                               np.r_[ph, u])), 4),
                "auc_real_vs_it": round(float(roc_auc_score(np.r_[np.ones(len(u)), np.zeros(len(re))],
                                                            np.r_[u, re])), 4),
                "share_above_median_phantom": round(float((u > np.median(ph)).mean()), 4)}

    report = {"source": name, **block(scores, y, unseen)}
    if brain is not None and unseen_brain is not None and unseen_brain.any() and len(set(y[brain])) == 2:
        report["slices_with_intracranial_mask"] = block(scores[brain], y[brain], unseen[unseen_brain])
    return report


def cam_summary(maps: np.ndarray, regions: np.ndarray, y: np.ndarray, levels: np.ndarray) -> dict:
    """Where the CNN's out-of-fold evidence lies (``grad_cam`` maps, each cell spread over the pixels it
    covers), by class and third of the series: the mean share of each slice's map in each of ``REGIONS``,
    against the mean share of the image each region covers (evidence spread evenly would give the same);
    slices whose map is all zero are left out and counted."""
    scale = regions.shape[-1] // maps.shape[-1]
    up = _cells_to_pixels(maps, scale)
    total = up.sum(axis=(1, 2))
    used = total > 0
    mass = np.stack([(up * (regions == r)).sum(axis=(1, 2)) for r in range(len(REGIONS))], 1)
    mass = mass / np.where(used, total, 1)[:, None]
    area = np.stack([(regions == r).mean(axis=(1, 2)) for r in range(len(REGIONS))], 1)
    third = level_third(levels)
    out = {}
    for cls, name in ((1, "phantom"), (0, "ctich_dev")):
        by = {}
        for k, band in [(None, "all"), *enumerate(LEVEL_BANDS)]:
            sel = (y == cls) & used & (True if k is None else third == k)
            if sel.any():
                by[band] = {"slices": int(sel.sum()),
                            "evidence_share": {r: round(float(mass[sel, i].mean()), 3) for i, r in enumerate(REGIONS)},
                            "area_share": {r: round(float(area[sel, i].mean()), 3) for i, r in enumerate(REGIONS)}}
        out[name] = {"by_level": by, "slices_without_evidence": int(((y == cls) & ~used).sum())}
    return out


def write_cam_pictures(path: Path, images: np.ndarray, maps: np.ndarray, y: np.ndarray, levels: np.ndarray,
                       per_row: int = 8, zoom: int = 2) -> None:
    """One PNG: a row per class and third of the series (phantom lower, middle, upper; then ctich-dev), each
    with ``per_row`` slices spread evenly over it, the soft-tissue window in grey with the slice's own
    ``grad_cam`` map (scaled to its maximum) in red over it."""
    from PIL import Image, ImageDraw

    size = images.shape[-1] * zoom
    scale = images.shape[-1] // maps.shape[-1]
    third = level_third(levels)
    label_w = 110
    rows = [(cls, k) for cls in (1, 0) for k in range(len(LEVEL_BANDS))]
    sheet = Image.new("RGB", (label_w + per_row * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (cls, k) in enumerate(rows):
        idx = np.flatnonzero((y == cls) & (third == k))
        draw.text((4, r * size + 4), f"{'phantom' if cls else 'ctich-dev'}\n{LEVEL_BANDS[k]}", fill="black")
        for c, i in enumerate(idx[evenly(len(idx), per_row)] if len(idx) else []):
            grey = images[i, -1].astype(np.float32)
            heat = _cells_to_pixels(maps[i], scale)
            heat = heat / heat.max() if heat.max() > 0 else heat
            a = 0.6 * heat
            rgb = np.stack([grey * (1 - a) + 255 * a, grey * (1 - a), grey * (1 - a)], -1)
            tile = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
            sheet.paste(tile, (label_w + c * size, r * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def repeat_spread(feats: np.ndarray, images: np.ndarray | None, y: np.ndarray, groups: np.ndarray, *, folds: int,
                  seed: int, n: int, epochs: int, threads: int, first: dict, unseen: dict | None = None) -> dict:
    """The discriminators' own run-to-run spread on the same slices: ``n`` runs in all, the first the one
    already made (its AUCs in ``first``), each other with folds and CNN weights seeded ``seed + r``. Not the
    spread over phantom draws (the phantoms are the same), so a change smaller than this is noise for sure,
    and one somewhat larger may still be. With ``unseen`` ({"features", "images"} of a real source in no
    fold) and ``first`` holding "logreg_unseen" / "cnn_unseen", the same for ``unseen_real_report``'s
    ``auc_phantom_vs_it`` (as "logreg_unseen", "cnn_unseen")."""
    runs = {"logreg": [first["logreg"]], "cnn": [first["cnn"]] if images is not None else []}
    if unseen is not None:
        runs["logreg_unseen"] = [first["logreg_unseen"]]
        runs["cnn_unseen"] = [first["cnn_unseen"]] if images is not None else []
    for r in range(1, n):
        splits = grouped_folds(y, groups, folds, seed + r)
        if unseen is None:
            lr = logreg_oof(feats, y, splits)
        else:
            lr, u = logreg_oof(feats, y, splits, extra=unseen["features"])
            runs["logreg_unseen"].append(unseen_real_report(lr, y, u, "")["auc_phantom_vs_it"])
        runs["logreg"].append(round(float(roc_auc_score(y, lr)), 4))
        if images is not None:
            got = cnn_oof(images, y, splits, seed=seed + r, epochs=epochs, threads=threads,
                          extra=None if unseen is None else unseen["images"])
            scores = got if unseen is None else got[0]
            if unseen is not None:
                runs["cnn_unseen"].append(unseen_real_report(scores, y, got[1], "")["auc_phantom_vs_it"])
            runs["cnn"].append(round(float(roc_auc_score(y, scores)), 4))
    out = {"runs": n, "seeds": [seed + r for r in range(n)]}
    for name, aucs in runs.items():
        if aucs:
            out[name] = {"oof_auc": aucs, "mean": round(float(np.mean(aucs)), 4),
                         "sd": round(float(np.std(aucs, ddof=1)), 4), "range": [min(aucs), max(aucs)]}
    return out


def evenly(n: int, k: int) -> np.ndarray:
    """``k`` indices spread evenly over ``range(n)`` (all of them when k >= n)."""
    return np.arange(n) if k >= n else np.round(np.linspace(0, n - 1, k)).astype(int)


# ------------------------------------------------------------------------------------------------ main


def generator_identity() -> dict:
    """The git commit, whether src/ differs from it, and a hash of the phantom package's sources as they
    ran (other work may sit uncommitted in the tree)."""
    import ichscan.phantom

    digest = hashlib.sha1()
    root = Path(ichscan.phantom.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())

    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = {"commit": git("rev-parse", "HEAD") or None,
                  "src_modified": bool(git("status", "--porcelain", "--", "src"))}
    except (OSError, subprocess.SubprocessError):
        commit = {"commit": None, "src_modified": None}
    return {**commit, "phantom_code_sha1": digest.hexdigest()[:12]}


def ctich_dicom(realct: Path, work: Path) -> Path:
    """ctich-dev as DICOM under ``work`` (converted once with the script beside the data)."""
    out = work / "ctich-dev"
    if not (out / "series_labels.csv").exists():
        log.info("converting ctich-dev to DICOM in %s", out)
        subprocess.run([sys.executable, str(realct / "ctich_to_dicom.py"), str(out)], check=True,
                       stdout=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realct", type=Path, default=REPO.parent / "shared" / "realct",
                    help="real CT folder (default: ../shared/realct beside the repository)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ichscan-bench-realism",
                    help="where ctich-dev's DICOM (kept) and the phantoms (removed after) are written")
    ap.add_argument("--phantoms", type=int, default=41, help="phantom series (default 41, as ctich-dev)")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed; also folds and CNN weights")
    ap.add_argument("--phantom-size", type=int, default=512, help="phantom matrix (default 512)")
    ap.add_argument("--image-size", type=int, default=128, help="discriminator input size (default 128)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3, help="CNN epochs per fold (default 3)")
    ap.add_argument("--per-class", type=int, default=600,
                    help="slices per class for the discriminators, spread evenly (default 600; 0: all the "
                         "smaller class has)")
    ap.add_argument("--nps-patch", type=int, default=64, help="NPS patch side in pixels (default 64)")
    ap.add_argument("--pitch", type=float, default=0.0,
                    help="draw the phantoms with tilted scan planes (ichscan phantom --pitch DEG; default untilted)")
    ap.add_argument("--calcification", type=float, default=0.0,
                    help="draw that share of phantoms as adult heads with physiological calcification (ichscan "
                         "phantom --calcification; default 0)")
    ap.add_argument("--export", type=float, default=0.0,
                    help="store that share of phantoms as windowed 8-bit JPEGs rebuilt to HU (ichscan phantom "
                         "--export; default 0)")
    ap.add_argument("--children", type=float, default=0.0,
                    help="draw that share of phantom patients as children of 2-17 years (ichscan phantom --children; "
                         "default 0)")
    ap.add_argument("--workers", type=int, default=1, help="phantom generator processes (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="CNN training threads (default 1)")
    ap.add_argument("--no-cnn", action="store_true", help="only the logistic-regression discriminator")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of the discriminators on the same slices with other fold and weight seeds, for "
                         "their run-to-run spread (default 3, about 20 s a CNN run; 1: none)")
    ap.add_argument("--cnn-region", choices=("whole", "intracranial", "cranium", "cavity"), default="whole",
                    help="what the CNN sees: the whole slice (default), only the intracranial mask's pixels, "
                         "the cranium: everything within --cranium-mm of that mask, air beyond; or the cavity: "
                         "what a model trained with --region cavity sees")
    ap.add_argument("--cranium-mm", type=float, default=CRANIUM_MM,
                    help=f"reach of --cnn-region cranium beyond the intracranial mask (default {CRANIUM_MM:g} mm)")
    ap.add_argument("--cam-picture", type=Path,
                    help="also write a PNG of slices with where the CNN found each one's class (Grad-CAM)")
    ap.add_argument("--cam-blocks", type=int, choices=(1, 2, 3), default=CAM_BLOCKS,
                    help=f"conv blocks in at which Grad-CAM reads the CNN (default {CAM_BLOCKS}: 14 mm cells on a "
                         "head at 128 px; 1: 7 mm cells, finer and less sure of the class)")
    ap.add_argument("--keep-phantoms", action="store_true", help="leave the phantoms in --work")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ichscan").setLevel(logging.ERROR)

    import ichscan
    from ichscan.phantom import generate_dataset

    realct = args.realct.resolve()
    if not (realct / "ctich-dev").is_dir():
        sys.exit(f"no ctich-dev under {realct}: pass --realct (the folder with README.md, ctich-dev, ge-normal)")
    t_start = time.perf_counter()
    seconds = {}
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ctich_dir = ctich_dicom(realct, args.work)
    seconds["ctich_to_dicom"] = round(time.perf_counter() - t, 1)

    phantom_dir = args.work / f"phantoms-seed{args.seed}"
    shutil.rmtree(phantom_dir, ignore_errors=True)
    identity = generator_identity()  # the code that draws them, before anything can change it under a long run
    t = time.perf_counter()
    log.info("generating %d phantom series at %d px", args.phantoms, args.phantom_size)
    generate_dataset(phantom_dir, studies=args.phantoms, seed=args.seed, size=args.phantom_size, workers=args.workers,
                     pitch=args.pitch, calcification=args.calcification, export=args.export,
                     children=args.children)
    seconds["phantoms"] = round(time.perf_counter() - t, 1)

    from ichscan.dicom import find_series

    try:
        t = time.perf_counter()
        found = {"phantom": find_series(phantom_dir).series, "ctich_dev": find_series(ctich_dir).series}
        ge_dir = realct / "ge-normal"
        if ge_dir.is_dir():
            found["ge_normal"] = find_series(ge_dir).series
        # Discriminator: phantom (1) vs ctich-dev (0), the same evenly spread slices of each for both models,
        # chosen from the headers so that only those are windowed.
        n_p, n_r = (sum(len(s) for s in found[k]) for k in ("phantom", "ctich_dev"))
        per_class = min(n_p, n_r) if args.per_class <= 0 else min(args.per_class, n_p, n_r)
        pick_p, pick_r = evenly(n_p, per_class), evenly(n_r, per_class)
        img = dict(patch=args.nps_patch, image_size=args.image_size)
        phantom = scan_source("phantom", found["phantom"], window_at=() if args.no_cnn else pick_p,
                              region=args.cnn_region, cranium_mm=args.cranium_mm, **img)
        real = scan_source("ctich_dev", found["ctich_dev"], window_at=() if args.no_cnn else pick_r,
                           region=args.cnn_region, cranium_mm=args.cranium_mm, **img)
        ge = None
        if "ge_normal" in found:  # every slice windowed too: the discriminators score it, unseen (unseen_real)
            n_ge = sum(len(s) for s in found["ge_normal"])
            ge = scan_source("ge_normal", found["ge_normal"], window_at=() if args.no_cnn else range(n_ge),
                             region=args.cnn_region, cranium_mm=args.cranium_mm, **img)
        seconds["read_and_measure"] = round(time.perf_counter() - t, 1)
    finally:
        if not args.keep_phantoms:
            shutil.rmtree(phantom_dir, ignore_errors=True)
    sources = [s for s in (phantom, real, ge) if s is not None]
    pairs = [(phantom, real), (phantom, ge), (real, ge)] if ge else [(phantom, real)]

    y = np.r_[np.ones(per_class), np.zeros(per_class)].astype(int)
    groups = np.array([phantom.groups[i] for i in pick_p] + [real.groups[i] for i in pick_r])
    splits = grouped_folds(y, groups, args.folds, args.seed)
    feats = np.array([phantom.features[i] for i in pick_p] + [real.features[i] for i in pick_r], float)
    t = time.perf_counter()
    levels = np.array([phantom.levels[i] for i in pick_p] + [real.levels[i] for i in pick_r], float)
    cavity = np.array([phantom.cavity_cm2[i] for i in pick_p] + [real.cavity_cm2[i] for i in pick_r], float)
    brain = cavity > 0  # slices whose intracranial mask is not empty
    ge_brain = None if ge is None else np.array(ge.cavity_cm2) > 0
    ge_images = None if ge is None or args.no_cnn else np.stack([ge.images[i] for i in range(ge.slices)])
    if ge is None:
        lr_scores = logreg_oof(feats, y, splits)
    else:
        lr_scores, ge_lr = logreg_oof(feats, y, splits, extra=np.array(ge.features, float))
    lr_report = auc_report(lr_scores, y, splits, brain, levels, cavity)
    if ge is not None:
        lr_report["unseen_real"] = unseen_real_report(lr_scores, y, ge_lr, ge.name, brain, ge_brain)
    seconds["logreg"] = round(time.perf_counter() - t, 1)
    disc = {"task": "phantom (positive) vs ctich-dev slices; folds grouped by patient, stratified",
            "slices_per_class": per_class,
            "patients": {"phantom": len(set(groups[y == 1])), "ctich_dev": len(set(groups[y == 0]))},
            "slices_with_intracranial_mask": {"phantom": int(brain[y == 1].sum()),
                                              "ctich_dev": int(brain[y == 0].sum())},
            "folds": args.folds, "fold_seed": args.seed,
            "logreg": {"features": list(FEATURES), **lr_report}}
    if not args.no_cnn:
        images = np.stack([phantom.images[i] for i in pick_p] + [real.images[i] for i in pick_r])
        t = time.perf_counter()
        got = cnn_oof(images, y, splits, seed=args.seed, epochs=args.epochs, threads=args.threads,
                      cam=True, cam_blocks=args.cam_blocks, extra=ge_images)
        (scores, maps), ge_cnn = got if ge is not None else (got, None)
        seconds["cnn"] = round(time.perf_counter() - t, 1)
        regions = np.stack([phantom.regions[i] for i in pick_p] + [real.regions[i] for i in pick_r])
        cam = {"method": f"Grad-CAM at conv block {args.cam_blocks} of each fold's model on its own test slices, "
                         "towards each slice's own class; region codes: intracranial mask, within --cranium-mm of it, "
                         f"other pixels above {BODY_HU:g} HU, air",
               **cam_summary(maps, regions, y, levels)}
        if args.cam_picture:
            write_cam_pictures(args.cam_picture, images, maps, y, levels)
            cam["picture"] = str(args.cam_picture)
        disc["cnn"] = {"model": "4 conv blocks (16-32-64-64, first conv stride 2), GAP, linear; "
                                "AdamW one-cycle 2e-3, batch 32, hflip",
                       "input": f"3 paper windows (brain, blood, soft tissue) at {args.image_size} px, uint8"
                                + {"whole": "",
                                   "intracranial": "; only the intracranial mask's pixels (the rest 0 HU)",
                                   "cranium": f"; only what lies within {args.cranium_mm:g} mm of the intracranial "
                                              "mask (the rest -1000 HU)",
                                   "cavity": "; only the cranial cavity as a --region cavity model sees it "
                                             "(ichscan.cavity.cut_to_cavity; the rest -1000 HU)"}[args.cnn_region],
                       "region": args.cnn_region,
                       "epochs": args.epochs, "torch_seed": f"{args.seed} * 1000 + fold", "threads": args.threads,
                       **auc_report(scores, y, splits, brain, levels, cavity), "where": cam}
        if ge is not None:
            disc["cnn"]["unseen_real"] = unseen_real_report(scores, y, ge_cnn, ge.name, brain, ge_brain)
        disc["headline_auc"] = disc["cnn"]["oof_auc"]
    else:
        disc["headline_auc"] = lr_report["oof_auc"]
    if args.repeats > 1:
        t = time.perf_counter()
        first = {"logreg": lr_report["oof_auc"], "cnn": None if args.no_cnn else disc["cnn"]["oof_auc"]}
        unseen = None
        if ge is not None:
            unseen = {"features": np.array(ge.features, float), "images": ge_images}
            first["logreg_unseen"] = lr_report["unseen_real"]["auc_phantom_vs_it"]
            first["cnn_unseen"] = None if args.no_cnn else disc["cnn"]["unseen_real"]["auc_phantom_vs_it"]
        disc["repeats"] = repeat_spread(
            feats, None if args.no_cnn else images, y, groups, folds=args.folds, seed=args.seed, n=args.repeats,
            epochs=args.epochs, threads=args.threads, first=first, unseen=unseen)
        seconds["repeats"] = round(time.perf_counter() - t, 1)

    seconds["total"] = round(time.perf_counter() - t_start, 1)
    report = {
        "benchmark": "realism: ichscan phantoms vs real head CT",
        "generator": {"ichscan_version": ichscan.__version__, **identity, "phantom_seed": args.seed,
                      "phantom_size": args.phantom_size, "phantom_series": args.phantoms, "pitch_deg": args.pitch,
                      "calcification": args.calcification, "export": args.export, "children": args.children},
        "sources": {s.name: source_summary(s) for s in sources},
        "discriminator": disc,
        "intracranial_hu": {
            "mask": "largest region the bone (> 300 HU) encloses, gaps < ~16 mm closed, 3 mm eroded, HU -100..200",
            "per_source": {s.name: hist_stats(s.hist) for s in sources},
            **{f"{a.name}_vs_{b.name}": hist_distance(a.hist, b.hist) for a, b in pairs},
            "distance_range_hu": list(COMPARE_RANGE),
        },
        "inner_table": {
            "method": f"{INNER_TABLE_RAYS} rays from the intracranial mask's centroid, every {INNER_TABLE_STEP_MM} mm: "
                      "the distance from the last sample below 60 HU to the first above 300 HU; share_wide: rays "
                      f"at least {INNER_TABLE_WIDE_MM} mm wide. By third of each series (foot to head), and by "
                      "the slice's intracranial area (by_cavity_area)",
            "per_source": {s.name: inner_table_summary(s.inner_table) for s in sources},
        },
        "vault": {
            "method": f"{VAULT_RAYS} rays from the intracranial mask's centroid, sampled every {VAULT_STEP_MM} mm "
                      "(bilinear): the first run over 300 HU beyond the mask, its width and peak HU; by third of "
                      "each series and by direction in the image, within 30 degrees of straight ahead (up), the "
                      "sides, straight back (down)",
            "per_source": {s.name: vault_summary(s.vault) for s in sources},
        },
        "scalp": {
            "method": f"{SCALP_RAYS} rays from the head's centre (the largest region over -300 HU): HU every "
                      f"{SCALP_STEP_MM} mm in from the skin (the ray's last sample in it), on rays with bone (over "
                      f"400 HU) within {SCALP_BONE_MM:g} mm of the skin; the median at each depth, by third of each "
                      "series, on the slices with an intracranial mask",
            "per_source": {s.name: scalp_summary(s.scalp) for s in sources},
        },
        "small_bands": {
            "method": f"each slice's HU resized to {args.image_size} px as the discriminator's windows are "
                      "(bilinear, air padding); the share of all its pixels in each HU band; per mille by third "
                      "of each series, and the AUC of that one number for each source against ctich-dev slices",
            **small_band_summary(sources),
        },
        "nps": {
            "method": f"{args.nps_patch}x{args.nps_patch} px patches on a grid, fully intracranial, mean 15-45 HU, "
                      "plane subtracted; radial bins of 0.05 cycles/mm; centroid = sum f NPS(f) / sum NPS(f) of the "
                      "1-D radial NPS",
            "per_source": {s.name: nps_source(s) for s in sources},
            **{f"{a.name}_vs_{b.name}": nps_distance(a, b) for a, b in pairs},
        },
        "notes": [
            "ctich-dev HU are rebuilt from 8-bit JPGs: -20..100 HU from the brain window (120/255 = 0.47 HU a grey "
            "level, plus JPEG error), elsewhere from the bone window (12.5 HU a level); rounding to integer HU puts 2 "
            "or 3 grey levels in each 1 HU bin, a comb that js_distance sees and js_distance_5hu_bins does not. "
            "JPEG compression also removes high-frequency noise, which shapes its NPS.",
            "ctich-dev geometry is nominal (0.35 mm pixels, 5 mm slices, per its README), so its cycles/mm are too.",
            "NPS from patient images: a plane does not remove grey/white matter, sulci and vessels, so below about "
            "0.25 cycles/mm the curves hold anatomy as much as noise and every curve peaks in its first bin; the "
            "centroid, the share above 0.5 cycles/mm and the noise std above 0.25 cycles/mm say more about noise.",
            "ctich_dev_vs_ge_normal is real against real: a yardstick for the phantom distances.",
            "Phantoms are drawn afresh each run from the code in the working tree (phantom_code_sha1); "
            "src_modified says whether src/ differed from the commit.",
        ],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds": seconds,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
