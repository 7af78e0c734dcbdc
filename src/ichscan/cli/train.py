"""``ichscan train``: train the paper's model (or the quick one) on an RSNA-layout folder."""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = """\
examples:
  ichscan train rsna/ --out runs/paper --pretrained seresnext50_32x4d.safetensors --cache rsna/cache512
  ichscan train phantoms/train --val phantoms/val --out runs/a --preset quick --seed 0
  ichscan train phantoms/train --val phantoms/val --out runs/b --preset quick --seed 1 \\
      --ensemble-with runs/a/best.json            # the paper's second model + runs/b/ensemble.json
  torchrun --nproc-per-node 8 -m ichscan train rsna/ --out runs/ddp --cache rsna/cache512
  ichscan train rsna/ --out runs/paper --resume   # continue an interrupted run exactly
  ichscan train site/ --init bundled --preset finetune --out runs/site      # adapt to a site's own series
  ichscan train site/ --init bundled --preset finetune --label-level series --out runs/site-series
  ichscan train site/ --init bundled --replay phantoms/ --out runs/site-replay   # phantoms replayed beside

DATA holds labels.csv (or stage_2_train.csv; RSNA's ID_<image>_<label>,Label) and images/ (or
stage_2_train/); series_labels.csv (series_uid + one 0/1 column per label) gives series labels, which
--label-level series trains from alone (a multiple-instance loss over each series' slices). Without --val, fold --fold of --folds (grouped by patient, stratified on any) validates.
Writes to --out: config.json, metrics.jsonl, best.{json,safetensors}, last.{json,safetensors}, resume.pt.
Research software, not a medical device.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a hemorrhage classifier (the paper's recipe, or --preset quick)",
        description="Train on RSNA-format data: a timm backbone, six labels, the RSNA weighted log loss.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", help="RSNA-layout folder (labels.csv + images/)")
    p.add_argument("--out", "-o", required=True, help="run folder (created)")
    p.add_argument("--preset", choices=("paper", "quick", "sim2real", "finetune"), default=None,
                   help="paper: seresnext50_32x4d, 512 px, 3 epochs (default); quick: resnet10t, 128 px; "
                        "sim2real: resnet10t, 160 px, wide augmentation, for real CT; finetune: adapt the --init "
                        "model to a site (the default with --init)")
    d = p.add_argument_group("data")
    d.add_argument("--val", help="separate validation folder (same layout); default: a fold of DATA")
    d.add_argument("--fold", type=int, help="validation fold (default 0)")
    d.add_argument("--folds", type=int, help="number of folds (default 5)")
    d.add_argument("--labels", help="label CSV, when not in DATA")
    d.add_argument("--series-labels", help="series label CSV (default DATA/series_labels.csv)")
    d.add_argument("--label-level", choices=("slice", "series", "both"),
                   help="slice (default): slice labels; series: series labels alone (slice labels withheld), "
                        "a multiple-instance loss; both: series loss plus slice loss where known")
    d.add_argument("--index", help="header index Parquet (default DATA/ichscan_index.parquet)")
    d.add_argument("--cache", help="uint8 image cache folder for DATA (built or finished first if needed)")
    d.add_argument("--val-cache", help="image cache folder for --val")
    d.add_argument("--io-workers", type=int, help="processes for indexing and caching (default: all cores)")
    d.add_argument("--replay", metavar="DIR|auto",
                   help="a labelled folder of another source (what the --init model learnt from) replayed beside "
                        "DATA every epoch, so that adapting does not forget what DATA cannot teach; auto: with "
                        "--init bundled, phantoms drawn as the bundle's own into OUT/replay-phantoms")
    d.add_argument("--replay-share", type=float,
                   help="share of each epoch drawn from --replay (default 0.5: as many replayed items as DATA's)")
    d.add_argument("--replay-cache", help="image cache folder for --replay (default OUT/replay-cache)")
    m = p.add_argument_group("model and recipe (override the preset)")
    m.add_argument("--arch", help="any timm architecture name")
    m.add_argument("--image-size", type=int)
    m.add_argument("--region", choices=("whole", "cavity"),
                   help="what every input window sees: the whole slice, or only the cranial cavity (air elsewhere); "
                        "default: as the --init model's windows, else whole")
    m.add_argument("--epochs", type=int)
    m.add_argument("--batch-size", type=int)
    m.add_argument("--lr", type=float)
    m.add_argument("--seed", type=int, help="training seed (the paper's second model: another seed or fold)")
    m.add_argument("--max-steps-per-epoch", type=int)
    m.add_argument("--mil-pooling", choices=("lse", "max"),
                   help="series logit from slice logits at series level: lse (smooth maximum, default) or max")
    m.add_argument("--freeze-epochs", type=int, help="epochs training only the classifier before the backbone")
    m.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="keep batch-norm statistics as the starting model has them (finetune default: on)")
    m.add_argument("--freeze-stages", type=int,
                   help="leading backbone stages (the stem counts as one) kept as the starting model has them")
    w = m.add_mutually_exclusive_group()
    w.add_argument("--init", metavar="CKPT",
                   help="start from an ichscan checkpoint, ensemble manifest (its first member) or 'bundled': "
                        "all its weights, its architecture and windows, and its image size unless --image-size "
                        "asks for another (fine-tuning at a higher resolution)")
    w.add_argument("--pretrained", metavar="PATH",
                   help="backbone weights: a timm/ImageNet file or an ichscan checkpoint (ichscan never downloads)")
    w.add_argument("--no-pretrained", action="store_true", help="random initialisation")
    w.add_argument("--cached-pretrained", action="store_true",
                   help="ImageNet weights from the local Hugging Face / torch hub cache")
    m.add_argument("--no-augment", action="store_true", help="no augmentation")
    h = p.add_argument_group("machine")
    h.add_argument("--device", help="cpu, cuda, cuda:1 (default: the GPU when there is one)")
    h.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto (default): bf16 on GPUs and on CPUs with AVX512-BF16/AMX, fp16 on older GPUs")
    h.add_argument("--compile", action="store_true", help="torch.compile the model")
    h.add_argument("--no-channels-last", action="store_true")
    h.add_argument("--workers", type=int, help="DataLoader workers per process (default: sized to the machine)")
    r = p.add_argument_group("runs")
    r.add_argument("--resume", action="store_true", help="continue the interrupted run in --out exactly")
    r.add_argument("--stop-after-steps", type=int, help="stop (resumably) after this many steps in total")
    r.add_argument("--ensemble-with", action="append", metavar="CKPT",
                   help="checkpoint, run folder or manifest to average with this run (repeatable)")
    r.add_argument("--ensemble-out", help="manifest path (default OUT/ensemble.json)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def config_from_args(args):
    from ichscan.augment import AugmentConfig
    from ichscan.train import TrainConfig

    pretrained = None
    init = getattr(args, "init", None)
    preset = args.preset or ("finetune" if init else "paper")
    if args.pretrained:
        pretrained = args.pretrained
    elif args.no_pretrained:
        pretrained = False
    elif args.cached_pretrained:
        pretrained = True
    overrides = dict(
        arch=args.arch, image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, fold=args.fold, n_folds=args.folds, pretrained=pretrained, precision=args.precision,
        workers=args.workers, device=args.device, max_steps_per_epoch=args.max_steps_per_epoch,
        compile=True if args.compile else None, channels_last=False if args.no_channels_last else None,
        augment=AugmentConfig.none() if args.no_augment else None,
        init=init, region=getattr(args, "region", None),
        label_level=getattr(args, "label_level", None), mil_pooling=getattr(args, "mil_pooling", None),
        freeze_epochs=getattr(args, "freeze_epochs", None), freeze_bn=getattr(args, "freeze_bn", None),
        freeze_stages=getattr(args, "freeze_stages", None), replay=getattr(args, "replay", None),
        replay_share=getattr(args, "replay_share", None),
    )
    return TrainConfig.from_preset(preset, **overrides)


def run(args) -> int:
    from tqdm import tqdm

    from ichscan.train import PRESET_REASONS, RunInputs, detect_distributed, run_training

    from ichscan.train import resolve_init

    config = config_from_args(args)
    main = detect_distributed().is_main
    say = (lambda line: print(line, file=sys.stderr)) if main else (lambda line: None)
    if config.replay:
        from ichscan.errors import IchscanError
        from ichscan.train import REPLAY_AUTO, resolve_replay

        if config.replay == REPLAY_AUTO and detect_distributed().enabled:
            raise IchscanError("--replay auto draws phantoms in one process; under torchrun draw them first "
                               "(ichscan phantom, docs/training.md#site) and give --replay DIR")
        config = resolve_replay(config, args.out, workers=args.io_workers, say=say)
    config = resolve_init(config, say)
    say(f"preset {config.preset}: {PRESET_REASONS.get(config.preset, '')}")
    start = f"init={config.init}" if config.init else f"pretrained={config.pretrained}"
    say(f"model {config.arch} at {config.image_size} px, {config.epochs} epochs, batch {config.batch_size}, "
        f"lr {config.lr}, seed {config.seed}, {start}, {config.label_level} labels")
    if config.init or isinstance(config.pretrained, str):
        # Checked before any data is read, and said: what the run will start from (the whole backbone, or
        # a one-line error naming the file).
        from ichscan.model import build_model, load_weights_into

        probe = build_model(config.arch, labels=config.labels)
        say(load_weights_into(probe, config.init or config.pretrained,
                              what="init" if config.init else "pretrained").line())
        del probe
    if config.preset == "paper" and config.pretrained is True:
        say("(the paper starts from ImageNet weights: give the file with --pretrained PATH, or --no-pretrained)")
    inputs = RunInputs(data=args.data, val_data=args.val, labels_csv=args.labels, index=args.index,
                       cache=args.cache, val_cache=args.val_cache, io_workers=args.io_workers,
                       series_labels=args.series_labels,
                       replay_cache=(args.replay_cache or os.path.join(args.out, "replay-cache")) if config.replay
                       else None)
    bars: dict[str, tqdm] = {}
    quiet = args.no_progress or not main

    def data_progress(name: str, done: int, total: int) -> None:
        if quiet:
            return
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = tqdm(total=total, desc=name, unit="file", leave=False)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def progress(event) -> None:
        if quiet and event.phase != "epoch":
            return
        if event.phase == "train":
            key = f"epoch {event.epoch + 1}/{event.epochs}"
            bar = bars.get(key)
            if bar is None:
                bar = bars[key] = tqdm(total=event.steps, desc=key, unit="step", initial=event.step - 1)
            bar.n = event.step
            bar.set_postfix(loss=f"{event.loss:.4f}", img_s=f"{event.images_per_s:.1f}", refresh=False)
            bar.refresh()
        elif event.phase == "epoch":
            bar = bars.get(f"epoch {event.epoch + 1}/{event.epochs}")
            if bar is not None:
                bar.close()
            m = event.metrics or {}
            line = f"epoch {event.epoch + 1}/{event.epochs}: train loss {m.get('train_loss', float('nan')):.4f}"
            if "val_loss" in m:
                auc = m.get("val_auc_mean")
                line += f", val weighted log loss {m['val_loss']:.4f}"
                line += f", mean AUC {auc:.3f}" if auc is not None else ""
            line += f", {m.get('train_images_per_s', 0):.1f} images/s"
            say(line)

    try:
        result = run_training(config, inputs, args.out, resume=args.resume,
                              ensemble_with=args.ensemble_with or (), ensemble_out=args.ensemble_out,
                              progress=progress, data_progress=data_progress, report=say,
                              stop_after_steps=args.stop_after_steps)
    except KeyboardInterrupt:
        for bar in bars.values():
            bar.close()
        say(f"interrupted; continue with: ichscan train {args.data} --out {args.out} ... --resume")
        return 130
    if result.interrupted:
        say(f"stopped after {result.global_step} steps; continue with --resume")
        return 0
    say(f"best checkpoint: {result.best}")
    say(f"last checkpoint: {result.last}")
    say(f"metrics: {result.out_dir / 'metrics.jsonl'}")
    return 0
