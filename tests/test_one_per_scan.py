"""One reconstruction per scan: of a soft-tissue and a bone-kernel series of the same scan (or thin and thick
slices), selection predicts the least noisy and rejects the others naming it (``SelectionRules.one_per_scan``).
The bone kernel is made from a phantom series as a scanner's sharp kernel looks: edges and grain enhanced."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
from _dicomfactory import reconstruct_series
from pydicom.uid import generate_uid

from ichscan.cli import main
from ichscan.dicom import find_series
from ichscan.geometry import same_scan
from ichscan.predict import SelectionRules, select_series
from ichscan.predict.selection import pixel_noise, series_noise


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    from ichscan.phantom import generate_dataset

    root = tmp_path_factory.mktemp("one_per_scan")
    generate_dataset(root / "data", studies=1, seed=8, size=256, slices=(14, 14), layout="series",
                     prevalence="any=0.0")
    soft_dir = next((root / "data").rglob("*.dcm")).parent
    soft_uid = str(pydicom.dcmread(next(soft_dir.glob("*.dcm"))).SeriesInstanceUID)
    bone_uid = reconstruct_series(soft_dir, root / "bone", unsharp=1.5, grain_hu=20.0)
    return root, soft_dir, soft_uid, bone_uid


def test_pixel_noise_reads_the_standard_deviation_of_white_noise():
    rng = np.random.default_rng(0)
    for sd in (2.0, 5.0, 20.0):
        field = np.rint(40.0 + rng.normal(0, sd, (256, 256)))
        assert pixel_noise(field) == pytest.approx(sd, rel=0.03)
    assert pixel_noise(np.full((64, 64), -1000.0)) is None  # air: no brain-density tissue to measure


def test_the_least_noisy_reconstruction_is_predicted_and_the_other_names_it(scan, tmp_path):
    root, soft_dir, soft_uid, bone_uid = scan
    folder = tmp_path / "study"
    shutil.copytree(soft_dir, folder / "soft")
    shutil.copytree(root / "bone", folder / "bone")
    series = find_series(folder).series
    by_uid = {s.series_uid: s for s in series}
    soft, bone = by_uid[soft_uid], by_uid[bone_uid]
    assert same_scan(soft, bone) and same_scan(bone, soft)
    assert series_noise(soft) < 8.0 < 15.0 < series_noise(bone)  # phantoms' 2-7.5 HU; 20 HU of grain added
    for order in ([soft, bone], [bone, soft]):  # whichever comes first
        selected, rejected = select_series(order, SelectionRules(min_slices=3))
        assert [s.series_uid for s in selected] == [soft_uid]
        assert [(r.series_uid, r.rule) for r in rejected] == [(bone_uid, "one_per_scan")]
        detail = rejected[0].detail
        assert f"series {soft_uid} (14 slices, pixel noise {series_noise(soft):.1f} HU)" in detail
        assert f"this one has pixel noise {series_noise(bone):.1f} HU" in detail
    for rules in (SelectionRules(min_slices=3, one_per_scan=False), SelectionRules.permissive()):
        assert len(select_series([soft, bone], rules)[0]) == 2


def test_other_scans_are_not_reconstructions_of_this_one(scan, tmp_path):
    root, soft_dir, soft_uid, _ = scan
    soft = find_series(soft_dir).series[0]
    # another frame of reference (another scan of the same study), or the same one further up the body
    reconstruct_series(soft_dir, tmp_path / "f", unsharp=1.5, grain_hu=20.0, frame_uid=generate_uid())
    reconstruct_series(soft_dir, tmp_path / "z", unsharp=1.5, grain_hu=20.0, shift_mm=200.0)
    other_frame, moved = find_series(tmp_path / "f").series[0], find_series(tmp_path / "z").series[0]
    assert not same_scan(soft, other_frame) and not same_scan(soft, moved)
    selected, rejected = select_series([soft, other_frame, moved], SelectionRules(min_slices=3))
    assert len(selected) == 3 and not rejected


def test_predict_says_which_reconstruction_it_read(scan, tmp_path, capsys):
    root, soft_dir, soft_uid, bone_uid = scan
    folder = tmp_path / "study"
    shutil.copytree(soft_dir, folder / "soft")
    shutil.copytree(root / "bone", folder / "bone")
    base = ["predict", str(folder), "--checkpoint", "bundled", "--no-progress", "--precision", "fp32"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    err = capsys.readouterr().err
    assert f"not predicted: series {bone_uid} (14 slices): another reconstruction of the same scan is " \
           f"predicted: series {soft_uid}" in err and "[one_per_scan]" in err
    assert "1 series predicted (0 resumed), 1 rejected" in err
    assert main([*base, "--out", str(tmp_path / "both"), "--every-reconstruction"]) == 0
    assert "2 series predicted (0 resumed), 0 rejected" in capsys.readouterr().err


def test_inspect_names_the_reconstructions_of_one_scan_from_headers_alone(scan, tmp_path, capsys):
    root, soft_dir, soft_uid, bone_uid = scan
    folder = tmp_path / "study"
    shutil.copytree(soft_dir, folder / "soft")
    shutil.copytree(root / "bone", folder / "bone")
    assert main(["inspect", str(folder), "--json"]) == 0
    info = {s["series_uid"]: s for s in json.loads(capsys.readouterr().out)["series"]}
    first, second = (soft_uid, bone_uid) if list(info).index(soft_uid) == 0 else (bone_uid, soft_uid)
    assert info[first]["same_scan_as"] is None and info[second]["same_scan_as"] == first
    assert info[bone_uid]["kernel"] == "H70s"
    assert main(["inspect", str(folder)]) == 0
    assert "note: series #2 is another reconstruction of the scan in series #1" in capsys.readouterr().out
