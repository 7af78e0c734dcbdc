"""Each label its own series aggregation, with a Platt map (``ichscan crossval --aggregation per_label``):
the evidence each aggregation is calibrated on, the Platt fit against scikit-learn and its own optimum,
the choice and nested estimate in crossval, the record a model carries and ichscan predict applying it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from ichscan.aggregation import (
    LabelAggregation,
    aggregate,
    aggregate_per_label,
    check_aggregation,
    describe_aggregation,
    evidence,
    fit_platt,
    label_aggregations,
    sigmoid,
)
from ichscan.crossval import CrossvalOptions, _resolve_aggregation, apply_per_label, choose_per_label
from ichscan.errors import CheckpointError, DataError
from ichscan.labels import LABELS

METHODS = ("max", "topk", "noisy_or")


def test_evidence_orders_series_as_the_aggregation_and_stays_finite_where_noisy_or_is_1():
    p = np.array([[0.1, 0.5], [0.2, 0.5], [0.7, 0.5], [0.4, 0.5]])
    assert evidence(p, "max")[0] == pytest.approx(math.log(0.7 / 0.3))
    assert evidence(p, "topk", 3)[0] == pytest.approx(math.log(13 / 17))  # mean of 0.7, 0.4, 0.2 is 13/30
    # noisy-OR of four slices at 0.5 is 1 - 0.5^4; its summed hazard 4 ln 2
    assert evidence(p, "noisy_or")[1] == pytest.approx(math.log(4 * math.log(2)))
    for m in ("max", "topk"):
        np.testing.assert_allclose(sigmoid(evidence(p, m)), aggregate(p, m)[0])
    np.testing.assert_allclose(1 - np.exp(-np.exp(evidence(p, "noisy_or"))), aggregate(p, "noisy_or")[0])
    long = np.full((60, 1), 0.9)  # 60 slices at 0.9: noisy-OR is 1.0 in float64, the evidence is not lost
    assert aggregate(long, "noisy_or")[0][0] == 1.0
    assert evidence(long, "noisy_or")[0] == pytest.approx(math.log(60 * math.log(10)))
    assert evidence(np.vstack([long, [[0.1]]]), "noisy_or")[0] > evidence(long, "noisy_or")[0]
    with pytest.raises(ValueError, match="context"):
        evidence(p, "context")


def test_platt_fit_equals_an_unpenalised_logistic_regression_and_sits_at_its_own_optimum():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, 20000)
    y = (rng.random(x.size) < sigmoid(0.8 * x - 2.0)).astype(float)
    a, b = fit_platt(x, y)
    ref = LogisticRegression(C=1e12, tol=1e-10, max_iter=1000).fit(x[:, None], y)
    assert a == pytest.approx(ref.coef_[0, 0], rel=2e-3) and b == pytest.approx(ref.intercept_[0], rel=2e-3)
    # separable scores: the fit stays finite, at the optimum of Platt's smoothed targets (gradient zero)
    x = np.array([-3.0, -1.0, 0.0, 4.0, 5.0, 9.0])
    y = np.array([0, 0, 0, 1, 1, 1.0])
    a, b = fit_platt(x, y)
    t = np.where(y > 0, 4 / 5, 1 / 5)  # (3 + 1) / (3 + 2) and 1 / (3 + 2)
    p = sigmoid(a * x + b)
    assert np.isfinite([a, b]).all() and a > 0
    assert abs(np.sum(p - t)) < 1e-8 and abs(np.sum((p - t) * x)) < 1e-8
    with pytest.raises(ValueError, match="positives and negatives"):
        fit_platt(x, np.zeros(6))


def test_platt_fit_reaches_the_optimum_where_one_far_score_pulls_the_slope_flat():
    from scipy.optimize import minimize

    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(-40, 0.01, 50), rng.normal(40, 0.01, 5), [1e4]]
    y = np.r_[np.zeros(50), np.ones(6)]
    t = np.where(y > 0, 7 / 8, 1 / 52)

    def loss(w):
        m = w[0] * x + w[1]
        return float(np.sum(np.logaddexp(0, m) - t * m))

    a, b = fit_platt(x, y)
    ref = minimize(loss, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-12, "maxiter": 20000})
    assert loss([a, b]) <= ref.fun + 1e-9
    assert (a, b) == pytest.approx(tuple(ref.x), rel=1e-5)


def test_aggregate_per_label_applies_each_labels_method_and_map():
    p = np.full((2, len(LABELS)), 0.5)
    p[:, 1] = [0.2, 0.6]
    specs = [LabelAggregation("noisy_or", platt=(1.0, 0.0)), LabelAggregation("max"),
             *[LabelAggregation("topk", 3, (2.0, -1.0))] * 4]
    probs, key = aggregate_per_label(p, specs)
    assert probs[0] == pytest.approx(1 / (1 + 1 / (2 * math.log(2))))  # sigmoid(log(2 ln 2)) = H / (1 + H)
    assert probs[1] == pytest.approx(0.6)  # max, no map: the plain aggregation
    assert probs[2] == pytest.approx(1 / (1 + math.e))  # sigmoid(2 * logit(0.5) - 1)
    assert key[1] == 1
    with pytest.raises(ValueError):
        aggregate_per_label(p[:, :3], specs)


def per_label_doc(**over):
    entries = {name: {"method": "topk", "top_k": 3, "platt": [1.5, -0.25]} for name in LABELS}
    entries.update(over)
    return {"method": "per_label", "top_k": 3, "labels": entries}


def test_a_per_label_record_is_checked_with_one_line_errors_naming_the_file():
    specs = label_aggregations(per_label_doc(any={"method": "noisy_or", "platt": [0.7, 0.1]}), LABELS)
    assert specs[0] == LabelAggregation("noisy_or", 3, (0.7, 0.1)) and specs[1].platt == (1.5, -0.25)
    assert check_aggregation(per_label_doc(), "m.json")["method"] == "per_label"
    bad = [({"method": "per_label"}, "labels"),
           (per_label_doc(subdural={"method": "context"}), "subdural"),
           (per_label_doc(any={"method": "max", "platt": [float("nan"), 0]}), "platt"),
           (per_label_doc(any={"method": "max", "platt": [1, 2, 3]}), "platt"),
           (per_label_doc(any={"method": "topk", "top_k": 0}), "top_k")]
    for doc, word in bad:
        with pytest.raises(CheckpointError, match=word) as err:
            check_aggregation(doc, "model.json", error=CheckpointError)
        assert "model.json" in str(err.value) and "\n" not in str(err.value)
    doc = per_label_doc()
    del doc["labels"]["subdural"]
    with pytest.raises(DataError, match="subdural"):
        label_aggregations(doc, LABELS)
    assert describe_aggregation("per_label", 3, specs[:2], LABELS[:2]) == (
        "per_label (any noisy_or, epidural topk of 3, each Platt-calibrated)")
    assert describe_aggregation("topk", 3) == "topk of 3"


def crossval_arrays(n=40, seed=3):
    """Series truth, each aggregation's series probabilities and evidence: ``any`` ranked best by noisy-OR,
    epidural best by max, the other labels without a positive series."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, len(LABELS)))
    truth[rng.permutation(n)[:16], 0] = 1
    truth[rng.permutation(n)[:12], 1] = 1
    columns, evidences = {}, {}
    for m, (w_any, w_epi) in {"max": (0.1, 1.5), "topk": (0.5, 0.6), "noisy_or": (1.5, 0.1)}.items():
        e = rng.normal(size=(n, len(LABELS)))
        e[:, 0] += w_any * truth[:, 0]
        e[:, 1] += w_epi * truth[:, 1]
        evidences[m] = e
        columns[f"adapted_{m}"] = 1 - np.exp(-np.exp(e)) if m == "noisy_or" else sigmoid(e)
    return truth, columns, evidences


