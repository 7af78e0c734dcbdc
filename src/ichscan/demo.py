"""The one-command demo: phantoms -> two models -> TTA + ensemble prediction -> Table 1, Figure 1, HTML.

Every step goes through the same library calls a user makes on real data (``ichscan phantom``,
``ichscan train``, ``ichscan predict``, ``ichscan thresholds``, ``ichscan evaluate``); the demo only
chooses small settings that fit 2 CPU cores and 15 minutes. Where the cores are slower than that (no native
bf16, or shared), it measures a few training steps first and trains a random share of each epoch so that
the whole demo still fits its time budget (``DemoConfig.minutes``), and says so (:func:`plan_training`).
Each step keeps its outputs and is skipped when they are already complete, so an interrupted demo resumes
where it stopped, with the plan it made the first time.

Research software, not a medical device: a model trained on phantoms says nothing about patients.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ichscan.errors import IchscanError
from ichscan.fileio import write_json
from ichscan.hardware import cpu_count
from ichscan.labels import LABELS

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Sizes of the demo. The defaults fit the README's promise: 2 CPU cores, under 15 minutes."""

    seed: int = 2019
    train_studies: int = 320
    val_studies: int = 60
    test_studies: int = 100
    size: int = 128  # phantoms are rendered at the training size: no resampling on the way in
    slices: tuple[int, int] = (24, 32)
    thickness: float = 5.0
    # More bleeds than the generator's default, so that each subtype has enough held-out positives for an
    # AUC worth reading (about 15-20 of 100 test series each) ...
    prevalence: str = "any=0.65,epidural=0.2,intraparenchymal=0.22,intraventricular=0.2,subarachnoid=0.22,subdural=0.22"
    # ... and a training set enriched further, as one would for a rare finding: more positive slices per
    # minute of CPU. Validation and test keep ``prevalence``.
    train_prevalence: str = "any=0.8,epidural=0.3,intraparenchymal=0.3,intraventricular=0.3,subarachnoid=0.3,subdural=0.3"
    preset: str = "quick"
    epochs: int | None = None  # None: the preset's
    model_seeds: tuple[int, int] = (0, 1)  # the paper's final model averages two models
    tta: str = "flip"
    threshold_method: str = "youden"  # operating points chosen on the validation phantoms
    n_bootstrap: int = 1000
    # The whole demo's time budget in minutes, counted from the start of the run (None: no budget, every
    # epoch whole). Where the preset's epochs would not fit, each epoch trains a random share of its steps.
    minutes: float | None = 15.0
    precision: str = "auto"  # training and prediction: "auto" (bf16 where the CPU has it natively), "fp32", ...
    workers: int = field(default_factory=cpu_count)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# What the time budget's estimate assumes, measured for resnet10t at 128 px, batch 32, on 2 cores (7 Dec 2026):
# a forward pass costs 0.26 (bf16) to 0.29 (fp32) of a training step per image; prediction also reads and
# windows DICOM, where validation reads the uint8 cache; thresholds, bootstrap and report take about 20 s.
FORWARD_SHARE = 0.3
PREDICT_READING = 1.5
FIXED_SECONDS = 30.0
BUDGET_MARGIN = 0.93  # the plan aims at 93% of the budget: the estimate is a few steps' median on shared cores
MIN_EPOCH_SHARE = 0.25  # below a quarter of each epoch the quick models learn too little to show anything


@dataclass(frozen=True)
class TrainingPlan:
    """How much of each epoch the demo's models train, and why (``models/plan.json``)."""

    steps_per_epoch: int  # a whole epoch's steps (0: not counted, for a demo begun before plans were made)
    max_steps_per_epoch: int | None  # the steps each epoch trains; None: whole epochs
    seconds_per_step: float | None  # measured by the probe; None without a budget
    predicted_seconds: float | None  # the whole demo's predicted time with this plan
    budget_seconds: float | None
    note: str
    elapsed_seconds: float | None = None  # of the budget, when the plan was made (phantoms, caches, probe)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def share(self) -> float:
        return 1.0 if self.max_steps_per_epoch is None else self.max_steps_per_epoch / self.steps_per_epoch


