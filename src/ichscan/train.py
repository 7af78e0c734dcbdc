"""Training: the paper's recipe as the default config, exact resume, one or many GPUs (torchrun).

``train(config, train_set, val_set, out_dir)`` writes into ``out_dir``:

- ``config.json``: the config this run uses;
- ``metrics.jsonl``: one line per epoch (train loss, validation weighted log loss, AUC per label, images/s);
- ``best.{safetensors,json}`` (lowest validation weighted log loss) and ``last.{safetensors,json}``;
- ``resume.pt``: model, optimizer, scheduler, scaler, epoch, step and RNG states (tensors and plain values
  only, loaded with ``weights_only=True``), written atomically at the end of every epoch, every
  ``config.state_every`` steps, when ``stop_after_steps`` is reached, and after the step in progress when
  SIGINT (Ctrl-C) or SIGTERM arrives (then KeyboardInterrupt is raised).

Data order is a function of (seed, epoch) alone and augmentation draws from its own generator, so a run
resumed from any of those points ends with the same weights as one that never stopped (bit for bit on CPU).
The library reports progress through a callback; the CLI turns it into a progress bar.

As in timm's train.py, ``train`` is a short driver: ``train_one_epoch`` (steps, resume points, signals),
``validate`` (validation loss and AUCs) and a ``Checkpointer`` that owns best / last / resume files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from ichscan.augment import AugmentConfig, augment_batch
from ichscan.errors import DataError, IchscanError
from ichscan.fileio import write_bytes, write_json
from ichscan.hardware import autocast_dtype, cpu_count, resolve_precision
from ichscan.labels import LABELS, loss_weights
from ichscan.model import build_model, read_manifest, save_checkpoint, unwrap, write_ensemble
from ichscan.windows import PAPER_WINDOWS

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything that decides a run. Defaults are the paper's recipe (``preset="paper"``)."""

    preset: str = "paper"
    arch: str = "seresnext50_32x4d"
    image_size: int = 512
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # "cosine" (per step, after warmup) or "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.05
    seed: int = 0
    fold: int = 0
    n_folds: int = 5
    pretrained: bool | str = True  # True: ImageNet weights from the local cache; a path; or False
    precision: str = "auto"  # "auto", "fp32", "bf16", "fp16"
    channels_last: bool = True
    compile: bool = False
    workers: int | None = None  # DataLoader workers per process; None sizes them to the machine
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    windows: tuple[str, ...] = PAPER_WINDOWS
    labels: tuple[str, ...] = LABELS
    grad_clip: float | None = None
    max_steps_per_epoch: int | None = None
    state_every: int = 500  # steps between resume states inside an epoch (0: only at epoch ends)
    log_every: int = 10  # steps between progress reports on a GPU (each one waits for the GPU); every step on CPU
    device: str | None = None  # None: cuda when available (the local rank's GPU under torchrun), else cpu
    # Site adaptation (issue 12): start from an ichscan checkpoint, manifest member or "bundled"; its arch,
    # windows and image size rule. ``freeze_epochs``: epochs with only the classifier training.
    init: str | None = None
    freeze_epochs: int = 0
    # Leading stages of the backbone kept as the starting model has them for the whole run (the stem counts as
    # one; timm's coarse parameter groups): low-level features carry across sites, the few series a site has
    # are better spent on the later stages, and no gradient is computed through the early, full-resolution
    # layers (resnet10t, 160 px, 2 cores: 28 images/s trained whole, 46 with the stem and first stage frozen).
    freeze_stages: int = 0
    # Batch-norm statistics kept as the starting model learnt them (affine weights still train). A model
    # trained on phantoms has its weights tuned to phantom statistics: re-estimating them from a site's
    # augmented batches moved ctich-dev slice AUC from 0.887 to 0.42 in two steps (docs/training.md).
    freeze_bn: bool = False
    # What the labels are: "slice" (every slice labelled), "series" (series labels only: a multiple-instance
    # loss over each series' slices, pooled by ``mil_pooling``), "both" (series loss plus slice loss).
    label_level: str = "slice"
    mil_pooling: str = "lse"
    series_batch: int = 2  # series per step at series level
    max_series_slices: int = 64
    slice_weight: float = 1.0  # the slice loss beside the series loss at level "both"
    # Rehearsal while adapting (issue 12): a labelled folder of another source (the phantoms the starting model
    # learnt from) whose items join every epoch, a fixed seeded draw making up ``replay_share`` of it, so that
    # what a site's few series cannot teach (subtypes with a handful of positives) is not forgotten.
    replay: str | None = None
    replay_share: float = 0.5
    # What every input window sees: None as the windows (or the --init model's) say; "whole" the whole slice;
    # "cavity" only the cranial cavity, air elsewhere (ichscan.cavity). Applied to the windows by resolve_init.
    region: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["region"] is None:  # unasked: the record earlier runs wrote (and resume compares) stays as it was
            del d["region"]
        d["augment"] = self.augment.to_dict()
        d["windows"] = list(self.windows)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise IchscanError(f"unknown training config keys: {unknown}")
        if "augment" in d:
            d["augment"] = AugmentConfig.from_dict(d["augment"])
        for key in ("windows", "labels"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str = "paper", **overrides: Any) -> TrainConfig:
        if name not in PRESETS:
            raise IchscanError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        base = dict(PRESETS[name])
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(base)


# Settings that may change between an interrupted run and its resume (another machine, more workers);
# the weights then match an uninterrupted run only on the same device and precision.
MACHINE_SETTINGS = frozenset({"workers", "device", "compile", "state_every", "log_every"})

PRESETS: dict[str, dict[str, Any]] = {
    # The paper: SE-ResNeXt50 (32x4d) from ImageNet, 512x512, Adam, RSNA weighted log loss, 3 epochs,
    # flip / crop / brightness / contrast / rotation +-30 degrees.
    "paper": {"preset": "paper"},
    # Two models on 2 CPU cores within the demo's 15 minutes: a ResNet-10 (4.9 M parameters; ~130 images/s
    # in bf16 on 2 AVX-512 cores at 128 px, against ~8 for the paper's model at 512) learns the phantoms
    # from scratch, where nothing can be downloaded; 128 px keeps the lesions a few pixels wide at least.
    "quick": {
        "preset": "quick",
        "arch": "resnet10t",
        "image_size": 128,
        "epochs": 4,
        "batch_size": 32,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "warmup_steps": 20,
        "pretrained": False,
        "state_every": 0,
    },
    # Phantoms only, for real scans: the quick backbone at 160 px (1.4 mm pixels on a 230 mm field of
    # view: a 5 mm bleed keeps 3-4 pixels; 192 px trains at 24 images/s on 2 fp32 cores, 160 at 37),
    # and augmentation wide enough that what the model keys on
    # survives the step from phantom to scanner: the head smaller or larger in view, other kernels
    # (blur, noise), other calibration and windowing (per-channel brightness, gamma). Measured in
    # docs/training.md against the quick preset on real CT (../shared/realct).
    "sim2real": {
        "preset": "sim2real",
        "arch": "resnet10t",
        "image_size": 160,
        "epochs": 4,
        "batch_size": 32,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "warmup_steps": 50,
        "pretrained": False,
        "state_every": 200,
        "augment": {"hflip": 0.5, "crop_scale": (0.75, 1.25), "rotation": 30.0, "brightness": 0.06,
                    "contrast": 0.15, "channel_brightness": 0.04, "gamma": 0.25, "blur": 1.2, "noise": 0.04},
    },
}

