"""ichscan.predict through the real modules: DICOM written by pydicom or the phantom generator, tiny
timm checkpoints saved with ichscan.model.save_checkpoint (untrained: these tests check plumbing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _dicomfactory import write_series
from ichscan.dicom import find_series
from ichscan.errors import CheckpointError, DataError, IchscanError
from ichscan.labels import LABELS, RSNA_CSV_ORDER
from ichscan.model import build_model, load_checkpoint, save_checkpoint, write_ensemble
from ichscan.predict import (
    Predictor,
    SelectionRules,
    SeriesPrediction,
    aggregate,
    load_predictions,
    predict_path,
    resolve_tta,
    select_series,
)
from ichscan.thresholds import load_thresholds
from ichscan.windows import PAPER_WINDOWS, PRESETS, window_image

SIZE = 32
RULES = SelectionRules(min_slices=3)
FP32_TOL = 1e-5  # ours in fp32 (channels_last, inference_mode) against plain eager
BF16_TOL = 0.02  # bf16 autocast against fp32, probabilities (docs/predict.md)


def tiny_checkpoint(path: Path, seed: int = 0, labels=LABELS, size: int = SIZE) -> Path:
    torch.manual_seed(seed)
    model = build_model("test_efficientnet", labels=labels)
    # Spread the head so probabilities differ between slices (an untrained head sits near 0.5).
    with torch.no_grad():
        for p in model.backbone.get_classifier().parameters():
            p.mul_(20.0)
    meta = {"windows": [PRESETS[w].to_dict() for w in PAPER_WINDOWS], "image_size": size}
    return save_checkpoint(path, model, meta)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """A tiny RSNA-layout phantom set: flat images/ID_*.dcm from several series."""
    from ichscan.phantom import generate_dataset

    out = tmp_path_factory.mktemp("phantoms")
    generate_dataset(out, studies=4, seed=3, size=64, slices=(5, 7))
    return out / "images"


def hu_images(series) -> list[np.ndarray]:
    from ichscan.dicom import read_slice

    return [read_slice(s.path).hu for s in series.slices]


# ---------------------------------------------------------------------------------------- aggregation


def test_aggregate_methods_and_key_slices():
    p = np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.3]])
    probs, key = aggregate(p, "max")
    assert probs.tolist() == [0.8, 0.9] and key.tolist() == [1, 0]
    probs, key = aggregate(p, "topk", top_k=2)
    assert probs == pytest.approx([0.65, 0.6]) and key.tolist() == [1, 0]
    probs, _ = aggregate(p, "topk", top_k=10)  # k larger than the series: mean of all
    assert probs == pytest.approx(p.mean(axis=0))
    probs, _ = aggregate(p, "noisy_or")
    assert probs == pytest.approx(1 - np.prod(1 - p, axis=0))
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(p, "median")


# ---------------------------------------------------------------------------------------------- TTA


def test_tta_names_groups_and_views_are_deterministic():
    assert resolve_tta(None) == ("identity", "hflip")
    assert resolve_tta("flip,shift") == ("identity", "hflip", "shift_left", "shift_right", "shift_up", "shift_down")
    assert resolve_tta("none") == ("identity",)
    with pytest.raises(ValueError, match="unknown TTA"):
        resolve_tta("rotate")
    from ichscan.predict.predictor import TTA_VIEWS, _apply_view

    x = torch.rand(2, 3, 20, 20)
    for view in TTA_VIEWS:
        y = _apply_view(x, view)
        assert y.shape == x.shape and torch.equal(y, _apply_view(x, view))
    assert torch.equal(_apply_view(_apply_view(x, "hflip"), "hflip"), x)
    assert torch.equal(_apply_view(x, "shift_left")[..., :-1], x[..., 1:])


# ---------------------------------------------------------------------------------------- selection


def test_selection_rules_reject_with_the_rule_that_failed(tmp_path):
    write_series(tmp_path / "axial", n=4, series_uid="1.2.3.1", spacing=(3.5, 3.5))  # head-sized: passes the head check
    write_series(tmp_path / "short", n=2, series_uid="1.2.3.2")
    write_series(tmp_path / "sag", n=4, series_uid="1.2.3.3", orientation=(0, 1, 0, 0, 0, -1))
    write_series(tmp_path / "mr", n=4, series_uid="1.2.3.4", modality="MR")
    scan = find_series(tmp_path, allow_non_ct=True)
    selected, rejected = select_series(scan.series, RULES)
    assert [s.series_uid for s in selected] == ["1.2.3.1"]
    rules = {r.series_uid: r.rule for r in rejected}
    assert rules == {"1.2.3.2": "min_slices", "1.2.3.3": "max_obliquity", "1.2.3.4": "modalities"}
    selected, rejected = select_series(scan.series, SelectionRules.permissive())
    assert len(selected) == 4 and not rejected


# ---------------------------------------------------------------------------------------- predictor


def test_predictor_matches_plain_fp32_eager_and_bf16_within_tolerance(tmp_path, ckpt):
    write_series(tmp_path, n=4)
    series = find_series(tmp_path).series[0]
    model, meta = load_checkpoint(ckpt)
    x = np.stack([window_image(hu, meta.windows, meta.image_size, np.uint8) for hu in hu_images(series)])
    with torch.no_grad():
        plain = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    ours = Predictor.from_checkpoint(ckpt, tta="none", precision="fp32")
    got = ours.predict_series(series)
    assert got.labels == LABELS and got.slice_probs.shape == (4, 6)
    np.testing.assert_allclose(got.slice_probs, plain, atol=FP32_TOL)
    assert np.ptp(plain) > 0.05  # the check means something: probabilities are spread
    bf16 = Predictor.from_checkpoint(ckpt, tta="none", precision="bf16").predict_series(series)
    assert np.abs(bf16.slice_probs - got.slice_probs).max() <= BF16_TOL
    # key slices point at the slice with the highest probability, named by its UIDs
    for j, name in enumerate(LABELS):
        k = got.key_slice(name)
        assert k.index == int(np.argmax(got.slice_probs[:, j]))
        assert k.sop_uid == series.slices[k.index].sop_uid and got.prob(name) == pytest.approx(k.prob)
        assert k.z == pytest.approx(series.slices[k.index].position[2])


def test_calls_are_hierarchical_a_subtype_only_where_any_is_called():
    from ichscan.predict.outputs import SeriesPrediction

    def series(probs):
        return SeriesPrediction("1.2.3", None, None, LABELS, np.array([probs], dtype=np.float32),
                                np.array(probs, dtype=np.float64), (), ("1.2.3.1",), ("ID_a",), (0.0,))

    t = {"any": 0.6, "epidural": 0.1, "intraparenchymal": 0.2, "intraventricular": 0.5, "subarachnoid": 0.3,
         "subdural": 0.4}
    quiet = series([0.59, 0.41, 0.05, 0.5, 0.1, 0.39])  # any just below its point; epidural, IVH above theirs
    assert quiet.above(t) == {"any": False, "epidural": True, "intraparenchymal": False, "intraventricular": True,
                              "subarachnoid": False, "subdural": False}
    assert not any(quiet.decisions(t).values())
    assert quiet.withheld(t) == ["epidural", "intraventricular"]
    called = series([0.6, 0.41, 0.05, 0.5, 0.1, 0.39])  # any at its point: the subtypes above theirs are called
    assert called.decisions(t) == {"any": True, "epidural": True, "intraparenchymal": False,
                                   "intraventricular": True, "subarachnoid": False, "subdural": False}
    assert called.withheld(t) == []
    # `any` alone may be called: a bleed of no subtype above its point
    assert series([0.9, 0.0, 0.0, 0.0, 0.0, 0.0]).decisions(t)["any"] is True


def test_fp32_prediction_runs_in_ieee_fp32_and_restores_the_settings(tmp_path, ckpt):
    # PyTorch lets cuDNN convolutions use TF32 by default: fp32 prediction turns that off for its forward passes
    # only (a GPU then gives a CPU's fp32 numbers); bf16 runs under autocast and leaves the settings alone.
    from ichscan.hardware import ieee_fp32

    conv = torch.backends.cudnn.conv
    before = (conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    with ieee_fp32():
        assert conv.fp32_precision == torch.backends.cudnn.rnn.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    with pytest.raises(RuntimeError), ieee_fp32():
        raise RuntimeError("a failed forward pass")
    assert (conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision,
            torch.backends.cuda.matmul.fp32_precision) == before

    write_series(tmp_path, n=2)
    series = find_series(tmp_path).series[0]
    for precision, expected in (("fp32", "ieee"), ("bf16", before[0])):
        predictor = Predictor.from_checkpoint(ckpt, tta="none", precision=precision)
        seen = []
        hook = predictor.ensemble.members[0].model.register_forward_pre_hook(
            lambda *_: seen.append((conv.fp32_precision, torch.get_autocast_dtype("cpu")
                                    if torch.is_autocast_enabled("cpu") else None)))
        predictor.predict_series(series)
        hook.remove()
        assert seen and {s[0] for s in seen} == {expected}, precision
        assert {s[1] for s in seen} == ({None} if precision == "fp32" else {torch.bfloat16})
        assert conv.fp32_precision == before[0]


def test_compiled_predictor_equals_eager_for_series_of_any_length(tmp_path, ckpt):
    # torch.compile (Inductor, weights frozen) with a dynamic batch: series of 5 and 3 slices in batches
    # of 4 images leave last batches of several sizes; one compile serves them all, same probabilities.
    write_series(tmp_path / "a", n=5)
    write_series(tmp_path / "b", n=3, series_uid="1.2.826.0.1.3680043.8.498.77")
    eager = Predictor.from_checkpoint(ckpt, precision="fp32", batch_size=4)
    compiled = Predictor.from_checkpoint(ckpt, precision="fp32", batch_size=4, compile=True)
    assert compiled.describe()["compile"] is True and eager.describe()["compile"] is False
    for folder in ("a", "b"):
        series = find_series(tmp_path / folder).series[0]
        np.testing.assert_allclose(compiled.predict_series(series).slice_probs,
                                   eager.predict_series(series).slice_probs, atol=FP32_TOL)
    assert compiled._runners[0] is not compiled.ensemble.members[0].model  # it did run compiled


def test_compile_falls_back_to_eager_when_inductor_cannot_build(tmp_path, ckpt):
    # no working C++ compiler (and no cached kernels): a warning, then the eager model's numbers
    import subprocess
    import sys

    write_series(tmp_path, n=3)
    script = f"""
