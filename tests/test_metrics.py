"""ichscan.metrics: agreement with scikit-learn, Table 1 arithmetic, patient bootstrap, thresholds, inputs."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from ichscan import metrics as m
from ichscan.errors import DataError
from ichscan.labels import LABELS, LOSS_WEIGHTS


def random_case(seed: int, n: int = 300, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0.001, 0.999)
    if ties:  # coarse scores: many tied values, the case AUC implementations most often get wrong
        p = np.round(p, 1).clip(0.001, 0.999)
    w = rng.integers(0, 4, n).astype(float)
    return y, p, w


# ---- agreement with scikit-learn -----------------------------------------------------------------


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False), (3, True)])
def test_binary_metrics_agree_with_sklearn(seed, ties):
    y, p, w = random_case(seed, ties=ties)
    pred = (p >= 0.5).astype(int)
    def accuracy(y_true, y_pred, weights):  # Table 1's ACC, from the same confusion counts as PREC and REC
        return m.confusion_counts(y_true, y_pred, weights).accuracy

    pairs = [(accuracy, skm.accuracy_score, pred), (m.precision, skm.precision_score, pred),
             (m.recall, skm.recall_score, pred), (m.roc_auc, skm.roc_auc_score, p), (m.log_loss, skm.log_loss, p)]
    for weights in (None, w):
        for ours, theirs, x in pairs:
            assert ours(y, x, weights) == pytest.approx(theirs(y, x, sample_weight=weights), abs=1e-9), ours
        tn, fp, fn, tp = skm.confusion_matrix(y, pred, sample_weight=weights).ravel()
        assert m.confusion_counts(y, pred, weights) == pytest.approx((tp, fp, fn, tn), abs=1e-9)


def test_weighted_log_loss_is_rsna_formula_and_agrees_with_sklearn():
    rng = np.random.default_rng(7)
    y = (rng.random((250, 6)) < 0.2).astype(int)
    p = rng.uniform(0.01, 0.99, (250, 6))
    # Every row has all six labels, so the per-row weighted mean then row mean equals the weighted mean of
    # per-label log losses.
    expected = sum(wt * skm.log_loss(y[:, j], p[:, j]) for j, wt in enumerate(LOSS_WEIGHTS)) / sum(LOSS_WEIGHTS)
    assert m.weighted_log_loss(y, p) == pytest.approx(expected, abs=1e-9)
    per_row = -(y * np.log(p) + (1 - y) * np.log(1 - p)) @ np.array(LOSS_WEIGHTS) / 7.0
    assert m.weighted_log_loss(y, p) == pytest.approx(per_row.mean(), abs=1e-12)
    assert LOSS_WEIGHTS[LABELS.index("any")] == 2.0


def test_log_loss_clips_at_eps():
    assert m.log_loss([1], [0.0]) == pytest.approx(-math.log(1e-15))
    assert m.log_loss([0], [1.0]) == pytest.approx(-math.log(1e-15), rel=1e-3)  # log1p(-(1 - 1e-15))
    assert math.isfinite(m.weighted_log_loss(np.ones((2, 6)), np.zeros((2, 6))))


def test_undefined_metrics_are_nan_not_errors():
    assert math.isnan(m.roc_auc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(m.roc_auc([1, 1], [0.1, 0.2]))
    assert math.isnan(m.recall([0, 0], [1, 0]))
    assert math.isnan(m.precision([1, 0], [0, 0]))


def six_label_case(seed: int):
    """400 rows of the six labels, a quarter positive, scores that separate them somewhat; and thresholds."""
    rng = np.random.default_rng(seed)
    y = (rng.random((400, 6)) < 0.25).astype(int)
    p = np.clip(0.3 * y + 0.7 * rng.random((400, 6)), 0.001, 0.999)
    return y, p, dict(zip(LABELS, (0.5, 0.4, 0.45, 0.5, 0.55, 0.6)))


def test_evaluate_point_estimates_agree_with_sklearn():
    y, p, thresholds = six_label_case(11)
    ev = m.evaluate(y, p, thresholds=thresholds, n_bootstrap=0)
    for j, name in enumerate(LABELS):
        row, pred = ev[name], (p[:, j] >= thresholds[name]).astype(int)
        assert row.threshold == thresholds[name]
        assert row.pos == y[:, j].sum() and row.neg == (1 - y[:, j]).sum()
        assert row.acc.value == pytest.approx(skm.accuracy_score(y[:, j], pred), abs=1e-9)
        assert row.prec.value == pytest.approx(skm.precision_score(y[:, j], pred), abs=1e-9)
        assert row.rec.value == pytest.approx(skm.recall_score(y[:, j], pred), abs=1e-9)
        assert row.auc.value == pytest.approx(skm.roc_auc_score(y[:, j], p[:, j]), abs=1e-9)
        assert row.log_loss.value == pytest.approx(skm.log_loss(y[:, j], p[:, j]), abs=1e-9)
        assert row.auc.low is None  # no bootstrap asked for
    assert ev.weighted_log_loss.value == pytest.approx(m.weighted_log_loss(y, p), abs=1e-12)
    assert [r.label for r in ev.per_label] == list(LABELS)


def test_hierarchical_calls_agree_with_sklearn_on_gated_calls_and_leave_auc_alone():
    y, p, thresholds = six_label_case(12)
    ind = m.evaluate(y, p, thresholds=thresholds, n_bootstrap=0)
    hier = m.evaluate(y, p, thresholds=thresholds, n_bootstrap=0, calls="hierarchical")
    gate = p[:, 0] >= thresholds["any"]
    assert 0 < gate.sum() < len(gate)
    for j, name in enumerate(LABELS):
        pred = ((p[:, j] >= thresholds[name]) & (gate | (j == 0))).astype(int)
        row = hier[name]
        assert row.tp + row.fp == pred.sum()
        assert row.acc.value == pytest.approx(skm.accuracy_score(y[:, j], pred), abs=1e-9)
        assert row.prec.value == pytest.approx(skm.precision_score(y[:, j], pred), abs=1e-9)
        assert row.rec.value == pytest.approx(skm.recall_score(y[:, j], pred), abs=1e-9)
        assert row.auc.value == ind[name].auc.value and row.log_loss.value == ind[name].log_loss.value
    assert hier["any"].tp == ind["any"].tp and hier["epidural"].tp + hier["epidural"].fp < \
        ind["epidural"].tp + ind["epidural"].fp  # some epidural calls withdrawn, any untouched
    assert hier.to_dict()["calls"] == "hierarchical" and "any is positive" in hier.to_dict()["decision_rule"]
    from ichscan.report import table1_caption

    assert "a subtype only where any is called too" in table1_caption(hier)
    assert "a subtype only" not in table1_caption(ind)
    with pytest.raises(ValueError, match="calls must be one of"):
        m.evaluate(y, p, calls="gated")
    with pytest.raises(ValueError, match="need the label 'any'"):
        m.evaluate(y[:, 1:], p[:, 1:], labels=LABELS[1:], calls="hierarchical")


def test_evaluate_rejects_bad_input():
    with pytest.raises(ValueError, match="no rows"):
        m.evaluate(np.zeros((0, 6)), np.zeros((0, 6)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        m.evaluate(np.full((3, 6), 2), np.zeros((3, 6)))
    with pytest.raises(ValueError, match="groups"):
        m.evaluate(np.zeros((3, 6)), np.zeros((3, 6)), groups=[1, 2])


def test_evaluate_accepts_dataframes_by_label_name():
    rng = np.random.default_rng(3)
    y = pd.DataFrame((rng.random((50, 6)) < 0.4).astype(int), columns=LABELS)
    p = pd.DataFrame(rng.random((50, 6)), columns=LABELS)
    shuffled = m.evaluate(y[list(reversed(LABELS))], p[list(reversed(LABELS))], n_bootstrap=0)
    plain = m.evaluate(y.to_numpy(), p.to_numpy(), n_bootstrap=0)
    assert shuffled["subdural"].auc == plain["subdural"].auc


# ---- the paper's Table 1, reconstructed ------------------------------------------------------------

# The paper (an RSNA-2019 Kaggle model, 31st of 1345 teams, tested untuned on 401 hospital head CT series)
# is not available here, so these are NOT its numbers. They are a self-consistent worked example of a Table 1
# on 401 series, derived from the confusion counts below and rounded to three decimals as a table would be:
#
#   label             POS n (%)    NEG n (%)    PREC   REC    ACC     TP  FP  FN  TN
#   any               110 (27.4)   291 (72.6)   0.878  0.918  0.943  101  14   9 277
#   epidural            6 (1.5)    395 (98.5)   0.667  0.333  0.988    2   1   4 394
#   intraparenchymal   52 (13.0)   349 (87.0)   0.820  0.788  0.950   41   9  11 340
#   intraventricular   31 (7.7)    370 (92.3)   0.818  0.871  0.975   27   6   4 364
#   subarachnoid       44 (11.0)   357 (89.0)   0.714  0.682  0.935   30  12  14 345
#   subdural           47 (11.7)   354 (88.3)   0.814  0.745  0.950   35   8  12 346
TABLE1 = {
    # label: (POS, NEG, PREC, REC, ACC) as published, (TP, FP, FN, TN) behind them
    "any": ((110, 291, 0.878, 0.918, 0.943), (101, 14, 9, 277)),
    "epidural": ((6, 395, 0.667, 0.333, 0.988), (2, 1, 4, 394)),
    "intraparenchymal": ((52, 349, 0.820, 0.788, 0.950), (41, 9, 11, 340)),
    "intraventricular": ((31, 370, 0.818, 0.871, 0.975), (27, 6, 4, 364)),
    "subarachnoid": ((44, 357, 0.714, 0.682, 0.935), (30, 12, 14, 345)),
    "subdural": ((47, 354, 0.814, 0.745, 0.950), (35, 8, 12, 346)),
}


@pytest.mark.parametrize("label", LABELS)
def test_table1_confusion_counts_reconstructed_and_accuracy_checks(label):
    (pos, neg, prec, rec, acc), counts = TABLE1[label]
    assert pos + neg == 401
    c = m.confusion_from_summary(pos, neg, prec, rec, decimals=3)
    assert tuple(c) == counts and all(isinstance(v, int) for v in c)
    assert round(c.accuracy, 3) == acc
    assert round(c.precision, 3) == prec and round(c.recall, 3) == rec
    # The published figures pin the counts down: no other integer pair rounds to the same PREC and REC.
    fits = [(tp, fp) for tp, fp in itertools.product(range(pos + 1), range(neg + 1))
            if tp + fp and round(tp / pos, 3) == rec and round(tp / (tp + fp), 3) == prec]
    assert fits == [counts[:2]]
    # The same counts through evaluate give the same row.
    y = np.r_[np.ones(pos), np.zeros(neg)]
    calls = np.r_[np.ones(counts[0]), np.zeros(counts[2]), np.ones(counts[1]), np.zeros(counts[3])]
    ev = m.evaluate(y[:, None], calls[:, None], labels=(label,), n_bootstrap=0)
    assert round(ev[label].acc.value, 3) == acc and round(ev[label].pos_pct, 1) == round(100 * pos / 401, 1)


def test_confusion_from_summary_rejects_inconsistent_and_handles_no_calls():
    with pytest.raises(ValueError, match="precision"):
        m.confusion_from_summary(110, 291, 0.8799, 0.9182, decimals=4)
    assert tuple(m.confusion_from_summary(5, 396, None, 0.0)) == (0, 0, 5, 396)
    assert tuple(m.confusion_from_summary(0, 401, None, None)) == (0, 0, 0, 401)


# ---- NA with a reason --------------------------------------------------------------------------------


def test_label_without_positives_or_negatives_gives_na_with_reason():
    rng = np.random.default_rng(5)
    y = (rng.random((60, 6)) < 0.5).astype(int)
    y[:, 1] = 0  # epidural: no positives
    y[:, 2] = 1  # intraparenchymal: no negatives
    p = rng.random((60, 6))
    p[:, 3] = 0.1  # intraventricular: nothing called positive
    ev = m.evaluate(y, p, groups=np.arange(60) // 2, n_bootstrap=50)
    epi, iph, ivh = ev["epidural"], ev["intraparenchymal"], ev["intraventricular"]
    assert epi.auc.na and "no positive cases" in epi.auc.reason and "AUC undefined" in epi.auc.reason
    assert epi.rec.na and "recall undefined" in epi.rec.reason
    assert epi.acc.value is not None and epi.log_loss.value is not None
    assert iph.auc.na and "no negative cases" in iph.auc.reason
    assert iph.prec.value == 1.0 and iph.rec.value is not None
    assert ivh.prec.na and "precision undefined" in ivh.prec.reason
    assert ev["any"].auc.value is not None and ev["any"].auc.low is not None
    json.dumps(ev.to_dict())  # NA serialises as null


# ---- bootstrap over patients ---------------------------------------------------------------------


def clustered(seed: int, patients: int = 120):
    """Several series per patient, strongly correlated within patient (as repeat scans are)."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, patients)
    groups = np.repeat(np.arange(patients), per)
    base_y = (rng.random((patients, 6)) < 0.35).astype(int)
    base_p = np.clip(0.3 * base_y + 0.7 * rng.random((patients, 6)), 0, 1)
    y = base_y[groups]
    p = np.clip(base_p[groups] + 0.02 * rng.standard_normal((len(groups), 6)), 0, 1)
    return y, p, groups.astype(str)


