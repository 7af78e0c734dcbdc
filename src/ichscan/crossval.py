"""``ichscan crossval``: what a site should expect from a model adapted to its own series, before using it.

Patient-grouped k-fold cross-validation of the whole recipe (fine-tune from ``--init``, then average the
fine-tuned model with the starting model as it is, ``keep_start``; or, with ``keep_start`` 0, fit a series
head on the fine-tuned model's features), then one final model made the same way from all the data:

- every series (and every slice) is predicted by the one model that never saw its patient: out-of-fold (OOF)
  predictions, ``oof_series.csv`` (one column group per aggregation) and ``oof_slices.csv``;
- the starting model without adaptation is scored on the same series (``baseline_*`` columns), made as the OOF
  predictions are (one series at a time, the same TTA views), so the gain is measured, not assumed;
- Table 1 on the OOF series with patient-bootstrap CIs, Figure 1 (ROC per subtype), the same for slices where
  slice labels exist, and a comparison of aggregations and models (``comparison.md``);
- operating points chosen on the OOF series (Youden by default) go into the final model's JSON with its
  aggregation, so ``ichscan predict --checkpoint OUT/final/ensemble.json`` (``model.json`` with ``keep_start``
  0) uses them.

Every fold is a training run of its own under ``OUT/fold-K`` (resumable as ``ichscan train`` is) and is marked
done by ``fold.json`` only once its OOF predictions are written, so an interrupted cross-validation resumes
at the step it was in. Thresholds chosen on the predictions they are judged on flatter ACC, PREC and REC; AUC
and log loss do not depend on them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichscan.aggregation import (
    PER_LABEL,
    SLICE_AGGREGATIONS,
    LabelAggregation,
    aggregate,
    describe_aggregation,
    evidence,
    fit_platt,
)
from ichscan.errors import DataError, IchscanError
from ichscan.fileio import write_bytes, write_csv, write_json, write_npy, write_text
from ichscan.labels import LABELS
from ichscan.series import (
    HeadRecipe,
    SeriesDataset,
    SeriesFeatures,
    load_series_data,
    series_order,
    train_series_head,
)
from ichscan.train import (
    FOLD_SEED,
    TrainConfig,
    _ensure_cache,
    load_replay,
    resolve_init,
    resolve_replay,
    train,
    with_replay,
)

log = logging.getLogger(__name__)

CROSSVAL_FORMAT = "ichscan-crossval/1"
# Options that may differ between an interrupted cross-validation and its resume.
RESUME_FREE = frozenset({"n_bootstrap"})


@dataclass
class CrossvalOptions:
    """What ``run_crossval`` does beyond the training config."""

    folds: int = 5
    # Train a series head per fold (and for the final model), the primary aggregation; only without keep_start.
    series_head: bool = False
    head_kind: str = "gru"
    head_hidden: int = 32
    head: HeadRecipe = field(default_factory=HeadRecipe)
    augmented_passes: int = 1  # augmented feature passes over the training slices, beside the plain one
    top_k: int = 3
    threshold_method: str = "youden"
    n_bootstrap: int = 1000
    final: bool = True  # train the final model on all of the data
    baseline: bool = True  # score the starting model (--init) without adaptation on the same series
    # Models per fold: the first ``members`` members of an ensemble --init, each fine-tuned (with its own series
    # head), their probabilities averaged as ichscan predict averages an ensemble's; the final model is then
    # an ensemble manifest of as many.
    members: int = 1
    # Share of the starting model, unadapted, in the adapted model: each fold's model (and the final one) is
    # then the ensemble of the fine-tuned model(s), weight 1 - keep_start, and the starting model's members,
    # weight keep_start, aggregated by the mean of the top k slices. Fine-tuning on a few dozen series
    # calibrates a model to the site but can cost it the ranking it brought; the average kept both (measured
    # in docs/training.md#site). 0 turns it off; without a starting model there is nothing to keep and it is
    # ignored. Slice aggregations only: the start has no series head.
    keep_start: float = 0.5
    # The views every out-of-fold prediction averages: ichscan predict's default, so that the estimate is
    # of what predict will do.
    tta: tuple[str, ...] = ("identity", "hflip")
    # The series aggregation of the thresholds, Table 1, the gain and the final model: None, the recipe's own
    # (``primary``); one of the aggregations computed; or "auto", the one whose out-of-fold series AUC for
    # ``any`` is highest (``choose_aggregation``), with a nested estimate beside it; or "per_label", each
    # label's best slice aggregation with its Platt map (``choose_per_label``), with a nested estimate beside it.
    aggregation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["head"] = dataclasses.asdict(self.head)
        d["tta"] = list(self.tta)
        if d["aggregation"] is None:  # keeps the records of earlier runs as they were
            del d["aggregation"]
        return d

    @property
    def primary(self) -> str:
        """The recipe's own aggregation: the series head's, else the top k (with keep_start) or the maximum."""
        if self.series_head:
            return "context"
        return "topk" if self.keep_start else "max"


AUTO_LABEL = "any"  # what ``--aggregation auto`` ranks the aggregations by: the triage question


def choose_aggregation(truth: np.ndarray, columns: dict[str, np.ndarray], methods: Sequence[str], default: str,
                       labels: Sequence[str], rows: np.ndarray | None = None) -> tuple[str, dict[str, float]]:
    """The aggregation of ``methods`` whose series probabilities (``columns["adapted_<method>"]``, over ``rows``)
    rank ``AUTO_LABEL`` best by AUC, ties to ``default``; with each one's AUC. ``default`` where the rows hold
    no positive or no negative series."""
    from ichscan.metrics import roc_auc

    rows = np.arange(len(truth)) if rows is None else rows
    y = truth[rows, list(labels).index(AUTO_LABEL)]
    if not 0 < y.sum() < len(y):
        return default, {}
    aucs = {m: float(roc_auc(y, columns[f"adapted_{m}"][rows, list(labels).index(AUTO_LABEL)])) for m in methods}
    order = [default, *[m for m in methods if m != default]]  # max() keeps the first of equals
    return max(order, key=lambda m: aucs[m]), aucs


def choose_per_label(truth: np.ndarray, columns: dict[str, np.ndarray], evidences: dict[str, np.ndarray],
                     methods: Sequence[str], default: str, labels: Sequence[str], top_k: int,
                     rows: np.ndarray | None = None) -> tuple[list[LabelAggregation], dict[str, dict[str, float]]]:
    """For each label, the slice aggregation of ``methods`` whose series probabilities
    (``columns["adapted_<method>"]``, over ``rows``) rank that label best by AUC, ties to ``default``, with the
    Platt map of its evidence (``evidences[method]``, series x labels) fitted on the same rows; ``default``
    without a map where the rows hold no positive or no negative for the label. With each label's AUCs."""
    from ichscan.metrics import roc_auc

    rows = np.arange(len(truth)) if rows is None else rows
    order = [default, *[m for m in methods if m != default]]  # max() keeps the first of equals
    specs, aucs = [], {}
    for j, name in enumerate(labels):
        y = truth[rows, j]
        if not 0 < y.sum() < len(y):
            specs.append(LabelAggregation(default, top_k))
            aucs[name] = {}
            continue
        aucs[name] = {m: float(roc_auc(y, columns[f"adapted_{m}"][rows, j])) for m in methods}
        pick = max(order, key=lambda m: aucs[name][m])
        specs.append(LabelAggregation(pick, top_k, fit_platt(evidences[pick][rows, j], y)))
    return specs, aucs


