"""Phantom generation speed and the trivial-feature check; prints one JSON object.

    .venv/bin/python bench/phantom.py [--studies 60] [--auc-series 200]

* ``slices_per_s``: files written per second (DICOM, labels, manifest) at the demo's 128 px with 1 and 2
  workers, and at 512 px with 1 worker; ``tilted``: the same at 128 px with 1 worker and ``--pitch 20``
  (scan planes tilted against the head), and ``ratio`` its time per slice over the untilted run's;
* ``trivial_auc_any``: series-level ROC AUC for ``any`` of the count of voxels between 50 and 90 HU inside
  the skull (the issue's shortcut check; must stay <= 0.85), with the same count restricted to slices
  of 128 px and 512 px, and on tilted phantoms (``--pitch 20``) at 128 px.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from ichscan.phantom import generate_dataset, plan_dataset, render_series


def speed(studies: int, size: int, workers: int, slices=(32, 40), pitch: float = 0.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        s = generate_dataset(tmp, studies, seed=123, size=size, slices=slices, workers=workers, pitch=pitch)
        dt = time.perf_counter() - t0
    return {"size": size, "workers": workers, "studies": studies, "pitch": pitch, "slices": s.slices,
            "seconds": round(dt, 2), "slices_per_s": round(s.slices / dt, 1)}


def trivial_auc(n: int, size: int, seed: int = 7, pitch: float = 0.0) -> dict:
    feature, label, blood = [], [], []
    for plan in plan_dataset(n, seed, size=size, pitch=pitch):
        ps = render_series(plan)
        v = ps.hu[ps.depth > 0]
        feature.append(int(((v >= 50) & (v <= 90)).sum()))
        label.append(ps.series_labels()["any"])
        m = np.zeros(ps.hu.shape, bool)
        for mask in ps.masks.values():
            m |= mask
        if m.any():
            blood.append(float(np.median(ps.hu[m])))
    return {"size": size, "pitch": pitch, "series": n, "positive": int(sum(label)),
            "trivial_auc_any": round(float(roc_auc_score(label, feature)), 4),
            "median_blood_hu": round(float(np.median(blood)), 1) if blood else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=60, help="studies per speed run at 128 px")
    ap.add_argument("--auc-series", type=int, default=200, help="series for the trivial-feature AUC")
    args = ap.parse_args()
    plain = speed(args.studies, 128, 1)
    tilted = speed(max(4, args.studies // 3), 128, 1, pitch=20.0)
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "speed": [plain, speed(args.studies, 128, 2), speed(4, 512, 1)],
        "tilted": dict(tilted, ratio=round(plain["slices_per_s"] / tilted["slices_per_s"], 2)),
        "trivial_feature": [trivial_auc(args.auc_series, 128), trivial_auc(max(20, args.auc_series // 5), 512),
                            trivial_auc(max(20, args.auc_series // 2), 128, pitch=20.0)],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
