"""How a checkpoint does on real head CT: CT-ICH (41 labelled series) and one normal GE scan.

Prints one JSON object (logs go to stderr). The data live outside the repository, in ``../shared/realct``
(its README.md says what they are); nothing of them is copied into the repository. The CT-ICH JPGs are
rebuilt into CT DICOM once, by the ``ctich_to_dicom.py`` that ships with them, into ``--work``; later runs
reuse that folder.

Every series goes through the library as ``ichscan predict`` would read it: ``find_series`` ->
``select_series`` -> ``Predictor.iter_predict``. The default selection rules are checked first; if they
would reject any series (the GE scan has an 18.5 degree gantry tilt and uneven spacing), all series are
predicted under ``SelectionRules.permissive()`` and ``selection`` in the JSON says which rule rejected what.

* ``ctich_dev``: series AUC per label and series weighted log loss (RSNA weights, ``ichscan.metrics``) for
  each aggregation, slice AUC per label (slices joined to the RSNA ``labels.csv`` by image id), counts, and
  every series' probabilities (``series``), so each number can be recomputed from the JSON; and
  ``negatives``, where the false alarms lie: the top-k slices of the series without a bleed by fifth of the
  series (foot to head), and the subtype leading on each one's brightest slice.
* ``ge_normal``: the six probabilities, the slice that drove each one (index, z, InstanceNumber), whether
  ``any`` stays below the ``any`` threshold the model carries (or ``--thresholds`` gives; null without), and
  ``calls``: what ``ichscan predict`` would call there, withhold and mark borderline.
* ``against`` (with ``--against CKPT``, e.g. ``bundled``): the same for a second model on the same series,
  and ``paired``: the checkpoint against it as ``ichscan compare`` computes it (``ichscan.comparison``),
  per aggregation on the series (DeLong and a paired patient bootstrap) and on the slices (the bootstrap).

    .venv/bin/python bench/realct.py --checkpoint bundled          # the model shipped with ichscan
    .venv/bin/python bench/realct.py --checkpoint runs/demo/models/model_a.json
    .venv/bin/python bench/realct.py --checkpoint runs/demo/ensemble.json --aggregation all --out realct.json
    .venv/bin/python bench/realct.py --checkpoint model.json --limit 4 --dump-dir /tmp/realct-preds
    .venv/bin/python bench/realct.py --checkpoint candidate/bundled.json --against bundled --out cmp.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from ichscan.aggregation import PER_LABEL, SLICE_AGGREGATIONS
from ichscan.cli._args import non_negative_float
from ichscan.dicom import CTSeries, find_series
from ichscan.errors import IchscanError
from ichscan.labels import LABELS
from ichscan.metrics import join_series_labels, join_slice_labels, weighted_log_loss
from ichscan.model import resolve_checkpoint
from ichscan.thresholds import ThresholdIntervals, run_points
from ichscan.predict import (
    AGGREGATIONS,
    Predictor,
    SelectionRules,
    SeriesPrediction,
    aggregate,
    series_table,
    select_series,
    write_outputs,
)

log = logging.getLogger("bench.realct")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REALCT = REPO.parent / "shared" / "realct"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "ichscan-realct"


# ---------------------------------------------------------------------------------------------- inputs


def ctich_dicom(realct: Path, work: Path) -> tuple[Path, float | None]:
    """``work/ctich-dev`` (DICOM + labels), converted now unless a finished copy is there; (folder, seconds)."""
    out = work / "ctich-dev"
    if (out / "series_labels.csv").is_file():  # the converter writes it last
        log.info("reusing %s", out)
        return out, None
    script = realct / "ctich_to_dicom.py"
    if not script.is_file():
        raise IchscanError("no ctich_to_dicom.py; is this the realct folder (see its README.md)?", realct)
    work.mkdir(parents=True, exist_ok=True)
    # Convert beside the target and rename: an interrupted or concurrent run never leaves a half folder
    # that a later run would take for finished.
    partial = Path(tempfile.mkdtemp(dir=work, prefix=".ctich-dev."))
    t0 = time.perf_counter()
    try:
        log.info("converting CT-ICH to DICOM in %s (once; about 15 s)", out)
        done = subprocess.run([sys.executable, str(script), str(partial)], capture_output=True, text=True)
        if done.returncode != 0:
            raise IchscanError(f"ctich_to_dicom.py failed: {done.stderr.strip()[-2000:]}", script)
        log.info("%s", done.stdout.strip())  # its summary line; stdout stays ours, one JSON
        if out.exists():
            if (out / "series_labels.csv").is_file():  # another run finished first: same bytes, keep theirs
                return out, time.perf_counter() - t0
            shutil.rmtree(out)  # an unfinished folder from an older, non-atomic conversion
        partial.chmod(0o755)  # mkdtemp made it private
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out, time.perf_counter() - t0


def describe_checkpoint(path: Path, predictor: Predictor) -> dict:
    """Path, sha256 of each member's weights (as loaded) and the ensemble weights."""
    from ichscan.model import checkpoint_paths, read_checkpoint_meta, sha256_file

    members = []
    for m in predictor.describe()["members"]:
        _, meta_path = checkpoint_paths(m["checkpoint"])
        # load_checkpoint takes the weights file the JSON names; hash that very file
        weights = read_checkpoint_meta(meta_path).weights
        members.append({"checkpoint": str(meta_path), "weights": str(weights), "sha256": sha256_file(weights),
                        "weight": m["weight"]})
    shas = [m["sha256"] for m in members]
    return {"path": str(path.resolve()), "sha256": shas[0] if len(shas) == 1 else shas, "members": members}


