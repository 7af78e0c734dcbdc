"""Training: the loss, learning on a tiny set, exact resume, presets and the CLI's config plumbing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ichscan.augment import AugmentConfig
from ichscan.labels import LABELS
from ichscan.model import load_checkpoint
from ichscan.train import (
    EpochSampler,
    TrainConfig,
    train,
    training_precision,
    validation_metrics,
    weighted_bce_loss,
)

torch.set_num_threads(1)


class BlobSet(torch.utils.data.Dataset):
    """Tiny images where each label has its own bright square, so a small CNN can learn them."""

    labels = LABELS

    def __init__(self, n: int = 48, size: int = 32, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.targets = (rng.random((n, len(LABELS))) < 0.4).astype(np.float32)
        self.targets[:, 0] = self.targets[:, 1:].max(axis=1)
        self.images = (rng.random((n, 3, size, size)) * 40).astype(np.uint8)
        cell = size // 4
        for i in range(n):
            for j in range(1, len(LABELS)):
                if self.targets[i, j]:
                    r, c = divmod(j - 1, 3)
                    self.images[i, j % 3, r * cell + 4 : r * cell + 4 + cell, c * cell + 2 : c * cell + 2 + cell] = 230

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]), torch.from_numpy(self.targets[i])


def tiny_config(**kw) -> TrainConfig:
    base = dict(preset="quick", arch="resnet10t", image_size=32, epochs=2, batch_size=8, lr=3e-3,
                pretrained=False, precision="fp32", workers=0, warmup_steps=2, state_every=0, device="cpu")
    base.update(kw)
    return TrainConfig.from_preset("quick", **base)


def test_weighted_log_loss_equals_hand_computation():
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.0, -0.5, 1.5], [-2.0, 0.7, -0.1, 1.1, 0.2, -3.0]])
    targets = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 1, 1, 0]], dtype=torch.float32)
    weights = [2, 1, 1, 1, 1, 1]
    total, wsum = 0.0, 0.0
    for i in range(2):
        for j in range(6):
            p = 1 / (1 + math.exp(-float(logits[i, j])))
            y = float(targets[i, j])
            total += weights[j] * -(y * math.log(p) + (1 - y) * math.log(1 - p))
            wsum += weights[j]
    assert float(weighted_bce_loss(logits, targets, weights)) == pytest.approx(total / wsum, rel=1e-6)
    # Unknown labels (NaN) count for nothing.
    t2 = targets.clone()
    t2[1, 3] = float("nan")
    kept = total - weights[3] * -math.log(1 / (1 + math.exp(-1.1)))
    assert float(weighted_bce_loss(logits, t2, weights)) == pytest.approx(kept / (wsum - 1), rel=1e-6)


def test_validation_metrics_auc_and_single_class():
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 6)) < 0.5).astype(np.float32)
    targets[:, 1] = 0  # no positives: AUC undefined
    logits = targets * 2 - 1 + rng.normal(0, 0.1, targets.shape)
    m = validation_metrics(logits.astype(np.float32), targets, LABELS)
    assert m["val_auc"]["epidural"] is None
    assert m["val_auc"]["any"] == pytest.approx(1.0)


def test_epoch_sampler_partitions_and_resumes():
    s = [EpochSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    for x in s:
        x.set_epoch(1)
    parts = [x.order() for x in s]
    assert sorted(set(sum(parts, []))) == list(range(10))
    assert all(len(p) == 4 for p in parts)
    s[0].set_epoch(1, start=2)
    assert list(s[0]) == parts[0][2:]
    s[0].set_epoch(2)
    assert s[0].order() != parts[0]


def test_presets():
    paper = TrainConfig.from_preset("paper")
    assert (paper.arch, paper.image_size, paper.epochs) == ("seresnext50_32x4d", 512, 3)
    assert paper.augment == AugmentConfig()
    assert paper.augment.rotation == 30.0
    quick = TrainConfig.from_preset("quick", seed=5)
    assert quick.image_size <= 160 and quick.seed == 5
    assert TrainConfig.from_dict(quick.to_dict()) == quick
    from ichscan.windows import PAPER_WINDOWS

    assert tuple(paper.windows) == tuple(PAPER_WINDOWS)


def test_auto_precision_is_bf16_only_on_a_cpu_that_computes_it(monkeypatch):
    import ichscan.hardware as hw
    from ichscan.errors import IchscanError

    cpu = torch.device("cpu")
    # What "auto" picks on this very CPU, from its flags read here independently of ichscan.
    flags = next((set(line.split(":", 1)[1].split()) for line in open("/proc/cpuinfo") if line.startswith("flags")),
                 set())
    expected = "bf16" if {"avx512_bf16", "amx_bf16"} & flags else "fp32"
    assert training_precision("auto", cpu) == expected
    # And on CPUs with and without native bf16.
    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert training_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))  # AVX-512 without BF16
    assert training_precision("auto", cpu) == "fp32"
    assert training_precision("fp16", cpu) == "fp16" and training_precision("bf16", cpu) == "bf16"
    assert hw.autocast_dtype("fp32") is None and hw.autocast_dtype("bf16") == torch.bfloat16
    with pytest.raises(IchscanError, match="precision must be one of auto, fp32, bf16, fp16"):
        training_precision("fp8", cpu)


def test_loss_falls_and_tiny_set_is_overfitted(tmp_path):
    data = BlobSet(n=32)
    config = tiny_config(epochs=12, batch_size=8, lr=3e-3, augment=AugmentConfig.none())
    result = train(config, data, data, tmp_path / "run")
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.5
    final = result.history[-1]
    assert final["val_auc_mean"] > 0.95
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == config.epochs
    assert set(json.loads(lines[-1])["val_auc"]) == set(LABELS)
    model, meta = load_checkpoint(result.best)
    assert meta.image_size == 32 and meta.labels == LABELS
    assert meta.metrics["val_loss"] == min(h["val_loss"] for h in result.history)


def test_resume_equals_uninterrupted(tmp_path):
    data = BlobSet(n=28, seed=1)
    val = BlobSet(n=8, seed=2)
    config = tiny_config(epochs=2, batch_size=8)
    full = train(config, data, val, tmp_path / "full")
    # Interrupted mid-epoch (step 4 of 3 per epoch: second epoch), then resumed twice over.
    part = train(config, data, val, tmp_path / "part", stop_after_steps=4)
    assert part.interrupted and part.global_step == 4
    again = train(config, data, val, tmp_path / "part", resume=True, stop_after_steps=5)
    assert again.interrupted
    done = train(config, data, val, tmp_path / "part", resume=True)
    assert done.global_step == full.global_step
    a, _ = load_checkpoint(full.last)
    b, _ = load_checkpoint(done.last)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in done.history]
    assert len((tmp_path / "part" / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_refuses_changed_config(tmp_path):
    data = BlobSet(n=16)
    config = tiny_config(epochs=1)
    train(config, data, None, tmp_path / "r", stop_after_steps=1)
    from ichscan.errors import IchscanError

    with pytest.raises(IchscanError, match="lr"):
        train(tiny_config(epochs=1, lr=1.0), data, None, tmp_path / "r", resume=True)


def test_checkpointer_keeps_the_lowest_validation_loss_as_best(tmp_path):
    from ichscan.model import build_model
    from ichscan.train import Checkpointer, Distributed

    checkpointer = Checkpointer(tmp_path, tiny_config(), torch.device("cpu"), Distributed())
    model = build_model("resnet10t", labels=LABELS, pretrained=False)
    best_epochs = []
    for epoch, val_loss in enumerate([0.5, 0.7, 0.4], start=1):
        checkpointer.save_epoch(model, {"epoch": epoch, "train_loss": 0.1, "val_loss": val_loss})
        best_epochs.append(json.loads(checkpointer.best_path.read_text())["metrics"]["epoch"])
    assert best_epochs == [1, 1, 3]
    assert json.loads(checkpointer.last_path.read_text())["metrics"]["epoch"] == 3
    assert checkpointer.best_loss == 0.4


def test_cli_index_cache_train_and_ensemble(tmp_path, capsys):
    from test_data import make_rsna_folder

    from ichscan.cli import main
    from ichscan.model import load_ensemble

    make_rsna_folder(tmp_path / "train", patients=6, slices=3)
    make_rsna_folder(tmp_path / "val", patients=2, slices=3)
    assert main(["index", str(tmp_path / "train"), "--workers", "1", "--no-progress"]) == 0
    assert (tmp_path / "train" / "ichscan_index.parquet").is_file()
    assert main(["cache", str(tmp_path / "train"), "--out", str(tmp_path / "c32"), "--size", "32",
                 "--workers", "1", "--no-progress"]) == 0
    common = ["--preset", "quick", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--no-progress",
              "--precision", "fp32", "--workers", "0", "--io-workers", "1", "--device", "cpu"]
    assert main(["train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--out", str(tmp_path / "a"),
                 "--cache", str(tmp_path / "c32"), "--seed", "0", *common]) == 0
    err = capsys.readouterr().err
    assert "preset quick" in err and "resnet10t" in err and "best checkpoint" in err
    # The second model on a patient fold of the same folder, averaged with the first.
    assert main(["train", str(tmp_path / "train"), "--out", str(tmp_path / "b"), "--fold", "1", "--folds", "3",
                 "--seed", "1", "--ensemble-with", str(tmp_path / "a" / "best.json"),
                 "--cache", str(tmp_path / "c_b"), *common]) == 0
    from ichscan.data import DONE, ImageCache

    assert (ImageCache(tmp_path / "c_b").status == DONE).sum() == 18  # a fold split caches validation too
    manifest = json.loads((tmp_path / "b" / "ensemble.json").read_text())
    assert [m["checkpoint"] for m in manifest["members"]] == ["../a/best.json", "best.json"]
    ens = load_ensemble(tmp_path / "b" / "ensemble.json")
    assert len(ens.members) == 2 and ens.image_size == 32
    meta = json.loads((tmp_path / "b" / "best.json").read_text())
    assert meta["config"]["seed"] == 1 and meta["data"]["validation"].startswith("fold 1 of 3")
    assert meta["data"]["train"]["images"] + meta["data"]["val"]["images"] == 18


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from ichscan.phantom import generate_dataset

    root = tmp_path_factory.mktemp("phantoms")
    generate_dataset(root / "train", studies=6, seed=3, size=64, slices=(4, 6))
    return root / "train"


def test_phantom_training_resume_and_checkpoint_round_trip(tmp_path, phantoms):
    from ichscan.train import RunInputs, predict_logits, prepare_datasets, run_training

    config = tiny_config(image_size=32, epochs=2, batch_size=8, lr=2e-3)
    inputs = RunInputs(phantoms, val_data=phantoms, io_workers=1)
    full = run_training(config, inputs, tmp_path / "full")
    losses = [h["train_loss"] for h in full.history]
    assert losses[-1] < losses[0]
    part = run_training(config, inputs, tmp_path / "part", stop_after_steps=4)
    assert part.interrupted
    done = run_training(config, inputs, tmp_path / "part", resume=True)
    a, _ = load_checkpoint(full.last)
    b, meta = load_checkpoint(done.last)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # The checkpoint on disk reproduces the validation numbers recorded when it was written.
    _, val_set, _ = prepare_datasets(config, inputs)
    logits, targets = predict_logits(b, val_set, "cpu", batch_size=8)
    again = validation_metrics(logits, targets, LABELS)
    assert again["val_loss"] == pytest.approx(meta.metrics["val_loss"], rel=1e-5)
    assert meta.data["train"]["images"] == len(val_set)


def test_ensemble_with_takes_run_folders_and_manifests(tmp_path, phantoms):
    from ichscan.model import write_ensemble
    from ichscan.train import RunInputs, run_training

    config = tiny_config(epochs=1, max_steps_per_epoch=1)
    inputs = RunInputs(phantoms, val_data=phantoms, io_workers=1)
    first = run_training(config, inputs, tmp_path / "a")
    write_ensemble(tmp_path / "elsewhere" / "pair.json", [first.best, first.best])
    run_training(config, inputs, tmp_path / "b",
                 ensemble_with=[tmp_path / "a", tmp_path / "elsewhere" / "pair.json"])
    manifest = json.loads((tmp_path / "b" / "ensemble.json").read_text())
    # A folder stands for its best checkpoint; a manifest's members are kept, read relative to it.
    assert [m["checkpoint"] for m in manifest["members"]] == ["../a/best.json"] * 3 + ["best.json"]


def test_torchrun_two_processes_on_cpu(tmp_path, phantoms):
    """DDP through torchrun (gloo on CPU): trains, stops, resumes, writes once. (20 s; in `make test` since the
    suite runs on every core, so that CI runs the distributed path.)"""
    import subprocess
    import sys

    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "ichscan",
            "train", str(phantoms), "--val", str(phantoms), "--out", str(tmp_path / "run"), "--preset", "quick",
            "--image-size", "32", "--epochs", "2", "--batch-size", "4", "--no-progress", "--io-workers", "1",
            "--workers", "0", "--precision", "fp32"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "--stop-after-steps", "3"], check=True, env=env, timeout=300)
    subprocess.run([*args, "--resume"], check=True, env=env, timeout=300)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    model, meta = load_checkpoint(tmp_path / "run" / "last.json")
    assert meta.config["epochs"] == 2


def test_sigint_saves_between_steps_and_resumes_exactly(tmp_path):
    import os
    import signal

    data = BlobSet(n=24, seed=4)
    config = tiny_config(epochs=2, batch_size=8)
    full = train(config, data, None, tmp_path / "full")
    # what the process started with: Python's default, or SIG_IGN when launched in the background (nohup, &)
    before = signal.getsignal(signal.SIGINT)

    def interrupt(event):
        if event.phase == "train" and event.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-run, acted on after this step

    with pytest.raises(KeyboardInterrupt):
        train(config, data, None, tmp_path / "part", progress=interrupt)
    assert signal.getsignal(signal.SIGINT) is before  # the handler it had is given back
    state = torch.load(tmp_path / "part" / "resume.pt", weights_only=True)
    assert state["global_step"] == 2
    done = train(config, data, None, tmp_path / "part", resume=True)
    a, _ = load_checkpoint(full.last)
    b, _ = load_checkpoint(done.last)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
