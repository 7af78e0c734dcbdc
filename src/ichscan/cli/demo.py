"""``ichscan demo``: the whole pipeline on generated phantoms (what ``make demo`` runs)."""

from __future__ import annotations

import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="phantoms -> two models -> TTA ensemble -> Table 1, Figure 1, HTML report",
        description="Generate phantoms split by patient, train two quick models, predict the held-out "
                    "series with TTA and the two-model ensemble, and evaluate as the paper does. Resumes "
                    "where it stopped. A phantom-trained model says nothing about patients.",
    )
    p.add_argument("--out", "-o", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, help="phantom seed (default 2019)")
    p.add_argument("--train-studies", type=int)
    p.add_argument("--val-studies", type=int)
    p.add_argument("--test-studies", type=int)
    p.add_argument("--size", type=int, help="phantom and training image size in pixels (default 128)")
    p.add_argument("--slices", help="slices per series, MIN-MAX (default 24-32)")
    p.add_argument("--epochs", type=int, help="epochs per model (default: the quick preset's)")
    p.add_argument("--minutes", type=float,
                   help="time budget of the whole demo (default 15): where whole epochs would not fit, each epoch "
                        "trains a random share of its steps, measured and planned before training; 0: no budget")
    p.add_argument("--started-at", type=float, metavar="SECONDS",
                   help="when the time budget began, in seconds since 1970 (date +%%s): make demo passes the "
                        "moment it started, so that installing counts (default: now)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="training and prediction precision (default auto: bf16 where the CPU has it natively)")
    p.add_argument("--workers", type=int, help="processes for generation and indexing (default: all cores)")
    p.add_argument("--restart", action="store_true", help="discard an earlier demo run in --out")
    p.add_argument("--readme", metavar="README.md",
                   help="also paste Table 1 and Figure 1 into this Markdown file (between ichscan:demo markers)")
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    from ichscan.demo import DemoConfig, run_demo, update_readme
    from ichscan.errors import IchscanError

    if args.started_at is not None and not 0 <= time.time() - args.started_at < 86400:
        raise IchscanError(f"--started-at {args.started_at:.0f}: expected a moment of the last 24 hours "
                           "(seconds since 1970, as date +%s prints)")
    for name in ("epochs", "train_studies", "val_studies", "test_studies", "size", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise IchscanError(f"--{name.replace('_', '-')} {value}: expected 1 or more")
    overrides = {k: v for k, v in dict(seed=args.seed, train_studies=args.train_studies,
                                        val_studies=args.val_studies, test_studies=args.test_studies,
                                        size=args.size, epochs=args.epochs, workers=args.workers,
                                        precision=args.precision, slices=_range(args.slices)).items()
                 if v is not None}
    if args.minutes is not None:
        if not args.minutes >= 0:
            raise IchscanError(f"--minutes {args.minutes}: expected 0 (no budget) or more")
        overrides["minutes"] = args.minutes or None
    config = dataclasses.replace(DemoConfig(), **overrides)
    start = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {line}", file=sys.stderr, flush=True)

    say("ichscan demo -- research software, not a medical device; phantoms say nothing about patients")
    result = run_demo(args.out, config, say=say, restart=args.restart, started_at=args.started_at)
    print(result.table1.read_text())
    aucs = ", ".join(f"{k} {'NA' if v is None else f'{v:.3f}'}" for k, v in result.aucs.items())
    say(f"series-level AUC on held-out phantoms: {aucs}")
    say(f"report: {result.report}")
    say(f"Table 1: {result.table1}   Figure 1: {result.roc}")
    if args.readme:
        say(f"pasted Table 1 and Figure 1 into {update_readme(result, args.readme)}")
    return 0


def _range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)
