"""Pictures a person can check: a slice, or a series as a contact sheet, in several windows side by side.

Library code: returns Pillow images and logs; writing files and talking belong to ``ichscan.cli.render``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ichscan.dicom import CTSeries, CTSlice, find_series, read_slices
from ichscan.errors import IchscanError, SeriesError
from ichscan.nifti import is_nifti
from ichscan.windows import PAPER_WINDOWS, Window, get_windows, window_image

log = logging.getLogger(__name__)

__all__ = ["Rendered", "contact_sheet", "pick_slices", "render_path"]

_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
_ACCENT = (255, 200, 60)
# Bounds on what a picture may ask of memory: a 2048 px tile is four times a CT matrix, and a sheet of
# 50 megapixels (150 MB as RGB) holds a whole 512-slice series at the default tile size.
MIN_TILE, MAX_TILE = 16, 2048
MAX_SHEET_PIXELS = 50_000_000
_PAD, _HEAD, _TITLE = 6, 28, 26  # margins, window names, title line (pixels)


@dataclass(frozen=True)
class Rendered:
    """A picture and what is in it."""

    image: Image.Image
    source: str
    series_uid: str
    n_slices: int  # in the series
    shown: tuple[int, ...]  # indices of the slices drawn
    windows: tuple[Window, ...]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def pick_slices(n: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``n`` slices, first and last included."""
    if n <= count:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, count)})


def _layout(n: int, n_windows: int, tile: int | None, title: bool) -> tuple[int, int, int, int]:
    """Columns, tile and sheet width and height for ``n`` slices in ``n_windows`` panels; a tile or
    sheet too large for memory is refused here, before any pixel is read."""
    if tile is not None and not MIN_TILE <= tile <= MAX_TILE:
        raise IchscanError(f"tile {tile} px: expected {MIN_TILE} to {MAX_TILE} pixels per slice image")
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    tile = tile or max(96, min(512, 768 // cols))
    panel_w, panel_h = cols * tile + (cols - 1) * 2, rows * tile + (rows - 1) * 2
    width = n_windows * (panel_w + _PAD) + _PAD
    height = (_TITLE if title else 0) + _HEAD + panel_h + _PAD
    if width * height > MAX_SHEET_PIXELS:
        raise IchscanError(f"a sheet of {width}x{height} pixels ({n} slices, {n_windows} windows, {tile} px tiles) "
                           f"is more than {MAX_SHEET_PIXELS // 1_000_000} megapixels; use a smaller tile, fewer "
                           "slices or fewer windows")
    return cols, tile, width, height


def contact_sheet(
    slices: Sequence[CTSlice],
    windows: Iterable = PAPER_WINDOWS,
    *,
    tile: int | None = None,
    labels: Sequence[str] | None = None,
    title: str = "",
) -> Image.Image:
    """One panel per window, side by side; each panel a grid of the given slices (which need ``hu``)."""
    ws = get_windows(windows)
    n = len(slices)
    if n == 0:
        raise SeriesError("nothing to render: no slices", None)
    cols, tile, width, height = _layout(n, len(ws), tile, bool(title))
    labels = list(labels) if labels is not None else [str(i) for i in range(n)]
    pad, head = _PAD, _HEAD
    title_h = _TITLE if title else 0
    panel_w = cols * tile + (cols - 1) * 2
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    big, small = _font(16), _font(max(10, tile // 14))
    if title:
        draw.text((pad, 5), title, fill=_TEXT, font=big)
    for k, s in enumerate(slices):
        img = window_image(s.hu, ws, size=tile)  # (C, tile, tile) uint8, aspect kept
        r, c = divmod(k, cols)
        for j in range(len(ws)):
            x = pad + j * (panel_w + pad) + c * (tile + 2)
            y = title_h + head + r * (tile + 2)
            sheet.paste(Image.fromarray(img[j]).convert("RGB"), (x, y))
            if n > 1:
                draw.text((x + 3, y + 2), labels[k], fill=_ACCENT, font=small)
    for j, w in enumerate(ws):
        draw.text((pad + j * (panel_w + pad), title_h + 4), f"{w.name}  L {w.level:g} / W {w.width:g}", fill=_TEXT, font=big)
    return sheet


def _series_title(series: CTSeries) -> str:
    parts = [series.description or "series", f"{len(series)} slices", f"ordered by {series.ordered_by}"]
    if series.tilt_degrees:
        parts.append(f"tilt {series.tilt_degrees:.1f} deg")
    if series.fixes:
        parts.append("fixes: " + ", ".join(series.fixes))
    return "  |  ".join(parts)


def render_path(
    path: str | os.PathLike,
    windows: Iterable = PAPER_WINDOWS,
    *,
    max_slices: int = 16,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    tile: int | None = None,
) -> Rendered:
    """A single-slice file as one row of windows; a multi-frame file, NIfTI volume, folder or zip as a
    contact sheet (a NIfTI volume's axial slices, as ``ichscan.nifti`` lays them out).

    With several series the largest is drawn unless ``series_uid`` picks one.
    """
    if max_slices < 1:
        raise IchscanError(f"max_slices {max_slices}: expected at least 1 slice on a sheet")
    ws = get_windows(windows)
    text = os.fspath(path)
    if os.path.isfile(text) and not text.lower().endswith(".zip") and not is_nifti(text):
        slices = read_slices(text, allow_non_ct=allow_non_ct)
        if len(slices) == 1:
            s = slices[0]
            title = f"{os.path.basename(text)}  |  {s.rows}x{s.columns}"
            if s.fixes:
                title += "  |  fixes: " + ", ".join(s.fixes)
            sheet = contact_sheet(slices, ws, tile=tile or 512, title=title)
            return Rendered(sheet, text, s.series_uid, 1, (0,), ws)
    scan = find_series(text, allow_non_ct=allow_non_ct)
    found = [s for s in scan.series if series_uid is None or s.series_uid == series_uid]
    if not found and series_uid is not None and scan.series:
        have = ", ".join(f"{s.series_uid} ({len(s)} slices)" for s in scan.series[:5])
        raise SeriesError(f"no series {series_uid} here; --series takes one of: {have}"
                          + (" ..." if len(scan.series) > 5 else ""), text)
    if not found:
        reasons = "; ".join(k.reason for k in scan.skipped[:2])
        raise SeriesError(f"no usable series to render{': ' + reasons if reasons else ''}", text)
    series = max(found, key=len)
    if len(found) > 1:
        log.info("%d series found; drawing the largest, %s", len(found), series.series_uid)
    shown = pick_slices(len(series), max_slices)
    _layout(len(shown), len(ws), tile, True)  # refuse a sheet too large before reading its pixels
    subset = replace(series, slices=tuple(series.slices[i] for i in shown))
    volume = subset.volume()
    with_hu = [replace(s, hu=volume[k]) for k, s in enumerate(subset.slices)]
    z = subset.z
    labels = [f"{i + 1}/{len(series)}" + (f"  z {z[k]:.1f}" if z is not None else "") for k, i in enumerate(shown)]
    sheet = contact_sheet(with_hu, ws, tile=tile, labels=labels, title=_series_title(series))
    return Rendered(sheet, text, series.series_uid, len(series), tuple(shown), ws)