def test_bootstrap_cis_contain_point_and_are_seeded():
    y, p, g = clustered(0)
    ev = m.evaluate(y, p, groups=g, n_bootstrap=300, seed=4)
    for row in ev.per_label:
        for name in m.METRICS:
            est = getattr(row, name)
            assert est.low <= est.value <= est.high, (row.label, name, est)
            assert est.n_resamples == 300
    assert ev.weighted_log_loss.low <= ev.weighted_log_loss.value <= ev.weighted_log_loss.high
    assert ev.resampling_unit == "patient" and ev.n_units == 120
    again = m.evaluate(y, p, groups=g, n_bootstrap=300, seed=4)
    other = m.evaluate(y, p, groups=g, n_bootstrap=300, seed=5)
    assert again.per_label == ev.per_label
    assert other["any"].auc.low != ev["any"].auc.low


def test_bootstrap_resamples_patients_not_rows():
    y, p, g = clustered(1)
    k = 4  # every patient's rows copied k times: no new patients, so no new information
    y4, p4, g4 = np.tile(y, (k, 1)), np.tile(p, (k, 1)), np.tile(g, k)
    grouped = m.evaluate(y, p, groups=g, n_bootstrap=400, seed=0)
    grouped4 = m.evaluate(y4, p4, groups=g4, n_bootstrap=400, seed=0)
    rows4 = m.evaluate(y4, p4, groups=None, n_bootstrap=400, seed=0)
    assert rows4.resampling_unit == "row"
    for name in LABELS:
        for metric in ("auc", "acc", "log_loss"):
            a, a4, r4 = (getattr(ev[name], metric) for ev in (grouped, grouped4, rows4))
            assert a4.value == pytest.approx(a.value, abs=1e-12)
            # Patient resampling: the copies travel together, so the interval is unchanged...
            assert (a4.low, a4.high) == pytest.approx((a.low, a.high), abs=1e-12)
            # ...whereas row resampling mistakes copies for new patients and shrinks it (~1/sqrt(k)).
            assert (r4.high - r4.low) < 0.75 * (a.high - a.low), (name, metric)


