"""Two models on the same cases: is the difference in AUC (and weighted log loss) more than chance?

Every candidate model in ichscan's history was judged against the shipped one on the same 41 real series,
and the standard error of one AUC says little about the difference of two AUCs measured on the same
cases, whose errors are correlated. This module gives that difference its own uncertainty, two ways:

* **DeLong's test** (DeLong, DeLong and Clarke-Pearson, *Biometrics* 1988): the AUCs' variances and
  covariance from the placement values of each positive among the negatives and of each negative among the
  positives (ties count one half), computed with midranks; the difference ``B - A`` with a normal CI and
  a two-sided p-value. It treats rows as independent, so it is given only when every row is its own
  patient (a series per patient); otherwise it is NA with the reason.
* **A paired patient bootstrap**: each resample draws patients with replacement, as ``ichscan evaluate``
  does, and scores *both* models on the same draw; the percentile interval of ``B - A``. This is the one
  to read when patients have several rows (slices, twin series).

numpy, pandas and scipy (scikit-learn's dependency) only; scoring needs no model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichscan.errors import DataError
from ichscan.fileio import write_csv, write_json, write_text
from ichscan.labels import LABELS
from ichscan.metrics import auc_ranked, load_eval_data, patient_resamples, percentile_ci, weighted_log_loss_rows


@dataclass(frozen=True)
class DeLong:
    """Two AUCs on the same cases with DeLong's variance of each and their covariance."""

    auc_a: float
    auc_b: float
    var_a: float
    var_b: float
    cov: float

    @property
    def diff(self) -> float:
        return self.auc_b - self.auc_a

    @property
    def se_diff(self) -> float:
        return math.sqrt(max(self.var_a + self.var_b - 2.0 * self.cov, 0.0))

    def p_value(self) -> float:
        """Two-sided p for AUC_B = AUC_A (1.0 when the difference and its SE are both zero)."""
        se = self.se_diff
        if se == 0.0:
            return 1.0 if self.diff == 0.0 else 0.0
        return math.erfc(abs(self.diff) / se / math.sqrt(2.0))

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        from scipy.stats import norm

        half = float(norm.ppf(0.5 + level / 2.0)) * self.se_diff
        return self.diff - half, self.diff + half


def placements(y_true, score) -> tuple[np.ndarray, np.ndarray]:
    """(V10, V01): for each positive, the share of negatives it outscores; for each negative, the share of
    positives that outscore it (ties one half). Their means are both the AUC."""
    from scipy.stats import rankdata

    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    x, z = s[y], s[~y]
    m, n = x.size, z.size
    both = rankdata(np.concatenate([x, z]))  # midranks
    v10 = (both[:m] - rankdata(x)) / n
    v01 = 1.0 - (both[m:] - rankdata(z)) / m
    return v10, v01


def delong(y_true, score_a, score_b) -> DeLong:
    """DeLong's AUCs, variances and covariance for two scores of the same cases (at least two positives and
    two negatives, else ValueError)."""
    y = np.asarray(y_true).astype(bool).ravel()
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positive and 2 negative cases, got {m} and {n}")
    a10, a01 = placements(y, score_a)
    b10, b01 = placements(y, score_b)
    s10 = np.cov(np.vstack([a10, b10]))  # ddof 1, as in DeLong et al.
    s01 = np.cov(np.vstack([a01, b01]))
    var = s10 / m + s01 / n
    return DeLong(float(a10.mean()), float(b10.mean()), float(var[0, 0]), float(var[1, 1]), float(var[0, 1]))


@dataclass(frozen=True)
class LabelComparison:
    """One label: both AUCs, B - A, DeLong's CI and p (or why not), the paired bootstrap's CI."""

    label: str
    pos: int
    neg: int
    auc_a: float | None
    auc_b: float | None
    diff: float | None
    delong_low: float | None = None
    delong_high: float | None = None
    p_value: float | None = None
    boot_low: float | None = None
    boot_high: float | None = None
    reason: str | None = None  # why something is NA

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Comparison:
    names: tuple[str, str]
    labels: tuple[str, ...]
    per_label: tuple[LabelComparison, ...]
    wll_a: float
    wll_b: float
    wll_low: float | None
    wll_high: float | None
    n: int
    n_units: int
    level: str = "rows"
    n_bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0
    delong_reason: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    unit: str = "patient"  # what the bootstrap resamples: "patient", or "row" without patient IDs

    def __getitem__(self, label: str) -> LabelComparison:
        for row in self.per_label:
            if row.label == label:
                return row
        raise KeyError(label)

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "level": self.level, "n": self.n, "n_patients": self.n_units,
                "bootstrap": {"n": self.n_bootstrap, "ci": self.ci, "seed": self.seed, "unit": self.unit,
                              "paired": True, "method": "percentile"},
                "delong": self.delong_reason or "given: one row per patient",
                "difference": "B - A", "per_label": [r.to_dict() for r in self.per_label],
                "weighted_log_loss": {"a": self.wll_a, "b": self.wll_b, "diff": self.wll_b - self.wll_a,
                                      "boot_low": self.wll_low, "boot_high": self.wll_high},
                "source": dict(self.source)}


