"""No output of any command carries a patient's name, ID, birth date, accession number or institution.

Values are planted in real DICOM files (phantoms edited with pydicom); every file each command writes, and
everything it prints or logs, is searched for them. Outputs name patients by a keyed pseudonym instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from ichscan.cli import main
from ichscan.privacy import Pseudonymizer, load_key

PLANTED = {
    "PatientName": "Plantedname^Ernestine",
    "PatientID": "PID-PLANTED-4711",
    "PatientBirthDate": "19230405",
    "AccessionNumber": "ACC-PLANTED-99",
    "InstitutionName": "Planted General Hospital",
}
NEEDLES = [v.split("^")[0] for v in PLANTED.values()] + ["1923-04-05"]


def _leaks(text: str) -> list[str]:
    return [n for n in NEEDLES if n in text]


def _file_leaks(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
        return _leaks(frame.astype(str).to_csv())
    return _leaks(path.read_bytes().decode("latin-1"))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    import torch

    from ichscan.model import build_model, save_checkpoint
    from ichscan.phantom import generate_dataset
    from ichscan.windows import PAPER_WINDOWS, PRESETS

    root = tmp_path_factory.mktemp("privacy")
    generate_dataset(root / "data", studies=2, seed=11, size=64, slices=(5, 6))
    for f in (root / "data" / "images").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        for tag, value in PLANTED.items():
            setattr(ds, tag, value)
        ds.save_as(f)
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "m", build_model("test_efficientnet"),
                           {"windows": [PRESETS[w].to_dict() for w in PAPER_WINDOWS], "image_size": 32})
    return root, ckpt


def _run(argv, capsys, caplog) -> str:
    with caplog.at_level(logging.DEBUG, logger="ichscan"):
        code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out + captured.err + caplog.text


def test_no_command_writes_or_prints_planted_patient_data(study, tmp_path, capsys, caplog, monkeypatch):
    root, ckpt = study
    monkeypatch.setenv("ICHSCAN_KEY_FILE", str(tmp_path / "site.key"))
    data = root / "data"
    printed = _run(["inspect", str(data / "images")], capsys, caplog)
    printed += _run(["inspect", str(data / "images"), "--json"], capsys, caplog)
    printed += _run(["render", str(data / "images"), "--out", str(tmp_path / "sheet.png")], capsys, caplog)
    printed += _run(["index", str(data), "--workers", "1", "--no-progress"], capsys, caplog)
    out = tmp_path / "pred"
    printed += _run(["predict", str(data / "images"), "--checkpoint", str(ckpt), "--out", str(out),
                     "--min-slices", "3", "--no-progress"], capsys, caplog)
    printed += _run(["evaluate", "--pred", str(out / "series.csv"), "--labels", str(data / "series_labels.csv"),
                     "--out", str(tmp_path / "eval"), "--quiet", "--html", "--dicom", str(data / "images")],
                    capsys, caplog)
    printed += _run(["thresholds", "--pred", str(out / "series.csv"), "--labels", str(data / "series_labels.csv"),
                     "--out", str(tmp_path / "thr.json")], capsys, caplog)
    printed += _run(["predict", str(data / "images"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "html"),
                     "--min-slices", "3", "--no-progress", "--html"], capsys, caplog)
    printed += _run(["cache", str(data), "--out", str(tmp_path / "cache"), "--size", "32", "--workers", "1",
                     "--no-progress"], capsys, caplog)
    assert _leaks(printed) == []
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "site.key"]
    written.append(data / "ichscan_index.parquet")
    assert len(written) > 10
    assert {str(p.relative_to(tmp_path)) if p.is_relative_to(tmp_path) else p.name: _file_leaks(p)
            for p in written if _file_leaks(p)} == {}
    # Patients are named by their pseudonym, the same one in every output and for every series of theirs.
    series = pd.read_csv(out / "series.csv")
    expected = Pseudonymizer()(PLANTED["PatientID"])
    assert expected.startswith("anon-") and set(series["patient_id"]) == {expected}
    assert set(pd.read_csv(out / "slices.csv")["patient_id"]) == {expected}


def test_keep_patient_id_keeps_it_and_the_key_links_back(study, tmp_path, capsys, caplog, monkeypatch):
    root, ckpt = study
    monkeypatch.setenv("ICHSCAN_KEY_FILE", str(tmp_path / "site.key"))
    out = tmp_path / "pred"
    _run(["predict", str(root / "data" / "images"), "--checkpoint", str(ckpt), "--out", str(out),
          "--min-slices", "3", "--no-progress", "--keep-patient-id"], capsys, caplog)
    assert set(pd.read_csv(out / "series.csv")["patient_id"]) == {PLANTED["PatientID"]}
    # The site's key turns its own list of PatientIDs into the keys outputs carry.
    key = load_key(tmp_path / "site.key")
    assert len(key) == 32 and (tmp_path / "site.key").stat().st_mode & 0o077 == 0
    p = Pseudonymizer(key_path=tmp_path / "site.key")
    assert p("PID-PLANTED-4711") == p("PID-PLANTED-4711") != p("PID-OTHER")
    assert Pseudonymizer(key_path=tmp_path / "other.key")("PID-PLANTED-4711") != p("PID-PLANTED-4711")


def test_outputs_and_reports_say_what_the_model_was_trained_on(study, tmp_path, capsys, caplog):
    import json

    from ichscan.model import PHANTOM_ONLY, read_checkpoint_meta

    root, ckpt = study
    record = dict(read_checkpoint_meta(ckpt).record, trained_on=PHANTOM_ONLY)
    (tmp_path / "m.json").write_text(json.dumps(record))
    (tmp_path / "m.safetensors").write_bytes((root / "m.safetensors").read_bytes())
    out = tmp_path / "pred"
    printed = _run(["predict", str(root / "data" / "images"), "--checkpoint", str(tmp_path / "m.json"), "--out",
                    str(out), "--min-slices", "3", "--no-progress"], capsys, caplog)
    assert set(pd.read_csv(out / "series.csv")["trained_on"]) == {PHANTOM_ONLY}
    assert json.loads((out / "predictions.json").read_text())["trained_on"] == PHANTOM_ONLY
    printed = _run(["evaluate", "--pred", str(out / "series.csv"), "--labels", str(root / "data" / "series_labels.csv"),
                    "--out", str(tmp_path / "eval"), "--html", "--quiet"], capsys, caplog)
    assert f"model trained on: {PHANTOM_ONLY}" in printed
    assert PHANTOM_ONLY in (tmp_path / "eval" / "report.html").read_text()
