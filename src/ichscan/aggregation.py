"""Series probabilities from slice probabilities: the ways ichscan aggregates, in one place.

A model reads slices; a study is judged by series. ``model`` records the aggregation a model was made with
(chosen on validation, as its operating points are), ``predict`` applies it. numpy only.

A model may also record one aggregation per label (``per_label``), each with a Platt map that turns its
series score into a probability: ``ichscan crossval --aggregation per_label`` chooses them on a site's
out-of-fold series. The map is fitted on ``evidence``, a monotone transform of the score that stays finite
where the score itself sits at 0 or 1 (noisy-OR over a long series often does).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ichscan.errors import DataError

AGGREGATIONS = ("max", "topk", "noisy_or", "context")
# "context": the model's own series head (ichscan.series.SeriesHead) reads the slices along z; it needs the
# slices' embeddings, so ichscan.predict.Predictor applies it, never ``aggregate``.
SLICE_AGGREGATIONS = ("max", "topk", "noisy_or")
PER_LABEL = "per_label"  # one slice aggregation per label, each with its Platt map (LabelAggregation)
_P_CLIP = 1e-7  # slice probabilities are kept this far from 0 and 1 in the evidence


def aggregate(slice_probs: np.ndarray, method: str = "max", top_k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Series probabilities (L,) and the index of the slice that drove each label (L,).

    - ``max``: the most suspicious slice decides (the default; what a reader does).
    - ``topk``: mean of the ``top_k`` highest slices per label; steadier against one noisy slice.
    - ``noisy_or``: ``1 - prod(1 - p)``, slices as independent detectors; it grows with series
      length, so it suits calibrated models and series of similar length.
    The key slice is always the slice with the highest probability for that label.
    """
    p = np.asarray(slice_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"slice_probs must be (n_slices, n_labels) with n_slices >= 1, got {p.shape}")
    key = np.argmax(p, axis=0)
    if method == "max":
        probs = p.max(axis=0)
    elif method == "topk":
        k = max(1, min(int(top_k), p.shape[0]))
        probs = np.sort(p, axis=0)[-k:].mean(axis=0)
    elif method == "noisy_or":
        probs = 1.0 - np.exp(np.sum(np.log1p(-np.clip(p, 0.0, 1.0 - 1e-12)), axis=0))
    elif method == "context":
        raise ValueError("aggregation 'context' is the model's series head: predict with ichscan.predict.Predictor")
    else:
        raise ValueError(f"unknown aggregation {method!r}; expected one of {', '.join(AGGREGATIONS)}")
    return probs, key


def check_aggregation(doc: Any, source: str | os.PathLike | None, *, error: type[Exception] = DataError
                      ) -> dict[str, Any] | None:
    """``{"method": one of AGGREGATIONS, "top_k": k, ...}`` as a checkpoint or manifest records it, or
    ``{"method": "per_label", "labels": {label: {"method": ..., "platt": [a, b]}}}``, checked (``top_k``
    defaults to 3); None stays None."""
    if doc is None:
        return None
    if not isinstance(doc, dict) or doc.get("method") not in (*AGGREGATIONS, PER_LABEL):
        raise error(f"aggregation {doc!r}: expected {{\"method\": one of {', '.join((*AGGREGATIONS, PER_LABEL))}}}",
                    source)
    k = doc.get("top_k", 3)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise error(f"aggregation top_k {k!r} is not a positive integer", source)
    if doc["method"] == PER_LABEL:  # every label it names must be usable; which labels are needed, the model says
        label_aggregations(doc, list(doc.get("labels") or {}), source, error=error)
    return dict(doc, top_k=k)


@dataclass(frozen=True)
class LabelAggregation:
    """One label's series aggregation: a slice aggregation (``max``, ``topk`` of ``top_k``, ``noisy_or``) and,
    optionally, the Platt map ``(a, b)`` of its evidence: probability = sigmoid(a * evidence + b)."""

    method: str
    top_k: int = 3
    platt: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method}
        if self.method == "topk":
            d["top_k"] = self.top_k
        if self.platt is not None:
            d["platt"] = [float(self.platt[0]), float(self.platt[1])]
        return d

    def calibrated(self, evidence_values):
        """The Platt map applied to this aggregation's ``evidence``: sigmoid(a * evidence + b)."""
        a, b = self.platt
        return sigmoid(a * np.asarray(evidence_values, dtype=np.float64) + b)