def compare(y_true, prob_a, prob_b, *, groups=None, labels: Sequence[str] = LABELS, n_bootstrap: int = 1000,
            ci: float = 0.95, seed: int = 0, level: str = "rows", names: tuple[str, str] = ("A", "B"),
            source: Mapping[str, Any] | None = None) -> Comparison:
    """Model B against model A on the same ``(n, len(labels))`` truth; ``groups`` the patient of each row."""
    labels = tuple(labels)
    y = np.asarray(y_true, dtype=np.float64)
    pa, pb = np.asarray(prob_a, dtype=np.float64), np.asarray(prob_b, dtype=np.float64)
    if not (y.shape == pa.shape == pb.shape and y.ndim == 2 and y.shape[1] == len(labels)):
        raise ValueError(f"truth {y.shape}, A {pa.shape} and B {pb.shape} must all be (n, {len(labels)})")
    n = y.shape[0]
    groups_arr = np.arange(n).astype(str) if groups is None else np.asarray(groups).astype(str)
    n_units = len(np.unique(groups_arr))
    if groups is None and level == "slice":
        delong_reason = ("DeLong not given: slices without patient IDs are not independent rows, and the bootstrap "
                         "resamples slices, so its interval is too narrow; give the patients (--groups)")
    elif n_units < n:
        delong_reason = (f"DeLong not given: {n} rows from {n_units} patients are not independent; "
                         "read the paired bootstrap")
    else:
        delong_reason = None
    wll_rows = [weighted_log_loss_rows(y, p, labels=labels) for p in (pa, pb)]
    ranked = [[np.unique(p[:, j], return_inverse=True) for j in range(len(labels))] for p in (pa, pb)]

    def aucs(w: np.ndarray) -> np.ndarray:
        """(2, len(labels)) AUCs for row weights w."""
        return np.array([[auc_ranked(inv.ravel(), u.size, y[:, j], w) for j, (u, inv) in enumerate(r)]
                         for r in ranked])

    boot = np.full((n_bootstrap, len(labels)), np.nan)
    boot_wll = np.full(n_bootstrap, np.nan)
    for b, w in enumerate(patient_resamples(groups_arr, n_bootstrap, seed)):  # both models on each draw
        a = aucs(w)
        boot[b] = a[1] - a[0]
        boot_wll[b] = (w @ wll_rows[1] - w @ wll_rows[0]) / w.sum()
    point = aucs(np.ones(n))
    rows = []
    for j, name in enumerate(labels):
        pos, neg = int(y[:, j].sum()), int(n - y[:, j].sum())
        if pos == 0 or neg == 0:
            rows.append(LabelComparison(name, pos, neg, None, None, None,
                                        reason=f"no {'positive' if pos == 0 else 'negative'} case: AUC undefined"))
            continue
        low, high, _, why = percentile_ci(boot[:, j], ci, n_bootstrap)
        fields: dict[str, Any] = {"boot_low": low, "boot_high": high}
        reasons = [why] if why else []
        if delong_reason:
            reasons.append(delong_reason)
        elif min(pos, neg) < 2:
            reasons.append("DeLong not given: fewer than 2 cases in a class")
        else:
            d = delong(y[:, j], pa[:, j], pb[:, j])
            fields.update(zip(("delong_low", "delong_high"), d.ci(ci)), p_value=d.p_value())
        rows.append(LabelComparison(name, pos, neg, float(point[0, j]), float(point[1, j]),
                                    float(point[1, j] - point[0, j]), reason="; ".join(reasons) or None, **fields))
    wll_low, wll_high, _, _ = percentile_ci(boot_wll, ci, n_bootstrap)
    return Comparison(tuple(names), labels, tuple(rows), float(wll_rows[0].mean()), float(wll_rows[1].mean()),
                      wll_low, wll_high, n, n_units, level, n_bootstrap, ci, seed, delong_reason, dict(source or {}),
                      "row" if groups is None else "patient")


