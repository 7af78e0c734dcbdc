"""NIfTI in: a ``.nii`` / ``.nii.gz`` volume in Hounsfield units read as the axial series DICOM gives.

Numpy and nibabel only (nibabel is imported when a NIfTI file is met, so DICOM-only runs never load it).
``ichscan.dicom`` sends every ``.nii`` / ``.nii.gz`` file it meets (given directly, in a folder, in a zip)
here, and gets back ``CTSlice`` records like those of an enhanced (multi-frame) CT: one per axial slice,
sharing the file, told apart by ``frame``. Choices worth knowing (docs/predict.md, "NIfTI in"):

* **Orientation** comes from the affine (nibabel's choice: the sform when its code is set, else the
  qform); a file with neither code set is refused, since which way is axial cannot be known. NIfTI's
  world is RAS, DICOM's patient space LPS: x and y change sign. Each stored axis is matched to the
  patient axis it runs closest to (``nibabel.orientations.io_orientation``), and the voxels are laid out
  as DICOM shows an axial slice: slices inferior to superior, rows anterior to posterior, columns the
  patient's right to left, whatever the storage order (RAS, LAS, LPS, sagittal, coronal, flipped).
  Positions and direction cosines are the affine's own, so an oblique volume stays oblique (selection
  measures its obliquity as for DICOM).
* **Naming**: a volume is one series. Its SeriesInstanceUID and SOPInstanceUID stand-ins are the file's
  path relative to the folder scanned (``sub-01/ct.nii.gz``; the file name when the file is given
  directly, ``study.zip/ct.nii.gz`` inside a zip), so outputs say which file; slice ``k`` (0-based,
  inferior to superior) is ``frame`` k and its image id ``<name>_<k>``. Patient and study are empty.
* **Values** are the stored values scaled by scl_slope / scl_inter (nibabel does it), as float32 HU. A
  headers-only read (``pixels=False``) checks the header and that the file holds all its voxels; the
  values are checked when they are decoded: every voxel finite, some air (below ``AIR_HU``), at most half
  outside ``CT_HU_RANGE``. A NIfTI file is always read as CT (it records no modality), so these checks
  apply whatever ``allow_non_ct`` says.
* **Errors** are ``NiftiError`` (a ``PixelDataError``), one line naming the file and what to do.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np

from ichscan.dicom import AIR_HU, CT_HU_RANGE, MAX_OUTSIDE_CT_RANGE, CTSlice
from ichscan.errors import PixelDataError

log = logging.getLogger(__name__)

__all__ = ["NIFTI_SUFFIXES", "NiftiError", "is_nifti", "read_nifti", "series_name"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # NIfTI world (RAS) -> DICOM patient space (LPS)
_UNIT_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}  # unknown: NIfTI's default, mm
# letters of a stored axis running along +x, +y, +z of LPS, and along -x, -y, -z
_POSITIVE, _NEGATIVE = "LPS", "RAI"
_GZIP_CHUNK = 1 << 20
_HEADER_BYTES = 540  # a NIfTI-2 header; NIfTI-1's is 348


class NiftiError(PixelDataError):
    """A NIfTI file that cannot be read as one CT volume in HU: unreadable or truncated, not 3-D, without
    orientation, or with values that are not Hounsfield units."""


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether a path names a NIfTI volume (by its suffix: ``.nii`` or ``.nii.gz``, any case)."""
    return os.fspath(path).lower().endswith(NIFTI_SUFFIXES)


