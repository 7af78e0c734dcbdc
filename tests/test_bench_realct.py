"""bench/realct.py on the real head CT in ../shared/realct, with a tiny untrained checkpoint.

The numbers are checked against what a person can recount: series and slices from the label files the
converter writes, AUCs recomputed with scikit-learn from the probabilities the script prints and dumps,
the GE scan's 28 slices. The data never enter the repository: without the folder (a fresh clone) these
tests skip.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ichscan.labels import LABELS, LOSS_WEIGHTS
from ichscan.metrics import roc_auc

REPO = Path(__file__).resolve().parent.parent
REALCT = REPO.parent / "shared" / "realct"
LIMIT = 4  # CTICH051, 053, 054, 057: two with a bleed, two without

pytestmark = pytest.mark.skipif(
    not (REALCT / "ctich_to_dicom.py").is_file() or not (REALCT / "ge-normal").is_dir(),
    reason=f"no real head CT at {REALCT} (../shared/realct beside the repository; not shipped with it)",
)


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_realct", REPO / "bench" / "realct.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from test_predict import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def work(bench) -> Path:
    # The script's own default: converted once per machine (about 15 s of CPU), then reused by every run,
    # this test's and a person's. Safe to share: the conversion is deterministic and lands by one rename.
    return bench.DEFAULT_WORK


def _run(bench, capsys, *argv) -> tuple[int, dict]:
    rc = bench.main([str(a) for a in argv])
    out = capsys.readouterr().out
    return rc, json.loads(out)  # stdout holds one JSON object and nothing else


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _wll(y: np.ndarray, p: np.ndarray) -> float:
    """RSNA weighted log loss written out: per row (2 * any + the five subtypes) / 7, mean over rows."""
    p = np.clip(p, 1e-15, 1 - 1e-15)
    ll = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(np.mean(ll @ np.array(LOSS_WEIGHTS) / sum(LOSS_WEIGHTS)))


@pytest.fixture(scope="module")
def limited(bench, ckpt, work, tmp_path_factory):
    """One run on the first LIMIT CT-ICH series and the GE scan, every aggregation, files dumped."""
    dump = tmp_path_factory.mktemp("dump")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # capsys is per test; this run serves several
        rc = bench.main(["--checkpoint", str(ckpt), "--work", str(work), "--limit", str(LIMIT),
                         "--aggregation", "all", "--dump-dir", str(dump), "--batch-size", "32"])
    return rc, json.loads(out.getvalue()), dump


def test_counts_match_the_label_files(limited, work):
    rc, report, dump = limited
    assert rc == 0
    data = work / "ctich-dev"
    assert report["work"] == str(data) and (data / "series_labels.csv").is_file()
    series_rows = sorted(_csv(data / "series_labels.csv"), key=lambda r: r["patient_id"])
    assert len(series_rows) == 41 and sum(int(r["n_slices"]) for r in series_rows) == 1244
    chosen = series_rows[:LIMIT]
    ct = report["ctich_dev"]
    assert ct["limit"] == LIMIT and ct["n_series_labelled"] == 41 and ct["failed"] == []
    assert ct["n_series"] == LIMIT == len(ct["series"])
    assert [s["patient_id"] for s in ct["series"]] == [r["patient_id"] for r in chosen]
    n_slices = sum(int(r["n_slices"]) for r in chosen)
    assert ct["n_slices"] == n_slices == ct["n_slices_joined"] == sum(s["n_slices"] for s in ct["series"])
    assert len(_csv(dump / "ctich-dev" / "slices.csv")) == n_slices
    assert ct["n_positive_series"] == {n: sum(int(r[n]) for r in chosen) for n in LABELS}
    assert report["aggregations"] == ["max", "topk", "noisy_or"]
    # every series predicted: under the default rules, or under permissive ones with the reason given
    assert (report["selection"]["rules"] == "default") == (report["selection"]["rejected_by_default"] == [])


def test_series_metrics_recomputed_from_the_printed_probabilities(limited, work):
    _, report, _ = limited
    truth = {r["series_uid"]: r for r in _csv(work / "ctich-dev" / "series_labels.csv")}
    ct = report["ctich_dev"]
    y = np.array([[int(truth[s["series_uid"]][n]) for n in LABELS] for s in ct["series"]])
    assert y.tolist() == [[s["labels"][n] for n in LABELS] for s in ct["series"]]
    assert 0 < y[:, 0].sum() < LIMIT  # `any` has both classes, so its AUC is a number
    for method in report["aggregations"]:
        p = np.array([[s["probs"][method][n] for n in LABELS] for s in ct["series"]])
        for j, name in enumerate(LABELS):
            got = ct["series_auc"][method][name]
            if y[:, j].min() == y[:, j].max():
                assert got is None, (method, name)
            else:
                assert got == pytest.approx(roc_auc_score(y[:, j], p[:, j]), abs=1e-12)
                assert got == pytest.approx(roc_auc(y[:, j], p[:, j]), abs=1e-12)  # ichscan's own AUC agrees
        bleed = y[:, 0] == 1  # each subtype among the bleeding series alone
        for j, name in enumerate(LABELS[1:], 1):
            got = ct["series_auc_among_bleeding"][method][name]
            if y[bleed, j].min() == y[bleed, j].max():
                assert got is None, (method, name)
            else:
                assert got == pytest.approx(roc_auc_score(y[bleed, j], p[bleed, j]), abs=1e-12)
        assert "any" not in ct["series_auc_among_bleeding"][method]
        assert ct["series_weighted_log_loss"][method] == pytest.approx(_wll(y, p), rel=1e-9)


def test_slice_metrics_and_max_aggregation_from_the_dumped_slices(limited, work):
    _, report, dump = limited
    ct = report["ctich_dev"]
    rows = _csv(dump / "ctich-dev" / "slices.csv")
    # labels.csv: ID_<image>_<label>, the image being the DICOM file's stem (itself ID_<hex>)
    truth: dict[str, dict[str, int]] = {}
    for r in _csv(work / "ctich-dev" / "labels.csv"):
        image, label = r["ID"].rsplit("_", 1)
        truth.setdefault(image, {})[label] = int(r["Label"])
    y = np.array([[truth[r["image_id"]][n] for n in LABELS] for r in rows])
    p = np.array([[float(r[f"prob_{n}"]) for n in LABELS] for r in rows])
    assert ct["n_positive_slices"] == {n: int(v) for n, v in zip(LABELS, y.sum(axis=0))}
    for j, name in enumerate(LABELS):
        expected = None if y[:, j].min() == y[:, j].max() else roc_auc_score(y[:, j], p[:, j])
        assert ct["slice_auc"][name] == (None if expected is None else pytest.approx(expected, abs=1e-12))
    bleed = y[:, 0] == 1
    for j, name in enumerate(LABELS[1:], 1):
        expected = None if y[bleed, j].min() == y[bleed, j].max() else roc_auc_score(y[bleed, j], p[bleed, j])
        got = ct["slice_auc_among_bleeding"][name]
        assert got == (None if expected is None else pytest.approx(expected, abs=1e-12))
    for s in ct["series"]:  # max over a series' slices is its `max` probability
        mine = p[[r["series_uid"] == s["series_uid"] for r in rows]]
        assert len(mine) == s["n_slices"]
        assert [s["probs"]["max"][n] for n in LABELS] == pytest.approx(mine.max(axis=0), abs=1e-7)


def test_ge_normal_and_checkpoint(limited, ckpt):
    _, report, _ = limited
    ge = report["ge_normal"]
    assert ge["n_slices"] == 28
    assert ge["tilt_degrees"] == pytest.approx(18.5, abs=0.1)
    assert ge["slice_spacing_mm"]["max"] > ge["slice_spacing_mm"]["min"] + 2  # 4 mm below, 7 mm above
    assert set(ge["probs"]) == {"max", "topk", "noisy_or"} and set(ge["probs"]["max"]) == set(LABELS)
    for name in LABELS:
        key = ge["max_slice"][name]
        assert 0 <= key["index"] < 28 and key["prob"] == pytest.approx(ge["probs"]["max"][name])
        assert key["instance_number"] == key["index"] + 1  # the GE files are numbered from the skull base up
        assert key["z"] is not None
    assert ge["any_threshold"] is None and ge["any_below_threshold"] is None and ge["calls"] is None
    assert report["thresholds"] is None
    weights = ckpt.with_suffix(".safetensors")
    assert report["checkpoint"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_operating_points_carried_by_the_checkpoint(bench, ckpt, work, tmp_path, capsys, limited):
    """A checkpoint JSON with operating points: the `any` threshold is used; the conversion is reused."""
    _, first, _ = limited
    meta = json.loads(ckpt.read_text())
    meta["operating_points"] = {"method": "manual", "thresholds": {"any": 0.999, "epidural": 0.0},
                                "details": {"any": {"threshold_ci": [0.5, 0.9995], "threshold_ci_level": 0.95}}}
    carrying = tmp_path / "carrying.json"
    shutil.copy(ckpt.with_suffix(".safetensors"), carrying.with_suffix(".safetensors"))
    carrying.write_text(json.dumps(dict(meta, weights=carrying.with_suffix(".safetensors").name)))
    rc, report = _run(bench, capsys, "--checkpoint", carrying, "--work", work, "--limit", 1)
    assert rc == 0 and report["seconds"]["convert"] is None
    assert report["thresholds"]["any"] == 0.999 and "operating points" in report["thresholds_from"]
    ge = report["ge_normal"]
    assert ge["any_threshold"] == 0.999
    assert ge["any_below_threshold"] == {"max": ge["probs"]["max"]["any"] < 0.999}
    # what predict would say: epidural (threshold 0) is called only where any is (hierarchical calls)
    probs, t = ge["probs"]["max"], report["thresholds"]
    above = [n for n in LABELS[1:] if probs[n] >= t[n]]  # the others' threshold: 0.5
    assert "epidural" in above
    calls = ge["calls"]["max"]
    if probs["any"] < 0.999:
        assert calls["called"] == [] and calls["withheld"] == above
    else:
        assert calls["called"] == ["any", *above] and calls["withheld"] == []
    assert calls["borderline"] == (["any"] if 0.5 <= probs["any"] < 0.9995 else [])
    # same weights, same slices: the same GE probabilities as the first run
    assert ge["probs"]["max"] == pytest.approx(first["ge_normal"]["probs"]["max"], abs=1e-9)


def test_against_itself_every_paired_difference_is_zero(bench, ckpt, work, tmp_path, capsys):
    """--against: the second model's numbers on the same series and the paired comparison; a model against
    itself has the same AUCs, a difference of exactly 0 with a p of 1 (DeLong, one series per patient) and
    a bootstrap interval [0, 0]; the slices get no DeLong (several per patient). --thresholds is the
    checkpoint's alone: the --against model keeps its own operating points (here none)."""
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"method": "manual", "thresholds": {"any": 0.2}}))
    rc, report = _run(bench, capsys, "--checkpoint", ckpt, "--work", work, "--limit", LIMIT, "--against", ckpt,
                      "--batch-size", 32, "--thresholds", thr)
    assert rc == 0
    against = report["against"]
    assert report["thresholds"]["any"] == 0.2 and against["thresholds"] is None
    assert against["ctich_dev"]["series_auc"] == report["ctich_dev"]["series_auc"]
    assert against["ctich_dev"]["slice_auc"] == report["ctich_dev"]["slice_auc"]
    assert against["ge_normal"]["probs"] == report["ge_normal"]["probs"]
    series = against["paired"]["series"]["max"]
    assert series["names"] == ["against", "checkpoint"] and series["n"] == LIMIT
    row = series["per_label"][0]
    assert row["label"] == "any" and (row["pos"], row["neg"]) == (2, 2)
    assert row["diff"] == 0.0 and row["p_value"] == 1.0 and row["boot_low"] == row["boot_high"] == 0.0
    slices = against["paired"]["slices"]["per_label"][0]
    assert slices["diff"] == 0.0 and slices["p_value"] is None and "not independent" in slices["reason"]