def compare_files(pred_a: str | os.PathLike, pred_b: str | os.PathLike, labels_path: str | os.PathLike, *,
                  level: str = "auto", groups_path: str | os.PathLike | None = None, n_bootstrap: int = 1000,
                  ci: float = 0.95, seed: int = 0, names: tuple[str, str] | None = None) -> Comparison:
    """Read both prediction files against the same labels; they must cover the same cases."""
    a = load_eval_data(pred_a, labels_path, level=level, groups_path=groups_path)
    b = load_eval_data(pred_b, labels_path, level=a.level, groups_path=groups_path)
    ids_a, ids_b = list(map(str, a.ids)), list(map(str, b.ids))
    if set(ids_a) != set(ids_b):
        only_a, only_b = sorted(set(ids_a) - set(ids_b)), sorted(set(ids_b) - set(ids_a))
        raise DataError(f"covers other cases than {pred_a}: {len(only_b)} labelled case(s) only here, "
                        f"{len(only_a)} only there (e.g. {(only_b or only_a)[0]}); compare models on the same cases",
                        pred_b)
    order = {uid: i for i, uid in enumerate(ids_b)}
    take = [order[uid] for uid in ids_a]
    names = names or (Path(pred_a).parent.name or "A", Path(pred_b).parent.name or "B")
    return compare(a.y_true, a.y_prob, b.y_prob[take], groups=a.groups, labels=a.labels, n_bootstrap=n_bootstrap,
                   ci=ci, seed=seed, level=a.level, names=names,
                   source={"a": str(pred_a), "b": str(pred_b), "labels": str(labels_path)})


def _num(x: float | None, digits: int = 3) -> str:
    return "NA" if x is None else f"{x:.{digits}f}"


def comparison_markdown(c: Comparison) -> str:
    a, b = c.names
    pct = f"{100 * c.ci:g}%"
    unit = {"series": "series", "slice": "slices"}.get(c.level, "rows")
    whose = f"from {c.n_units} patients" if c.unit == "patient" else "(no patient IDs: each row its own unit)"
    lines = [f"Model B ({b}) against model A ({a}) on the same {c.n} {unit} {whose}. "
             f"Difference B - A; {pct} CIs by DeLong's test and by a paired bootstrap of {c.unit}s "
             f"({c.n_bootstrap} resamples, seed {c.seed}).", "",
             f"| Label | POS | NEG | AUC A | AUC B | B - A | {pct} CI (DeLong) | p (DeLong) "
             f"| {pct} CI (paired bootstrap) |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in c.per_label:
        delong_ci = "NA" if r.delong_low is None else f"{_num(r.delong_low)} to {_num(r.delong_high)}"
        boot_ci = "NA" if r.boot_low is None else f"{_num(r.boot_low)} to {_num(r.boot_high)}"
        p = "NA" if r.p_value is None else (f"{r.p_value:.3f}" if r.p_value >= 0.001 else "<0.001")
        lines.append(f"| {r.label} | {r.pos} | {r.neg} | {_num(r.auc_a)} | {_num(r.auc_b)} | "
                     f"{'NA' if r.diff is None else f'{r.diff:+.3f}'} | {delong_ci} | {p} | {boot_ci} |")
    wll_ci = "NA" if c.wll_low is None else f"{c.wll_low:+.3f} to {c.wll_high:+.3f}"
    lines += ["", f"Weighted log loss (RSNA 2019): A {c.wll_a:.3f}, B {c.wll_b:.3f}, B - A "
                  f"{c.wll_b - c.wll_a:+.3f} ({pct} paired bootstrap {wll_ci})"]
    notes = sorted({r.reason for r in c.per_label if r.reason})
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_comparison(c: Comparison, out: str | os.PathLike, stem: str = "comparison") -> dict[str, Path]:
    """STEM.md, STEM.csv and STEM.json in ``out`` (each written atomically)."""
    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([r.to_dict() for r in c.per_label])
    return {"md": write_text(out / f"{stem}.md", comparison_markdown(c)),
            "csv": write_csv(out / f"{stem}.csv", table),
            "json": write_json(out / f"{stem}.json", c.to_dict())}