def series_name(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """The series name of a NIfTI file: its path relative to the folder ``root`` that was scanned, with
    ``/`` separators; the file name when there is no folder (``root`` is the file itself, or None); a
    member of a zip given directly reads ``study.zip/member.nii.gz``."""
    text = os.fspath(path)
    if root is None:
        return PurePath(text).name
    base = Path(root)
    if not base.is_dir():
        base = base.parent
    rel = os.path.relpath(text, base)
    return PurePath(rel).as_posix() if not rel.startswith("..") else PurePath(text).name


# ----------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Layout:
    """How a stored volume maps onto the axial display grid (slice, row, column) in LPS."""

    axes: tuple[int, int, int]  # the stored axis giving slices (S), rows (P) and columns (L)
    flips: tuple[bool, bool, bool]  # whether that stored axis runs the other way (I, A, R)
    origin: np.ndarray  # LPS mm of voxel (slice 0, row 0, column 0)
    steps: np.ndarray  # (3, 3): LPS mm moved by one step along slices, rows, columns
    code: str  # the storage order in letters, e.g. "RAS" (stored axis 0 runs to the right, ...)


def _layout(affine_lps: np.ndarray, shape: tuple[int, int, int], path: str) -> _Layout:
    from nibabel.orientations import io_orientation

    matrix, offset = affine_lps[:3, :3], affine_lps[:3, 3]
    ornt = io_orientation(affine_lps)  # per stored axis: the LPS axis it runs closest to, and its sign
    if not np.all(np.isfinite(ornt)) or sorted(int(a) for a in ornt[:, 0]) != [0, 1, 2]:
        raise NiftiError("the affine does not give three independent axes; write the volume with a proper "
                         "orientation (e.g. dcm2niix from the DICOM series)", path)
    stored_for = {int(ornt[a, 0]): a for a in range(3)}  # LPS axis -> stored axis
    axes = (stored_for[2], stored_for[1], stored_for[0])  # slices along z, rows along y, columns along x
    flips = tuple(bool(ornt[a, 1] < 0) for a in axes)
    steps = np.stack([matrix[:, a] * (-1.0 if f else 1.0) for a, f in zip(axes, flips)])
    start = np.zeros(3)
    for a, f in zip(axes, flips):
        start[a] = shape[a] - 1 if f else 0
    code = "".join((_POSITIVE if ornt[a, 1] > 0 else _NEGATIVE)[int(ornt[a, 0])] for a in range(3))
    return _Layout(axes, flips, matrix @ start + offset, steps, code)


def _to_axial(volume: np.ndarray, layout: _Layout) -> np.ndarray:
    """A stored (X, Y, Z) array as (slices, rows, columns) in the display order of ``layout``."""
    out = np.transpose(volume, layout.axes)
    flip = tuple(slice(None, None, -1) if f else slice(None) for f in layout.flips)
    return np.ascontiguousarray(out[flip])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


# ----------------------------------------------------------------------------------------------- reading


def _open(path: str, data: bytes | None):
    """The nibabel image (header read, voxels not), from a file or from the bytes of a zip member; and
    the length of the uncompressed bytes of a zip member (None for a file)."""
    import nibabel as nib

    gz = path.lower().endswith(".gz")
    raw = None
    try:
        if data is None:
            with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
                head = fh.read(_HEADER_BYTES)
        else:
            raw = head = gzip.decompress(data) if gz else data
        sizes = {struct.unpack(order + "i", head[:4])[0] for order in "<>"} if len(head) >= 4 else set()
        if 540 in sizes:  # NIfTI-2: magic right after sizeof_hdr
            kind, magic, length = nib.Nifti2Image, head[4:8], 540
        else:
            kind, magic, length = nib.Nifti1Image, head[344:348], 348
        if len(head) < length and (348 in sizes or 540 in sizes):
            raise NiftiError(f"the file ends early (within its {length}-byte header); it is incomplete - copy or "
                             "convert it again", path)
        if magic not in (b"n+1\0", b"n+2\0"):
            raise NiftiError("not a single-file NIfTI-1/2 volume (no 'n+1' / 'n+2' header); check the file or "
                             "convert it again (e.g. dcm2niix)", path)
        img = kind.from_filename(path, mmap=False) if raw is None else kind.from_bytes(raw)
    except NiftiError:
        raise
    except (EOFError, zlib.error) as err:
        raise NiftiError(f"the compressed file ends early or is damaged ({_first_line(err)}); copy it again",
                         path) from err
    except Exception as err:  # nibabel raises several kinds for a header it cannot use
        raise NiftiError(f"cannot be read as NIfTI ({_first_line(err)}); check the file or convert it again "
                         "(e.g. dcm2niix)", path) from err
    return img, None if raw is None else len(raw)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _spatial_shape(img, path: str) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in img.shape)
    shown = "x".join(str(n) for n in shape)
    if len(shape) < 3:
        raise NiftiError(f"a {len(shape)}-D image (shape {shown}); ichscan needs a 3-D CT volume", path)
    extra = shape[3:]
    if any(n != 1 for n in extra):
        volumes = math.prod(extra)
        raise NiftiError(f"a {len(shape)}-D volume (shape {shown}: {volumes} volumes); ichscan reads one 3-D CT "
                         "volume - split it (e.g. nibabel's four_to_three or fslsplit) and give one file", path)
    return shape[0], shape[1], shape[2]


