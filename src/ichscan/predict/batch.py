"""Batch runs: every selected series under a path, each saved as it finishes, resumable.

Each finished series is written atomically to ``<out>/work/``; a rerun with the same configuration and input
skips those, so an interrupted batch resumes where it stopped. The final files are assembled from ``work/`` at
the end, so a resumed run writes exactly what an uninterrupted one does. One run at a time writes a folder
(``ichscan.fileio.lock_folder``), and a folder holds the results of one input and configuration. With
``dicom_out``, every predicted series also gets its DICOM results (``ichscan.dicomout``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ichscan.dicom import SkippedFile
from ichscan.errors import IchscanError
from ichscan.fileio import escape_undecodable, lock_folder, write_json, write_text
from ichscan.predict.outputs import SeriesPrediction, write_outputs
from ichscan.predict.predictor import Predictor
from ichscan.predict.selection import RejectedSeries, SelectionRules, select_series
from ichscan.privacy import Pseudonymizer
from ichscan.thresholds import ThresholdIntervals, run_points

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressEvent:
    """Sent to ``progress`` after each selected series: ``status`` is predicted, resumed or failed."""

    done: int
    total: int
    series_uid: str
    status: str
    n_slices: int


@dataclass
class PredictRun:
    """What ``predict_path`` did. ``complete`` is False when it stopped early (``max_series``)."""

    out_dir: Path | None
    predictions: list[SeriesPrediction]
    rejected: list[RejectedSeries]
    skipped: list[SkippedFile]
    failed: list[SkippedFile]
    n_predicted: int
    n_resumed: int
    complete: bool
    outputs: dict[str, Path] = field(default_factory=dict)
    # DICOM results (``dicom_out``): every object of every predicted series, resumed ones included
    dicom_files: list[Path] = field(default_factory=list)
    # What the calls were made at (``run_thresholds``), and how firm each is (``run_intervals``; None without)
    thresholds: dict[str, float] = field(default_factory=dict)
    intervals: ThresholdIntervals | None = None


_SAFE = re.compile(r"[^0-9A-Za-z._-]")


def _work_name(series: Any) -> str:
    digest = hashlib.sha1(f"{series.study_uid}|{series.series_uid}".encode()).hexdigest()[:10]
    return f"{_SAFE.sub('_', str(series.series_uid))[:80]}-{digest}.json"


def _check_config(work: Path, config: dict, restart: bool) -> None:
    stamp = work / "config.json"
    if restart and work.exists():
        for f in work.glob("*.json"):
            f.unlink()
    if stamp.exists():
        previous = json.loads(stamp.read_text())
        if previous != config:
            raise IchscanError(
                "this output folder holds results of another configuration (checkpoint, TTA, precision, "
                "aggregation, --slab or --adapt-bn differ); use another --out, or --restart to discard them",
                work.parent)
    else:
        write_text(stamp, json.dumps(config, indent=1, sort_keys=True) + "\n")


def _check_input(work: Path, path: str | os.PathLike, selected: list) -> None:
    """Refuse a work folder that holds another input's series: a second input's outputs would replace the first's.

    Recorded: the input's absolute path and the set of series selected in it (a count and a digest)."""
    listing = "\n".join(f"{s.study_uid}|{s.series_uid}" for s in selected)
    wanted = {"input": escape_undecodable(os.path.abspath(path)), "series": len(selected),
              "series_sha256": hashlib.sha256(listing.encode("utf-8", "backslashreplace")).hexdigest()}
    stamp = work / "input.json"
    if not stamp.exists():
        write_json(stamp, wanted, indent=1, sort_keys=True)
        return
    previous = json.loads(stamp.read_text())
    if previous == wanted:
        return
    if previous.get("input") != wanted["input"]:
        what = f"another input ({previous.get('input')})"
    else:
        what = f"other series of this input ({previous.get('series')} series then, {len(selected)} now)"
    raise IchscanError(f"this output folder holds results for {what}; use another --out, or --restart to "
                       "discard them", work.parent)


