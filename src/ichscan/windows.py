"""CT windows: HU -> channels a network (or a person) can look at.

A window maps ``[level - width/2, level + width/2]`` linearly onto ``[0, 1]`` (uint8: 0..255, rounded),
clipping outside; high HU is always bright, whatever the file's photometric interpretation (see
``ichscan.dicom`` on MONOCHROME1). Several windows stack into channels.

Resizing keeps the aspect ratio: the image is scaled so its longer side is ``size`` (bilinear, Pillow,
antialiased when shrinking) and centred on a square filled with the windowed value of air (-1000 HU).
Windowing happens before resizing, in both the float and the uint8 path, so both agree to within one
grey level, and ``load_windows`` gives exactly ``window_image(read_slice(path).hu)``.

``load_windows(path)`` is the fast path used by the benchmark and the training cache: for integer stored
values it builds, per window, a lookup table stored value -> output with the modality LUT (and the RSNA
fix) folded in, and indexes it with the raw pixels, so no float image is ever made. When the image is
resized, two to four windows share one table of 32-bit words (a byte per window), so one index gives an
RGBX image that Pillow resizes in a single pass, byte for byte what resizing each channel gives.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AIR_HU",
    "PAPER_WINDOWS",
    "PRESETS",
    "Window",
    "get_windows",
    "load_windows",
    "resize_keep_aspect",
    "window_image",
    "window_stored",
]

AIR_HU = -1000.0
REGIONS = ("whole", "cavity")


@dataclass(frozen=True)
class Window:
    """A CT window: ``level`` (centre) and ``width`` in HU."""

    name: str
    level: float
    width: float
    region: str = "whole"  # "cavity": the channel sees only the cranial cavity (ichscan.cavity), air elsewhere

    def __post_init__(self) -> None:
        if self.region not in REGIONS:
            raise ValueError(f"window {self.name!r}: region {self.region!r} is not one of {', '.join(REGIONS)}")

    @property
    def low(self) -> float:
        return self.level - self.width / 2

    @property
    def high(self) -> float:
        return self.level + self.width / 2

    def to_dict(self) -> dict:
        d = {"name": self.name, "level": self.level, "width": self.width}
        if self.region != "whole":  # whole-slice windows keep the record they always had
            d["region"] = self.region
        return d

    def spec(self) -> str | dict:
        """The shortest form ``get_windows`` reads back: a preset's name (``brain:cavity`` with a region),
        else the dict."""
        if PRESETS.get(self.name) == dataclasses.replace(self, region="whole"):
            return self.name if self.region == "whole" else f"{self.name}:{self.region}"
        return self.to_dict()

    @property
    def label(self) -> str:
        """The name, with ``:region`` where the window does not see the whole slice (``brain:cavity``)."""
        return self.name if self.region == "whole" else f"{self.name}:{self.region}"

    def in_region(self, region: str) -> Window:
        return dataclasses.replace(self, region=region)


PRESETS: dict[str, Window] = {
    w.name: w
    for w in (
        Window("brain", 40, 80),
        Window("blood", 80, 200),  # the paper's "subdural" window
        Window("soft_tissue", 40, 380),
        Window("bone", 600, 2800),
    )
}
PAPER_WINDOWS: tuple[str, ...] = ("brain", "blood", "soft_tissue")

WindowSpec = str | Window | dict


def get_windows(windows: WindowSpec | Iterable[WindowSpec] = PAPER_WINDOWS) -> tuple[Window, ...]:
    """Preset names (``brain``, or ``brain:cavity`` for the preset seeing only the cranial cavity), ``Window``
    objects or ``{name, level, width[, region]}`` dicts (as in checkpoints) -> Windows."""
    if isinstance(windows, (str, Window, dict)):
        windows = [windows]
    out = []
    for w in windows:
        if isinstance(w, Window):
            out.append(w)
        elif isinstance(w, dict):
            out.append(Window(str(w["name"]), float(w["level"]), float(w["width"]), str(w.get("region", "whole"))))
        elif isinstance(w, str) and w.partition(":")[0] in PRESETS:
            name, _, region = w.partition(":")
            out.append(PRESETS[name].in_region(region) if region else PRESETS[name])
        else:
            raise ValueError(f"unknown window {w!r}; presets are {', '.join(PRESETS)} (name:cavity for the "
                             f"cranial cavity alone)")
    if not out:
        raise ValueError("no windows given")
    return tuple(out)


def _apply(hu: np.ndarray, w: Window, dtype) -> np.ndarray:
    """One window on float32 HU; the same float32 operations whether ``hu`` is an image or a LUT domain."""
    x = hu.astype(np.float32, copy=False) - np.float32(w.low)
    if np.dtype(dtype) == np.uint8:
        x *= np.float32(255.0 / w.width)
        np.clip(x, 0, 255, out=x)
        x += np.float32(0.5)
        return x.astype(np.uint8)
    x *= np.float32(1.0 / w.width)
    np.clip(x, 0, 1, out=x)
    return x


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint8), np.dtype(np.float32)):
        raise ValueError(f"dtype must be uint8 or float32, not {dt}")
    return dt


def _fitted_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(H, W) scaled so the longer side is ``size``."""
    scale = size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _pad_to_square(image: np.ndarray, size: int, fill: float) -> np.ndarray:
    """(h, w) with the longer side ``size`` -> (size, size), centred, padded with ``fill``."""
    if image.shape == (size, size):
        return image
    nh, nw = image.shape
    out = np.full((size, size), fill, dtype=image.dtype)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = image
    return out


