"""Thin series read as slabs: which slices make a slab, the slab's pixels (the mean HU of real DICOM files the
test writes), and how its probabilities reach every slice and the outputs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _dicomfactory import head_phantom, write_ct
from ichscan.aggregation import aggregate
from ichscan.dicom import find_series
from ichscan.model import build_model, save_checkpoint
from ichscan.predict import Predictor, SelectionRules, SeriesPrediction, load_predictions, predict_path
from ichscan.predict.predictor import slab_groups
from ichscan.windows import PAPER_WINDOWS, PRESETS, window_image

SIZE = 32
RULES = SelectionRules(min_slices=3, head_check=False)  # a 32 mm test head is no head to the check


def fake_slices(z):
    return [SimpleNamespace(position=(0.0, 0.0, v) if v is not None else None, normal=(0.0, 0.0, 1.0)) for v in z]


def test_slab_groups_share_thin_runs_evenly_and_leave_thick_series_alone():
    # 20 slices 1.25 mm apart: 4 to a 5 mm slab
    assert slab_groups(fake_slices(np.arange(20) * 1.25), 5.0) == [list(range(i, i + 4)) for i in range(0, 20, 4)]
    # 11 slices 1 mm apart: k = 5, two slabs of 6 and 5, never a leftover slab of one slice
    assert slab_groups(fake_slices(np.arange(11) * 1.0), 5.0) == [list(range(6)), list(range(6, 11))]
    # a 10 mm gap: no slab reaches across it
    z = list(np.arange(8) * 1.0) + list(17.0 + np.arange(8) * 1.0)
    assert slab_groups(fake_slices(z), 5.0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    # 5 mm, 2.5 mm (the bundled model's thinnest training slices) and uneven 4/7 mm series are read as they are
    assert slab_groups(fake_slices(np.arange(30) * 5.0), 5.0) is None
    assert slab_groups(fake_slices(np.arange(30) * 2.5), 5.0) is None
    assert slab_groups(fake_slices([0, 4, 8, 12, 19, 26, 33]), 5.0) is None
    # no positions, or slabs switched off
    assert slab_groups(fake_slices([0.0, None, 2.0]), 5.0) is None
    assert slab_groups(fake_slices(np.arange(20) * 1.25), None) is None
    assert slab_groups(fake_slices(np.arange(20) * 1.25), 0) is None


def brain_at(value: float) -> np.ndarray:
    hu = head_phantom()
    hu[hu == 30.0] = value
    return hu


def write_thin_series(folder: Path, n: int = 10, step: float = 1.0) -> list[Path]:
    """``n`` slices ``step`` mm apart, the brain of slice i at 20 + 4 i HU (files not in z order)."""
    return [write_ct(folder / f"img_{(i * 7919) % 1000:03d}.dcm", brain_at(20.0 + 4 * i),
                     position=(-16.0, -16.0, i * step), instance=i + 1, thickness=step,
                     series_uid="1.2.826.0.1.3680043.8.498.77") for i in range(n)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("test_efficientnet")
    with torch.no_grad():  # spread the head so that slabs get different probabilities
        for p in model.backbone.get_classifier().parameters():
            p.mul_(20.0)
    meta = {"windows": [PRESETS[w].to_dict() for w in PAPER_WINDOWS], "image_size": SIZE}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, meta)


def test_a_slab_is_the_mean_hu_of_its_slices(tmp_path, ckpt):
    write_thin_series(tmp_path / "thin")
    series = find_series(tmp_path / "thin", pixels=False).series[0]
    pred = Predictor.from_checkpoint(ckpt, tta="none", precision="fp32", slab_mm=5.0)
    kept, arrays, bad, slab_of = pred.decode_series(series)
    assert len(kept) == 10 and not bad and slab_of == (0, 0, 0, 0, 0, 1, 1, 1, 1, 1)
    images = arrays[pred._preps[0]]
    # slices 0-4 hold brain at 20, 24, ..., 36 HU: their slab's brain reads 28 HU; slices 5-9, 48 HU
    for j, brain in enumerate((28.0, 48.0)):
        assert np.array_equal(images[j], window_image(brain_at(brain), PAPER_WINDOWS, SIZE, np.uint8))
    # every slice holds its slab's probabilities; the series is aggregated over the two slabs, not ten rows
    p = pred.predict_series(series)
    assert p.n_slices == 10 and p.slabs == slab_of and p.slab_mm == 5.0
    assert np.array_equal(p.read_probs, pred.predict_arrays(images))
    assert np.array_equal(p.slice_probs, p.read_probs[list(slab_of)])
    probs, key = aggregate(p.read_probs, pred.aggregation, pred.top_k)
    assert np.allclose(p.probs, probs)
    for j, k in enumerate(p.key_slices):  # a key slab's middle slice (slices 2 and 7) stands for it
        assert k.index == (2, 7)[key[j]] and k.sop_uid == p.sop_uids[k.index] and k.z == pytest.approx(k.index * 1.0)
    back = SeriesPrediction.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back.slabs == p.slabs and back.slab_mm == 5.0 and np.array_equal(back.read_probs, p.read_probs)
    # read slice by slice instead, the same files give ten images
    plain = Predictor.from_checkpoint(ckpt, tta="none", precision="fp32")  # the default: slice by slice
    _, arrays, _, slab_of = plain.decode_series(series)
    assert "slab_mm" not in plain.describe() and slab_of is None and len(arrays[pred._preps[0]]) == 10


def test_a_slice_that_will_not_decode_leaves_its_slab_to_the_others(tmp_path, ckpt):
    paths = write_thin_series(tmp_path / "thin")
    series = find_series(tmp_path / "thin", pixels=False).series[0]
    broken = paths[1]  # slice 1 (brain 24 HU): its pixel data cut short after the scan found it
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) - 3000])
    pred = Predictor.from_checkpoint(ckpt, tta="none", precision="fp32", slab_mm=5.0)
    kept, arrays, bad, slab_of = pred.decode_series(series)
    assert len(bad) == 1 and bad[0].path == str(broken) and len(kept) == 9
    assert slab_of == (0, 0, 0, 0, 1, 1, 1, 1, 1)
    # slab 0 is slices 0, 2, 3, 4: brain (20 + 28 + 32 + 36) / 4 = 29 HU
    assert np.array_equal(arrays[pred._preps[0]][0], window_image(brain_at(29.0), PAPER_WINDOWS, SIZE, np.uint8))


def test_a_thin_nifti_volume_is_read_as_slabs_of_its_frames(tmp_path, ckpt, monkeypatch):
    """A NIfTI volume's slices are frames of one file: 10 slices 1 mm apart, slice i a head of brain 20 + 4 i HU,
    give two 5 mm slabs of brain 28 and 48 HU, the file decoded once."""
    from test_nifti import write_nifti

    import ichscan.dicom as dicom

    volume = np.stack([brain_at(20.0 + 4 * i) for i in range(10)], axis=-1).astype(np.float32)  # (x, y, z)
    path = write_nifti(tmp_path / "thin.nii.gz", volume, np.diag([0.5, 0.5, 1.0, 1.0]))
    series = find_series(path).series[0]
    pred = Predictor.from_checkpoint(ckpt, tta="none", precision="fp32", slab_mm=5.0)
    real, calls = dicom.read_slices, []
    monkeypatch.setattr(dicom, "read_slices", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    kept, arrays, bad, slab_of = pred.decode_series(series)
    monkeypatch.undo()
    assert len(kept) == 10 and not bad and slab_of == (0,) * 5 + (1,) * 5 and len(calls) == 1
    frames = dicom.read_slices(path)  # the slices as the reader turns them
    for j, brain in enumerate((28.0, 48.0)):
        slab = np.mean([f.hu for f in frames[5 * j:5 * j + 5]], axis=0)
        assert np.median(slab[(slab > 10) & (slab < 58)]) == brain
        assert np.array_equal(arrays[pred._preps[0]][j], window_image(slab, PAPER_WINDOWS, SIZE, np.uint8))


def test_predict_path_writes_every_slice_with_its_slab_and_resumes(tmp_path, ckpt):
    write_thin_series(tmp_path / "thin")
    pred = Predictor.from_checkpoint(ckpt, tta="none", precision="fp32", slab_mm=5.0)
    run = predict_path(tmp_path / "thin", tmp_path / "out", pred, rules=RULES)
    import pandas as pd

    slices = pd.read_csv(run.outputs["slices"])
    assert len(slices) == 10 and slices["slab"].tolist() == [0] * 5 + [1] * 5
    assert slices.groupby("slab")["prob_any"].nunique().tolist() == [1, 1]
    series = pd.read_csv(run.outputs["series"])
    assert series["n_slices"].tolist() == [10]
    assert series["prob_any"].iloc[0] == pytest.approx(run.predictions[0].probs[0])
    doc = json.loads(run.outputs["json"].read_text())
    assert doc["config"]["slab_mm"] == 5.0 and doc["series"][0]["slab_mm"] == 5.0
    again = predict_path(tmp_path / "thin", tmp_path / "out", pred, rules=RULES)
    assert again.n_resumed == 1 and again.n_predicted == 0
    from ichscan.errors import IchscanError

    plain = Predictor.from_checkpoint(ckpt, tta="none", precision="fp32")  # slice by slice: other results
    with pytest.raises(IchscanError, match="--slab"):
        predict_path(tmp_path / "thin", tmp_path / "out", plain, rules=RULES)
    assert np.array_equal(load_predictions(tmp_path / "out")[0].read_probs, run.predictions[0].read_probs)


def test_thick_series_are_read_slice_by_slice_as_before(tmp_path, ckpt):
    from _dicomfactory import write_series

    write_series(tmp_path / "thick", n=6, step=5.0)
    series = find_series(tmp_path / "thick", pixels=False).series[0]
    slab = Predictor.from_checkpoint(ckpt, tta="none", precision="fp32", slab_mm=5.0)
    plain = Predictor.from_checkpoint(ckpt, tta="none", precision="fp32")
    a, b = slab.predict_series(series), plain.predict_series(series)
    assert a.slabs == () and "slab_mm" not in a.to_dict() and np.array_equal(a.slice_probs, b.slice_probs)
    assert np.array_equal(a.read_probs, a.slice_probs) and [a.slab_index(i) for i in range(6)] == list(range(6))


def test_cli_predict_slab_reads_a_thin_series_as_slabs(tmp_path, ckpt, capsys):
    from ichscan.cli import main

    write_thin_series(tmp_path / "thin", n=12, step=1.25)  # 4 slices to a 5 mm slab
    base = [str(tmp_path / "thin"), "--checkpoint", str(ckpt), "--min-slices", "3", "--all-series", "--no-progress",
            "--precision", "fp32", "--tta", "none"]
    assert main(["predict", *base, "--out", str(tmp_path / "slab"), "--slab", "5"]) == 0
    assert "thin series read as 5 mm slabs" in capsys.readouterr().err
    assert main(["predict", *base, "--out", str(tmp_path / "plain")]) == 0
    import pandas as pd

    slab, plain = pd.read_csv(tmp_path / "slab" / "slices.csv"), pd.read_csv(tmp_path / "plain" / "slices.csv")
    assert slab["slab"].tolist() == [0] * 4 + [1] * 4 + [2] * 4 and plain["slab"].tolist() == list(range(12))
    assert list(slab.sop_uid) == list(plain.sop_uid)  # every slice has its row either way
    assert slab.groupby("slab")["prob_any"].nunique().eq(1).all() and plain["prob_any"].nunique() > 3