def _affine_lps(img, path: str) -> np.ndarray:
    hdr = img.header
    if int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0:
        raise NiftiError("no orientation (sform_code and qform_code are 0), so which way is axial cannot be "
                         "known; write the volume with its affine (e.g. dcm2niix from the DICOM series)", path)
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise NiftiError("the affine is not finite or not invertible, so voxel positions are unknown; write "
                         "the volume with a proper affine", path)
    unit = hdr.get_xyzt_units()[0]
    scaled = affine.copy()
    scaled[:3, :] *= _UNIT_MM.get(unit, 1.0)
    return _LPS_FROM_RAS @ scaled


def _check_dtype(img, path: str) -> None:
    dtype = img.header.get_data_dtype()
    if dtype.kind not in "biuf":
        what = "colour (RGB) voxels" if dtype.fields else f"{dtype} voxels"
        raise NiftiError(f"{what}: not CT numbers; a CT volume holds one number (HU) per voxel", path)


def _expected_bytes(img, shape) -> int:
    # the proxy keeps the file's vox_offset (the image's own header is reset for writing)
    return int(img.dataobj.offset) + math.prod(shape) * img.header.get_data_dtype().itemsize


def _check_complete(path: str, in_memory: int | None, img, shape) -> None:
    """That the file holds every voxel its header promises, without decoding them (a cheap check for a
    headers-only scan: the size of a ``.nii``, the length a ``.nii.gz`` records in its last bytes)."""
    want = _expected_bytes(img, shape)
    if in_memory is not None:
        have = in_memory
    elif not path.lower().endswith(".gz"):
        have = os.path.getsize(path)
    else:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() >= 18:
                fh.seek(-4, os.SEEK_END)
                if struct.unpack("<I", fh.read(4))[0] == want % 2**32:
                    return  # gzip's trailer records the length: the usual case, no decompression needed
        have = _gunzipped_length(path)  # several gzip members, or truncated: count what decompresses
    if have < want:
        raise NiftiError(f"the file ends early ({have} of {want} bytes of header and voxels); it is incomplete - "
                         "copy or convert it again", path)


def _gunzipped_length(path: str) -> int:
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(_GZIP_CHUNK):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as err:
        raise NiftiError(f"the compressed file ends early or is damaged ({_first_line(err)}); copy it again",
                         path) from err
    return total


def _decode(img, shape, path: str) -> np.ndarray:
    """The stored voxels scaled by scl_slope / scl_inter, float32 (X, Y, Z)."""
    try:
        volume = np.asarray(img.dataobj, dtype=np.float32)
    except (EOFError, zlib.error) as err:
        raise NiftiError(f"the compressed file ends early or is damaged ({_first_line(err)}); copy it again",
                         path) from err
    except Exception as err:  # a short read, a damaged stream: nibabel and gzip raise several kinds
        raise NiftiError(f"the voxels cannot be read ({_first_line(err)}); the file may be incomplete - copy or "
                         "convert it again", path) from err
    return volume.astype(np.float32, copy=False).reshape(shape)


def _not_hu_hint(low: float, high: float) -> str:
    """What values without air look like (``low`` is above AIR_HU already)."""
    if high <= 1.5:
        return "values within 0..1 look like normalised intensities"
    if high <= 256:
        return "values within 0..255 look like an 8-bit picture"
    if low >= -100 and high > 1000:
        return "values from about 0 look like HU + 1024 stored without scl_inter -1024"
    return "a head CT always has air around the head"


