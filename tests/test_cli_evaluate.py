"""``ichscan evaluate`` and ``ichscan thresholds`` through the command line."""

from __future__ import annotations

import json

import pandas as pd

from ichscan.cli import main
from ichscan.labels import LABELS
from test_metrics import write_series


def test_thresholds_then_evaluate(tmp_path, capsys, caplog):
    val = tmp_path / "val"
    val.mkdir()
    pred, labels, *_ = write_series(val, n=60, seed=1)
    thr = tmp_path / "thresholds.json"
    assert main(["thresholds", "--pred", str(pred), "--labels", str(labels), "--method", "sensitivity",
                 "--target", "0.8", "--out", str(thr)]) == 0
    doc = json.loads(thr.read_text())
    assert doc["method"] == "sensitivity" and doc["target"] == 0.8 and set(doc["thresholds"]) == set(LABELS)
    lo, hi = doc["details"]["any"]["threshold_ci"]  # by default, 1000 resamples of the validation patients
    assert 0.0 <= lo <= hi <= 1.0 and doc["details"]["any"]["threshold_bootstrap"] == 1000
    printed = capsys.readouterr().out
    assert "95% CI of the threshold" in printed
    assert f"median {doc['details']['any']['threshold_median']:.4f}" in printed
    assert main(["thresholds", "--pred", str(pred), "--labels", str(labels), "--bootstrap", "-1",
                 "--out", str(tmp_path / "t2.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bootstrap must be 0 or more" in err[0]

    test = tmp_path / "test"
    test.mkdir()
    pred, labels, *_ = write_series(test, n=40, seed=2, drop_pred=2)
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--labels", str(labels), "--thresholds", str(thr),
                 "--bootstrap", "50", "--out", str(out), "--html"]) == 0
    captured = capsys.readouterr()
    assert "| Label | POS n (%)" in captured.out and "Weighted log loss" in captured.out
    assert "2 of 40 series(s)" in caplog.text and "have no prediction" in caplog.text
    names = {p.name for p in out.iterdir()}
    assert {"table1.md", "table1.csv", "table1.json", "roc.png", "roc.svg", "report.html"} <= names
    result = json.loads((out / "table1.json").read_text())
    assert result["level"] == "series" and result["n"] == 38 and result["n_units"] == 19
    assert result["thresholds"] == doc["thresholds"]
    table = pd.read_csv(out / "table1.csv")
    assert list(table["label"]) == [*LABELS, "weighted_log_loss"]


def test_evaluate_reports_data_errors(tmp_path, capsys):
    pred, labels, *_ = write_series(tmp_path, extra_pred=2)
    assert main(["evaluate", "--pred", str(pred), "--labels", str(labels), "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert "ichscan evaluate: error:" in err and "series_pred.csv" in err and "2 of 42 series" in err
    assert main(["evaluate", "--pred", str(pred), "--labels", str(labels), "--thresholds", "2"]) == 1
    assert "thresholds must lie in [0, 1]" in capsys.readouterr().err


def test_thresholds_youden_median_through_the_command_line(tmp_path, capsys):
    """--method youden-median writes the median point with Youden's own beside it; without resamples it is
    one line saying what it needs, and no file."""
    pred, labels, *_ = write_series(tmp_path, n=80, seed=2)
    thr = tmp_path / "median.json"
    assert main(["thresholds", "--pred", str(pred), "--labels", str(labels), "--method", "youden-median",
                 "--bootstrap", "300", "--out", str(thr)]) == 0
    doc = json.loads(thr.read_text())
    d = doc["details"]["any"]
    assert doc["method"] == "youden-median" and d["threshold_bootstrap"] == 300
    assert d["threshold_ci"][0] <= doc["thresholds"]["any"] <= d["threshold_ci"][1] and 0 < d["youden_point"] < 1
    capsys.readouterr()
    assert main(["thresholds", "--pred", str(pred), "--labels", str(labels), "--method", "youden-median",
                 "--bootstrap", "0", "--out", str(tmp_path / "none.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--method youden-median" in err[0] and "--bootstrap > 0" in err[0]
    assert not (tmp_path / "none.json").exists()


def test_thresholds_pool_several_validation_sets(tmp_path, capsys):
    """Two validation sets, each joined to its own labels, give the points and intervals of one file holding
    both; a series in both sets, or a prediction file without its label file, is one line and no file."""
    from test_metrics import rounded

    a, b, both = tmp_path / "a", tmp_path / "b", tmp_path / "both"
    for d in (a, b, both):
        d.mkdir()
    pa, la, *_ = write_series(a, n=60, seed=1)
    pb, lb, *_ = write_series(b, n=50, seed=2)
    for path in (pb, lb):  # the second set's own series and patients
        t = pd.read_csv(path, dtype=str)
        t["series_uid"] = "2." + t["series_uid"]
        t["patient_id"] = "Q" + t["patient_id"]
        t.to_csv(path, index=False)
    pd.concat([pd.read_csv(pa), pd.read_csv(pb)]).to_csv(both / "pred.csv", index=False)
    pd.concat([pd.read_csv(la), pd.read_csv(lb)]).to_csv(both / "labels.csv", index=False)
    common = ["--bootstrap", "200", "--out"]
    assert main(["thresholds", "--pred", str(pa), str(pb), "--labels", str(la), str(lb), *common,
                 str(tmp_path / "pooled.json")]) == 0
    assert main(["thresholds", "--pred", str(both / "pred.csv"), "--labels", str(both / "labels.csv"), *common,
                 str(tmp_path / "one.json")]) == 0
    assert main(["thresholds", "--pred", str(pa), "--labels", str(la), *common, str(tmp_path / "a.json")]) == 0
    pooled, one, first = (json.loads((tmp_path / n).read_text()) for n in ("pooled.json", "one.json", "a.json"))
    assert pooled["thresholds"] == one["thresholds"] and rounded(pooled["details"]) == rounded(one["details"])
    assert pooled["details"]["any"]["positives"] + pooled["details"]["any"]["negatives"] == 110
    assert first["details"]["any"]["positives"] + first["details"]["any"]["negatives"] == 60
    assert pooled["source"]["pred"] == [str(pa), str(pb)] and pooled["source"]["n"] == 110
    capsys.readouterr()
    assert main(["thresholds", "--pred", str(pa), str(both / "pred.csv"), "--labels", str(la),
                 str(both / "labels.csv"), *common, str(tmp_path / "twice.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1.2.3." in err[0] and "two of the pooled sets" in err[0]
    assert main(["thresholds", "--pred", str(pa), str(pb), "--labels", str(la), *common,
                 str(tmp_path / "unpaired.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 prediction file(s) and 1 label file(s)" in err[0]
    assert not (tmp_path / "twice.json").exists() and not (tmp_path / "unpaired.json").exists()
