"""Thin series read slice by slice or as slabs (``ichscan predict --slab``): what it costs and what it changes.

Draws thin-slice phantom series (or takes ``--data``, any folder ``ichscan predict`` reads, with
``series_labels.csv``), predicts every series twice with the same model (default: the bundled one) and the
same TTA and precision, slice by slice and as slabs of ``--slab`` mm, and prints one JSON object: series AUC
per label for both and their paired difference (DeLong, with its 95% CI and p), the weighted log loss of
both with a paired bootstrap interval of the difference, the decisions at the model's operating points, and
the model's seconds per series for each, with ``ratio`` = slabs / slices (below 1: slabs are faster).
Every selected series of the folder is predicted (no selection rules: a thin band of slices may miss the
levels the head check reads), with the bundled aggregation.

    .venv/bin/python bench/slabs.py                                           # 60 phantoms, 0.8-1.25 mm
    .venv/bin/python bench/slabs.py --data STUDIES --work /tmp/slabs-site    # a site's thin series
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ichscan-bench-slabs"),
                    help="folder for the drawn phantoms, kept and reused when complete (default: a folder in the "
                         "system's temporary directory)")
    ap.add_argument("--data", help="a labelled folder of thin series instead of phantoms (series_labels.csv)")
    ap.add_argument("--checkpoint", default="bundled")
    ap.add_argument("--slab", type=float, default=5.0, help="slab thickness in mm (default 5)")
    ap.add_argument("--studies", type=int, default=60)
    ap.add_argument("--seed", type=int, default=9301)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--slices", default="140-200")
    ap.add_argument("--thickness", default="0.8-1.25")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args(argv)

    import pandas as pd

    from ichscan.comparison import delong
    from ichscan.dicom import find_series
    from ichscan.labels import LABELS
    from ichscan.metrics import weighted_log_loss, weighted_log_loss_rows
    from ichscan.predict.predictor import Predictor

    work = Path(args.work)
    if args.data:
        data = Path(args.data)
        drawn = None
    else:
        from ichscan.phantom import generate_dataset

        data = work / "phantoms"
        t0 = time.perf_counter()
        generate_dataset(data, studies=args.studies, seed=args.seed, size=args.size,
                         slices=tuple(int(v) for v in args.slices.split("-")), thickness=args.thickness,
                         twins=0.5, workers=args.workers)
        drawn = {"studies": args.studies, "seed": args.seed, "size": args.size, "slices": args.slices,
                 "thickness": args.thickness, "twins": 0.5, "seconds": round(time.perf_counter() - t0, 1)}
    labels = pd.read_csv(data / "series_labels.csv").set_index("series_uid")

    plain = Predictor.from_checkpoint(args.checkpoint, precision=args.precision)
    slabs = Predictor.from_checkpoint(args.checkpoint, precision=args.precision, slab_mm=args.slab)
    series = sorted(find_series(data, pixels=False).series, key=lambda s: str(s.series_uid))
    rows = []
    seconds = {"slices": 0.0, "slabs": 0.0}
    for s in series:
        if str(s.series_uid) not in labels.index:
            continue
        row = {"uid": str(s.series_uid), "n": len(s.slices)}
        for name, pred in (("slices", plain), ("slabs", slabs)):
            loaded = pred.decode_series(s)  # decoding timed apart: the model's time is what slabs divide
            t0 = time.perf_counter()
            p = pred.predict_series(s, loaded=loaded)
            seconds[name] += time.perf_counter() - t0
            row[name] = p.probs
            row[f"{name}_read"] = len(p.read_probs)
        rows.append(row)
    y = np.array([[labels.loc[r["uid"], n] for n in LABELS] for r in rows], dtype=float)
    a = np.array([r["slices"] for r in rows])
    b = np.array([r["slabs"] for r in rows])
    ops = plain.operating_points["thresholds"] if plain.operating_points else {n: 0.5 for n in LABELS}
    t = np.array([ops.get(n, 0.5) for n in LABELS])

    auc = {}
    for j, name in enumerate(LABELS):
        if 2 <= y[:, j].sum() <= len(y) - 2:
            d = delong(y[:, j], a[:, j], b[:, j])
            lo, hi = d.ci()
            auc[name] = {"slices": round(d.auc_a, 4), "slabs": round(d.auc_b, 4), "diff": round(d.diff, 4),
                         "ci": [round(lo, 4), round(hi, 4)], "p": round(d.p_value(), 3),
                         "positives": int(y[:, j].sum())}
    rng = np.random.default_rng(0)
    la, lb = weighted_log_loss_rows(y, a), weighted_log_loss_rows(y, b)
    boot = [float(np.mean(lb[i] - la[i])) for i in (rng.integers(0, len(y), len(y)) for _ in range(1000))]

    def decisions(p):
        called = p[:, 0] >= t[0]
        pos = y[:, 0] == 1
        return {"positives_called": int((called & pos).sum()), "negatives_called": int((called & ~pos).sum()),
                "positives": int(pos.sum()), "negatives": int((~pos).sum()), "correct": int((called == pos).sum())}

    n_read = {k: float(np.median([r[f"{k}_read"] for r in rows])) for k in ("slices", "slabs")}
    out = {
        "bench": "slabs", "checkpoint": args.checkpoint, "slab_mm": args.slab, "precision": args.precision,
        "data": str(data), "drawn": drawn, "series": len(rows),
        "slices_median": float(np.median([r["n"] for r in rows])),
        "images_read_median": n_read,
        "auc": auc,
        "weighted_log_loss": {"slices": round(weighted_log_loss(y, a), 4), "slabs": round(weighted_log_loss(y, b), 4),
                              "diff_ci": [round(float(np.percentile(boot, 2.5)), 4),
                                          round(float(np.percentile(boot, 97.5)), 4)]},
        "any_at_operating_point": {"threshold": round(float(t[0]), 4), "slices": decisions(a), "slabs": decisions(b)},
        "mean_any_of_negatives": {"slices": round(float(a[y[:, 0] == 0, 0].mean()), 3),
                                  "slabs": round(float(b[y[:, 0] == 0, 0].mean()), 3)},
        "model_seconds_per_series": {k: round(v / max(1, len(rows)), 3) for k, v in seconds.items()},
        "ratio": round(seconds["slabs"] / seconds["slices"], 3) if seconds["slices"] else None,
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
