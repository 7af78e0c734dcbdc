"""How well each way of choosing an operating point does on cases it was not chosen on.

A site chooses its thresholds on a few dozen series (``ichscan crossval``, ``ichscan thresholds``), a bundle
on a few hundred phantoms, and Youden's J is often nearly flat over a wide range of thresholds there, so the
point chosen depends on which cases happened to be drawn. This draws ``--repeats`` validation sets of ``--n``
series (whole patients, without replacement, each with both classes) from one set of predictions
(``--pred``/``--labels``), chooses the ``--label`` threshold on each by every method of ``ichscan
thresholds`` that needs no target (``youden``, ``youden-median``), and scores each point on another set of
predictions (``--test-pred``/``--test-labels``, cases none of the draws saw). It prints one JSON object:

- per method, the points' mean, SD and range over the draws, and the mean Youden's J (sensitivity +
  specificity - 1) they give on the test set;
- the baseline measured in the same run: the best J the test set allows (its own Youden point, a ceiling no
  method chosen elsewhere can pass), and per method its ``regret`` (the ceiling less the method's mean J);
- ``ratio``: youden-median's SD of the point over youden's (below 1.0: it moves less from draw to draw).

Example, on the bundle's predictions of two draws of phantom validation series::

    .venv/bin/python bench/operating_point.py --pred A/series.csv --labels A_labels.csv \\
        --test-pred B/series.csv --test-labels B_labels.csv --n 41 --repeats 200
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ichscan.labels import LABELS

METHODS = ("youden", "youden-median")


def youden_j(y: np.ndarray, p: np.ndarray, t: float) -> float:
    """Sensitivity + specificity - 1 of ``prob >= t`` on labels ``y``."""
    called = p >= t
    return float(called[y == 1].mean() + (~called[y == 0]).mean() - 1.0)


def draw_sets(groups: np.ndarray, y: np.ndarray, n: int, repeats: int, seed: int):
    """``repeats`` row sets of whole patients, about ``n`` series each (patients drawn without replacement
    until ``n`` series are reached), each with a positive and a negative case."""
    rng = np.random.default_rng(seed)
    patients, codes = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(codes == k) for k in range(len(patients))]
    made = tries = 0
    while made < repeats:
        tries += 1
        if tries > 50 * repeats:
            raise SystemExit(f"could not draw {repeats} sets of {n} series with both classes")
        rows: list[int] = []
        for k in rng.permutation(len(patients)):
            rows.extend(rows_of[k])
            if len(rows) >= n:
                break
        rows_arr = np.asarray(rows)
        if 0 < y[rows_arr].sum() < len(rows_arr):
            made += 1
            yield rows_arr


def choose_points(y: np.ndarray, p: np.ndarray, groups: np.ndarray, *, n: int, repeats: int, n_bootstrap: int,
                  seed: int) -> dict[str, list[float]]:
    """Each method's point on each of ``draw_sets(groups, y, n, repeats, seed)`` (draw k's resamples seeded
    ``seed + k``), in draw order."""
    from ichscan.metrics import choose_thresholds

    points: dict[str, list[float]] = {m: [] for m in METHODS}
    for k, rows in enumerate(draw_sets(groups, y, n, repeats, seed)):
        chosen = choose_thresholds(y[rows, None], p[rows, None], labels=("label",), method="youden-median",
                                   n_bootstrap=n_bootstrap, seed=seed + k, groups=groups[rows])
        points["youden"].append(float(chosen.details["label"]["youden_point"]))
        points["youden-median"].append(float(chosen.thresholds["label"]))
    return points


def measure(pred, labels, test_pred, test_labels, *, label: str = "any", n: int = 41, repeats: int = 200,
            n_bootstrap: int = 300, seed: int = 0) -> dict:
    from ichscan.metrics import choose_threshold, load_eval_data

    val = load_eval_data(pred, labels, level="series")
    test = load_eval_data(test_pred, test_labels, level="series")
    j, jt = val.labels.index(label), test.labels.index(label)
    y, p = val.y_true[:, j], val.y_prob[:, j]
    yt, pt = test.y_true[:, jt], test.y_prob[:, jt]
    groups = val.groups if val.groups is not None else np.arange(len(y))
    if n > len(y):
        raise SystemExit(f"--n {n}: the validation predictions hold only {len(y)} series")
    points = choose_points(y, p, np.asarray(groups), n=n, repeats=repeats, n_bootstrap=n_bootstrap, seed=seed)
    ceiling_t = choose_threshold(yt, pt, method="youden")[0]
    ceiling = youden_j(yt, pt, ceiling_t)
    out: dict = {"label": label, "n": n, "repeats": repeats, "n_bootstrap": n_bootstrap, "seed": seed,
                 "validation": {"series": int(len(y)), "positive": int(y.sum())},
                 "test": {"series": int(len(yt)), "positive": int(yt.sum()), "best_threshold": ceiling_t,
                          "best_j": ceiling},
                 "methods": {}}
    for m, ts in points.items():
        t = np.asarray(ts)
        js = np.array([youden_j(yt, pt, v) for v in t])
        out["methods"][m] = {"point_mean": float(t.mean()), "point_sd": float(t.std(ddof=1)),
                             "point_range": [float(t.min()), float(t.max())],
                             "test_j_mean": float(js.mean()), "test_j_sd": float(js.std(ddof=1)),
                             "regret": float(ceiling - js.mean())}
    sd = {m: out["methods"][m]["point_sd"] for m in METHODS}
    out["ratio"] = sd["youden-median"] / sd["youden"] if sd["youden"] > 0 else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pred", required=True, help="series.csv of the set the points are chosen from")
    ap.add_argument("--labels", required=True, help="its series_labels.csv")
    ap.add_argument("--test-pred", required=True, help="series.csv of the set they are scored on")
    ap.add_argument("--test-labels", required=True, help="its series_labels.csv")
    ap.add_argument("--label", default="any", choices=LABELS)
    ap.add_argument("--n", type=int, default=41, help="series per validation draw (default 41, ctich-dev's)")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--bootstrap", type=int, default=300, help="resamples for youden-median (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from ichscan.errors import IchscanError

    try:
        result = measure(a.pred, a.labels, a.test_pred, a.test_labels, label=a.label, n=a.n,
                         repeats=a.repeats, n_bootstrap=a.bootstrap, seed=a.seed)
    except IchscanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