def test_against_model_keeps_its_own_points_and_their_intervals(bench, ckpt, work, tmp_path, capsys):
    """--against a model that carries operating points with an interval: its GE calls are judged at its own
    `any` threshold and marked borderline from its own interval, as the checkpoint's would be (not null)."""
    meta = json.loads(ckpt.read_text())
    meta["operating_points"] = {"method": "manual", "thresholds": {"any": 0.999},
                                "details": {"any": {"threshold_ci": [0.5, 0.9995], "threshold_ci_level": 0.95}}}
    carrying = tmp_path / "carrying.json"
    shutil.copy(ckpt.with_suffix(".safetensors"), carrying.with_suffix(".safetensors"))
    carrying.write_text(json.dumps(dict(meta, weights=carrying.with_suffix(".safetensors").name)))
    rc, report = _run(bench, capsys, "--checkpoint", ckpt, "--work", work, "--limit", 1, "--against", carrying,
                      "--batch-size", 32)
    assert rc == 0 and report["thresholds"] is None and report["ge_normal"]["calls"] is None
    ge = report["against"]["ge_normal"]
    assert report["against"]["thresholds"]["any"] == 0.999 and ge["any_threshold"] == 0.999
    p_any = ge["probs"]["max"]["any"]
    assert ge["calls"]["max"]["borderline"] == (["any"] if 0.5 <= p_any < 0.9995 else [])


