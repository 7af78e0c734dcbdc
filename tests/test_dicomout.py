"""DICOM results (``ichscan.dicomout`` through ``predict_path(..., dicom_out=)`` and ``ichscan predict
--dicom-out``): phantom studies, the bundled model, pydicom and highdicom reading back what was written, dciodvfy
checking every object."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    SecondaryCaptureImageStorage,
)

from ichscan import __version__
from ichscan.dicom import find_series, iter_hu
from ichscan.dicomout import (
    DISCLAIMER,
    FINDINGS,
    model_sha256,
    result_uid,
    write_dicom_results,
)
from ichscan.errors import IchscanError
from ichscan.heatmap import grad_cam
from ichscan.labels import LABELS
from ichscan.predict import Predictor, SelectionRules, predict_path

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
THRESHOLD = 0.2  # the two phantom series: any called in both, several subtypes in one (checked below)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ichscan.phantom import generate_dataset

    root = tmp_path_factory.mktemp("dicomout")
    generate_dataset(root / "data", studies=2, seed=21, size=96, slices=(12, 12), layout="series",
                     prevalence="any=1.0")
    predictor = Predictor.from_checkpoint("bundled")
    thresholds = {name: THRESHOLD for name in LABELS}
    run = predict_path(root / "data", root / "out", predictor, thresholds=thresholds, dicom_out=root / "dicom")
    assert run.complete and len(run.predictions) == 2 and not run.failed
    doc = json.loads((root / "out" / "predictions.json").read_text())
    series = {s.series_uid: s for s in find_series(root / "data").series}
    return root, predictor, run, doc, series


def _entries(doc):
    """(series entry of predictions.json, {label: called}) per series."""
    return [(entry, entry["decisions"]) for entry in doc["series"]]


def _folder(run, series_uid) -> Path:
    (folder,) = {p.parent for p in run.dicom_files if p.name == "sr.dcm" and pydicom.dcmread(p)
                 .CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID
                 == series_uid}
    return folder


def _source_header(series, sop_uid):
    (s,) = [s for s in series.slices if s.sop_uid == sop_uid]
    return s, pydicom.dcmread(s.path, stop_before_pixels=True)


def _expected_model_hash() -> str:
    """The bundled ensemble's hash computed here from its files: sha256 of '<member sha256> <weight>' lines."""
    from ichscan.model import bundled_checkpoint

    manifest = bundled_checkpoint()
    doc = json.loads(manifest.read_text())
    total = sum(m["weight"] for m in doc["members"])
    lines = ""
    for member in doc["members"]:
        digest = hashlib.sha256((manifest.parent / member["safetensors"]).read_bytes()).hexdigest()
        assert digest == member["sha256"]
        lines += f"{digest} {float(member['weight'] / total)!r}\n"
    return hashlib.sha256(lines.encode()).hexdigest()


def test_the_run_calls_what_the_tests_need(setup):
    _, _, run, doc, _ = setup
    called = [sum(d.values()) for _, d in _entries(doc)]
    assert all(entry["decisions"]["any"] for entry, _ in _entries(doc))
    # several key images in one series (3 until the phantoms' point spread gained its tail, 6 Dec 2026: the
    # bundle now calls `any` and one subtype on each of these two series)
    assert max(called) >= 2, called
    assert len(run.dicom_files) == sum(called) + 2  # one SR per series, one key image per called finding


