"""Phantom replay while adapting to a site (``--replay``): what joins each epoch, and that it keeps what the
starting model knew where the site's data has nothing to teach."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ichscan.errors import DataError, IchscanError
from ichscan.labels import LABELS


class _Slices(torch.utils.data.Dataset):
    """Toy slices of 32 px: ``cue`` 'square' (a bright square; every label positive) or 'stripe' (a bright
    stripe; only ``any`` positive), on half of them; the other half plain noise, every label negative."""

    labels = LABELS

    def __init__(self, n: int, seed: int, cue: str = "square"):
        g = np.random.default_rng(seed)
        self.x = (g.random((n, 3, 32, 32)) * 60).astype(np.uint8)
        self.y = np.zeros((n, len(LABELS)), np.float32)
        pos = np.arange(n) % 2 == 1
        if cue == "square":
            self.x[pos, :, 8:24, 8:24] = 250
            self.y[pos] = 1.0
        else:
            self.x[pos, :, 14:18, 2:30] = 250
            self.y[pos, 0] = 1.0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def summary(self):
        return {"images": len(self)}


def test_replay_mix_is_the_site_data_then_a_fixed_seeded_draw_of_the_replay_set():
    from ichscan.train import ReplayMix

    site, replay = _Slices(20, 0), _Slices(100, 1)
    mix = ReplayMix(site, replay, 0.5, seed=7)
    assert len(mix) == 40 and len(mix.picks) == 20  # share 0.5: as many replayed items as the site's
    assert len(set(mix.picks.tolist())) == 20 and list(mix.picks) == sorted(mix.picks)  # without replacement
    for i in (0, 19):  # the site's items first, unchanged
        assert np.array_equal(mix[i][0], site[i][0]) and np.array_equal(mix[i][1], site[i][1])
    for j in (0, 19):
        assert np.array_equal(mix[20 + j][0], replay[int(mix.picks[j])][0])
    assert np.array_equal(ReplayMix(site, replay, 0.5, seed=7).picks, mix.picks)  # a resumed run: the same draw
    assert not np.array_equal(ReplayMix(site, replay, 0.5, seed=8).picks, mix.picks)
    assert len(ReplayMix(site, replay, 0.25, seed=7)) == 20 + 7  # 20 * 0.25 / 0.75 = 6.7 -> 7
    assert len(ReplayMix(site, _Slices(5, 2), 0.5, seed=7)) == 25  # a smaller replay set: all of it
    assert mix.summary() == {"images": 20, "replay": {"items": 20, "of": 100, "share": 0.5}}
    for share in (0.0, 1.0, -0.1):
        with pytest.raises(IchscanError, match="replay-share"):
            ReplayMix(site, replay, share, seed=7)
    other = _Slices(10, 3)
    other.labels = ("any",)
    with pytest.raises(DataError, match="replay labels"):
        ReplayMix(site, other, 0.5, seed=7)

    # series level: whole series, and the mix's series targets follow its items (the loader batches by them)
    site_series, replay_series = _Slices(4, 0), _Slices(10, 1)
    site_series.series_y, replay_series.series_y = site_series.y, replay_series.y
    mixed = ReplayMix(site_series, replay_series, 0.5, seed=7)
    assert np.array_equal(mixed.series_y, np.concatenate([site_series.y, replay_series.y[mixed.picks]]))
    with pytest.raises(IchscanError, match="both be slices or both be series"):
        ReplayMix(site_series, replay, 0.5, seed=7)


def _probability(model, data, label: int) -> float:
    """The mean probability of ``label`` over ``data``'s positive items."""
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(data.x).float()))[:, label].numpy()
    return float(p[data.y[:, 0] == 1].mean())


