"""The demo end to end through the CLI, at a size a test can afford (64 px, a handful of studies)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ichscan.cli import main
from ichscan.labels import LABELS


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo")
    readme = out / "README.md"
    readme.write_text("# x\n\n<!-- ichscan:demo -->\nPLACEHOLDER-TEXT\n<!-- /ichscan:demo -->\n\ntail\n")
    argv = ["demo", "--out", str(out / "run"), "--train-studies", "8", "--val-studies", "4", "--test-studies", "6",
            "--size", "64", "--slices", "12-14", "--epochs", "1", "--workers", "1", "--readme", str(readme)]
    assert main(argv) == 0
    return out, argv


def test_demo_writes_table1_figure_and_report(demo_run):
    out, _ = demo_run
    run = out / "run"
    table = json.loads((run / "report" / "table1.json").read_text())
    truth = pd.read_csv(run / "phantoms" / "test" / "series_labels.csv")
    assert [row["label"] for row in table["per_label"]] == list(LABELS)
    for row in table["per_label"]:
        # POS and NEG count the held-out series exactly as the label file has them.
        assert row["pos"] == int(truth[row["label"]].sum())
        assert row["pos"] + row["neg"] == len(truth) == 6
    series = pd.read_csv(run / "predictions" / "test" / "series.csv")
    assert sorted(series["series_uid"]) == sorted(truth["series_uid"])
    assert series[[f"prob_{k}" for k in LABELS]].apply(lambda c: c.between(0, 1)).all().all()
    assert (run / "report" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (run / "report" / "report.html").read_text()
    assert html.count('class="series"') == 6 and "not a medical device" in html
    manifest = json.loads((run / "models" / "ensemble.json").read_text())
    assert len(manifest["members"]) == 2
    thresholds = json.loads((run / "thresholds.json").read_text())["thresholds"]
    assert set(thresholds) == set(LABELS)


def test_demo_pastes_results_into_readme(demo_run):
    out, _ = demo_run
    text = (out / "README.md").read_text()
    assert "PLACEHOLDER-TEXT" not in text and text.endswith("tail\n")
    assert "| any |" in text and "docs/images/demo_roc.png" in text
    assert (out / "docs" / "images" / "demo_roc.png").is_file()


def test_demo_rerun_resumes_without_redoing_work(demo_run):
    out, argv = demo_run
    before = (out / "run" / "models" / "model_a" / "best.safetensors").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "run" / "models" / "model_a" / "best.safetensors").stat().st_mtime_ns == before


def test_demo_refuses_other_settings_in_the_same_folder(demo_run, capsys):
    out, argv = demo_run
    changed = [a if a != "8" else "9" for a in argv]
    assert main(changed) == 1
    assert "other settings" in capsys.readouterr().err
