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
from pathlib import Path
from typing import Any

from ichscan.errors import DataError
from ichscan.labels import LABELS

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
FORMAT_HINT = '{"method": ..., "thresholds": {label: threshold}}'


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


def load_thresholds(path: str | os.PathLike, labels: Sequence[str] = LABELS) -> dict[str, float]:
    """Thresholds for every label from a thresholds file; ``DataError`` naming the file when unusable.
    A label the file leaves out gets 0.5, with a warning."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError("thresholds file not found", path) from None
    except (OSError, ValueError) as err:
        raise DataError(f"not a readable JSON thresholds file ({err})", path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("thresholds"), dict):
        raise DataError(f"expected JSON {FORMAT_HINT}", path)
    given = check_thresholds(doc["thresholds"], path, labels)
    left_out = [name for name in labels if name not in given]
    if left_out:
        log.warning("%s: no threshold for %s; using %g", path, ", ".join(left_out), DEFAULT_THRESHOLD)
    return {**default_thresholds(labels), **given}


def check_operating_points(doc: Any, source: str | os.PathLike, *, error: type[Exception] = DataError
                           ) -> dict[str, Any] | None:
    """The ``operating_points`` of a checkpoint or manifest (the shape of a thresholds file), checked;
    None stays None."""
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise error(f"operating_points must be {FORMAT_HINT}", source)
    check_thresholds(doc.get("thresholds"), source, error=error)
    return dict(doc)


def run_thresholds(given: Mapping[str, float] | str | os.PathLike | None, operating_points: Mapping | None = None
                   ) -> tuple[dict[str, float], str]:
    """(thresholds, where they come from) for a prediction run: ``given`` ({label: t} or a thresholds file)
    first, else the model's ``operating_points``, else 0.5 for every label."""
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