def test_against_another_model_the_paired_difference_is_the_two_reports_difference(bench, ckpt, work, tmp_path,
                                                                                     capsys):
    """Against a different model, each paired difference is this checkpoint's AUC less the other's, both
    read from their own numbers in the same JSON (so the comparison pairs the right two files)."""
    from test_predict import tiny_checkpoint

    other = tiny_checkpoint(tmp_path / "other", seed=5)
    rc, report = _run(bench, capsys, "--checkpoint", ckpt, "--work", work, "--limit", LIMIT, "--against", other,
                      "--batch-size", 32, "--aggregation", "all")
    assert rc == 0
    against = report["against"]
    assert against["ge_normal"]["probs"] != report["ge_normal"]["probs"]  # two different models
    for method in report["aggregations"]:
        for row in against["paired"]["series"][method]["per_label"]:
            mine, theirs = (r["ctich_dev"]["series_auc"][method][row["label"]] for r in (report, against))
            if mine is None or theirs is None:
                continue
            assert (row["auc_b"], row["auc_a"]) == pytest.approx((mine, theirs), abs=1e-12)
            assert row["diff"] == pytest.approx(mine - theirs, abs=1e-12)
    row = against["paired"]["slices"]["per_label"][0]
    assert row["label"] == "any"
    assert row["diff"] == pytest.approx(report["ctich_dev"]["slice_auc"]["any"]
                                        - against["ctich_dev"]["slice_auc"]["any"], abs=1e-12)
    assert row["boot_low"] <= row["diff"] <= row["boot_high"]