def evidence(slice_probs: np.ndarray, method: str, top_k: int = 3) -> np.ndarray:
    """A series score (L,) that orders series as ``aggregate(..., method)`` does, on a scale a logistic map
    can use: the logit of the max or top-k mean; for noisy-OR the log of the summed hazard
    ``H = -sum log(1 - p)`` (noisy-OR is ``1 - exp(-H)``), finite where noisy-OR rounds to 1."""
    p = np.clip(np.asarray(slice_probs, dtype=np.float64), _P_CLIP, 1.0 - _P_CLIP)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"slice_probs must be (n_slices, n_labels) with n_slices >= 1, got {p.shape}")
    if method == "noisy_or":
        return np.log(-np.sum(np.log1p(-p), axis=0))
    if method not in ("max", "topk"):
        raise ValueError(f"no evidence for aggregation {method!r}; expected one of {', '.join(SLICE_AGGREGATIONS)}")
    score, _ = aggregate(p, method, top_k)
    return np.log(score) - np.log1p(-score)


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def fit_platt(scores: np.ndarray, truth: np.ndarray, *, iterations: int = 100) -> tuple[float, float]:
    """Platt's map ``(a, b)``: probability = sigmoid(a * score + b), fitted by Newton's method to the
    log loss of Platt's smoothed targets ((N+ + 1) / (N+ + 2) for positives, 1 / (N- + 2) for negatives),
    which keep the fit finite when the scores separate the classes. Needs a positive and a negative."""
    x = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(truth, dtype=np.float64).ravel()
    if x.shape != y.shape or not np.isfinite(x).all():
        raise ValueError("fit_platt needs finite scores and as many truths")
    pos = int((y > 0.5).sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        raise ValueError(f"fit_platt needs positives and negatives; got {pos} and {neg}")
    t = np.where(y > 0.5, (pos + 1.0) / (pos + 2.0), 1.0 / (neg + 2.0))
    # centred and scaled for the solver; the map is turned back at the end
    mu, sd = float(x.mean()), float(x.std()) or 1.0
    z = (x - mu) / sd
    w = np.zeros(2)  # (slope, intercept) on z
    design = np.stack([z, np.ones_like(z)], axis=1)

    def loss(v):  # cross-entropy against the smoothed targets, written to stay finite
        m = design @ v
        return float(np.sum(np.logaddexp(0.0, m) - t * m))

    for _ in range(iterations):
        p = sigmoid(design @ w)
        grad = design.T @ (p - t)
        hess = design.T @ (design * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        current, shrink = loss(w), 1.0
        while loss(w - shrink * step) > current and shrink > 1e-6:  # Newton, halved where it overshoots
            shrink /= 2
        w -= shrink * step
        if np.abs(shrink * step).max() < 1e-10:
            break
    a = w[0] / sd
    return float(a), float(w[1] - a * mu)


def aggregate_per_label(slice_probs: np.ndarray, specs: Sequence[LabelAggregation]) -> tuple[np.ndarray, np.ndarray]:
    """Series probabilities (L,) with each label's own aggregation, through its Platt map where it has one,
    and the key slice of each label (its most probable slice), as ``aggregate`` gives them."""
    p = np.asarray(slice_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] != len(specs):
        raise ValueError(f"slice_probs must be (n_slices, {len(specs)}) with n_slices >= 1, got {p.shape}")
    probs = np.empty(p.shape[1])
    for j, spec in enumerate(specs):
        column = p[:, j:j + 1]
        if spec.platt is None:
            probs[j] = aggregate(column, spec.method, spec.top_k)[0][0]
        else:
            probs[j] = spec.calibrated(evidence(column, spec.method, spec.top_k)[0])
    return probs, np.argmax(p, axis=0)


def label_aggregations(doc: Mapping[str, Any], labels: Sequence[str], source: str | os.PathLike | None = None, *,
                       error: type[Exception] = DataError) -> tuple[LabelAggregation, ...]:
    """The ``labels`` entry of a ``per_label`` aggregation record, in ``labels`` order, checked: every label
    present, each with a slice aggregation, a positive ``top_k`` and, if any, a finite ``platt`` pair."""
    entries = doc.get("labels") if isinstance(doc, Mapping) else None
    if not isinstance(entries, Mapping):
        raise error("aggregation per_label: expected \"labels\": {label: {\"method\": ..., \"platt\": [a, b]}}",
                    source)
    missing = [name for name in labels if name not in entries]
    if missing:
        raise error(f"aggregation per_label names no aggregation for {', '.join(missing)}", source)
    specs = []
    for name in labels:
        e = entries[name]
        if not isinstance(e, Mapping) or e.get("method") not in SLICE_AGGREGATIONS:
            raise error(f"aggregation per_label, {name}: {e!r}: expected {{\"method\": one of "
                        f"{', '.join(SLICE_AGGREGATIONS)}}}", source)
        k = e.get("top_k", 3)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise error(f"aggregation per_label, {name}: top_k {k!r} is not a positive integer", source)
        platt = e.get("platt")
        if platt is not None:
            if (not isinstance(platt, (list, tuple)) or len(platt) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in platt)):
                raise error(f"aggregation per_label, {name}: platt {platt!r} is not a pair of finite numbers", source)
            platt = (float(platt[0]), float(platt[1]))
        specs.append(LabelAggregation(e["method"], k, platt))
    return tuple(specs)


def describe_aggregation(method: str, top_k: int = 3, specs: Sequence[LabelAggregation] | None = None,
                         labels: Sequence[str] | None = None) -> str:
    """One line for a reader: ``topk of 3``, ``max``, or ``per_label (any noisy_or, epidural max, ...)``."""
    def one(m: str, k: int) -> str:
        return f"{m} of {k}" if m == "topk" else m

    if method != PER_LABEL or specs is None:
        return one(method, top_k)
    names = list(labels) if labels is not None else [str(j) for j in range(len(specs))]
    calibrated = all(spec.platt is not None for spec in specs)
    return (f"{PER_LABEL} (" + ", ".join(f"{n} {one(spec.method, spec.top_k)}" for n, spec in zip(names, specs))
            + (", each Platt-calibrated" if calibrated else "") + ")")
