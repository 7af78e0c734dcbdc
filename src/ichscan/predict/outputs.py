"""What a prediction run produces: the series record, and the CSV and JSON files written from it.

``slices.csv``, ``series.csv``, ``submission.csv`` (Kaggle ``ID,Label``), ``predictions.json`` and
``skipped.csv``; columns in docs/contracts.md. Every file is written atomically (``ichscan.fileio``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ichscan.dicom import SkippedFile
from ichscan.errors import DataError
from ichscan.fileio import escape_undecodable, write_csv, write_text
from ichscan.labels import LABELS, RSNA_CSV_ORDER
from ichscan.predict.selection import RejectedSeries
from ichscan.thresholds import CALL_RULES, ThresholdIntervals, default_thresholds, hierarchical_calls


@dataclass(frozen=True)
class KeySlice:
    """The slice that drove one label's series probability."""

    label: str
    index: int
    sop_uid: str
    image_id: str
    z: float | None
    prob: float


@dataclass
class SeriesPrediction:
    """Probabilities for one series: ``slice_probs`` (N, L) and ``probs`` (L,) in ``labels`` order."""

    series_uid: str
    study_uid: str | None
    patient_id: str | None
    labels: tuple[str, ...]
    slice_probs: np.ndarray
    probs: np.ndarray
    key_slices: tuple[KeySlice, ...]
    sop_uids: tuple[str, ...]
    image_ids: tuple[str, ...]
    z: tuple[float | None, ...]
    aggregation: str = "max"
    skipped: tuple[SkippedFile, ...] = ()
    paths: tuple[str, ...] = ()  # the file of each slice (printable: undecodable bytes escaped)
    # A thin series read as slabs (``Predictor(slab_mm=...)``): the slab of each slice, 0-based in z order, and
    # the thickness asked for; every slice holds its slab's probabilities. Empty when each slice was read alone.
    slabs: tuple[int, ...] = ()
    slab_mm: float | None = None

    @property
    def n_slices(self) -> int:
        return int(self.slice_probs.shape[0])

    @property
    def read_probs(self) -> np.ndarray:
        """Probabilities (M, L) of what the model read: one row per slab of a thin series read as slabs, else
        ``slice_probs``. Series aggregations are over these rows (a slab counts once, not once per slice)."""
        if not self.slabs:
            return self.slice_probs
        first = np.unique(np.asarray(self.slabs), return_index=True)[1]
        return self.slice_probs[first]

    def slab_index(self, i: int) -> int:
        """The slab slice ``i`` was read in (its own index when each slice was read alone)."""
        return self.slabs[i] if self.slabs else i

    def slab_members(self, i: int) -> list[int]:
        """The slices read together with slice ``i`` (in z order, ``i`` among them): its slab, or ``[i]``."""
        if not self.slabs:
            return [i]
        return [k for k, j in enumerate(self.slabs) if j == self.slabs[i]]

    def slab_text(self, i: int) -> str:
        """How slice ``i`` was read, counted from 1: "slice 5 of 34", or "slices 4-8 of 162 as one 5 mm slab"."""
        members = self.slab_members(i)
        if len(members) == 1:
            return f"slice {i + 1} of {self.n_slices}"
        mm = f" {self.slab_mm:g} mm" if self.slab_mm else ""
        return f"slices {members[0] + 1}-{members[-1] + 1} of {self.n_slices} as one{mm} slab"

    def prob(self, label: str) -> float:
        return float(self.probs[self.labels.index(label)])

    def key_slice(self, label: str) -> KeySlice:
        return self.key_slices[self.labels.index(label)]

    def above(self, thresholds: dict[str, float] | None = None) -> dict[str, bool]:
        """Per label, whether its probability reaches its own threshold (0.5 where a label has none)."""
        thresholds = thresholds or {}
        return {name: bool(self.probs[i] >= thresholds.get(name, 0.5)) for i, name in enumerate(self.labels)}

    def decisions(self, thresholds: dict[str, float] | None = None) -> dict[str, bool]:
        """The calls at ``thresholds``, hierarchical (``CALL_RULE``): ``any`` where its probability reaches its
        threshold; a subtype where its own does and ``any`` is called, so that no output says "no intracranial
        hemorrhage" beside "epidural hemorrhage" (docs/predict.md#hierarchy)."""
        return hierarchical_calls(self.above(thresholds))

    def withheld(self, thresholds: dict[str, float] | None = None) -> list[str]:
        """Subtypes whose probability reaches their threshold but are not called, ``any`` not being called."""
        calls = self.decisions(thresholds)
        return [name for name, yes in self.above(thresholds).items() if yes and not calls[name]]

    def borderline(self, thresholds: dict[str, float] | None = None,
                   intervals: ThresholdIntervals | None = None) -> dict[str, bool | None]:
        """Per label, whether the call at ``thresholds`` is one an operating point chosen on other validation
        cases could reverse (``ThresholdIntervals.borderline``); None for a label without an interval."""
        thresholds = thresholds or {}
        return {name: (intervals.borderline(name, float(self.probs[i]), thresholds.get(name, 0.5))
                       if intervals is not None else None) for i, name in enumerate(self.labels)}

    def borderline_labels(self, thresholds: dict[str, float] | None = None,
                          intervals: ThresholdIntervals | None = None) -> list[str] | None:
        """The labels whose call is borderline (``borderline``); None when there are no intervals."""
        if intervals is None:
            return None
        return [name for name, yes in self.borderline(thresholds, intervals).items() if yes]

    def to_dict(self) -> dict:
        """JSON-ready; floats keep full precision so ``from_dict`` gives back the same arrays."""
        return {
            "series_uid": self.series_uid,
            "study_uid": self.study_uid,
            "patient_id": self.patient_id,
            "labels": list(self.labels),
            "aggregation": self.aggregation,
            **({"slab_mm": self.slab_mm} if self.slabs else {}),
            "probs": [float(p) for p in self.probs],
            "key_slices": [dataclasses.asdict(k) for k in self.key_slices],
            "slices": [
                {"index": i, "sop_uid": s, "image_id": im, "z": z, "path": path, "probs": [float(p) for p in row],
                 **({"slab": self.slabs[i]} if self.slabs else {})}
                for i, (s, im, z, path, row) in enumerate(zip(self.sop_uids, self.image_ids, self.z, self._paths(),
                                                              self.slice_probs))
            ],
            "skipped": [dataclasses.asdict(_printable(s)) for s in self.skipped],
        }

    @classmethod
    def from_dict(cls, d: dict) -> SeriesPrediction:
        slices = d["slices"]
        return cls(
            series_uid=d["series_uid"],
            study_uid=d["study_uid"],
            patient_id=d["patient_id"],
            labels=tuple(d["labels"]),
            slice_probs=np.array([s["probs"] for s in slices], dtype=np.float32).reshape(len(slices), -1),
            probs=np.array(d["probs"], dtype=np.float64),
            key_slices=tuple(KeySlice(**k) for k in d["key_slices"]),
            sop_uids=tuple(s["sop_uid"] for s in slices),
            image_ids=tuple(s["image_id"] for s in slices),
            z=tuple(s["z"] for s in slices),
            aggregation=d.get("aggregation", "max"),
            skipped=tuple(SkippedFile(**s) for s in d.get("skipped", [])),
            paths=tuple(s.get("path", "") for s in slices),
            slabs=tuple(int(s["slab"]) for s in slices) if slices and "slab" in slices[0] else (),
            slab_mm=d.get("slab_mm"),
        )

    def _paths(self) -> tuple[str, ...]:
        return self.paths if len(self.paths) == self.n_slices else ("",) * self.n_slices


