"""How ``ichscan predict`` calls findings, in every output (series.csv, predictions.json, the console, report.html,
the SR and key images, the node's log): borderline calls, a probability inside the interval of its operating
point (``ichscan.thresholds``); and hierarchical calls, a subtype only where ``any`` is called."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from ichscan.cli import main
from ichscan.dicomout import FINDINGS
from ichscan.errors import CheckpointError, DataError
from ichscan.labels import LABELS
from ichscan.model import BUNDLED, read_manifest, resolve_checkpoint
from ichscan.thresholds import (
    ThresholdIntervals,
    check_operating_points,
    load_thresholds,
    read_thresholds_file,
    run_intervals,
    run_points,
    run_thresholds,
    threshold_intervals,
)


def _doc(thresholds: dict[str, float], cis: dict[str, list | None], level: float = 0.95) -> dict:
    return {"method": "youden", "thresholds": thresholds,
            "details": {k: {"threshold_ci": ci, "threshold_ci_level": level} for k, ci in cis.items()}}


# ------------------------------------------------------------------------------------------------ the rule

def test_a_call_is_borderline_between_the_interval_and_the_threshold():
    iv = ThresholdIntervals({"any": (0.4, 0.6)})
    # threshold inside: [0.4, 0.6); the call is prob >= 0.5 either way
    assert [iv.borderline("any", p, 0.5) for p in (0.39, 0.4, 0.5, 0.59, 0.6, 0.9)] == [
        False, True, True, True, False, False]
    # a threshold outside its interval widens the zone to reach it: 0.65 is called negative at 0.7, positive
    # at every threshold of the interval
    assert iv.zone("any", 0.7) == (0.4, 0.7) and iv.borderline("any", 0.65, 0.7)
    assert iv.zone("any", 0.3) == (0.3, 0.6) and iv.borderline("any", 0.35, 0.3)
    assert iv.borderline("subdural", 0.5, 0.5) is None and iv.zone("subdural", 0.5) is None
    assert iv.describe("any", 0.5) == "95% interval 0.400-0.600"
    assert iv.to_dict()["intervals"] == {"any": [0.4, 0.6]}


def test_intervals_are_read_from_a_thresholds_document_and_checked(tmp_path):
    doc = _doc({"any": 0.5, "epidural": 0.2, "subdural": 0.3},
               {"any": [0.4, 0.6], "epidural": None, "subdural": [0.25, 0.35]}, level=0.9)
    iv = threshold_intervals(doc)
    assert dict(iv.bounds) == {"any": (0.4, 0.6), "subdural": (0.25, 0.35)} and iv.level == 0.9
    assert threshold_intervals({"method": "fixed", "thresholds": {"any": 0.5}}) is None  # no details
    assert threshold_intervals(_doc({"any": 0.5}, {"any": None})) is None  # too few resamples for any
    for bad in ([0.6, 0.4], [0.4], "0.4-0.6", [0.4, 1.5], [True, 0.6]):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(_doc({"any": 0.5}, {"any": bad})))
        with pytest.raises(DataError) as err:
            run_intervals(path)
        assert str(path) in str(err.value) and "threshold_ci of any" in str(err.value)
    mixed = _doc({"any": 0.5, "subdural": 0.3}, {"any": [0.4, 0.6], "subdural": [0.2, 0.4]})
    mixed["details"]["subdural"]["threshold_ci_level"] = 0.9
    with pytest.raises(DataError, match="levels differ"):
        threshold_intervals(mixed)
    with pytest.raises(DataError, match="threshold_ci_level of any is 95, not a number between 0 and 1"):
        threshold_intervals(_doc({"any": 0.5}, {"any": [0.4, 0.6]}, level=95))
    # a checkpoint's operating points are checked when the model is loaded, as a CheckpointError
    with pytest.raises(CheckpointError, match="threshold_ci of any"):
        check_operating_points(_doc({"any": 0.5}, {"any": [0.7, 0.2]}), "model.json", error=CheckpointError)


def test_intervals_follow_the_thresholds_a_run_uses(tmp_path):
    own = _doc({"any": 0.6}, {"any": [0.5, 0.7]})
    path = tmp_path / "thr.json"
    path.write_text(json.dumps(_doc({"any": 0.3}, {"any": [0.2, 0.4]})))
    assert dict(run_intervals(None, own).bounds) == {"any": (0.5, 0.7)}  # the model's
    assert dict(run_intervals(path, own).bounds) == {"any": (0.2, 0.4)}  # a file overrides the model's
    assert run_intervals({"any": 0.3}, own) is None  # numbers carry no interval
    assert run_intervals(None, None) is None
    # a file's document, read once (as the node does), gives what the file gives
    loaded = json.loads(path.read_text())
    assert dict(run_intervals(loaded, own).bounds) == {"any": (0.2, 0.4)}
    assert run_thresholds(loaded, own)[0]["any"] == 0.3 and run_thresholds(loaded, own)[0]["epidural"] == 0.5
    # read with read_thresholds_file, the document still names its file: where the thresholds came from, and
    # in the one-line error of a bad value (a run reads the file once and hands the document on)
    doc = read_thresholds_file(path)
    assert run_thresholds(doc, own) == (load_thresholds(path), str(path)) == ({**dict.fromkeys(LABELS, 0.5),
                                                                                "any": 0.3}, str(path))
    assert dict(run_intervals(doc, own).bounds) == {"any": (0.2, 0.4)}
    path.write_text(json.dumps(_doc({"any": 1.3}, {"any": [0.2, 0.4]})))
    with pytest.raises(DataError) as err:
        run_thresholds(read_thresholds_file(path), own)
    assert str(path) in str(err.value) and "threshold for any is 1.3" in str(err.value)


def test_run_points_reads_a_file_once_and_hands_on_its_document(tmp_path):
    own = _doc({"any": 0.6}, {"any": [0.5, 0.7]})
    path = tmp_path / "thr.json"
    path.write_text(json.dumps(_doc({"any": 0.3}, {"any": [0.2, 0.4]})))
    points = run_points(path, own)
    path.unlink()  # nothing later reads the file again: the document carries thresholds, intervals and name
    assert points.thresholds == {**dict.fromkeys(LABELS, 0.5), "any": 0.3} and points.source == str(path)
    assert dict(points.intervals.bounds) == {"any": (0.2, 0.4)}
    assert run_points(points.given, own) == points  # what a later step is handed gives the same again
    model = run_points(None, own)  # nothing given: the model's operating points and their intervals
    assert model.thresholds["any"] == 0.6 and dict(model.intervals.bounds) == {"any": (0.5, 0.7)}
    numbers = run_points({"any": 0.4}, own)
    assert (numbers.thresholds, numbers.source, numbers.intervals) == ({"any": 0.4}, "given", None)
    with pytest.raises(DataError) as err:  # a missing file: one line naming it
        run_points(path, own)
    assert str(path) in str(err.value)


def test_the_bundled_model_carries_an_interval_for_every_label():
    manifest = read_manifest(resolve_checkpoint(BUNDLED))
    raw = json.loads(Path(resolve_checkpoint(BUNDLED)).read_text())["operating_points"]
    iv = run_intervals(None, manifest.operating_points)
    assert set(iv.bounds) == set(LABELS) and iv.level == 0.95
    assert iv.bounds["any"] == tuple(raw["details"]["any"]["threshold_ci"])
    t = raw["thresholds"]["any"]
    assert iv.bounds["any"][0] < t < iv.bounds["any"][1]  # the chosen point lies inside its own interval


# ------------------------------------------------------------------------------------------------ the outputs

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two phantom series predicted by the bundled model twice: at fixed thresholds without intervals, then
    with intervals placed around known probabilities (series A's ``any`` called and borderline, series B's
    ``subdural`` not called and borderline, no interval for the intraparenchymal threshold)."""
    from ichscan.phantom import generate_dataset

    root = tmp_path_factory.mktemp("borderline")
    generate_dataset(root / "data", studies=2, seed=21, size=96, slices=(12, 12), layout="series",
                     prevalence="any=1.0")
    plain = root / "plain.json"
    plain.write_text(json.dumps({"method": "fixed", "thresholds": {n: 0.2 for n in LABELS}}))
    base = ["predict", str(root / "data"), "--checkpoint", "bundled", "--no-progress", "--precision", "fp32"]
    assert main([*base, "--out", str(root / "plain"), "--thresholds", str(plain),
                 "--dicom-out", str(root / "plain_dicom")]) == 0
    first = pd.read_csv(root / "plain" / "series.csv").set_index("series_uid")
    a, b = first.index[0], first.index[1]
    pa, pb = first.loc[a, "prob_any"], first.loc[b, "prob_subdural"]
    assert abs(first.loc[b, "prob_any"] - pa) > 0.01 and abs(first.loc[a, "prob_subdural"] - pb) > 0.01
    thresholds = {n: 0.2 for n in LABELS}
    cis = {n: [0.2, 0.2] for n in LABELS}  # [0.2, 0.2): a zone that holds no probability
    thresholds["any"], cis["any"] = float(pa), [float(pa) - 0.005, float(pa) + 0.005]
    thresholds["subdural"], cis["subdural"] = float(pb) + 0.002, [float(pb) - 0.005, float(pb) + 0.005]
    cis["intraparenchymal"] = None
    doc = _doc(thresholds, cis)
    marked = root / "marked.json"
    marked.write_text(json.dumps(doc))
    assert main([*base, "--out", str(root / "marked"), "--thresholds", str(marked), "--html",
                 "--dicom-out", str(root / "marked_dicom")]) == 0
    return root, a, b, doc