def plan_training(*, budget_seconds: float | None, elapsed_seconds: float, seconds_per_step: float | None,
                  steps_per_epoch: int, epochs: int, models: int, val_batches: int,
                  predict_batches: int) -> TrainingPlan:
    """The steps per epoch that let the demo finish within ``budget_seconds`` of its start.

    Cost, in measured training steps (``seconds_per_step``): ``models * epochs`` epochs of training, each
    followed by a validation pass (``val_batches`` forward passes at ``FORWARD_SHARE`` of a step each), then
    prediction of the validation and test series (``predict_batches`` batches of views, every view of every
    slice by every model, forward passes that also read DICOM: ``PREDICT_READING``), then ``FIXED_SECONDS``.
    The training steps are what gives: whole epochs when they fit in ``BUDGET_MARGIN`` of the budget,
    else the most that fit, never under ``MIN_EPOCH_SHARE`` of an epoch (the plan's note then says the
    budget will be exceeded)."""
    if steps_per_epoch < 1 or epochs < 1 or models < 1:
        raise ValueError("a training plan needs at least one step, epoch and model")
    if budget_seconds is None or seconds_per_step is None:
        return TrainingPlan(steps_per_epoch, None, seconds_per_step, None, budget_seconds, "no time budget",
                            elapsed_seconds)
    s = seconds_per_step
    epochs_run = models * epochs
    other = (elapsed_seconds + epochs_run * val_batches * FORWARD_SHARE * s
             + predict_batches * FORWARD_SHARE * PREDICT_READING * s + FIXED_SECONDS)

    def total(steps: int) -> float:
        return other + epochs_run * steps * s

    fit = math.floor((BUDGET_MARGIN * budget_seconds - other) / (epochs_run * s))
    if fit >= steps_per_epoch:
        return TrainingPlan(steps_per_epoch, None, s, total(steps_per_epoch), budget_seconds,
                            f"whole epochs fit the {budget_seconds / 60:g}-minute budget", elapsed_seconds)
    floor_steps = max(1, math.ceil(MIN_EPOCH_SHARE * steps_per_epoch))
    steps = max(fit, floor_steps)
    note = (f"{steps} of {steps_per_epoch} steps per epoch ({steps / steps_per_epoch:.0%}), a random share "
            f"of each epoch's slices, to fit the {budget_seconds / 60:g}-minute budget at the measured "
            f"{s:.3f} s per step")
    if fit < floor_steps:
        note += (f"; the budget cannot be met on these cores (at least {MIN_EPOCH_SHARE:.0%} of each epoch "
                 f"is trained: about {total(steps) / 60:.1f} minutes in all)")
    return TrainingPlan(steps_per_epoch, steps, s, total(steps), budget_seconds, note, elapsed_seconds)


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    table1: Path
    roc: Path
    aucs: dict[str, float | None]
    weighted_log_loss: float | None
    seconds: dict[str, float]


def run_demo(out_dir: str | os.PathLike, config: DemoConfig | None = None, *,
             say: Callable[[str], None] | None = None, restart: bool = False,
             started_at: float | None = None) -> DemoResult:
    """Run (or resume) the demo under ``out_dir``; ``say`` receives one line per step. Two demos never
    write one folder at once (``fileio.lock_folder``). ``started_at`` (seconds since the epoch, as
    ``time.time()``): when the time budget began, if before this call (``make demo`` passes the moment it
    started, so that installing counts); by default, now."""
    from ichscan.fileio import lock_folder

    started = time.perf_counter()
    if started_at is not None:
        started -= max(0.0, time.time() - started_at)

    if restart and Path(out_dir).exists():
        with lock_folder(out_dir):  # not while another demo is writing it
            pass
        shutil.rmtree(out_dir)
    with lock_folder(out_dir):
        return _run_demo(out_dir, config, say=say, started=started)


