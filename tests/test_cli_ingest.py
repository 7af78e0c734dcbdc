"""`ichscan inspect` and `ichscan render`, run in-process through the CLI entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from _dicomfactory import write_ct, write_series
from ichscan.cli import main

A = "1.2.826.0.1.3680043.8.498.100"


@pytest.fixture
def study(tmp_path):
    folder = tmp_path / "study"
    write_series(folder, 5, series_uid=A, z0=0.0, step=5.0)
    (folder / "README.txt").write_text("export notes")
    return folder


def test_inspect_table(study, capsys):
    assert main(["inspect", str(study)]) == 0
    out = capsys.readouterr().out
    assert "1 series in" in out and A in out
    assert "position" in out and "5.00" in out  # ordering and slice gap
    assert "1 skipped:" in out and "README.txt: not a DICOM file" in out


def test_inspect_json(study, capsys):
    assert main(["inspect", str(study), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["usable"] is True
    (series,) = info["series"]
    assert series["series_uid"] == A and series["n_slices"] == 5
    assert series["pixel_spacing"] == [0.5, 0.5] and series["slice_spacing"] == 5.0 and series["thickness"] == 5.0
    assert series["ordered_by"] == "position" and series["tilt_degrees"] == 0.0 and series["fixes"] == []
    assert info["skipped"][0]["kind"] == "NotDicomError"


def test_inspect_exit_1_without_usable_series(tmp_path, testdata, capsys):
    write_ct(tmp_path / "mr.dcm", modality="MR")
    assert main(["inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "no usable CT series" in out and "--any-modality" in out
    assert main(["inspect", str(tmp_path), "--any-modality"]) == 0
    assert main(["inspect", testdata("test-SR.dcm")]) == 1


def test_inspect_missing_path(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_render_slice(testdata, tmp_path, capsys):
    out = tmp_path / "slice.png"
    assert main(["render", testdata("693_UNCR.dcm"), "--out", str(out)]) == 0
    assert "1 slice" in capsys.readouterr().out
    img = np.asarray(Image.open(out).convert("L"))
    assert img.shape[1] > 3 * 512  # three 512 panels side by side
    assert img.shape[0] > 512


def test_render_series_contact_sheet(study, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    assert main(["render", str(study), "--out", str(out), "--max-slices", "4", "--windows", "brain,bone"]) == 0
    assert "4 of 5 slices" in capsys.readouterr().out
    assert Image.open(out).size[0] > Image.open(out).size[1]  # two panels side by side
    assert main(["render", str(study), "--out", str(out), "--windows", "lung"]) == 2