def test_patient_resamples_number_patients_by_sorted_id():
    """The first draw of seed 7 by hand: rng.integers picks patient indices, and index 0 is the smallest ID
    ("a"), whatever row it first appears in."""
    groups = ["c", "a", "c", "b", "a"]
    picks = np.random.default_rng(7).integers(0, 3, 3)  # indices into the sorted IDs a, b, c
    counts = {pid: int((picks == k).sum()) for k, pid in enumerate("abc")}
    assert next(m.patient_resamples(groups, 1, 7)).tolist() == [counts[g] for g in groups]
    ints = next(m.patient_resamples([30, 10, 20, 10], 1, 7))  # numbers sort as numbers: 10, 20, 30
    assert ints.tolist() == [int((picks == k).sum()) for k in (2, 0, 1, 0)]


def rounded(obj, digits: int = 12):
    """Floats to 12 significant digits, recursively (dataclasses as dicts): summing the same numbers in another
    order may change the last bit, nothing more."""
    import dataclasses

    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    if isinstance(obj, float) and math.isfinite(obj) and obj != 0:
        return round(obj, digits - 1 - int(math.floor(math.log10(abs(obj)))))
    return obj


def test_bootstrap_intervals_do_not_depend_on_row_order(tmp_path):
    """The same series in another row order (a shuffled predictions file, labels sorted otherwise) give the
    same Table 1 intervals, threshold intervals and paired-comparison intervals (to rounding of the sums)."""
    from ichscan.comparison import compare

    y, p, g = clustered(2)
    order = np.random.default_rng(0).permutation(len(y))
    a = m.evaluate(y, p, groups=g, n_bootstrap=200, seed=0)
    b = m.evaluate(y[order], p[order], groups=g[order], n_bootstrap=200, seed=0)
    assert rounded(a.per_label) == rounded(b.per_label)
    assert rounded(a.weighted_log_loss) == rounded(b.weighted_log_loss)
    ta = m.choose_thresholds(y, p, groups=g, n_bootstrap=200, seed=0)
    tb = m.choose_thresholds(y[order], p[order], groups=g[order], n_bootstrap=200, seed=0)
    assert ta.thresholds == tb.thresholds and rounded(ta.details) == rounded(tb.details)
    q = np.clip(p + 0.1 * np.random.default_rng(1).standard_normal(p.shape), 0, 1)
    ca = compare(y, p, q, groups=g, n_bootstrap=200, seed=0)
    cb = compare(y[order], p[order], q[order], groups=g[order], n_bootstrap=200, seed=0)
    assert rounded(ca.to_dict()["per_label"]) == rounded(cb.to_dict()["per_label"])
    # through the files ichscan evaluate reads: predictions reversed, labels sorted by series
    uid = [f"1.2.3.{i}" for i in range(len(y))]
    pred = pd.DataFrame({"series_uid": uid, **{f"prob_{n}": p[:, j] for j, n in enumerate(LABELS)}})
    truth = pd.DataFrame({"patient_id": g, "series_uid": uid, **{n: y[:, j] for j, n in enumerate(LABELS)}})
    pred.to_csv(tmp_path / "pred.csv", index=False)
    truth.to_csv(tmp_path / "labels.csv", index=False)
    pred.iloc[::-1].to_csv(tmp_path / "pred_reversed.csv", index=False)
    truth.sort_values("series_uid").to_csv(tmp_path / "labels_sorted.csv", index=False)
    fa = m.evaluate_files(tmp_path / "pred.csv", tmp_path / "labels.csv", n_bootstrap=200)
    fb = m.evaluate_files(tmp_path / "pred_reversed.csv", tmp_path / "labels_sorted.csv", n_bootstrap=200)
    assert rounded(fa.per_label) == rounded(fb.per_label)
    assert fa["any"].auc.low < fa["any"].auc.value < fa["any"].auc.high