def _run_demo(out_dir: str | os.PathLike, config: DemoConfig | None, *,
              say: Callable[[str], None] | None, started: float) -> DemoResult:
    from ichscan.data import find_images_dir
    from ichscan.metrics import choose_thresholds_files, evaluate_files, save_thresholds
    from ichscan.phantom import generate_dataset
    from ichscan.predict import Predictor, SelectionRules, predict_path
    from ichscan.report import series_entries, write_report
    from ichscan.train import PRESET_REASONS, RunInputs, TrainConfig, run_training

    config = config or DemoConfig()
    say = say or (lambda line: log.info("%s", line))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "demo_config.json"
    wanted = json.loads(json.dumps(config.to_dict()))
    wanted.pop("workers")
    if stamp.is_file():
        earlier = json.loads(stamp.read_text())
        # a folder from before a setting existed ran as that setting's default does
        defaults = json.loads(json.dumps(DemoConfig().to_dict()))
        earlier = {**{k: defaults[k] for k in _STAMPED_SINCE_START if k not in earlier}, **earlier}
        if earlier != wanted:
            raise IchscanError("this folder holds a demo run with other settings; use --restart or another --out",
                               out)
    write_json(stamp, wanted, indent=1)
    seconds: dict[str, float] = {}

    # 1. Phantoms: three independent populations (distinct seeds, so distinct patients) = a patient split.
    t0 = time.perf_counter()
    sets = {"train": config.train_studies, "val": config.val_studies, "test": config.test_studies}
    for i, (name, studies) in enumerate(sets.items()):
        target = out / "phantoms" / name
        if (target / "manifest.json").is_file():
            say(f"phantoms/{name}: already generated")
            continue
        summary = generate_dataset(target, studies=studies, seed=config.seed * 10 + i, size=config.size,
                                   slices=config.slices, thickness=config.thickness,
                                   prevalence=config.train_prevalence if name == "train" else config.prevalence,
                                   workers=config.workers)
        pos = ", ".join(f"{k} {v}" for k, v in summary.series_positive.items())
        say(f"phantoms/{name}: {summary.series} series, {summary.slices} slices, {summary.patients} patients "
            f"({pos} positive series) in {summary.seconds:.0f} s")
    _check_patient_split(out / "phantoms", list(sets))
    seconds["phantoms"] = time.perf_counter() - t0

    # 2. Two models, the paper's final model being their average.
    t0 = time.perf_counter()
    base = TrainConfig.from_preset(config.preset, epochs=config.epochs, precision=config.precision)
    say(f"models: {base.arch} at {base.image_size} px, {base.epochs} epochs, seeds {list(config.model_seeds)} "
        f"-- {PRESET_REASONS.get(config.preset, config.preset)} (the paper: seresnext50_32x4d at 512 px "
        f"from ImageNet, which cannot be downloaded here and would take hours on a CPU)")
    # Each image is decoded and windowed once, by all cores, into a uint8 cache both models read.
    inputs = RunInputs(data=out / "phantoms" / "train", val_data=out / "phantoms" / "val",
                       cache=out / "cache" / "train", val_cache=out / "cache" / "val", io_workers=config.workers)
    plan, kept = _training_plan(out, config, base, inputs, started)
    said = [f"{plan.elapsed_seconds:.0f} s of the budget gone"] if plan.elapsed_seconds is not None else []
    if plan.predicted_seconds is not None:
        said.append(f"the whole demo predicted to take {plan.predicted_seconds / 60:.1f} min")
    say(f"training plan{', as made when this demo first trained' if kept else ''}: {plan.note}"
        + (f" ({'; '.join(said)})" if said else ""))
    base = dataclasses.replace(base, max_steps_per_epoch=plan.max_steps_per_epoch)
    members: list[Path] = []
    for k, model_seed in enumerate(config.model_seeds):
        run_dir = out / "models" / f"model_{'ab'[k] if k < 2 else k}"
        best = run_dir / "best.json"
        members.append(best)
        if (run_dir / "done.json").is_file() and best.is_file():
            say(f"{run_dir.name}: already trained")
            continue
        cfg = dataclasses.replace(base, seed=model_seed)
        resume = (run_dir / "resume.pt").is_file()
        t1 = time.perf_counter()
        result = run_training(cfg, inputs, run_dir, resume=resume, progress=_epoch_reporter(say, run_dir.name),
                              report=lambda line: log.info("%s", line))
        if result.interrupted or result.best is None:
            raise IchscanError("training stopped before it finished; rerun the demo to resume", run_dir)
        write_json(run_dir / "done.json", {"seconds": time.perf_counter() - t1}, indent=None)
    from ichscan.model import write_ensemble

    manifest = write_ensemble(out / "models" / "ensemble.json", members)
    say(f"ensemble: {manifest} averages {len(members)} models")
    seconds["train"] = time.perf_counter() - t0

    # 3. Predict validation and test series with TTA and the ensemble.
    t0 = time.perf_counter()
    predictor = Predictor.from_checkpoint(manifest, tta=config.tta, precision=config.precision)
    # The triage rules stay on; only the slice minimum follows the demo's own (possibly short) series.
    rules = SelectionRules(min_slices=min(SelectionRules().min_slices, config.slices[0]))
    runs = {}
    for name in ("val", "test"):
        runs[name] = predict_path(find_images_dir(out / "phantoms" / name), out / "predictions" / name, predictor,
                                  rules=rules)
        if not runs[name].complete:
            raise IchscanError("prediction stopped early; rerun the demo to resume", out / "predictions" / name)
        say(f"predictions/{name}: {len(runs[name].predictions)} series ({runs[name].n_resumed} resumed), "
            f"TTA {'+'.join(predictor.tta)}, {len(runs[name].skipped)} files skipped")
    seconds["predict"] = time.perf_counter() - t0

    # 4. Operating points on validation, then the paper's evaluation on the held-out test phantoms.
    t0 = time.perf_counter()
    # with their bootstrap intervals, as `ichscan thresholds` chooses them: predictions by the ensemble then
    # mark borderline calls (docs/predict.md#borderline); the thresholds themselves do not depend on it
    points = choose_thresholds_files(out / "predictions" / "val" / "series.csv",
                                     out / "phantoms" / "val" / "series_labels.csv",
                                     level="series", method=config.threshold_method,
                                     n_bootstrap=config.n_bootstrap, seed=config.seed)
    thresholds_path = save_thresholds(points, out / "thresholds.json")
    # The operating points travel with the model: `ichscan predict --checkpoint .../ensemble.json` uses them.
    chosen = dict(points.to_dict(), chosen_on=f"validation phantoms ({config.val_studies} studies)")
    manifest = write_ensemble(manifest, members, extra={"operating_points": chosen})
    ev = evaluate_files(out / "predictions" / "test" / "series.csv", out / "phantoms" / "test" / "series_labels.csv",
                        level="series", thresholds=thresholds_path, n_bootstrap=config.n_bootstrap,
                        seed=config.seed)
    report_dir = out / "report"
    entries = series_entries(ev, _key_slices(runs["test"].predictions, ev.thresholds, predictor.windows,
                                              find_images_dir(out / "phantoms" / "test")))
    extra = {
        "data": f"synthetic phantoms (seed {config.seed}): {config.train_studies} train, {config.val_studies} "
                f"validation, {config.test_studies} test studies, {config.size} px",
        "model": f"ensemble of {len(members)} x {base.arch} at {base.image_size} px ({config.preset} preset"
                 + (f", {plan.share:.0%} of each epoch's steps for the time budget" if plan.share < 1 else "")
                 + f"), TTA {'+'.join(predictor.tta)}, series = max over slices",
        "operating points": f"{config.threshold_method} on the validation phantoms",
        "warning": "phantom-trained: says nothing about patients",
    }
    paths = write_report(ev, report_dir, entries, title="ichscan demo: held-out phantom series", extra=extra)
    seconds["evaluate"] = time.perf_counter() - t0
    aucs = {m.label: m.auc.value for m in ev.per_label}
    wll = ev.weighted_log_loss.value
    seconds["total"] = time.perf_counter() - started
    summary = {"config": config.to_dict(), "training_plan": plan.to_dict(),
               "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "auc": aucs, "weighted_log_loss": wll, "thresholds": ev.thresholds,
               "outputs": {k: str(v) for k, v in paths.items()}}
    write_json(out / "demo.json", summary, indent=1, default=str)
    return DemoResult(out, paths["html"], paths["table1_md"], paths["roc_png"], aucs, wll, seconds)


