"""Inference on new studies: series selection, TTA, ensembles, series-level findings, batch runs.

The flow for one run (``predict_path``), one module per step:

1. ``ichscan.dicom.find_series`` reads headers only and groups files into series (a flat RSNA test
   folder, a study folder, a zip...). Unreadable files are reported, never fatal.
2. ``selection``: ``select_series`` keeps what a triage product would read (axial CT, not a localizer,
   enough slices, a head: metadata and a skull ring on its middle slices) by ``SelectionRules``; each
   rejected series is reported with the rule that rejected it.
3. ``predictor``: ``Predictor.predict_series`` decodes the pixels, windows them as the checkpoints were
   trained, runs every deterministic TTA view through every ensemble member, averages probabilities,
   and aggregates slices into series probabilities with the slice that drove each finding.
4. ``batch``: each finished series is written atomically to ``<out>/work/``; a rerun skips those, so an
   interrupted batch resumes where it stopped.
5. ``outputs``: ``slices.csv``, ``series.csv``, ``submission.csv`` (Kaggle ``ID,Label``),
   ``predictions.json``, ``skipped.csv`` (columns in docs/contracts.md), assembled from ``work/`` at the
   end, so a resumed run writes exactly what an uninterrupted one does.
"""

from ichscan.aggregation import AGGREGATIONS, aggregate
from ichscan.predict.batch import PredictRun, ProgressEvent, predict_path
from ichscan.predict.outputs import (
    KeySlice,
    SeriesPrediction,
    load_predictions,
    series_table,
    slice_table,
    submission_table,
    write_outputs,
)
from ichscan.predict.predictor import DEFAULT_TTA, TTA_VIEWS, Predictor, resolve_tta
from ichscan.predict.selection import RejectedSeries, SelectionRules, select_series

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_TTA",
    "TTA_VIEWS",
    "KeySlice",
    "PredictRun",
    "Predictor",
    "ProgressEvent",
    "RejectedSeries",
    "SelectionRules",
    "SeriesPrediction",
    "aggregate",
    "load_predictions",
    "predict_path",
    "resolve_tta",
    "select_series",
    "series_table",
    "slice_table",
    "submission_table",
    "write_outputs",
]