def test_pooled_sets_need_one_level_and_keep_patient_ids_only_where_all_have_them():
    y, p, g = clustered(3)
    half = len(y) // 2
    part = lambda sl, level, groups: m.EvalData(level=level, ids=np.array([f"s{i}" for i in range(len(y))])[sl],
                                                y_true=y[sl], y_prob=p[sl], groups=groups,
                                                source={"pred": f"{level}.csv", "key": "series_uid"})
    first, second = part(slice(0, half), "series", g[:half]), part(slice(half, None), "series", g[half:])
    pooled = m.pool_eval_data([first, second])
    assert pooled.ids.tolist() == [f"s{i}" for i in range(len(y))] and pooled.groups.tolist() == g.tolist()
    assert m.pool_eval_data([first, part(slice(half, None), "series", None)]).groups is None
    with pytest.raises(DataError, match="cannot pool series-level and slice-level"):
        m.pool_eval_data([first, part(slice(half, None), "slice", None)])
    with pytest.raises(DataError, match="s0 is in two of the pooled sets"):
        m.pool_eval_data([first, first])


def test_bootstrap_weighted_auc_matches_sklearn_sample_weight():
    # A resample is a weight vector; check the weighted AUC/log loss used inside the bootstrap directly.
    y, p, w = random_case(9, ties=True)
    assert m.roc_auc(y, p, w) == pytest.approx(skm.roc_auc_score(y, p, sample_weight=w), abs=1e-9)
    assert m.weighted_log_loss(np.c_[y, y], np.c_[p, p], labels=("any", "epidural"), sample_weight=w) == \
        pytest.approx(skm.log_loss(y, p, sample_weight=w), abs=1e-9)


# ---- which bleed it is: subtype AUC among the rows with any bleed ---------------------------------