def test_series_csv_and_predictions_json_say_which_calls_are_borderline(runs, capsys):
    root, a, b, doc = runs
    plain = pd.read_csv(root / "plain" / "series.csv")
    assert plain[[f"borderline_{n}" for n in LABELS]].isna().all().all()  # no interval, nothing marked
    assert json.loads((root / "plain" / "predictions.json").read_text())["threshold_intervals"] is None

    series = pd.read_csv(root / "marked" / "series.csv").set_index("series_uid")
    expected = {a: {"any"}, b: {"subdural"}}
    for uid, row in series.iterrows():
        for n in LABELS:
            t, ci = doc["thresholds"][n], doc["details"][n]["threshold_ci"]
            if ci is None:
                assert pd.isna(row[f"borderline_{n}"])
                continue
            inside = min(ci[0], t) <= row[f"prob_{n}"] < max(ci[1], t)
            assert row[f"borderline_{n}"] == int(inside) == int(n in expected[uid]), (uid, n)
    assert series.loc[a, "pred_any"] == 1 and series.loc[b, "pred_subdural"] == 0  # called / not called
    pj = json.loads((root / "marked" / "predictions.json").read_text())
    assert pj["threshold_intervals"]["level"] == 0.95
    assert pj["thresholds_from"] == str(root / "marked.json")  # the file, read once by the command, is named
    assert pj["threshold_intervals"]["intervals"]["any"] == doc["details"]["any"]["threshold_ci"]
    assert "intraparenchymal" not in pj["threshold_intervals"]["intervals"]
    assert {s["series_uid"]: set(s["borderline"]) for s in pj["series"]} == expected


