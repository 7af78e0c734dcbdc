"""Results as DICOM, for a hospital's systems: a TID 1500 structured report and key images per series.

For one predicted series, ``write_dicom_results`` writes into the patient's study (patient and study modules
copied from the source slices, which are never modified):

* ``sr.dcm``: a Comprehensive 3D SR following TID 1500 (Measurement Report), one TID 1501 measurement group
  per label: the finding as a coded concept, its probability (DCM 122157 "Probability", UCUM
  ``{probability}``), the decision at the run's threshold as a qualitative evaluation (SCT Present /
  Absent), the key slice as the group's source image, and the algorithm (TID 4019: "ichscan", its version,
  the model's sha256 and the threshold, with its interval where the thresholds carry one, as parameters);
  a borderline call (``ichscan.thresholds.ThresholdIntervals``) is also marked "Equivocal" (DCM 111012
  "Certainty of Finding"). A "Qualitative Evaluations" container (TID 1500 row 12) holds the text "research
  use, not for diagnosis". Unverified, preliminary.
* ``key_<label>.dcm`` for each finding called positive (none when nothing is called): a Secondary Capture,
  RGB, of the key slice in the blood window (80/200) with the Grad-CAM heat map (``ichscan.heatmap``)
  blended on, and the finding, its probability (with BORDERLINE and the interval for a borderline call) and
  "RESEARCH USE - NOT FOR DIAGNOSIS" burned in below the image (Burned In Annotation YES).

Every UID made here is derived from (source series UID, model sha256, ichscan version, object kind), so
reprocessing a series makes the same objects: a PACS replaces them rather than storing duplicates. A file
already holding the same object is left as it is (its creation times are kept, so a rerun writes the same
bytes and can tell). The codes, and which are not SNOMED CT, are listed in docs/predict.md.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ichscan import __version__
from ichscan.aggregation import describe_aggregation
from ichscan.errors import IchscanError
from ichscan.labels import LABELS

log = logging.getLogger(__name__)

__all__ = ["BURNED_IN_WARNING", "DISCLAIMER", "FINDINGS", "PRIVATE_SCHEME", "model_sha256", "result_uid",
           "write_dicom_results"]

DISCLAIMER = "research use, not for diagnosis"
BURNED_IN_WARNING = "RESEARCH USE - NOT FOR DIAGNOSIS"
MANUFACTURER = "ichscan"
PRIVATE_SCHEME = "99ICHSCAN"  # private coding scheme designators start with "99" in DICOM
KEY_WINDOW = "blood"  # 80/200 HU
MIN_KEY_IMAGE_SIDE = 512  # smaller slices are enlarged by a whole factor (nearest) so the text stays legible

# (scheme, code value, code meaning, plain name) per label. SNOMED CT only where the code was checked against
# an authoritative source: 1386000 is in the DICOM standard's SNOMED subset (PS3.16, as pydicom ships it);
# 21454007 in a tx.fhir.org expansion of SNOMED CT International 2025-02. The other four subtypes carry codes
# of ichscan's private scheme until their SNOMED CT codes are checked in a SNOMED browser (docs/predict.md).
FINDINGS: dict[str, tuple[str, str, str, str]] = {
    "any": ("SCT", "1386000", "Intracranial hemorrhage", "intracranial hemorrhage"),
    "epidural": (PRIVATE_SCHEME, "EDH", "Epidural hemorrhage", "epidural hemorrhage"),
    "intraparenchymal": (PRIVATE_SCHEME, "IPH", "Intraparenchymal hemorrhage", "intraparenchymal hemorrhage"),
    "intraventricular": (PRIVATE_SCHEME, "IVH", "Intraventricular hemorrhage", "intraventricular hemorrhage"),
    "subarachnoid": ("SCT", "21454007", "Subarachnoid intracranial hemorrhage", "subarachnoid hemorrhage"),
    "subdural": (PRIVATE_SCHEME, "SDH", "Subdural hemorrhage", "subdural hemorrhage"),
}
PROBABILITY_UNIT = ("{probability}", "UCUM", "probability")
SR_NAME = "sr.dcm"
KEY_PATTERN = "key_{label}.dcm"
# Set from the clock when an object is first made; kept from the file already there when it is made again.
_STAMPED = (("InstanceCreationDate", "InstanceCreationTime"), ("ContentDate", "ContentTime"),
            ("SeriesDate", "SeriesTime"), ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"))
_SAFE = re.compile(r"[^0-9A-Za-z._-]")
_VALID_SEX = ("M", "F", "O", "")


# --------------------------------------------------------------------------------------------------
# identity of the model and of the objects made from it


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    from ichscan.model import sha256_file

    return sha256_file(path)


def _state_sha256(model: Any) -> str:
    """For a model that came from no file (``Predictor.from_models``): its parameters and buffers, in order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _member_sha256(member: Any) -> str:
    weights = Path(member.meta.weights)
    if weights.is_file():
        st = weights.stat()
        return _file_sha256(str(weights.resolve()), st.st_size, st.st_mtime_ns)
    return _state_sha256(member.model)