def bleeds_only_told_apart_from_none(seed: int, n: int = 300):
    """Half the rows bleed, each bleed of random subtypes; every subtype's score says only *that* a row bleeds
    (all bleeds above all bleed-free rows), nothing of which bleed: plain AUC near 1, among bleeds near 0.5."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, 6), dtype=int)
    y[:, 0] = rng.random(n) < 0.5
    y[:, 1:] = (rng.random((n, 5)) < 0.4) & (y[:, :1] == 1)
    p = np.where(y[:, :1] == 1, 0.6 + 0.4 * rng.random((n, 6)), 0.5 * rng.random((n, 6)))
    return y, p


def test_auc_among_bleeds_is_sklearns_on_the_bleeding_rows():
    y, p = bleeds_only_told_apart_from_none(3)
    ev = m.evaluate(y, p, n_bootstrap=0)
    bleed = y[:, 0] == 1
    assert ev["any"].auc_given_any is None  # `any` among bleeds is one class: not reported at all
    for j, name in enumerate(LABELS[1:], 1):
        row = ev[name]
        assert row.auc.value > 0.8  # the plain AUC credits telling bleed from none...
        expected = skm.roc_auc_score(y[bleed, j], p[bleed, j])
        assert row.auc_given_any.value == pytest.approx(expected, abs=1e-12)
        assert abs(row.auc_given_any.value - 0.5) < 0.12  # ...which says nothing of which bleed it is
    # a model that does tell them apart: each subtype's score high exactly where it is present
    good = np.where(y == 1, 0.9, 0.1)
    assert all(r.auc_given_any.value == 1.0 for r in m.evaluate(y, good, n_bootstrap=0).per_label[1:])
    # in the JSON, beside Table 1's metrics
    d = ev.to_dict()["per_label"]
    assert "auc_given_any" not in d[0] and d[1]["auc_given_any"]["value"] == ev["epidural"].auc_given_any.value
    assert m.evaluate(y[:, 1:], p[:, 1:], labels=LABELS[1:], n_bootstrap=0)["epidural"].auc_given_any is None


def test_subtype_auc_is_the_count_weighted_mean_of_against_clean_and_among_bleeds():
    # A subtype's negatives are bleed-free rows and other bleeds; its AUC is exactly the mean of its AUC
    # against each part, weighted by their counts, so Table 1's subtype AUC splits into "whether" and "which".
    rng = np.random.default_rng(8)
    y = np.zeros((240, 6), dtype=int)
    y[:, 0] = rng.random(240) < 0.45
    y[:, 1:] = (rng.random((240, 5)) < 0.35) & (y[:, :1] == 1)
    p = np.round(np.clip(0.4 * y[:, :1] + 0.15 * y + 0.5 * rng.random((240, 6)), 0, 1), 2)  # ties too
    ev = m.evaluate(y, p, n_bootstrap=0)
    clean = y[:, 0] == 0
    for j, name in enumerate(LABELS[1:], 1):
        pos, other = y[:, j] == 1, (y[:, 0] == 1) & (y[:, j] == 0)
        keep = pos | clean
        against_clean = skm.roc_auc_score(y[keep, j], p[keep, j])
        mixed = (clean.sum() * against_clean + other.sum() * ev[name].auc_given_any.value) / (clean.sum() + other.sum())
        assert ev[name].auc.value == pytest.approx(mixed, abs=1e-12), name


def test_auc_among_bleeds_na_with_reason_and_patient_ci():
    y, p = bleeds_only_told_apart_from_none(4)
    y[:, 1] = 0  # epidural: never present
    y[:, 2] = y[:, 0]  # intraparenchymal: in every bleed
    groups = np.arange(len(y)) // 3
    ev = m.evaluate(y, p, groups=groups, n_bootstrap=200, seed=1)
    assert ev["epidural"].auc_given_any.na and "no positive cases of epidural" in ev["epidural"].auc_given_any.reason
    iph = ev["intraparenchymal"].auc_given_any
    assert iph.na and "every case of any has intraparenchymal" in iph.reason
    assert ev["intraparenchymal"].auc.value is not None  # its plain AUC (bleed against none) is defined
    sah = ev["subarachnoid"].auc_given_any
    assert sah.low <= sah.value <= sah.high and sah.n_resamples == 200
    # one resample by hand: the patient weights, with the bleed-free rows weighted 0
    w = next(m.patient_resamples(groups.astype(str), 1, 1))
    bleed = y[:, 0].astype(float)
    assert m.roc_auc(y[:, 4], p[:, 4], w * bleed) == pytest.approx(
        skm.roc_auc_score(y[:, 4], p[:, 4], sample_weight=w * bleed), abs=1e-12)


# ---- operating points ----------------------------------------------------------------------------


def brute_force(y, s, method, target=0.9):
    best = None
    for t in sorted(set(s), reverse=True):
        call = s >= t
        sens, spec = call[y == 1].mean(), (~call[y == 0]).mean()
        if method == "youden":
            if best is None or sens + spec - 1 > best[1] + 1e-12:
                best = (t, sens + spec - 1)
        elif sens >= target:
            return t
    return best[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_match_brute_force(seed):
    y, p, _ = random_case(seed, ties=seed == 1)
    assert m.choose_threshold(y, p, method="youden")[0] == pytest.approx(brute_force(y, p, "youden"))
    t, info = m.choose_threshold(y, p, method="sensitivity", target=0.9)
    assert t == pytest.approx(brute_force(y, p, "sensitivity", 0.9))
    assert info["sensitivity"] >= 0.9 and m.recall(y, p >= t) == pytest.approx(info["sensitivity"])


def test_thresholds_saved_loaded_and_applied(tmp_path):
    rng = np.random.default_rng(2)
    y = (rng.random((200, 6)) < 0.3).astype(int)
    y[:, 1] = 0  # no epidural in validation: keeps the default, with a note
    p = np.clip(0.3 * y + 0.7 * rng.random((200, 6)), 0, 1)
    points = m.choose_thresholds(y, p, method="sensitivity", target=0.8)
    assert points.thresholds["epidural"] == 0.5 and "epidural" in points.notes
    path = m.save_thresholds(points, tmp_path / "thresholds.json")
    doc = json.loads(path.read_text())
    assert doc["method"] == "sensitivity" and set(doc["thresholds"]) == set(LABELS)
    loaded = m.load_thresholds(path)
    assert loaded == points.thresholds == m.parse_thresholds(str(path))
    calls = m.apply_thresholds(p, loaded)
    for j, name in enumerate(LABELS):
        assert (calls[:, j] == (p[:, j] >= loaded[name])).all()
    ev = m.evaluate(y, p, thresholds=loaded, n_bootstrap=0)
    assert ev["any"].rec.value >= 0.8
    assert m.parse_thresholds("0.3") == dict.fromkeys(LABELS, 0.3)


def test_bad_thresholds_file_is_data_error(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"method": "youden", "thresholds": {"any": 0.3}}))
    # Same reading as ichscan.predict: labels left out get 0.5.
    assert m.load_thresholds(bad) == {**dict.fromkeys(LABELS, 0.5), "any": 0.3}
    bad.write_text(json.dumps({"method": "youden", "thresholds": {"anything": 0.3}}))
    with pytest.raises(DataError, match=r"t\.json: unknown label"):
        m.load_thresholds(bad)
    bad.write_text(json.dumps({"method": "youden", "thresholds": {"any": 1.3}}))
    with pytest.raises(DataError, match=r"t\.json: threshold for any is 1\.3, not a number in \[0, 1\]"):
        m.load_thresholds(bad)
    with pytest.raises(DataError, match="not found"):
        m.load_thresholds(tmp_path / "missing.json")
    with pytest.raises(DataError):
        m.parse_thresholds("1.5")


# ---- reading predictions and labels ----------------------------------------------------------------


def write_series(tmp_path, n=40, seed=0, drop_pred=0, extra_pred=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 6)) < 0.3).astype(int)
    p = np.clip(0.3 * y + 0.7 * rng.random((n, 6)), 0, 1)
    uids = [f"1.2.3.{i}" for i in range(n)]
    patients = [f"P{i // 2:03d}" for i in range(n)]
    labels = pd.DataFrame({"patient_id": patients, "study_uid": [f"9.{i}" for i in range(n)],
                           "series_uid": uids, "n_slices": 32})
    for j, name in enumerate(LABELS):
        labels[name] = y[:, j]
    keep = slice(drop_pred, n)
    pred = pd.DataFrame({"patient_id": patients[keep], "study_uid": labels.study_uid[keep],
                         "series_uid": uids[keep], "n_slices": 32})
    for j, name in enumerate(LABELS):
        pred[f"prob_{name}"] = p[keep, j]
    for name in LABELS:
        pred[f"pred_{name}"] = (pred[f"prob_{name}"] >= 0.5).astype(int)
        pred[f"key_slice_{name}"] = "1.2.840.1"
    if extra_pred:
        extra = pred.head(extra_pred).copy()
        extra["series_uid"] = [f"7.7.{i}" for i in range(extra_pred)]
        pred = pd.concat([pred, extra])
    pred = pred.iloc[::-1]  # order must not matter: the join is by series_uid
    labels.to_csv(tmp_path / "series_labels.csv", index=False)
    pred.to_csv(tmp_path / "series_pred.csv", index=False)
    return tmp_path / "series_pred.csv", tmp_path / "series_labels.csv", y, p


def test_series_predictions_join_labels_by_series_uid(tmp_path):
    pred, labels, y, p = write_series(tmp_path, drop_pred=4)
    data = m.load_eval_data(pred, labels)
    assert data.level == "series" and len(data.ids) == 36
    assert data.source["n_labels_without_prediction"] == 4
    order = [int(u.split(".")[-1]) for u in data.ids]
    np.testing.assert_array_equal(data.y_true, y[order])
    np.testing.assert_allclose(data.y_prob, p[order], atol=1e-12)
    assert data.groups[0] == f"P{order[0] // 2:03d}"
    ev = m.evaluate_files(pred, labels, n_bootstrap=20)
    assert ev.level == "series" and ev.n_units == 18 and ev.source["n_matched"] == 36


def test_series_patients_from_labels_else_predictions(tmp_path, caplog):
    pred, labels, *_ = write_series(tmp_path)
    frame = pd.read_csv(labels, dtype=str)
    frame.drop(columns=["patient_id"]).to_csv(labels, index=False)
    data = m.join_series_labels(pred, labels)
    assert data.source["groups_from"] == str(pred) and len(set(data.groups)) == 20
    frame["patient_id"] = "X" + frame["patient_id"]
    frame.to_csv(labels, index=False)
    data = m.join_series_labels(pred, labels)
    assert data.source["groups_from"] == str(labels) and data.groups[0].startswith("X")
    assert "different patient_id" in caplog.text
    # predictions made by ichscan predict carry pseudonyms (anon-...): expected, said at info level, no warning
    caplog.clear()
    preds = pd.read_csv(pred, dtype=str)
    preds["patient_id"] = "anon-" + preds["patient_id"]
    preds.to_csv(pred, index=False)
    with caplog.at_level("INFO", logger="ichscan.metrics"):
        data = m.join_series_labels(pred, labels)
    assert data.groups[0].startswith("X") and "different patient_id" not in caplog.text
    assert "pseudonymised patient IDs" in caplog.text
    assert all(r.levelname == "INFO" for r in caplog.records if "pseudonymised" in r.getMessage())


def test_series_errors_name_the_file(tmp_path):
    pred, labels, *_ = write_series(tmp_path, extra_pred=3)
    with pytest.raises(DataError, match=r"series_pred\.csv: 3 of 43 series.*no row in"):
        m.join_series_labels(pred, labels)
    frame = pd.read_csv(labels).drop(columns=["subdural"])
    frame.to_csv(labels, index=False)
    with pytest.raises(DataError, match=r"series_labels\.csv: series labels lacks column\(s\) subdural"):
        m.join_series_labels(pred, labels)
    with pytest.raises(DataError, match="not found"):
        m.join_series_labels(tmp_path / "nope.csv", labels)


def rsna_long(images, values, with_any_last=True):
    rows = []
    for image, vals in zip(images, values):
        for name in LABELS[1:] + ("any",):
            rows.append((f"{image}_{name}", vals[LABELS.index(name)]))
    return pd.DataFrame(rows, columns=["ID", "Label"])


def test_kaggle_submission_against_rsna_labels_with_duplicates(tmp_path):
    rng = np.random.default_rng(4)
    images = [f"ID_{i:09x}" for i in range(30)]
    y = (rng.random((30, 6)) < 0.3).astype(int)
    p = rng.random((30, 6)).round(4)
    truth = rsna_long(images + ["ID_extra"], np.r_[y, np.zeros((1, 6), int)])
    truth = pd.concat([truth, truth.head(7)])  # stage_2_train.csv repeats some rows verbatim
    truth.to_csv(tmp_path / "labels.csv", index=False)
    sub = rsna_long(images, p).sample(frac=1, random_state=0)
    sub.to_csv(tmp_path / "submission.csv", index=False)
    data = m.load_eval_data(tmp_path / "submission.csv", tmp_path / "labels.csv")
    assert data.level == "slice" and data.groups is None
    assert data.source["pred_format"] == "kaggle_submission"
    assert data.source["n_labels_without_prediction"] == 1
    order = [images.index(i) for i in data.ids]
    np.testing.assert_array_equal(data.y_true, y[order])
    np.testing.assert_allclose(data.y_prob, p[order])
    # Image-level resampling is recorded as such; a groups file restores patient resampling.
    plain = m.evaluate_files(tmp_path / "submission.csv", tmp_path / "labels.csv", n_bootstrap=0)
    assert plain.resampling_unit == "row"
    pd.DataFrame({"image_id": images, "patient_id": [f"P{i // 3}" for i in range(30)]}).to_csv(
        tmp_path / "index.csv", index=False)
    ev = m.evaluate_files(tmp_path / "submission.csv", tmp_path / "labels.csv",
                          groups_path=tmp_path / "index.csv", n_bootstrap=10)
    assert ev.resampling_unit == "patient" and ev.n_units == 10
    # Conflicting repeats are an error, naming the labels file.
    bad = pd.concat([truth, pd.DataFrame({"ID": [f"{images[0]}_any"], "Label": [1 - y[0, 0]]})])
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad\.csv: 1 image\(s\) have conflicting"):
        m.join_slice_labels(tmp_path / "submission.csv", tmp_path / "bad.csv")


def test_slice_csv_against_rsna_labels_uses_patient_ids(tmp_path):
    rng = np.random.default_rng(6)
    images = [f"ID_{i:09x}" for i in range(24)]
    y = (rng.random((24, 6)) < 0.4).astype(int)
    rsna_long(images, y).to_csv(tmp_path / "labels.csv", index=False)
    pred = pd.DataFrame({"patient_id": [f"P{i // 8}" for i in range(24)], "study_uid": "1", "series_uid": "2",
                         "sop_uid": [f"3.{i}" for i in range(24)], "image_id": images,
                         "slice_index": range(24), "z": np.arange(24) * 5.0})
    for j, name in enumerate(LABELS):
        pred[f"prob_{name}"] = rng.random(24)
    pred.to_csv(tmp_path / "slices.csv", index=False)
    ev = m.evaluate_files(tmp_path / "slices.csv", tmp_path / "labels.csv", level="slice", n_bootstrap=10)
    assert ev.level == "slice" and ev.n_units == 3 and ev.resampling_unit == "patient"
    pred.drop(columns=["prob_epidural"]).to_csv(tmp_path / "slices.csv", index=False)
    with pytest.raises(DataError, match=r"slices\.csv.*prob_epidural"):
        m.join_slice_labels(tmp_path / "slices.csv", tmp_path / "labels.csv")


def test_threshold_on_scores_that_do_not_separate_is_flagged():
    # 10 positives scored below nearly all of 40 negatives (AUC about 0.02): no threshold has J > 0, and the
    # rule's first maximum is the lowest score, which calls every case positive. The threshold is kept and
    # flagged; a label whose scores do separate (the reversed scores) is not.
    y = np.r_[np.ones(10), np.zeros(40)]
    s = np.r_[np.linspace(0.01, 0.10, 10), np.linspace(0.055, 0.955, 40)]
    from sklearn.metrics import roc_auc_score

    t, info = m.choose_threshold(y, s, method="youden")
    assert info["auc"] == pytest.approx(roc_auc_score(y, s))
    assert info["positives"] == 10 and info["negatives"] == 40
    assert t == pytest.approx(0.01) and info["sensitivity"] == 1.0 and info["specificity"] == 0.0
    yy = np.c_[y, y]
    pp = np.c_[s, 1 - s]
    points = m.choose_thresholds(yy, pp, labels=("any", "epidural"), method="youden")
    assert "unreliable" in points.notes["any"] and f"AUC {info['auc']:.3f}," in points.notes["any"]
    assert "100% of the negatives" in points.notes["any"]
    assert "epidural" not in points.notes
    assert points.details["epidural"]["auc"] == pytest.approx(1 - info["auc"])


def test_threshold_interval_over_resampled_patients():
    """Perfectly separated scores with a gap: Youden's choice on any resample is the lowest positive score
    drawn, so the interval lies within the positives' scores and starts at the chosen point; the same seed
    gives the same interval. Two flat-J candidates far apart (scores that barely separate) give a wide one."""
    y = np.r_[np.zeros(30), np.ones(30)]
    s = np.r_[np.linspace(0.05, 0.35, 30), np.linspace(0.65, 0.95, 30)]
    points = m.choose_thresholds(np.c_[y], np.c_[s], labels=("any",), method="youden", n_bootstrap=300, seed=1)
    d = points.details["any"]
    assert points.thresholds["any"] == pytest.approx(0.65)
    lo, hi = d["threshold_ci"]
    assert lo == pytest.approx(0.65) and 0.65 <= hi <= 0.95 and d["threshold_bootstrap"] == 300
    again = m.choose_thresholds(np.c_[y], np.c_[s], labels=("any",), method="youden", n_bootstrap=300, seed=1)
    assert again.details["any"]["threshold_ci"] == d["threshold_ci"]
    assert "threshold_ci" not in m.choose_thresholds(np.c_[y], np.c_[s], labels=("any",)).details["any"]
    # each row a patient by default; with groups, whole patients are drawn: with one patient per class, a
    # resample draws the same patient twice about half the time, and then lacks a class
    groups = np.r_[np.zeros(30), np.ones(30)]
    grouped = m.choose_thresholds(np.c_[y], np.c_[s], labels=("any",), n_bootstrap=200, groups=groups)
    assert grouped.details["any"]["threshold_bootstrap"] < 150
    # nearly flat J: alternating scores in the middle; the interval spans much of the range
    y2 = np.r_[np.zeros(20), np.ones(20)]
    s2 = np.r_[np.linspace(0.0, 0.6, 20), np.linspace(0.4, 1.0, 20)]
    wide = m.choose_thresholds(np.c_[y2], np.c_[s2], labels=("any",), n_bootstrap=500).details["any"]
    assert wide["threshold_ci"][1] - wide["threshold_ci"][0] > 0.1
    with pytest.raises(ValueError, match="n_bootstrap"):
        m.choose_thresholds(np.c_[y], np.c_[s], labels=("any",), n_bootstrap=-1)


@pytest.mark.parametrize("method", ["youden", "sensitivity"])
def test_weighted_threshold_equals_the_resample_itself(method):
    """A resample as row weights (how the interval is computed, without copies) chooses the threshold the
    resampled rows themselves give."""
    y, p, _ = random_case(3, ties=True)
    rng = np.random.default_rng(5)
    for _ in range(20):
        idx = rng.integers(0, len(y), len(y))
        w = np.bincount(idx, minlength=len(y))
        assert m.choose_threshold(y, p, method=method, target=0.8, sample_weight=w)[0] == \
            m.choose_threshold(y[idx], p[idx], method=method, target=0.8)[0]


def test_youden_median_is_the_median_of_youdens_choices_on_copied_resamples():
    """youden-median by hand: copy each patient resample's rows, take Youden's threshold by brute force,
    and the median of those is the point; its sensitivity and specificity are the whole sample's at it,
    and the single sample's own choice is kept beside it."""
    y, p, _ = random_case(4, n=120)
    groups = np.arange(len(y)) // 2  # two rows per patient: whole patients are drawn
    points = m.choose_thresholds(np.c_[y], np.c_[p], labels=("any",), method="youden-median", n_bootstrap=60,
                                 seed=3, groups=groups)
    by_hand = []
    for w in m.patient_resamples(groups, 60, 3):
        rows = np.repeat(np.arange(len(y)), w.astype(int))
        by_hand.append(brute_force(y[rows], p[rows], "youden"))
    t = points.thresholds["any"]
    d = points.details["any"]
    assert t == pytest.approx(np.median(by_hand)) and d["threshold_bootstrap"] == 60
    assert d["threshold_median"] == pytest.approx(t)  # youden's own file carries the same median beside its point
    plain = m.choose_thresholds(np.c_[y], np.c_[p], labels=("any",), n_bootstrap=60, seed=3, groups=groups)
    assert plain.details["any"]["threshold_median"] == pytest.approx(t)
    assert plain.thresholds["any"] == pytest.approx(d["youden_point"])
    assert d["youden_point"] == pytest.approx(brute_force(y, p, "youden"))
    assert d["sensitivity"] == pytest.approx(m.recall(y, p >= t))
    assert d["specificity"] == pytest.approx(((p < t) & (y == 0)).sum() / (y == 0).sum())
    assert d["threshold_ci"][0] <= t <= d["threshold_ci"][1] and points.method == "youden-median"