def test_choose_per_label_takes_each_labels_best_auc_and_fits_its_map_there():
    truth, columns, evidences = crossval_arrays()
    specs, aucs = choose_per_label(truth, columns, evidences, METHODS, "topk", LABELS, 3)
    for j, name in enumerate(LABELS[:2]):
        for m in METHODS:
            assert aucs[name][m] == pytest.approx(roc_auc_score(truth[:, j], columns[f"adapted_{m}"][:, j]))
        best = max(METHODS, key=lambda m: aucs[name][m])
        assert specs[j].method == best
        assert specs[j].platt == pytest.approx(fit_platt(evidences[best][:, j], truth[:, j]))
    assert [s.method for s in specs[:2]] == ["noisy_or", "max"]
    assert all(s == LabelAggregation("topk", 3) for s in specs[2:])  # no positive series: the default, no map
    probs = apply_per_label(specs, columns, evidences, np.arange(len(truth)))
    np.testing.assert_allclose(probs[:, 2:], columns["adapted_topk"][:, 2:])
    # a monotone map: each label ranks as its chosen aggregation does
    assert roc_auc_score(truth[:, 0], probs[:, 0]) == pytest.approx(aucs["any"]["noisy_or"])


def test_per_label_nests_choices_and_maps_by_fold_and_never_reads_a_folds_own_labels():
    truth, columns, evidences = crossval_arrays()
    folds = np.arange(len(truth)) % 5
    chosen, info = _resolve_aggregation(CrossvalOptions(aggregation="per_label"), truth, columns, folds, LABELS,
                                        evidences)
    assert chosen == "per_label" and info["labels"]["any"]["method"] == "noisy_or"
    nested = columns["adapted_per_label_nested"]
    for k in range(5):
        rest, inside = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        specs, _ = choose_per_label(truth, columns, evidences, METHODS, "topk", LABELS, 3, rest)
        np.testing.assert_allclose(nested[inside], apply_per_label(specs, columns, evidences, inside))
        assert info["folds"][str(k)]["any"] == specs[0].to_dict()
    for j, name in enumerate(LABELS[:2]):
        assert info["nested_auc"][name] == pytest.approx(roc_auc_score(truth[:, j], nested[:, j]))
    assert info["nested_auc"]["subdural"] is None
    # relabelling fold 0's series changes nothing in fold 0's nested scores: they never saw those labels
    flipped = truth.copy()
    flipped[folds == 0, :2] = 1 - flipped[folds == 0, :2]
    cols2 = {k: v for k, v in columns.items() if not k.startswith("adapted_per_label")}
    _resolve_aggregation(CrossvalOptions(aggregation="per_label"), flipped, cols2, folds, LABELS, evidences)
    np.testing.assert_array_equal(cols2["adapted_per_label_nested"][folds == 0], nested[folds == 0])
    assert not np.array_equal(cols2["adapted_per_label"], columns["adapted_per_label"])
    assert json.loads(json.dumps(info)) == info  # aggregation.json


