"""Series probabilities from slice probabilities: the ways ichscan aggregates, in one place.

A model reads slices; a study is judged by series. ``model`` records the aggregation a model was made with
(chosen on validation, as its operating points are), ``predict`` applies it. numpy only.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ichscan.errors import DataError

AGGREGATIONS = ("max", "topk", "noisy_or", "context")
# "context": the model's own series head (ichscan.series.SeriesHead) reads the slices along z; it needs the
# slices' embeddings, so ichscan.predict.Predictor applies it, never ``aggregate``.
SLICE_AGGREGATIONS = ("max", "topk", "noisy_or")


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
    """``{"method": one of AGGREGATIONS, "top_k": k, ...}`` as a checkpoint or manifest records it, checked
    (``top_k`` defaults to 3); None stays None."""
    if doc is None:
        return None
    if not isinstance(doc, dict) or doc.get("method") not in AGGREGATIONS:
        raise error(f"aggregation {doc!r}: expected {{\"method\": one of {', '.join(AGGREGATIONS)}}}", source)
    k = doc.get("top_k", 3)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise error(f"aggregation top_k {k!r} is not a positive integer", source)
    return dict(doc, top_k=k)