def predict_path(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None,
    predictor: Predictor,
    *,
    rules: SelectionRules | None = None,
    thresholds: dict[str, float] | str | os.PathLike | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    max_series: int | None = None,
    restart: bool = False,
    allow_non_ct: bool = False,
    prefetch: bool = True,
    patient_ids: Pseudonymizer | None = None,
    submission: bool | None = None,
    dicom_out: str | os.PathLike | None = None,
) -> PredictRun:
    """Predict every selected series under ``path`` (file, folder, zip; RSNA flat folders too).

    With ``out_dir``, each finished series is saved to ``out_dir/work`` at once and skipped by a later
    run with the same configuration; outputs are written when all series are done. ``max_series``
    stops after that many newly predicted series (``complete=False``; rerun to go on). Bad files and
    series that fail are reported in ``skipped``/``failed`` and the rest predicted. ``thresholds``
    ({label: t}, a thresholds file, or its document) overrides the operating points the model carries; 0.5
    where neither says. Where they carry intervals (``run_intervals``), every output flags the borderline calls.
    ``out_dir`` is locked while the run writes it, and refused when it holds another input's or
    configuration's results, unless ``restart``. Patients are named in every output by ``patient_ids``
    (default: a pseudonymous key, ``ichscan.privacy``; ``Pseudonymizer(keep=True)`` keeps the PatientID).
    ``dicom_out``: also write each predicted series' DICOM results there (``ichscan.dicomout``: a TID 1500
    SR and key images, in the patient's study under the real patient identity), resumed series included;
    objects already written unchanged are left as they are. A series whose objects cannot be made is
    reported in ``failed`` and the others written.
    """
    if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise IchscanError("is a file; --out needs a folder (a new one, or one this command wrote before)", out_dir)
    if dicom_out is not None and os.path.exists(dicom_out) and not os.path.isdir(dicom_out):
        raise IchscanError("is a file; --dicom-out needs a folder", dicom_out)
    with lock_folder(out_dir) if out_dir is not None else contextlib.nullcontext():
        return _predict(path, out_dir, predictor, rules=rules, thresholds=thresholds, progress=progress,
                        max_series=max_series, restart=restart, allow_non_ct=allow_non_ct, prefetch=prefetch,
                        patient_ids=patient_ids or Pseudonymizer(), submission=submission, dicom_out=dicom_out)


def _write_dicom(dicom_out, pairs, predictor, thresholds, intervals, failed: list[SkippedFile]) -> list[Path]:
    """DICOM results of each (series, prediction); a series that fails is added to ``failed``, the rest go on."""
    from ichscan.dicomout import write_dicom_results

    written: list[Path] = []
    for s, p in pairs:
        try:
            written.extend(write_dicom_results(p, s, predictor, dicom_out, thresholds=thresholds,
                                               intervals=intervals))
        except IchscanError as err:
            failed.append(SkippedFile(str(err.path or s.series_uid), f"DICOM results not written: {err.reason}",
                                      type(err).__name__, str(s.series_uid)))
            log.warning("series %s: DICOM results not written: %s", s.series_uid, err)
        except Exception as err:  # one series' objects must not cost the others theirs
            log.warning("series %s: DICOM results not written", s.series_uid, exc_info=True)
            text = str(err).strip().splitlines()
            failed.append(SkippedFile(str(s.series_uid), f"DICOM results not written ({type(err).__name__}: "
                                      f"{text[0] if text else ''}); please report this", type(err).__name__,
                                      str(s.series_uid)))
    return written