# ---------------------------------------------------------------------------------------------- records


def _probs_by_label(probs: np.ndarray) -> dict[str, float]:
    return {name: float(p) for name, p in zip(LABELS, probs)}


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """scikit-learn's ROC AUC; None without both classes (it would raise or warn)."""
    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, p))


def _aucs(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float | None]:
    return {name: _auc(y_true[:, j], y_prob[:, j]) for j, name in enumerate(LABELS)}


def _aucs_among_bleeding(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float | None]:
    """Each subtype's AUC over the rows with any bleed: whether the model tells which bleed it is."""
    bleed = y_true[:, LABELS.index("any")] == 1
    return {name: _auc(y_true[bleed, j], y_prob[bleed, j]) for j, name in enumerate(LABELS) if name != "any"}


def _reaggregated(p: SeriesPrediction, method: str, top_k: int) -> SeriesPrediction:
    if method == p.aggregation:  # the predictor's own (context: the series head's, not from slices)
        return p
    if method == PER_LABEL:  # a per-label model's own choice, set beside the --against model's own aggregation
        return p
    probs, _ = aggregate(p.read_probs, method, top_k)  # key slices do not depend on the method
    return dataclasses.replace(p, probs=probs, aggregation=method)


def _write_csv(path: Path, frame) -> None:
    from ichscan.fileio import write_csv

    write_csv(path, frame)


def predict_all(predictor: Predictor, series: Sequence[CTSeries]) -> tuple[list[SeriesPrediction], list[dict]]:
    predictions, failed = [], []
    for i, (s, result) in enumerate(predictor.iter_predict(list(series)), 1):
        if isinstance(result, IchscanError):
            log.warning("series %s failed: %s", s.series_uid, result)
            failed.append({"series_uid": str(s.series_uid), "reason": str(result)})
            continue
        for item in result.skipped:
            log.warning("slice left out: %s: %s", item.path, item.reason)
        predictions.append(result)
        log.info("%d/%d %s %s: %d slices", i, len(series), s.patient_id, s.series_uid, result.n_slices)
    return predictions, failed


def ctich_report(predictions: list[SeriesPrediction], data: Path, dump: Path, methods: Sequence[str],
                 top_k: int, thresholds: dict | None, config: dict) -> dict:
    """Metrics for the CT-ICH series, through the same files and readers ``ichscan evaluate`` uses."""
    write_outputs(dump, predictions, thresholds=thresholds, config=config)
    slices = join_slice_labels(dump / "slices.csv", data / "labels.csv")
    series_auc, series_given, series_wll, per_series = {}, {}, {}, {}
    for method in methods:
        path = dump / f"series_{method}.csv"
        _write_csv(path, series_table([_reaggregated(p, method, top_k) for p in predictions], thresholds))
        ev = join_series_labels(path, data / "series_labels.csv")
        series_auc[method] = _aucs(ev.y_true, ev.y_prob)
        series_given[method] = _aucs_among_bleeding(ev.y_true, ev.y_prob)
        series_wll[method] = float(weighted_log_loss(ev.y_true, ev.y_prob))
        for uid, y, p in zip(ev.ids, ev.y_true, ev.y_prob):
            row = per_series.setdefault(str(uid), {"labels": {n: int(v) for n, v in zip(LABELS, y)}, "probs": {}})
            row["probs"][method] = _probs_by_label(p)
    truth = ev.y_true  # the same series in every method's table
    by_uid = {p.series_uid: p for p in predictions}
    return {
        "n_series": len(predictions),
        "n_slices": int(sum(p.n_slices for p in predictions)),
        "n_positive_series": {n: int(v) for n, v in zip(LABELS, truth.sum(axis=0))},
        "series_auc": series_auc,
        # each subtype among the bleeding series only: which bleed, not whether (0.5: it cannot tell)
        "series_auc_among_bleeding": series_given,
        "series_weighted_log_loss": series_wll,
        "n_slices_joined": int(len(slices.ids)),
        "n_positive_slices": {n: int(v) for n, v in zip(LABELS, slices.y_true.sum(axis=0))},
        "slice_auc": _aucs(slices.y_true, slices.y_prob),
        "slice_auc_among_bleeding": _aucs_among_bleeding(slices.y_true, slices.y_prob),
        "slice_weighted_log_loss": float(weighted_log_loss(slices.y_true, slices.y_prob)),
        # where the false alarms lie, for reading a model, not scoring it
        "negatives": negatives_report(predictions, {u: r["labels"]["any"] for u, r in per_series.items()}, top_k),
        "series": [{"series_uid": uid, "patient_id": by_uid[uid].patient_id, "n_slices": by_uid[uid].n_slices,
                    **row} for uid, row in per_series.items()],
    }