def apply_per_label(specs: Sequence[LabelAggregation], columns: dict[str, np.ndarray],
                    evidences: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The series probabilities (rows x labels) ``specs`` give: each label's Platt map of its aggregation's
    evidence, or the aggregation's own probability where it has no map (``aggregate_per_label``'s numbers)."""
    out = np.empty((len(rows), len(specs)))
    for j, spec in enumerate(specs):
        if spec.platt is None:
            out[:, j] = columns[f"adapted_{spec.method}"][rows, j]
        else:
            out[:, j] = spec.calibrated(evidences[spec.method][rows, j])
    return out


@dataclass
class CrossvalResult:
    out_dir: Path
    series: pd.DataFrame  # OOF series predictions, truth and folds
    comparison: pd.DataFrame  # AUC per label and weighted log loss per model and aggregation
    evaluation: Any  # metrics.Evaluation of the primary aggregation on the OOF series
    thresholds: dict[str, float]
    final: Path | None


def _aggregations(options: CrossvalOptions) -> list[str]:
    return [*SLICE_AGGREGATIONS, *(["context"] if options.series_head else [])]


def _series_probs(items: Sequence[SeriesFeatures], slice_probs: np.ndarray, method: str, top_k: int) -> np.ndarray:
    return np.stack([aggregate(slice_probs[s.rows], method, top_k)[0] for s in items])


def _fit_head(model: Any, slices: Any, targets: pd.DataFrame, options: CrossvalOptions, config: TrainConfig,
              seed: int, say: Callable[[str], None]) -> Any:
    return train_series_head(model, slices, targets, kind=options.head_kind, hidden=options.head_hidden,
                             recipe=dataclasses.replace(options.head, seed=seed), augment=config.augment,
                             augmented_passes=options.augmented_passes, pooling=config.mil_pooling,
                             batch_size=config.batch_size, say=say)


def _fit_backbone(config: TrainConfig, train_set: Any, out: Path, progress: Any, summary: dict[str, Any]) -> Any:
    """The fold's model: ``config.epochs`` of fine-tuning from ``config.init`` (resumable), or with 0 epochs the
    starting model itself, frozen (only a series head is then fitted on the site's data)."""
    from ichscan.model import init_model_from, load_checkpoint

    if config.epochs == 0:
        if not config.init:
            raise IchscanError("--epochs 0 keeps the starting model as it is: give --init")
        model, _, _ = init_model_from(config.init, labels=tuple(config.labels))
        model.series_head = None
        return model.eval()
    result = train(config, train_set, None, out, resume=(out / "resume.pt").is_file(), progress=progress,
                   data_summary=summary)
    model, _ = load_checkpoint(result.last)
    return model


def _member_configs(config: TrainConfig, init: str | None, members: int,
                    say: Callable[[str], None]) -> list[TrainConfig]:
    """One training config per model of a fold: ``config`` resolved against each of the first ``members``
    checkpoints of ``init``; all must take the same input (windows and size), as one preprocessing serves them."""
    if members < 1:
        raise IchscanError(f"--members {members}: at least one model per fold")
    if members == 1 or not init:
        if members > 1:
            raise IchscanError(f"--members {members} fine-tunes members of an ensemble --init; there is no --init")
        return [resolve_init(config, say)]
    from ichscan.model import init_member_checkpoints

    paths = init_member_checkpoints(init)
    if len(paths) < members:
        raise IchscanError(f"--members {members}: --init {init} has {len(paths)}")
    configs = [resolve_init(dataclasses.replace(config, init=str(p)), say) for p in paths[:members]]
    first = configs[0]
    for c in configs[1:]:
        if (c.windows, c.image_size) != (first.windows, first.image_size):
            raise IchscanError(f"--members {members}: {c.init} takes {c.image_size} px {list(c.windows)}, member 1 "
                               f"{first.image_size} px {list(first.windows)}; fine-tune members of one input only")
    return configs


def _member_dir(fold_dir: Path, i: int, n: int) -> Path:
    return fold_dir if n == 1 else fold_dir / f"member-{i}"


def _predict_slices(models: Sequence[Any], slices: Any, config: TrainConfig, options: CrossvalOptions,
                    weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Out-of-fold predictions made as ``ichscan predict`` makes them (``Predictor``, one series at a time, the
    TTA views averaged, the members averaged with ``weights``): slice probabilities, and with a series head
    the context slice and series probabilities."""
    from ichscan.predict import Predictor

    common = dict(windows=model_windows(config), image_size=config.image_size, tta=options.tta,
                  batch_size=config.batch_size, device=config.device or "cpu", precision=config.precision)
    plain = Predictor.from_models(models, aggregation="max", weights=weights, **common)
    context = Predictor.from_models(models, aggregation="context", **common) if options.series_head else None
    n, width = len(slices), len(config.labels)
    out: dict[str, Any] = {"slice": np.full((n, width), np.nan)}
    if context is not None:
        out.update(context_slice=np.full((n, width), np.nan), context_series=[], context_uids=[])
    for rows in series_order(slices.frame):
        images = np.stack([slices.image(int(i)) for i in rows])
        out["slice"][rows] = plain.predict_arrays(images)
        if context is not None:
            slice_probs, series_probs, _ = context.predict_series_arrays(images)
            out["context_slice"][rows] = slice_probs
            out["context_series"].append(series_probs)
            out["context_uids"].append(str(slices.frame["series_uid"].iloc[rows[0]]))
    if context is not None:
        out["context_series"] = np.stack(out["context_series"])
        out["context_uids"] = np.asarray(out["context_uids"])
    return out


def _start_members(init: str, config: TrainConfig, say: Callable[[str], None]) -> tuple[Any, list[Any]]:
    """The starting model as loaded (an ``Ensemble``; one checkpoint is an ensemble of one) and those of its
    members that take this run's input (windows and size), unadapted: what the baseline scores and what
    ``keep_start`` averages with."""
    from ichscan.model import load_ensemble
    from ichscan.windows import get_windows

    ensemble = load_ensemble(init, labels=LABELS)
    want = (tuple(get_windows(config.windows)), int(config.image_size))
    members = [m for m in ensemble.members if (tuple(m.meta.windows), int(m.meta.image_size)) == want]
    if not members:
        raise IchscanError(f"no member takes this run's input ({config.image_size} px, {list(config.windows)})",
                           init)
    if len(members) < len(ensemble.members):
        say(f"{len(ensemble.members) - len(members)} member(s) of {init} take other input; left out")
    return ensemble, members


def _fold_sets(frame: pd.DataFrame, rows: np.ndarray, config: TrainConfig, cache: Path, targets: pd.DataFrame):
    from ichscan.data import SliceDataset

    part = frame.iloc[rows].reset_index(drop=True)
    slices = SliceDataset(part, config.image_size, config.windows, config.labels, cache=cache)
    if config.label_level == "slice":
        train_slices = SliceDataset(part[part[list(config.labels)].notna().all(axis=1)].reset_index(drop=True),
                                    config.image_size, config.windows, config.labels, cache=cache)
        return slices, train_slices
    return slices, SeriesDataset(slices, targets, max_slices=config.max_series_slices)


def _slice_truth(frame: pd.DataFrame, labels: Sequence[str]) -> np.ndarray:
    return np.stack([frame[c].to_numpy(np.float32) for c in labels], axis=1)


def _baseline_probs(ensemble: Any, members: Sequence[Any], frame: pd.DataFrame, config: TrainConfig,
                    cache: Path, options: CrossvalOptions) -> tuple[np.ndarray, dict[str, Any]]:
    """The starting model (``_start_members``) on every slice, made as the out-of-fold predictions are
    (``_predict_slices``: one series at a time, the same TTA views, the members averaged by their weights),
    so that the gain over it measures the adaptation and nothing else."""
    from ichscan.data import SliceDataset

    slices = SliceDataset(frame, config.image_size, config.windows, config.labels, cache=cache)
    plain = dataclasses.replace(options, series_head=False)  # the starting model has no head to score
    probs = _predict_slices([m.model for m in members], slices, config, plain,
                            weights=[m.weight for m in members])["slice"]
    aggregation = (ensemble.manifest.aggregation if ensemble.manifest is not None else None) or {"method": "max"}
    return probs, {"members": len(members), "aggregation": aggregation, "tta": list(options.tta),
                   "operating_points": ensemble.manifest.thresholds if ensemble.manifest is not None else None}


def _refuse_another_run(out: Path, resume: bool) -> None:
    if (out / "crossval.json").is_file() and not resume:
        raise IchscanError("a cross-validation is already in this folder; continue it with --resume or "
                           "choose another --out", out)


def _check_resume(out: Path, record: dict[str, Any], resume: bool) -> None:
    path = out / "crossval.json"
    if path.is_file():
        _refuse_another_run(out, resume)
        before = json.loads(path.read_text())
        changed = sorted(k for k in ("config", "options", "data")
                         if _comparable(before.get(k), k) != _comparable(record.get(k), k))
        if changed:
            raise IchscanError(f"{', '.join(changed)} differ from the interrupted cross-validation's; resume "
                               "with the same settings", out)
    elif resume and any(out.glob("fold-*")):
        raise IchscanError("no crossval.json to resume from; start again without --resume", out)


def _comparable(value: Any, key: str) -> Any:
    value = json.loads(json.dumps(value, default=str))
    if key == "config" and isinstance(value, dict):
        from ichscan.train import MACHINE_SETTINGS

        return {k: v for k, v in value.items() if k not in MACHINE_SETTINGS}
    if key == "options" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in RESUME_FREE}
    return value


def run_crossval(config: TrainConfig, data: str | os.PathLike, out_dir: str | os.PathLike, *,
                 options: CrossvalOptions | None = None, labels_csv: str | os.PathLike | None = None,
                 series_csv: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                 io_workers: int | None = None, resume: bool = False,
                 report: Callable[[str], None] | None = None, progress: Callable[[Any], None] | None = None,
                 data_progress: Callable[[str, int, int], None] | None = None) -> CrossvalResult:
    """Cross-validate ``config`` on ``data`` and train the final model (see the module docstring)."""
    from ichscan.data import assign_folds
    from ichscan.metrics import choose_thresholds, evaluate, threshold_method_problem
    from ichscan.model import save_checkpoint
    from ichscan.report import table1_markdown, write_roc, write_table1

    options = options or CrossvalOptions()
    say = report or (lambda line: log.info("%s", line))
    out = Path(out_dir)
    if options.folds < 2:
        raise IchscanError(f"--folds {options.folds}: cross-validation needs at least 2")
    original_init = config.init
    if not 0.0 <= options.keep_start < 1.0:
        raise IchscanError(f"--keep-start {options.keep_start:g}: the starting model's share must lie in [0, 1)")
    if options.keep_start and not original_init:
        say("no starting model (--init): nothing to keep, so each fold's model is the one trained alone")
        options = dataclasses.replace(options, keep_start=0.0)
    if options.keep_start and options.series_head:
        raise IchscanError("a series head needs --keep-start 0: the blend with the starting model, which has "
                           "no series head, is aggregated by the mean of the top k slices")
    if problem := threshold_method_problem(options.threshold_method, options.n_bootstrap):  # now, not after folds
        raise IchscanError(f"--threshold-method {problem}")
    computed = _aggregations(options)
    if options.aggregation not in (None, "auto", PER_LABEL, *computed):  # said now, not after every fold trained
        raise IchscanError(f"--aggregation {options.aggregation}: this cross-validation computes "
                           f"{', '.join(computed)}, or auto, or {PER_LABEL}"
                           + (" (context needs the series head: --keep-start 0)"
                              if options.aggregation == "context" else ""))
    _refuse_another_run(out, resume)  # before phantoms are drawn for --replay auto
    config = resolve_replay(config, out, workers=io_workers, say=say)
    member_configs = _member_configs(config, original_init, options.members, say)
    config = member_configs[0]
    labels = list(config.labels)

    data_root = Path(data)
    index_cache = None if os.access(data_root, os.W_OK) else out / "index.parquet"
    loaded, targets = load_series_data(
        data_root, level="both", labels_csv=labels_csv, series_csv=series_csv, index_cache=index_cache,
        workers=io_workers,
        progress=(lambda d, t: data_progress("index", d, t)) if data_progress else None, labels=labels)
    for line in loaded.lines():
        say(line)
    frame = loaded.frame.reset_index(drop=True)
    slice_truth = _slice_truth(frame, labels)  # kept for OOF slice metrics even when training withholds them
    if config.label_level == "series":  # withheld from training; still the truth for OOF slice metrics
        frame = frame.copy()
        frame[labels] = np.nan
    if config.label_level == "slice" and np.isnan(slice_truth).all():
        raise DataError("no slice labels to train on at --label-level slice; use --label-level series", data)

    # Folds by patient, stratified on the series' `any`.
    strat = frame[["patient_id", "study_uid"]].copy()
    strat["any"] = targets.loc[frame["series_uid"].astype(str), "any"].to_numpy()
    folds = assign_folds(strat, options.folds, seed=FOLD_SEED)
    record = {"format": CROSSVAL_FORMAT, "config": config.to_dict(), "options": options.to_dict(),
              "data": {"source": os.fspath(data), "slices": int(len(frame)), "series": int(len(targets)),
                       "patients": int(frame["patient_id"].nunique()), "label_level": config.label_level}}
    _check_resume(out, record, resume)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "crossval.json", record)
    series_rows = series_order(frame)
    fold_table = pd.DataFrame({
        "series_uid": [str(frame["series_uid"].iloc[r[0]]) for r in series_rows],
        "patient_id": [str(frame["patient_id"].iloc[r[0]]) for r in series_rows],
        "fold": [int(folds[r[0]]) for r in series_rows],
    })
    write_csv(out / "folds.csv", fold_table, index=False)
    say(f"{len(fold_table)} series of {fold_table['patient_id'].nunique()} patients in {options.folds} folds "
        f"(grouped by patient): " + ", ".join(str(int((fold_table['fold'] == k).sum())) for k in range(options.folds)))

    cache_dir = Path(cache) if cache else out / "cache"
    _ensure_cache(cache_dir, frame, config, io_workers,
                  (lambda d, t: data_progress("cache", d, t)) if data_progress else None, say)
    # Replayed beside every fold's training data (a draw of its own per fold and model): never predicted, so
    # it cannot leak a site patient into a fold; the OOF guard below holds as before.
    replay_set = None
    if config.replay:
        replay_root = Path(config.replay)
        replay_set = load_replay(
            config, cache=out / "replay-cache",
            index_cache=None if os.access(replay_root, os.W_OK) else out / "replay-index.parquet",
            io_workers=io_workers, say=say,
            progress=(lambda d, t: data_progress("replay", d, t)) if data_progress else None)

    # ---- the starting model, unadapted: scored on every slice (its predictions depend on no fold) and kept
    start = (_start_members(original_init, config, say)
             if original_init and (options.baseline or options.keep_start) else None)
    baseline_path = out / "baseline_slices.npy"
    baseline_info: dict[str, Any] = {}
    if options.baseline and original_init:
        if baseline_path.is_file() and (out / "baseline.json").is_file():
            baseline = np.load(baseline_path)
            baseline_info = json.loads((out / "baseline.json").read_text())
        # scored before the baseline took the OOF predictions' TTA views (or with others): score it again
        if baseline_info.get("tta") != list(options.tta):
            say(f"scoring the starting model {original_init} on {len(frame)} slices")
            baseline, baseline_info = _baseline_probs(*start, frame, config, cache_dir, options)
            baseline = baseline.astype(np.float32)  # as stored: a resumed run reads the very same numbers
            write_npy(baseline_path, baseline)
            write_json(out / "baseline.json", baseline_info)
    else:
        baseline = None

    kept = start[1] if options.keep_start else []
    start_models = [m.model.eval() for m in kept]
    start_weights = [options.keep_start * m.weight / sum(k.weight for k in kept) for m in kept]
    start_paths = [m.meta.path for m in kept]
    tuned_weights = [(1.0 - options.keep_start) / len(member_configs)] * len(member_configs)
    if start_models:
        say(f"each fold's model: the fine-tuned model(s) averaged with {len(start_models)} member(s) of "
            f"{original_init} as they are (their share {options.keep_start:g})")

    # ---- folds
    oof_slice = np.full((len(frame), len(labels)), np.nan)
    oof_context_slice = np.full((len(frame), len(labels)), np.nan)
    series_probs: dict[str, dict[str, np.ndarray]] = {}
    for k in range(options.folds):
        fold_dir = out / f"fold-{k}"
        done = fold_dir / "fold.json"
        val_rows = np.flatnonzero(folds == k)
        train_rows = np.flatnonzero(folds != k)
        if not done.is_file():
            say(f"fold {k + 1}/{options.folds}: training on {len(train_rows)} slices, "
                f"predicting {len(val_rows)} of patients it never sees")
            fold_config = dataclasses.replace(config, seed=config.seed + k)
            train_slices, train_set = _fold_sets(frame, train_rows, fold_config, cache_dir, targets)
            val_slices, _ = _fold_sets(frame, val_rows, fold_config, cache_dir, targets)
            # Guard: the models predicting these patients were trained without them.
            assert not set(train_slices.frame["patient_id"]) & set(val_slices.frame["patient_id"])
            fold_out: dict[str, Any] = {"fold": k, "train_patients": sorted(set(train_slices.frame["patient_id"])),
                                        "val_rows": val_rows.tolist(), "members": len(member_configs)}
            models = []
            for i, member_config in enumerate(member_configs):
                seed = config.seed + k + 100 * i
                member_dir = _member_dir(fold_dir, i, len(member_configs))
                member_config = dataclasses.replace(member_config, seed=seed)
                member_set = with_replay(member_config, train_set, replay_set, say)
                model = _fit_backbone(member_config, member_set, member_dir, progress,
                                      {"source": os.fspath(data), "crossval_fold": k, "train": member_set.summary()})
                if options.series_head:
                    _fit_head(model, train_slices, targets, options, member_config, seed, say)
                    save_checkpoint(member_dir / "model", model, {
                        "windows": model_windows(config), "image_size": config.image_size,
                        "config": member_config.to_dict(), "data": {"crossval_fold": k}})
                models.append(model)
            fold_arrays = _predict_slices(models + start_models, val_slices, config, options,
                                          weights=tuned_weights + start_weights)
            buf = io.BytesIO()
            np.savez(buf, **fold_arrays)
            write_bytes(fold_dir / "oof.npz", buf.getvalue())
            write_json(done, fold_out)
        arrays = np.load(fold_dir / "oof.npz")
        oof_slice[val_rows] = arrays["slice"]
        if options.series_head:
            oof_context_slice[val_rows] = arrays["context_slice"]
            for uid, p in zip(arrays["context_uids"], arrays["context_series"]):
                series_probs.setdefault("context", {})[str(uid)] = p

    # ---- OOF series table
    items = [SeriesFeatures(str(frame["series_uid"].iloc[r[0]]), np.zeros((len(r), 0)), np.zeros((len(r), 0)),
                            slice_truth[r], targets.loc[str(frame["series_uid"].iloc[r[0]]), labels].to_numpy(),
                            r) for r in series_rows]
    uids = [s.series_uid for s in items]
    truth = np.stack([s.series_y for s in items]).astype(np.float64)
    patients = fold_table["patient_id"].to_numpy()
    table = fold_table.copy()
    for name, j in zip(labels, range(len(labels))):
        table[f"true_{name}"] = truth[:, j].astype(int)
    columns: dict[str, np.ndarray] = {}
    for method in _aggregations(options):
        if method == "context":
            probs = np.stack([series_probs["context"][u] for u in uids])
        else:
            probs = _series_probs(items, oof_slice, method, options.top_k)
        columns[f"adapted_{method}"] = probs
    if baseline is not None:
        for method in SLICE_AGGREGATIONS:
            columns[f"baseline_{method}"] = _series_probs(items, baseline, method, options.top_k)
    evidences = {m: np.stack([evidence(oof_slice[s.rows], m, options.top_k) for s in items])
                 for m in SLICE_AGGREGATIONS} if options.aggregation == PER_LABEL else {}
    chosen, auto = _resolve_aggregation(options, truth, columns, fold_table["fold"].to_numpy(), labels, evidences)
    for key, probs in columns.items():
        for j, name in enumerate(labels):
            table[f"{key}_{name}"] = probs[:, j]
    # Full precision: noisy-OR sits within 1e-7 of 1 for most series, and six digits would turn its ranking
    # into ties (an AUC recomputed from the file fell from 0.879 to 0.841 on ctich-dev).
    write_csv(out / "oof_series.csv", table, index=False)
    slices_out = frame[["image_id", "series_uid", "patient_id", "z"]].copy()
    slices_out["fold"] = folds
    for j, name in enumerate(labels):
        slices_out[f"true_{name}"] = slice_truth[:, j]
        slices_out[f"prob_{name}"] = oof_slice[:, j]
        if options.series_head:
            slices_out[f"context_{name}"] = oof_context_slice[:, j]
        if baseline is not None:
            slices_out[f"baseline_{name}"] = baseline[:, j]
    write_csv(out / "oof_slices.csv", slices_out, index=False)

    # ---- comparison, Table 1, Figure 1, thresholds
    from ichscan.metrics import roc_auc, weighted_log_loss

    def aucs(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        """``auc_<label>``, then ``bleeding_auc_<subtype>``: each subtype among the rows with any bleed
        alone (docs/evaluation.md: which bleed it is, not whether); NaN without both classes (``roc_auc``)."""
        out = {f"auc_{name}": roc_auc(y[:, j], probs[:, j]) for j, name in enumerate(labels)}
        bleed = y[:, labels.index("any")] == 1 if "any" in labels else None
        out.update({f"bleeding_auc_{name}": roc_auc(y[bleed, j], probs[bleed, j])
                    for j, name in enumerate(labels) if bleed is not None and name != "any"})
        return out

    rows = []
    for key, probs in columns.items():
        row = {"model": key.split("_", 1)[0], "aggregation": key.split("_", 1)[1], **aucs(truth, probs)}
        row["weighted_log_loss"] = weighted_log_loss(truth, np.clip(probs, 0, 1), labels=labels)
        rows.append(row)
    known = ~np.isnan(slice_truth).any(axis=1)
    if known.any():
        for key, probs in (("adapted", oof_slice), ("baseline", baseline)):
            if probs is None:
                continue
            row = {"model": key, "aggregation": "slices", **aucs(slice_truth[known], probs[known])}
            row["weighted_log_loss"] = weighted_log_loss(slice_truth[known], probs[known], labels=labels)
            rows.append(row)
    comparison = pd.DataFrame(rows)
    write_csv(out / "comparison.csv", comparison, index=False, float_format="%.4f")

    if auto is not None:
        write_json(out / "aggregation.json", auto)
    elif (out / "aggregation.json").exists():  # of an earlier run in this folder; not of this one
        (out / "aggregation.json").unlink()
    primary = columns[f"adapted_{chosen}"]
    # with the interval each threshold's choice falls in over resampled patients: on a site's few dozen
    # series it is often wide (docs/evaluation.md, operating points)
    points = choose_thresholds(truth, primary, labels=labels, method=options.threshold_method,
                               source={"crossval": os.fspath(out), "aggregation": chosen,
                                       "predictions": "out-of-fold series"},
                               n_bootstrap=options.n_bootstrap, groups=patients)
    write_json(out / "thresholds.json", points.to_dict())
    ev = evaluate(truth, np.clip(primary, 0, 1), groups=patients, ids=uids, labels=labels,
                  thresholds=points.thresholds, n_bootstrap=options.n_bootstrap, level="series",
                  source={"crossval": os.fspath(out), "aggregation": chosen, "predictions": "out-of-fold"})
    write_table1(ev, out, stem="table1_series")
    write_roc(ev, out, stem="roc_series")
    slice_ev = None
    if known.any():
        slice_ev = evaluate(slice_truth[known], np.clip(oof_slice[known], 0, 1), groups=frame["patient_id"][known],
                            labels=labels, thresholds=0.5, n_bootstrap=options.n_bootstrap, level="slice",
                            source={"crossval": os.fspath(out), "predictions": "out-of-fold"})
        write_table1(slice_ev, out, stem="table1_slices")
        write_roc(slice_ev, out, stem="roc_slices")
    gain = None
    if baseline is not None:
        # The gain over the starting model as a paired difference on the same series (ichscan compare):
        # the adapted model's primary aggregation against the starting model's, or its top-3 mean.
        from ichscan.comparison import compare, write_comparison

        base_key = f"baseline_{chosen}" if f"baseline_{chosen}" in columns else "baseline_topk"
        gain = compare(truth, np.clip(columns[base_key], 0, 1), np.clip(primary, 0, 1), groups=patients,
                       labels=labels, n_bootstrap=options.n_bootstrap, level="series",
                       names=(base_key.replace("_", " "), f"adapted {chosen}"),
                       source={"crossval": os.fspath(out), "predictions": "out-of-fold series"})
        write_comparison(gain, out, stem="gain")
    write_text(out / "crossval.md", _markdown(record, comparison, ev, slice_ev, points, options, table1_markdown,
                                              gain, chosen, auto))

    # ---- the final model, on everything, with the OOF operating points
    final_path = None
    if options.final:
        final_dir = out / "final"
        n = len(member_configs)
        final_json = final_dir / ("model.json" if n == 1 and not start_paths else "ensemble.json")
        if final_json.is_file():
            final_path = final_json
        else:
            say(f"final model: training {'' if n == 1 else f'{n} models '}on all {len(frame)} slices of "
                f"{len(targets)} series")
            all_rows = np.arange(len(frame))
            all_slices, train_set = _fold_sets(frame, all_rows, config, cache_dir, targets)
            summary = {name: {"auc": ev[name].auc.value} for name in labels}
            about = {
                "metrics": {"crossval": os.fspath(out), "oof_series": summary},
                "operating_points": points.to_dict(),
                "aggregation": {"method": chosen, "top_k": options.top_k,
                                **({"labels": auto["labels"],
                                    "chosen_on": "out-of-fold series AUC of each label, Platt maps fitted on the "
                                                 "same series (ichscan crossval --aggregation per_label)"}
                                   if chosen == PER_LABEL else
                                   {"chosen_on": "out-of-fold series AUC of any (ichscan crossval --aggregation auto)"}
                                   if auto is not None else {})},
                "trained_on": f"{os.fspath(data)}: {len(targets)} series, {config.label_level} labels, fine-tuned "
                              f"from {original_init or 'scratch'} (ichscan crossval)"
                              + (f", averaged with it as it was (its share {options.keep_start:g})"
                                 if start_paths else ""),
            }
            checkpoints = []
            for i, member_config in enumerate(member_configs):
                seed = config.seed + options.folds + 100 * i
                member_config = dataclasses.replace(member_config, seed=config.seed + 100 * i)
                member_dir = _member_dir(final_dir, i, n)
                member_set = with_replay(member_config, train_set, replay_set, say)
                model = _fit_backbone(member_config, member_set, member_dir, progress,
                                      {"source": os.fspath(data), "train": member_set.summary()})
                if options.series_head:
                    _fit_head(model, all_slices, targets, options, member_config, seed, say)
                checkpoints.append(save_checkpoint(member_dir / "model", model, {
                    "windows": model_windows(config), "image_size": config.image_size,
                    "config": member_config.to_dict(),
                    "data": {"source": os.fspath(data), "series": int(len(targets)), "slices": int(len(frame)),
                             "label_level": config.label_level},
                    **(about if final_json.name == "model.json" else {}),
                }))
            if final_json.name == "model.json":
                final_path = checkpoints[0]
            else:
                from ichscan.model import copy_checkpoint, write_ensemble

                # The starting model's members are copied beside the fine-tuned ones, so that the final model
                # does not change when the starting model (the bundled one, say) does.
                for i, path in enumerate(start_paths):
                    checkpoints.append(copy_checkpoint(path, final_dir / f"start-{i}"))
                final_path = write_ensemble(final_json, checkpoints, tuned_weights + start_weights, sha256=True,
                                            extra=about)
        say(f"final model: {final_path}")
    return CrossvalResult(out, table, comparison, ev, dict(points.thresholds), final_path)


def model_windows(config: TrainConfig) -> list[dict[str, Any]]:
    from ichscan.windows import get_windows

    return [w.to_dict() for w in get_windows(config.windows)]


def _resolve_aggregation(options: CrossvalOptions, truth: np.ndarray, columns: dict[str, np.ndarray],
                         folds: np.ndarray, labels: Sequence[str], evidences: dict[str, np.ndarray] | None = None
                         ) -> tuple[str, dict[str, Any] | None]:
    """The aggregation the run goes on with, and for ``auto`` what chose it: each aggregation's OOF AUC, the
    choice on every fold's complement and the nested estimate, whose probabilities are added to ``columns``
    as ``adapted_auto`` (each fold's series by the aggregation chosen without them). ``per_label`` adds
    ``adapted_per_label`` (choices and maps made on all the OOF series) and ``adapted_per_label_nested``
    (each fold's series by the choices and maps made on the other folds' OOF series alone)."""
    methods = [k.split("_", 1)[1] for k in columns if k.startswith("adapted_") and k != "adapted_auto"]
    wanted = options.aggregation or options.primary
    if wanted == PER_LABEL:
        return PER_LABEL, _resolve_per_label(options, truth, columns, folds, labels, evidences or {})
    if wanted != "auto":  # run_crossval refused any other before training
        return wanted, None
    chosen, aucs = choose_aggregation(truth, columns, methods, options.primary, labels)
    nested = np.zeros_like(columns[f"adapted_{chosen}"])
    per_fold = {}
    for k in sorted(set(int(f) for f in folds)):
        inside = folds == k
        pick, fold_aucs = choose_aggregation(truth, columns, methods, options.primary, labels, np.flatnonzero(~inside))
        nested[inside] = columns[f"adapted_{pick}"][inside]
        per_fold[str(k)] = {"chosen": pick, "auc_any_on_the_other_folds": fold_aucs}
    columns["adapted_auto"] = nested
    from ichscan.metrics import roc_auc

    j = list(labels).index(AUTO_LABEL)
    y = truth[:, j]
    return chosen, {
        "chosen": chosen, "by": f"out-of-fold series AUC of {AUTO_LABEL}", "default": options.primary,
        "auc_any": aucs, "folds": per_fold,
        "nested_auc_any": float(roc_auc(y, nested[:, j])) if 0 < y.sum() < len(y) else None,
        "nested": "each fold's series scored by the aggregation chosen on the other folds' out-of-fold series "
                  "(adapted_auto in comparison.csv and oof_series.csv)",
    }


def _resolve_per_label(options: CrossvalOptions, truth: np.ndarray, columns: dict[str, np.ndarray],
                       folds: np.ndarray, labels: Sequence[str], evidences: dict[str, np.ndarray]) -> dict[str, Any]:
    from ichscan.metrics import roc_auc

    methods = [m for m in SLICE_AGGREGATIONS if f"adapted_{m}" in columns]
    default = options.primary if options.primary in methods else "topk"
    everything = np.arange(len(truth))
    specs, aucs = choose_per_label(truth, columns, evidences, methods, default, labels, options.top_k)
    nested = np.zeros((len(truth), len(labels)))
    per_fold = {}
    for k in sorted(set(int(f) for f in folds)):
        inside = np.flatnonzero(folds == k)
        fold_specs, _ = choose_per_label(truth, columns, evidences, methods, default, labels, options.top_k,
                                         np.flatnonzero(folds != k))
        nested[inside] = apply_per_label(fold_specs, columns, evidences, inside)
        per_fold[str(k)] = {name: spec.to_dict() for name, spec in zip(labels, fold_specs)}
    columns[f"adapted_{PER_LABEL}"] = apply_per_label(specs, columns, evidences, everything)
    columns[f"adapted_{PER_LABEL}_nested"] = nested

    def auc(j, probs):
        y = truth[:, j]
        return float(roc_auc(y, probs[:, j])) if 0 < y.sum() < len(y) else None

    return {
        "method": PER_LABEL, "default": default, "by": "out-of-fold series AUC of each label",
        "labels": {name: spec.to_dict() for name, spec in zip(labels, specs)},
        "auc": aucs, "folds": per_fold,
        "nested_auc": {name: auc(j, nested) for j, name in enumerate(labels)},
        "nested": "each fold's series scored by the aggregations chosen and the Platt maps fitted on the other "
                  "folds' out-of-fold series alone (adapted_per_label_nested in comparison.csv and oof_series.csv)",
    }


def _points_markdown(points: Any) -> list[str]:
    """The operating points of ``thresholds.json`` as a table: each label's threshold, the interval and median
    of the thresholds the same rule chose on resampled patients, and the out-of-fold sensitivity and
    specificity at it. On a site's few dozen series the interval is often wide; a threshold far from the
    median, at one end of it, is where these series put it more than where the model would."""
    from ichscan.report import format_number as num

    lines = ["## Operating points (`thresholds.json`)", "",
             "| label | threshold | 95% interval over resampled patients | their median | sensitivity | "
             "specificity |", "|---|---|---|---|---|---|"]
    for name, t in points.thresholds.items():
        d = points.details.get(name)
        if not d:
            lines.append(f"| {name} | {t:.3f} | NA | NA | NA | NA |")
            continue
        ci = d.get("threshold_ci")
        lines.append(f"| {name} | {t:.3f} | {'NA' if not ci else f'{ci[0]:.3f}-{ci[1]:.3f}'} | "
                     f"{num(d.get('threshold_median'))} | {num(d.get('sensitivity'))} | {num(d.get('specificity'))} |")
    notes = [f"{name}: {note}" for name, note in points.notes.items()]
    return lines + ([""] + notes if notes else []) + [
        "", "Sensitivity and specificity are at the threshold on these same out-of-fold series (optimistic). "
        "`--threshold-method youden-median` takes the median as the point (docs/evaluation.md)."]


def _markdown(record: dict[str, Any], comparison: pd.DataFrame, ev: Any, slice_ev: Any, points: Any,
              options: CrossvalOptions, table1_markdown: Callable[[Any], str], gain: Any = None,
              chosen: str | None = None, auto: dict[str, Any] | None = None) -> str:
    data = record["data"]
    lines = [
        f"# Cross-validation: {data['source']}",
        "",
        f"{options.folds}-fold, grouped by patient: {data['series']} series of {data['patients']} patients, "
        f"{data['slices']} slices, {data['label_level']} labels. Every prediction below comes from a model "
        f"that never saw that patient (out of fold).",
        "",
        "## Models and aggregations (series AUC per label; weighted log loss)",
        "",
        "| model | aggregation | " + " | ".join(c[4:] for c in comparison.columns if c.startswith("auc_"))
        + " | weighted log loss |",
        "|---|---|" + "---|" * (sum(c.startswith("auc_") for c in comparison.columns) + 1),
    ]
    for _, row in comparison.iterrows():
        cells = [f"{row[c]:.3f}" if pd.notna(row[c]) else "NA" for c in comparison.columns if c.startswith("auc_")]
        lines.append(f"| {row['model']} | {row['aggregation']} | " + " | ".join(cells)
                     + f" | {row['weighted_log_loss']:.4f} |")
    given = [c for c in comparison.columns if c.startswith("bleeding_auc_")]
    if given:
        lines += ["", "Which bleed it is: each subtype's AUC among the bleeding series (or slices) alone "
                  "(0.5: it cannot tell that subtype from the other bleeds; docs/evaluation.md).", "",
                  "| model | aggregation | " + " | ".join(c[len("bleeding_auc_"):] for c in given) + " |",
                  "|---|---|" + "---|" * len(given)]
        for _, row in comparison.iterrows():
            lines.append(f"| {row['model']} | {row['aggregation']} | "
                         + " | ".join(f"{row[c]:.3f}" if pd.notna(row[c]) else "NA" for c in given) + " |")
    adapted = ("fine-tuned per fold" if not options.keep_start else
               f"fine-tuned per fold and averaged with the starting model as it is (its share {options.keep_start:g})")
    lines += ["", f"`baseline`: the starting model without adaptation; `adapted`: {adapted}. `slices`: "
              "slice-level AUC over labelled slices.", ""]
    if gain is not None:
        from ichscan.comparison import comparison_markdown

        lines += ["## The gain over the starting model, paired on the same series (`gain.md`)", "",
                  comparison_markdown(gain)]
    chosen = chosen or options.primary
    if auto is not None and auto.get("method") == PER_LABEL:
        def named(spec):
            return describe_aggregation(spec["method"], spec.get("top_k", options.top_k))

        lines += ["## Each label's aggregation, chosen on these series (`--aggregation per_label`, "
                  "`aggregation.json`)", "",
                  "| label | chosen (Platt map a, b) | out-of-fold AUC of each | nested AUC "
                  "| chosen without each fold |",
                  "|---|---|---|---|---|"]
        for name, spec in auto["labels"].items():
            platt = f" ({spec['platt'][0]:.3f}, {spec['platt'][1]:.3f})" if "platt" in spec else ""
            each = ", ".join(f"{m} {a:.3f}" for m, a in auto["auc"][name].items()) or "NA"
            nested = auto["nested_auc"][name]
            folds = ", ".join(f"{k}: {named(v[name])}" for k, v in auto["folds"].items())
            lines.append(f"| {name} | {named(spec)}{platt} | {each} | {'NA' if nested is None else f'{nested:.3f}'} "
                         f"| {folds} |")
        lines += ["", "Chosen and calibrated on the series they are judged by, `adapted per_label` flatters itself; "
                  "`adapted per_label_nested` scores each fold's series by the choices and maps made without them.",
                  ""]
    elif auto is not None:
        folds = ", ".join(f"{k}: {v['chosen']}" for k, v in auto["folds"].items())
        nested = f"{auto['nested_auc_any']:.3f}" if auto["nested_auc_any"] is not None else "NA"
        lines += ["## The aggregation, chosen on these series (`--aggregation auto`, `aggregation.json`)", "",
                  f"`{chosen}`: the highest out-of-fold series AUC for `any` ("
                  + ", ".join(f"{m} {a:.3f}" for m, a in auto["auc_any"].items()) + "). Chosen on the series it is "
                  f"judged by, so that figure flatters it; the nested estimate, each fold's series scored by the "
                  f"aggregation chosen on the other folds (folds {folds}), is `auto` above: `any` {nested}.", ""]
    lines += [f"## Table 1: out-of-fold series, aggregation `{chosen}`", "",
              f"Thresholds ({points.method}) chosen on these same out-of-fold predictions: ACC, PREC and REC at "
              "them are optimistic; AUC and log loss do not depend on them.", "", table1_markdown(ev), "",
              *_points_markdown(points)]
    if slice_ev is not None:
        lines += ["", "## Table 1: out-of-fold slices (threshold 0.5)", "", table1_markdown(slice_ev)]
    return "\n".join(lines) + "\n"
