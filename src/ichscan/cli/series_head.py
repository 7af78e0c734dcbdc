"""``ichscan series-head``: teach a trained model to read a series along z (a series-context head)."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  ichscan series-head phantoms/val --checkpoint runs/a/best.json --out runs/a/with-head
  ichscan series-head site/ --checkpoint bundled --out models/bundled-head   # every member, and a manifest

DATA as for ichscan train (images/ with labels.csv and/or series_labels.csv); series labels come from
series_labels.csv, else from the slices' labels. The backbone is frozen: the head (a bidirectional GRU over
slice embeddings and logits, or 1-D convolutions) is fitted on its features, then written with the weights as
OUT.{json,safetensors}; for a manifest, OUT/<member>.{json,safetensors} and OUT/ensemble.json. ichscan predict
then aggregates with it by default (--aggregation context). Thresholds chosen for another aggregation do not
carry over: choose them again with ichscan thresholds --model on other validation data.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "series-head", help="fit a series-context head (GRU along z) on a trained model's features",
        description="Fit a series-level head over slice embeddings along z for a checkpoint or ensemble.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", help="folder: images/ with labels.csv and/or series_labels.csv")
    p.add_argument("--checkpoint", required=True, help="checkpoint, ensemble manifest or 'bundled'")
    p.add_argument("--out", "-o", required=True, help="output stem (a checkpoint) or folder (an ensemble)")
    p.add_argument("--kind", choices=("gru", "conv"), default="gru")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--pooling", choices=("lse", "max"), default="lse")
    p.add_argument("--augmented-passes", type=int, default=1,
                   help="augmented feature passes beside the plain one (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", help="image cache folder (built when missing)")
    p.add_argument("--io-workers", type=int)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import torch

    from ichscan.augment import AugmentConfig
    from ichscan.data import SliceDataset
    from ichscan.model import PHANTOM_ONLY, is_manifest, load_checkpoint, read_manifest, resolve_checkpoint, \
        save_checkpoint, write_ensemble
    from ichscan.series import HeadRecipe, load_series_data, train_series_head
    from ichscan.train import PRESETS

    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    source = resolve_checkpoint(args.checkpoint) if args.checkpoint == "bundled" else Path(args.checkpoint)
    manifest = read_manifest(source) if is_manifest(source) else None
    members = [m.checkpoint for m in manifest.members] if manifest is not None else [source]
    loaded, targets = load_series_data(args.data, level="both", workers=args.io_workers)
    for line in loaded.lines():
        say(line)
    augment = AugmentConfig.from_dict(PRESETS["sim2real"]["augment"])
    out = Path(args.out)
    written = []
    for i, member in enumerate(members):
        torch.manual_seed(args.seed)
        model, meta = load_checkpoint(member)
        model.train(False)
        cache = None
        if args.cache:
            from ichscan.train import TrainConfig, _ensure_cache

            names = "-".join(w.label.replace(":", ".") for w in meta.windows)
            cache = Path(args.cache) / f"{meta.image_size}px-{names}"
            config = TrainConfig(image_size=meta.image_size, windows=tuple(w.to_dict() for w in meta.windows))
            _ensure_cache(cache, loaded.frame, config, args.io_workers, None, say)
        slices = SliceDataset(loaded.frame, meta.image_size, meta.windows, meta.labels, cache=cache)
        say(f"member {i + 1}/{len(members)}: {meta.path} on {len(slices)} slices of {len(targets)} series")
        train_series_head(model, slices, targets, kind=args.kind, hidden=args.hidden,
                          recipe=HeadRecipe(epochs=args.epochs, seed=args.seed + i), augment=augment,
                          augmented_passes=args.augmented_passes, pooling=args.pooling, say=say)
        record = dict(meta.record)
        for key in ("weights", "series_head", "operating_points", "aggregation"):
            record.pop(key, None)
        record["series_head_data"] = {"source": str(args.data), "series": int(len(targets)),
                                      "slices": int(len(slices))}
        record.setdefault("trained_on", meta.trained_on or PHANTOM_ONLY)
        record["aggregation"] = {"method": "context"}
        stem = out / Path(member).stem if manifest is not None else out
        written.append(save_checkpoint(stem, model, record))
        say(f"wrote {written[-1]}")
    if manifest is not None:
        target = write_ensemble(out / "ensemble.json", written, [m.weight for m in manifest.members],
                                extra={"aggregation": {"method": "context"},
                                       "trained_on": manifest.trained_on or PHANTOM_ONLY})
        say(f"ensemble manifest: {target} (thresholds of the old aggregation not carried over)")
    return 0

