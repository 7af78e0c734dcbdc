"""ichscan.comparison and `ichscan compare`: DeLong's test and the paired patient bootstrap, on values a
person can check by hand and against scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ichscan.comparison import compare, compare_files, delong, placements
from ichscan.labels import LABELS


def test_delong_by_hand():
    # Positives score 0.9 and 0.4, negatives 0.6 and 0.1. 0.9 outscores both negatives (1), 0.4 one of two
    # (0.5); 0.6 is outscored by one positive of two (0.5), 0.1 by both (1). AUC = 0.75, and DeLong's
    # variance = var(1, 0.5)/2 + var(0.5, 1)/2 = 0.125/2 + 0.125/2 = 0.125 (sample variances, ddof 1).
    y = [1, 1, 0, 0]
    a = [0.9, 0.4, 0.6, 0.1]
    v10, v01 = placements(y, a)
    assert v10.tolist() == [1.0, 0.5] and v01.tolist() == [0.5, 1.0]
    d = delong(y, a, a)
    assert d.auc_a == d.auc_b == 0.75
    assert d.var_a == pytest.approx(0.125) and d.cov == pytest.approx(0.125)
    assert d.diff == 0.0 and d.se_diff == 0.0 and d.p_value() == 1.0  # a model against itself


def test_delong_matches_its_definition_with_ties():
    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.4
    a = np.round(rng.random(60) + 0.6 * y, 1)  # rounded: many ties
    b = np.round(rng.random(60) + 0.3 * y, 1)
    d = delong(y, a, b)
    assert d.auc_a == pytest.approx(roc_auc_score(y, a)) and d.auc_b == pytest.approx(roc_auc_score(y, b))

    def brute(s):  # psi(X_i, Y_j): 1 above, 1/2 tied, 0 below, for every positive-negative pair
        psi = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
        return psi.mean(axis=1), psi.mean(axis=0)

    (a10, a01), (b10, b01) = brute(a), brute(b)
    m, n = y.sum(), (~y).sum()
    var_diff = (np.var(a10 - b10, ddof=1) / m + np.var(a01 - b01, ddof=1) / n)
    assert d.se_diff ** 2 == pytest.approx(var_diff)
    assert d.cov == pytest.approx(np.cov(a10, b10)[0, 1] / m + np.cov(a01, b01)[0, 1] / n)
    low, high = d.ci(0.95)
    assert low < d.diff < high and (high - low) == pytest.approx(2 * 1.959964 * d.se_diff, rel=1e-5)
    from scipy.stats import norm
    assert d.p_value() == pytest.approx(2 * norm.sf(abs(d.diff) / d.se_diff))


def _frames(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < 0.4).astype(int)
    y[:, 0] = y[:, 1:].max(axis=1)
    a = np.clip(0.35 * y + 0.65 * rng.random(y.shape), 0, 1)
    return y, a, rng


def test_paired_bootstrap_sees_the_same_ranking_as_no_difference():
    y, a, rng = _frames()
    # B ranks every case exactly as A does (a monotone transform): the AUCs are equal on every resample,
    # so the paired interval is exactly zero, whatever the spread of either AUC alone.
    c = compare(y, a, a ** 2, n_bootstrap=200)
    row = c["any"]
    assert row.diff == 0.0 and row.boot_low == 0.0 and row.boot_high == 0.0 and row.p_value == 1.0
    assert row.auc_a == pytest.approx(roc_auc_score(y[:, 0], a[:, 0]))
    # A better model: B adds signal; the difference is positive and both intervals hold the point.
    b = np.clip(a + 0.2 * y * rng.random(y.shape), 0, 1)
    c = compare(y, a, b, n_bootstrap=300)
    for row in c.per_label:
        assert row.diff >= 0 and row.boot_low <= row.diff <= row.boot_high
        assert row.delong_low <= row.diff <= row.delong_high
    assert c.wll_b != c.wll_a and c.wll_low <= c.wll_b - c.wll_a <= c.wll_high


def test_delong_is_withheld_when_patients_have_several_rows():
    y, a, rng = _frames()
    groups = np.repeat(np.arange(20), 2)  # two series per patient (lesion-free twins, say)
    c = compare(y, a, np.clip(a + 0.1 * rng.random(a.shape), 0, 1), groups=groups, n_bootstrap=100)
    row = c["any"]
    assert row.p_value is None and row.delong_low is None and "not independent" in row.reason
    assert row.boot_low is not None and c.n_units == 20
    # Slices without patient IDs: no DeLong, and the note says the bootstrap's interval is too narrow.
    c = compare(y, a, np.clip(a + 0.1 * rng.random(a.shape), 0, 1), level="slice", n_bootstrap=50)
    assert c["any"].p_value is None and "give the patients" in c["any"].reason
    assert c.unit == "row" and c.to_dict()["bootstrap"]["unit"] == "row"


def _write(tmp_path, name, uids, probs):
    frame = pd.DataFrame({"series_uid": uids, **{f"prob_{lab}": probs[:, j] for j, lab in enumerate(LABELS)}})
    path = tmp_path / name / "series.csv"
    path.parent.mkdir()
    frame.to_csv(path, index=False)
    return path


def test_cli_compare_writes_the_table_and_refuses_other_cases_in_one_line(tmp_path, capsys):
    from ichscan.cli import main

    y, a, rng = _frames(30)
    uids = [f"1.2.3.{i}" for i in range(30)]
    labels = tmp_path / "series_labels.csv"
    pd.DataFrame({"series_uid": uids, "patient_id": [f"P{i}" for i in range(30)],
                  **{lab: y[:, j] for j, lab in enumerate(LABELS)}}).to_csv(labels, index=False)
    pa = _write(tmp_path, "shipped", uids, a)
    b = np.clip(a + 0.1 * rng.random(a.shape), 0, 1)
    pb = _write(tmp_path, "cand", uids[::-1], b[::-1])  # another order: matched by series_uid
    out = tmp_path / "cmp"
    assert main(["compare", str(pa), str(pb), "--labels", str(labels), "--bootstrap", "100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Model B (cand) against model A (shipped) on the same 30 series from 30 patients" in printed
    doc = json.loads((out / "comparison.json").read_text())
    direct = compare_files(pa, pb, labels, n_bootstrap=100)
    assert doc["per_label"][0]["diff"] == pytest.approx(direct["any"].diff)
    assert direct["any"].auc_b == pytest.approx(roc_auc_score(y[:, 0], b[:, 0]))
    assert (out / "comparison.md").is_file() and len(pd.read_csv(out / "comparison.csv")) == len(LABELS)
    short = _write(tmp_path, "short", uids[:-1], b[:-1])
    assert main(["compare", str(pa), str(short), "--labels", str(labels)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "short" in err[0] and "same cases" in err[0]
