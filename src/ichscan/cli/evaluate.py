"""``ichscan evaluate``: Table 1 and Figure 1 for predictions against labels."""

from __future__ import annotations

import argparse
import json
import os
import sys

EPILOG = """\
examples:
  ichscan evaluate --pred preds/series.csv --labels phantoms/series_labels.csv --out eval/
  ichscan evaluate --pred preds/slices.csv --labels stage_2_train.csv --level slice --out eval/
  ichscan evaluate --pred submission.csv --labels stage_2_train.csv --groups index.parquet --out eval/
  ichscan evaluate --pred test/series.csv --labels series_labels.csv --thresholds val_thresholds.json

--level series (the paper's setting): predict's series.csv against series_labels.csv, joined on
series_uid. --level slice (the competition's): predict's slices.csv or a Kaggle submission against RSNA
labels (ID_<image>_<label>,Label), joined on image_id. --level auto picks by the columns.
A finding is called when prob >= threshold; the pred_<label> columns of series.csv are not used, so the
table always follows --thresholds. Each label is called alone, as the paper's Table 1; --calls
hierarchical calls a subtype only where any is called too, as ichscan predict does. CIs resample
patients (patient_id from the files or --groups).

outputs in --out: table1.md, table1.csv, table1.json, roc.png, roc.svg (and report.html with --html;
series_report.html, the key slices of every series marked TP/FP/FN/TN, with --html --dicom FOLDER).
Research software, not a medical device.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="Table 1 (ACC, PREC, REC, AUC, LOG_LOSS with patient-bootstrap CIs) and ROC curves",
        description="Evaluate predictions against labels: the paper's Table 1 and Figure 1.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pred", required=True, help="series.csv, slices.csv or a Kaggle submission from predict")
    p.add_argument("--labels", required=True, help="series_labels.csv, or RSNA labels (ID,Label) for slices")
    p.add_argument("--level", choices=("auto", "series", "slice"), default="auto",
                   help="series or slice evaluation (default auto: by the files' columns)")
    p.add_argument("--thresholds", default="0.5",
                   help="a number for every label, or a thresholds JSON from `ichscan thresholds` (default 0.5)")
    p.add_argument("--calls", choices=("independent", "hierarchical"), default="independent",
                   help="independent: each label at its threshold alone, as the paper's Table 1 (default); "
                        "hierarchical: a subtype only where any is called too, as ichscan predict calls")
    p.add_argument("--groups", help="CSV/Parquet with image_id and patient_id (slice level, when the "
                                    "predictions and labels carry no patient_id)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples of patients for the CIs; 0 for none (default 1000)")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--out", "-o", default="eval", help="output folder (default ./eval)")
    p.add_argument("--html", action="store_true", help="also write report.html (one file, images inlined)")
    p.add_argument("--dicom", metavar="FOLDER",
                   help="with --html and series-level predictions: the studies that were predicted; writes "
                        "series_report.html with each series' key slices and its TP/FP/FN/TN calls (needs the "
                        "predictions.json beside --pred)")
    p.add_argument("--quiet", "-q", action="store_true", help="do not print Table 1")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ichscan.errors import DataError
    from ichscan.metrics import evaluate_files, parse_thresholds
    from ichscan.report import write_report

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DataError("is a file; --out needs a folder for table1.md, roc.png and the rest", args.out)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as err:  # a file where a parent folder should be, no permission...
        raise DataError(f"cannot create the output folder ({err.strerror})", args.out) from None
    if args.bootstrap < 0:
        raise DataError("--bootstrap must be 0 or more")
    if not 0.0 < args.ci < 1.0:
        raise DataError("--ci must lie between 0 and 1, e.g. 0.95")
    thresholds = parse_thresholds(args.thresholds)
    ev = evaluate_files(args.pred, args.labels, level=args.level, groups_path=args.groups,
                        thresholds=thresholds, n_bootstrap=args.bootstrap, ci=args.ci, seed=args.seed,
                        calls=args.calls)
    if args.dicom and not args.html:
        raise DataError("--dicom goes with --html (it adds series_report.html)", args.dicom)
    trained_on = _trained_on(args.pred)
    extra = {"model trained on": trained_on} if trained_on else None
    paths = write_report(ev, args.out, html_name="report.html" if args.html else None, extra=extra)
    if trained_on:
        print(f"model trained on: {trained_on}", file=sys.stderr)
    if args.dicom:
        paths["series_html"] = _series_report(args, ev, trained_on)
    if not args.quiet:
        from ichscan.report import table1_markdown

        print(table1_markdown(ev), end="")
    # Labels without predictions and image-level resampling are logged as warnings by ichscan.metrics.
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _trained_on(pred) -> str | None:
    """What the model that made ``pred`` was trained on, as ``ichscan predict`` writes it in series.csv."""
    import pandas as pd

    try:
        column = pd.read_csv(pred, usecols=["trained_on"], dtype=str)["trained_on"].dropna().unique()
    except (ValueError, OSError):  # another kind of file, or no such column: nothing to say
        return None
    return "; ".join(sorted(column)) or None


def _series_report(args, ev, trained_on):
    """series_report.html: predict's key-slice report for the evaluated series, each call marked against
    the labels; the slice probabilities come from the predictions.json that ``ichscan predict`` wrote."""
    from pathlib import Path

    from ichscan.errors import DataError
    from ichscan.predict import load_predictions
    from ichscan.report import write_predictions_report
    from ichscan.thresholds import run_intervals
    from ichscan.windows import PAPER_WINDOWS, get_windows

    if ev.level != "series":
        raise DataError("--dicom needs series-level predictions (series.csv)", args.pred)
    doc_path = Path(args.pred).with_name("predictions.json")
    if not doc_path.is_file():
        raise DataError("no predictions.json beside --pred; --dicom needs the folder ichscan predict wrote",
                        args.pred)
    config = json.loads(doc_path.read_text()).get("config") or {}
    evaluated = set(map(str, ev.ids))
    predictions = [p for p in load_predictions(doc_path) if p.series_uid in evaluated]
    truth = {str(uid): dict(zip(ev.labels, map(int, row))) for uid, row in zip(ev.ids, ev.y_true)}
    try:  # a number for every label carries no interval; a thresholds file may
        float(args.thresholds)
        intervals = None
    except ValueError:
        intervals = run_intervals(args.thresholds)
    return write_predictions_report(Path(args.out) / "series_report.html", predictions, ev.thresholds,
                                    intervals=intervals,
                                    windows=get_windows(config.get("windows") or PAPER_WINDOWS),
                                    folder=args.dicom, labels=truth, trained_on=trained_on,
                                    title="ichscan evaluation: series")
