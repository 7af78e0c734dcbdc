"""Writes small, real DICOM CT files with pydicom, one knob per quirk the reader must cope with."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


def head_phantom(rows: int = 64, cols: int = 64) -> np.ndarray:
    """HU: air -1000 outside, skull 1000, brain 30 inside, a spot of blood 60 and a spot of water 0."""
    y, x = np.mgrid[:rows, :cols]
    r = np.hypot((y - rows / 2) / (rows / 2), (x - cols / 2) / (cols / 2))
    hu = np.full((rows, cols), -1000.0)
    hu[r < 0.85] = 1000.0
    hu[r < 0.75] = 30.0
    hu[rows // 2 - 2 : rows // 2 + 2, cols // 2 - 2 : cols // 2 + 2] = 60.0
    hu[rows // 3 - 1 : rows // 3 + 1, cols // 2 - 1 : cols // 2 + 1] = 0.0
    return hu


def chest_phantom(rows: int = 128, cols: int = 128, spacing: float = 3.0) -> np.ndarray:
    """HU of an axial chest, ``spacing`` mm a pixel: a 300 x 200 mm trunk of soft tissue (40) under a layer of
    fat (-100), two lungs (-800), a vertebra with its canal, a sternum and ribs (700) with gaps between them."""
    y, x = np.mgrid[:rows, :cols]
    X, Y = (x - (cols - 1) / 2) * spacing, (y - (rows - 1) / 2) * spacing

    def ellipse(cx, cy, a, b):
        return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2 < 1

    hu = np.full((rows, cols), -1000.0)
    hu[ellipse(0, 0, 150, 100)] = 40.0
    hu[ellipse(0, 0, 143, 93) & ~ellipse(0, 0, 133, 83)] = -100.0
    hu[ellipse(-60, -5, 45, 62) | ellipse(60, -5, 45, 62)] = -800.0
    hu[ellipse(0, 55, 18, 16)] = 500.0  # vertebral body
    hu[ellipse(0, 78, 14, 12)] = 700.0  # its arch ...
    hu[ellipse(0, 78, 7, 6)] = 30.0  # ... around the spinal canal
    hu[ellipse(0, -80, 12, 5)] = 600.0  # sternum
    for degrees in [*range(20, 161, 22), *range(200, 341, 22)]:
        t = np.radians(degrees)
        hu[ellipse(122 * np.cos(t), 74 * np.sin(t), 7, 6)] = 700.0
    return hu


def write_ct(
    path: str | os.PathLike,
    hu: np.ndarray | None = None,
    *,
    stored: np.ndarray | None = None,
    slope: float = 1.0,
    intercept: float | None = -1024.0,
    bits_stored: int = 16,
    signed: bool = True,
    series_uid: str = "1.2.826.0.1.3680043.8.498.10",
    sop_uid: str | None = None,
    study_uid: str = STUDY_UID,
    patient_id: str = "PHANTOM1",
    position: tuple | None = (-16.0, -16.0, 0.0),
    orientation: tuple | None = (1, 0, 0, 0, 1, 0),
    spacing=(0.5, 0.5),
    thickness: float = 5.0,
    instance: int | None = 1,
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    photometric: str = "MONOCHROME2",
    window_center=40,
    window_width=80,
    modality: str = "CT",
    transfer_syntax=ExplicitVRLittleEndian,
    tags: dict | None = None,
) -> Path:
    """One CT slice. ``stored`` is written as-is; otherwise it is (hu - intercept) / slope, rounded.
    ``tags`` sets more attributes by keyword (``{"BodyPartExamined": "CHEST"}``)."""
    if stored is None:
        hu = head_phantom() if hu is None else np.asarray(hu, dtype=float)
        stored = np.round((hu - (intercept or 0.0)) / slope)
    stored = np.asarray(stored).astype(np.int16 if signed else np.uint16)
    rows, cols = stored.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.Modality, ds.SeriesNumber = patient_id, modality, 1
    ds.ImageType = list(image_type)
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    if instance is not None:
        ds.InstanceNumber = instance
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = thickness
    ds.KVP, ds.ConvolutionKernel = 120, "H30s"
    if window_center is not None:
        ds.WindowCenter, ds.WindowWidth = window_center, window_width
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    ds.PixelData = stored.tobytes()
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder, n: int = 5, *, z0: float = 0.0, step: float = 5.0, **kw) -> list[Path]:
    """``n`` axial slices, z = z0, z0 + step, ...; file names do not follow the z order."""
    folder = Path(folder)
    paths = []
    for i in range(n):
        pos = (-16.0, -16.0, z0 + i * step)
        paths.append(write_ct(folder / f"img_{(i * 7919) % 1000:03d}.dcm", position=pos, instance=i + 1, **kw))
    return paths


def reconstruct_series(src: Path, dst: Path, *, unsharp: float = 0.0, grain_hu: float = 0.0,
                       frame_uid: str | None = None, shift_mm: float = 0.0, seed: int = 0) -> str:
    """Another series of the scan in ``src`` (same study and frame of reference): new series and instance UIDs;
    each slice sharpened by an unsharp mask of ``unsharp`` at a 1-pixel Gaussian, then given ``grain_hu`` of
    white grain (air stays air): a bone kernel shows a slice so (1.5, 20 HU); another frame of reference or z if
    asked. Returns its UID."""
    import pydicom
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    series_uid = generate_uid()
    dst.mkdir(parents=True)
    for f in sorted(Path(src).glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if unsharp or grain_hu:
            slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            hu = ds.pixel_array.astype(np.float64) * slope + icpt
            sharp = hu + unsharp * (hu - ndimage.gaussian_filter(hu, 1.0)) + rng.normal(0, grain_hu, hu.shape)
            sharp = np.where(hu < -900, hu, sharp)
            info = np.iinfo(ds.pixel_array.dtype)
            ds.PixelData = np.clip(np.rint((sharp - icpt) / slope), info.min, info.max).astype(
                ds.pixel_array.dtype).tobytes()
            if unsharp:
                ds.ConvolutionKernel = "H70s"
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if frame_uid is not None:
            ds.FrameOfReferenceUID = frame_uid
        if shift_mm:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, z + shift_mm]
        ds.save_as(dst / f.name, enforce_file_format=True)
    return series_uid
