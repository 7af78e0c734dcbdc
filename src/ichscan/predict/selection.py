"""Which series of a study to predict: rules on metadata, as data (like MONAI Deploy's series selector).

Ingest (``ichscan.dicom``) reads and flags; the rules here decide, and every series they leave out is
reported with the rule that left it out. numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ichscan.dicom import LOCALIZER_IMAGE_TYPES
from ichscan.geometry import obliquity_degrees

LOCALIZER_WORDS = ("localizer", "localiser", "scout", "topogram", "surview", "scanogram", "dose report")


@dataclass(frozen=True)
class SelectionRules:
    """Which series a triage run predicts; every rule can be switched off.

    ``max_obliquity`` is the angle (degrees) between the slice normal and the patient's head-foot
    axis: 0 for a true axial series, 90 for sagittal or coronal. It applies when ``require_axial``.
    ``max_tilt`` bounds the gantry tilt the series reader measured (``CTSeries.tilt_degrees``);
    None switches that rule off. Series with no orientation tag pass the axial rule (RSNA headers
    always carry it; old exports may not) and say so in the log.
    """

    min_slices: int = 10
    require_axial: bool = True
    max_obliquity: float = 30.0
    max_tilt: float | None = 30.0
    modalities: tuple[str, ...] = ("CT",)
    exclude_image_types: tuple[str, ...] = LOCALIZER_IMAGE_TYPES
    exclude_descriptions: tuple[str, ...] = LOCALIZER_WORDS

    @classmethod
    def permissive(cls) -> SelectionRules:
        """Predict every series that has at least one slice (an RSNA test folder needs all images)."""
        return cls(min_slices=1, require_axial=False, max_tilt=None, modalities=(),
                   exclude_image_types=(), exclude_descriptions=())


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
    return selected, rejected