CALL_RULE = CALL_RULES["hierarchical"]


def _printable(item: SkippedFile) -> SkippedFile:
    """A skipped file as UTF-8 text can hold it: any file name must reach skipped.csv and the JSON."""
    return dataclasses.replace(item, path=escape_undecodable(item.path), reason=escape_undecodable(item.reason))


def _kaggle_id(image_id: str, label: str) -> str:
    return f"{image_id}_{label}" if image_id.startswith("ID_") else f"ID_{image_id}_{label}"


def slice_table(predictions: Sequence[SeriesPrediction]):
    import pandas as pd

    rows = []
    for p in predictions:
        for i in range(p.n_slices):
            row = {"patient_id": p.patient_id, "study_uid": p.study_uid, "series_uid": p.series_uid,
                   "sop_uid": p.sop_uids[i], "image_id": p.image_ids[i], "slice_index": i, "slab": p.slab_index(i),
                   "z": p.z[i], "path": p._paths()[i]}
            row.update({f"prob_{name}": float(p.slice_probs[i, j]) for j, name in enumerate(p.labels)})
            rows.append(row)
    columns = ["patient_id", "study_uid", "series_uid", "sop_uid", "image_id", "slice_index", "slab", "z", "path"] + [
        f"prob_{name}" for name in LABELS]
    return pd.DataFrame(rows, columns=columns)