_STAMPED_SINCE_START = ("minutes", "precision")  # DemoConfig fields added after demo folders existed


def _training_plan(out: Path, config: DemoConfig, base, inputs, started: float) -> tuple[TrainingPlan, bool]:
    """(the plan, True) as this demo made it when its training began (``models/plan.json``), or (a new one,
    False): the datasets are cached, a few training steps measured (when there is a budget) and
    :func:`plan_training` asked."""
    from ichscan.predict import resolve_tta
    from ichscan.train import prepare_datasets

    path = out / "models" / "plan.json"
    if path.is_file():
        return TrainingPlan(**json.loads(path.read_text())), True
    models = out / "models"
    if models.is_dir() and any(models.glob("model_*/config.json")):  # begun by a demo that made no plans
        return TrainingPlan(0, None, None, None, None,
                            "no time budget (training began before plans were made)"), False
    train_set, val_set, _ = prepare_datasets(base, inputs, report=lambda line: log.info("%s", line))
    batch = base.batch_size
    steps_per_epoch = max(1, len(train_set) // batch)  # as ichscan.train.train counts them
    per_step = _probe_seconds_per_step(base, train_set, models / "probe") if config.minutes is not None else None
    views = sum(_phantom_slices(out / "phantoms" / name) for name in ("val", "test")) \
        * len(resolve_tta(config.tta)) * len(config.model_seeds)
    plan = plan_training(budget_seconds=None if config.minutes is None else 60.0 * config.minutes,
                         elapsed_seconds=time.perf_counter() - started, seconds_per_step=per_step,
                         steps_per_epoch=steps_per_epoch, epochs=base.epochs, models=len(config.model_seeds),
                         val_batches=math.ceil(len(val_set) / batch) if val_set is not None else 0,
                         predict_batches=math.ceil(views / batch))
    write_json(path, plan.to_dict(), indent=1)
    return plan, False


def _probe_seconds_per_step(config, train_set, scratch: Path, steps: int = 12, warmup: int = 3) -> float:
    """Median seconds per training step of ``ichscan.train.train`` itself (cache, augmentation, step) over
    ``steps`` steps after ``warmup``, in a scratch folder removed afterwards."""
    from ichscan.train import train

    per_epoch = max(1, len(train_set) // config.batch_size)
    warmup = min(warmup, max(0, per_epoch - 2))
    steps = max(1, min(steps, per_epoch - warmup))
    stamps: dict[int, float] = {}

    def progress(event) -> None:
        if event.phase == "train":
            stamps[event.global_step] = time.perf_counter()

    probe = dataclasses.replace(config, epochs=1, max_steps_per_epoch=warmup + steps, state_every=0)
    shutil.rmtree(scratch, ignore_errors=True)
    stamps[0] = time.perf_counter()  # used only when the epoch is too short for a step after the warmup
    try:
        train(probe, train_set, None, scratch, progress=progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    marks = sorted(k for k in stamps if k >= warmup)
    if len(marks) < 2:
        marks = sorted(stamps)
    return statistics.median((stamps[b] - stamps[a]) / (b - a) for a, b in zip(marks, marks[1:]))


def _phantom_slices(folder: Path) -> int:
    return int(json.loads((folder / "manifest.json").read_text())["counts"]["slices"])


def _check_patient_split(root: Path, names: list[str]) -> None:
    import pandas as pd

    seen: dict[str, str] = {}
    for name in names:
        for patient in pd.read_csv(root / name / "series_labels.csv", dtype=str)["patient_id"].unique():
            if patient in seen and seen[patient] != name:
                raise IchscanError(f"patient {patient} is in both {seen[patient]} and {name}", root)
            seen[patient] = name


def _epoch_reporter(say: Callable[[str], None], name: str):
    def progress(p) -> None:
        if p.phase != "epoch":
            return
        m = p.metrics or {}
        line = f"{name}: epoch {p.epoch + 1}/{p.epochs}, train loss {m['train_loss']:.4f}"
        if m.get("val_loss") is not None:
            line += f", val weighted log loss {m['val_loss']:.4f} (slices)"
        if (m.get("val_auc") or {}).get("any") is not None:
            line += f", val slice AUC any {m['val_auc']['any']:.3f}"
        say(line + f", {m['train_images_per_s']:.0f} images/s")

    return progress


def _key_slices(predictions, thresholds: dict[str, float], windows, folder: Path) -> dict[str, dict[str, bytes]]:
    """Per series: the slice that drove its strongest finding (``any`` when none), in the model's windows."""
    from ichscan.dicom import find_series, read_slice
    from ichscan.report import key_slice_pngs

    # One headers-only scan tells where each SOP instance lives, whatever the folder layout.
    where = {s.sop_uid: s.path for series in find_series(folder, pixels=False).series for s in series.slices}
    out: dict[str, dict[str, bytes]] = {}
    for p in predictions:
        found = [lab for lab in LABELS[1:] if p.prob(lab) >= thresholds.get(lab, 0.5)]
        label = max(found, key=p.prob) if found else "any"
        key = p.key_slice(label)
        path = where.get(key.sop_uid)
        if path is None:
            log.warning("key slice %s of series %s not found under %s", key.sop_uid, p.series_uid, folder)
            continue
        caption = f"{label} key slice {key.index + 1}/{p.n_slices}"
        out[p.series_uid] = key_slice_pngs(read_slice(path).hu, windows, size=192, caption=caption)
    return out


def update_readme(result: DemoResult, readme: str | os.PathLike) -> Path:
    """Paste the demo's Table 1 and Figure 1 into ``readme`` between ``<!-- ichscan:demo -->`` markers.

    Figure 1 is copied next to the README (``docs/images/demo_roc.png``) so that the page shows it.
    """
    from ichscan.report import splice_markdown

    readme = Path(readme)
    figure = readme.parent / "docs" / "images" / "demo_roc.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.roc, figure)
    block = (result.table1.read_text().strip() + "\n\n"
             + f"![Figure 1: ROC curves per label on the held-out phantom series]({figure.relative_to(readme.parent)})")
    return splice_markdown(readme, "demo", block)
