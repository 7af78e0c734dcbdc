"""Evaluation: the paper's Table 1, the RSNA weighted log loss, patient bootstrap CIs, operating points.

numpy, pandas and scikit-learn only (never torch), so scoring a CSV of predictions needs no model.

Definitions used throughout (``docs/evaluation.md`` has the long form):

* A case is called positive when ``prob >= threshold`` (default 0.5 for every label).
* ACC = (TP + TN) / n, PREC = TP / (TP + FP), REC = TP / (TP + FN), AUC = area under the ROC curve
  (ties count one half), LOG_LOSS = mean binary cross-entropy of the label with probabilities clipped to
  ``[EPS, 1 - EPS]``, ``EPS = 1e-15``.
* Weighted log loss (RSNA 2019): for each row (image or series) the weighted mean over the six labels of
  the binary cross-entropy, with weight 2 for ``any`` and 1 for each subtype (``ichscan.labels``), then the
  mean over rows: ``L = mean_i [ sum_l w_l * ll_il / sum_l w_l ]``.
* Undefined values are NA (``None``) with a reason: AUC and REC need a positive case, AUC needs a negative
  one, PREC needs a positive call. Nothing here raises because a label lacks a class.
* AUC among bleeds (``auc_given_any``, subtypes only): the subtype's AUC over the rows whose ``any`` label
  is 1, so it says whether the model tells *which* bleed it is, not whether there is one. A subtype's plain
  AUC mixes the two: bleed-free rows are most of its negatives, and a model that ranks every bleed above
  every bleed-free row scores well on each subtype while knowing nothing of which it is.
* 95% CIs are percentile intervals over bootstrap resamples of *patients*: each resample draws as many
  patients as there are, with replacement, and takes all of their rows; rows of one patient never split.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from ichscan.errors import DataError
from ichscan.fileio import write_text
from ichscan.labels import LABELS, loss_weights
from ichscan.thresholds import CALL_RULES, load_thresholds, resolve_thresholds

log = logging.getLogger(__name__)

EPS = 1e-15
METRICS: tuple[str, ...] = ("acc", "prec", "rec", "auc", "log_loss")
THRESHOLD_METHODS: tuple[str, ...] = ("youden", "youden-median", "sensitivity")

# --------------------------------------------------------------------------------------------------
# Metric arithmetic. Every function takes optional sample weights: the bootstrap expresses a resample
# as integer weights (how many times each row was drawn), so point estimates and resamples share code.
# Undefined values come back as NaN here; the Table 1 layer turns them into NA with a reason.
# --------------------------------------------------------------------------------------------------


def _vectors(y_true, y_other, sample_weight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    other = np.asarray(y_other, dtype=np.float64).ravel()
    if y.shape != other.shape:
        raise ValueError(f"y_true has {y.size} values but the other array has {other.size}")
    w = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).ravel()
    if w.shape != y.shape:
        raise ValueError(f"sample_weight has {w.size} values, expected {y.size}")
    return y, other, w


class Confusion(NamedTuple):
    """Confusion counts of one label at one threshold (floats when weighted)."""

    tp: float
    fp: float
    fn: float
    tn: float

    @property
    def n(self) -> float:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.n)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return _ratio(self.tn, self.tn + self.fp)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def confusion_counts(y_true, y_pred, sample_weight=None) -> Confusion:
    """TP, FP, FN, TN of binary truth against binary calls."""
    y, p, w = _vectors(y_true, y_pred, sample_weight)
    return Confusion(
        tp=float(np.sum(w * y * p)),
        fp=float(np.sum(w * (1 - y) * p)),
        fn=float(np.sum(w * y * (1 - p))),
        tn=float(np.sum(w * (1 - y) * (1 - p))),
    )


def precision(y_true, y_pred, sample_weight=None) -> float:
    """TP / (TP + FP); NaN when nothing is called positive."""
    return confusion_counts(y_true, y_pred, sample_weight).precision


def recall(y_true, y_pred, sample_weight=None) -> float:
    """TP / (TP + FN), i.e. sensitivity; NaN when there is no positive case."""
    return confusion_counts(y_true, y_pred, sample_weight).recall


def auc_ranked(inverse: np.ndarray, n_unique: int, y: np.ndarray, w: np.ndarray) -> float:
    """AUC from scores already reduced to sorted unique values (``inverse`` indexes them, as
    ``np.unique(scores, return_inverse=True)`` gives): rank once, then score many resamples (weights ``w``)
    of the same rows cheaply, as the patient bootstrap and ``ichscan.comparison`` do."""
    pos = np.bincount(inverse, weights=w * y, minlength=n_unique)
    neg = np.bincount(inverse, weights=w * (1.0 - y), minlength=n_unique)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos <= 0 or n_neg <= 0:
        return math.nan
    # Each positive beats the negatives scored strictly below it and ties with those at its score.
    neg_below = np.cumsum(neg) - neg
    return float(np.sum(pos * (neg_below + 0.5 * neg)) / (n_pos * n_neg))


def roc_auc(y_true, y_score, sample_weight=None) -> float:
    """Area under the ROC curve (Mann-Whitney form, ties count 1/2); NaN without both classes."""
    y, s, w = _vectors(y_true, y_score, sample_weight)
    unique, inverse = np.unique(s, return_inverse=True)
    return auc_ranked(inverse.ravel(), unique.size, y, w)


def _row_log_loss(y: np.ndarray, p: np.ndarray, eps: float = EPS) -> np.ndarray:
    p = np.clip(p, eps, 1.0 - eps)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def log_loss(y_true, y_prob, sample_weight=None, eps: float = EPS) -> float:
    """Mean binary cross-entropy (natural log), probabilities clipped to ``[eps, 1 - eps]``."""
    y, p, w = _vectors(y_true, y_prob, sample_weight)
    return _ratio(float(np.sum(w * _row_log_loss(y, p, eps))), float(np.sum(w)))


def weighted_log_loss(
    y_true,
    y_prob,
    *,
    labels: Sequence[str] = LABELS,
    weights: Sequence[float] | None = None,
    sample_weight=None,
    eps: float = EPS,
) -> float:
    """RSNA 2019 weighted multi-label log loss of ``(n, n_labels)`` arrays in ``labels`` order.

    Per row, the ``weights``-weighted mean over labels of the clipped binary cross-entropy (weights from
    ``ichscan.labels.loss_weights``: 2 for ``any``, 1 otherwise); then the mean over rows.
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape or y.shape[1] != len(labels):
        raise ValueError(f"expected two (n, {len(labels)}) arrays, got {y.shape} and {p.shape}")
    per_row = weighted_log_loss_rows(y, p, labels=labels, weights=weights, eps=eps)
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    return _ratio(float(np.sum(w * per_row)), float(np.sum(w)))