def test_replay_keeps_what_the_site_data_cannot_teach(tmp_path):
    """A start that learnt 'square -> every label' fine-tuned on site data where only `any` is ever positive (a
    stripe): alone, it unlearns epidural on squares; with the squares replayed beside, it keeps it."""
    from ichscan.augment import AugmentConfig
    from ichscan.model import build_model, load_checkpoint, save_checkpoint
    from ichscan.train import TrainConfig, train, with_replay

    common = dict(image_size=32, batch_size=16, warmup_steps=0, augment=AugmentConfig.none(), channels_last=False,
                  precision="fp32", freeze_stages=0, freeze_bn=False)
    torch.manual_seed(3)
    first = save_checkpoint(tmp_path / "random", build_model("resnet10t"),
                            {"windows": ["brain", "blood", "soft_tissue"], "image_size": 32})
    start = train(TrainConfig.from_preset("finetune", init=str(first), epochs=4, lr=1e-3, seed=1, **common),
                  _Slices(64, 0), None, tmp_path / "start").last
    squares = _Slices(32, 9)
    start_model, _ = load_checkpoint(start)
    assert _probability(start_model.eval(), squares, 1) > 0.8  # it knows epidural on squares

    site = _Slices(64, 4, cue="stripe")
    tuned = {}
    for name, replay in (("alone", None), ("replayed", _Slices(64, 5))):
        config = TrainConfig.from_preset("finetune", init=str(start), epochs=6, lr=1e-3, seed=2, **common)
        result = train(config, with_replay(config, site, replay), None, tmp_path / name)
        tuned[name], _ = load_checkpoint(result.last)
        assert _probability(tuned[name].eval(), _Slices(32, 10, cue="stripe"), 0) > 0.8  # both learn the site
    alone, replayed = (_probability(tuned[k].eval(), squares, 1) for k in ("alone", "replayed"))
    assert alone < 0.5 < replayed, (alone, replayed)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A 'site' and a 'replay' phantom folder in RSNA layout (real DICOM), 96 px."""
    from ichscan.phantom import generate_dataset

    root = tmp_path_factory.mktemp("replay")
    generate_dataset(root / "site", studies=12, seed=21, size=96, slices=(8, 10))
    generate_dataset(root / "replay", studies=12, seed=22, size=96, slices=(8, 10))
    return root


def test_cli_train_replay_records_the_draw_and_a_missing_folder_is_one_line(sets, tmp_path, capsys):
    from ichscan.cli import main
    from ichscan.model import build_model, save_checkpoint

    torch.manual_seed(0)
    init = save_checkpoint(tmp_path / "init", build_model("resnet10t"),
                           {"windows": ["brain", "blood", "soft_tissue"], "image_size": 64})
    site_slices = len(pd.read_csv(sets / "site" / "labels.csv")) // len(LABELS)
    args = ["train", str(sets / "site"), "--init", str(init), "--epochs", "1", "--max-steps-per-epoch", "1",
            "--batch-size", "8", "--no-progress", "--precision", "fp32"]
    assert main([*args, "--out", str(tmp_path / "run"), "--replay", str(sets / "replay")]) == 0
    err = capsys.readouterr().err
    meta = json.loads((tmp_path / "run" / "last.json").read_text())
    assert meta["config"]["replay"] == str(sets / "replay") and meta["config"]["replay_share"] == 0.5
    train_summary = meta["data"]["train"]
    n_train = train_summary["images"]  # the site's training fold (the rest validates)
    assert 0 < n_train < site_slices
    assert train_summary["replay"]["items"] == n_train  # share 0.5: as many as the site's
    assert train_summary["replay"]["of"] == len(pd.read_csv(sets / "replay" / "labels.csv")) // len(LABELS)
    assert f"replay: {n_train} of" in err and (tmp_path / "run" / "replay-cache").is_dir()

    assert main([*args, "--out", str(tmp_path / "bad"), "--replay", str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ichscan train: error:") and "replay folder not found" in err[-1] and "absent" in err[-1]


def test_crossval_replays_beside_every_fold_and_predicts_only_the_site(sets, tmp_path):
    """The replay set joins each fold's training (a draw per fold) and the final model's; every out-of-fold row is
    a site slice, predicted by the fold that never saw its patient."""
    from ichscan.crossval import CrossvalOptions, run_crossval
    from ichscan.model import build_model, save_checkpoint
    from ichscan.train import TrainConfig

    torch.manual_seed(0)
    init = save_checkpoint(tmp_path / "init", build_model("resnet10t"),
                           {"windows": ["brain", "blood", "soft_tissue"], "image_size": 64})
    config = TrainConfig.from_preset("finetune", init=str(init), epochs=1, max_steps_per_epoch=1, batch_size=8,
                                     precision="fp32", replay=str(sets / "replay"))
    lines: list[str] = []
    out = tmp_path / "cv"
    run_crossval(config, sets / "site", out, options=CrossvalOptions(folds=2, n_bootstrap=10),
                 report=lines.append)
    replayed = [line for line in lines if line.startswith("replay: ")]
    assert len(replayed) == 3  # two folds and the final model
    assert json.loads((out / "crossval.json").read_text())["config"]["replay"] == str(sets / "replay")
    site_ids = set(pd.read_csv(sets / "site" / "labels.csv")["ID"].str.rsplit("_", n=1).str[0])
    replay_ids = set(pd.read_csv(sets / "replay" / "labels.csv")["ID"].str.rsplit("_", n=1).str[0])
    slices = pd.read_csv(out / "oof_slices.csv")
    assert set(slices["image_id"]) == site_ids and not site_ids & replay_ids
    for k in range(2):
        fold = json.loads((out / f"fold-{k}" / "fold.json").read_text())
        meta = json.loads((out / f"fold-{k}" / "last.json").read_text())
        assert meta["data"]["train"]["replay"]["items"] == meta["data"]["train"]["images"]
        held = set(slices.loc[slices["fold"] == k, "patient_id"])
        assert held and not held & set(fold["train_patients"])


def test_replay_auto_draws_phantoms_as_the_bundles_last_stage_did_with_a_seed_of_its_own():
    """REPLAY_PHANTOMS plans exactly the phantoms of the bundle's recorded last-stage command (parsed by the
    phantom CLI), but for the seed, and no stage of the bundle used that seed."""
    import shlex

    from ichscan.bundled import REPLAY_PHANTOMS
    from ichscan.cli import build_parser
    from ichscan.model import bundled_dir
    from ichscan.phantom import parse_prevalence, plan_dataset
    from ichscan.phantom.dataset import SHARE_OPTIONS  # every option a stage's command can carry

    recipe = json.loads((bundled_dir() / "bundled.json").read_text())["recipe"]
    stages = recipe["stages"]
    commands = [c for stage in stages for c in stage.get("phantoms", [])]
    used = {int(shlex.split(c)[shlex.split(c).index("--seed") + 1]) for c in commands}
    assert REPLAY_PHANTOMS["seed"] not in used
    words = shlex.split(stages[-1]["phantoms"][0])[1:]  # 'ichscan phantom ...' -> 'phantom ...'
    args = build_parser().parse_args(words)
    ours = dict(REPLAY_PHANTOMS)
    studies, seed = ours.pop("studies"), ours.pop("seed")
    assert studies == 100  # a quarter of a stage's 400: about as many slices as a site of 100 series
    theirs = plan_dataset(studies, seed, size=args.size, slices=args.slices, thickness=args.thickness,
                          prevalence=parse_prevalence(args.prevalence), twins=args.twins,
                          outside_margin=args.outside_margin, **{k: getattr(args, k) for k in SHARE_OPTIONS})
    assert plan_dataset(studies, seed, **ours) == theirs


def test_resolve_replay_auto_only_for_the_bundled_model(tmp_path, monkeypatch):
    import ichscan.bundled
    from ichscan.train import TrainConfig, resolve_replay

    lines: list[str] = []
    other = TrainConfig.from_preset("finetune", init=str(tmp_path / "mine.json"), replay="auto")
    assert resolve_replay(other, tmp_path / "a", say=lines.append).replay is None
    assert "is not the bundled model" in lines[-1] and not (tmp_path / "a").exists()
    for off in ("none", "", None):
        assert resolve_replay(dataclasses.replace(other, replay=off), tmp_path / "a").replay is None
    assert resolve_replay(dataclasses.replace(other, replay="/some/dir"), tmp_path / "a").replay == "/some/dir"

    # the bundled model: its phantoms drawn into OUT/replay-phantoms (a small recipe here; the real one is
    # checked above against the bundle's record), and kept, not drawn again, by a second run
    small = dict(ichscan.bundled.REPLAY_PHANTOMS, studies=3, size=64, slices=(6, 8))
    monkeypatch.setattr(ichscan.bundled, "REPLAY_PHANTOMS", small)
    bundled = dataclasses.replace(other, init="bundled")
    resolved = resolve_replay(bundled, tmp_path / "b", workers=1, say=lines.append)
    folder = tmp_path / "b" / "replay-phantoms"
    assert resolved.replay == str(folder) and "3 phantom studies" in lines[-1]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seed"] == small["seed"] and manifest["counts"]["series"] == 3
    assert manifest["arguments"]["fractures"] == small["fractures"]
    stamp = {p: p.stat().st_mtime_ns for p in folder.rglob("*.dcm")}
    assert len(stamp) >= 18
    assert resolve_replay(bundled, tmp_path / "b", workers=1, say=lines.append).replay == str(folder)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.dcm")} == stamp
    assert "already there" in lines[-1]


def test_a_read_only_replay_folder_is_indexed_beside_its_cache(sets, tmp_path, monkeypatch):
    """A replay folder the run may not write to (a shared phantom set): its header index goes beside the
    replay cache, and the folder is left as it was. (Root, as CI runs, writes through file modes, so the
    folder is made unwritable to the check itself, os.access, and only for it.)"""
    import os
    import shutil

    from ichscan.train import TrainConfig, load_replay

    folder = tmp_path / "shared"
    shutil.copytree(sets / "replay", folder, ignore=shutil.ignore_patterns("ichscan_index.parquet"))
    before = sorted(p.name for p in folder.iterdir())
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (False if Path(path) == folder and mode & os.W_OK
                                                                 else real_access(path, mode, **kw)))
    config = TrainConfig.from_preset("finetune", image_size=64, replay=str(folder))
    replay = load_replay(config, cache=tmp_path / "cache")
    assert len(replay) == len(pd.read_csv(folder / "labels.csv")) // len(LABELS)
    assert (tmp_path / "cache-index.parquet").is_file() and sorted(p.name for p in folder.iterdir()) == before