def test_the_console_and_the_html_report_say_borderline(runs, capsys):
    root, a, b, doc = runs
    marked = root / "marked.json"
    assert main(["predict", str(root / "data"), "--checkpoint", "bundled", "--no-progress", "--precision", "fp32",
                 "--out", str(root / "marked"), "--thresholds", str(marked)]) == 0  # resumed: every series done
    captured = capsys.readouterr()
    t_any = doc["thresholds"]["any"]
    lo, hi = doc["details"]["any"]["threshold_ci"]
    assert f"any {t_any:.4g} (95% interval {lo:.3g}-{hi:.3g})" in captured.err
    lines = {line.split()[1]: line for line in captured.out.splitlines() if line.startswith("series ")}
    assert f"any {float(pd.read_csv(root / 'marked' / 'series.csv').set_index('series_uid').loc[a, 'prob_any']):.3f}" \
        " (called, borderline);" in lines[a]
    assert "not called, borderline: subdural" in lines[b] and "(called);" in lines[b]
    assert "not called" not in lines[a]
    assert "borderline: the probability lies inside its threshold's 95% interval" in captured.out

    html = (root / "marked" / "report.html").read_text()
    sections = {s.split('"')[0]: s for s in html.split('<section class="series" data-uid="')[1:]}
    assert 'class="borderline">called, borderline' in sections[a]
    assert "(borderline)" in sections[a].split('class="verdict"')[1].split("</p>")[0]
    assert 'class="borderline">borderline' in sections[b] and "called, borderline" not in sections[b]
    assert sections[a].count('class="zone"') == 5  # a shaded zone on every bar but the one without interval


