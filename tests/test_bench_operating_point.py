"""bench/operating_point.py: points chosen on drawn validation sets, scored on another set.

Checked against what a person can recompute: the test set's best Youden's J by scanning every threshold,
each draw's Youden point by ``choose_threshold`` on the drawn rows, regret as the ceiling less the mean.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ichscan.metrics import choose_threshold
from test_metrics import write_series

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_operating_point", REPO / "bench" / "operating_point.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_points_are_chosen_on_draws_and_scored_on_the_other_set(bench, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pred, labels, y, p = write_series(tmp_path / "a", n=120, seed=1)
    tpred, tlabels, yt, pt = write_series(tmp_path / "b", n=90, seed=2)
    assert bench.main(["--pred", str(pred), "--labels", str(labels), "--test-pred", str(tpred),
                       "--test-labels", str(tlabels), "--n", "30", "--repeats", "12", "--bootstrap", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the ceiling: every observed score tried as a threshold on the test set
    best = max((pt[:, 0] >= t)[yt[:, 0] == 1].mean() + (pt[:, 0] < t)[yt[:, 0] == 0].mean() - 1
               for t in np.unique(pt[:, 0]))
    assert out["test"]["best_j"] == pytest.approx(best)
    assert out["test"]["series"] == 90 and out["validation"]["positive"] == int(y[:, 0].sum())
    for m in ("youden", "youden-median"):
        r = out["methods"][m]
        assert r["test_j_mean"] <= best + 1e-12 and r["regret"] == pytest.approx(best - r["test_j_mean"])
        assert 0 <= r["point_range"][0] <= r["point_mean"] <= r["point_range"][1] <= 1
    assert out["ratio"] == pytest.approx(out["methods"]["youden-median"]["point_sd"]
                                         / out["methods"]["youden"]["point_sd"])
    # the first draw by hand: whole patients (two series each) until 30 series, Youden's point on them
    patients = pd.read_csv(labels)["patient_id"].to_numpy()
    rows = next(bench.draw_sets(patients, y[:, 0], 30, 1, 0))
    assert len(rows) == 30 and len(set(patients[rows])) == 15
    points = bench.choose_points(y[:, 0], p[:, 0], patients, n=30, repeats=12, n_bootstrap=50, seed=0)
    assert points["youden"][0] == choose_threshold(y[rows, 0], p[rows, 0], method="youden")[0]
    assert np.mean(points["youden-median"]) == pytest.approx(out["methods"]["youden-median"]["point_mean"])


def test_a_missing_file_is_one_line(bench, tmp_path, capsys):
    pred, labels, *_ = write_series(tmp_path, n=20, seed=3)
    assert bench.main(["--pred", str(pred), "--labels", str(labels), "--test-pred", str(tmp_path / "no.csv"),
                       "--test-labels", str(labels)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no.csv" in err[0] and "not found" in err[0]