import logging, numpy as np
from ichscan.dicom import find_series
from ichscan.predict import Predictor
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
s = find_series({str(tmp_path)!r}).series[0]
c = Predictor.from_checkpoint({str(ckpt)!r}, precision="fp32", compile=True)
e = Predictor.from_checkpoint({str(ckpt)!r}, precision="fp32")
d = np.abs(c.predict_series(s).slice_probs - e.predict_series(s).slice_probs).max()
print("fell back", c._runners[0] is c.ensemble.members[0].model, "diff", d)
"""
    env = dict(__import__("os").environ, CXX="/bin/false", TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fell back True diff 0.0" in out.stdout
    assert "torch.compile failed for" in out.stderr and "running it eagerly" in out.stderr


def test_tta_averages_views_and_label_order_comes_from_the_checkpoint(tmp_path, ckpt):
    write_series(tmp_path, n=3)
    series = find_series(tmp_path).series[0]
    both = Predictor.from_checkpoint(ckpt, tta="identity,hflip", precision="fp32").predict_series(series)
    one = Predictor.from_checkpoint(ckpt, tta="identity", precision="fp32").predict_series(series)
    flip = Predictor.from_checkpoint(ckpt, tta="hflip", precision="fp32").predict_series(series)
    np.testing.assert_allclose(both.slice_probs, (one.slice_probs + flip.slice_probs) / 2, atol=1e-6)
    # A checkpoint trained with the labels in another order: columns still come out in LABELS order.
    reordered = tiny_checkpoint(tmp_path / "rev", labels=tuple(reversed(LABELS)))
    model, _ = load_checkpoint(reordered)
    got = Predictor.from_checkpoint(reordered, tta="none", precision="fp32").predict_series(series)
    x = Predictor.from_checkpoint(reordered, tta="none").preprocess(hu_images(series))
    with torch.no_grad():
        raw = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(got.slice_probs, raw[:, ::-1], atol=FP32_TOL)


def test_ensemble_is_the_weighted_mean_of_its_members(tmp_path, ckpt):
    write_series(tmp_path / "s", n=3)
    series = find_series(tmp_path / "s").series[0]
    other = tiny_checkpoint(tmp_path / "other", seed=1)
    manifest = write_ensemble(tmp_path / "ensemble.json", [ckpt, other], weights=[3.0, 1.0])
    kw = {"tta": "none", "precision": "fp32"}
    ens = Predictor.from_checkpoint(manifest, **kw).predict_series(series)
    a = Predictor.from_checkpoint(ckpt, **kw).predict_series(series)
    b = Predictor.from_checkpoint(other, **kw).predict_series(series)
    np.testing.assert_allclose(ens.slice_probs, 0.75 * a.slice_probs + 0.25 * b.slice_probs, atol=1e-6)
    # models already in memory (as right after training) give the same as their checkpoints
    models = [load_checkpoint(c)[0] for c in (ckpt, other)]
    mem = Predictor.from_models(models, image_size=SIZE, weights=[3.0, 1.0], **kw).predict_series(series)
    np.testing.assert_allclose(mem.slice_probs, ens.slice_probs, atol=1e-6)
    with pytest.raises(CheckpointError):
        Predictor.from_checkpoint(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------- batch runs


def read_outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes()
            for name in ("slices.csv", "series.csv", "submission.csv", "predictions.json", "skipped.csv")}


def test_batch_outputs_follow_the_contract(tmp_path, ckpt, phantoms):
    import pandas as pd

    predictor = Predictor.from_checkpoint(ckpt)
    run = predict_path(phantoms, tmp_path / "out", predictor, rules=RULES)
    assert run.complete and run.n_predicted == 4 and not run.skipped and not run.failed
    slices = pd.read_csv(run.outputs["slices"])
    assert list(slices.columns[:9]) == ["patient_id", "study_uid", "series_uid", "sop_uid", "image_id",
                                        "slice_index", "slab", "z", "path"]
    assert list(slices.columns[9:]) == [f"prob_{n}" for n in LABELS]
    assert (slices["slab"] == slices["slice_index"]).all()  # 5 mm phantoms: each slice read alone
    assert all(Path(f).is_file() and Path(f).stem == i for f, i in zip(slices.path, slices.image_id))
    series = pd.read_csv(run.outputs["series"])
    assert list(series.columns) == (["patient_id", "study_uid", "series_uid", "n_slices"]
                                    + [f"{k}_{n}" for k in ("prob", "pred", "borderline", "key_slice") for n in LABELS]
                                    + ["trained_on"])
    assert set(series.trained_on) == {"not recorded"}  # the test checkpoint does not say
    # nor does it carry intervals for its thresholds (0.5 by default): no call is marked either way
    assert series[[f"borderline_{n}" for n in LABELS]].isna().all().all()
    assert len(series) == 4 and series.n_slices.sum() == len(slices)
    for _, row in series.iterrows():  # max over slices, key slice = argmax
        own = slices[slices.series_uid == row.series_uid]
        for name in LABELS:
            assert row[f"prob_{name}"] == pytest.approx(own[f"prob_{name}"].max(), abs=1e-7)
            assert row[f"key_slice_{name}"] == own.loc[own[f"prob_{name}"].idxmax(), "image_id"]
            # hierarchical calls: a subtype only where `any` is called (docs/predict.md#hierarchy)
            assert row[f"pred_{name}"] == int(row[f"prob_{name}"] >= 0.5 and row["prob_any"] >= 0.5)
    sub = pd.read_csv(run.outputs["submission"])
    assert list(sub.columns) == ["ID", "Label"] and len(sub) == 6 * len(slices)
    first = slices.iloc[0]
    assert first.image_id.startswith("ID_")
    expected = {f"{first.image_id}_{n}": first[f"prob_{n}"] for n in RSNA_CSV_ORDER}
    got = sub[sub.ID.str.startswith(first.image_id + "_")]
    assert dict(zip(got.ID, got.Label)) == pytest.approx(expected)
    reloaded = load_predictions(tmp_path / "out")
    assert [p.series_uid for p in reloaded] == list(series.series_uid)
    np.testing.assert_array_equal(reloaded[0].slice_probs, run.predictions[0].slice_probs)

    # the same files in a zip give the same predictions, image ids included
    import zipfile

    with zipfile.ZipFile(tmp_path / "study.zip", "w") as zf:
        for f in sorted(phantoms.glob("*.dcm")):
            zf.write(f, f"export/{f.name}")
    zipped = predict_path(tmp_path / "study.zip", None, predictor, rules=RULES)
    assert [p.image_ids for p in zipped.predictions] == [p.image_ids for p in run.predictions]
    for a, b in zip(zipped.predictions, run.predictions):
        np.testing.assert_array_equal(a.slice_probs, b.slice_probs)


def test_resumed_batch_equals_an_uninterrupted_one(tmp_path, ckpt, phantoms):
    predictor = Predictor.from_checkpoint(ckpt)
    full = predict_path(phantoms, tmp_path / "full", predictor, rules=RULES)
    assert full.complete and full.n_predicted == 4

    # stopped by --max-series after 1 series, then by an exception from the progress callback
    first = predict_path(phantoms, tmp_path / "resumed", predictor, rules=RULES, max_series=1)
    assert not first.complete and first.n_predicted == 1 and not first.outputs
    assert not (tmp_path / "resumed" / "series.csv").exists()
    events = []

    def interrupt(event):
        events.append(event)
        if event.status == "predicted":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_path(phantoms, tmp_path / "resumed", predictor, rules=RULES, progress=interrupt)
    assert [e.status for e in events] == ["resumed", "predicted"]
    last = predict_path(phantoms, tmp_path / "resumed", predictor, rules=RULES)
    assert last.complete and last.n_resumed == 2 and last.n_predicted == 2
    assert read_outputs(tmp_path / "resumed") == read_outputs(tmp_path / "full")

    # another configuration must not mix with these results
    other = Predictor.from_checkpoint(ckpt, tta="none")
    with pytest.raises(IchscanError, match="another configuration"):
        predict_path(phantoms, tmp_path / "resumed", other, rules=RULES)
    again = predict_path(phantoms, tmp_path / "resumed", other, rules=RULES, restart=True)
    assert again.complete and again.n_predicted == 4


def test_bad_files_are_reported_and_the_rest_predicted(tmp_path, ckpt, phantoms):
    import shutil

    import pandas as pd

    folder = tmp_path / "in"
    shutil.copytree(phantoms, folder)
    (folder / "notes.txt").write_text("not an image")
    victim = sorted(folder.glob("ID_*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:-500])  # truncated pixel data
    predictor = Predictor.from_checkpoint(ckpt)
    run = predict_path(folder, tmp_path / "out", predictor, rules=RULES)
    assert run.complete and run.n_predicted == 4
    reported = {Path(s.path).name for s in run.skipped + run.failed}
    assert {"notes.txt", victim.name} <= reported
    skipped = pd.read_csv(run.outputs["skipped"])
    assert {"notes.txt", victim.name} <= {Path(p).name for p in skipped.path.dropna()}
    slices = pd.read_csv(run.outputs["slices"])
    assert victim.stem not in set(slices.image_id) and len(slices) == len(list(phantoms.glob("*.dcm"))) - 1


def test_thresholds_file_sets_decisions(tmp_path):
    path = tmp_path / "thr.json"
    path.write_text(json.dumps({"method": "youden", "thresholds": {"any": 0.2, "subdural": 0.9}}))
    thresholds = load_thresholds(path)
    assert thresholds["any"] == 0.2 and thresholds["epidural"] == 0.5
    p = SeriesPrediction("1", "2", "3", LABELS, np.full((1, 6), 0.3, np.float32), np.full(6, 0.3), (), ("a",),
                         ("a",), (None,))
    assert p.decisions(thresholds) == {n: n == "any" for n in LABELS}
    path.write_text(json.dumps({"thresholds": {"bleed": 0.3}}))
    with pytest.raises(DataError, match="bleed"):
        load_thresholds(path)