def weighted_log_loss_rows(y: np.ndarray, p: np.ndarray, *, labels: Sequence[str] = LABELS,
                           weights: Sequence[float] | None = None, eps: float = EPS) -> np.ndarray:
    """Each row's term of the weighted log loss (its ``weights``-weighted mean cross-entropy over labels), so
    that a bootstrap re-weights rows without recomputing logarithms."""
    wl = np.asarray(loss_weights(tuple(labels)) if weights is None else weights, dtype=np.float64)
    return _row_log_loss(y, p, eps) @ wl / wl.sum()


def patient_resamples(groups, n_bootstrap: int, seed: int) -> Iterator[np.ndarray]:
    """Row weights of ``n_bootstrap`` resamples of patients (``np.random.default_rng(seed)``): each draws as
    many patients as there are, with replacement, and a patient drawn k times weighs all of its rows k.
    ``groups`` gives each row's patient. The one resampling scheme of Table 1 and of paired comparisons.

    Patients are numbered in sorted order of their IDs, not in the order their rows come, so the same
    rows in another order (a shuffled or re-sorted file) give the same resamples and the same intervals."""
    ids = np.asarray(groups)
    codes, uniques = pd.factorize(ids.astype(str) if ids.dtype == object else ids, sort=True)
    n_units = len(uniques)
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        yield np.bincount(rng.integers(0, n_units, n_units), minlength=n_units)[codes].astype(np.float64)


def confusion_from_summary(
    pos: int, neg: int, precision: float | None, recall: float | None, *, decimals: int | None = None
) -> Confusion:
    """Recover integer TP, FP, FN, TN from a published table's POS, NEG, PREC and REC.

    TP is the count in ``0..pos`` whose ``TP/pos`` is closest to ``recall``; FP the count in ``0..neg``
    whose ``TP/(TP+FP)`` is closest to ``precision``. ``precision`` None or NaN means nothing was called
    positive (FP = 0, and then TP must be 0). With ``decimals`` (the table's rounding), the recovered
    counts must round back to the published values, else ValueError: the numbers are inconsistent.
    """
    pos, neg = int(pos), int(neg)
    if pos < 0 or neg < 0:
        raise ValueError("pos and neg must be non-negative counts")
    if recall is None or (isinstance(recall, float) and math.isnan(recall)) or pos == 0:
        tp = 0
    else:
        tp = int(np.argmin(np.abs(np.arange(pos + 1) / pos - float(recall))))
    if precision is None or (isinstance(precision, float) and math.isnan(precision)):
        if tp:
            raise ValueError(f"precision is undefined but recall {recall} implies TP = {tp} > 0")
        fp = 0
    else:
        fps = np.arange(neg + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            prec = np.where(tp + fps > 0, tp / np.maximum(tp + fps, 1), np.nan)
        fp = int(np.nanargmin(np.abs(prec - float(precision))))
    counts = Confusion(tp=tp, fp=fp, fn=pos - tp, tn=neg - fp)
    if decimals is not None:
        checks = {"recall": (recall, counts.recall if pos else math.nan),
                  "precision": (precision, counts.precision)}
        for name, (published, recovered) in checks.items():
            if published is None or math.isnan(float(published)):
                continue
            if round(recovered, decimals) != round(float(published), decimals):
                raise ValueError(
                    f"no integer counts with POS={pos}, NEG={neg} give {name} {published} at "
                    f"{decimals} decimals (closest: {recovered:.{decimals + 2}f})"
                )
    return counts


# --------------------------------------------------------------------------------------------------
# Table 1 with bootstrap confidence intervals
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its CI. ``value`` None is NA; ``reason`` says why (value or CI missing)."""

    value: float | None
    low: float | None = None
    high: float | None = None
    reason: str | None = None
    n_resamples: int = 0  # bootstrap resamples in which the metric was defined

    @property
    def na(self) -> bool:
        return self.value is None

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "low": self.low, "high": self.high, "reason": self.reason,
                "n_resamples": self.n_resamples}


@dataclass(frozen=True)
class LabelMetrics:
    """One row of Table 1."""

    label: str
    threshold: float
    n: int
    pos: int
    neg: int
    tp: int
    fp: int
    fn: int
    tn: int
    acc: Estimate
    prec: Estimate
    rec: Estimate
    auc: Estimate
    log_loss: Estimate
    auc_given_any: Estimate | None = None  # subtypes only, where ``any`` is among the labels

    @property
    def pos_pct(self) -> float:
        return 100.0 * self.pos / self.n if self.n else math.nan

    @property
    def neg_pct(self) -> float:
        return 100.0 * self.neg / self.n if self.n else math.nan

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label, "threshold": self.threshold, "n": self.n,
            "pos": self.pos, "pos_pct": self.pos_pct, "neg": self.neg, "neg_pct": self.neg_pct,
            "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
        }
        for name in METRICS:
            out[name] = getattr(self, name).to_dict()
        if self.auc_given_any is not None:
            out["auc_given_any"] = self.auc_given_any.to_dict()
        return out


@dataclass(frozen=True)
class Evaluation:
    """Everything evaluate computed, plus the arrays the ROC figure and HTML report are drawn from.

    ``y_true`` and ``y_prob`` are ``(n, len(labels))`` in ``labels`` order; ``groups`` holds the
    resampling unit of each row (the patient ID, or the row itself when no patient is known).
    """

    labels: tuple[str, ...]
    per_label: tuple[LabelMetrics, ...]
    weighted_log_loss: Estimate
    thresholds: dict[str, float]
    y_true: np.ndarray
    y_prob: np.ndarray
    groups: np.ndarray
    ids: np.ndarray
    level: str = "rows"
    resampling_unit: str = "patient"
    n_units: int = 0
    n_bootstrap: int = 0
    ci: float = 0.95
    seed: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    calls: str = "independent"  # thresholds.CALL_RULES

    def __getitem__(self, label: str) -> LabelMetrics:
        for row in self.per_label:
            if row.label == label:
                return row
        raise KeyError(f"unknown label {label!r}; expected one of {', '.join(self.labels)}")

    @property
    def n(self) -> int:
        return int(self.y_true.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-row arrays)."""
        return {
            "level": self.level,
            "n": self.n,
            "resampling_unit": self.resampling_unit,
            "n_units": self.n_units,
            "bootstrap": {"n": self.n_bootstrap, "ci": self.ci, "seed": self.seed, "method": "percentile"},
            "labels": list(self.labels),
            "thresholds": dict(self.thresholds),
            "calls": self.calls,
            "decision_rule": CALL_RULES[self.calls],
            "weighted_log_loss": self.weighted_log_loss.to_dict(),
            "loss_weights": dict(zip(self.labels, loss_weights(self.labels))),
            "eps": EPS,
            "per_label": [row.to_dict() for row in self.per_label],
            "source": dict(self.source),
        }


def apply_thresholds(
    y_prob, thresholds: float | Mapping[str, float] | None = None, labels: Sequence[str] = LABELS
) -> np.ndarray:
    """0/1 calls of ``(n, len(labels))`` probabilities: positive when ``prob >= threshold``."""
    p = np.asarray(y_prob, dtype=np.float64)
    t = resolve_thresholds(thresholds, labels)
    return (p >= np.array([t[name] for name in labels])).astype(np.int8)


def _as_matrix(values, labels: Sequence[str], what: str) -> np.ndarray:
    if isinstance(values, pd.DataFrame):
        missing = [name for name in labels if name not in values.columns]
        if missing:
            raise ValueError(f"{what} lacks columns {', '.join(missing)}")
        values = values[list(labels)].to_numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1 and len(labels) == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] != len(labels):
        raise ValueError(f"{what} must be (n, {len(labels)}) in label order {tuple(labels)}, got {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{what} contains NaN")
    return arr