def test_structured_report_holds_the_predictions(setup):
    import highdicom as hd

    _, predictor, run, doc, series = setup
    model_hash = model_sha256(predictor)
    assert model_hash == _expected_model_hash()
    for entry, decisions in _entries(doc):
        uid = entry["series_uid"]
        path = _folder(run, uid) / "sr.dcm"
        ds = pydicom.dcmread(path)
        source = pydicom.dcmread(series[uid].slices[0].path, stop_before_pixels=True)
        assert ds.SOPClassUID == COMPREHENSIVE_3D_SR != ComprehensiveSRStorage
        assert ds.StudyInstanceUID == source.StudyInstanceUID == entry["study_uid"]
        assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName  # the real patient
        assert ds.PatientID != entry["patient_id"]  # ... not the pseudonym of the CSV outputs
        assert ds.SeriesInstanceUID == result_uid(uid, model_hash, "sr-series") != uid
        assert ds.SOPInstanceUID == result_uid(uid, model_hash, "sr") not in {s.sop_uid for s in series[uid].slices}
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
        assert DISCLAIMER in ds.SeriesDescription
        assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"

        sr = hd.sr.srread(path)
        groups = sr.content.get_image_measurement_groups()
        assert len(groups) == len(LABELS)
        for label, group in zip(LABELS, groups):
            scheme, value, _, _ = FINDINGS[label]
            assert (group.finding_type.value, group.finding_type.scheme_designator) == (value, scheme)
            (probability,) = group.get_measurements()
            assert (probability.name.value, probability.name.scheme_designator) == ("122157", "DCM")
            assert probability.unit.value == "{probability}" and probability.unit.scheme_designator == "UCUM"
            expected = entry["probs"][LABELS.index(label)]
            assert probability.value == expected  # the very float predictions.json holds
            assert probability[0].MeasuredValueSequence[0].FloatingPointValue == expected
            (decision,) = group.get_qualitative_evaluations()
            assert decision.name.value == value
            assert decision.value.value == ("52101004" if decisions[label] else "272519000")  # SCT Present / Absent
            (image,) = group.source_images
            key = entry["key_slices"][LABELS.index(label)]
            assert image.referenced_sop_instance_uid == key["sop_uid"]
            assert image.referenced_sop_class_uid == CTImageStorage
            parameters = [item.TextValue for item in group[0].ContentSequence
                          if item.ConceptNameCodeSequence[0].CodeValue == "111002"]
            names = [item.TextValue for item in group[0].ContentSequence
                     if item.ConceptNameCodeSequence[0].CodeValue in ("111001", "111003")]
            assert names == ["ichscan", __version__]
            assert f"model sha256 {model_hash}" in parameters and f"threshold {THRESHOLD!r}" in parameters
            assert "aggregation topk of 3" in parameters  # the bundle's, as ichscan predict prints it
        texts = [item.TextValue for item in ds.ContentSequence if item.ValueType == "CONTAINER"
                 and item.ConceptNameCodeSequence[0].CodeValue == "C0034375" for item in item.ContentSequence]
        assert texts[0] == DISCLAIMER and any("synthetic phantoms" in t for t in texts)