def test_a_per_label_model_against_another_is_paired_with_its_own_aggregation(bench, ckpt, work, tmp_path,
                                                                               capsys):
    """A model recording a per-label aggregation (as ichscan crossval --aggregation per_label writes one)
    against one that does not: its ``per_label`` series are set beside the other model's own aggregation
    (max for a bare checkpoint), and the paired difference is the two reports' difference."""
    from ichscan.model import write_ensemble

    doc = {"method": "per_label", "top_k": 3,
           "labels": {n: {"method": "noisy_or" if n == "any" else "max", "platt": [1.0, 0.0]} for n in LABELS}}
    manifest = write_ensemble(tmp_path / "per_label.json", [ckpt], extra={"aggregation": doc})
    rc, report = _run(bench, capsys, "--checkpoint", manifest, "--work", work, "--limit", LIMIT, "--against", ckpt,
                      "--batch-size", 32, "--aggregation", "all")
    assert rc == 0 and report["aggregations"][0] == "per_label"
    against = report["against"]
    assert against["ctich_dev"]["series_auc"]["per_label"] == against["ctich_dev"]["series_auc"]["max"]
    # the same slices: any ranks as noisy-OR (a monotone map), every subtype as max
    assert report["ctich_dev"]["series_auc"]["per_label"]["any"] == report["ctich_dev"]["series_auc"]["noisy_or"]["any"]
    row = against["paired"]["series"]["per_label"]["per_label"][0]
    assert row["label"] == "any"
    assert row["diff"] == pytest.approx(report["ctich_dev"]["series_auc"]["noisy_or"]["any"]
                                        - against["ctich_dev"]["series_auc"]["max"]["any"], abs=1e-12)