def _undefined_reasons(c: Confusion, label: str, threshold: float) -> dict[str, str | None]:
    no_pos = f"no positive cases of {label}"
    no_neg = f"no negative cases of {label}"
    return {
        "acc": None if c.n > 0 else "no cases",
        "prec": None if c.tp + c.fp > 0 else f"no case called positive at threshold {threshold:g}: "
                                              "precision undefined",
        "rec": None if c.tp + c.fn > 0 else f"{no_pos}: recall undefined",
        "auc": None if (c.tp + c.fn > 0 and c.tn + c.fp > 0)
        else f"{no_pos if c.tp + c.fn == 0 else no_neg}: AUC undefined",
        "log_loss": None if c.n > 0 else "no cases",
    }


def percentile_ci(
    samples: np.ndarray, ci: float, n_bootstrap: int
) -> tuple[float | None, float | None, int, str | None]:
    """The ``ci`` percentile interval of a metric's bootstrap ``samples`` (NaN where a resample left it
    undefined): (low, high, resamples that defined it, why not given). Withheld when fewer than half the
    ``n_bootstrap`` resamples define the metric; (None, None, 0, None) without a bootstrap."""
    valid = samples[~np.isnan(samples)]
    if n_bootstrap == 0:
        return None, None, 0, None
    # Fewer than half the resamples defining the metric: the interval would describe a different population.
    if valid.size < max(2, n_bootstrap // 2):
        return None, None, int(valid.size), (
            f"CI not given: metric defined in only {valid.size} of {n_bootstrap} resamples")
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(valid, [alpha, 1.0 - alpha])
    return float(low), float(high), int(valid.size), None


def evaluate(
    y_true,
    y_prob,
    *,
    groups=None,
    ids=None,
    labels: Sequence[str] = LABELS,
    thresholds: float | Mapping[str, float] | None = 0.5,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    level: str = "rows",
    source: Mapping[str, Any] | None = None,
    calls: str = "independent",
) -> Evaluation:
    """Table 1 for ``(n, len(labels))`` truth and probabilities (arrays or DataFrames with label columns).

    ``groups`` gives each row's patient; the bootstrap resamples patients with replacement
    (``n_bootstrap`` times, ``np.random.default_rng(seed)``) and reports percentile ``ci`` intervals.
    Without ``groups`` each row is its own unit. Labels lacking a class give NA, with the reason.
    ``calls`` (``thresholds.CALL_RULES``): ``independent``, each label at its threshold alone, as the paper's
    Table 1; ``hierarchical``, a subtype only where ``any`` is called too, as ``ichscan predict`` calls
    (needs ``any`` among the labels). ACC, PREC and REC follow it; AUC and LOG_LOSS do not depend on calls.
    """
    labels = tuple(labels)
    y = _as_matrix(y_true, labels, "y_true")
    p = _as_matrix(y_prob, labels, "y_prob")
    if y.shape != p.shape:
        raise ValueError(f"y_true is {y.shape} but y_prob is {p.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold only 0 and 1")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("y_prob must lie in [0, 1]")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    if n_bootstrap < 0:
        raise ValueError("n_bootstrap must be >= 0")
    n = len(y)
    if n == 0:
        raise ValueError("no rows to evaluate")
    if groups is None:
        groups_arr = np.arange(n).astype(str)
        unit = "row"
    else:
        groups_arr = np.asarray(groups).astype(str)
        if groups_arr.shape != (n,):
            raise ValueError(f"groups has {groups_arr.size} values, expected {n}")
        unit = "patient"
    ids_arr = np.arange(n).astype(str) if ids is None else np.asarray(ids).astype(str)
    t = resolve_thresholds(thresholds, labels)
    if calls not in CALL_RULES:
        raise ValueError(f"calls must be one of {', '.join(CALL_RULES)}, got {calls!r}")
    if calls == "hierarchical" and "any" not in labels:
        raise ValueError("hierarchical calls need the label 'any'")
    call_rule = calls
    calls = (p >= np.array([t[name] for name in labels])).astype(np.float64)
    if call_rule == "hierarchical":  # thresholds.hierarchical_calls, for every row at once
        gate = calls[:, labels.index("any")].copy()
        calls *= np.where(np.array([name == "any" for name in labels]), 1.0, gate[:, None])

    # Per-row quantities that every resample re-weights.
    ll = _row_log_loss(y, p)
    wll_row = weighted_log_loss_rows(y, p, labels=labels)
    tp_row, fp_row = y * calls, (1 - y) * calls
    fn_row = y * (1 - calls)
    ranked = []
    for j in range(len(labels)):
        unique, inverse = np.unique(p[:, j], return_inverse=True)
        ranked.append((inverse.ravel(), unique.size))

    def stats(w: np.ndarray) -> tuple[np.ndarray, float]:
        """(len(labels), 5) metrics in METRICS order, and the weighted log loss, for row weights w."""
        total = w.sum()
        tp, fp, fn = w @ tp_row, w @ fp_row, w @ fn_row
        tn = total - tp - fp - fn
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.column_stack([
                (tp + tn) / total,
                np.where(tp + fp > 0, tp / (tp + fp), np.nan),
                np.where(tp + fn > 0, tp / (tp + fn), np.nan),
                [auc_ranked(inv, k, y[:, j], w) for j, (inv, k) in enumerate(ranked)],
                (w @ ll) / total,
            ])
        return out, float(w @ wll_row / total)

    # Each subtype's AUC among the rows with a bleed (any = 1): weights zero the bleed-free rows.
    given = [j for j, name in enumerate(labels) if name != "any"] if "any" in labels else []
    bleed = y[:, labels.index("any")] if given else None

    def stats_given(w: np.ndarray) -> np.ndarray:
        return np.array([auc_ranked(ranked[j][0], ranked[j][1], y[:, j], w * bleed) for j in given])

    point, point_wll = stats(np.ones(n))
    point_given = stats_given(np.ones(n))
    n_units = len(pd.unique(groups_arr))
    boot = np.full((n_bootstrap, len(labels), len(METRICS)), np.nan)
    boot_wll = np.full(n_bootstrap, np.nan)
    boot_given = np.full((n_bootstrap, len(given)), np.nan)
    for b, w in enumerate(patient_resamples(groups_arr, n_bootstrap, seed)):
        boot[b], boot_wll[b] = stats(w)
        boot_given[b] = stats_given(w)

    rows = []
    for j, name in enumerate(labels):
        c = confusion_counts(y[:, j], calls[:, j])
        reasons = _undefined_reasons(c, name, t[name])
        est = {}
        for m, metric in enumerate(METRICS):
            if reasons[metric] is not None or math.isnan(point[j, m]):
                est[metric] = Estimate(None, reason=reasons[metric] or "undefined")
                continue
            low, high, k, why = percentile_ci(boot[:, j, m], ci, n_bootstrap)
            est[metric] = Estimate(float(point[j, m]), low, high, why, k)
        if j in given:
            g = given.index(j)
            n_with = int(np.sum(bleed * y[:, j]))
            n_without = int(np.sum(bleed * (1 - y[:, j])))
            if n_with == 0 or n_without == 0:
                why = f"no positive cases of {name}" if n_with == 0 else f"every case of any has {name}"
                est["auc_given_any"] = Estimate(None, reason=f"{why}: AUC among bleeds undefined")
            else:
                low, high, k, why = percentile_ci(boot_given[:, g], ci, n_bootstrap)
                est["auc_given_any"] = Estimate(float(point_given[g]), low, high, why, k)
        rows.append(LabelMetrics(
            label=name, threshold=t[name], n=n, pos=int(c.tp + c.fn), neg=int(c.tn + c.fp),
            tp=int(c.tp), fp=int(c.fp), fn=int(c.fn), tn=int(c.tn), **est,
        ))
    low, high, k, why = percentile_ci(boot_wll, ci, n_bootstrap)
    wll = Estimate(point_wll, low, high, why, k) if n else Estimate(None, reason="no cases")
    return Evaluation(
        labels=labels, per_label=tuple(rows), weighted_log_loss=wll, thresholds=t,
        y_true=y.astype(np.int8), y_prob=p, groups=groups_arr, ids=ids_arr, level=level,
        resampling_unit=unit, n_units=n_units, n_bootstrap=n_bootstrap, ci=ci, seed=seed,
        source=dict(source or {}), calls=call_rule,
    )


# --------------------------------------------------------------------------------------------------
# Operating points: per-label thresholds chosen on a validation set
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatingPoints:
    """Per-label thresholds and how they were chosen; ``notes`` explains any label left at the default."""

    method: str
    thresholds: dict[str, float]
    target: float | None = None
    details: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target": self.target,
            "decision_rule": "positive when prob >= threshold",
            "thresholds": dict(self.thresholds),
            "details": self.details,
            "notes": self.notes,
            "source": self.source,
        }