def resize_keep_aspect(image: np.ndarray, size: int, fill: float) -> np.ndarray:
    """(H, W) uint8 or float32 -> (size, size): longer side scaled to ``size``, centred, padded with ``fill``."""
    h, w = image.shape
    if h == w == size:
        return image
    nh, nw = _fitted_shape(h, w, size)
    if (nh, nw) != (h, w):
        from PIL import Image  # only when resizing is needed

        if image.dtype == np.uint8:
            image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        else:
            img = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
            image = np.asarray(img.resize((nw, nh), Image.BILINEAR))
    return _pad_to_square(image, size, fill)


def _finish(channels: list[np.ndarray], windows: Sequence[Window], size: int | None, dtype) -> np.ndarray:
    if size is not None:
        air = np.full(1, AIR_HU, np.float32)
        channels = [
            resize_keep_aspect(c, int(size), _apply(air, w, dtype)[0].item()) for c, w in zip(channels, windows)
        ]
    return np.stack(channels)


def _channels(hu: np.ndarray, ws: Sequence[Window], spacing, dt, path=None) -> list[np.ndarray]:
    """Each window on HU, the cavity's windows on the slice cut down to its cranial cavity (found once). A
    slice without a pixel spacing cannot be cut: ``PixelDataError`` (naming ``path`` when given), which
    batch work reports by file and goes on."""
    cut = None
    if any(w.region == "cavity" for w in ws):
        if spacing is None:
            from ichscan.errors import PixelDataError

            raise PixelDataError("a cavity window needs the slice's pixel spacing (mm), and it has none", path)
        from ichscan.cavity import cut_to_cavity

        cut = cut_to_cavity(hu, (float(spacing[0]), float(spacing[1])))
    return [_apply(cut if w.region == "cavity" else hu, w, dt) for w in ws]


def window_image(
    hu: np.ndarray,
    windows: WindowSpec | Iterable[WindowSpec] = PAPER_WINDOWS,
    size: int | None = 512,
    dtype=np.uint8,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """HU (H, W) -> (C, size, size) in ``dtype`` (uint8 0..255 or float32 0..1); ``size=None`` keeps H, W.
    ``spacing`` (row, column mm) is needed only by cavity windows (``PixelDataError`` without it)."""
    dt = _check_dtype(dtype)
    ws = get_windows(windows)
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise ValueError(f"expected one (H, W) slice, got shape {hu.shape}")
    return _finish(_channels(hu, ws, spacing, dt), ws, size, dt)


@functools.lru_cache(maxsize=64)
def _window_table(stored_dtype: str, slope: float, intercept: float, fixes: tuple, window: Window, dtype: str) -> np.ndarray:
    """stored value -> windowed output for every value of an 8/16-bit stored type (memoised, pure)."""
    from ichscan.dicom import StoredPixels

    sd = np.dtype(stored_dtype)
    domain = np.arange(2 ** (8 * sd.itemsize), dtype=np.uint32).astype(f"u{sd.itemsize}").view(sd)
    hu = StoredPixels("", domain, slope, intercept, fixes).hu()
    table = _apply(hu, window, np.dtype(dtype))
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=16)
def _packed_window_table(stored_dtype: str, slope: float, intercept: float, fixes: tuple, windows: tuple) -> np.ndarray:
    """Up to four uint8 window tables packed into one little-endian uint32 per stored value (byte c =
    window c), so one ``take`` gives an RGBX image that Pillow resizes in one pass (memoised, pure)."""
    packed = np.zeros(2 ** (8 * np.dtype(stored_dtype).itemsize), dtype="<u4")
    for c, w in enumerate(windows):
        packed |= _window_table(stored_dtype, slope, intercept, fixes, w, "|u1").astype("<u4") << np.uint32(8 * c)
    packed.flags.writeable = False
    return packed