def test_bundled_without_a_bundled_model_is_one_clear_error(bench, work, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ICHSCAN_BUNDLED_DIR", str(tmp_path))  # a folder without bundled.json
    assert bench.main(["--checkpoint", "bundled", "--work", str(work), "--limit", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "no bundled model" in captured.err


@pytest.mark.slow
def test_every_series_unlimited(bench, ckpt, work, capsys):
    """All 41 CT-ICH series and 1,244 slices, as the README counts them (about a minute on 2 cores)."""
    rc, report = _run(bench, capsys, "--checkpoint", ckpt, "--work", work)
    ct = report["ctich_dev"]
    assert rc == 0 and ct["n_series"] == 41 and ct["n_slices"] == 1244 == ct["n_slices_joined"]
    assert ct["n_positive_series"] == {"any": 18, "epidural": 11, "intraparenchymal": 9, "intraventricular": 3,
                                       "subarachnoid": 5, "subdural": 2}
    assert all(v is not None for v in ct["series_auc"]["max"].values())


def test_negatives_report_from_the_dumped_slices(limited, work):
    """Where the false alarms lie, recomputed from slices.csv: the top-3 slices by `any` of each series
    without a bleed, by fifth of the series ordered foot to head by z, and the subtype leading on the
    brightest one."""
    _, report, dump = limited
    neg = report["ctich_dev"]["negatives"]
    clean = {s["series_uid"] for s in report["ctich_dev"]["series"] if s["labels"]["any"] == 0}
    rows = _csv(dump / "ctich-dev" / "slices.csv")
    by_fifth, leading = [0] * 5, dict.fromkeys(LABELS[1:], 0)
    for uid in clean:
        mine = sorted((r for r in rows if r["series_uid"] == uid), key=lambda r: float(r["z"]))
        p = [float(r["prob_any"]) for r in mine]
        top = sorted(range(len(p)), key=lambda i: -p[i])[:3]
        for i in top:
            by_fifth[i * 5 // len(p)] += 1
        subs = {n: float(mine[top[0]][f"prob_{n}"]) for n in LABELS[1:]}
        leading[max(subs, key=subs.get)] += 1
    assert neg["n_series"] == len(clean) == 2 and neg["top_k"] == 3
    assert neg["top_slices_by_fifth"] == by_fifth and sum(by_fifth) == 6
    assert neg["brightest_slice"]["leading_subtype"] == leading


def test_the_shipped_bundle_reads_the_normal_head_as_it_records(bench, work, capsys, monkeypatch):
    """The number the bundle's README and `measured` give for the normal GE head (issue 9's T5): its top-3
    `any` in fp32, below the `any` point and below that point's whole interval, so nothing is called there
    and `any` is not borderline."""
    from ichscan.model import BUNDLED_DIR_ENV, bundled_checkpoint, read_manifest

    monkeypatch.delenv(BUNDLED_DIR_ENV, raising=False)
    manifest = read_manifest(bundled_checkpoint())
    rc, report = _run(bench, capsys, "--checkpoint", "bundled", "--work", work, "--limit", "1",
                      "--aggregation", "topk")
    ge = report["ge_normal"]
    got = ge["probs"]["topk"]["any"]
    assert rc == 0 and got == pytest.approx(manifest.info["measured"]["realct_ge_normal_any"], abs=0.001)
    low = manifest.operating_points["details"]["any"]["threshold_ci"][0]
    assert got < low <= manifest.thresholds["any"] and ge["any_below_threshold"] == {"topk": True}
    assert ge["calls"]["topk"]["called"] == [] and "any" not in ge["calls"]["topk"]["borderline"]
