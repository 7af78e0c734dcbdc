"""How long ``ichscan crossval`` takes over a site's data, and what it finds: the issue-12 benchmark.

Runs the cross-validation exactly as ``ichscan crossval DATA --folds 5 --init bundled`` does (every fold, the
series heads, the final model) and prints one JSON object: wall time per phase, the target (30 minutes for
ctich-dev on 2 CPU cores) and ``ratio`` = wall time / target (at most 1.0 meets it), beside the baseline
measured in the same run: one plain fine-tuning epoch over all of DATA, so a slow machine shows as a slow
epoch, not as a slow cross-validation. The out-of-fold series AUCs (every aggregation, and the starting model
without adaptation) come from the run's ``comparison.csv``.

The data are real CT outside the repository (``../shared/realct``; ``bench/realct.py`` converts CT-ICH to
DICOM) or any folder in the same layout::

    .venv/bin/python bench/crossval.py --data /tmp/ichscan-realct/ctich-dev --out /tmp/cv-bench
    .venv/bin/python bench/crossval.py --data DATA --out OUT --label-level series
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import pandas as pd

TARGET_S = 30 * 60


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder: images/ with labels.csv and/or series_labels.csv")
    ap.add_argument("--out", required=True, help="output folder (a fresh one: the run is timed from scratch)")
    ap.add_argument("--init", default="bundled")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--label-level", choices=("slice", "series", "both"), default="slice")
    ap.add_argument("--target-s", type=float, default=TARGET_S)
    ap.add_argument("--members", type=int, default=1, help="models per fold (crossval --members)")
    ap.add_argument("--freeze-stages", type=int, help="crossval --freeze-stages (default: the finetune preset's)")
    ap.add_argument("--mil-pooling", choices=("lse", "max"), help="crossval --mil-pooling, for --label-level series/both")
    ap.add_argument("--keep-start", type=float, default=0.5,
                    help="crossval --keep-start W (default 0.5, as crossval; 0: fine-tuned alone, series head)")
    ap.add_argument("--replay", default="auto",
                    help="crossval --replay DIR|auto|none (default auto, as crossval: the bundle's phantoms)")
    ap.add_argument("--replay-share", type=float, help="crossval --replay-share (default 0.5)")
    ap.add_argument("--aggregation", help="crossval --aggregation (default: the recipe's; auto: chosen on the OOF)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    import torch

    from ichscan.crossval import CrossvalOptions, run_crossval
    from ichscan.hardware import cpu_count
    from ichscan.train import TrainConfig

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty; the benchmark times a run from scratch")
    config = TrainConfig.from_preset("finetune", init=args.init, label_level=args.label_level,
                                     freeze_stages=args.freeze_stages, mil_pooling=args.mil_pooling,
                                     replay=args.replay, replay_share=args.replay_share)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    options = CrossvalOptions(folds=args.folds, members=args.members, keep_start=args.keep_start,
                              series_head=not args.keep_start, aggregation=args.aggregation)
    result = run_crossval(config, args.data, out / "cv", options=options,
                          report=lambda line: print(line, file=sys.stderr))
    times["crossval_s"] = time.perf_counter() - t0

    # Baseline in the same run: one fine-tuning epoch over all of DATA from the cache the run built.
    from ichscan.data import SliceDataset
    from ichscan.series import load_series_data
    from ichscan.train import resolve_init, train

    one = resolve_init(TrainConfig.from_preset("finetune", init=args.init, epochs=1,
                                               freeze_stages=args.freeze_stages))
    loaded, _ = load_series_data(args.data, level="both")
    frame = loaded.frame[loaded.frame[list(one.labels)].notna().all(axis=1)].reset_index(drop=True)
    ds = SliceDataset(frame, one.image_size, one.windows, one.labels, cache=out / "cv" / "cache")
    t0 = time.perf_counter()
    train(one, ds, None, out / "one-epoch")
    times["one_epoch_s"] = time.perf_counter() - t0

    comparison = pd.read_csv(out / "cv" / "comparison.csv")
    replay = json.loads((out / "cv" / "crossval.json").read_text())["config"]["replay"]

    def by_row(prefix: str) -> dict:
        """comparison.csv's columns ``<prefix><label>``, per model and aggregation (None where NA)."""
        return {f"{r['model']}_{r['aggregation']}": {c[len(prefix):]: None if pd.isna(r[c]) else round(float(r[c]), 4)
                                                      for c in comparison.columns if c.startswith(prefix)}
                for _, r in comparison.iterrows()}

    auc, bleeding = by_row("auc_"), by_row("bleeding_auc_")
    print(json.dumps({
        "benchmark": "ichscan crossval (site adaptation by patient-grouped cross-validation)",
        "data": os.fspath(args.data),
        "folds": args.folds,
        "label_level": args.label_level,
        "init": args.init,
        "members": args.members,
        "keep_start": args.keep_start,
        "freeze_stages": config.freeze_stages,
        "mil_pooling": config.mil_pooling,
        "replay": replay,  # the folder it resolved to (auto: OUT/cv/replay-phantoms, drawn inside crossval_s)
        "replay_share": config.replay_share if replay else None,
        "machine": {"cpu_count": cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available()},
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "target_s": args.target_s,
        "ratio": round(times["crossval_s"] / args.target_s, 3),
        "epochs_equivalent": round(times["crossval_s"] / times["one_epoch_s"], 1),
        "target_met": times["crossval_s"] <= args.target_s,
        "aggregation": (json.loads((out / "cv" / "aggregation.json").read_text())
                        if (out / "cv" / "aggregation.json").exists() else args.aggregation or "the recipe's"),
        "oof_series_auc": auc,
        "oof_series_auc_among_bleeding": bleeding,  # each subtype among the bleeding series: which bleed
        "final_model": os.fspath(result.final) if result.final else None,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
