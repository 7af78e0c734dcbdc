"""``ichscan thresholds``: per-label operating points chosen on validation predictions."""

from __future__ import annotations

import argparse
import os

EPILOG = """\
examples:
  ichscan thresholds --pred val/series.csv --labels series_labels.csv --method youden --out thresholds.json
  ichscan thresholds --pred val/series.csv --labels series_labels.csv --method sensitivity --target 0.9 \\
      --out thresholds.json
  ichscan evaluate --pred test/series.csv --labels series_labels.csv --thresholds thresholds.json
  ichscan thresholds --pred val/series.csv --labels series_labels.csv --model run/ensemble.json
      (the operating points travel with the model: ichscan predict --checkpoint run/ensemble.json uses them)
  ichscan thresholds --pred v1/series.csv v2/series.csv --labels v1/series_labels.csv v2/series_labels.csv
      (several validation sets pooled, each joined to its own labels: more cases, a steadier point)

youden: the threshold maximising sensitivity + specificity - 1 on the validation set.
youden-median: the median of the thresholds Youden's J chooses on the --bootstrap resamples of the
  validation patients (a bagged Youden point: it depends less on a few cases where J is nearly flat).
sensitivity: the highest threshold whose validation sensitivity is at least --target.
Each threshold comes with the interval in which the same method's choice falls when the validation
patients are resampled (--bootstrap): on a few dozen series it is often wide, and then the point chosen
is one of many that the data support about equally.
A label without positive or negative validation cases keeps --default, noted in the file.
Choose thresholds on validation data, never on the test set you report.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "thresholds",
        help="choose per-label thresholds on validation predictions (Youden J or target sensitivity)",
        description="Per-label operating points, saved as JSON for `ichscan evaluate` and `ichscan predict`.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pred", required=True, nargs="+", metavar="PRED",
                   help="validation predictions (series.csv, slices.csv, submission); several are pooled")
    p.add_argument("--labels", required=True, nargs="+", metavar="LABELS",
                   help="labels for them (series_labels.csv or RSNA ID,Label), one per --pred file, same order")
    p.add_argument("--level", choices=("auto", "series", "slice"), default="auto", help="default auto")
    p.add_argument("--method", choices=("youden", "youden-median", "sensitivity"), default="youden",
                   help="default youden")
    p.add_argument("--target", type=float, default=0.9, help="sensitivity for --method sensitivity (default 0.9)")
    p.add_argument("--default", type=float, default=0.5, help="threshold for labels that cannot be tuned")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples of patients for each threshold's interval; 0 for none (default 1000)")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level of that interval (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--out", "-o", default="thresholds.json", help="output JSON (default thresholds.json)")
    p.add_argument("--model", help="also store them in this checkpoint JSON or ensemble manifest (the one that "
                                   "made --pred), for ichscan predict to use")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ichscan.errors import DataError
    from ichscan.metrics import choose_thresholds_files, save_thresholds, threshold_method_problem

    if os.path.isdir(args.out):
        raise DataError("is a folder; --out needs a JSON file name, e.g. thresholds.json", args.out)
    if args.method == "sensitivity" and not 0.0 < args.target <= 1.0:
        raise DataError("--target must lie in (0, 1], e.g. 0.9")
    if not 0.0 <= args.default <= 1.0:
        raise DataError("--default must lie in [0, 1]")
    if args.bootstrap < 0:
        raise DataError("--bootstrap must be 0 or more")
    if problem := threshold_method_problem(args.method, args.bootstrap):
        raise DataError(f"--method {problem}")
    if not 0.0 < args.ci < 1.0:
        raise DataError("--ci must lie between 0 and 1, e.g. 0.95")
    points = choose_thresholds_files(args.pred, args.labels, level=args.level, method=args.method,
                                     target=args.target, default=args.default, n_bootstrap=args.bootstrap,
                                     ci=args.ci, seed=args.seed)
    path = save_thresholds(points, args.out)
    if args.model:
        from ichscan.model import set_operating_points

        chosen = dict(points.to_dict(), chosen_on=f"validation predictions {' + '.join(args.pred)}")
        print(f"operating points stored in {set_operating_points(args.model, chosen)}")
    for name, t in points.thresholds.items():
        d = points.details.get(name)
        how = (f"sensitivity {d['sensitivity']:.3f}, specificity {d['specificity']:.3f}" if d
               else points.notes[name])
        if d and d.get("threshold_ci"):
            lo, hi = d["threshold_ci"]
            how += (f"; {d['threshold_ci_level']:.0%} CI of the threshold {lo:.4f}-{hi:.4f} over resampled patients, "
                    f"median {d['threshold_median']:.4f}")
        print(f"{name:17s} {t:.4f}  ({how})" + (f"\n{'':17s} note: {points.notes[name]}"
                                                  if d and name in points.notes else ""))
    print(f"wrote {path}")
    return 0
