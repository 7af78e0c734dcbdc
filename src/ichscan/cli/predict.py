"""``ichscan predict``: probabilities for every selected series under a path, written to --out."""

from __future__ import annotations

import argparse
import logging
import sys

from ichscan.cli._args import non_negative_float, positive_int

EPILOG = """\
examples:
  ichscan predict study.zip --out preds/          # the bundled model (trained on phantoms only)
  ichscan predict study.zip --checkpoint runs/demo/models/ensemble.json --out preds/   # after make demo
  ichscan predict rsna/stage_2_test --checkpoint model.json --out sub/ --all-series
  ichscan predict scans/ --checkpoint model.json --out preds/ --tta flip,shift --thresholds thr.json

outputs in --out: slices.csv, series.csv, predictions.json, skipped.csv (bad files and rejected series,
one line each), submission.csv (Kaggle ID,Label) for RSNA-layout input or with --submission, and
report.html with --html (key slices per series with heat maps; --labels series_labels.csv adds TP/FP/FN/TN
and metrics). --dicom-out DIR writes DICOM results per series for a PACS (a TID 1500 structured report and
key images with heat maps, in the patient's study, under the real patient identity; see docs/predict.md).
Patients are named by a pseudonymous key (see the README's privacy section) unless --keep-patient-id.
Finished series are kept in --out/work; rerunning the same command resumes where an interrupted run stopped.
A series that does not look like a head CT (no skull ring in its images, or a body part such as CHEST) is
rejected, since the model would score it all the same; --not-head-ok predicts it with a warning. Of a scan
reconstructed more than once (a bone kernel beside the soft one, thin slices beside thick) only the least
noisy reconstruction is predicted; --every-reconstruction predicts them all.
Calls: any at its threshold; a subtype at its own, only where any is called (a subtype above its threshold
where any is not is reported as withheld). Where the thresholds carry their bootstrap intervals (the
bundled model's do), a call inside its interval is marked borderline: another equally valid choice of
operating point could reverse it.
Research software, not a medical device.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict hemorrhage probabilities for CT series (file, folder, zip, RSNA test folder)",
        description="Per-slice and per-series probabilities for the six ICH labels, with TTA and ensembles.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="a DICOM file, series or study folder, zip, or flat RSNA folder of ID_*.dcm")
    p.add_argument("--checkpoint", "-c", default=None,
                   help="checkpoint .json/.safetensors or ensemble manifest; 'bundled' (the default): the model "
                        "shipped with ichscan, trained on synthetic phantoms only")
    p.add_argument("--out", "-o", required=True, help="output folder (created; reused to resume)")
    m = p.add_argument_group("model")
    m.add_argument("--tta", default="identity,hflip",
                   help="views or groups, comma separated: identity, hflip, shift_left/right/up/down, zoom_in/out; "
                        "groups none, flip, shift, zoom, all (default: identity,hflip)")
    m.add_argument("--aggregation", choices=("max", "topk", "noisy_or", "context"),
                   help="slices to series: max, mean of the top k, noisy-OR, or context (the model's series head "
                        "reading the slices along z) (default: the model's choice when it records one, as the "
                        "bundled model's does; else context when the model has a series head; else max)")
    m.add_argument("--top-k", type=positive_int, help="k for --aggregation topk (default: the model's, else 3)")
    m.add_argument("--thresholds", help='JSON {"method": ..., "thresholds": {label: t}}; otherwise the '
                                        "model's operating points when it carries them, else 0.5")
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    m.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 where the CPU/GPU computes it natively, else fp32")
    m.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per forward pass, TTA views included (default 64)")
    m.add_argument("--compile", action="store_true",
                   help="torch.compile the model(s): 20-25%% faster per image after a compile of 5-15 s per "
                        "checkpoint (cached by torch); for batch runs over many series")
    m.add_argument("--adapt-bn", type=non_negative_float, metavar="N",
                   help="adapt each series' batch-norm statistics to the series itself: mean and variance "
                        "N/(N+n) x the model's + n/(N+n) x the series' (n its slices; no labels, no other series "
                        "used); costs one more forward pass; operating points chosen without it may not fit "
                        "(docs/predict.md)")
    m.add_argument("--slab", type=non_negative_float, default=0.0, metavar="MM",
                   help="read a thin series (slices closer than MM/2) as slabs of about MM, e.g. 5: each slab the "
                        "mean of its slices in HU, as a scanner's thick reconstruction; every slice gets its slab's "
                        "probabilities (default 0: every slice as it is)")
    s = p.add_argument_group("series selection (what a triage product reads)")
    s.add_argument("--min-slices", type=int, default=10, help="fewer slices: rejected (default 10)")
    s.add_argument("--max-obliquity", type=float, default=30.0,
                   help="max angle in degrees between slice normal and head-foot axis (default 30)")
    s.add_argument("--allow-non-axial", action="store_true", help="predict sagittal/coronal/oblique series too")
    s.add_argument("--max-tilt", type=float, default=30.0, help="max gantry tilt in degrees (default 30)")
    s.add_argument("--modality", action="append", help="accepted modality (repeatable; default CT)")
    s.add_argument("--exclude-image-type", action="append", metavar="WORD",
                   help="reject series whose ImageType has WORD (repeatable; replaces the localizer list)")
    s.add_argument("--exclude-description", action="append", metavar="TEXT",
                   help="reject series whose description contains TEXT (repeatable; replaces the default list)")
    s.add_argument("--not-head-ok", action="store_true",
                   help="predict series that fail the head check too (no skull ring in their images, or metadata "
                        "naming another body part), each with a warning; their probabilities mean nothing")
    s.add_argument("--every-reconstruction", action="store_true",
                   help="predict every reconstruction of a scan (a bone kernel beside the soft one, thin slices "
                        "beside thick); default: only the least noisy, the others rejected naming it")
    s.add_argument("--all-series", action="store_true",
                   help="no selection rules, no head check: predict every series (an RSNA test folder needs every "
                        "image)")
    s.add_argument("--any-modality", action="store_true", help="read non-CT DICOM images too")
    r = p.add_argument_group("batch runs")
    r.add_argument("--max-series", type=int, help="stop after predicting this many new series; rerun to resume")
    r.add_argument("--restart", action="store_true", help="discard finished series in --out/work and start over")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    o = p.add_argument_group("outputs")
    o.add_argument("--keep-patient-id", action="store_true",
                   help="write PatientID into the outputs (default: a pseudonymous key; see the README)")
    o.add_argument("--submission", action="store_true",
                   help="write submission.csv (Kaggle ID,Label) whatever the input (default: RSNA layout only)")
    o.add_argument("--html", action="store_true",
                   help="write report.html: per series, the called findings with their key slices, slice "
                        "probabilities along z and a bar per label (one offline file; at most 200 series shown)")
    o.add_argument("--labels", metavar="CSV",
                   help="with --html: series_labels.csv (series_uid + the six labels) to mark each call "
                        "TP/FP/FN/TN and add confusion counts, sensitivity, specificity, PPV, NPV and calibration")
    o.add_argument("--dicom-out", metavar="DIR",
                   help="also write DICOM results per series into DIR: a structured report (TID 1500: findings, "
                        "probabilities, calls, key slices) and a key image with its heat map per called finding, "
                        "in the patient's study (real patient identity, not the pseudonym); for a PACS. Research "
                        "use, not for diagnosis")
    p.set_defaults(func=run)


def _rules(args):
    from ichscan.predict import SelectionRules

    if args.all_series:
        return SelectionRules.permissive()
    base = SelectionRules()
    return SelectionRules(
        min_slices=args.min_slices,
        require_axial=not args.allow_non_axial,
        max_obliquity=args.max_obliquity,
        max_tilt=args.max_tilt,
        modalities=tuple(args.modality) if args.modality else base.modalities,
        exclude_image_types=tuple(args.exclude_image_type) if args.exclude_image_type else base.exclude_image_types,
        exclude_descriptions=(tuple(args.exclude_description) if args.exclude_description
                              else base.exclude_descriptions),
        not_head_ok=args.not_head_ok,
        one_per_scan=not args.every_reconstruction,
    )


class _NotHeadWarnings(logging.Handler):
    """Collects selection's "not a head CT, predicted anyway" warnings, for the summary of the run."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.series: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "not_head"):
            self.series.append((record.series_uid, record.not_head))


