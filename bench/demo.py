"""How long ``ichscan demo`` takes, against its 15-minute budget on 2 CPU cores: the demo benchmark.

Runs the demo exactly as ``ichscan demo`` does (phantoms, the time plan, two quick models, prediction with
TTA and the ensemble, thresholds, Table 1 and the report) into a fresh folder and prints one JSON object:
wall time per phase, the budget and ``ratio`` = wall time / budget (at most 1.0 meets it), beside the
baseline measured in the same run: the seconds one training step of the quick model takes on these cores
(the demo's own probe, before it plans), so a slow machine shows as a slow step and a demo that trained less
of each epoch, not as a demo that ran over. ``predicted_over_actual`` says how well the plan foresaw the
run; the held-out series AUCs say what the training the budget allowed bought.

    .venv/bin/python bench/demo.py --out /tmp/demo-bench                    # as make demo, bf16 where native
    .venv/bin/python bench/demo.py --out /tmp/demo-bench --precision fp32   # as on cores without bf16

``make bench`` leaves it out (it is a whole demo); run it by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (a fresh one: the run is timed from scratch)")
    ap.add_argument("--minutes", type=float, default=15.0, help="the demo's time budget (default 15)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    # smaller demos, for a quick look or a test; the defaults are the demo's own
    ap.add_argument("--train-studies", type=int)
    ap.add_argument("--val-studies", type=int)
    ap.add_argument("--test-studies", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--workers", type=int)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    import torch

    from ichscan.demo import DemoConfig, TrainingPlan, run_demo
    from ichscan.hardware import cpu_bf16_support, cpu_count, resolve_precision

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty; the benchmark times a run from scratch")
    overrides = {k: v for k, v in dict(train_studies=args.train_studies, val_studies=args.val_studies,
                                        test_studies=args.test_studies, size=args.size, epochs=args.epochs,
                                        workers=args.workers).items() if v is not None}
    config = dataclasses.replace(DemoConfig(), minutes=args.minutes, precision=args.precision, **overrides)
    start = time.perf_counter()
    result = run_demo(out, config, say=lambda line: print(f"[{time.perf_counter() - start:6.0f} s] {line}",
                                                          file=sys.stderr, flush=True))
    wall = time.perf_counter() - start

    plan = json.loads((out / "models" / "plan.json").read_text())
    demo = json.loads((out / "demo.json").read_text())
    budget = args.minutes * 60
    share = TrainingPlan(**plan).share
    print(json.dumps({
        "benchmark": "ichscan demo (phantoms, two quick models, TTA ensemble, Table 1) against its time budget",
        "machine": {"cpu_count": cpu_count(), "torch_threads": torch.get_num_threads(),
                    "native_bf16": any(cpu_bf16_support().values()),
                    "precision": resolve_precision(args.precision, "cpu")},
        "config": {k: v for k, v in demo["config"].items() if k not in ("prevalence", "train_prevalence")},
        "seconds": {**demo["seconds"], "wall": round(wall, 1)},
        "target_s": budget,
        "ratio": round(wall / budget, 3),
        "target_met": wall <= budget,
        "baseline_seconds_per_step": plan["seconds_per_step"],  # the probe: one quick-model training step
        "steps_per_epoch": plan["steps_per_epoch"],
        "trained_steps_per_epoch": plan["max_steps_per_epoch"] or plan["steps_per_epoch"],
        "share_of_each_epoch": round(share, 3),
        "plan_note": plan["note"],
        "predicted_s": None if plan["predicted_seconds"] is None else round(plan["predicted_seconds"], 1),
        "predicted_over_actual": (None if plan["predicted_seconds"] is None
                                  else round(plan["predicted_seconds"] / demo["seconds"]["total"], 3)),
        "held_out_series_auc": {k: None if v is None else round(v, 4) for k, v in result.aucs.items()},
        "held_out_weighted_log_loss": None if result.weighted_log_loss is None else round(result.weighted_log_loss, 4),
        "out": os.fspath(out),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
