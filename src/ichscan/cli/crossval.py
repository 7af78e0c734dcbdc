"""``ichscan crossval``: adapt a model to a site by patient-grouped cross-validation, then train the final model."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  ichscan crossval site/ --init bundled --folds 5 --out runs/site-cv
  ichscan crossval site/ --init bundled --label-level series --out runs/site-cv-series
  ichscan crossval site/ --init bundled --keep-start 0 --out runs/site-cv-head   # fine-tuned alone, series head
  ichscan crossval site/ --init bundled --out runs/site-cv --resume      # continue where it stopped
  ichscan crossval site/ --init bundled --replay none --out runs/site-cv-alone   # no phantoms rehearsed
  ichscan predict new_study/ --checkpoint runs/site-cv/final/ensemble.json --out results/

DATA is laid out as for ichscan train: images/ with labels.csv (slice labels), series_labels.csv (series
labels), or both. Each fold fine-tunes --init on the other folds' patients (the finetune preset); the fold's
model is that model averaged with --init as it is (--keep-start, default 0.5, the mean of the top 3 slices),
or with --keep-start 0 the fine-tuned model alone with a series head fitted on its features (unless
--no-series-head). The fold's patients are then predicted by that model only. Writes to --out: folds.csv,
oof_series.csv, oof_slices.csv, comparison.{csv,md} (every aggregation, and the starting model without
adaptation), table1_series.{md,csv,json} with patient-bootstrap CIs, roc_series.{png,svg} (Figure 1), the
same for slices where labelled, thresholds.json (chosen on the out-of-fold series), crossval.md, fold-K/
(each fold's run) and final/: the model made the same way from all of DATA (ensemble.json, or model.json
with --keep-start 0), carrying those thresholds and its aggregation. Research software, not a medical device.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "crossval", help="cross-validate fine-tuning on a site's own series, then train the final model",
        description="Patient-grouped k-fold cross-validation of site adaptation: out-of-fold predictions, Table 1 "
                    "with bootstrap CIs, Figure 1, thresholds, and a final model with them in its JSON.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", help="folder: images/ with labels.csv and/or series_labels.csv")
    p.add_argument("--out", "-o", required=True, help="output folder (created)")
    p.add_argument("--folds", type=int, default=5, help="number of patient-grouped folds (default 5)")
    p.add_argument("--init", default="bundled",
                   help="starting model: checkpoint, manifest or 'bundled' (default); 'none' trains from scratch")
    p.add_argument("--preset", choices=("finetune", "sim2real", "quick", "paper"), default="finetune")
    p.add_argument("--label-level", choices=("slice", "series", "both"), default=None,
                   help="slice (default with labels.csv), series (series labels alone; default without "
                        "labels.csv), both")
    p.add_argument("--labels", help="slice label CSV, when not DATA/labels.csv")
    p.add_argument("--series-labels", help="series label CSV, when not DATA/series_labels.csv")
    p.add_argument("--replay", metavar="DIR|auto|none", default="auto",
                   help="a labelled folder of another source (what --init learnt from) replayed beside each "
                        "fold's training series, so that adapting does not forget what DATA cannot teach; auto "
                        "(default): with --init bundled, phantoms drawn as the bundle's own into OUT/replay-phantoms, "
                        "else none; none: off")
    p.add_argument("--replay-share", type=float,
                   help="share of each epoch drawn from --replay (default 0.5)")
    r = p.add_argument_group("recipe (override the preset)")
    r.add_argument("--epochs", type=int)
    r.add_argument("--lr", type=float)
    r.add_argument("--batch-size", type=int)
    r.add_argument("--seed", type=int, help="training seed (fold k trains with seed + k)")
    r.add_argument("--freeze-epochs", type=int)
    r.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="keep batch-norm statistics as the starting model has them (finetune default: on)")
    r.add_argument("--freeze-stages", type=int,
                   help="leading backbone stages (the stem counts as one) kept as the starting model has them")
    r.add_argument("--mil-pooling", choices=("lse", "max"))
    r.add_argument("--max-steps-per-epoch", type=int)
    r.add_argument("--arch", help="architecture, when --init none")
    r.add_argument("--image-size", type=int, help="image size, when --init none")
    s = p.add_argument_group("series head and evaluation")
    s.add_argument("--members", type=int, default=1,
                   help="models per fold: the first N members of an ensemble --init (bundled has 2), each "
                        "fine-tuned, averaged as predict averages an ensemble (default 1)")
    s.add_argument("--keep-start", type=float, default=0.5, metavar="W",
                   help="each fold's model (and the final one): the fine-tuned model averaged with the starting "
                        "model as it is, W its share (default 0.5; the mean of the top 3 slices); 0 turns it off "
                        "and fits a series head instead")
    s.add_argument("--tta", default="identity,hflip",
                   help="views averaged in every out-of-fold prediction (default: predict's, identity,hflip)")
    s.add_argument("--no-series-head", action="store_true",
                   help="with --keep-start 0: no series head, aggregate slices by maximum")
    s.add_argument("--head", choices=("gru", "conv"), default="gru", help="series head kind (default gru)")
    s.add_argument("--head-epochs", type=int, default=40)
    s.add_argument("--aggregation", choices=("auto", "per_label", "max", "topk", "noisy_or", "context"),
                   help="series aggregation of the thresholds, Table 1 and the final model (default: the recipe's: "
                        "top-3 with --keep-start, else the series head's); auto: the one whose out-of-fold series "
                        "AUC for any is highest; per_label: for each label the one whose out-of-fold AUC for it is "
                        "highest, Platt-calibrated on the same series; each with a nested estimate "
                        "(aggregation.json)")
    s.add_argument("--threshold-method", choices=("youden", "youden-median", "sensitivity"), default="youden",
                   help="how the out-of-fold operating points are chosen (default youden; youden-median, the "
                        "median of Youden's choices over resampled patients, moves less on a few dozen series: "
                        "docs/evaluation.md)")
    s.add_argument("--bootstrap", type=int, default=1000, help="patient-bootstrap resamples (default 1000)")
    s.add_argument("--no-final", action="store_true", help="skip the final model on all of DATA")
    s.add_argument("--no-baseline", action="store_true", help="skip scoring the starting model")
    h = p.add_argument_group("machine and runs")
    h.add_argument("--cache", help="image cache folder (default OUT/cache)")
    h.add_argument("--io-workers", type=int)
    h.add_argument("--device")
    h.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    h.add_argument("--resume", action="store_true", help="continue an interrupted cross-validation in --out")
    h.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _label_level(args) -> str:
    if args.label_level:
        return args.label_level
    from pathlib import Path

    from ichscan.data import find_labels_csv

    if args.labels:
        return "slice"
    try:
        find_labels_csv(Path(args.data))
        return "slice"
    except Exception:  # noqa: BLE001 - no slice labels: series labels it is
        return "series"


def run(args) -> int:
    from tqdm import tqdm

    from ichscan.crossval import CrossvalOptions, run_crossval
    from ichscan.predict.predictor import resolve_tta
    from ichscan.series import HeadRecipe
    from ichscan.train import TrainConfig

    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    init = None if args.init in ("none", "") else args.init
    overrides = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                     freeze_epochs=args.freeze_epochs, freeze_bn=args.freeze_bn,
                     freeze_stages=args.freeze_stages, mil_pooling=args.mil_pooling,
                     max_steps_per_epoch=args.max_steps_per_epoch, device=args.device, precision=args.precision,
                     arch=args.arch, image_size=args.image_size, init=init, label_level=_label_level(args),
                     replay=args.replay, replay_share=args.replay_share)
    if init is None and args.preset == "finetune":
        say("--init none: training from scratch with the finetune recipe")
    config = TrainConfig.from_preset(args.preset, **overrides)
    keep = args.keep_start if init else 0.0  # nothing to keep without a starting model
    options = CrossvalOptions(folds=args.folds, series_head=not (args.no_series_head or keep),
                              keep_start=keep, head_kind=args.head,
                              head=HeadRecipe(epochs=args.head_epochs), threshold_method=args.threshold_method,
                              n_bootstrap=args.bootstrap, final=not args.no_final, baseline=not args.no_baseline,
                              members=args.members, tta=resolve_tta(args.tta), aggregation=args.aggregation)
    bars: dict[str, tqdm] = {}

    def progress(event) -> None:
        if event.phase == "train" and not args.no_progress:
            key = f"epoch {event.epoch + 1}/{event.epochs}"
            bar = bars.get(key)
            if bar is None:
                for old in bars.values():
                    old.close()
                bars.clear()
                bar = bars[key] = tqdm(total=event.steps, desc=key, unit="step", initial=event.step - 1, leave=False)
            bar.n = event.step
            bar.set_postfix(loss=f"{event.loss:.4f}", refresh=False)
            bar.refresh()
        elif event.phase == "epoch":
            m = event.metrics or {}
            say(f"  epoch {event.epoch + 1}/{event.epochs}: train loss {m.get('train_loss', float('nan')):.4f}, "
                f"{m.get('train_images_per_s', 0):.1f} images/s")

    try:
        result = run_crossval(config, args.data, args.out, options=options, labels_csv=args.labels,
                              series_csv=args.series_labels, cache=args.cache, io_workers=args.io_workers,
                              resume=args.resume, report=say, progress=progress)
    except KeyboardInterrupt:
        for bar in bars.values():
            bar.close()
        say(f"interrupted; continue with: ichscan crossval {args.data} --out {args.out} ... --resume")
        return 130
    for bar in bars.values():
        bar.close()
    comp = result.comparison
    say("out-of-fold series AUC (any): " + ", ".join(
        f"{row['model']} {row['aggregation']} {row['auc_any']:.3f}" for _, row in comp.iterrows()))
    say(f"report: {result.out_dir / 'crossval.md'}")
    if result.final is not None:
        say(f"final model: {result.final}  (ichscan predict STUDY --checkpoint {result.final} --out DIR)")
    return 0
