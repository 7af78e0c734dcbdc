"""``ichscan predict --html``: the per-series key-slice report, on real phantom DICOM and a tiny checkpoint."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from ichscan.cli import main
from ichscan.labels import LABELS
from ichscan.model import build_model, save_checkpoint
from ichscan.windows import PAPER_WINDOWS, PRESETS

TRAINED_ON = "three tiny phantoms, for a test"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ichscan.phantom import generate_dataset

    root = tmp_path_factory.mktemp("predict_report")
    generate_dataset(root / "data", studies=3, seed=5, size=64, slices=(6, 8), layout="series",
                     prevalence="any=0.7")
    meta = {"windows": [PRESETS[w].to_dict() for w in PAPER_WINDOWS], "image_size": 32, "trained_on": TRAINED_ON}
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "m", build_model("test_efficientnet"), meta)
    for name, value in (("all", 0.0), ("none", 1.0)):
        (root / f"thr_{name}.json").write_text(
            json.dumps({"method": "fixed", "thresholds": {n: value for n in LABELS}}))
    (root / "thr_mid.json").write_text(json.dumps({"method": "fixed", "thresholds": {n: 0.5 for n in LABELS}}))
    return root, ckpt


def _predict(root, ckpt, out, thresholds, *extra):
    code = main(["predict", str(root / "data"), "--checkpoint", str(ckpt), "--out", str(out), "--min-slices", "3",
                 "--thresholds", str(root / thresholds), "--no-progress", "--html", *extra])
    assert code == 0
    return (out / "report.html").read_text()


def _sections(text: str) -> list[str]:
    return re.findall(r'<section class="series".*?</section>', text, flags=re.DOTALL)


def _offline(text: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text)
    assert "<link" not in text and "<script src" not in text and "@import" not in text


def test_every_label_called_gives_one_key_slice_per_label(setup, capsys):
    root, ckpt = setup
    text = _predict(root, ckpt, root / "all", "thr_all.json")
    assert "report.html" in capsys.readouterr().out
    series = pd.read_csv(root / "all" / "series.csv")
    sections = _sections(text)
    assert len(sections) == len(series) >= 1
    for uid in series.series_uid:
        assert sum(f'data-uid="{uid}"' in s for s in sections) == 1
    for section in sections:
        assert section.count('class="keyslice"') == len(LABELS)  # every label called at threshold 0
        assert 'class="strip"' in section and section.count('class="pbar"') == len(LABELS)
        n = int(re.search(r"(\d+) slices</p>", section).group(1))
        # slices counted from 1: every "slice k of N" has 1 <= k <= N
        for k, total in re.findall(r"slice (\d+) of (\d+)", section):
            assert int(total) == n and 1 <= int(k) <= n
    assert "not a medical device" in text and TRAINED_ON in text
    assert not re.search(r'<td class="(TP|FP|FN|TN)"', text) and "call vs truth" not in text  # no labels given
    assert "Against the labels" not in text and "ichscanSort" in text
    _offline(text)


def test_nothing_called_gives_the_any_key_slice(setup):
    root, ckpt = setup
    text = _predict(root, ckpt, root / "none", "thr_none.json")
    sections = _sections(text)
    assert len(sections) == len(pd.read_csv(root / "none" / "series.csv"))
    for section in sections:
        assert section.count('class="keyslice"') == 1 and 'alt="any ' in section
        assert "no hemorrhage called" in section


def test_labels_give_confusion_counts_and_metrics(setup):
    from sklearn.metrics import confusion_matrix, recall_score

    root, ckpt = setup
    out = root / "labelled"
    text = _predict(root, ckpt, out, "thr_mid.json", "--labels", str(root / "data" / "series_labels.csv"))
    pred = pd.read_csv(out / "series.csv")
    truth = pd.read_csv(root / "data" / "series_labels.csv")
    merged = pred.merge(truth[["series_uid", *LABELS]], on="series_uid")
    assert len(merged) == len(pred)
    assert "Against the labels" in text and "calibration (reliability diagram)" in text
    sections = _sections(text)
    for name in LABELS:
        y = merged[name].to_numpy(dtype=int)
        called = (merged[f"prob_{name}"].to_numpy() >= 0.5).astype(int)
        row = re.search(rf'<tr data-label="{name}">(.*?)</tr>', text).group(1)
        cell = {k: re.search(rf'<td class="{k}">([^<]*)</td>', row).group(1)
                for k in ("tp", "fp", "fn", "tn", "specificity", "npv")}
        tp, fp = int(((y == 1) & (called == 1)).sum()), int(((y == 0) & (called == 1)).sum())
        assert (int(cell["tp"]), int(cell["fp"])) == (tp, fp)
        tn, _fp, fn, _tp = confusion_matrix(y, called, labels=[0, 1]).ravel()
        assert (int(cell["fn"]), int(cell["tn"])) == (fn, tn)
        spec = recall_score(1 - y, 1 - called, zero_division=np.nan) if (y == 0).any() else np.nan
        npv = tn / (tn + fn) if tn + fn else np.nan
        for key, want in (("specificity", spec), ("npv", npv)):
            assert cell[key] == "NA" if np.isnan(want) else float(cell[key]) == pytest.approx(want, abs=5e-4)
        # each series marks this label's call against its truth
        for _, r in merged.iterrows():
            section = next(s for s in sections if f'data-uid="{r.series_uid}"' in s)
            want = ("TP" if r[f"prob_{name}"] >= 0.5 else "FN") if r[name] else \
                   ("FP" if r[f"prob_{name}"] >= 0.5 else "TN")
            row = re.search(rf"<tr[^>]*><td>{name}</td>(.*?)</tr>", section).group(1)
            assert f'<td class="{want}">{want}</td>' in row
    _offline(text)


def test_labels_without_html_is_refused(setup, capsys):
    root, ckpt = setup
    code = main(["predict", str(root / "data"), "--checkpoint", str(ckpt), "--out", str(root / "x"),
                 "--labels", str(root / "data" / "series_labels.csv"), "--no-progress"])
    assert code == 2 and "--html" in capsys.readouterr().err


def test_capped_report_shows_the_highest_any_and_says_so(setup):
    from ichscan.predict.outputs import load_predictions
    from ichscan.report import predictions_report

    root, ckpt = setup
    if not (root / "all" / "predictions.json").exists():
        _predict(root, ckpt, root / "all", "thr_all.json")
    preds = load_predictions(root / "all")
    thresholds = {n: 0.5 for n in LABELS}
    windows = [PRESETS[w] for w in PAPER_WINDOWS]
    text = predictions_report(preds, thresholds, windows=windows, folder=root / "data", max_series=2)
    sections = _sections(text)
    top = sorted(preds, key=lambda p: -p.prob("any"))[:2]
    assert [re.search(r'data-uid="([^"]+)"', s).group(1) for s in sections] == [p.series_uid for p in top]
    assert f"Showing the 2 series with the highest <code>any</code> probability of {len(preds)}" in text
    assert "not a medical device" in text and "does not name" in text  # no trained_on given


def test_evaluate_html_with_the_dicom_folder_marks_every_series(setup, capsys):
    root, ckpt = setup
    out = root / "for_eval"
    _predict(root, ckpt, out, "thr_mid.json")
    labels = root / "data" / "series_labels.csv"
    assert main(["evaluate", "--pred", str(out / "series.csv"), "--labels", str(labels), "--thresholds",
                 str(root / "thr_mid.json"), "--out", str(root / "ev"), "--html", "--dicom", str(root / "data"),
                 "--quiet", "--bootstrap", "0"]) == 0
    text = (root / "ev" / "series_report.html").read_text()
    pred = pd.read_csv(out / "series.csv").merge(pd.read_csv(labels)[["series_uid", "any"]], on="series_uid")
    sections = _sections(text)
    assert len(sections) == len(pred) and TRAINED_ON in text
    for _, r in pred.iterrows():
        section = next(s for s in sections if f'data-uid="{r.series_uid}"' in s)
        want = ("TP" if r["prob_any"] >= 0.5 else "FN") if r["any"] else ("FP" if r["prob_any"] >= 0.5 else "TN")
        assert f'<td class="{want}">{want}</td>' in re.search(r"<tr[^>]*><td>any</td>(.*?)</tr>", section).group(1)
    _offline(text)
    assert main(["evaluate", "--pred", str(out / "series.csv"), "--labels", str(labels), "--out",
                 str(root / "ev2"), "--dicom", str(root / "data")]) == 1
    assert "--dicom goes with --html" in capsys.readouterr().err
