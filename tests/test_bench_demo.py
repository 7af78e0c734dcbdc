"""bench/demo.py: a small demo timed against its budget, its JSON checked against the files the demo wrote."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_demo", REPO / "bench" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_demo_reports_the_run_against_its_budget(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "demo"
    assert _bench().main(["--out", str(out), "--train-studies", "12", "--val-studies", "4", "--test-studies", "6",
                          "--size", "64", "--epochs", "2", "--workers", "1", "--minutes", "15"]) == 0
    report = json.loads(capsys.readouterr().out)
    demo = json.loads((out / "demo.json").read_text())
    plan = json.loads((out / "models" / "plan.json").read_text())
    assert report["target_s"] == 900
    assert report["ratio"] == round(report["seconds"]["wall"] / 900, 3) and report["target_met"]
    assert report["seconds"]["total"] == demo["seconds"]["total"] <= report["seconds"]["wall"]
    # far inside 15 minutes: whole epochs, the probe's step time as the baseline
    assert report["share_of_each_epoch"] == 1.0 and report["trained_steps_per_epoch"] == plan["steps_per_epoch"]
    assert report["baseline_seconds_per_step"] == plan["seconds_per_step"] > 0
    assert report["predicted_over_actual"] == round(plan["predicted_seconds"] / demo["seconds"]["total"], 3)
    assert report["held_out_series_auc"]["any"] == round(demo["auc"]["any"], 4)
    assert report["config"]["minutes"] == 15 and report["config"]["train_studies"] == 12
    # a second run into the same folder would not be timed from scratch
    with pytest.raises(SystemExit, match="not empty"):
        _bench().main(["--out", str(out)])