def _check_values(volume: np.ndarray, path: str) -> None:
    """Values a head CT in HU can hold: all finite, some air, at most half outside CT_HU_RANGE."""
    finite = np.isfinite(volume)
    if not finite.all():
        bad = int(volume.size - np.count_nonzero(finite))
        raise NiftiError(f"{bad} of {volume.size} voxels are not finite numbers (NaN or infinity); replace them "
                         "(e.g. by -1000 HU, air) or convert the volume again", path)
    low, high = float(volume.min()), float(volume.max())
    if low > AIR_HU:
        raise NiftiError(f"values {low:g} to {high:g} are not Hounsfield units: no air anywhere (nothing below "
                         f"{AIR_HU:g}, where air is -1000 HU; {_not_hu_hint(low, high)}); give the volume in HU",
                         path)
    step = max(1, max(volume.shape) // 64)  # about 64 samples along the longest axis
    grid = volume[::step, ::step, ::step]
    lo, hi = CT_HU_RANGE
    outside = float(np.mean((grid < lo) | (grid > hi)))
    if outside > MAX_OUTSIDE_CT_RANGE:
        raise NiftiError(f"{outside:.0%} of the voxels lie outside {lo:g}..{hi:g} HU (values {low:g} to {high:g}): "
                         "these are not CT numbers; check scl_slope / scl_inter or give the volume in HU", path)


def read_nifti(path: str | os.PathLike, *, pixels: bool = True, name: str | None = None,
               data: bytes | None = None) -> list[CTSlice]:
    """The axial slices of one NIfTI volume, inferior to superior (slice ``k`` has ``frame`` k).

    ``pixels=False`` reads the header (and checks that the file is complete) and leaves ``hu`` None;
    ``CTSeries.volume()`` and the predictor decode the volume later through ``ichscan.dicom``. ``name``
    is the series name (``series_name``; default the file name); ``data`` the file's bytes when it is a
    zip member, ``path`` then being what messages show.
    """
    text = os.fspath(path)
    img, in_memory = _open(text, data)
    shape = _spatial_shape(img, text)
    _check_dtype(img, text)
    layout = _layout(_affine_lps(img, text), shape, text)
    n, rows, columns = (shape[a] for a in layout.axes)
    if rows < 2 or columns < 2:
        raise NiftiError(f"shape {'x'.join(map(str, shape))} stored {layout.code} gives axial slices of {rows}x"
                         f"{columns} voxels: a single sagittal or coronal image, not a volume; ichscan needs a "
                         "3-D CT volume", text)
    _check_complete(text, in_memory, img, shape)  # before decoding: one clear message for a short file
    axial = None
    if pixels:
        axial = _to_axial(_decode(img, shape, text), layout)
        _check_values(axial, text)
    name = name or PurePath(text).name
    step_slice, step_row, step_column = layout.steps
    row_dir, column_dir = _unit(step_column), _unit(step_row)  # DICOM: along a row first, then down a column
    orientation = tuple(round(float(v), 9) + 0.0 for v in (*row_dir, *column_dir))  # + 0.0: no -0.0
    normal = _unit(np.cross(row_dir, column_dir))
    spacing = (round(float(np.linalg.norm(step_row)), 6), round(float(np.linalg.norm(step_column)), 6))
    thickness = round(abs(float(step_slice @ normal)), 6)  # NIfTI records no thickness: the slice spacing
    description = f"NIfTI stored {layout.code}"
    out = []
    for k in range(n):
        position = layout.origin + k * step_slice
        out.append(CTSlice(
            path=text,
            hu=None if axial is None else axial[k],
            series_uid=name,
            sop_uid=name,
            frame=k,
            instance_number=k + 1,
            position=tuple(round(float(v), 6) + 0.0 for v in position),
            orientation=orientation,
            spacing=spacing,
            thickness=thickness,
            rows=rows,
            columns=columns,
            modality="CT",
            series_description=description,
        ))
    log.debug("%s: %d axial slices of %dx%d, stored %s", text, n, rows, columns, layout.code)
    return out

