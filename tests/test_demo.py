"""The demo end to end through the CLI, at a size a test can afford (64 px, a few dozen studies)."""

from __future__ import annotations

import html
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
    # Big enough that a model which learned nothing would show (16 held-out series, 3 epochs): ~1 min.
    argv = ["demo", "--out", str(out / "run"), "--train-studies", "40", "--val-studies", "8", "--test-studies", "16",
            "--size", "64", "--slices", "12-14", "--epochs", "3", "--workers", "1", "--readme", str(readme)]
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
        assert row["pos"] + row["neg"] == len(truth) == 16
    series = pd.read_csv(run / "predictions" / "test" / "series.csv")
    assert sorted(series["series_uid"]) == sorted(truth["series_uid"])
    assert series[[f"prob_{k}" for k in LABELS]].apply(lambda c: c.between(0, 1)).all().all()
    assert (run / "report" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (run / "report" / "report.html").read_text()
    assert html.count('class="series"') == 16 and "not a medical device" in html
    manifest = json.loads((run / "models" / "ensemble.json").read_text())
    assert len(manifest["members"]) == 2
    thresholds = json.loads((run / "thresholds.json").read_text())["thresholds"]
    assert set(thresholds) == set(LABELS)
    # The operating points chosen on validation travel with the model.
    assert manifest["operating_points"]["thresholds"] == thresholds


def test_demo_models_beat_chance_on_held_out_phantoms(demo_run):
    """The demo's models learned something: on the ~200 held-out slices their ranking of `any` beats chance
    far beyond what an untrained model reaches (one-sided Mann-Whitney p < 0.001; chance's AUC has an SD of
    about 0.04 there), and the 16 held-out series are ranked better than chance. (16 series resolve a series
    AUC only to about +-0.15: this 64 px model, 3 epochs on 40 studies, measured 0.67-0.73 on them across
    generator versions and 0.69-0.70 on 40, so a fixed bar of 0.7 there tested the draw, not the model.)"""
    from scipy.stats import mannwhitneyu
    from sklearn.metrics import roc_auc_score

    run = demo_run[0] / "run"
    truth = pd.read_csv(run / "phantoms" / "test" / "series_labels.csv").set_index("series_uid")
    pred = pd.read_csv(run / "predictions" / "test" / "series.csv").set_index("series_uid").loc[truth.index]
    auc = roc_auc_score(truth["any"], pred["prob_any"])
    assert auc > 0.5, auc
    assert json.loads((run / "demo.json").read_text())["auc"]["any"] == pytest.approx(auc)
    labels = pd.read_csv(run / "phantoms" / "test" / "labels.csv")
    labels = labels[labels["ID"].str.endswith("_any")]
    truth_slices = labels.set_index(labels["ID"].str[: -len("_any")])["Label"]
    slices = pd.read_csv(run / "predictions" / "test" / "slices.csv").set_index("image_id")
    joined = slices.join(truth_slices, how="inner")
    assert len(joined) >= 150 and joined["Label"].nunique() == 2
    p = mannwhitneyu(joined.loc[joined["Label"] == 1, "prob_any"], joined.loc[joined["Label"] == 0, "prob_any"],
                     alternative="greater").pvalue
    assert p < 1e-3, (p, roc_auc_score(joined["Label"], joined["prob_any"]))


def test_predict_with_the_demo_model_uses_and_names_its_operating_points(demo_run, tmp_path, capsys):
    run = demo_run[0] / "run"
    study = run / "phantoms" / "test" / "images"
    assert main(["predict", str(study), "--checkpoint", str(run / "models" / "ensemble.json"), "--out",
                 str(tmp_path / "p"), "--no-progress", "--min-slices", "3"]) == 0
    assert "operating points (youden, chosen on validation phantoms" in capsys.readouterr().err
    doc = json.loads((tmp_path / "p" / "predictions.json").read_text())
    chosen = json.loads((run / "thresholds.json").read_text())
    assert doc["thresholds"] == chosen["thresholds"]
    # and so do their bootstrap intervals: the demo model's predictions mark borderline calls
    intervals = {k: d["threshold_ci"] for k, d in chosen["details"].items() if d.get("threshold_ci")}
    assert "any" in intervals and doc["threshold_intervals"]["intervals"] == intervals


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


def test_demo_plans_whole_epochs_when_they_fit_and_keeps_its_plan(demo_run, capsys):
    """The test demo is far inside the 15-minute budget: whole epochs, the probe's step time recorded, and a
    rerun reads the plan it made instead of measuring again. A folder stamped before the budget existed
    (no ``minutes`` or ``precision`` in demo_config.json) resumes as the defaults."""
    out, argv = demo_run
    run = out / "run"
    plan = json.loads((run / "models" / "plan.json").read_text())
    assert plan["max_steps_per_epoch"] is None and plan["budget_seconds"] == 900
    assert 0 < plan["seconds_per_step"] < 60 and plan["predicted_seconds"] < 900
    for name in ("model_a", "model_b"):
        assert json.loads((run / "models" / name / "config.json").read_text())["max_steps_per_epoch"] is None
    assert json.loads((run / "demo.json").read_text())["training_plan"] == plan
    stamp = run / "demo_config.json"
    old = json.loads(stamp.read_text())
    assert old["minutes"] == 15.0 and old["precision"] == "auto"
    stamp.write_text(json.dumps({k: v for k, v in old.items() if k not in ("minutes", "precision")}))
    before = (run / "models" / "plan.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert (run / "models" / "plan.json").stat().st_mtime_ns == before
    assert "training plan, as made when this demo first trained: whole epochs fit" in capsys.readouterr().err
    assert json.loads(stamp.read_text()) == old


def test_plan_training_by_hand():
    """The plan's arithmetic with numbers a person can redo: 900 s budget, 100 s gone, 2 models x 4 epochs,
    50 validation and 560 prediction batches. Everything but training costs
    100 + 8*50*0.3*s + 560*0.3*1.5*s + 30 s; training fills 0.93 * 900 = 837 s with the rest."""
    from ichscan.demo import plan_training

    common = dict(budget_seconds=900.0, elapsed_seconds=100.0, steps_per_epoch=280, epochs=4, models=2,
                  val_batches=50, predict_batches=560)
    # 0.5 s per step: the rest costs 100 + 60 + 126 + 30 = 316 s; (837 - 316) / (8 * 0.5) = 130.25 -> 130 steps
    plan = plan_training(seconds_per_step=0.5, **common)
    assert plan.max_steps_per_epoch == 130 and plan.steps_per_epoch == 280
    assert plan.elapsed_seconds == 100.0
    assert plan.predicted_seconds == pytest.approx(316 + 8 * 130 * 0.5)
    assert plan.share == pytest.approx(130 / 280) and "130 of 280 steps per epoch" in plan.note
    # 0.1 s per step: 100 + 12 + 25.2 + 30 = 167.2 s, and all 8 * 280 steps (224 s) fit
    plan = plan_training(seconds_per_step=0.1, **common)
    assert plan.max_steps_per_epoch is None and plan.share == 1.0
    assert plan.predicted_seconds == pytest.approx(167.2 + 224)
    # 2 s per step: the rest alone (874 s) is over the margin: a quarter of each epoch (70 steps), said plainly
    plan = plan_training(seconds_per_step=2.0, **common)
    assert plan.max_steps_per_epoch == 70 and "cannot be met" in plan.note
    assert plan.predicted_seconds == pytest.approx(874 + 8 * 70 * 2.0)
    # no budget: whole epochs, nothing predicted
    plan = plan_training(seconds_per_step=None, **{**common, "budget_seconds": None})
    assert plan.max_steps_per_epoch is None and plan.predicted_seconds is None


def test_demo_over_budget_trains_a_share_of_each_epoch(tmp_path):
    """A budget already spent (it began two minutes before the call, as when `make demo` installs first, and
    is one minute long): each model trains the planned steps per epoch and no more (its metrics record the
    global step), the report says so, and the plan says the budget will be exceeded."""
    pytest.importorskip("torch")
    import time

    from ichscan.demo import DemoConfig, run_demo

    config = DemoConfig(train_studies=12, val_studies=4, test_studies=6, size=64, slices=(12, 14), epochs=2,
                        workers=1, minutes=1.0, n_bootstrap=50)
    result = run_demo(tmp_path / "run", config, started_at=time.time() - 120)
    plan = json.loads((tmp_path / "run" / "models" / "plan.json").read_text())
    # the two minutes before the call count, and FIXED_SECONDS comes on top
    assert plan["elapsed_seconds"] >= 120 and plan["predicted_seconds"] > plan["elapsed_seconds"] + 30
    slices = json.loads((tmp_path / "run" / "phantoms" / "train" / "manifest.json").read_text())["counts"]["slices"]
    assert plan["steps_per_epoch"] == slices // 32 >= 4  # batch 32, the quick preset's
    assert plan["max_steps_per_epoch"] == -(-plan["steps_per_epoch"] // 4) < plan["steps_per_epoch"]
    assert "cannot be met" in plan["note"] and plan["budget_seconds"] == 60
    for name in ("model_a", "model_b"):
        metrics = [json.loads(line) for line in (tmp_path / "run" / "models" / name / "metrics.jsonl").open()]
        assert [m["global_step"] for m in metrics] == [plan["max_steps_per_epoch"], 2 * plan["max_steps_per_epoch"]]
    assert f"{plan['max_steps_per_epoch'] / plan['steps_per_epoch']:.0%} of each epoch's steps" \
        in html.unescape(result.report.read_text())


@pytest.mark.parametrize("argv, message", [
    (["--started-at", "12"], "--started-at 12: expected a moment of the last 24 hours"),
    (["--epochs", "0"], "--epochs 0: expected 1 or more"),
    (["--train-studies", "0"], "--train-studies 0: expected 1 or more"),
    (["--minutes", "-1"], "--minutes -1.0: expected 0 (no budget) or more"),
])
def test_demo_refuses_bad_settings_in_one_line_before_it_starts(tmp_path, capsys, argv, message):
    assert main(["demo", "--out", str(tmp_path / "run"), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