def _predict(path, out_dir, predictor, *, rules, thresholds, progress, max_series, restart, allow_non_ct,
             prefetch, patient_ids: Pseudonymizer, submission: bool | None, dicom_out=None) -> PredictRun:
    from ichscan.dicom import find_series

    points = run_points(thresholds, predictor.operating_points)  # a file read once
    thresholds, thresholds_from, intervals = points.thresholds, points.source, points.intervals
    rules = rules or SelectionRules()
    scan = find_series(path, pixels=False, allow_non_ct=allow_non_ct)
    skipped = list(scan.skipped)
    for item in skipped:
        log.info("skipped %s: %s", item.path, item.reason)
    # A fixed order, whatever order the files were found in.
    all_series = sorted(scan.series, key=lambda s: (str(s.study_uid), str(s.series_uid)))
    selected, rejected = select_series(all_series, rules)
    rejected = [dataclasses.replace(r, patient_id=patient_ids(r.patient_id)) for r in rejected]
    for r in rejected:
        log.info("series %s not predicted: %s (%s)", r.series_uid, r.detail, r.rule)

    config = dict(predictor.describe(), rules=dataclasses.asdict(rules),
                  patient_ids="kept" if patient_ids.keep else "pseudonymous")
    work = Path(out_dir) / "work" if out_dir is not None else None
    if work is not None:
        _check_config(work, json.loads(json.dumps(config)), restart)
        _check_input(work, path, selected)

    done: dict[str, SeriesPrediction] = {}
    todo = []
    for s in selected:
        f = work / _work_name(s) if work is not None else None
        if f is not None and f.exists():
            try:
                saved = SeriesPrediction.from_dict(json.loads(f.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("redoing series %s: its partial result %s is unreadable", s.series_uid, f)
            else:
                if saved.n_slices + len(saved.skipped) == len(s.slices):
                    done[_work_name(s)] = saved
                    continue
                log.warning("redoing series %s: it has %d slices now, %d when it was predicted", s.series_uid,
                            len(s.slices), saved.n_slices + len(saved.skipped))
        todo.append(s)
    n_resumed = len(done)
    total = len(selected)
    count = 0
    for s in selected:
        if _work_name(s) in done and progress:
            count += 1
            progress(ProgressEvent(count, total, str(s.series_uid), "resumed", len(s.slices)))

    limit = len(todo) if max_series is None else max(0, min(int(max_series), len(todo)))
    failed: list[SkippedFile] = []
    n_predicted = 0
    if limit:
        for s, result in predictor.iter_predict(todo[:limit], prefetch=prefetch, allow_non_ct=allow_non_ct):
            count += 1
            if isinstance(result, IchscanError):
                failed.extend(getattr(result, "skipped", ()))
                failed.append(SkippedFile(str(result.path or s.series_uid), result.reason, type(result).__name__,
                                          str(s.series_uid)))
                log.info("series %s failed: %s", s.series_uid, result)
                if progress:
                    progress(ProgressEvent(count, total, str(s.series_uid), "failed", len(s.slices)))
                continue
            n_predicted += 1
            result = dataclasses.replace(result, patient_id=patient_ids(result.patient_id))
            done[_work_name(s)] = result
            if work is not None:
                write_text(work / _work_name(s), json.dumps(result.to_dict(), allow_nan=False))
            for item in result.skipped:
                log.info("skipped %s: %s", item.path, item.reason)
            if progress:
                progress(ProgressEvent(count, total, str(s.series_uid), "predicted", result.n_slices))

    complete = limit == len(todo)
    # Reload every result the way a resumed run sees it, so both write the same bytes.
    predicted = [s for s in selected if _work_name(s) in done]
    predictions = [SeriesPrediction.from_dict(json.loads(json.dumps(done[_work_name(s)].to_dict())))
                   for s in predicted]
    dicom_files = (_write_dicom(dicom_out, zip(predicted, predictions), predictor, thresholds, intervals, failed)
                   if dicom_out is not None else [])
    skipped_all = skipped + [item for p in predictions for item in p.skipped]
    run = PredictRun(Path(out_dir) if out_dir is not None else None, predictions, rejected, skipped_all, failed,
                     n_predicted, n_resumed, complete, dicom_files=dicom_files, thresholds=thresholds,
                     intervals=intervals)
    if complete and out_dir is not None:
        run.outputs = write_outputs(out_dir, predictions, thresholds=thresholds, rejected=rejected,
                                    skipped=skipped_all + failed, config=config, thresholds_from=thresholds_from,
                                    trained_on=predictor.trained_on, submission=submission, intervals=intervals)
    return run
