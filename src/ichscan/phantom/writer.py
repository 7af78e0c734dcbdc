"""CT Image Storage files, with the encodings real scanners (and the RSNA set) use.

An *encoding* is how HU become stored values: bits stored, signedness and rescale. ``hu_range`` says what
an encoding can hold; the generator clips to it before writing, so the HU it reports are exactly the HU a
reader recovers. The ``rsna_corrupt`` encoding reproduces the RSNA 2019 files whose headers say 12 unsigned
bits with an intercept near 0 while the values are HU wrapped modulo 4096; the documented fix (add 1000,
take values reaching 4096 down by 4096, intercept -1000) gives the HU back exactly.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from ichscan.fileio import atomic_path


@dataclass(frozen=True)
class Encoding:
    name: str
    bits_stored: int
    signed: bool
    intercept: float
    hu_range: tuple[float, float]

    def stored(self, hu: np.ndarray) -> np.ndarray:
        """Stored values for integral HU already inside ``hu_range``."""
        h = hu.astype(np.int32)
        if self.name == "rsna_corrupt":
            return np.mod(h, 4096).astype(np.uint16)
        v = h - int(self.intercept)
        return v.astype(np.int16 if self.signed else np.uint16)


ENCODINGS = {
    "u12": Encoding("u12", 12, False, -1024.0, (-1024.0, 3071.0)),
    "u16": Encoding("u16", 16, False, -1024.0, (-1024.0, 8000.0)),
    "s16": Encoding("s16", 16, True, 0.0, (-3024.0, 8000.0)),
    "s16_1024": Encoding("s16_1024", 16, True, -1024.0, (-3024.0, 8000.0)),
    "s12": Encoding("s12", 12, True, 0.0, (-2048.0, 2047.0)),
    "rsna_corrupt": Encoding("rsna_corrupt", 12, False, 0.0, (-1000.0, 3095.0)),
}
# How often each encoding is drawn for a series (the RSNA set is dominated by 12- and 16-bit unsigned).
ENCODING_WEIGHTS = {"u12": 0.30, "u16": 0.15, "s16": 0.20, "s16_1024": 0.10, "s12": 0.10, "rsna_corrupt": 0.15}

WINDOW_TAGS = [("40", "80"), ("40", "120"), (["40", "400"], ["80", "2000"]), ("35", "100")]
KERNELS = ["H30s", "FC21", "STANDARD", "J40s", "UB", "H31s"]
MANUFACTURERS = ["ichscan phantom A", "ichscan phantom B", "ichscan phantom C"]


@dataclass
class SeriesHeader:
    """What all slices of a series share."""

    patient_id: str
    patient_name: str
    patient_sex: str
    patient_age: int
    study_uid: str
    series_uid: str
    frame_uid: str
    study_date: str
    study_time: str
    accession: str
    series_number: int
    thickness: float
    spacing: float
    rows: int
    cols: int
    origin_xy: tuple[float, float]
    table_z: float
    encoding: Encoding
    window: tuple
    kernel: str
    manufacturer: str
    kvp: float
    reverse_instances: bool


def _ds(h: SeriesHeader) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ICHSCAN_PHANTOM"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = h.study_date
    ds.SeriesDate = h.study_date
    ds.StudyTime = h.study_time
    ds.AccessionNumber = h.accession
    ds.Modality = "CT"
    ds.Manufacturer = h.manufacturer
    ds.InstitutionName = "ichscan synthetic phantoms"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT HEAD WO CONTRAST (PHANTOM)"
    ds.SeriesDescription = f"AXIAL {h.thickness:g}mm BRAIN"
    ds.PatientName = h.patient_name
    ds.PatientID = h.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = h.patient_sex
    ds.PatientAge = f"{h.patient_age:03d}Y"
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = f"{h.thickness:g}"
    ds.KVP = f"{h.kvp:g}"
    ds.ConvolutionKernel = h.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = h.study_uid
    ds.SeriesInstanceUID = h.series_uid
    ds.StudyID = h.accession[-6:]
    ds.SeriesNumber = h.series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = h.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = h.rows
    ds.Columns = h.cols
    ds.PixelSpacing = [f"{h.spacing:.6f}", f"{h.spacing:.6f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = h.encoding.bits_stored
    ds.HighBit = h.encoding.bits_stored - 1
    ds.PixelRepresentation = 1 if h.encoding.signed else 0
    ds.WindowCenter, ds.WindowWidth = h.window
    ds.RescaleIntercept = f"{h.encoding.intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def write_series(paths: list[str], hu: np.ndarray, z: np.ndarray, sop_uids: list[str], h: SeriesHeader) -> None:
    """Write slice i of ``hu`` (integral HU within the encoding's range) to ``paths[i]``."""
    ds = _ds(h)
    n = len(paths)
    stored = h.encoding.stored(hu)
    for i, path in enumerate(paths):
        number = n - i if h.reverse_instances else i + 1
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uids[i]
        ds.SOPInstanceUID = sop_uids[i]
        ds.InstanceNumber = number
        zpos = float(h.table_z + z[i])
        ds.ImagePositionPatient = [f"{h.origin_xy[0]:.4f}", f"{h.origin_xy[1]:.4f}", f"{zpos:.4f}"]
        ds.SliceLocation = f"{zpos:.4f}"
        ds.PixelData = np.ascontiguousarray(stored[i]).tobytes()
        with atomic_path(path, durable=False) as tmp:
            ds.save_as(tmp, enforce_file_format=True)


def study_datetime(rng: np.random.Generator) -> tuple[str, str]:
    day = _dt.date(2018, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 1000)))
    secs = int(rng.integers(0, 86400))
    return day.strftime("%Y%m%d"), f"{secs // 3600:02d}{secs % 3600 // 60:02d}{secs % 60:02d}"