def test_key_images_show_the_slice_in_the_blood_window_with_the_heat_map(setup):
    _, predictor, run, doc, series = setup
    model_hash = model_sha256(predictor)
    checked_grey = checked_colour = 0
    for entry, decisions in _entries(doc):
        uid = entry["series_uid"]
        folder = _folder(run, uid)
        called = [label for label in LABELS if decisions[label]]
        assert sorted(p.name for p in folder.glob("key_*.dcm")) == sorted(f"key_{label}.dcm" for label in called)
        for label in called:
            ds = pydicom.dcmread(folder / f"key_{label}.dcm")
            key = entry["key_slices"][LABELS.index(label)]
            s, source = _source_header(series[uid], key["sop_uid"])
            assert ds.SOPClassUID == SecondaryCaptureImageStorage
            assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3 and ds.BurnedInAnnotation == "YES"
            assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
            assert ds.AccessionNumber == source.AccessionNumber and ds.StudyDate == source.StudyDate
            assert ds.StudyDescription == source.StudyDescription and ds.PatientAge == source.PatientAge
            assert ds.SeriesInstanceUID == result_uid(uid, model_hash, "key-series") != uid
            assert ds.SOPInstanceUID == result_uid(uid, model_hash, f"key-{label}")
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == key["sop_uid"]
            assert DISCLAIMER in ds.SeriesDescription
            # the source is untouched: read back, its own UIDs
            assert source.SeriesInstanceUID == uid and source.SOPInstanceUID == key["sop_uid"]

            hu = next(iter_hu([s]))[1]
            heat = grad_cam(predictor, hu, label)
            pixels = ds.pixel_array
            k = ds.Columns // source.Columns
            assert k >= 1 and ds.Columns == k * source.Columns and ds.Rows > k * source.Rows  # + the text band
            image = pixels[: k * source.Rows]
            at = image[k // 2::k, k // 2::k]  # one pixel of each k x k block: the source pixel enlarged
            # blood window 80/200: 0 at -20 HU, 255 at 180 HU, rounded half up
            grey = np.floor(np.clip((hu.astype(np.float64) + 20.0) * 255.0 / 200.0, 0, 255) + 0.5)
            zero = heat == 0.0
            assert zero.sum() > 100
            assert (at[..., 0][zero] == at[..., 1][zero]).all() and (at[..., 1][zero] == at[..., 2][zero]).all()
            assert np.abs(at[..., 0][zero].astype(int) - grey[zero]).max() <= 1  # float32 at half-way ties
            exact = np.abs(((hu + 20.0) * 255.0 / 200.0) % 1 - 0.5) > 1e-3  # away from ties: exact equality
            assert np.array_equal(at[..., 0][zero & exact], grey[zero & exact].astype(np.uint8))
            checked_grey += int(zero.sum())
            r, c = np.unravel_index(np.argmax(heat), heat.shape)
            assert len(set(at[r, c].tolist())) > 1  # the peak of the heat map is in colour
            checked_colour += 1
    assert checked_grey > 1000 and checked_colour >= 3


def test_every_object_passes_dciodvfy(setup, tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed; DICOM conformance not checked")
    root, predictor, run, _, _ = setup
    nothing = predict_path(root / "data", tmp_path / "out", predictor, thresholds={n: 1.0 for n in LABELS},
                           dicom_out=tmp_path / "dicom")
    warnings = []
    for path in run.dicom_files + nothing.dicom_files:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
        lines = (result.stdout + result.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        assert not errors, f"{path}: {errors}"
        warnings += sorted({line for line in lines if line.startswith("Warning")})
    # The only warnings: the private coding scheme of four subtypes, which dciodvfy does not know.
    assert all("99ICHSCAN" in w for w in warnings), warnings


def test_reprocessing_makes_the_same_objects_and_rewrites_nothing(setup, tmp_path):
    root, predictor, run, _, _ = setup
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.dicom_files}
    again = predict_path(root / "data", root / "out", predictor, thresholds={n: THRESHOLD for n in LABELS},
                         dicom_out=root / "dicom")
    assert again.n_resumed == 2 and again.n_predicted == 0  # a resumed run still makes its objects ...
    assert again.dicom_files == run.dicom_files
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in again.dicom_files} == before  # ... the same bytes

    elsewhere = predict_path(root / "data", tmp_path / "out", predictor, thresholds={n: THRESHOLD for n in LABELS},
                             dicom_out=tmp_path / "dicom")  # predicted afresh, another folder
    for p, q in zip(run.dicom_files, elsewhere.dicom_files):
        a, b = pydicom.dcmread(p), pydicom.dcmread(q)
        assert (p.name, a.SOPInstanceUID, a.SeriesInstanceUID) == (q.name, b.SOPInstanceUID, b.SeriesInstanceUID)
        if p.name.startswith("key_"):
            assert a.PixelData == b.PixelData


def test_a_finding_no_longer_called_loses_its_key_image(setup, tmp_path):
    root, predictor, run, _, _ = setup
    shutil.copytree(root / "dicom", tmp_path / "dicom")
    rerun = predict_path(root / "data", tmp_path / "out", predictor, thresholds={n: 1.0 for n in LABELS},
                         dicom_out=tmp_path / "dicom")
    assert sorted(p.name for p in rerun.dicom_files) == ["sr.dcm", "sr.dcm"]
    assert not list((tmp_path / "dicom").rglob("key_*.dcm"))
    for path in rerun.dicom_files:  # the same report (same UID), now with every finding absent
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID in {pydicom.dcmread(p).SOPInstanceUID for p in run.dicom_files if p.name == "sr.dcm"}
        codes = re.findall(r"\(0008,0100\) Code Value\s+SH: '(52101004|272519000)'", str(ds))
        assert codes == ["272519000"] * len(LABELS)


def test_a_series_that_fails_is_named_and_the_others_are_written(setup, tmp_path):
    root, predictor, run, doc, _ = setup
    first = _folder(run, doc["series"][0]["series_uid"]).name
    (tmp_path / "dicom" / first / "sr.dcm").mkdir(parents=True)  # a folder where the report should go
    result = predict_path(root / "data", tmp_path / "out", predictor, thresholds={n: THRESHOLD for n in LABELS},
                          dicom_out=tmp_path / "dicom")
    (failure,) = result.failed
    assert failure.path.endswith(f"{first}/sr.dcm") and failure.reason.startswith("DICOM results not written")
    assert "\n" not in failure.reason and failure.series_uid == doc["series"][0]["series_uid"]
    second = _folder(run, doc["series"][1]["series_uid"]).name
    assert {p.parent.name for p in result.dicom_files} == {second}
    assert len(json.loads((tmp_path / "out" / "predictions.json").read_text())["series"]) == 2  # results kept
    assert "DICOM results not written" in (tmp_path / "out" / "skipped.csv").read_text()


def test_a_missing_source_file_is_one_line_naming_it(setup, tmp_path):
    root, predictor, _, _, _ = setup
    shutil.copytree(root / "data", tmp_path / "data")
    s = find_series(tmp_path / "data").series[0]
    prediction = predictor.predict_series(s)
    Path(s.slices[prediction.key_slice("any").index].path).unlink()
    with pytest.raises(IchscanError) as err:
        write_dicom_results(prediction, s, predictor, tmp_path / "dicom", thresholds={n: THRESHOLD for n in LABELS})
    assert s.slices[prediction.key_slice("any").index].path in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "dicom").exists()  # nothing half written