def choose_threshold(
    y_true, y_score, *, method: str = "youden", target: float = 0.9, sample_weight=None
) -> tuple[float, dict[str, float]]:
    """One label's threshold on validation data, with the sensitivity and specificity it gives there.

    ``youden``: the threshold maximising J = sensitivity + specificity - 1 (ties: the highest threshold).
    ``sensitivity``: the highest threshold whose sensitivity is at least ``target``.
    Thresholds are observed scores, so ``prob >= threshold`` reproduces the validation operating point.
    The details also carry the data's AUC and its number of positive cases, so a caller can tell a threshold
    chosen on scores that separate the label from one that only the rule picked (see ``choose_thresholds``).
    Raises ValueError when the data lack a positive or a negative case. ``sample_weight`` (rows weighing
    0 count as absent) is how a bootstrap resample is scored without copying rows.
    """
    from sklearn.metrics import roc_curve

    y, s, w = _vectors(y_true, y_score, sample_weight)
    if sample_weight is not None:
        kept = w > 0
        y, s, w = y[kept], s[kept], w[kept]
    if y.sum() == 0 or y.sum() == y.size:
        raise ValueError(f"needs positive and negative cases (has {int(y.sum())} of {y.size} positive)")
    fpr, tpr, thr = roc_curve(y, s, sample_weight=w, drop_intermediate=False)
    # Index 0 is sklearn's "call nothing positive" point with an infinite threshold; never choose it.
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]
    if method == "youden":
        i = int(np.argmax(tpr - fpr))  # thresholds decrease, so argmax's first hit is the highest
    elif method == "sensitivity":
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target sensitivity must lie in (0, 1], got {target}")
        i = int(np.flatnonzero(tpr >= target - 1e-12)[0])
    else:  # youden-median resamples this function; it is choose_thresholds'
        raise ValueError(f"unknown method {method!r}; expected youden or sensitivity")
    t = float(np.clip(thr[i], 0.0, 1.0))
    return t, {"sensitivity": float(tpr[i]), "specificity": float(1.0 - fpr[i]),
               "youden_j": float(tpr[i] - fpr[i]), "auc": roc_auc(y, s),
               "positives": int(y.sum()), "negatives": int(y.size - y.sum())}