def _resize_packed(packed: np.ndarray, windows: Sequence[Window], size: int) -> np.ndarray:
    """(H, W) packed RGBX words -> (C, size, size) uint8 as ``resize_keep_aspect`` gives channel by channel.

    Pillow resamples each band of an RGBX image with the same fixed-point coefficients as a single "L"
    band (tests check the bytes are identical), and one 4-band pass costs about what one band costs."""
    from PIL import Image

    h, w = packed.shape
    nh, nw = _fitted_shape(h, w, size)
    image = Image.frombuffer("RGBX", (w, h), np.ascontiguousarray(packed), "raw", "RGBX", 0, 1)
    small = np.asarray(image.resize((nw, nh), Image.BILINEAR))
    air = np.full(1, AIR_HU, np.float32)
    return np.stack([_pad_to_square(small[:, :, c], size, _apply(air, win, np.uint8)[0])
                     for c, win in enumerate(windows)])


def window_stored(
    pixels,
    windows: WindowSpec | Iterable[WindowSpec] = PAPER_WINDOWS,
    size: int | None = 512,
    dtype=np.uint8,
) -> np.ndarray:
    """``ichscan.dicom.StoredPixels`` -> (C, size, size) through per-window lookup tables when they win."""
    dt = _check_dtype(dtype)
    ws = get_windows(windows)
    stored = pixels.stored
    cavity = any(w.region == "cavity" for w in ws)  # needs HU to find the cavity in: no lookup tables
    if (not cavity and getattr(pixels, "lut", None) is None and stored.dtype.kind in "iu"
            and stored.dtype.itemsize <= 2):
        if not stored.dtype.isnative:
            stored = stored.astype(stored.dtype.newbyteorder("="))
        index = stored.view(f"u{stored.dtype.itemsize}")  # the bit pattern indexes the table
        key = (stored.dtype.str, float(pixels.slope), float(pixels.intercept), tuple(pixels.fixes))
        index = index.astype(np.intp)  # once, not once per window inside take()
        resize = size is not None and index.shape != (size, size)
        if resize and dt == np.uint8 and 2 <= len(ws) <= 4 and index.ndim == 2:
            # the common case (3 windows, 512 -> smaller): one take and one Pillow pass, 1.5 ms not 2
            return _resize_packed(np.take(_packed_window_table(*key, ws), index), ws, int(size))
        out = np.empty((len(ws), *index.shape), dtype=dt)
        for c, w in enumerate(ws):
            np.take(_window_table(*key, w, dt.str), index, out=out[c])
        if size is None or out.shape[1:] == (size, size):
            return out
        channels = list(out)
    else:
        channels = _channels(pixels.hu(), ws, getattr(pixels, "spacing", None), dt, getattr(pixels, "path", None))
    return _finish(channels, ws, size, dt)


def load_windows(
    path: str | os.PathLike,
    windows: WindowSpec | Iterable[WindowSpec] = PAPER_WINDOWS,
    size: int | None = 512,
    dtype=np.uint8,
    *,
    allow_non_ct: bool = False,
) -> np.ndarray:
    """DICOM file -> (C, size, size) windowed image, the fast way (no float HU image is made)."""
    from ichscan.dicom import read_pixels

    return window_stored(read_pixels(path, allow_non_ct=allow_non_ct), windows, size, dtype)
