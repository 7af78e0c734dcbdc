"""``ichscan crossval --aggregation auto``: the aggregation chosen on out-of-fold series, and its nested estimate,
checked against scikit-learn's AUC on arrays a person can read."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ichscan.crossval import CrossvalOptions, _resolve_aggregation, choose_aggregation
from ichscan.labels import LABELS


def columns_of(any_scores: dict[str, list[float]]) -> dict[str, np.ndarray]:
    n = len(next(iter(any_scores.values())))
    out = {}
    for method, scores in any_scores.items():
        probs = np.full((n, len(LABELS)), 0.5)
        probs[:, 0] = scores
        out[f"adapted_{method}"] = probs
    return out


def test_choose_aggregation_takes_the_best_auc_for_any_and_ties_to_the_recipes_own():
    truth = np.zeros((4, len(LABELS)))
    truth[:2, 0] = 1  # series 0 and 1 bleed
    cols = columns_of({"max": [0.9, 0.2, 0.5, 0.1],  # 3 of 4 pairs right: AUC 0.75
                       "topk": [0.9, 0.8, 0.1, 0.2],  # every pair: 1.0
                       "noisy_or": [0.99, 0.98, 0.3, 0.4]})  # every pair: 1.0
    chosen, aucs = choose_aggregation(truth, cols, ["max", "topk", "noisy_or"], "topk", LABELS)
    assert aucs == {"max": 0.75, "topk": 1.0, "noisy_or": 1.0} and chosen == "topk"  # the tie goes to the default
    chosen, _ = choose_aggregation(truth, cols, ["max", "topk", "noisy_or"], "max", LABELS)
    assert chosen == "topk"  # max, the default here, ranks worse: the first of the equal best
    clean = np.zeros_like(truth)  # nothing to rank by: the default
    assert choose_aggregation(clean, cols, ["max", "topk", "noisy_or"], "max", LABELS) == ("max", {})


def test_auto_chooses_on_the_out_of_fold_series_and_nests_the_choice_by_fold():
    rng = np.random.default_rng(3)
    n = 40
    truth = np.zeros((n, len(LABELS)))
    truth[rng.permutation(n)[:16], 0] = 1
    y = truth[:, 0]
    cols = columns_of({"max": list(rng.random(n)), "topk": list(0.3 * y + rng.random(n)),
                       "noisy_or": list(0.6 * y + rng.random(n))})
    folds = np.arange(n) % 5
    chosen, auto = _resolve_aggregation(CrossvalOptions(aggregation="auto"), truth, cols, folds, LABELS)
    best = max(("max", "topk", "noisy_or"), key=lambda m: roc_auc_score(y, cols[f"adapted_{m}"][:, 0]))
    assert chosen == best == auto["chosen"] and auto["default"] == "topk"
    for m in ("max", "topk", "noisy_or"):
        assert auto["auc_any"][m] == pytest.approx(roc_auc_score(y, cols[f"adapted_{m}"][:, 0]))
    nested = cols["adapted_auto"]
    for k in range(5):  # each fold's series scored by what the other folds chose
        rest = folds != k
        pick = max(("topk", "max", "noisy_or"), key=lambda m: roc_auc_score(y[rest], cols[f"adapted_{m}"][rest, 0]))
        assert auto["folds"][str(k)]["chosen"] == pick
        assert np.array_equal(nested[folds == k], cols[f"adapted_{pick}"][folds == k])
    assert auto["nested_auc_any"] == pytest.approx(roc_auc_score(y, nested[:, 0]))


def test_a_fixed_aggregation_is_taken_as_given_and_one_not_computed_is_refused_before_training(tmp_path):
    truth = np.zeros((4, len(LABELS)))
    truth[:2, 0] = 1
    cols = columns_of({"max": [0.9, 0.2, 0.5, 0.1], "topk": [0.9, 0.8, 0.1, 0.2], "noisy_or": [0.99, 0.98, 0.3, 0.4]})
    folds = np.array([0, 1, 0, 1])
    assert _resolve_aggregation(CrossvalOptions(), truth, dict(cols), folds, LABELS) == ("topk", None)
    assert _resolve_aggregation(CrossvalOptions(aggregation="max"), truth, dict(cols), folds, LABELS) == ("max", None)
    from ichscan.crossval import run_crossval
    from ichscan.errors import IchscanError
    from ichscan.train import TrainConfig

    config = TrainConfig.from_preset("finetune", arch="resnet10t", image_size=32, epochs=1)
    with pytest.raises(IchscanError, match="context needs the series head"):  # no data read, nothing trained
        run_crossval(config, tmp_path / "nowhere", tmp_path / "cv", options=CrossvalOptions(aggregation="context"))
    assert not (tmp_path / "cv").exists()
    assert "aggregation" not in CrossvalOptions().to_dict()  # earlier runs' records resume as they were
    assert CrossvalOptions(aggregation="auto").to_dict()["aggregation"] == "auto"


def test_youden_median_without_resamples_is_refused_before_training(tmp_path):
    from ichscan.crossval import run_crossval
    from ichscan.errors import IchscanError
    from ichscan.train import TrainConfig

    config = TrainConfig.from_preset("finetune", arch="resnet10t", image_size=32, epochs=1)
    options = CrossvalOptions(threshold_method="youden-median", n_bootstrap=0)
    with pytest.raises(IchscanError, match="--threshold-method youden-median .* needs resamples"):  # no data read
        run_crossval(config, tmp_path / "nowhere", tmp_path / "cv", options=options)
    assert not (tmp_path / "cv").exists()


def test_operating_points_table_gives_each_threshold_its_interval_median_and_notes():
    from ichscan.crossval import _points_markdown
    from ichscan.metrics import choose_thresholds

    rng = np.random.default_rng(0)
    y = np.zeros((40, 2), int)
    y[:20, 0] = 1  # the second label has no positive case: it keeps the default, with a note
    p = np.c_[np.clip(0.3 * y[:, 0] + 0.7 * rng.random(40), 0, 1), rng.random(40)]
    points = choose_thresholds(y, p, labels=("any", "epidural"), n_bootstrap=100, seed=1)
    lines = _points_markdown(points)
    d = points.details["any"]
    assert (f"| any | {points.thresholds['any']:.3f} | {d['threshold_ci'][0]:.3f}-{d['threshold_ci'][1]:.3f} | "
            f"{d['threshold_median']:.3f} | {d['sensitivity']:.3f} | {d['specificity']:.3f} |") in lines
    assert "| epidural | 0.500 | NA | NA | NA | NA |" in lines
    assert any(line.startswith("epidural: kept default 0.5") for line in lines)