def threshold_method_problem(method: str, n_bootstrap: int) -> str | None:
    """Why ``choose_thresholds`` cannot use ``method`` with ``n_bootstrap`` resamples, or None: the one check
    that callers (``ichscan thresholds``, ``ichscan crossval`` before any fold trains) make early."""
    if method == "youden-median" and n_bootstrap == 0:
        return ("youden-median is the median of Youden's choices over resampled patients; it needs resamples "
                "(--bootstrap > 0, e.g. 1000)")
    return None


def choose_thresholds(
    y_true,
    y_prob,
    *,
    labels: Sequence[str] = LABELS,
    method: str = "youden",
    target: float = 0.9,
    default: float = 0.5,
    source: Mapping[str, Any] | None = None,
    n_bootstrap: int = 0,
    ci: float = 0.95,
    seed: int = 0,
    groups=None,
) -> OperatingPoints:
    """Per-label thresholds (see ``choose_threshold``); a label without both classes keeps ``default``.

    A label whose scores rank positives no better than chance on these data (AUC <= 0.5) still gets the
    method's threshold, but with a note and a warning: there Youden's J is largest at a near-zero threshold
    that calls almost everything positive, which is the rule working, not an operating point to rely on.

    With ``n_bootstrap`` > 0 each label's details also give ``threshold_ci``: the ``ci`` percentile interval
    of the thresholds the same method chooses on resamples of the patients (``groups``, one per row; each
    row its own patient when None; ``patient_resamples`` with ``seed``). On a few dozen validation series
    Youden's J is often nearly flat over a wide range of thresholds, and the interval shows how far the
    chosen point could have fallen with other cases.

    ``youden-median`` (needs ``n_bootstrap`` > 0): each label's threshold is the median of the thresholds
    Youden's J chooses on those resamples, a bagged Youden point; the details keep the single sample's
    choice as ``youden_point``. Where J is nearly flat the single argmax lands anywhere on the plateau, and
    which end depends on a few cases; the median of the resamples' choices depends on them less.
    """
    labels = tuple(labels)
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(THRESHOLD_METHODS)}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be 0 or more, got {n_bootstrap}")
    if problem := threshold_method_problem(method, n_bootstrap):
        raise ValueError(problem)
    # youden-median resamples Youden's J itself; the interval is always of the single-sample rule's choices
    rule = "youden" if method == "youden-median" else method
    y = _as_matrix(y_true, labels, "y_true")
    p = _as_matrix(y_prob, labels, "y_prob")
    units = np.arange(len(y)) if groups is None else groups
    thresholds, details, notes = {}, {}, {}
    for j, name in enumerate(labels):
        try:
            thresholds[name], details[name] = choose_threshold(y[:, j], p[:, j], method=rule, target=target)
            if n_bootstrap:
                chosen = _bootstrap_choices(y[:, j], p[:, j], units, n_bootstrap, seed, rule, target)
                details[name].update(_threshold_interval(chosen, n_bootstrap, ci))
            if method == "youden-median":
                thresholds[name], note = _median_point(y[:, j], p[:, j], thresholds[name], details[name])
                if note:
                    notes[name] = note
                    log.warning("threshold for %s: %s", name, note)
            if details[name]["auc"] <= 0.5:
                notes[name] = (f"unreliable: the scores do not separate {name} here (AUC "
                               f"{details[name]['auc']:.3f}, {details[name]['positives']} positive of "
                               f"{details[name]['positives'] + details[name]['negatives']}); threshold "
                               f"{thresholds[name]:.4g} calls {1 - details[name]['specificity']:.0%} of the "
                               f"negatives positive")
                log.warning("threshold for %s: %s", name, notes[name])
        except ValueError as err:
            thresholds[name] = float(default)
            notes[name] = f"kept default {default:g}: {err}"
            log.warning("threshold for %s: %s", name, notes[name])
    return OperatingPoints(method=method, thresholds=thresholds,
                           target=target if method == "sensitivity" else None,
                           details=details, notes=notes, source=dict(source or {}))


def _bootstrap_choices(y: np.ndarray, s: np.ndarray, groups, n_bootstrap: int, seed: int, method: str,
                       target: float) -> np.ndarray:
    """The threshold ``method`` chooses on each of ``patient_resamples(groups, n_bootstrap, seed)`` (the same
    resamples for every label); NaN where a resample lacks a positive or a negative case."""
    chosen = np.full(n_bootstrap, np.nan)
    for k, w in enumerate(patient_resamples(groups, n_bootstrap, seed)):
        with contextlib.suppress(ValueError):
            chosen[k] = choose_threshold(y, s, method=method, target=target, sample_weight=w)[0]
    return chosen


def _median_point(y: np.ndarray, s: np.ndarray, single: float, details: dict[str, Any]) -> tuple[float, str | None]:
    """``youden-median``'s threshold: ``threshold_median``, the median of the resamples' Youden choices
    (``_threshold_interval``). Youden's J is often nearly flat over a wide range, so the single sample's
    argmax (``single``) jumps between far-apart thresholds from one validation draw to the next; the median
    moved a third as far across three draws of 400 phantom series (docs/training.md). ``details`` gain
    ``youden_point`` (``single``) and describe the median's operating point on the whole sample. Where too few
    resamples choose a threshold for an interval, ``single`` is kept, with a note."""
    details["youden_point"] = single
    t = details.get("threshold_median")
    if t is None:
        return single, (f"youden-median: only {details.get('threshold_bootstrap', 0)} resamples chose a "
                        "threshold; Youden's own point kept")
    called = s >= t
    sens, spec = float(called[y == 1].mean()), float(1.0 - called[y == 0].mean())
    details.update(sensitivity=sens, specificity=spec, youden_j=sens + spec - 1.0)
    return t, None


def _threshold_interval(chosen: np.ndarray, n_bootstrap: int, ci: float) -> dict[str, Any]:
    """The ``ci`` interval of the thresholds chosen on the resamples (``_bootstrap_choices``), and their
    median (``threshold_median``): a point at one end of its interval, far from the median, is the draw's
    more than the model's (what ``youden-median`` uses as the point)."""
    low, high, n_valid, why = percentile_ci(chosen, ci, n_bootstrap)
    out: dict[str, Any] = {"threshold_ci": None if low is None else [low, high], "threshold_ci_level": ci,
                           "threshold_bootstrap": n_valid,
                           "threshold_median": None if low is None else float(np.nanmedian(chosen))}
    if why:
        out["threshold_ci_note"] = why
    return out