def series_table(predictions: Sequence[SeriesPrediction], thresholds: dict[str, float] | None = None,
                 trained_on: str | None = None, intervals: ThresholdIntervals | None = None):
    """One row per series; ``trained_on`` (what the model saw, e.g. "synthetic phantoms ...") on every row, so
    that whoever reads the file alone is told. ``borderline_<label>`` is 1 where the call could go the other
    way at an operating point chosen on other validation cases (``SeriesPrediction.borderline``), 0 where it
    could not, empty where the thresholds carry no interval."""
    import pandas as pd

    thresholds = thresholds or default_thresholds()
    rows = []
    for p in predictions:
        row = {"patient_id": p.patient_id, "study_uid": p.study_uid, "series_uid": p.series_uid, "n_slices": p.n_slices}
        row.update({f"prob_{name}": float(p.probs[j]) for j, name in enumerate(p.labels)})
        row.update({f"pred_{name}": int(v) for name, v in p.decisions(thresholds).items()})
        row.update({f"borderline_{name}": None if v is None else int(v)
                    for name, v in p.borderline(thresholds, intervals).items()})
        row.update({f"key_slice_{k.label}": k.image_id for k in p.key_slices})
        row["trained_on"] = trained_on or "not recorded"
        rows.append(row)
    columns = (["patient_id", "study_uid", "series_uid", "n_slices"] + [f"prob_{n}" for n in LABELS]
               + [f"pred_{n}" for n in LABELS] + [f"borderline_{n}" for n in LABELS]
               + [f"key_slice_{n}" for n in LABELS] + ["trained_on"])
    frame = pd.DataFrame(rows, columns=columns)
    for name in LABELS:  # 0/1 with gaps, not floats
        frame[f"borderline_{name}"] = frame[f"borderline_{name}"].astype("Int64")
    return frame


def submission_table(predictions: Sequence[SeriesPrediction]):
    """Kaggle RSNA format: ``ID,Label`` with ``ID_<image>_<label>``, labels in the RSNA CSV order."""
    import pandas as pd

    ids, values = [], []
    for p in predictions:
        cols = [p.labels.index(name) for name in RSNA_CSV_ORDER]
        for i, image_id in enumerate(p.image_ids):
            for name, j in zip(RSNA_CSV_ORDER, cols):
                ids.append(_kaggle_id(image_id, name))
                values.append(float(p.slice_probs[i, j]))
    return pd.DataFrame({"ID": ids, "Label": values})


def write_outputs(out_dir: str | os.PathLike, predictions: Sequence[SeriesPrediction], *,
                  thresholds: dict[str, float] | None = None, rejected: Sequence[RejectedSeries] = (),
                  skipped: Sequence[SkippedFile] = (), config: dict | None = None,
                  thresholds_from: str | None = None, trained_on: str | None = None,
                  submission: bool | None = None, intervals: ThresholdIntervals | None = None) -> dict[str, Path]:
    """Write slices.csv, series.csv, predictions.json, skipped.csv and (``submission``) submission.csv;
    returns paths.

    ``thresholds_from`` (see ``run_thresholds``) is recorded in predictions.json beside the thresholds, and
    ``intervals`` (see ``run_intervals``) as ``threshold_intervals`` with each series' ``borderline`` labels;
    ``trained_on`` there and in series.csv. ``submission`` (Kaggle ``ID,Label``): None writes it for RSNA
    layout input only (every image id ``ID_<hex>``), where the competition format means something."""
    import pandas as pd

    out = Path(out_dir)
    thresholds = thresholds or default_thresholds()
    skipped = [_printable(s) for s in skipped]
    skipped_rows = [{"kind": "file", "path": s.path, "series_uid": s.series_uid, "reason": s.reason} for s in skipped]
    skipped_rows += [{"kind": "series", "path": "", "series_uid": r.series_uid,
                      "reason": f"rejected by {r.rule}: {r.detail}"} for r in rejected]
    doc = {
        "kind": "ichscan-predictions",
        "trained_on": trained_on or "not recorded",
        "labels": list(LABELS),
        "config": config or {},
        "thresholds": thresholds,
        **({"thresholds_from": thresholds_from} if thresholds_from else {}),
        "call_rule": CALL_RULE,
        "threshold_intervals": None if intervals is None else intervals.to_dict(),
        "series": [dict(p.to_dict(), n_slices=p.n_slices, decisions=p.decisions(thresholds),
                        withheld=p.withheld(thresholds), borderline=p.borderline_labels(thresholds, intervals))
                   for p in predictions],
        "rejected": [dataclasses.asdict(r) for r in rejected],
        "skipped": [dataclasses.asdict(s) for s in skipped],
    }
    # Every table is made before the first file is written, so a failure leaves no half set of outputs.
    frames = {
        "slices": slice_table(predictions),
        "series": series_table(predictions, thresholds, trained_on, intervals),
        "submission": submission_table(predictions),
        "skipped": pd.DataFrame(skipped_rows, columns=["kind", "path", "series_uid", "reason"]),
    }
    if submission is None:
        submission = bool(predictions) and all(i.startswith("ID_") for p in predictions for i in p.image_ids)
    if not submission:
        del frames["submission"]
    text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
    paths = {name: out / f"{name}.csv" for name in frames}
    paths["json"] = out / "predictions.json"
    for name, frame in frames.items():
        write_csv(paths[name], frame)
    write_text(paths["json"], text)
    return paths


def load_predictions(path: str | os.PathLike) -> list[SeriesPrediction]:
    """Series predictions back from a ``predictions.json`` (or the out folder that holds one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read predictions ({err})", path) from err
    return [SeriesPrediction.from_dict(d) for d in doc["series"]]