def run(args) -> int:
    import os

    from ichscan.aggregation import describe_aggregation
    from ichscan.errors import IchscanError
    from ichscan.model import BUNDLED, resolve_checkpoint
    from ichscan.predict import Predictor, predict_path
    from ichscan.privacy import Pseudonymizer
    from ichscan.thresholds import run_points

    if os.path.exists(args.out) and not os.path.isdir(args.out):  # before anything is loaded or printed
        raise IchscanError("is a file; --out needs a folder (a new one, or one this command wrote before)", args.out)
    if args.labels and not args.html:
        print("ichscan predict: error: --labels is for the HTML report; add --html", file=sys.stderr)
        return 2
    if args.labels and not os.path.isfile(args.labels):  # before the model runs, not after
        raise IchscanError("no such file; --labels needs series_labels.csv", args.labels)
    if args.dicom_out and os.path.exists(args.dicom_out) and not os.path.isdir(args.dicom_out):
        raise IchscanError("is a file; --dicom-out needs a folder", args.dicom_out)

    checkpoint = resolve_checkpoint(args.checkpoint)
    try:
        predictor = Predictor.from_checkpoint(
            checkpoint, device=args.device, tta=args.tta, precision=args.precision,
            batch_size=args.batch_size, aggregation=args.aggregation, top_k=args.top_k, compile=args.compile,
            adapt_bn=args.adapt_bn, slab_mm=args.slab)
    except ValueError as err:
        print(f"ichscan predict: error: {err}", file=sys.stderr)
        return 2
    if args.checkpoint in (None, BUNDLED):
        print(f"using the bundled model ({checkpoint}); trained on "
              f"{predictor.trained_on or 'data its manifest does not name'}", file=sys.stderr)
    elif predictor.trained_on:
        print(f"the model was trained on {predictor.trained_on}", file=sys.stderr)
    # the file read once: what is printed here is what the run calls at, whatever becomes of the file
    points = run_points(args.thresholds, predictor.operating_points)
    thresholds, thresholds_from, intervals = points.thresholds, points.source, points.intervals
    aggregation = describe_aggregation(predictor.aggregation, predictor.top_k, predictor.label_aggregation,
                                       predictor.labels)
    if args.aggregation is None and predictor.aggregation != "max":
        aggregation += " (the model's choice)"
    print(f"model: {len(predictor.describe()['members'])} checkpoint(s), {predictor.image_size} px, "
          f"TTA {'+'.join(predictor.tta)}, {predictor.precision}{', compiled' if predictor.compile else ''}, "
          f"aggregation {aggregation}"
          + (f", batch norms adapted to each series (N = {predictor.adapt_bn:g})" if predictor.adapt_bn is not None
             else "")
          + (f", thin series read as {predictor.slab_mm:g} mm slabs" if predictor.slab_mm else ""), file=sys.stderr)
    print(f"thresholds: {thresholds_from}: " + ", ".join(
        f"{n} {t:.4g}" + (f" ({intervals.level:.0%} interval {z[0]:.3g}-{z[1]:.3g})"
                          if intervals is not None and (z := intervals.zone(n, t)) is not None else "")
        for n, t in thresholds.items()), file=sys.stderr)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(unit="series", desc="predict", file=sys.stderr, dynamic_ncols=True)

    def progress(event):
        if bar is not None:
            bar.total = event.total
            bar.n = event.done
            bar.set_postfix_str(event.status, refresh=False)
            bar.refresh()

    not_head = _NotHeadWarnings()
    selection_log = logging.getLogger("ichscan.predict.selection")
    selection_log.addHandler(not_head)
    try:
        result = predict_path(args.input, args.out, predictor, rules=_rules(args), thresholds=points.given,
                              progress=progress, max_series=args.max_series, restart=args.restart,
                              allow_non_ct=args.any_modality, patient_ids=Pseudonymizer(keep=args.keep_patient_id),
                              submission=True if args.submission else None, dicom_out=args.dicom_out)
    finally:
        selection_log.removeHandler(not_head)
        if bar is not None:
            bar.close()

    for item in result.skipped + result.failed:
        print(f"skipped {item.path}: {item.reason}", file=sys.stderr)
    for r in result.rejected:
        print(f"not predicted: series {r.series_uid} ({r.n_slices} slices): {r.detail} [{r.rule}]", file=sys.stderr)
    if any(r.rule == "head_check" for r in result.rejected):
        print("series that fail the head check are not head CT as far as ichscan can tell; --not-head-ok predicts "
              "them anyway, with a warning", file=sys.stderr)
    for uid, detail in not_head.series:
        print(f"WARNING: series {uid} does not look like a head CT ({detail}); predicted only because of "
              "--not-head-ok: the model was made for head CT, its probabilities for this series mean nothing",
              file=sys.stderr)
    if result.rejected and not args.all_series and "submission" in result.outputs:
        n = sum(r.n_slices for r in result.rejected)
        print(f"the {n} images of rejected series are not in submission.csv; --all-series predicts every "
              "series (a complete Kaggle submission needs it)", file=sys.stderr)
    done = result.n_predicted + result.n_resumed
    print(f"{done} series predicted ({result.n_resumed} resumed), {len(result.rejected)} rejected, "
          f"{len(result.skipped) + len(result.failed)} files/series skipped", file=sys.stderr)
    if not result.complete:
        print(f"stopped early; rerun the same command to resume (finished series are in {args.out}/work)",
              file=sys.stderr)
        return 0
    if done == 0:
        print("no series predicted; see skipped.csv", file=sys.stderr)
    _print_findings(result.predictions, result.thresholds, result.intervals)
    if predictor.trained_on and done:
        print(f"(model trained on {predictor.trained_on})")
    if args.html and done:
        code = _write_html(args, result, predictor)
        if code:
            return code
    for name, path in result.outputs.items():
        print(f"{name}: {path}")
    if args.dicom_out and result.dicom_files:
        print(f"dicom: {len(result.dicom_files)} objects in {args.dicom_out} (research use, not for diagnosis)")
    return 0 if done else 1