def save_thresholds(points: OperatingPoints | Mapping[str, float], path: str | os.PathLike) -> Path:
    """Write a thresholds file: JSON ``{"method": ..., "thresholds": {label: t}, ...}``."""
    if not isinstance(points, OperatingPoints):
        points = OperatingPoints(method="manual", thresholds=resolve_thresholds(dict(points), list(points)))
    return write_text(path, json.dumps(points.to_dict(), indent=2) + "\n")


def parse_thresholds(value: str | float | None, labels: Sequence[str] = LABELS) -> dict[str, float]:
    """A number (same threshold for every label) or the path of a thresholds file."""
    if value is None:
        return resolve_thresholds(None, labels)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return load_thresholds(value, labels)
    try:
        return resolve_thresholds(number, labels)
    except ValueError as err:
        raise DataError(str(err)) from None


# --------------------------------------------------------------------------------------------------
# Reading predictions and labels (formats in docs/contracts.md)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalData:
    """Predictions joined to labels: rows in a fixed order, ready for ``evaluate``."""

    level: str  # "series" or "slice"
    ids: np.ndarray  # series_uid or image_id per row
    y_true: np.ndarray  # (n, len(labels)) 0/1
    y_prob: np.ndarray  # (n, len(labels))
    groups: np.ndarray | None  # patient per row, None when unknown
    labels: tuple[str, ...] = LABELS
    source: dict[str, Any] = field(default_factory=dict)