# Fine-tuning on a site's own series (tens to hundreds): the starting model's architecture, windows and size
# (--init), a tenth of the learning rate from scratch, and the sim2real augmentation. Measured by 5-fold
# cross-validation on ctich-dev in docs/training.md.
PRESETS["finetune"] = {
    "preset": "finetune",
    "arch": "resnet10t",
    "image_size": 160,
    "epochs": 5,
    "batch_size": 32,
    "lr": 2e-4,
    "weight_decay": 1e-4,
    "warmup_steps": 10,
    "pretrained": False,
    "state_every": 0,
    "freeze_epochs": 0,
    "freeze_bn": True,
    # stem and first stage kept: crossval on ctich-dev in 21 minutes instead of about 31, at the same series
    # AUC for `any` (0.858 against 0.853 with the whole backbone trained; docs/training.md)
    "freeze_stages": 2,
    "augment": dict(PRESETS["sim2real"]["augment"]),
}

PRESET_REASONS = {
    "paper": "the paper's recipe: seresnext50_32x4d at 512 px, Adam, weighted log loss, 3 epochs",
    "quick": "resnet10t at 128 px from scratch: small enough to train two models on 2 CPU cores in minutes",
    "sim2real": "resnet10t at 160 px from scratch on phantoms, with augmentation wide enough to carry to real CT",
    "finetune": "the --init model's architecture, windows and size, fine-tuned at lr 2e-4 with wide augmentation, "
                "its stem and first stage kept",
}


# ------------------------------------------------------------------------------------------------ the loss