def _groups(sr) -> dict[str, list]:
    """{label: the content items of its TID 1501 measurement group} of an SR ichscan wrote."""
    by_meaning = {v[2]: k for k, v in FINDINGS.items()}
    out = {}
    for item in sr.ContentSequence:
        for group in getattr(item, "ContentSequence", []):
            for child in getattr(group, "ContentSequence", []):
                name = child.ConceptNameCodeSequence[0].CodeMeaning
                if name == "Finding" and child.ValueType == "CODE":
                    out[by_meaning[child.ConceptCodeSequence[0].CodeMeaning]] = list(group.ContentSequence)
    return out


def _equivocal(items) -> bool:
    return any(i.ConceptNameCodeSequence[0].CodeValue == "111012" and i.ConceptCodeSequence[0].CodeValue == "42425007"
               for i in items if i.ValueType == "CODE")


def test_the_structured_report_and_key_images_mark_borderline_calls(runs):
    root, a, b, doc = runs
    for uid, borderline in ((a, {"any"}), (b, {"subdural"})):
        sr_path = next((root / "marked_dicom").glob(f"{uid}-*/sr.dcm"))
        groups = _groups(pydicom.dcmread(sr_path))
        assert set(groups) == set(LABELS)
        assert {n for n, items in groups.items() if _equivocal(items)} == borderline
        params = " ".join(v for i in groups["any"] for v in _texts(i))
        assert "threshold 95% interval" in params
        plain_sr = next((root / "plain_dicom").glob(f"{uid}-*/sr.dcm"))
        assert not any(_equivocal(items) for items in _groups(pydicom.dcmread(plain_sr)).values())
    # A's key image for `any` gains one line of text (BORDERLINE and the interval, in amber) below the same slice
    with_line = pydicom.dcmread(next((root / "marked_dicom").glob(f"{a}-*/key_any.dcm"))).pixel_array
    without = pydicom.dcmread(next((root / "plain_dicom").glob(f"{a}-*/key_any.dcm"))).pixel_array
    width = with_line.shape[1]
    assert width == without.shape[1] == 96 * 6  # 96 px slices enlarged 6 times to reach 512
    line_h = int(max(10, width // 34) * 1.35)  # the text band's line height (dicomout._text_band)
    assert with_line.shape[0] - without.shape[0] == line_h
    assert np.array_equal(with_line[:width], without[:width])  # the same picture above the text
    band = with_line[width:]
    amber = (band[..., 0] > 200) & (band[..., 1] > 120) & (band[..., 1] < 200) & (band[..., 2] < 60)
    rows = np.flatnonzero(amber.any(axis=1))
    assert line_h < rows.min() < 2 * line_h  # amber in the second line (the burned-in warning is the last)
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy:
        out = subprocess.run([dciodvfy, str(next((root / "marked_dicom").glob(f"{a}-*/sr.dcm")))],
                             capture_output=True, text=True)
        assert "Error" not in out.stdout + out.stderr, out.stderr


def _texts(item):
    """Every text value under a content item (algorithm parameters are TEXT items)."""
    if getattr(item, "ValueType", None) == "TEXT":
        yield str(item.TextValue)
    for child in getattr(item, "ContentSequence", []):
        yield from _texts(child)


def test_evaluate_series_report_marks_borderline_calls_from_a_thresholds_file(runs, tmp_path):
    root, a, b, doc = runs
    base = ["evaluate", "--pred", str(root / "marked" / "series.csv"), "--labels",
            str(root / "data" / "series_labels.csv"), "--html", "--dicom", str(root / "data"), "--quiet",
            "--bootstrap", "0"]
    assert main([*base, "--thresholds", str(root / "marked.json"), "--out", str(tmp_path / "ev")]) == 0
    html = (tmp_path / "ev" / "series_report.html").read_text()
    sections = {s.split('"')[0]: s for s in html.split('<section class="series" data-uid="')[1:]}
    assert 'class="borderline">called, borderline' in sections[a] and 'class="borderline">borderline' in sections[b]
    assert main([*base, "--thresholds", "0.2", "--out", str(tmp_path / "ev2")]) == 0  # a number: no interval
    html = (tmp_path / "ev2" / "series_report.html").read_text()
    assert 'class="borderline"' not in html.split("</style>")[1] and "not marked" in html


def test_a_subtype_above_its_threshold_is_not_called_where_any_is_not(runs, tmp_path, capsys):
    root, a, b, doc = runs
    first = pd.read_csv(root / "plain" / "series.csv").set_index("series_uid")
    assert first.loc[b, "prob_any"] > first.loc[a, "prob_any"] + 0.01
    thresholds = {n: 0.0 for n in LABELS}  # every subtype above its point in both series
    thresholds["any"] = float(first.loc[a, "prob_any"]) + 1e-6  # A's any just below its point, B's above
    path = tmp_path / "thr.json"
    path.write_text(json.dumps({"method": "fixed", "thresholds": thresholds}))
    out, dicom = tmp_path / "out", tmp_path / "dicom"
    assert main(["predict", str(root / "data"), "--checkpoint", "bundled", "--no-progress", "--precision", "fp32",
                 "--out", str(out), "--thresholds", str(path), "--dicom-out", str(dicom)]) == 0
    captured = capsys.readouterr()
    series = pd.read_csv(out / "series.csv").set_index("series_uid")
    assert (series.loc[a, [f"pred_{n}" for n in LABELS]] == 0).all()
    assert (series.loc[b, [f"pred_{n}" for n in LABELS]] == 1).all()
    pj = {s["series_uid"]: s for s in json.loads((out / "predictions.json").read_text())["series"]}
    assert pj[a]["withheld"] == list(LABELS[1:]) and pj[b]["withheld"] == []
    assert "any is positive" in json.loads((out / "predictions.json").read_text())["call_rule"]
    line = next(x for x in captured.out.splitlines() if x.startswith(f"series {a} "))
    assert "no subtype; above their thresholds but not called, any is not: epidural" in line
    groups = _groups(pydicom.dcmread(next(dicom.glob(f"{a}-*/sr.dcm"))))
    absent = {n for n, items in groups.items()
              if any(i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeMeaning == "Absent" for i in items)}
    assert absent == set(LABELS)  # the SR of A says Absent for every finding, subtypes included
    assert [f.name for f in next(dicom.glob(f"{a}-*")).iterdir()] == ["sr.dcm"]  # and no key image
    assert len(list(next(dicom.glob(f"{b}-*")).glob("key_*.dcm"))) == len(LABELS)


def test_evaluate_with_hierarchical_calls_counts_what_predict_called(runs, tmp_path):
    root, a, b, doc = runs
    first = pd.read_csv(root / "plain" / "series.csv").set_index("series_uid")
    thresholds = {n: 0.0 for n in LABELS}
    thresholds["any"] = float(first.loc[a, "prob_any"]) + 1e-6  # A's any not called, B's called
    path = tmp_path / "thr.json"
    path.write_text(json.dumps({"method": "fixed", "thresholds": thresholds}))
    assert main(["predict", str(root / "data"), "--checkpoint", "bundled", "--no-progress", "--precision", "fp32",
                 "--out", str(tmp_path / "pred"), "--thresholds", str(path)]) == 0
    series = pd.read_csv(tmp_path / "pred" / "series.csv")
    base = ["evaluate", "--pred", str(tmp_path / "pred" / "series.csv"), "--labels",
            str(root / "data" / "series_labels.csv"), "--thresholds", str(path), "--bootstrap", "0", "--quiet"]
    counted = {}
    for calls in ("independent", "hierarchical"):
        assert main([*base, "--calls", calls, "--out", str(tmp_path / calls)]) == 0
        table = json.loads((tmp_path / calls / "table1.json").read_text())
        assert table["calls"] == calls
        counted[calls] = {r["label"]: r["tp"] + r["fp"] for r in table["per_label"]}
    for name in LABELS[1:]:  # threshold 0: both series above it; only B's called
        assert counted["independent"][name] == 2 and counted["hierarchical"][name] == 1
    # the calls evaluate counted with --calls hierarchical are the pred_ columns predict wrote
    assert counted["hierarchical"] == {n: int(series[f"pred_{n}"].sum()) for n in LABELS}
