"""``ichscan compare``: two models' predictions on the same cases, the difference and its uncertainty."""

from __future__ import annotations

import argparse
import os

EPILOG = """\
examples:
  ichscan compare shipped/series.csv candidate/series.csv --labels site/series_labels.csv --out cmp/
  ichscan compare a/slices.csv b/slices.csv --labels labels.csv --level slice --groups index.parquet

Both files are read as `ichscan evaluate` reads them, against the same labels, and must cover the same
cases. For every label: AUC of A and of B, the difference B - A, its CI and two-sided p by DeLong's test
(given only when each row is its own patient: DeLong assumes independent rows), and its CI by a paired
bootstrap of patients (both models scored on the same resamples). The weighted log loss difference
gets the bootstrap CI. Outputs in --out: comparison.md, comparison.csv, comparison.json.
Two AUCs measured on the same few dozen cases can differ by several hundredths by chance; this says how
many. Research software, not a medical device.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="two models on the same cases: AUC difference with DeLong and paired-bootstrap CIs",
        description="Compare two models' predictions on the same labelled cases (B against A).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pred_a", metavar="PRED_A", help="model A's series.csv or slices.csv (the reference)")
    p.add_argument("pred_b", metavar="PRED_B", help="model B's, on the same cases")
    p.add_argument("--labels", required=True, help="series_labels.csv, or slice labels (as for evaluate)")
    p.add_argument("--level", choices=("auto", "series", "slice"), default="auto")
    p.add_argument("--groups", help="CSV/Parquet with image_id and patient_id (slice level)")
    p.add_argument("--names", help="two names for the table, comma-separated (default the files' folders)")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="paired resamples (default 2000)")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--out", "-o", help="folder for comparison.md/.csv/.json (default: print only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ichscan.comparison import compare_files, comparison_markdown, write_comparison
    from ichscan.errors import DataError

    if args.bootstrap < 0:
        raise DataError("--bootstrap must be 0 or more")
    if not 0.0 < args.ci < 1.0:
        raise DataError("--ci must lie between 0 and 1, e.g. 0.95")
    names = None
    if args.names:
        names = tuple(x.strip() for x in args.names.split(","))
        if len(names) != 2 or not all(names):
            raise DataError(f"--names {args.names!r}: give two names separated by a comma, e.g. shipped,candidate")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DataError("is a file; --out needs a folder", args.out)
    c = compare_files(args.pred_a, args.pred_b, args.labels, level=args.level, groups_path=args.groups,
                      n_bootstrap=args.bootstrap, ci=args.ci, seed=args.seed, names=names)
    print(comparison_markdown(c), end="")
    if args.out:
        paths = write_comparison(c, args.out)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