def test_youden_median_moves_less_than_youden_from_one_validation_draw_to_the_next():
    """Forty validation sets of 150 cases drawn from one population whose J is nearly flat near its top
    (binormal scores, positives one SD above): the single-sample Youden point scatters across draws more
    than the median of its resampled choices does, though by less than one might hope."""
    rng = np.random.default_rng(11)
    single, median = [], []
    for _ in range(40):
        y = (rng.random(150) < 0.4).astype(int)
        s = 1 / (1 + np.exp(-(rng.normal(size=150) + 1.0 * y)))
        pts = m.choose_thresholds(np.c_[y], np.c_[s], labels=("any",), method="youden-median", n_bootstrap=200,
                                  seed=0)
        single.append(pts.details["any"]["youden_point"])
        median.append(pts.thresholds["any"])
    # about a sixth less scatter on this population (0.066 against 0.078), and nearer its own best point
    # (equal variances: J peaks midway, at a logit of 0.5)
    assert np.std(median) < 0.9 * np.std(single)
    best = 1 / (1 + np.exp(-0.5))
    assert np.mean((np.array(median) - best) ** 2) < np.mean((np.array(single) - best) ** 2)


def test_youden_median_needs_resamples_and_keeps_youdens_point_where_few_choose():
    y = np.r_[np.zeros(30), np.ones(30)]
    s = np.r_[np.linspace(0.05, 0.35, 30), np.linspace(0.65, 0.95, 30)]
    with pytest.raises(ValueError, match="needs resamples"):
        m.choose_thresholds(np.c_[y], np.c_[s], labels=("any",), method="youden-median")
    # a single resample is too few for an interval (percentile_ci's rule), so too few for a median: Youden's
    # own point is kept, and the note says why
    pts = m.choose_thresholds(np.c_[y], np.c_[s], labels=("any",), method="youden-median", n_bootstrap=1, seed=2)
    assert pts.thresholds["any"] == pytest.approx(0.65) and pts.details["any"]["threshold_median"] is None
    assert "Youden's own point kept" in pts.notes["any"] and pts.details["any"]["youden_point"] == pts.thresholds["any"]
    with pytest.raises(ValueError, match="expected youden or sensitivity"):
        m.choose_threshold(y, s, method="youden-median")