def test_predict_applies_the_per_label_aggregation_a_model_records(tmp_path):
    from _dicomfactory import write_series
    from test_predict import tiny_checkpoint

    from ichscan.dicom import find_series
    from ichscan.model import write_ensemble
    from ichscan.predict import Predictor

    write_series(tmp_path / "s", n=4)
    series = find_series(tmp_path / "s").series[0]
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    doc = per_label_doc(any={"method": "noisy_or", "platt": [0.8, -0.3]}, epidural={"method": "max"})
    manifest = write_ensemble(tmp_path / "model.json", [ckpt], extra={"aggregation": doc})
    predictor = Predictor.from_checkpoint(manifest, tta="none", precision="fp32")
    assert predictor.aggregation == "per_label" and predictor.label_aggregation[0].method == "noisy_or"
    got = predictor.predict_series(series)
    want, _ = aggregate_per_label(got.slice_probs, label_aggregations(doc, LABELS))
    np.testing.assert_allclose(got.probs, want, atol=1e-12)
    h = -np.log1p(-np.clip(got.slice_probs[:, 0].astype(np.float64), 1e-7, 1 - 1e-7)).sum()
    assert got.probs[0] == pytest.approx(1 / (1 + np.exp(-(0.8 * np.log(h) - 0.3))))
    assert got.probs[1] == pytest.approx(got.slice_probs[:, 1].max())
    assert predictor.describe()["label_aggregation"]["any"] == {"method": "noisy_or", "platt": [0.8, -0.3]}
    # asked for one aggregation, the model's per-label record is set aside
    plain = Predictor.from_checkpoint(manifest, tta="none", precision="fp32", aggregation="max")
    assert plain.label_aggregation is None
    np.testing.assert_allclose(plain.predict_series(series).probs, got.slice_probs.max(axis=0), atol=1e-7)
    broken = dict(doc, labels={k: v for k, v in doc["labels"].items() if k != "subdural"})
    bad = write_ensemble(tmp_path / "bad.json", [ckpt], extra={"aggregation": broken})
    with pytest.raises(CheckpointError, match="subdural"):
        Predictor.from_checkpoint(bad)