def negatives_report(predictions: list[SeriesPrediction], any_label: dict[str, int], top_k: int) -> dict:
    """Where a model's false alarms lie on real heads: over the series whose `any` label is 0, their
    ``top_k`` slices by `any` counted by fifth of the series (foot to head: by z where every slice has one,
    else in the series' order; a fifth is a fifth of its slices), and on each series' brightest slice the
    subtype with the highest probability."""
    subtypes = LABELS[1:]
    by_fifth, brightest_fifth = [0] * 5, [0] * 5
    leading = dict.fromkeys(subtypes, 0)
    brightest_any = []
    for p in predictions:
        if any_label.get(p.series_uid) != 0:
            continue
        n = p.n_slices
        probs = p.slice_probs[:, list(p.labels).index("any")]
        order = np.argsort(p.z, kind="stable") if all(z is not None for z in p.z) else np.arange(n)
        rank = np.empty(n, int)
        rank[order] = np.arange(n)
        top = np.argsort(-probs, kind="stable")[:top_k]
        for i in top:
            by_fifth[rank[i] * 5 // n] += 1
        b = int(top[0])
        brightest_fifth[rank[b] * 5 // n] += 1
        brightest_any.append(float(probs[b]))
        sub = [float(p.slice_probs[b, list(p.labels).index(name)]) for name in subtypes]
        leading[subtypes[int(np.argmax(sub))]] += 1
    return {"n_series": len(brightest_any), "top_k": top_k, "top_slices_by_fifth": by_fifth,
            "brightest_slice": {"by_fifth": brightest_fifth, "leading_subtype": leading,
                                "any_median": float(np.median(brightest_any)) if brightest_any else None}}


def ge_report(p: SeriesPrediction, series: CTSeries, methods: Sequence[str], top_k: int,
              thresholds: dict | None, intervals: ThresholdIntervals | None) -> dict:
    instance = {str(s.sop_uid): s.instance_number for s in series.slices}
    z = series.z
    steps = np.abs(np.diff(z)) if z is not None and len(z) > 1 else None
    probs = {m: _probs_by_label(_reaggregated(p, m, top_k).probs) for m in methods}
    t_any = (thresholds or {}).get("any")
    return {
        "series_uid": p.series_uid,
        "n_slices": p.n_slices,
        "tilt_degrees": series.tilt_degrees,
        "ordered_by": series.ordered_by,
        "slice_spacing_mm": None if steps is None else {"min": float(steps.min()), "max": float(steps.max())},
        "probs": probs,
        "max_slice": {k.label: {"index": k.index, "z": k.z, "instance_number": instance.get(k.sop_uid),
                                "image_id": k.image_id, "prob": k.prob} for k in p.key_slices},
        "any_threshold": t_any,
        "any_below_threshold": None if t_any is None else {m: probs[m]["any"] < t_any for m in methods},
        # what `ichscan predict` would say of this normal head at those thresholds: the findings it calls
        # (hierarchical), the subtypes above their thresholds it withholds, the borderline calls (null without
        # intervals)
        "calls": None if thresholds is None else {m: _calls(_reaggregated(p, m, top_k), thresholds, intervals)
                                                  for m in methods},
    }


def _calls(p: SeriesPrediction, thresholds: dict, intervals: ThresholdIntervals | None) -> dict:
    return {"called": [n for n, yes in p.decisions(thresholds).items() if yes], "withheld": p.withheld(thresholds),
            "borderline": p.borderline_labels(thresholds, intervals)}


# ---------------------------------------------------------------------------------------------- main


def measure(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    realct = Path(args.realct).resolve()
    if not (realct / "ctich-dev").is_dir() or not (realct / "ge-normal").is_dir():
        raise IchscanError("no ctich-dev/ and ge-normal/ here; pass --realct (see its README.md)", realct)
    data, convert_s = ctich_dicom(realct, Path(args.work))

    checkpoint = resolve_checkpoint(args.checkpoint)  # "bundled": the model shipped with ichscan
    t0 = time.perf_counter()
    first = None if args.aggregation in (None, "all") else args.aggregation
    predictor = Predictor.from_checkpoint(checkpoint, device=args.device, tta=args.tta, precision=args.precision,
                                          batch_size=args.batch_size, aggregation=first, top_k=args.top_k,
                                          adapt_bn=args.adapt_bn)
    # without --aggregation, what `ichscan predict` would do: the model's choice, else max
    methods = [predictor.aggregation]
    if args.aggregation == "all":
        # the others are recomputed from the slice probabilities (context needs the model's series head)
        methods += [m for m in SLICE_AGGREGATIONS if m != predictor.aggregation]
    load_s = time.perf_counter() - t0
    # The thresholds `ichscan predict` would use, but null rather than 0.5 when the model carries none:
    # "below a threshold nobody chose" would read like a result.
    thresholds, thresholds_from, intervals = None, None, None
    if args.thresholds or predictor.operating_points:
        points = run_points(args.thresholds, predictor.operating_points)  # a file read once
        thresholds, thresholds_from, intervals = points.thresholds, points.source, points.intervals

    ctich_scan, ge_scan = find_series(data / "images"), find_series(realct / "ge-normal")
    ctich = list(ctich_scan.series)[: args.limit]  # find_series sorts by patient: --limit is reproducible
    if len(ge_scan.series) != 1:
        raise IchscanError(f"expected one series in ge-normal, found {len(ge_scan.series)}", realct / "ge-normal")
    ge = ge_scan.series[0]
    _, rejected = select_series([*ctich, ge], SelectionRules())
    rules = SelectionRules() if not rejected else SelectionRules.permissive()  # keeps every series found
    for r in rejected:
        log.warning("default rules would reject %s (%s); predicting every series with permissive rules",
                    r.series_uid, r.detail)

    t0 = time.perf_counter()
    ctich_preds, failed = predict_all(predictor, ctich)
    ctich_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ge_preds, ge_failed = predict_all(predictor, [ge])
    ge_s = time.perf_counter() - t0
    if ge_failed:
        raise IchscanError(f"the GE series failed: {ge_failed[0]['reason']}", realct / "ge-normal")
    base = None
    if args.against:  # a second model, predicted the same way, for a paired comparison
        base_ckpt = resolve_checkpoint(args.against)
        base_predictor = Predictor.from_checkpoint(base_ckpt, device=args.device, tta=args.tta,
                                                   precision=args.precision, batch_size=args.batch_size,
                                                   aggregation=first, top_k=args.top_k)
        base_preds, base_failed = predict_all(base_predictor, ctich)
        base_ge, _ = predict_all(base_predictor, [ge])
        if base_failed or not base_ge:
            raise IchscanError("the --against model failed on series the checkpoint predicted", base_ckpt)
        # its own operating points: --thresholds was chosen for the checkpoint, not for this model
        base_points = run_points(None, base_predictor.operating_points) if base_predictor.operating_points else None
        base = (base_ckpt, base_predictor, base_preds, base_ge[0], base_points)

    config = dict(predictor.describe(), rules=dataclasses.asdict(rules))
    with tempfile.TemporaryDirectory(prefix="ichscan-realct-") as tmp:
        dump = Path(args.dump_dir) if args.dump_dir else Path(tmp)
        ctich_result = ctich_report(ctich_preds, data, dump / "ctich-dev", methods, predictor.top_k, thresholds, config)
        if args.dump_dir:  # the GE series' files too, for a look at its slices
            write_outputs(dump / "ge-normal", ge_preds, thresholds=thresholds, config=config)
        against = None if base is None else against_report(base, data, dump, methods, predictor.top_k, ge)
    with open(data / "series_labels.csv") as f:
        n_labelled = sum(1 for _ in f) - 1
    return {
        "benchmark": "ichscan on real head CT (ctich-dev, ge-normal)",
        "checkpoint": describe_checkpoint(checkpoint, predictor),
        "realct": str(realct),
        "work": str(data),
        "dump_dir": str(Path(args.dump_dir).resolve()) if args.dump_dir else None,
        "predictor": config,
        "aggregations": methods,
        "selection": {
            "rules": "default" if not rejected else "permissive",
            "rejected_by_default": [dataclasses.asdict(r) for r in rejected],
        },
        "trained_on": predictor.trained_on,
        "thresholds": thresholds,
        "thresholds_from": thresholds_from,
        "seconds": {
            "convert": None if convert_s is None else round(convert_s, 2),
            "load_checkpoint": round(load_s, 2),
            "predict_ctich_dev": round(ctich_s, 2),
            "predict_ge_normal": round(ge_s, 2),
            "total": round(time.perf_counter() - t_start, 2),
        },
        "ctich_dev": {
            "limit": args.limit,
            "n_series_labelled": n_labelled,
            "failed": failed,
            "files_skipped": len(ctich_scan.skipped),
            **ctich_result,
        },
        "ge_normal": ge_report(ge_preds[0], ge, methods, predictor.top_k, thresholds, intervals),
        **({} if against is None else {"against": against}),
    }


def against_report(base, data: Path, dump: Path, methods: Sequence[str], top_k: int, ge: CTSeries) -> dict:
    """The --against model's metrics on the same series (aggregated as the checkpoint's are), and the
    checkpoint against it, paired, from both models' files in ``dump``."""
    from ichscan.comparison import compare_files

    ckpt, predictor, preds, ge_pred, points = base
    thresholds, intervals = (None, None) if points is None else (points.thresholds, points.intervals)
    config = dict(predictor.describe())
    result = ctich_report(preds, data, dump / "against-ctich-dev", methods, top_k, thresholds, config)
    names = ("against", "checkpoint")
    paired = {"series": {m: compare_files(dump / "against-ctich-dev" / f"series_{m}.csv",
                                          dump / "ctich-dev" / f"series_{m}.csv", data / "series_labels.csv",
                                          level="series", names=names).to_dict() for m in methods},
              "slices": compare_files(dump / "against-ctich-dev" / "slices.csv", dump / "ctich-dev" / "slices.csv",
                                      data / "labels.csv", level="slice", names=names).to_dict()}
    return {"checkpoint": describe_checkpoint(ckpt, predictor), "thresholds": thresholds,
            "ctich_dev": {k: v for k, v in result.items() if k != "series"},
            "ge_normal": ge_report(ge_pred, ge, methods, top_k, thresholds, intervals), "paired": paired}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="checkpoint .json/.safetensors or ensemble manifest; 'bundled' for ichscan's bundled model")
    ap.add_argument("--realct", default=str(DEFAULT_REALCT), help=f"the real-CT folder (default {DEFAULT_REALCT})")
    ap.add_argument("--work", default=str(DEFAULT_WORK),
                    help=f"where the CT-ICH DICOM is written once and reused (default {DEFAULT_WORK})")
    ap.add_argument("--tta", default="identity,hflip",
                    help="TTA views or groups, as ichscan predict takes them (default identity,hflip)")
    ap.add_argument("--aggregation", choices=(*AGGREGATIONS, "all"), default=None,
                    help="slices to series; 'all' reports every method from the same slice probabilities")
    ap.add_argument("--top-k", type=int, default=None,
                    help="k for the topk aggregation (default: the model's, else 3)")
    ap.add_argument("--thresholds",
                    help="a thresholds JSON to use instead of the checkpoint's own operating points (default: "
                         "those); the --against model always uses its own")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    # fp32 by default: a measuring stick should give the same numbers on every CPU
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="fp32", help="(default fp32)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass, TTA views included")
    ap.add_argument("--limit", type=int, help="only the first N CT-ICH series (by patient), for quick checks")
    ap.add_argument("--dump-dir", help="keep slices.csv, series_<aggregation>.csv, predictions.json here")
    ap.add_argument("--out", help="also write the JSON to this file")
    ap.add_argument("--adapt-bn", type=non_negative_float, metavar="N",
                    help="the checkpoint's batch norms adapted to each series, as ichscan predict --adapt-bn N "
                         "(not the --against model's)")
    ap.add_argument("--against", metavar="CKPT",
                    help="a second model ('bundled', a checkpoint or manifest) on the same series: its numbers "
                         "and the checkpoint against it, paired (DeLong, patient bootstrap)")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    try:
        report = measure(args)
    except IchscanError as err:
        print(f"bench/realct.py: error: {err}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=1, allow_nan=False)
    if args.out:
        from ichscan.fileio import write_text

        write_text(args.out, text + "\n")
    print(text)
    complete = not report["ctich_dev"]["failed"] and (
        args.limit is not None or report["ctich_dev"]["n_series"] == report["ctich_dev"]["n_series_labelled"])
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