def model_sha256(predictor: Any) -> str:
    """The sha256 of the model's weights (``ichscan.model.sha256_file`` of its .safetensors); for an ensemble,
    the sha256 of its members' hashes and weights, one ``<sha256> <weight>`` line each, in order."""
    members = list(predictor.ensemble.members)
    hashes = [_member_sha256(m) for m in members]
    if len(members) == 1:
        return hashes[0]
    lines = "".join(f"{h} {float(m.weight)!r}\n" for h, m in zip(hashes, members))
    return hashlib.sha256(lines.encode()).hexdigest()


def result_uid(series_uid: str, model_hash: str, kind: str, version: str = __version__) -> str:
    """A UID that is the same whenever the same series is processed by the same model and ichscan version:
    ``kind`` names the object (``sr``, ``sr-series``, ``key-series``, ``key-<label>``, ...)."""
    from pydicom.uid import generate_uid

    # one string with separators: generate_uid joins its sources without any
    return str(generate_uid(entropy_srcs=["\x1f".join(("ichscan-dicom-results", str(series_uid), model_hash,
                                                         version, kind))]))


# --------------------------------------------------------------------------------------------------
# source headers


def _read_header(path: str) -> Any:
    """The header of a source slice (file or zip member) through ichscan's reader, every element read (a
    headers-only read defers large ones to a file that a zip member no longer has open); pixels dropped."""
    from ichscan.dicom import _dcmread, _source_for

    ds = _dcmread(_source_for(path), pixels=True)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _reference_dataset(header: Any) -> Any:
    """A copy of the source header that highdicom can take patient and study from: type 2 attributes it reads
    present (empty when the source lacks them), a patient sex outside M/F/O left empty."""
    from pydicom.dataset import Dataset

    ref = Dataset()
    for elem in header:  # identification, patient, study and series attributes; sequences of the first two only
        groups = (0x0008, 0x0010) if elem.VR == "SQ" else (0x0008, 0x0010, 0x0020, 0x0032)
        if elem.tag.group in groups:
            ref.add(elem)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):
        if keyword not in ref or ref[keyword].value is None:
            setattr(ref, keyword, "")
    if str(ref.PatientSex).strip().upper() not in _VALID_SEX:
        log.warning("%s: PatientSex %r is not M, F or O; left empty in the DICOM results",
                    ref.get("SOPInstanceUID", "source slice"), str(ref.PatientSex))
        ref.PatientSex = ""
    if "SpecificCharacterSet" in header:
        ref.SpecificCharacterSet = header.SpecificCharacterSet
    return ref


def _patient_orientation(orientation: tuple | None) -> tuple[str, str] | None:
    """Patient Orientation (row direction, column direction) letters from Image Orientation (Patient)."""
    if orientation is None or len(orientation) != 6:
        return None
    letters = []
    for vector in (orientation[:3], orientation[3:]):
        v = np.asarray(vector, dtype=float)
        text = ""
        for axis in np.argsort(-np.abs(v)):
            if abs(v[axis]) < 0.25 or len(text) == 3:
                break
            text += ("L", "P", "H")[axis] if v[axis] > 0 else ("R", "A", "F")[axis]
        if not text:
            return None
        letters.append(text)
    return letters[0], letters[1]