def test_series_inside_a_zip(setup, tmp_path):
    root, predictor, _, doc, _ = setup
    entry = doc["series"][0]
    folder = Path(find_series(root / "data").series[0].slices[0].path).parent
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"study/{f.name}")
    (s,) = find_series(tmp_path / "study.zip").series
    assert ".zip/" in s.slices[0].path
    prediction = predictor.predict_series(s)
    paths = write_dicom_results(prediction, s, predictor, tmp_path / "dicom", thresholds={n: THRESHOLD for n in LABELS})
    (sr_path,) = [p for p in paths if p.name == "sr.dcm"]
    sr = pydicom.dcmread(sr_path)
    assert sr.StudyInstanceUID == s.study_uid == entry["study_uid"]
    referenced = {item.ReferencedSOPInstanceUID for item in sr.CurrentRequestedProcedureEvidenceSequence[0]
                  .ReferencedSeriesSequence[0].ReferencedSOPSequence}
    assert {k.sop_uid for k in prediction.key_slices} == referenced


def test_cli_dicom_out_and_html_heat_maps(setup, tmp_path, capsys):
    import base64
    import io

    from PIL import Image

    from ichscan.cli import main

    root, _, run, _, _ = setup
    thresholds = tmp_path / "thr.json"
    thresholds.write_text(json.dumps({"method": "fixed", "thresholds": {n: THRESHOLD for n in LABELS}}))
    code = main(["predict", str(root / "data"), "--out", str(tmp_path / "out"), "--dicom-out", str(tmp_path / "dicom"),
                 "--thresholds", str(thresholds), "--html", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"dicom: {len(run.dicom_files)} objects in {tmp_path / 'dicom'}" in out
    assert sorted(p.name for p in (tmp_path / "dicom").rglob("*.dcm")) == sorted(p.name for p in run.dicom_files)
    text = (tmp_path / "out" / "report.html").read_text()
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]*)" class="keyslice"', text)
    assert images and all("heat map (Grad-CAM)" in alt for _, alt in images)
    for data, _ in images:
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
        assert picture.ndim == 3 and picture.shape[1] == 4 * 160 + 3 * 2  # three windows and the heat map panel
        last = picture[:, -160:]
        assert (last[..., 0] != last[..., 2]).any()  # colour in the heat map panel only
        assert (picture[:, :160, 0] == picture[:, :160, 2]).all()


def test_a_nifti_volume_gets_no_dicom_results_and_is_told_why(setup, tmp_path):
    nib = pytest.importorskip("nibabel")
    root, predictor, _, _, series = setup
    volume = next(iter(series.values())).volume()  # (slices, rows, columns) HU
    # stored (x, y, z) = (columns, rows, slices); RAS affine: x to the left is -x in RAS, y to posterior -y
    affine = np.diag([-1.0, -1.0, 5.0, 1.0])
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), affine), path)
    (s,) = find_series(path).series
    prediction = predictor.predict_series(s)
    with pytest.raises(IchscanError) as err:
        write_dicom_results(prediction, s, predictor, tmp_path / "dicom", thresholds={n: THRESHOLD for n in LABELS})
    assert "NIfTI" in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "dicom").exists()