def _read_table(path: str | os.PathLike, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found", path)
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:  # pandas raises many kinds; all mean the same to the user
        raise DataError(f"cannot read {what} ({type(err).__name__}: {err})", path) from None
    if frame.empty:
        raise DataError(f"{what} file has no rows", path)
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _require(frame: pd.DataFrame, columns: Sequence[str], path, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what} lacks column(s) {', '.join(missing)}; has {', '.join(frame.columns)}", path)


def _numbers(frame: pd.DataFrame, columns: Sequence[str], path, what: str, binary: bool,
             where: str | None = None) -> np.ndarray:
    """The columns as numbers; a DataError naming the first bad rows by ``where`` (a column of file line
    numbers, or of IDs) when values are missing or out of range."""
    values = frame[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(values).any(axis=1)
    if binary:
        bad |= ~np.isin(values, (0.0, 1.0)).all(axis=1)
        kind = "labels that are not 0 or 1"
    else:
        bad |= ((values < 0) | (values > 1)).any(axis=1)
        kind = "probabilities that are missing or outside [0, 1]"
    if bad.any():
        if where is not None and where.startswith("_line"):
            at = "lines " + ", ".join(str(int(x)) for x in frame.loc[bad, where][:3]) + " of the file"
        elif where is not None:
            at = f"{where} " + ", ".join(str(x) for x in frame.loc[bad, where][:3])
        else:
            at = "rows " + ", ".join(str(i) for i in np.flatnonzero(bad)[:3])
        raise DataError(f"{int(bad.sum())} {what} row(s) have {kind} (first: {at})", path)
    return values


def _unique_ids(frame: pd.DataFrame, column: str, path, what: str) -> None:
    dup = frame[column].duplicated(keep=False)
    if dup.any():
        first = frame.loc[dup, column].unique()[:3].tolist()
        raise DataError(f"{int(frame.loc[dup, column].nunique())} {column} value(s) appear more than "
                        f"once in {what} (e.g. {first})", path)


def _split_rsna_ids(frame: pd.DataFrame, path, labels: Sequence[str], what: str) -> pd.DataFrame:
    """``ID_<image>_<label>,Label`` rows to one row per image_id with a column per label."""
    ids = frame["ID"].astype(str).str.strip()
    parts = ids.str.rsplit("_", n=1, expand=True)
    if parts.shape[1] != 2:
        raise DataError(f"{what}: IDs must look like ID_<image>_<label>", path)
    long = pd.DataFrame({"image_id": parts[0], "label": parts[1], "value": frame["Label"].astype(str).str.strip()})
    unknown = ~long["label"].isin(labels)
    if unknown.any():
        raise DataError(f"{int(unknown.sum())} {what} row(s) name no known label (e.g. "
                        f"{ids[unknown].iloc[0]!r}); labels are {', '.join(labels)}", path)
    # RSNA's stage_2_train.csv repeats some rows verbatim; repeats that disagree are an error.
    long = long.drop_duplicates()
    clash = long.duplicated(["image_id", "label"], keep=False)
    if clash.any():
        raise DataError(f"{int(long.loc[clash, 'image_id'].nunique())} image(s) have conflicting "
                        f"{what} values for the same label (e.g. {long.loc[clash, 'image_id'].iloc[0]})", path)
    wide = long.pivot(index="image_id", columns="label", values="value")
    incomplete = wide.reindex(columns=list(labels)).isna().any(axis=1)
    if incomplete.any():
        raise DataError(f"{int(incomplete.sum())} image(s) lack a {what} row for some label "
                        f"(e.g. {wide.index[incomplete][0]})", path)
    return wide.reindex(columns=list(labels)).reset_index()


def _join(pred: pd.DataFrame, truth: pd.DataFrame, key: str, pred_path, labels_path, unit: str):
    unmatched_pred = ~pred[key].isin(truth[key])
    if unmatched_pred.any():
        first = pred.loc[unmatched_pred, key].head(3).tolist()
        raise DataError(
            f"{int(unmatched_pred.sum())} of {len(pred)} {unit}(s) in the predictions have no row in "
            f"{labels_path} (e.g. {first}); check that predictions and labels come from the same data",
            pred_path)
    unmatched_labels = int((~truth[key].isin(pred[key])).sum())
    if unmatched_labels:
        log.warning("%d of %d %s(s) in %s have no prediction; evaluating the %d that do",
                    unmatched_labels, len(truth), unit, labels_path, len(pred))
    merged = pred.merge(truth, on=key, how="left", suffixes=("", "_truth"), validate="one_to_one")
    return merged, unmatched_labels


def _patients(merged: pd.DataFrame, pred_path, labels_path) -> tuple[np.ndarray | None, str | None]:
    """Patient per row from the labels file (``patient_id_truth``), else the predictions (``patient_id``).

    A source counts only if every row has a value. When both have one and they disagree, the files
    probably describe different data; say so.
    """
    sources = [(c, origin) for c, origin in (("patient_id_truth", labels_path), ("patient_id", pred_path))
               if c in merged.columns and (merged[c].astype(str).str.strip() != "").all()]
    if len(sources) == 2:
        from ichscan.privacy import PREFIX

        differ = merged["patient_id_truth"].astype(str) != merged["patient_id"].astype(str)
        pseudonyms = merged.loc[differ, "patient_id"].astype(str).str.startswith(PREFIX)
        if differ.any() and pseudonyms.all():  # ichscan predict pseudonymises PatientID unless told not to
            log.info("%s carries pseudonymised patient IDs (%s...); patients are taken from %s",
                     pred_path, PREFIX, labels_path)
        elif differ.any():
            log.warning("%d row(s) have a different patient_id in %s than in %s; using the labels' IDs",
                        int(differ.sum()), pred_path, labels_path)
    if not sources:
        return None, None
    column, origin = sources[0]
    return merged[column].astype(str).to_numpy(dtype=str), str(origin)


def detect_level(pred_path: str | os.PathLike, labels_path: str | os.PathLike) -> str:
    """``slice`` when either file is per image (an ``image_id`` or RSNA ``ID`` column), else ``series``."""
    columns = _columns(pred_path, "predictions") | _columns(labels_path, "labels")
    return "slice" if {"image_id", "ID"} & columns else "series"


def _columns(path: str | os.PathLike, what: str) -> set[str]:
    """Column names only: RSNA's label file has millions of rows, not worth reading twice."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found", path)
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return set(pq.read_schema(path).names)
        return {str(c).strip() for c in pd.read_csv(path, nrows=0).columns}
    except Exception as err:
        raise DataError(f"cannot read {what} ({type(err).__name__}: {err})", path) from None


def join_series_labels(
    pred_path: str | os.PathLike, labels_path: str | os.PathLike, *, labels: Sequence[str] = LABELS
) -> EvalData:
    """Series CSV from predict against ``series_labels.csv``, joined on ``series_uid``.

    The patient of each series (the bootstrap unit) comes from the labels file, else the predictions.
    """
    labels = tuple(labels)
    prob_cols = [f"prob_{name}" for name in labels]
    pred = _read_table(pred_path, "series predictions")
    _require(pred, ["series_uid", *prob_cols], pred_path, "series predictions")
    truth = _read_table(labels_path, "series labels")
    _require(truth, ["series_uid", *labels], labels_path, "series labels")
    _unique_ids(pred, "series_uid", pred_path, "the series predictions")
    _unique_ids(truth, "series_uid", labels_path, "the series labels")
    # File line numbers (the header is line 1), so that errors point where a person looks.
    pred = pred.assign(_line_pred=np.arange(len(pred)) + 2)
    truth = truth.assign(_line_truth=np.arange(len(truth)) + 2)
    keep = ["series_uid", *labels, "_line_truth"] + (["patient_id"] if "patient_id" in truth.columns else [])
    truth = truth[keep].rename(columns={"patient_id": "patient_id_truth"})
    merged, unmatched = _join(pred, truth, "series_uid", pred_path, labels_path, "series")
    y_prob = _numbers(merged, prob_cols, pred_path, "series prediction", binary=False, where="_line_pred")
    y_true = _numbers(merged, list(labels), labels_path, "series label", binary=True, where="_line_truth")
    groups, groups_from = _patients(merged, pred_path, labels_path)
    return EvalData(
        level="series", ids=merged["series_uid"].to_numpy(dtype=str), y_true=y_true, y_prob=y_prob,
        groups=groups, labels=labels,
        source={"pred": str(pred_path), "labels": str(labels_path), "key": "series_uid",
                "groups_from": groups_from, "n_pred": len(pred), "n_labels": len(truth), "n_matched": len(merged),
                "n_labels_without_prediction": unmatched},
    )


def join_slice_labels(
    pred_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    *,
    groups_path: str | os.PathLike | None = None,
    labels: Sequence[str] = LABELS,
) -> EvalData:
    """Slice predictions against per-image labels, joined on ``image_id``.

    Predictions: predict's slice CSV (``image_id`` and ``prob_<label>`` columns) or a Kaggle submission
    (``ID,Label`` with ``ID_<image>_<label>``). Labels: RSNA ``ID,Label`` (repeated rows dropped) or a
    table with ``image_id`` and one column per label (the data index). Patients for the bootstrap come
    from a ``patient_id`` column in the labels, the predictions, or ``groups_path`` (any CSV/Parquet with
    ``image_id`` and ``patient_id``, such as the data index); without one each image is its own unit.
    """
    labels = tuple(labels)
    pred = _read_table(pred_path, "slice predictions")
    if "ID" in pred.columns and "Label" in pred.columns:
        pred = _split_rsna_ids(pred, pred_path, labels, "submission")
        pred.columns = ["image_id", *[f"prob_{name}" for name in labels]]
        pred_format = "kaggle_submission"
    else:
        _require(pred, ["image_id", *[f"prob_{name}" for name in labels]], pred_path, "slice predictions")
        _unique_ids(pred, "image_id", pred_path, "the slice predictions")
        pred_format = "slice_csv"
    truth = _read_table(labels_path, "labels")
    if "ID" in truth.columns and "Label" in truth.columns:
        truth = _split_rsna_ids(truth, labels_path, labels, "label")
    else:
        _require(truth, ["image_id", *labels], labels_path, "labels")
        truth = truth.copy()
        truth[list(labels)] = truth[list(labels)].astype(str)
        _unique_ids(truth, "image_id", labels_path, "the labels")
    keep = ["image_id", *labels] + (["patient_id"] if "patient_id" in truth.columns else [])
    truth = truth[keep].rename(columns={"patient_id": "patient_id_truth"})
    merged, unmatched = _join(pred, truth, "image_id", pred_path, labels_path, "image")
    y_prob = _numbers(merged, [f"prob_{name}" for name in labels], pred_path, "slice prediction", binary=False,
                      where="image_id")
    y_true = _numbers(merged, list(labels), labels_path, "label", binary=True, where="image_id")

    groups, groups_from = _patients(merged, pred_path, labels_path)
    if groups is None and groups_path is not None:
        table = _read_table(groups_path, "patient groups")
        _require(table, ["image_id", "patient_id"], groups_path, "patient groups")
        mapping = table.drop_duplicates("image_id").set_index("image_id")["patient_id"].astype(str)
        found = merged["image_id"].map(mapping)
        if found.isna().any():
            raise DataError(f"{int(found.isna().sum())} of {len(merged)} predicted image(s) have no "
                            f"patient_id (e.g. {merged.loc[found.isna(), 'image_id'].iloc[0]})", groups_path)
        groups, groups_from = found.to_numpy(dtype=str), str(groups_path)
    if groups is None:
        log.warning("no patient_id for the images in %s: the bootstrap resamples images, so its CIs are "
                    "too narrow for correlated slices; pass a groups file (e.g. the data index)", pred_path)
    return EvalData(
        level="slice", ids=merged["image_id"].to_numpy(dtype=str), y_true=y_true, y_prob=y_prob,
        groups=groups, labels=labels,
        source={"pred": str(pred_path), "labels": str(labels_path), "key": "image_id",
                "pred_format": pred_format, "groups_from": groups_from,
                "n_pred": len(pred), "n_labels": len(truth), "n_matched": len(merged),
                "n_labels_without_prediction": unmatched},
    )


def load_eval_data(
    pred_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    *,
    level: str = "auto",
    groups_path: str | os.PathLike | None = None,
    labels: Sequence[str] = LABELS,
) -> EvalData:
    """Read and join predictions and labels at ``level`` ``series``, ``slice`` or ``auto`` (by columns)."""
    if level == "auto":
        level = detect_level(pred_path, labels_path)
    if level == "series":
        return join_series_labels(pred_path, labels_path, labels=labels)
    if level == "slice":
        return join_slice_labels(pred_path, labels_path, groups_path=groups_path, labels=labels)
    raise ValueError(f"level must be 'series', 'slice' or 'auto', not {level!r}")


def evaluate_files(
    pred_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    *,
    level: str = "auto",
    groups_path: str | os.PathLike | None = None,
    thresholds: float | Mapping[str, float] | str | os.PathLike | None = 0.5,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    labels: Sequence[str] = LABELS,
    calls: str = "independent",
) -> Evaluation:
    """``load_eval_data`` then ``evaluate``; ``thresholds`` may also be the path of a thresholds file."""
    data = load_eval_data(pred_path, labels_path, level=level, groups_path=groups_path, labels=labels)
    if isinstance(thresholds, (str, os.PathLike)):
        thresholds = parse_thresholds(os.fspath(thresholds), labels)
    return evaluate(data.y_true, data.y_prob, groups=data.groups, ids=data.ids, labels=data.labels,
                    thresholds=thresholds, n_bootstrap=n_bootstrap, ci=ci, seed=seed, level=data.level,
                    source=data.source, calls=calls)


def pool_eval_data(parts: Sequence[EvalData]) -> EvalData:
    """Several validation sets as one, rows in the order given: each set joined on its own, then stacked.

    Operating points chosen on more cases move less (one draw of 400 phantom series moved the bundle's `any`
    point by 0.15; docs/training.md). The sets must share a level; an ID (series or image) in two of them is
    refused, since that case would count twice. A patient ID found in two sets is one patient, resampled as
    one; where any set lacks patient IDs, none are used (each row its own unit), as for one set without."""
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    levels = {d.level for d in parts}
    if len(levels) > 1:
        raise DataError(f"cannot pool series-level and slice-level predictions ({', '.join(sorted(levels))})",
                        parts[0].source.get("pred", "predictions"))
    ids = np.concatenate([d.ids for d in parts])
    again = pd.Index(ids.astype(str)).duplicated()  # each set's own IDs are unique already (_unique_ids)
    if again.any():
        i = int(np.argmax(again))
        where = [d.source.get("pred") for d in parts if str(ids[i]) in set(d.ids.astype(str))]
        raise DataError(f"{parts[0].source.get('key', 'id')} {ids[i]} is in two of the pooled sets ({where[0]} "
                        "and this one); pool distinct cases", where[-1])
    groups = None if any(d.groups is None for d in parts) else np.concatenate([d.groups for d in parts])
    if groups is None and any(d.groups is not None for d in parts):
        log.warning("some pooled sets have no patient IDs: the bootstrap resamples rows for all of them")
    sources = [dict(d.source) for d in parts]
    return EvalData(
        level=parts[0].level, ids=ids, y_true=np.concatenate([d.y_true for d in parts]),
        y_prob=np.concatenate([d.y_prob for d in parts]), groups=groups, labels=parts[0].labels,
        source={"pred": [s.get("pred") for s in sources], "labels": [s.get("labels") for s in sources],
                "key": sources[0].get("key"), "pooled": sources, "n_matched": int(len(ids))},
    )


def choose_thresholds_files(
    pred_path: str | os.PathLike | Sequence[str | os.PathLike],
    labels_path: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    level: str = "auto",
    method: str = "youden",
    target: float = 0.9,
    default: float = 0.5,
    labels: Sequence[str] = LABELS,
    n_bootstrap: int = 0,
    ci: float = 0.95,
    seed: int = 0,
) -> OperatingPoints:
    """``load_eval_data`` on validation files, then ``choose_thresholds`` (its bootstrap resampling the files'
    patients); save with ``save_thresholds``. Several prediction files with their label files, paired in
    order, are joined each on its own and pooled (``pool_eval_data``)."""
    preds = [pred_path] if isinstance(pred_path, (str, os.PathLike)) else list(pred_path)
    truths = [labels_path] if isinstance(labels_path, (str, os.PathLike)) else list(labels_path)
    if len(preds) != len(truths) or not preds:
        raise DataError(f"{len(preds)} prediction file(s) and {len(truths)} label file(s): give one label file "
                        "per prediction file, in the same order")
    data = pool_eval_data([load_eval_data(p, t, level=level, labels=labels) for p, t in zip(preds, truths)])
    return choose_thresholds(data.y_true, data.y_prob, labels=data.labels, method=method, target=target,
                             default=default, source={**data.source, "level": data.level, "n": len(data.ids)},
                             n_bootstrap=n_bootstrap, ci=ci, seed=seed, groups=data.groups)
