"""Operating points: one threshold per label, how they are read, checked and chosen for a run.

The one reader of thresholds files (``{"method": ..., "thresholds": {label: t}, ...}``, as ``ichscan
thresholds`` and ``metrics.save_thresholds`` write them) and of the operating points a checkpoint or an
ensemble manifest carries. ``metrics`` chooses thresholds, ``model`` stores them with the weights, ``predict``
applies them; all three come here to read them. Standard library only.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ichscan.errors import DataError
from ichscan.labels import LABELS

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
FORMAT_HINT = '{"method": ..., "thresholds": {label: threshold}}'


# How probabilities at thresholds become calls. "independent": each label alone (the paper's Table 1).
# "hierarchical": a subtype only where `any` is called too (`ichscan predict`'s calls, docs/predict.md#hierarchy).
CALL_RULES = {
    "independent": "positive when prob >= threshold",
    "hierarchical": "any: positive when prob >= threshold; a subtype: positive when its prob >= its threshold "
                    "and any is positive",
}


def hierarchical_calls(above: Mapping[str, bool]) -> dict[str, bool]:
    """{label: called} from {label: prob >= its threshold}: a subtype stays called only where ``any`` is."""
    gate = bool(above.get("any", True))
    return {name: bool(yes) and (name == "any" or gate) for name, yes in above.items()}


def default_thresholds(labels: Sequence[str] = LABELS) -> dict[str, float]:
    return {name: DEFAULT_THRESHOLD for name in labels}


def resolve_thresholds(thresholds: float | Mapping[str, float] | None, labels: Sequence[str] = LABELS
                       ) -> dict[str, float]:
    """A threshold per label from a scalar, a per-label mapping (every label required) or None (0.5)."""
    if thresholds is None:
        thresholds = DEFAULT_THRESHOLD
    if isinstance(thresholds, Mapping):
        missing = [name for name in labels if name not in thresholds]
        if missing:
            raise ValueError(f"no threshold for {', '.join(missing)}")
        out = {name: float(thresholds[name]) for name in labels}
    else:
        out = {name: float(thresholds) for name in labels}
    bad = {k: v for k, v in out.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ValueError(f"thresholds must lie in [0, 1]: {bad}")
    return out


def check_thresholds(given: Any, source: str | os.PathLike | None, labels: Sequence[str] = LABELS, *,
                     error: type[Exception] = DataError) -> dict[str, float]:
    """``{label: t}`` as written in a file, checked: known labels, numbers (not strings or booleans) in
    [0, 1]. ``error`` (a ``IchscanError`` class) names ``source`` and the offending entry."""
    if not isinstance(given, Mapping) or not given:
        raise error(f"expected {FORMAT_HINT}", source)
    out = {}
    for name, t in given.items():
        if name not in labels:
            raise error(f"unknown label {name!r} in thresholds; expected {', '.join(labels)}", source)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 <= t <= 1.0:
            raise error(f"threshold for {name} is {t!r}, not a number in [0, 1]", source)
        out[name] = float(t)
    return out


class ThresholdsDocument(dict):
    """A thresholds file's JSON document (``read_thresholds_file``), which remembers the file it was read from
    (``path``), so that a file read once can be handed on and still be named where it is used."""

    def __init__(self, doc: Mapping[str, Any], path: str | os.PathLike | None = None):
        super().__init__(doc)
        self.path = None if path is None else str(path)


def read_thresholds_file(path: str | os.PathLike) -> ThresholdsDocument:
    """A thresholds file's whole document (thresholds, method, details), its shape checked; ``DataError``
    naming the file when unusable."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError("thresholds file not found", path) from None
    except (OSError, ValueError) as err:
        raise DataError(f"not a readable JSON thresholds file ({err})", path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("thresholds"), dict):
        raise DataError(f"expected JSON {FORMAT_HINT}", path)
    return ThresholdsDocument(doc, path)


def load_thresholds(given: str | os.PathLike | Mapping[str, Any], labels: Sequence[str] = LABELS
                    ) -> dict[str, float]:
    """Thresholds for every label from a thresholds file, or its document as ``read_thresholds_file`` gives
    it; ``DataError`` naming the file when unusable. A label the file leaves out gets 0.5, with a warning."""
    doc = given if _is_document(given) else read_thresholds_file(given)
    source = getattr(doc, "path", None)
    checked = check_thresholds(doc["thresholds"], source, labels)
    left_out = [name for name in labels if name not in checked]
    if left_out:
        log.warning("%s: no threshold for %s; using %g", source or "thresholds", ", ".join(left_out),
                    DEFAULT_THRESHOLD)
    return {**default_thresholds(labels), **checked}


def check_operating_points(doc: Any, source: str | os.PathLike, *, error: type[Exception] = DataError
                           ) -> dict[str, Any] | None:
    """The ``operating_points`` of a checkpoint or manifest (the shape of a thresholds file), checked;
    None stays None."""
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise error(f"operating_points must be {FORMAT_HINT}", source)
    check_thresholds(doc.get("thresholds"), source, error=error)
    threshold_intervals(doc, source, error=error)
    return dict(doc)


def _is_document(given: Any) -> bool:
    return isinstance(given, Mapping) and isinstance(given.get("thresholds"), Mapping)


