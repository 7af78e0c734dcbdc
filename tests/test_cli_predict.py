"""``ichscan predict`` end to end on a tiny phantom set with a tiny untrained checkpoint."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from ichscan.cli import main
from ichscan.labels import LABELS
from ichscan.model import build_model, save_checkpoint, write_ensemble
from ichscan.windows import PAPER_WINDOWS, PRESETS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ichscan.phantom import generate_dataset

    root = tmp_path_factory.mktemp("cli_predict")
    generate_dataset(root / "data", studies=3, seed=5, size=64, slices=(5, 6), layout="series")
    meta = {"windows": [PRESETS[w].to_dict() for w in PAPER_WINDOWS], "image_size": 32}
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpts.append(save_checkpoint(root / f"m{seed}", build_model("test_efficientnet"), meta))
    manifest = write_ensemble(root / "ensemble.json", ckpts)
    return root, manifest


def test_cli_predict_study_folders_with_ensemble_and_resume(setup, capsys):
    root, manifest = setup
    data = root / "data"
    base = [str(data), "--checkpoint", str(manifest), "--min-slices", "3", "--no-progress"]
    out = root / "out"
    assert main(["predict", *base, "--out", str(out), "--max-series", "1"]) == 0
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert main(["predict", *base, "--out", str(out), "--tta", "flip,zoom"]) == 1  # another config: refused
    assert "another configuration" in capsys.readouterr().err
    assert main(["predict", *base, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "3 series predicted (1 resumed)" in captured.err
    series = pd.read_csv(out / "series.csv")
    assert len(series) == 3 and series.n_slices.min() >= 5
    assert set(series.columns) >= {f"key_slice_{n}" for n in LABELS}
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["config"]["tta"] == ["identity", "hflip"] and len(doc["config"]["members"]) == 2
    assert str(out / "series.csv") in captured.out


def test_cli_predict_rejects_series_and_reports_bad_files(setup, tmp_path, capsys):
    root, manifest = setup
    thresholds = tmp_path / "thr.json"
    thresholds.write_text(json.dumps({"method": "fixed", "thresholds": {n: 0.0 for n in LABELS}}))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.dcm").write_bytes(b"\0" * 200)
    import shutil

    shutil.copytree(root / "data", tmp_path / "in" / "data")
    code = main(["predict", str(tmp_path / "in"), "--checkpoint", str(manifest), "--out", str(tmp_path / "o"),
                 "--min-slices", "6", "--thresholds", str(thresholds), "--aggregation", "topk", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0
    assert "broken.dcm" in err and "[min_slices]" in err
    series = pd.read_csv(tmp_path / "o" / "series.csv")
    assert (series[[f"pred_{n}" for n in LABELS]] == 1).all().all()  # every label positive at threshold 0
    skipped = pd.read_csv(tmp_path / "o" / "skipped.csv")
    assert "broken.dcm" in " ".join(skipped.path.dropna()) and (skipped.kind == "series").any()


def test_cli_predict_compile_gives_the_eager_probabilities(setup, capsys):
    # --compile is recorded in the run's config and changes speed, not results (fp32: within 1e-5)
    root, manifest = setup
    base = [str(root / "data"), "--checkpoint", str(manifest), "--min-slices", "3", "--no-progress",
            "--precision", "fp32"]
    assert main(["predict", *base, "--out", str(root / "eager")]) == 0
    assert main(["predict", *base, "--out", str(root / "compiled"), "--compile"]) == 0
    assert "fp32, compiled" in capsys.readouterr().err
    assert json.loads((root / "compiled" / "predictions.json").read_text())["config"]["compile"] is True
    eager = pd.read_csv(root / "eager" / "slices.csv")
    compiled = pd.read_csv(root / "compiled" / "slices.csv")
    assert list(eager.sop_uid) == list(compiled.sop_uid)
    cols = [f"prob_{n}" for n in LABELS]
    assert (eager[cols] - compiled[cols]).abs().max().max() <= 1e-5


def test_thresholds_chosen_by_ichscan_thresholds_travel_with_the_model(setup, tmp_path, capsys):
    import shutil

    root, _ = setup
    # A copy of the ensemble, so the module's fixture keeps its manifest without operating points.
    for name in ("m0.json", "m0.safetensors", "m1.json", "m1.safetensors", "ensemble.json"):
        shutil.copy(root / name, tmp_path / name)
    manifest = tmp_path / "ensemble.json"
    base = [str(root / "data"), "--min-slices", "3", "--no-progress"]
    assert main(["predict", *base, "--checkpoint", str(manifest), "--out", str(tmp_path / "val")]) == 0
    assert "thresholds: 0.5 (default)" in capsys.readouterr().err
    labels = root / "data" / "series_labels.csv"
    assert main(["thresholds", "--pred", str(tmp_path / "val" / "series.csv"), "--labels", str(labels),
                 "--out", str(tmp_path / "thr.json"), "--model", str(manifest)]) == 0
    assert f"operating points stored in {manifest}" in capsys.readouterr().out
    chosen = json.loads((tmp_path / "thr.json").read_text())["thresholds"]
    assert json.loads(manifest.read_text())["operating_points"]["thresholds"] == chosen
    assert main(["predict", *base, "--checkpoint", str(manifest), "--out", str(tmp_path / "again")]) == 0
    assert "thresholds: the model's operating points (youden, chosen on validation predictions" in \
        capsys.readouterr().err
    assert json.loads((tmp_path / "again" / "predictions.json").read_text())["thresholds"] == chosen
    # The same into one checkpoint's JSON; the weights are not touched.
    before = (tmp_path / "m0.safetensors").read_bytes()
    assert main(["thresholds", "--pred", str(tmp_path / "val" / "series.csv"), "--labels", str(labels),
                 "--out", str(tmp_path / "thr0.json"), "--model", str(tmp_path / "m0.safetensors")]) == 0
    assert json.loads((tmp_path / "m0.json").read_text())["operating_points"]["thresholds"] == chosen
    assert (tmp_path / "m0.safetensors").read_bytes() == before