def test_a_thin_series_read_as_slabs_shows_and_cites_its_key_slab(tmp_path, capsys, monkeypatch):
    """--slab 5 on 1 mm phantom slices: each key image is the slab the model read (its grey pixels the blood
    window of the mean HU of the slab's slices), cites every slice of the slab as a source, says so in its
    burned-in text, and passes dciodvfy; the HTML report's caption says the same."""
    from ichscan.cli import main
    from ichscan.phantom import generate_dataset

    generate_dataset(tmp_path / "data", studies=1, seed=22, size=96, slices=(30, 30), thickness=1.0,
                     layout="series", prevalence="any=1.0")
    predictor = Predictor.from_checkpoint("bundled", slab_mm=5.0)
    thresholds = {n: 0.0 for n in LABELS}  # every finding called: a key image for each
    import ichscan.dicomout as dicomout

    decoded, real_hu = [], dicomout._hu
    monkeypatch.setattr(dicomout, "_hu", lambda t: decoded.append(str(t.sop_uid)) or real_hu(t))
    run = predict_path(tmp_path / "data", tmp_path / "out", predictor, thresholds=thresholds,
                       rules=SelectionRules(head_check=False), dicom_out=tmp_path / "dicom")
    assert run.complete and not run.failed and len(run.predictions) == 1
    p = run.predictions[0]
    assert p.slab_mm == 5.0 and len(set(p.slabs)) == 6  # 30 slices 1 mm apart: six slabs of five
    s = find_series(tmp_path / "data").series[0]
    by_uid = {str(t.sop_uid): t for t in s.slices}
    key = p.key_slice("any")
    members = p.slab_members(key.index)
    assert len(members) == 5 and members[2] == key.index  # the middle slice stands for its slab
    # each slice of each key slab decoded once, however many of the six findings share that slab
    key_slabs = {p.slab_index(p.key_slice(n).index) for n in LABELS}
    assert len(decoded) == len(set(decoded)) == 5 * len(key_slabs)
    ds = pydicom.dcmread(_folder(run, p.series_uid) / "key_any.dcm")
    cited = [item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence]
    assert cited[0] == key.sop_uid and sorted(cited) == sorted(p.sop_uids[i] for i in members)
    assert "5 slices averaged" in ds.DerivationDescription
    from ichscan.dicomout import KEY_WINDOW
    from ichscan.heatmap import overlay
    from ichscan.windows import window_image

    def picture(hu):  # the blood window with the model's heat map on it, as the key image draws it
        hu = np.asarray(hu, dtype=np.float32)
        return overlay(window_image(hu, KEY_WINDOW, size=None, dtype=np.uint8)[0], grad_cam(predictor, hu, "any"))

    slab = np.mean([next(iter_hu([by_uid[p.sop_uids[i]]]))[1].astype(np.float64) for i in members], axis=0)
    k = ds.Columns // 96
    at = ds.pixel_array[: k * 96][k // 2::k, k // 2::k].astype(int)
    assert np.abs(at - picture(slab)).max() <= 1  # the slab, to float rounding
    alone = picture(next(iter_hu([by_uid[key.sop_uid]]))[1])
    assert (np.abs(at - alone) > 1).sum() > 100  # not the key slice alone
    if shutil.which("dciodvfy") is not None:
        result = subprocess.run(["dciodvfy", str(_folder(run, p.series_uid) / "key_any.dcm")], capture_output=True,
                                text=True, check=False)
        assert not [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"method": "fixed", "thresholds": thresholds}))
    assert main(["predict", str(tmp_path / "data"), "--out", str(tmp_path / "cli"), "--slab", "5", "--html",
                 "--thresholds", str(thr), "--all-series", "--no-progress"]) == 0
    text = (tmp_path / "cli" / "report.html").read_text()
    a, b = members[0] + 1, members[-1] + 1
    assert f"key slices {a}-{b} of 30 as one 5 mm slab" in text and "slab probability" in text