def weighted_bce_loss(logits: torch.Tensor, targets: torch.Tensor,
                      weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """RSNA's weighted multi-label log loss, from logits: sum_ij w_j * bce_ij / sum_ij w_j.

    Targets that are NaN (label unknown) count for nothing. With every target known this is the
    competition metric: the mean over images of (sum_j w_j * bce_ij) / sum_j w_j.
    """
    if weights is None:
        weights = loss_weights(LABELS)
    w = torch.as_tensor(weights, dtype=torch.float32, device=logits.device)
    logits = logits.float()
    targets = targets.to(logits.device, torch.float32)
    known = ~torch.isnan(targets)
    bce = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none")
    wk = w.expand_as(bce) * known
    return (bce * wk).sum() / wk.sum().clamp_min(1e-12)


def validation_metrics(logits: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Weighted log loss and AUC per label (None where a label has only one class)."""
    from sklearn.metrics import roc_auc_score

    loss = float(weighted_bce_loss(torch.from_numpy(logits).double(), torch.from_numpy(targets).double(),
                                   loss_weights(tuple(labels))))
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    auc: dict[str, float | None] = {}
    for j, name in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        y = targets[known, j]
        auc[name] = float(roc_auc_score(y, probs[known, j])) if len(np.unique(y)) == 2 else None
    finite = [v for v in auc.values() if v is not None]
    return {"val_loss": loss, "val_auc": auc, "val_auc_mean": float(np.mean(finite)) if finite else None,
            "val_images": int(len(targets))}


# ----------------------------------------------------------------------------------------- machine setup


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def detect_distributed() -> Distributed:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    return Distributed(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(asked: str | None, local_rank: int, cuda_available: bool) -> torch.device:
    """The device this process trains on: ``asked`` (``--device``) or the GPU when there is one, else the CPU.

    A GPU named without an index ("cuda") is this process's own, ``cuda:<local rank>``: torch refuses to
    select a bare "cuda" as the current device."""
    if asked:
        device = torch.device(asked)
        return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device
    return torch.device("cuda", local_rank) if cuda_available else torch.device("cpu")


def init_distributed(config: TrainConfig) -> tuple[Distributed, torch.device]:
    """Join torchrun's process group (once) and pick this process's device."""
    dist_info = detect_distributed()
    device = pick_device(config.device, dist_info.local_rank, torch.cuda.is_available())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist_info.enabled:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist_info, device


def _barrier(dist_info: Distributed) -> None:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()


def training_precision(precision: str, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` (ichscan.hardware): ``auto`` falls back to fp16 with loss scaling on a
    GPU without bf16."""
    try:
        return resolve_precision(precision, device, fp16_fallback=True)
    except ValueError as err:
        raise IchscanError(str(err)) from None


def default_workers(device: torch.device, world_size: int = 1) -> int:
    """DataLoader workers per process: this process's share of cores less one (at most 12) on a GPU box.

    On a CPU, none: the model's OpenMP threads use every core, and a worker process decoding beside them
    stalls their barriers (measured on 2 cores: slower than decoding in the training loop). There the
    uint8 cache (``ichscan cache`` / ``--cache``) is what takes decoding off the training path.
    """
    share = max(1, cpu_count() // max(1, world_size))
    if device.type == "cuda":
        return max(1, min(12, share - 1))
    return 0


# ----------------------------------------------------------------------------------------------- sampling


class EpochSampler(Sampler[int]):
    """Shuffled order that depends on (seed, epoch) alone, split across ranks, and able to start mid-epoch.

    Like ``DistributedSampler`` (padding so ranks get equal counts), plus ``start``: the number of samples of
    this rank's share already seen, so a resumed epoch continues with exactly the batches that were left.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if n <= 0:
            raise DataError("the training set is empty")
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        order += order[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self):
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


# ---------------------------------------------------------------------------------------------- training


@dataclass
class TrainProgress:
    """What a progress callback receives, every step and at the end of each validation."""

    phase: str  # "train", "val" or "epoch"
    epoch: int
    epochs: int
    step: int  # step within the epoch (train) or batch (val)
    steps: int
    global_step: int
    loss: float | None = None
    images_per_s: float | None = None
    lr: float | None = None
    metrics: dict[str, Any] | None = None


@dataclass
class TrainResult:
    out_dir: Path
    best: Path | None
    last: Path | None
    history: list[dict[str, Any]]
    interrupted: bool = False
    global_step: int = 0


@dataclass
class TrainState:
    """Where a run stands: the counters ``resume.pt`` keeps beside the model, optimizer and RNG states."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0
    global_step: int = 0
    loss_sum: float = 0.0  # training loss summed over the images seen so far in this epoch (as last read)
    seen: int = 0  # images seen so far in this epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch


@dataclass
class Learner:
    """The model and what trains it: everything of it that ``resume.pt`` saves."""

    model: torch.nn.Module  # unwrapped: what checkpoints hold (DDP and torch.compile wrap it for training)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    aug_gen: torch.Generator  # augmentation's own stream, apart from the global RNG


def _lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.scheduler == "constant":
            return 1.0
        span = max(1, total_steps - config.warmup_steps)
        t = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def _build_learner(config: TrainConfig, device: torch.device, dist_info: Distributed, *, total_steps: int,
                   pretrained: bool | str, amp_dtype: torch.dtype | None,
                   memory_format: torch.memory_format) -> Learner:
    torch.manual_seed(config.seed)  # initial weights are a function of the seed
    if config.init and pretrained is not None:
        from ichscan.model import init_model_from

        model, _, weights_report = init_model_from(config.init, labels=tuple(config.labels))
        model.series_head = None  # a head is trained on the fine-tuned model's own features afterwards
        if dist_info.is_main:
            log.info("%s", weights_report.line())
    else:
        model = build_model(config.arch, labels=tuple(config.labels), pretrained=pretrained)
    model = model.to(device=device, memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    aug_gen = torch.Generator().manual_seed(config.seed * 7919 + dist_info.rank)
    return Learner(model, optimizer, scheduler, scaler, aug_gen)


def _wrap_for_training(model: torch.nn.Module, config: TrainConfig, device: torch.device,
                       dist_info: Distributed) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model as it trains, the model as it validates)."""
    net = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:  # after DDP, as PyTorch recommends (its optimizer splits graphs at bucket boundaries)
        net = torch.compile(net)
    # Validation runs outside DDP (no gradient syncs); compiled when training is.
    eval_net = net if not dist_info.enabled else (torch.compile(model) if config.compile else model)
    return net, eval_net


def _batch_items(config: TrainConfig, dataset: Dataset) -> int:
    """Items per step: images, or whole series for a SeriesDataset."""
    return config.series_batch if hasattr(dataset, "series_y") else config.batch_size


def _train_loader(dataset: Dataset, sampler: Sampler, config: TrainConfig, workers: int, drop_last: bool,
                  device: torch.device) -> DataLoader:
    collate = None
    if hasattr(dataset, "series_y"):
        from ichscan.series import collate_series as collate
    return DataLoader(
        dataset, batch_size=_batch_items(config, dataset), sampler=sampler, num_workers=workers,
        drop_last=drop_last, collate_fn=collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        # Its own generator, so that making an iterator never draws from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(config.seed),
    )


@contextlib.contextmanager
def _deferred_signals() -> Iterator[list[int]]:
    """Within: SIGINT/SIGTERM are noted in the yielded list instead of stopping (a second one stops at once).
    Only the main thread can set handlers: elsewhere the list stays empty."""
    import signal
    import threading

    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def handler(signum, frame):
        if noted:
            raise KeyboardInterrupt
        noted.append(signum)
        log.warning("signal %d: stopping after this step (again to stop now)", signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield noted
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop_if_signalled(signalled: list[int], checkpointer: Checkpointer, learner: Learner,
                       state: TrainState) -> None:
    if signalled:
        # Only this rank may have been signalled: no collective call, which the others would never join.
        checkpointer.save_resume(learner, state, collective=False)
        raise KeyboardInterrupt(f"stopped by signal {signalled[0]}; resume state saved")


def train_one_epoch(net: torch.nn.Module, learner: Learner, loader: DataLoader, state: TrainState,
                    config: TrainConfig, checkpointer: Checkpointer, *, steps: int, device: torch.device,
                    dist_info: Distributed, amp_dtype: torch.dtype | None, memory_format: torch.memory_format,
                    signalled: list[int], progress: Callable[[TrainProgress], None] | None = None,
                    stop_after_steps: int | None = None) -> dict[str, float] | None:
    """Train from ``state.step_in_epoch`` to ``steps`` steps of epoch ``state.epoch``, advancing ``state``.

    ``net`` is ``learner.model`` as it trains (under DDP, compiled). The resume state is saved every
    ``config.state_every`` steps, when ``stop_after_steps`` is reached, and after the step in progress when a
    signal is noted in ``signalled`` (then KeyboardInterrupt is raised). Returns ``train_loss`` (the mean
    over every rank's images), ``train_images_per_s`` and ``lr``; None when ``stop_after_steps`` was reached.
    """
    learner.model.train()
    weights = loss_weights(tuple(config.labels))
    t0 = time.perf_counter()
    epoch_images = 0
    # The loss is summed on the device and read only when reported or saved, so that a GPU is not made to
    # wait for the host every step.
    loss_total = torch.tensor(state.loss_sum, dtype=torch.float64, device=device)
    batches = loader if state.step_in_epoch < steps else ()
    _set_frozen(learner.model, state.epoch < config.freeze_epochs, config.freeze_stages)
    if config.freeze_bn:
        _freeze_batchnorm_stats(learner.model)
    for images, targets in batches:
        images = images.to(device, non_blocking=True)
        targets = _to_device(targets, device)
        images = augment_batch(images, config.augment, learner.aug_gen).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = net(images)
        if isinstance(targets, dict):  # whole series: the multiple-instance loss
            from ichscan.series import mil_loss

            loss = mil_loss(logits, targets, pooling=config.mil_pooling, weights=weights,
                            slice_weight=config.slice_weight)
        else:
            loss = weighted_bce_loss(logits, targets, weights)
        learner.optimizer.zero_grad(set_to_none=True)
        learner.scaler.scale(loss).backward()
        if config.grad_clip:
            learner.scaler.unscale_(learner.optimizer)
            torch.nn.utils.clip_grad_norm_(learner.model.parameters(), config.grad_clip)
        learner.scaler.step(learner.optimizer)
        learner.scaler.update()
        learner.scheduler.step()
        state.step_in_epoch += 1
        state.global_step += 1
        n = images.shape[0]
        loss_total += loss.detach().double() * n
        state.seen += n
        epoch_images += n
        last_step = state.step_in_epoch >= steps
        stop = stop_after_steps is not None and state.global_step >= stop_after_steps
        if progress and (device.type == "cpu" or last_step or stop or state.step_in_epoch % config.log_every == 0):
            elapsed = time.perf_counter() - t0
            progress(TrainProgress("train", state.epoch, config.epochs, state.step_in_epoch, steps,
                                   state.global_step, float(loss.detach()),
                                   epoch_images * dist_info.world_size / max(elapsed, 1e-9),
                                   learner.scheduler.get_last_lr()[0]))
        if stop or (config.state_every and state.step_in_epoch % config.state_every == 0):
            state.loss_sum = float(loss_total)
            checkpointer.save_resume(learner, state)
        if stop:
            return None
        if signalled:
            state.loss_sum = float(loss_total)
            _stop_if_signalled(signalled, checkpointer, learner, state)
        if last_step:
            break
    state.loss_sum = float(loss_total)
    train_time = time.perf_counter() - t0
    epoch_loss, epoch_seen = state.loss_sum, state.seen
    if dist_info.enabled:  # the mean over every rank's images
        import torch.distributed as dist

        totals = torch.tensor([epoch_loss, float(epoch_seen)], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        epoch_loss, epoch_seen = float(totals[0]), int(totals[1])
    return {"train_loss": epoch_loss / max(epoch_seen, 1),
            "train_images_per_s": epoch_images * dist_info.world_size / max(train_time, 1e-9),
            "lr": learner.scheduler.get_last_lr()[0]}


def _to_device(targets: Any, device: torch.device) -> Any:
    if isinstance(targets, dict):
        return {k: v.to(device, non_blocking=True) if k != "lengths" else v for k, v in targets.items()}
    return targets.to(device, non_blocking=True)


def _set_frozen(model: torch.nn.Module, frozen: bool, stages: int = 0) -> None:
    """Freeze (or free) every backbone parameter but the classifier's: the first ``freeze_epochs`` of a
    fine-tune adapt the classifier (and batch-norm statistics) before the features move. The first
    ``stages`` stages (``frozen_stage_parameters``) stay frozen either way."""
    backbone = unwrap(model).backbone
    classifier = {id(p) for p in backbone.get_classifier().parameters()}
    fixed = {id(p) for p in frozen_stage_parameters(backbone, stages)}
    for p in backbone.parameters():
        p.requires_grad_((not frozen or id(p) in classifier) and id(p) not in fixed)


def frozen_stage_parameters(backbone: torch.nn.Module, stages: int) -> list[torch.nn.Parameter]:
    """The parameters of the backbone's first ``stages`` stages, the stem being the first: timm's coarse
    parameter groups (``group_matcher``), which every timm CNN defines in input-to-output order."""
    if stages <= 0:
        return []
    from timm.models import group_parameters

    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        raise IchscanError(f"{type(backbone).__name__} does not name its stages (no timm group_matcher); "
                           "use freeze_stages 0")
    groups = group_parameters(backbone, matcher(coarse=True))
    params = dict(backbone.named_parameters())
    chosen = [params[n] for g in sorted(groups)[:stages] for n in groups[g]]
    classifier = {id(p) for p in backbone.get_classifier().parameters()}
    if stages >= len(groups) or any(id(p) in classifier for p in chosen):
        raise IchscanError(f"freeze_stages {stages}: {type(backbone).__name__} has {len(groups) - 1} stages before "
                           "its classifier")
    return chosen


def _freeze_batchnorm_stats(model: torch.nn.Module) -> None:
    """Batch norms normalise with their running statistics and stop updating them (eval mode), in train mode."""
    for m in unwrap(model).modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.no_grad()
def predict_logits(model: torch.nn.Module, dataset: Dataset, device: torch.device | str = "cpu", *,
                   batch_size: int = 64, workers: int = 0, amp_dtype: torch.dtype | None = None,
                   memory_format: torch.memory_format = torch.channels_last,
                   indices: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits, targets) for ``dataset`` (or the ``indices`` of it), in order, without augmentation."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, list(indices))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    all_logits, all_targets = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        all_logits.append(logits.float().cpu().numpy())
        all_targets.append(targets.float().numpy())
    model.train(was_training)
    return np.concatenate(all_logits), np.concatenate(all_targets)


def validate(model: torch.nn.Module, dataset: Dataset, device: torch.device, labels: Sequence[str], *,
             batch_size: int = 64, workers: int = 0, amp_dtype: torch.dtype | None = None,
             memory_format: torch.memory_format = torch.channels_last, dist_info: Distributed | None = None,
             progress: Callable[[TrainProgress], None] | None = None, epoch: int = 0,
             epochs: int = 1) -> dict[str, Any]:
    """Validation loss and metrics (``validation_metrics``); under DDP each rank scores a share (with ``model``
    unwrapped from DDP) and the shares are gathered, so every rank returns the numbers for the whole set."""
    dist_info = dist_info or Distributed()
    if hasattr(dataset, "series_y"):  # a SeriesDataset: series metrics from pooled slice logits
        return _validate_series(model, dataset, device, labels, batch_size=batch_size, amp_dtype=amp_dtype,
                                memory_format=memory_format, progress=progress, epoch=epoch, epochs=epochs)
    n = len(dataset)
    indices = list(range(dist_info.rank, n, dist_info.world_size))
    logits, targets = predict_logits(model, dataset, device, batch_size=batch_size, workers=workers,
                                     amp_dtype=amp_dtype, memory_format=memory_format, indices=indices)
    if dist_info.enabled:
        import torch.distributed as dist

        parts: list[Any] = [None] * dist_info.world_size
        dist.all_gather_object(parts, (indices, logits, targets))
        order = np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts])
        logits = np.concatenate([p[1] for p in parts])[np.argsort(order)]
        targets = np.concatenate([p[2] for p in parts])[np.argsort(order)]
    metrics = validation_metrics(logits, targets, labels)
    if progress:
        progress(TrainProgress("val", epoch, epochs, 1, 1, 0, metrics["val_loss"], None, None, metrics))
    return metrics


def _validate_series(model, dataset, device, labels, *, batch_size, amp_dtype, memory_format, progress, epoch,
                     epochs) -> dict[str, Any]:
    """Series-level validation (every rank scores the whole set; series sets are small)."""
    from ichscan.series import pool_logits, series_order

    logits, _ = predict_logits(model, dataset.slices, device, batch_size=batch_size, amp_dtype=amp_dtype,
                               memory_format=memory_format)
    t = torch.from_numpy(logits)
    pooled = np.stack([pool_logits(t[torch.from_numpy(rows)], "max").numpy()
                       for rows in series_order(dataset.slices.frame)])
    metrics = validation_metrics(pooled, dataset.series_y, labels)
    metrics["val_level"] = "series"
    if progress:
        progress(TrainProgress("val", epoch, epochs, 1, 1, 0, metrics["val_loss"], None, None, metrics))
    return metrics


# ------------------------------------------------------------------------------------------- checkpoints


def _window_records(names: Sequence[str]) -> list[dict[str, Any]]:
    from ichscan.windows import get_windows

    return [w.to_dict() for w in get_windows(names)]


def _rng_state(aug_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "augment": aug_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _save_state(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(path, buf.getvalue())


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise IchscanError(f"cannot resume from this state file ({err}); start again without --resume",
                           path) from err


class Checkpointer:
    """A run's checkpoint files, as timm's ``CheckpointSaver`` keeps them: ``best.{safetensors,json}`` (lowest
    validation weighted log loss; training loss without a validation set), ``last.{safetensors,json}`` (the
    last finished epoch) and ``resume.pt``. Rank 0 writes; under DDP every rank joins ``save_resume``."""

    def __init__(self, out: Path, config: TrainConfig, device: torch.device, dist_info: Distributed,
                 data_summary: dict[str, Any] | None = None):
        self.out, self.config, self.device, self.dist_info = out, config, device, dist_info
        self.data_summary = data_summary or {}
        self.resume_path = out / "resume.pt"
        self.best_loss = math.inf
        self.best_path: Path | None = None
        self.last_path: Path | None = None

    def load_resume(self) -> dict[str, Any]:
        """What ``resume.pt`` holds, refused when this run's config differs beyond ``MACHINE_SETTINGS``."""
        if not self.resume_path.is_file():
            raise IchscanError("nothing to resume: no resume.pt; run without --resume", self.out)
        saved = _load_state(self.resume_path)
        before = TrainConfig.from_dict(saved["config"]).to_dict()
        changed = sorted(k for k, v in self.config.to_dict().items()
                         if before.get(k) != v and k not in MACHINE_SETTINGS)
        if changed:
            raise IchscanError(f"config differs from the interrupted run's ({', '.join(changed)}); "
                               "resume with the same settings", self.out)
        return saved

    def restore(self, saved: dict[str, Any], learner: Learner) -> TrainState:
        """Put ``saved`` (from ``load_resume``) back into ``learner``, this rank's RNG and the best so far."""
        learner.model.load_state_dict(saved["model"])
        learner.optimizer.load_state_dict(saved["optimizer"])
        learner.scheduler.load_state_dict(saved["scheduler"])
        learner.scaler.load_state_dict(saved["scaler"])
        rng = saved["rng"]
        if isinstance(rng, list):  # one entry per rank (DDP); a rank beyond those saved keeps rank 0's
            rng = rng[self.dist_info.rank] if self.dist_info.rank < len(rng) else rng[0]
        torch.set_rng_state(rng["torch"])
        learner.aug_gen.set_state(rng["augment"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.best_loss = saved["best_loss"]
        self.best_path = self.out / "best.json" if (self.out / "best.json").exists() else None
        self.last_path = self.out / "last.json" if (self.out / "last.json").exists() else None
        state = TrainState(saved["epoch"], saved["step_in_epoch"], saved["global_step"], saved["loss_sum"],
                           saved["seen"], json.loads(saved["history"]))
        log.info("resuming at epoch %d, step %d (global step %d)", state.epoch, state.step_in_epoch,
                 state.global_step)
        return state

    def save_resume(self, learner: Learner, state: TrainState, *, collective: bool = True) -> None:
        """Write ``resume.pt``. ``collective``: every rank calls this, and each rank's RNG states are kept."""
        rng: Any = _rng_state(learner.aug_gen, self.device)
        if self.dist_info.enabled and collective:  # every rank's RNG, so that each resumes its own stream
            import torch.distributed as dist

            states: list[Any] = [None] * self.dist_info.world_size
            dist.all_gather_object(states, rng)
            rng = states
        if not self.dist_info.is_main:
            return
        _save_state(self.resume_path, {
            "config": self.config.to_dict(), "model": unwrap(learner.model).state_dict(),
            "optimizer": learner.optimizer.state_dict(), "scheduler": learner.scheduler.state_dict(),
            "scaler": learner.scaler.state_dict(), "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step, "loss_sum": state.loss_sum, "seen": state.seen,
            "best_loss": self.best_loss, "history": json.dumps(state.history), "rng": rng,
        })

    def save_epoch(self, model: torch.nn.Module, record: dict[str, Any]) -> None:
        """After an epoch (rank 0): ``last``, and ``best`` when ``record`` scores lower than every epoch before."""
        if not self.dist_info.is_main:
            return
        score = record.get("val_loss", record["train_loss"])
        self.last_path = save_checkpoint(self.out / "last", model, self._meta(record))
        if score < self.best_loss or self.best_path is None:
            self.best_loss = score
            self.best_path = save_checkpoint(self.out / "best", model, self._meta(record))

    def _meta(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"windows": _window_records(self.config.windows), "image_size": self.config.image_size,
                "config": self.config.to_dict(), "data": self.data_summary, "metrics": metrics}


# ------------------------------------------------------------------------------------------------ the run


def train(
    config: TrainConfig,
    train_set: Dataset,
    val_set: Dataset | None,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: Callable[[TrainProgress], None] | None = None,
    stop_after_steps: int | None = None,
    data_summary: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a model on ``train_set`` (items: (uint8 or float CxHxW image, float target per label)).

    ``resume=True`` continues from ``out_dir/resume.pt`` (and refuses a different config).
    ``stop_after_steps`` stops after that many optimizer steps in total, saving the resume state — for
    time-boxed runs and for testing resume. Under torchrun every rank calls this; rank 0 writes files.
    """
    out = Path(out_dir)
    from ichscan.series import LABEL_LEVELS, POOLINGS

    if config.label_level not in LABEL_LEVELS:
        raise IchscanError(f"label level {config.label_level!r}: expected one of {', '.join(LABEL_LEVELS)}")
    if config.mil_pooling not in POOLINGS:
        raise IchscanError(f"MIL pooling {config.mil_pooling!r}: expected one of {', '.join(POOLINGS)}")
    dist_info, device = init_distributed(config)
    labels = tuple(config.labels)
    ds_labels = tuple(getattr(train_set, "labels", labels))
    if ds_labels != labels:
        raise DataError(f"dataset labels {list(ds_labels)} differ from the config's {list(labels)}")
    checkpointer = Checkpointer(out, config, device, dist_info, data_summary)
    saved = checkpointer.load_resume() if resume else None
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config.to_dict())

    sampler = EpochSampler(len(train_set), config.seed, dist_info.rank, dist_info.world_size)
    batch = _batch_items(config, train_set)
    drop_last = sampler.per_rank >= batch  # equal batch shapes, unless the set is smaller than one batch
    steps = sampler.per_rank // batch if drop_last else 1
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    amp_dtype = autocast_dtype(training_precision(config.precision, device))
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    learner = _build_learner(config, device, dist_info, total_steps=steps * config.epochs, amp_dtype=amp_dtype,
                             memory_format=memory_format,
                             # resume.pt has the weights: None loads nothing (neither --init nor --pretrained)
                             pretrained=config.pretrained if saved is None else None)
    state = checkpointer.restore(saved, learner) if saved is not None else TrainState()
    metrics_path = out / "metrics.jsonl"
    if dist_info.is_main:
        if saved is not None:  # drop the lines of epochs that will run again
            write_bytes(metrics_path, "".join(json.dumps(h) + "\n" for h in state.history).encode())
        elif metrics_path.exists():
            metrics_path.unlink()
    net, eval_net = _wrap_for_training(learner.model, config, device, dist_info)
    workers = config.workers if config.workers is not None else default_workers(device, dist_info.world_size)

    # Ctrl-C / SIGTERM (preemption) are noted and acted on between steps, where the state is consistent:
    # the resume state is saved there and KeyboardInterrupt raised. A second signal stops at once.
    with _deferred_signals() as signalled:
        while state.epoch < config.epochs:
            t0 = time.perf_counter()
            sampler.set_epoch(state.epoch, state.step_in_epoch * batch)
            loader = _train_loader(train_set, sampler, config, workers, drop_last, device)
            train_metrics = train_one_epoch(net, learner, loader, state, config, checkpointer, steps=steps,
                                            device=device, dist_info=dist_info, amp_dtype=amp_dtype,
                                            memory_format=memory_format, signalled=signalled, progress=progress,
                                            stop_after_steps=stop_after_steps)
            if train_metrics is None:
                return TrainResult(out, checkpointer.best_path, checkpointer.last_path, state.history, True,
                                   state.global_step)
            record: dict[str, Any] = {"epoch": state.epoch + 1, "global_step": state.global_step, **train_metrics}
            if val_set is not None and len(val_set) > 0:
                record.update(validate(eval_net, val_set, device, labels, batch_size=config.batch_size,
                                       workers=workers, amp_dtype=amp_dtype, memory_format=memory_format,
                                       dist_info=dist_info, progress=progress, epoch=state.epoch,
                                       epochs=config.epochs))
            record["time_s"] = time.perf_counter() - t0
            state.history.append(record)
            state.epoch += 1
            state.step_in_epoch, state.loss_sum, state.seen = 0, 0.0, 0
            if dist_info.is_main:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            checkpointer.save_epoch(learner.model, record)
            checkpointer.save_resume(learner, state)
            _stop_if_signalled(signalled, checkpointer, learner, state)
            if progress:
                progress(TrainProgress("epoch", state.epoch - 1, config.epochs, steps, steps, state.global_step,
                                       record["train_loss"], record["train_images_per_s"], record["lr"], record))
    # Only after a normal finish: a rank that failed must exit (torchrun then stops the others), not wait.
    _barrier(dist_info)
    return TrainResult(out, checkpointer.best_path, checkpointer.last_path, state.history, False, state.global_step)


# ------------------------------------------------------------------------------------- folders, end to end


@dataclass
class RunInputs:
    """Where a run's data comes from; every path optional but ``data``."""

    data: str | os.PathLike  # RSNA-layout folder: labels.csv / stage_2_train.csv + images/
    val_data: str | os.PathLike | None = None  # a separate validation folder (else fold ``config.fold``)
    labels_csv: str | os.PathLike | None = None
    index: str | os.PathLike | None = None  # header index Parquet (default <data>/ichscan_index.parquet)
    val_index: str | os.PathLike | None = None
    cache: str | os.PathLike | None = None  # uint8 image cache folder, built or finished when needed
    val_cache: str | os.PathLike | None = None
    io_workers: int | None = None  # processes for indexing and caching (default: all cores)
    series_labels: str | os.PathLike | None = None  # series_labels.csv (default <data>/series_labels.csv)
    replay_cache: str | os.PathLike | None = None  # image cache for ``config.replay`` (needed with it)
    replay_index: str | os.PathLike | None = None  # its header index (default <replay>/ichscan_index.parquet)


FOLD_SEED = 0  # folds are a property of the data, the same for every run and training seed


def prepare_datasets(config: TrainConfig, inputs: RunInputs, *, report: Callable[[str], None] | None = None,
                     progress: Callable[[str, int, int], None] | None = None):
    """(train_set, val_set, data_summary) for ``inputs``: labels joined to the header index, split by
    ``val_data`` or by patient-grouped fold ``config.fold`` of ``config.n_folds``, optionally cached."""
    from ichscan.data import SliceDataset, assign_folds, load_labelled

    say = report or (lambda line: log.info("%s", line))

    def step(name: str):
        return (lambda done, total: progress(name, done, total)) if progress else None

    series_level = config.label_level != "slice"
    targets = val_targets = None
    if series_level:
        from ichscan.series import load_series_data

        train_data, targets = load_series_data(
            inputs.data, level=config.label_level, labels_csv=inputs.labels_csv, series_csv=inputs.series_labels,
            index_cache=inputs.index, workers=inputs.io_workers, progress=step("index"), labels=config.labels)
    else:
        train_data = load_labelled(inputs.data, labels_csv=inputs.labels_csv, index_cache=inputs.index,
                                   workers=inputs.io_workers, progress=step("index"), labels=config.labels)
    for line in train_data.lines():
        say(line)
    frame = train_data.frame
    summary: dict[str, Any] = {"source": os.fspath(inputs.data), "missing_files": train_data.missing[:100],
                               "label_conflicts": len(train_data.label_report.conflicts)}
    if inputs.val_data is not None:
        if series_level:
            val_data, val_targets = load_series_data(
                inputs.val_data, level=config.label_level, index_cache=inputs.val_index, workers=inputs.io_workers,
                progress=step("index val"), labels=config.labels)
        else:
            val_data = load_labelled(inputs.val_data, index_cache=inputs.val_index, workers=inputs.io_workers,
                                     progress=step("index val"), labels=config.labels)
        for line in val_data.lines():
            say(line)
        train_frame, val_frame = frame, val_data.frame
        summary["validation"] = os.fspath(inputs.val_data)
    else:
        folds = assign_folds(frame, config.n_folds, seed=FOLD_SEED)
        if not 0 <= config.fold < config.n_folds:
            raise DataError(f"fold {config.fold} is not in 0..{config.n_folds - 1}")
        train_frame, val_frame = frame[folds != config.fold], frame[folds == config.fold]
        summary["validation"] = f"fold {config.fold} of {config.n_folds} (grouped by patient, stratified on any)"
        overlap = set(train_frame["patient_id"]) & set(val_frame["patient_id"])
        assert not overlap, "folds must not share patients"
    if len(train_frame) == 0:
        raise DataError("no labelled images to train on", inputs.data)
    caches: list[Any] = [inputs.cache, inputs.val_cache]
    if inputs.cache is not None:
        # A fold split caches the whole folder, so that validation reads from the same cache.
        _ensure_cache(inputs.cache, frame, config, inputs.io_workers, step("cache"), say)
        if inputs.val_data is None and inputs.val_cache is None:
            caches[1] = inputs.cache
    if inputs.val_cache is not None:
        _ensure_cache(inputs.val_cache, val_frame, config, inputs.io_workers, step("cache val"), say)
    train_set = SliceDataset(train_frame, config.image_size, config.windows, config.labels, cache=caches[0])
    val_set = SliceDataset(val_frame, config.image_size, config.windows, config.labels, cache=caches[1]) \
        if len(val_frame) else None
    if series_level:
        from ichscan.series import SeriesDataset

        train_set = SeriesDataset(train_set, targets, max_slices=config.max_series_slices)
        if val_set is not None:
            val_set = SeriesDataset(val_set, val_targets if val_targets is not None else targets,
                                    max_slices=config.max_series_slices)
        summary["label_level"] = config.label_level
    if config.replay:
        if inputs.replay_cache is None:
            raise IchscanError("a replay folder needs an image cache folder (RunInputs.replay_cache)")
        replay_set = load_replay(config, cache=inputs.replay_cache, index_cache=inputs.replay_index,
                                 io_workers=inputs.io_workers, say=say, progress=step("replay"))
        train_set = with_replay(config, train_set, replay_set, say)
    summary["train"] = train_set.summary()
    summary["val"] = val_set.summary() if val_set is not None else None
    return train_set, val_set, summary


def _ensure_cache(root: str | os.PathLike, frame, config: TrainConfig, workers: int | None,
                  progress: Callable[[int, int], None] | None, say: Callable[[str], None]) -> None:
    """Build the image cache at ``root`` for ``frame``, or finish one that exists (e.g. from ``ichscan cache``,
    over its own image list); images it does not hold are read from DICOM."""
    import pandas as pd

    from ichscan.data import DONE, ImageCache, _window_labels, build_cache

    try:
        cache = ImageCache(root)
    except DataError:
        cache = None
    if cache is None:
        result = build_cache(frame, root, config.image_size, config.windows, workers=workers, progress=progress)
    else:
        if not cache.matches(config.image_size, config.windows):
            raise DataError(f"cache is {cache.size} px with windows {_window_labels(cache.windows)}; this "
                            f"run needs {config.image_size} px with {_window_labels(config.windows)}: use another "
                            "folder",
                            root)
        status = cache.status
        rows = [cache.row_of.get(i, -1) for i in frame["image_id"].astype(str)]
        absent = sum(r < 0 for r in rows)
        if absent:
            say(f"{absent} images are not in the cache {root}; they are read from DICOM")
        if all(r < 0 or status[r] == DONE for r in rows):
            return
        own = pd.DataFrame({"image_id": cache.image_ids, "path": cache.paths})
        result = build_cache(own, root, config.image_size, config.windows, workers=workers, progress=progress)
    for line in result.lines()[:6]:
        say(line)


class ReplayMix(Dataset):
    """A site's training items followed by a fixed draw from a replay set (``TrainConfig.replay``).

    The draw is ``share / (1 - share)`` times the site's items (all of the replay set if it has fewer), made
    once from ``seed`` without replacement, so a resumed run sees the same items and an epoch is the site's
    data once plus the draw. Both sets must give items alike: slices (image, targets) or, at series level,
    whole series (``SeriesDataset``)."""

    def __init__(self, own: Dataset, replay: Dataset, share: float, seed: int):
        if not 0.0 < share < 1.0:
            raise IchscanError(f"--replay-share {share:g}: the replayed share of each epoch must lie in (0, 1)")
        if tuple(replay.labels) != tuple(own.labels):
            raise DataError(f"replay labels {list(replay.labels)} differ from the training data's {list(own.labels)}")
        if hasattr(own, "series_y") != hasattr(replay, "series_y"):
            raise IchscanError("replay and training data must both be slices or both be series")
        n = min(len(replay), int(round(len(own) * share / (1.0 - share))))
        rng = np.random.default_rng([int(seed), 0x5EED])
        self.picks = np.sort(rng.choice(len(replay), size=n, replace=False))
        self.own, self.replay, self.share = own, replay, float(share)
        self.labels = tuple(own.labels)
        if hasattr(own, "series_y"):
            self.series_y = np.concatenate([own.series_y, replay.series_y[self.picks]])

    def __len__(self) -> int:
        return len(self.own) + len(self.picks)

    def __getitem__(self, i: int):
        n_own = len(self.own)
        return self.own[i] if i < n_own else self.replay[int(self.picks[i - n_own])]

    def summary(self) -> dict[str, Any]:
        out = dict(self.own.summary())
        out["replay"] = {"items": int(len(self.picks)), "of": int(len(self.replay)), "share": self.share}
        return out


def load_replay(config: TrainConfig, *, cache: str | os.PathLike, index_cache: str | os.PathLike | None = None,
                io_workers: int | None = None, say: Callable[[str], None] | None = None,
                progress: Callable[[int, int], None] | None = None) -> Dataset:
    """The replay folder ``config.replay`` as training items at the run's label level, image size and windows,
    cached at ``cache`` (built or finished when needed). Its slices and series keep their own labels; at level
    ``series`` its slice labels are withheld as the site's are. Its header index goes to ``index_cache``, else
    into the folder, else (read-only) beside the cache."""
    from ichscan.data import SliceDataset, load_labelled

    say = say or (lambda line: log.info("%s", line))
    root = Path(config.replay)
    if not root.is_dir():
        raise DataError("replay folder not found", root)
    if index_cache is None and not os.access(root, os.W_OK):  # a read-only folder: the index beside the cache
        index_cache = Path(f"{os.fspath(cache)}-index.parquet")
    if config.label_level != "slice":
        from ichscan.series import SeriesDataset, load_series_data

        data, targets = load_series_data(root, level=config.label_level, index_cache=index_cache,
                                         workers=io_workers, progress=progress, labels=config.labels)
    else:
        data, targets = load_labelled(root, index_cache=index_cache, workers=io_workers, progress=progress,
                                      labels=config.labels), None
    frame = data.frame
    if config.label_level == "slice":
        frame = frame[frame[list(config.labels)].notna().all(axis=1)].reset_index(drop=True)
    if len(frame) == 0:
        raise DataError("no labelled images to replay", root)
    _ensure_cache(cache, frame, config, io_workers, progress, say)
    slices = SliceDataset(frame, config.image_size, config.windows, config.labels, cache=cache)
    if targets is not None:
        return SeriesDataset(slices, targets, max_slices=config.max_series_slices)
    return slices


REPLAY_AUTO = "auto"


def _is_bundled(init: str | None) -> bool:
    if not init:
        return False
    if init == "bundled":
        return True
    from ichscan.model import bundled_dir

    return Path(init).resolve().parent == bundled_dir().resolve()


def resolve_replay(config: TrainConfig, out_dir: str | os.PathLike, *, workers: int | None = None,
                   say: Callable[[str], None] | None = None) -> TrainConfig:
    """``config.replay`` made a folder or None. ``auto``: adapting the bundled model, the phantoms it learnt
    from (``ichscan.bundled.REPLAY_PHANTOMS``) drawn into ``OUT/replay-phantoms`` (resumed, not redrawn, when
    there); any other start's training data is unknown to ichscan, so nothing is replayed and the run says
    so. ``none`` or empty: nothing."""
    say = say or (lambda line: log.info("%s", line))
    if config.replay in (None, "", "none"):
        return dataclasses.replace(config, replay=None)
    if config.replay != REPLAY_AUTO:
        return config
    if not _is_bundled(config.init):
        say(f"replay: none (--init {config.init or 'none'} is not the bundled model, so what it learnt from is "
            "unknown; give --replay DIR to rehearse it)")
        return dataclasses.replace(config, replay=None)
    from ichscan.bundled import REPLAY_PHANTOMS
    from ichscan.phantom import generate_dataset

    folder = Path(out_dir) / "replay-phantoms"
    recipe = dict(REPLAY_PHANTOMS)
    studies, seed = recipe.pop("studies"), recipe.pop("seed")
    say(f"replay: {studies} phantom studies of the bundled model's plan (seed {seed}) in {folder}")
    drawn = generate_dataset(folder, studies, seed, workers=workers or cpu_count(), **recipe)
    if drawn.resumed == drawn.series:
        say("replay: those phantoms were already there, kept as they are")
    return dataclasses.replace(config, replay=str(folder))


def with_replay(config: TrainConfig, train_set: Dataset, replay_set: Dataset | None,
                say: Callable[[str], None] | None = None) -> Dataset:
    """``train_set`` mixed with ``replay_set`` as ``config`` asks (``ReplayMix``), or as it is without one."""
    if replay_set is None:
        return train_set
    mixed = ReplayMix(train_set, replay_set, config.replay_share, config.seed)
    if say:
        say(f"replay: {len(mixed.picks)} of {len(replay_set)} items of {config.replay} join the "
            f"{len(train_set)} training items each epoch (share {config.replay_share:g})")
    return mixed


def resolve_init(config: TrainConfig, report: Callable[[str], None] | None = None) -> TrainConfig:
    """With ``config.init``: the starting checkpoint's architecture and windows in the config (another
    architecture asked for: a one-line error), its image size unless another was asked for, and its path
    resolved (``bundled`` -> the shipped member)."""
    from ichscan.windows import REGIONS, get_windows

    if config.region is not None and config.region not in REGIONS:
        raise IchscanError(f"region {config.region!r} is not one of {', '.join(REGIONS)}")

    def in_region(windows) -> tuple:
        return tuple(w.in_region(config.region).spec() if config.region else w.spec() for w in get_windows(windows))

    if not config.init:
        return dataclasses.replace(config, windows=in_region(config.windows)) if config.region else config
    from ichscan.model import read_checkpoint_meta, resolve_init_checkpoint

    path = resolve_init_checkpoint(config.init)
    meta = read_checkpoint_meta(path)
    windows = in_region(meta.windows)  # a --region asked for replaces the model's (its weights take either)
    preset = PRESETS.get(config.preset, {})

    def given(key: str):
        """The config's value when it was asked for (differs from the preset's), else None."""
        value = getattr(config, key)
        return None if value == preset.get(key, getattr(TrainConfig, key)) else value

    if given("arch") not in (None, meta.arch):
        raise IchscanError(f"--init {config.init} is a {meta.arch}; --arch {config.arch} cannot change that")
    # A CNN with global pooling takes any input size, so a new --image-size is honoured: the weights carry
    # over and training adapts them to the new scale (fine-tuning at a higher resolution). Unasked, the
    # checkpoint's own size is kept.
    image_size = given("image_size") or meta.image_size
    if tuple(config.labels) != tuple(meta.labels) and set(config.labels) != set(meta.labels):
        raise IchscanError(f"--init {config.init} has labels {list(meta.labels)}, not {list(config.labels)}")
    if report:
        names = ", ".join(w.label for w in get_windows(windows))
        size = f"{meta.image_size} px" if image_size == meta.image_size else \
            f"trained at {meta.image_size} px, now {image_size} px"
        report(f"starting from {path} ({meta.arch}, {size}, windows {names})")
    return dataclasses.replace(config, init=str(path), arch=meta.arch, image_size=image_size, windows=windows)


def run_training(config: TrainConfig, inputs: RunInputs, out_dir: str | os.PathLike, *, resume: bool = False,
                 ensemble_with: Sequence[str | os.PathLike] = (), ensemble_out: str | os.PathLike | None = None,
                 progress: Callable[[TrainProgress], None] | None = None,
                 data_progress: Callable[[str, int, int], None] | None = None,
                 report: Callable[[str], None] | None = None, stop_after_steps: int | None = None) -> TrainResult:
    """Index, split, cache (when asked) and train on an RSNA-layout folder; what ``ichscan train`` runs.

    ``ensemble_with``: checkpoints (or ensemble manifests) trained before, e.g. the paper's first model;
    a manifest naming them and this run's best checkpoint is written to ``ensemble_out``
    (default ``<out_dir>/ensemble.json``).
    """
    config = resolve_init(config, report)
    dist_info, _ = init_distributed(config)
    # The header index lives beside the data (shared by every run); for read-only data, in the run folder.
    for attr, folder, name in (("index", inputs.data, "index.parquet"), ("val_index", inputs.val_data,
                                                                          "val_index.parquet")):
        if getattr(inputs, attr) is None and folder is not None and not os.access(folder, os.W_OK):
            inputs = dataclasses.replace(inputs, **{attr: Path(out_dir) / name})
    if dist_info.enabled and not dist_info.is_main:
        _barrier(dist_info)  # rank 0 indexes and caches first; the others then read what it wrote
        train_set, val_set, summary = prepare_datasets(config, inputs, report=lambda line: None)
    else:
        train_set, val_set, summary = prepare_datasets(config, inputs, report=report, progress=data_progress)
        _barrier(dist_info)
    result = train(config, train_set, val_set, out_dir, resume=resume, progress=progress,
                   stop_after_steps=stop_after_steps, data_summary=summary)
    if ensemble_with and not result.interrupted and result.best is not None:
        members: list[Path] = []
        for item in ensemble_with:
            path = Path(item)
            # A run folder stands for its best checkpoint; a manifest for its members.
            members += [m.checkpoint for m in read_manifest(path / "best.json" if path.is_dir() else path).members]
        target = Path(ensemble_out) if ensemble_out else Path(out_dir) / "ensemble.json"
        write_ensemble(target, [*members, result.best])
        (report or (lambda line: log.info("%s", line)))(f"ensemble manifest: {target}")
    return result