# --------------------------------------------------------------------------------------------------
# key images


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_band(width: int, lines: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """Black band of ``width`` px holding ``lines`` (text, colour), each shrunk until it fits: uint8 (h, w, 3)."""
    from PIL import Image, ImageDraw

    size = max(10, width // 34)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    fonts = []
    for text, _ in lines:
        s = size
        while s > 8 and probe.textlength(text, font=_font(s)) > width - 8:
            s -= 1
        fonts.append(_font(s))
    line_h = int(size * 1.35)
    band = Image.new("RGB", (width, line_h * len(lines) + size // 2), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for i, ((text, colour), font) in enumerate(zip(lines, fonts)):
        draw.text((4, size // 4 + i * line_h), text, fill=colour, font=font)
    return np.asarray(band)


def key_image_pixels(hu: np.ndarray, heat: np.ndarray, lines: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """The picture of a key image: the slice in the blood window with the heat map blended on, enlarged by the
    whole factor ``ceil(512 / longer side)`` (nearest, so every pixel keeps a source pixel's value), and a
    band of text below it: uint8 (rows, columns, 3)."""
    from ichscan.heatmap import overlay
    from ichscan.windows import window_image

    grey = window_image(hu, KEY_WINDOW, size=None, dtype=np.uint8)[0]
    picture = overlay(grey, heat)
    k = max(1, math.ceil(MIN_KEY_IMAGE_SIDE / max(grey.shape)))
    if k > 1:
        picture = np.repeat(np.repeat(picture, k, axis=0), k, axis=1)
    return np.ascontiguousarray(np.concatenate([picture, _text_band(picture.shape[1], lines)], axis=0))


# --------------------------------------------------------------------------------------------------
# the objects


def _code(label: str):
    from highdicom.sr import CodedConcept

    scheme, value, meaning, _ = FINDINGS[label]
    return CodedConcept(value, scheme, meaning)


def _series_number(header: Any, offset: int) -> int:
    try:
        base = int(header.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        base = 0
    number = base * 100 + offset if 0 <= base < 20_000_000 else offset
    return max(1, number)


def _source_item(s: Any, header: Any):
    from highdicom.sr import SourceImageForMeasurementGroup

    frames = [int(s.frame) + 1] if getattr(s, "frame", None) is not None else None
    return SourceImageForMeasurementGroup(str(header.SOPClassUID), str(header.SOPInstanceUID), frames)


def _build_sr(prediction: Any, keys: dict[str, tuple[Any, Any]], predictor: Any, thresholds: Mapping[str, float],
              decisions: Mapping[str, bool], model_hash: str, when, intervals: Any = None,
              borderline: Mapping[str, bool | None] | None = None) -> Any:
    import highdicom as hd
    from highdicom.sr import (
        AlgorithmIdentification,
        CodedConcept,
        Comprehensive3DSR,
        ContainerContentItem,
        DeviceObserverIdentifyingAttributes,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        TextContentItem,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    series_uid = str(prediction.series_uid)
    described = predictor.describe()
    common = [f"model sha256 {model_hash}", f"members {len(described['members'])}",
              "aggregation " + describe_aggregation(described["aggregation"], described["top_k"],
                                                     predictor.label_aggregation, LABELS),
              f"tta {'+'.join(described['tta'])}",
              "decision: present when probability >= threshold; a subtype only where intracranial hemorrhage is"]
    groups = []
    for label in LABELS:
        s, header = keys[label]
        t = float(thresholds.get(label, 0.5))
        zone = intervals.zone(label, t) if intervals is not None else None
        parameters = common + [f"threshold {t!r}"]
        if zone is not None:
            parameters.append(f"threshold {intervals.level:.0%} interval {zone[0]!r} to {zone[1]!r} (a probability "
                              "inside it is a borderline call)")
        algorithm = AlgorithmIdentification(name="ichscan", version=__version__, parameters=parameters)
        probability = Measurement(name=codes.DCM.Probability, value=float(prediction.prob(label)),
                                  unit=CodedConcept(*PROBABILITY_UNIT))
        evaluations = [QualitativeEvaluation(_code(label),
                                             codes.SCT.Present if decisions[label] else codes.SCT.Absent)]
        if (borderline or {}).get(label):
            evaluations.append(QualitativeEvaluation(codes.DCM.CertaintyOfFinding, codes.SCT.Equivocal))
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=result_uid(series_uid, model_hash, f"tracking-{label}"),
                                                   identifier=f"ichscan {label}"),
            finding_type=_code(label), algorithm_id=algorithm, measurements=[probability],
            qualitative_evaluations=evaluations, source_images=[_source_item(s, header)]))
    device = DeviceObserverIdentifyingAttributes(uid=result_uid("device", model_hash, "device"), name="ichscan",
                                                 manufacturer_name=MANUFACTURER, model_name=f"ichscan {__version__}")
    context = ObservationContext(observer_device_context=ObserverContext(codes.DCM.Device, device))
    images = list({str(h.SOPInstanceUID): h for _, h in (keys[n] for n in LABELS)}.values())
    try:  # TID 1600 Image Library: what highdicom can describe of the key slices (CT single frames always)
        report = MeasurementReport(observation_context=context, procedure_reported=codes.LN.HeadCT,
                                   imaging_measurements=groups, referenced_images=images)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        log.debug("series %s: SR without image library (%s)", series_uid, err)
        report = MeasurementReport(observation_context=context, procedure_reported=codes.LN.HeadCT,
                                   imaging_measurements=groups)
    # TID 1500 row 12: qualitative evaluations of the whole report, here the one thing every reader must see
    notes = ContainerContentItem(CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
                                 relationship_type="CONTAINS")
    texts = [DISCLAIMER]
    if predictor.trained_on:
        texts.append(f"model trained on {predictor.trained_on}")
    notes.ContentSequence = [TextContentItem(codes.DCM.Comment, text, relationship_type="CONTAINS")
                             for text in texts]
    report[0].ContentSequence.append(notes)

    evidence = list({str(h.SOPInstanceUID): _reference_dataset(h) for _, h in (keys[n] for n in LABELS)}.values())
    schemes = [hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME, name="ichscan findings", responsible_organization="ichscan project")]
    sr = Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=result_uid(series_uid, model_hash, "sr-series"),
        series_number=_series_number(keys["any"][1], 91),
        sop_instance_uid=result_uid(series_uid, model_hash, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        series_description=f"ichscan ICH findings ({DISCLAIMER})",
        manufacturer_model_name="ichscan", software_versions=__version__,
        coding_schemes=schemes,
        content_date=when.date(), content_time=when.time(), series_date=when.date(), series_time=when.time(),
    )
    return sr


def _build_key_image(prediction: Any, label: str, s: Any, header: Any, hu: np.ndarray, heat: np.ndarray,
                     threshold: float, number: int, model_hash: str, when, sources: Sequence[Any] = (),
                     borderline: str | None = None) -> Any:
    from highdicom.sc import SCImage
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian

    key = prediction.key_slice(label)
    name = FINDINGS[label][3]
    z = f", z {key.z:.1f} mm" if key.z is not None else ""
    lines = [(f"{name}: probability {prediction.prob(label):.3f} (threshold {threshold:.3f})", (255, 255, 255)),
             (f"key {prediction.slab_text(key.index)}{z}; heat map: Grad-CAM, ichscan {__version__}",
              (200, 200, 200)),
             (BURNED_IN_WARNING, (255, 170, 0))]
    if borderline:
        lines.insert(1, (f"BORDERLINE: inside the threshold's {borderline}", (255, 170, 0)))
    pixels = key_image_pixels(hu, heat, lines)
    orientation = _patient_orientation(getattr(s, "orientation", None))
    series_uid = str(prediction.series_uid)
    ref = _reference_dataset(header)
    image = SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=result_uid(series_uid, model_hash, "key-series"),
        series_number=_series_number(header, 92), sop_instance_uid=result_uid(series_uid, model_hash, f"key-{label}"),
        instance_number=number, manufacturer=MANUFACTURER, patient_orientation=orientation or ("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"ichscan key images ({DISCLAIMER})", manufacturer_model_name="ichscan",
        software_versions=__version__, content_date=when.date(), content_time=when.time(),
        series_date=when.date(), series_time=when.time())
    image.copy_patient_and_study_information(ref)  # the whole modules, as the SR has them (study description...)
    if orientation is None:
        image.PatientOrientation = ""  # type 2C: unknown
    if str(header.get("BodyPartExamined", "")).strip():
        image.BodyPartExamined = header.BodyPartExamined
    else:
        image.Laterality = ""  # type 2C: the body part is not named, so whether it is paired is unknown
    image.BurnedInAnnotation = "YES"
    image.RecognizableVisualFeatures = "NO"
    image.LossyImageCompression = "00"
    image.ImageComments = f"{name}; {DISCLAIMER}"
    what = "key slice" if len(sources) <= 1 else f"key slab ({len(sources)} slices averaged in HU)"
    image.DerivationDescription = (f"{what} of {label} in the blood window 80/200 with the ichscan Grad-CAM heat "
                                   f"map blended on; {DISCLAIMER}")[:1024]
    refs = []
    for t in sources or [s]:  # the key slice first, then the rest of its slab
        source = Dataset()
        source.ReferencedSOPClassUID = header.SOPClassUID
        source.ReferencedSOPInstanceUID = t.sop_uid if t is not s else header.SOPInstanceUID
        if getattr(t, "frame", None) is not None:
            source.ReferencedFrameNumber = int(t.frame) + 1
        refs.append(source)
    image.SourceImageSequence = refs
    return image


# --------------------------------------------------------------------------------------------------
# writing


def _made_at(path: Path, sop_uid: str):
    """When the object ``sop_uid`` already in ``path`` was made (its Instance Creation Date and Time), else None."""
    import datetime

    import pydicom

    if not path.is_file():
        return None
    try:
        old = pydicom.dcmread(path, stop_before_pixels=True)
        if str(old.get("SOPInstanceUID", "")) != sop_uid:
            return None
        return datetime.datetime.strptime(f"{old.InstanceCreationDate}{str(old.InstanceCreationTime)[:6]}",
                                          "%Y%m%d%H%M%S")
    except Exception:  # noqa: BLE001 - whatever is there and unreadable is simply replaced
        return None


def _stamp(ds: Any, when) -> None:
    """Every creation date and time of ``ds`` set to ``when`` (whole seconds): one moment per object."""
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    for date_kw, time_kw in _STAMPED:
        if date_kw in ds:
            setattr(ds, date_kw, date)
        if time_kw in ds:
            setattr(ds, time_kw, time)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + time


def _encoded(ds: Any, path: Path, now) -> bytes:
    """The bytes ``ds`` is to be written as, stamped with ``now``; but when ``path`` already holds this very
    object as made at an earlier time, the bytes of that file (so a series processed again rewrites nothing)."""
    made = _made_at(path, str(ds.SOPInstanceUID))
    for when in ([made] if made is not None else []) + [now]:
        _stamp(ds, when)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        if when is now or data == path.read_bytes():
            return data
    raise AssertionError("unreachable")


def _folder(out_dir: Path, prediction: Any) -> Path:
    digest = hashlib.sha1(f"{prediction.study_uid}|{prediction.series_uid}".encode()).hexdigest()[:10]
    return out_dir / f"{_SAFE.sub('_', str(prediction.series_uid))[:80]}-{digest}"


def _key_slices(prediction: Any, series: Any) -> dict[str, list[Any]]:
    """label -> the CTSlices the model read as its key image, matched by SOP instance UID and image id (frames
    of one file): the key slice alone, or the slices of its slab (``ichscan predict --slab``), the key slice
    (the slab's middle one) first."""
    by_id = {(str(s.sop_uid), str(s.image_id)): s for s in series.slices}
    out = {}
    for label in LABELS:
        key = prediction.key_slice(label)
        members = [key.index] + [i for i in prediction.slab_members(key.index) if i != key.index]
        found = []
        for i in members:
            s = by_id.get((str(prediction.sop_uids[i]), str(prediction.image_ids[i])))
            if s is None:
                raise IchscanError(f"the key slice of {label} ({prediction.image_ids[i]}) is not in this series; "
                                   "predict it again", f"series {prediction.series_uid}")
            found.append(s)
        out[label] = found
    return out


def _hu(s: Any) -> np.ndarray:
    from ichscan.dicom import iter_hu

    for _, hu in iter_hu([s], allow_non_ct=True):
        if isinstance(hu, IchscanError):
            raise hu
        return hu
    raise IchscanError("no pixels", s.path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def write_dicom_results(prediction: Any, series: Any, predictor: Any, out_dir: str | os.PathLike, *,
                        thresholds: Mapping[str, float], intervals: Any = None) -> list[Path]:
    """Write the DICOM results of one series to ``out_dir/<series>/``; returns the paths of its objects.

    ``prediction`` (an ``ichscan.predict.SeriesPrediction``) of ``series`` (its ``ichscan.dicom.CTSeries``,
    headers-only is enough) by ``predictor``, called at ``thresholds`` ({label: t}; 0.5 where a label has
    none): the structured report ``sr.dcm`` and a key image ``key_<label>.dcm`` per finding called positive.
    With ``intervals`` (``ichscan.thresholds.ThresholdIntervals``), each threshold's interval is one more
    algorithm parameter, and a borderline call gets a second qualitative evaluation (DCM 111012 "Certainty of
    Finding" = SCT 42425007 "Equivocal") and a line on its key image saying so.
    Objects already there unchanged are not rewritten (their paths are still returned); key images of
    findings no longer called are removed. Everything is built before the first file is written, so a
    failure leaves the series' earlier objects as they were; it is one ``IchscanError`` line naming the file.
    """
    import datetime

    from ichscan.fileio import write_bytes
    from ichscan.heatmap import grad_cam
    from ichscan.nifti import is_nifti
    from ichscan.predict.predictor import slab_mean

    out = Path(out_dir)
    folder = _folder(out, prediction)
    decisions = prediction.decisions(dict(thresholds))
    borderline = prediction.borderline(dict(thresholds), intervals)
    read = _key_slices(prediction, series)
    slices = {label: members[0] for label, members in read.items()}
    model_hash = model_sha256(predictor)
    when = datetime.datetime.now().replace(microsecond=0)
    headers: dict[str, Any] = {}  # one read per file, however many findings share its slice
    for s in slices.values():
        if is_nifti(s.path):
            raise IchscanError("a NIfTI volume belongs to no DICOM study, so there is none to add DICOM results "
                               "to; predict the DICOM series instead", s.path)
        if str(s.path) not in headers:
            headers[str(s.path)] = _read_header(s.path)
    keys = {label: (s, headers[str(s.path)]) for label, s in slices.items()}
    images: dict[tuple[str, ...], np.ndarray] = {}  # one decode per key slice or slab, however many findings share it
    source = str(slices["any"].path)
    try:
        objects = {folder / SR_NAME: _build_sr(prediction, keys, predictor, thresholds, decisions, model_hash, when,
                                               intervals, borderline)}
        for number, label in enumerate(LABELS, start=1):  # instance numbers fixed by label, whatever is called
            if not decisions[label]:
                continue
            s, header = keys[label]
            source = str(s.path)
            shown = tuple(str(t.image_id) for t in read[label])
            if shown not in images:  # what the model read: the key slice, or the mean of its slab's slices
                images[shown] = slab_mean([_hu(t) for t in read[label]])
            hu = images[shown]
            heat = grad_cam(predictor, hu, label, spacing=s.spacing)
            t = float(thresholds.get(label, 0.5))
            objects[folder / KEY_PATTERN.format(label=label)] = _build_key_image(
                prediction, label, s, header, hu, heat, t, number, model_hash, when, sources=read[label],
                borderline=intervals.describe(label, t) if borderline[label] else None)
        encoded = {path: _encoded(ds, path, when) for path, ds in objects.items()}
    except IchscanError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as err:
        raise IchscanError(f"DICOM results of series {prediction.series_uid} not made from this slice "
                           f"({type(err).__name__}: {_first_line(err)})", source) from err
    for path, data in encoded.items():
        if path.is_file() and path.read_bytes() == data:
            continue
        try:
            write_bytes(path, data)
        except OSError as err:
            raise IchscanError(f"cannot write this DICOM result ({err.strerror or err}); check the folder", path) from err
    for label in LABELS:
        stale = folder / KEY_PATTERN.format(label=label)
        if stale not in encoded and stale.is_file():
            stale.unlink()
    return sorted(encoded)
