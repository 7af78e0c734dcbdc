"""Which series of a study to predict: rules as data (like MONAI Deploy's series selector).

Ingest (``ichscan.dicom``) reads and flags; the rules here decide, and every series they leave out is
reported with the rule that left it out. numpy (and scipy for the head check) only.

Every rule reads metadata except the head check, which also reads the pixels of a few slices: the
model was made for head CT and scores anything it is given, a chest as readily as a head, so a series
is predicted only when its images show a head (``looks_like_head``) and its metadata does not say it is
something else. Metadata alone never passes a series: an image check must agree.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ichscan.dicom import LOCALIZER_IMAGE_TYPES, iter_hu
from ichscan.errors import IchscanError
from ichscan.geometry import obliquity_degrees, same_scan

log = logging.getLogger(__name__)

LOCALIZER_WORDS = ("localizer", "localiser", "scout", "topogram", "surview", "scanogram", "dose report")
# Words of BodyPartExamined, SeriesDescription and ProtocolName (whole words, any case; DICOM's defined
# terms, common English abbreviations, and the German, French, Spanish and Italian ones met in exports).
HEAD_WORDS = ("HEAD", "BRAIN", "SKULL", "CRANIUM", "CRANIAL", "CEREBRAL", "NEURO", "HEADNECK", "CCT", "KOPF",
              "SCHAEDEL", "SCHADEL", "SCHÄDEL", "HIRN", "CRANE", "CERVEAU", "CABEZA", "CRANEO", "CRANIO",
              "ENCEFALO")
NOT_HEAD_WORDS = ("CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "PULMONARY", "CARDIAC", "HEART", "CORONARY",
                  "BREAST", "ABDOMEN", "ABD", "ABDO", "PELVIS", "PELVIC", "LIVER", "KIDNEY", "RENAL",
                  "CHESTABDOMEN", "ABDOMENPELVIS", "CHESTABDPELVIS", "ABDPELVIS", "TSPINE", "LSPINE",
                  "T SPINE", "L SPINE", "LUMBAR", "SACRUM", "COCCYX", "EXTREMITY", "ARM", "SHOULDER", "ELBOW",
                  "WRIST", "HAND", "HIP", "LEG", "FEMUR", "KNEE", "TIBIA", "ANKLE", "FOOT", "LUNGE", "BECKEN",
                  "LEBER", "NIERE")

# The image check (physics, not policy). Slices are looked at on a grid of about GRID_MM: enough to
# see a skull of 4-7 mm and quick (a few ms a slice).
GRID_MM = 2.0
BONE_HU = 300.0  # skull: cortical bone 700-2000 HU; a block with any pixel above this counts as bone
BRAIN_HU = (0.0, 80.0)  # CSF, brain and fresh blood
# Inner diameter of the skull, as the diameter of a disc of the same area: 120-170 mm in adults at the
# level of the ventricles; the lower bound lets the smaller levels near the skull base and vertex, and
# children, pass, while the spinal canal (15-20 mm) stays far below it.
HEAD_DIAMETER_MM = (80.0, 220.0)
# Fractions: of the brain region's outline that is bone (0.8-1.0 at the level of the ventricles in the real
# heads of ../shared/realct; 0.4 for the mediastinum of tests/_dicomfactory's chest), and of the region
# inside that outline that is brain density (not lung, not fat).
MIN_BONE_OUTLINE = 0.6
MIN_BRAIN_FILL = 0.8
NOISE_SLICES = 3  # slices from the middle of a series read to measure its pixel noise


@dataclass(frozen=True)
class SelectionRules:
    """Which series a triage run predicts; every rule can be switched off.

    ``max_obliquity`` is the angle (degrees) between the slice normal and the patient's head-foot
    axis: 0 for a true axial series, 90 for sagittal or coronal. It applies when ``require_axial``.
    ``max_tilt`` bounds the gantry tilt the series reader measured (``CTSeries.tilt_degrees``);
    None switches that rule off. Series with no orientation tag pass the axial rule (RSNA headers
    always carry it; old exports may not) and say so in the log.

    ``head_check``: the series must look like a head CT: a skull ring around brain-density tissue on at
    least ``min_head_fraction`` of ``head_check_slices`` slices from the middle half of the series, and no
    word of ``not_head_words`` in BodyPartExamined, SeriesDescription or ProtocolName unless one of
    ``head_words`` is there too (a "HEAD AND CHEST" series is judged by its images). ``not_head_ok``
    predicts a series that fails it too, with a warning, instead of rejecting it.

    ``one_per_scan``: of several series that are reconstructions of one scan (``geometry.same_scan``: a
    soft-tissue and a bone kernel, thin and thick slices), only the one with the least pixel noise
    (``pixel_noise``) is predicted, the reconstruction the model was made for; the others are rejected,
    naming it.
    """

    min_slices: int = 10
    require_axial: bool = True
    max_obliquity: float = 30.0
    max_tilt: float | None = 30.0
    modalities: tuple[str, ...] = ("CT",)
    exclude_image_types: tuple[str, ...] = LOCALIZER_IMAGE_TYPES
    exclude_descriptions: tuple[str, ...] = LOCALIZER_WORDS
    head_check: bool = True
    not_head_ok: bool = False
    head_words: tuple[str, ...] = HEAD_WORDS
    not_head_words: tuple[str, ...] = NOT_HEAD_WORDS
    head_check_slices: int = 8
    min_head_fraction: float = 0.5
    one_per_scan: bool = True

    @classmethod
    def permissive(cls) -> SelectionRules:
        """Predict every series that has at least one slice (an RSNA test folder needs all images)."""
        return cls(min_slices=1, require_axial=False, max_tilt=None, modalities=(),
                   exclude_image_types=(), exclude_descriptions=(), head_check=False, one_per_scan=False)


@dataclass(frozen=True)
class RejectedSeries:
    """A series left out by ``select_series``: ``rule`` is the field of SelectionRules that failed."""

    patient_id: str | None
    study_uid: str | None
    series_uid: str
    n_slices: int
    rule: str
    detail: str


def _series_description(first: Any) -> str:
    return str(getattr(first, "series_description", "") or "")


def _image_type_tokens(first: Any) -> set[str]:
    image_type = getattr(first, "image_type", None) or ()
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return {str(t).strip().upper() for t in image_type}


# ---------------------------------------------------------------------------------------- head check


_SEPARATORS = re.compile(r"[\W_]+")


def _words(text: str) -> str:
    """Upper case, each run of characters other than letters and digits one space, padded at both ends:
    ``" CT CHEST ABD "`` for ``'CT_Chest/Abd'``, so that words and phrases match whole."""
    return " " + _SEPARATORS.sub(" ", text.upper()).strip() + " "


def _metadata_says_not_head(first: Any, rules: SelectionRules) -> str | None:
    """What in the metadata says "not a head", or None (it says head, says nothing, or says both)."""
    fields = (("body part", getattr(first, "body_part", "")),
              ("series description", _series_description(first)),
              ("protocol name", getattr(first, "protocol_name", "")))
    texts = [(name, str(value or "")) for name, value in fields]

    def found(words: tuple[str, ...], text: str) -> str | None:
        return next((w for w in words if _words(w) in _words(text)), None)

    if any(found(rules.head_words, text) for _, text in texts):
        return None
    for name, text in texts:
        word = found(rules.not_head_words, text)
        if word:
            return f"body part {text}" if name == "body part" else f"{name} {text!r} says {word}"
    return None


def _block_reduce(hu: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """(max, mean) over factor x factor blocks: thin bone survives in the max, tissue density in the mean."""
    h, w = (hu.shape[0] // factor) * factor, (hu.shape[1] // factor) * factor
    blocks = hu[:h, :w].reshape(h // factor, factor, w // factor, factor)
    return blocks.max(axis=(1, 3)), blocks.mean(axis=(1, 3))


def looks_like_head(hu: np.ndarray, spacing: tuple[float, float] | None) -> bool:
    """One axial slice (HU, pixel spacing in mm) shows brain-density tissue inside a skull ring.

    The largest connected region of brain density (``BRAIN_HU``), kept one block away from bone so it
    cannot leak out through a thin or partial-volumed skull, must, with its holes filled and that block
    added back round it, have the area of a disc of ``HEAD_DIAMETER_MM``, be brain density for
    ``MIN_BRAIN_FILL`` of it (lungs and fat are not), and have bone along ``MIN_BONE_OUTLINE`` of its
    outline (sutures and foramina are gaps).
    """
    from scipy import ndimage

    if spacing is None or min(spacing) <= 0:
        return False  # no scale: a head cannot be told from anything else
    factor = max(1, round(GRID_MM / min(spacing)))
    peak, mean = _block_reduce(np.asarray(hu, dtype=np.float32), factor)
    bone = ndimage.binary_dilation(peak > BONE_HU)
    brain = (mean >= BRAIN_HU[0]) & (mean <= BRAIN_HU[1]) & ~bone
    labels, n = ndimage.label(brain)
    if n == 0:
        return False
    region = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    filled = ndimage.binary_fill_holes(region)
    outline = ndimage.binary_dilation(filled) & ~filled
    # The region was kept one block from the bone; the cavity it stands for reaches that block further, so
    # its size is measured with the outline in (at 64 px a block is 3 mm, and a small head's posterior
    # fossa measured 75 mm without it and 82 with it; at 512 px the block is under 2 mm).
    diameter = 2.0 * np.sqrt((filled.sum() + outline.sum()) * spacing[0] * spacing[1] * factor**2 / np.pi)
    if not outline.any():
        return False  # the region fills the image: nothing surrounds it
    return bool(HEAD_DIAMETER_MM[0] <= diameter <= HEAD_DIAMETER_MM[1]
                and region.sum() >= MIN_BRAIN_FILL * filled.sum()
                and bone[outline].mean() >= MIN_BONE_OUTLINE)


def _head_check_indices(n: int, count: int) -> list[int]:
    """Up to ``count`` slices spread over the middle half of a series of ``n`` (the vault, for a head)."""
    low, high = n // 4, max(n // 4, n - 1 - n // 4)
    return sorted({int(i) for i in np.linspace(low, high, max(1, min(count, high - low + 1))).round()})


def _head_check_failure(series: Any, rules: SelectionRules) -> str | None:
    """Why ``series`` does not look like a head CT, or None when it does."""
    problems = []
    said = _metadata_says_not_head(series.slices[0], rules)
    if said:
        problems.append(said)
    checked = heads = 0
    first_error = None
    chosen = [series.slices[i] for i in _head_check_indices(len(series.slices), rules.head_check_slices)]
    for s, hu in iter_hu(chosen, allow_non_ct=True):  # ingest has judged the modality already
        if isinstance(hu, IchscanError):
            first_error = first_error or hu
            continue
        checked += 1
        heads += looks_like_head(hu, getattr(s, "spacing", None))
    if checked == 0:  # every chosen slice gave an error
        problems.append(f"none of the slices chosen for the head check could be read ({first_error})")
    elif heads < rules.min_head_fraction * checked:
        problems.append(f"skull ring around brain-density tissue on {heads} of {checked} checked slices "
                        f"(at least {rules.min_head_fraction:.0%} needed)")
    elif said:
        problems[-1] += f", though {heads} of {checked} checked slices show a skull ring"
    return "; ".join(problems) or None


# ---------------------------------------------------------------------------------------- selection


def _reject_reason(series: Any, rules: SelectionRules) -> tuple[str, str] | None:
    slices = series.slices
    if not slices:
        return "min_slices", "no slices"
    first = slices[0]
    if rules.modalities:
        modality = str(getattr(first, "modality", "") or "").upper()
        if modality not in {m.upper() for m in rules.modalities}:
            return "modalities", f"modality {modality or 'missing'} not in {', '.join(rules.modalities)}"
    excluded = _image_type_tokens(first) & {t.upper() for t in rules.exclude_image_types}
    if excluded:
        return "exclude_image_types", f"image type {'/'.join(sorted(excluded))} (a localizer, not a scan)"
    description = _series_description(first).lower()
    for word in rules.exclude_descriptions:
        if word.lower() in description:
            return "exclude_descriptions", f"series description {description!r} contains {word!r}"
    if len(slices) < rules.min_slices:
        return "min_slices", f"{len(slices)} slices, fewer than {rules.min_slices}"
    if rules.require_axial and first.orientation is not None:
        angle = obliquity_degrees(first.orientation)
        if angle > rules.max_obliquity:
            return "max_obliquity", f"slice plane {angle:.0f} degrees from axial (limit {rules.max_obliquity:g})"
    tilt = getattr(series, "tilt_degrees", None)
    if rules.max_tilt is not None and tilt is not None and abs(tilt) > rules.max_tilt:
        return "max_tilt", f"gantry tilt {tilt:.0f} degrees (limit {rules.max_tilt:g})"
    if rules.head_check:  # last: the only rule that reads pixels
        failure = _head_check_failure(series, rules)
        if failure and not rules.not_head_ok:
            return "head_check", failure
        if failure:
            log.warning("series %s does not look like a head CT (%s); predicted anyway (not_head_ok): the model "
                        "was made for head CT and its probabilities here mean nothing", series.series_uid, failure,
                        extra={"not_head": failure, "series_uid": str(series.series_uid)})
    return None


def select_series(series: Iterable[Any], rules: SelectionRules | None = None) -> tuple[list, list[RejectedSeries]]:
    """Split series into (selected, rejected) by ``rules``; order kept."""
    rules = rules or SelectionRules()
    selected, rejected = [], []
    for s in series:
        reason = _reject_reason(s, rules)
        if reason is None:
            selected.append(s)
        else:
            rejected.append(RejectedSeries(s.patient_id, s.study_uid, s.series_uid, len(s.slices), *reason))
    if rules.one_per_scan:
        kept, others = _one_per_scan(selected)
        selected = [s for s in selected if id(s) in kept]
        rejected += others
    return selected, rejected


# ---------------------------------------------------------------------------------------- one per scan


def pixel_noise(hu: np.ndarray) -> float | None:
    """Pixel-to-pixel noise of one slice in HU: the standard deviation that white noise of this size would
    have, from the differences of horizontal neighbours in brain-density tissue (both pixels where a 5x5
    mean lies in ``BRAIN_HU``): their standard deviation / sqrt(2), over the differences within three
    robust standard deviations (1.4826 x the median absolute deviation, at least 1 HU) of their median, so
    that anatomy's few edges barely move it. A sharp (bone) kernel or a thin slice gives more; None
    without such tissue."""
    from scipy import ndimage

    hu = np.asarray(hu, dtype=np.float32)
    smooth = ndimage.uniform_filter(hu, 5)
    tissue = (smooth >= BRAIN_HU[0]) & (smooth <= BRAIN_HU[1])
    pair = tissue[:, 1:] & tissue[:, :-1]
    if pair.sum() < 200:
        return None
    d = (hu[:, 1:] - hu[:, :-1])[pair]
    centre = np.median(d)
    spread = max(1.4826 * float(np.median(np.abs(d - centre))), 1.0)
    core = d[np.abs(d - centre) <= 3.0 * spread]
    return float(core.std() / np.sqrt(2.0))


def series_noise(series: Any) -> float | None:
    """The median ``pixel_noise`` of up to ``NOISE_SLICES`` slices from the middle of ``series``."""
    n = len(series.slices)
    middle = np.linspace(n // 3, max(n // 3, n - 1 - n // 3), NOISE_SLICES).round()
    chosen = [series.slices[i] for i in sorted({int(i) for i in middle})]
    values = [v for _, hu in iter_hu(chosen, allow_non_ct=True) if not isinstance(hu, IchscanError)
              for v in [pixel_noise(hu)] if v is not None]
    return float(np.median(values)) if values else None


def _one_per_scan(selected: list) -> tuple[set[int], list[RejectedSeries]]:
    """(ids of the series kept, the others rejected): one series per group of ``same_scan`` reconstructions,
    the least noisy (ties and series without a measure: the first in order)."""
    by_study: dict[str, list[list]] = {}  # a study's groups: only series of one study can be one scan
    for s in selected:
        groups_of_study = by_study.setdefault(str(s.study_uid), [])
        home = next((g for g in groups_of_study if any(same_scan(s, t) for t in g)), None)
        if home is None:
            groups_of_study.append([s])
        else:
            home.append(s)
    groups = [g for study in by_study.values() for g in study]
    kept, rejected = set(), []
    for group in groups:
        if len(group) == 1:
            kept.add(id(group[0]))
            continue
        noise = {id(s): series_noise(s) for s in group}
        best = min(group, key=lambda s: (noise[id(s)] is None, noise[id(s)] or 0.0))
        kept.add(id(best))

        def said(s):
            return "noise not measured" if noise[id(s)] is None else f"pixel noise {noise[id(s)]:.1f} HU"

        for s in group:
            if s is best:
                continue
            detail = (f"another reconstruction of the same scan is predicted: series {best.series_uid} "
                      f"({len(best.slices)} slices, {said(best)}); this one has {said(s)} (a sharper kernel or "
                      "thinner slices than the model was made for)")
            rejected.append(RejectedSeries(s.patient_id, s.study_uid, s.series_uid, len(s.slices), "one_per_scan",
                                           detail))
    return kept, rejected