def run_thresholds(given: Mapping[str, Any] | str | os.PathLike | None, operating_points: Mapping | None = None
                   ) -> tuple[dict[str, float], str]:
    """(thresholds, where they come from) for a prediction run: ``given`` ({label: t}, a thresholds file, or
    a thresholds file's document as ``read_thresholds_file`` gives it) first, else the model's
    ``operating_points``, else 0.5 for every label."""
    if _is_document(given):
        return load_thresholds(given), getattr(given, "path", None) or "given"
    if isinstance(given, Mapping):
        return dict(given), "given"
    if given is not None:
        return load_thresholds(given), str(given)
    if operating_points:
        thresholds = {**default_thresholds(), **{k: float(t) for k, t in operating_points["thresholds"].items()}}
        method = operating_points.get("method") or "method not recorded"
        chosen_on = operating_points.get("chosen_on")
        return thresholds, f"the model's operating points ({method}{f', chosen on {chosen_on}' if chosen_on else ''})"
    return default_thresholds(), f"{DEFAULT_THRESHOLD:g} (default)"


@dataclass(frozen=True)
class ThresholdIntervals:
    """How far each label's operating point could have fallen: the interval of the thresholds the same rule
    chooses on resampled validation patients (``threshold_ci`` in a thresholds file's ``details``, as
    ``ichscan thresholds --bootstrap`` and the bundled model's JSON carry it), at ``level`` (0.95).

    A series is *borderline* for a label when its probability lies between the lowest and the highest
    threshold of that interval and the chosen threshold itself (``lo <= prob < hi`` with the threshold
    inside): an operating point chosen on another, equally valid draw of validation cases could call it the
    other way. It says how firm the call is, not how likely the finding: the call is still ``prob >= t``.
    """

    bounds: Mapping[str, tuple[float, float]]
    level: float = 0.95

    def zone(self, label: str, threshold: float) -> tuple[float, float] | None:
        """The probabilities whose call depends on the draw: [low, high) with ``threshold`` inside."""
        if label not in self.bounds:
            return None
        lo, hi = self.bounds[label]
        return min(lo, threshold), max(hi, threshold)

    def borderline(self, label: str, prob: float, threshold: float) -> bool | None:
        """None where the label has no interval."""
        zone = self.zone(label, threshold)
        if zone is None:
            return None
        return bool(zone[0] <= prob < zone[1])

    def describe(self, label: str, threshold: float) -> str:
        """"95% interval 0.462-0.743" (the zone, ``zone``); "no interval" where the label has none."""
        zone = self.zone(label, threshold)
        if zone is None:
            return "no interval"
        return f"{self.level:.0%} interval {zone[0]:.3f}-{zone[1]:.3f}"

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "intervals": {k: [float(lo), float(hi)] for k, (lo, hi) in self.bounds.items()},
                "rule": "borderline when min(low, threshold) <= prob < max(high, threshold)"}


def threshold_intervals(doc: Mapping[str, Any] | None, source: str | os.PathLike | None = None, *,
                        error: type[Exception] = DataError) -> ThresholdIntervals | None:
    """The ``threshold_ci`` of each label in a thresholds document's ``details`` (a file, or a model's
    ``operating_points``); None when no label has one. An interval that is not two numbers in [0, 1] with
    low <= high is an ``error`` naming ``source``; labels with ``threshold_ci`` null (too few resamples with
    both classes) or without details have none. The labels must agree on the level."""
    if not doc or not isinstance(doc.get("details"), Mapping):
        return None
    bounds, levels = {}, set()
    for name, d in doc["details"].items():
        if name not in LABELS or not isinstance(d, Mapping) or d.get("threshold_ci") is None:
            continue
        ci = d["threshold_ci"]
        ok = (isinstance(ci, (list, tuple)) and len(ci) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and 0.0 <= v <= 1.0 for v in ci) and ci[0] <= ci[1])
        if not ok:
            raise error(f"threshold_ci of {name} is {ci!r}, not [low, high] within [0, 1]", source)
        level = d.get("threshold_ci_level", 0.95)
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
            raise error(f"threshold_ci_level of {name} is {level!r}, not a number between 0 and 1 (0.95)", source)
        bounds[name] = (float(ci[0]), float(ci[1]))
        levels.add(float(level))
    if not bounds:
        return None
    if len(levels) > 1:
        raise error(f"threshold_ci levels differ between labels ({sorted(levels)})", source)
    return ThresholdIntervals(bounds, levels.pop())


def run_intervals(given: Mapping[str, Any] | str | os.PathLike | None, operating_points: Mapping | None = None
                  ) -> ThresholdIntervals | None:
    """The intervals of the thresholds ``run_thresholds`` picks for the same arguments: a thresholds file's,
    else (nothing given) the model's operating points'; None for thresholds given as numbers, the 0.5
    default, or a source that carries none."""
    if _is_document(given):
        return threshold_intervals(given, getattr(given, "path", None))
    if isinstance(given, Mapping):
        return None
    if given is not None:
        return threshold_intervals(read_thresholds_file(given), given)
    return threshold_intervals(operating_points, "the model's operating_points")


@dataclass(frozen=True)
class RunPoints:
    """What a prediction run calls at (``run_points``): the thresholds, where they come from, their intervals
    (None without), and ``given`` as later steps are to be handed it (a file's document, read once)."""

    thresholds: dict[str, float]
    source: str
    intervals: ThresholdIntervals | None
    given: Any


def run_points(given: Mapping[str, Any] | str | os.PathLike | None, operating_points: Mapping | None = None
               ) -> RunPoints:
    """``run_thresholds`` and ``run_intervals`` for the same arguments, a thresholds file read once: what is
    called at and how firm each call is hold for the whole run, whatever becomes of the file meanwhile."""
    if isinstance(given, (str, os.PathLike)):
        given = read_thresholds_file(given)
    thresholds, source = run_thresholds(given, operating_points)
    return RunPoints(thresholds, source, run_intervals(given, operating_points), given)