def _write_html(args, result, predictor) -> int:
    """``--out/report.html``; with ``--labels``, joined on series_uid as ``ichscan evaluate`` joins them."""
    from pathlib import Path

    from ichscan.errors import IchscanError
    from ichscan.metrics import join_series_labels
    from ichscan.report import write_predictions_report

    truth = None
    if args.labels:
        try:
            data = join_series_labels(result.outputs["series"], args.labels)
        except IchscanError as err:
            print(f"ichscan predict: error: --labels: {err}; report.html not written", file=sys.stderr)
            return 1
        truth = {str(uid): dict(zip(data.labels, map(int, row))) for uid, row in zip(data.ids, data.y_true)}
    result.outputs["html"] = write_predictions_report(
        Path(args.out) / "report.html", result.predictions, result.thresholds, intervals=result.intervals,
        windows=predictor.windows,
        folder=args.input, labels=truth, trained_on=predictor.trained_on, title="ichscan predictions",
        predictor=predictor)
    return 0


def _print_findings(predictions, thresholds, intervals=None, limit: int = 20) -> None:
    """One line per series: ``any`` and whether it is called, then the subtypes called; slices counted from 1
    (slice k of N), as the report and render count them. A borderline call (``ichscan.thresholds.
    ThresholdIntervals``) says so, and so does a subtype withheld because ``any`` is not called."""
    from ichscan.geometry import spacing_summary

    any_borderline = False
    for p in predictions[:limit]:
        calls = p.decisions(thresholds)
        found = [name for name, yes in calls.items() if yes and name != "any"]
        borderline = p.borderline(thresholds, intervals)
        any_borderline |= any(borderline.values())
        any_p = p.prob("any")
        text = ", ".join(f"{n} {p.prob(n):.2f} (slice {p.key_slice(n).index + 1} of {p.n_slices})"
                         + (" borderline" if borderline[n] else "") for n in found) or "no subtype"
        withheld = p.withheld(thresholds)
        near = [n for n in p.labels if n != "any" and n not in found and n not in withheld and borderline[n]]
        if withheld:
            text += "; above their thresholds but not called, any is not: " + ", ".join(
                f"{n} {p.prob(n):.2f}" + (" borderline" if borderline[n] else "") for n in withheld)
        if near:
            text += "; not called, borderline: " + ", ".join(f"{n} {p.prob(n):.2f}" for n in near)
        notes = []
        z = [v for v in p.z if v is not None]
        summary = spacing_summary(z if len(z) == p.n_slices else None)
        if summary["uneven"]:
            lo, _, hi = summary["spacing"]
            notes.append(f"uneven slice spacing {lo:.2f}-{hi:.2f} mm")
        if p.skipped:
            notes.append(f"{len(p.skipped)} slice(s) left out: unreadable")
        note = f" [scored with {'; '.join(notes)}]" if notes else ""
        status = ("called" if calls["any"] else "not called") + (", borderline" if borderline["any"] else "")
        print(f"series {p.series_uid} ({p.n_slices} slices): any {any_p:.3f} ({status}); {text}{note}")
    if len(predictions) > limit:
        print(f"... {len(predictions) - limit} more series in series.csv")
    if any_borderline:
        print(f"borderline: the probability lies inside its threshold's {intervals.level:.0%} interval, so an "
              "operating point chosen on other validation cases could call it the other way "
              "(borderline_<label> in series.csv)")
