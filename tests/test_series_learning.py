"""Site adaptation (issue 12): series pooling and labels, the series head, fine-tuning from a checkpoint,
series-label training on phantoms, and cross-validation whose out-of-fold predictions never come from a
model that saw the patient."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ichscan.errors import DataError
from ichscan.labels import LABELS
from ichscan.metrics import roc_auc, weighted_log_loss
from ichscan.series import (
    HeadConfig,
    SeriesHead,
    mil_loss,
    pool_logits,
    read_series_labels,
    series_targets,
)

# ------------------------------------------------------------------------------------------------ pooling


def test_pool_logits_max_and_lse_values():
    x = torch.tensor([[0.0, 1.0], [2.0, -1.0], [-3.0, 0.5]])  # 3 slices, 2 labels
    assert pool_logits(x, "max").tolist() == [2.0, 1.0]
    lse = pool_logits(x, "lse", sharpness=5.0)
    expect = [math.log(sum(math.exp(5 * v) for v in col) / 3) / 5 for col in ([0, 2, -3], [1, -1, 0.5])]
    assert lse.tolist() == pytest.approx(expect, abs=1e-6)
    # between max - log(S)/r and max; equal slices give exactly their logit
    assert all(2.0 - math.log(3) / 5 <= v <= 2.0 for v in lse[:1].tolist())
    assert pool_logits(torch.full((4, 1), 0.7), "lse").item() == pytest.approx(0.7, abs=1e-6)


def test_pool_logits_mask_ignores_padding():
    x = torch.tensor([[[1.0], [5.0], [9.0]], [[2.0], [3.0], [0.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert pool_logits(x, "max", mask).flatten().tolist() == [5.0, 3.0]
    assert pool_logits(x, "lse", mask)[0].item() == pytest.approx(pool_logits(x[0, :2], "lse").item(), abs=1e-6)


def test_mil_loss_is_rsna_log_loss_of_pooled_series():
    torch.manual_seed(0)
    logits = torch.randn(7, 6)
    lengths = torch.tensor([3, 4])
    series_y = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    slices = torch.full((7, 6), float("nan"))
    loss = mil_loss(logits, {"series": series_y, "slices": slices, "lengths": lengths}, pooling="max")
    pooled = torch.stack([logits[:3].max(0).values, logits[3:].max(0).values])
    expect = weighted_log_loss(series_y.numpy(), torch.sigmoid(pooled).double().numpy())
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    # known slice labels add the slice loss
    slices[:] = 0
    both = mil_loss(logits, {"series": series_y, "slices": slices, "lengths": lengths}, pooling="max",
                    slice_weight=1.0)
    slice_part = weighted_log_loss(np.zeros((7, 6)), torch.sigmoid(logits).double().numpy())
    assert both.item() == pytest.approx(expect + slice_part, rel=1e-5)


# ------------------------------------------------------------------------------------------- series labels


def test_read_series_labels_errors_name_the_line(tmp_path):
    good = tmp_path / "series_labels.csv"
    good.write_text("series_uid," + ",".join(LABELS) + "\n1.2.3,1,0,1,0,0,0\n1.2.4,0,0,0,0,0,0\n")
    frame = read_series_labels(good)
    assert frame["intraparenchymal"].tolist() == [1.0, 0.0]
    bad = tmp_path / "bad.csv"
    bad.write_text("series_uid," + ",".join(LABELS) + "\n1.2.3,1,0,1,0,0,0\n1.2.4,0,0,yes,0,0,0\n")
    with pytest.raises(DataError) as err:
        read_series_labels(bad)
    assert "line 3" in str(err.value) and "intraparenchymal" in str(err.value) and "bad.csv" in str(err.value)
    assert "\n" not in str(err.value)
    dup = tmp_path / "dup.csv"
    dup.write_text("series_uid," + ",".join(LABELS) + "\n1.2.3,1,0,1,0,0,0\n1.2.3,0,0,0,0,0,0\n")
    with pytest.raises(DataError, match="line 3: series 1.2.3 is labelled twice"):
        read_series_labels(dup)
    lacking = tmp_path / "lacking.csv"
    lacking.write_text("series_uid,any\n1.2.3,1\n")
    with pytest.raises(DataError, match="lack the columns"):
        read_series_labels(lacking)


def test_series_targets_from_series_file_else_slice_maximum():
    frame = pd.DataFrame({"series_uid": ["a", "a", "b", "b"], "any": [0, 1, 0, 0],
                          **{name: [0, 0, 0, 0] for name in LABELS[1:]}})
    frame.loc[1, "subdural"] = 1
    derived = series_targets(frame, None)
    assert derived.loc["a", "any"] == 1 and derived.loc["a", "subdural"] == 1 and derived.loc["b", "any"] == 0
    given = pd.DataFrame({"series_uid": ["b"], **{name: [1.0] for name in LABELS}})
    mixed = series_targets(frame, given)
    assert mixed.loc["b", "any"] == 1 and mixed.loc["a", "any"] == 1  # "a" falls back to its slices


# --------------------------------------------------------------------------------------------- series head


def test_untrained_series_head_is_lse_pooling_of_the_slice_logits():
    torch.manual_seed(1)
    head = SeriesHead(HeadConfig(in_features=16)).eval()
    emb, logits = torch.randn(9, 16), torch.randn(9, 6)
    slice_logits, series_logits = head(emb, logits)
    assert torch.equal(slice_logits, logits)
    assert torch.allclose(series_logits, pool_logits(logits, "lse"), atol=1e-6)
    # padding in a batch changes nothing for the shorter series
    emb2, logits2 = torch.randn(5, 16), torch.randn(5, 6)
    batch_emb = torch.zeros(2, 9, 16)
    batch_logits = torch.zeros(2, 9, 6)
    batch_emb[0], batch_logits[0] = emb, logits
    batch_emb[1, :5], batch_logits[1, :5] = emb2, logits2
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0] = True
    mask[1, :5] = True
    _, series_batch = head(batch_emb, batch_logits, mask)
    assert torch.allclose(series_batch[1], head(emb2, logits2)[1], atol=1e-6)


def test_series_head_travels_with_the_checkpoint(tmp_path):
    from ichscan.model import attach_series_head, build_model, load_checkpoint, save_checkpoint

    torch.manual_seed(2)
    model = build_model("resnet10t").eval()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        logits, emb = model.forward_with_embedding(x)
        assert torch.allclose(logits, model(x), atol=1e-6)
    head = attach_series_head(model, HeadConfig(in_features=emb.shape[1]).to_dict())
    for p in head.parameters():  # not the zero start: a head that has learnt something
        torch.nn.init.normal_(p, std=0.1)
    path = save_checkpoint(tmp_path / "ck", model, {"windows": ["brain", "blood", "soft_tissue"], "image_size": 32})
    record = json.loads(path.read_text())
    assert record["series_head"]["kind"] == "gru" and record["series_head"]["in_features"] == 512
    loaded, _ = load_checkpoint(path)
    with torch.no_grad():
        a = model.series_context(emb, logits)
        b = loaded.series_context(*reversed(loaded.forward_with_embedding(x)))
    assert torch.allclose(a[1], b[1], atol=1e-5) and torch.allclose(a[0], b[0], atol=1e-5)


def test_checkpoint_with_a_broken_series_head_record_is_refused(tmp_path):
    from ichscan.errors import CheckpointError
    from ichscan.model import build_model, load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path / "ck", build_model("resnet10t"), {"windows": ["brain"] * 3, "image_size": 32})
    record = json.loads(path.read_text())
    record["series_head"] = {"format": "ichscan-series-head/1", "kind": "lstm", "in_features": 512,
                             "labels": list(LABELS), "hidden": 8, "dropout": 0.0}
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="'series_head' is not usable: series head kind 'lstm'"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------- fine-tuning


class _Toy(torch.utils.data.Dataset):
    """Separable toy slices: a bright square means every label positive."""

    labels = LABELS

    def __init__(self, n: int, seed: int):
        g = np.random.default_rng(seed)
        self.x = (g.random((n, 3, 32, 32)) * 60).astype(np.uint8)
        self.y = (np.arange(n) % 2).astype(np.float32)
        self.x[self.y == 1, :, 8:24, 8:24] = 250

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], np.full(len(LABELS), self.y[i], np.float32)


def test_finetune_from_a_checkpoint_starts_from_its_weights_and_its_loss_falls(tmp_path):
    from ichscan.augment import AugmentConfig
    from ichscan.model import build_model, load_checkpoint, save_checkpoint
    from ichscan.train import TrainConfig, train

    torch.manual_seed(3)
    start = build_model("resnet10t")
    init = save_checkpoint(tmp_path / "start", start, {"windows": ["brain", "blood", "soft_tissue"],
                                                       "image_size": 32})
    config = TrainConfig.from_preset("finetune", init=str(init), image_size=32, epochs=4, batch_size=16, lr=1e-3,
                                     warmup_steps=0, augment=AugmentConfig.none(), channels_last=False, seed=5,
                                     freeze_stages=0)  # a random start has no early features worth keeping
    assert TrainConfig.from_preset("finetune").freeze_stages == 2  # what a real start gets (test below)
    result = train(config, _Toy(64, 0), None, tmp_path / "run")
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    tuned, _ = load_checkpoint(result.last)
    assert not torch.equal(tuned.backbone.conv1[0].weight, start.backbone.conv1[0].weight)
    # what it learnt separates held-out toys
    toys = _Toy(32, 9)
    with torch.no_grad():
        p = torch.sigmoid(tuned(torch.from_numpy(toys.x)))[:, 0].numpy()
    assert roc_auc(toys.y, p) > 0.95


def test_frozen_stages_keep_the_starting_weights_and_the_rest_learns(tmp_path):
    """--freeze-stages 2: the stem and the first stage of the backbone end the run bit-identical to the starting
    checkpoint (and their batch-norm statistics too), every later stage and the classifier move; a count
    reaching the classifier is a one-line error."""
    from ichscan.augment import AugmentConfig
    from ichscan.errors import IchscanError
    from ichscan.model import build_model, load_checkpoint, save_checkpoint
    from ichscan.train import TrainConfig, frozen_stage_parameters, train

    torch.manual_seed(3)
    start = build_model("resnet10t")
    init = save_checkpoint(tmp_path / "start", start, {"windows": ["brain", "blood", "soft_tissue"],
                                                       "image_size": 32})
    config = TrainConfig.from_preset("finetune", init=str(init), image_size=32, epochs=1, batch_size=16, lr=1e-3,
                                     warmup_steps=0, augment=AugmentConfig.none(), channels_last=False,
                                     freeze_stages=2)
    tuned, _ = load_checkpoint(train(config, _Toy(32, 0), None, tmp_path / "run").last)
    before, after = start.state_dict(), tuned.state_dict()
    for name in before:
        fixed = name.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1."))
        moved = not torch.equal(before[name], after[name])
        if fixed:
            assert not moved, name
    for name in ("backbone.layer2.0.conv1.weight", "backbone.layer4.0.conv2.weight", "backbone.fc.weight"):
        assert not torch.equal(before[name], after[name]), name
    assert len(frozen_stage_parameters(start.backbone, 2)) == 15  # resnet10t: stem 9 tensors, layer1 6
    assert len(frozen_stage_parameters(start.backbone, 5)) == 42  # every tensor but the classifier's 2
    with pytest.raises(IchscanError, match="5 stages before its classifier"):
        frozen_stage_parameters(start.backbone, 6)


def test_init_state_equals_checkpoint(tmp_path):
    """A run with --init starts from the checkpoint's weights, whatever the preset says of ImageNet weights."""
    from ichscan.model import build_model, save_checkpoint
    from ichscan.train import TrainConfig, _build_learner, Distributed

    torch.manual_seed(4)
    start = build_model("resnet10t")
    init = save_checkpoint(tmp_path / "start", start, {"windows": ["brain", "blood", "soft_tissue"],
                                                       "image_size": 32})
    config = TrainConfig.from_preset("finetune", init=str(init), seed=123)
    assert config.pretrained is False  # the finetune preset's: --init, not ImageNet, gives the weights
    learner = _build_learner(config, torch.device("cpu"), Distributed(), total_steps=1,
                             pretrained=config.pretrained, amp_dtype=None, memory_format=torch.contiguous_format)
    for (k, a), b in zip(learner.model.state_dict().items(), start.state_dict().values()):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------------- phantoms, end to end


@pytest.fixture(scope="module")
def phantom_sets(tmp_path_factory):
    """Small phantom sets in RSNA layout (real DICOM): 40 training studies and 40 test studies at 96 px (40, not
    fewer: with 16 test series one misordered pair moves the AUC by 0.017 and the series-label test sat on its bar)."""
    from ichscan.phantom import generate_dataset

    root = tmp_path_factory.mktemp("phantoms")
    generate_dataset(root / "train", studies=40, seed=11, size=96, slices=(10, 12))
    generate_dataset(root / "test", studies=40, seed=12, size=96, slices=(10, 12))
    return root


def test_series_labels_alone_teach_the_model_on_phantoms(phantom_sets, tmp_path, monkeypatch):
    """Slice labels withheld (series_labels.csv only): a classifier that starts knowing nothing (the bundled
    backbone with its classifier zeroed: every series scores the same, AUC 0.5) learns to find the bleeding
    series of held-out phantoms from series labels alone. The backbone stays frozen (--freeze-epochs), so
    what is learnt is learnt through the series-level loss, in seconds."""
    from ichscan.dicom import find_series
    from ichscan.model import load_checkpoint, resolve_init_checkpoint, save_checkpoint
    from ichscan.predict import Predictor
    from ichscan.train import RunInputs, TrainConfig, run_training

    # Training visits series in the order of their pseudonymous patient keys, and the session's site key is
    # random: pin one (all zeros, not chosen for its result) so that the 30 steps take the same path each run.
    # Over four random keys this measured 0.81-0.86; one full suite run gave 0.64 (its key is the likely cause,
    # not proven: that key was not kept).
    key = tmp_path / "zero.key"
    key.write_text("0" * 64 + "\n")
    monkeypatch.setenv("ICHSCAN_KEY_FILE", str(key))
    start, meta = load_checkpoint(resolve_init_checkpoint("bundled"))
    torch.nn.init.zeros_(start.backbone.fc.weight)
    torch.nn.init.zeros_(start.backbone.fc.bias)
    blank = save_checkpoint(tmp_path / "blank", start, {"windows": [w.to_dict() for w in meta.windows],
                                                        "image_size": meta.image_size})
    series_only = tmp_path / "series_only"
    series_only.mkdir()
    (series_only / "images").symlink_to(phantom_sets / "train" / "images")
    (series_only / "series_labels.csv").write_text((phantom_sets / "train" / "series_labels.csv").read_text())
    config = TrainConfig.from_preset("finetune", init=str(blank), label_level="series", epochs=3, series_batch=4,
                                     freeze_epochs=3, lr=1e-2, warmup_steps=0, mil_pooling="max", seed=0)
    result = run_training(config, RunInputs(series_only, val_data=None), tmp_path / "run")
    meta_data = json.loads(Path(result.last).read_text())["data"]
    assert meta_data["label_level"] == "series" and meta_data["train"]["positives"]["any"] == 0  # withheld
    assert meta_data["train"]["series_positives"]["any"] > 0

    truth = pd.read_csv(phantom_sets / "test" / "series_labels.csv").set_index("series_uid")
    test_series = find_series(phantom_sets / "test" / "images").series
    ys = np.array([truth.loc[s.series_uid, "any"] for s in test_series])
    assert 0 < ys.sum() < len(ys)

    def series_auc(checkpoint) -> float:
        predictor = Predictor.from_checkpoint(checkpoint, tta="none", aggregation="max", precision="fp32")
        return roc_auc(ys, np.array([predictor.predict_series(s).probs[0] for s in test_series]))

    assert series_auc(blank) == 0.5  # a constant: knows nothing yet
    learnt = series_auc(result.last)
    # measured with the first bundle's backbone: 0.83-0.84 over training seeds 0-2 on one machine, 0.78 with seed 0
    # on CI's (30 Adam steps on 40 series: the last float bits of another CPU move the path), against 0.82 for its
    # slice-label classifier; with the bundle of 3 Dec 2026 (8 epochs): 0.856 against 0.836; on the phantoms with
    # skull-base contusions, with the pinned key, 0.848 against 0.818 for the bundle. Far above chance, near what
    # slice labels gave:
    assert learnt >= 0.72
    assert learnt >= series_auc(resolve_init_checkpoint("bundled")) - 0.08


def test_crossval_out_of_fold_predictions_never_see_the_patient(phantom_sets, tmp_path):
    """Each series is predicted by its fold's model, trained without that patient; the OOF file holds exactly
    that model's predictions; the final model carries the OOF thresholds and its series head."""
    from ichscan.crossval import CrossvalOptions, run_crossval
    from ichscan.data import SliceDataset
    from ichscan.model import read_checkpoint_meta, save_checkpoint, build_model
    from ichscan.predict import Predictor
    from ichscan.series import HeadRecipe
    from ichscan.train import TrainConfig

    torch.manual_seed(0)
    init = save_checkpoint(tmp_path / "init", build_model("resnet10t"),
                           {"windows": ["brain", "blood", "soft_tissue"], "image_size": 64})
    config = TrainConfig.from_preset("finetune", init=str(init), epochs=1, max_steps_per_epoch=2, batch_size=16,
                                    precision="fp32")  # compared with fp32 predictions below
    options = CrossvalOptions(folds=3, keep_start=0.0, series_head=True, head=HeadRecipe(epochs=2), n_bootstrap=20)
    out = tmp_path / "cv"
    result = run_crossval(config, phantom_sets / "train", out, options=options)
    folds = pd.read_csv(out / "folds.csv")
    assert folds.groupby("patient_id")["fold"].nunique().max() == 1  # a patient lives in one fold
    slices = pd.read_csv(out / "oof_slices.csv")
    for k in range(3):
        trained_on = set(json.loads((out / f"fold-{k}" / "fold.json").read_text())["train_patients"])
        held = set(folds.loc[folds["fold"] == k, "patient_id"])
        assert held and not trained_on & held
        assert trained_on | held == set(folds["patient_id"])
        # the OOF slice probabilities are the fold model's own, as ichscan predict makes them (flip TTA)
        rows = slices[slices["fold"] == k].head(8)
        frame = pd.read_parquet(phantom_sets / "train" / "ichscan_index.parquet").set_index("image_id")
        part = frame.loc[rows["image_id"]].reset_index()
        ds = SliceDataset(part, 64, ["brain", "blood", "soft_tissue"], LABELS)
        predictor = Predictor.from_checkpoint(out / f"fold-{k}" / "model.json", aggregation="max", precision="fp32")
        assert predictor.tta == ("identity", "hflip")
        expect = predictor.predict_arrays(np.stack([ds.image(i) for i in range(len(ds))]))[:, 0]
        assert np.allclose(rows["prob_any"].to_numpy(), expect, atol=1e-5)
        # the starting model unadapted, made the same way (flip TTA), so the gain measures adaptation alone
        start = Predictor.from_checkpoint(init, aggregation="max", precision="fp32")
        base = start.predict_arrays(np.stack([ds.image(i) for i in range(len(ds))]))[:, 0]
        assert np.allclose(rows["baseline_any"].to_numpy(), base, atol=1e-5)
    series = pd.read_csv(out / "oof_series.csv")
    assert len(series) == 40 and {"adapted_context_any", "adapted_max_any", "baseline_max_any"} <= set(series)
    # a site recomputing an AUC from the OOF file gets comparison.csv's (noisy-OR near 1 keeps its ranking)
    from sklearn.metrics import roc_auc_score

    comparison = pd.read_csv(out / "comparison.csv")
    for row in comparison[comparison["aggregation"] != "slices"].itertuples():
        recomputed = roc_auc_score(series["true_any"], series[f"{row.model}_{row.aggregation}_any"])
        assert recomputed == pytest.approx(row.auc_any, abs=1e-4), (row.model, row.aggregation)
        bleed = series["true_any"] == 1  # which bleed it is: a subtype among the bleeding series alone
        for name in LABELS[1:]:
            y = series.loc[bleed, f"true_{name}"]
            got = getattr(row, f"bleeding_auc_{name}")
            if 0 < y.sum() < len(y):
                expect = roc_auc_score(y, series.loc[bleed, f"{row.model}_{row.aggregation}_{name}"])
                assert got == pytest.approx(expect, abs=1e-4), (row.model, row.aggregation, name)
            else:
                assert np.isnan(got)
    # the gain over the starting model, paired on the same series: the adapted model's head against the
    # starting model's top-3 (it has no head), as ichscan compare computes it
    gain = json.loads((out / "gain.json").read_text())
    assert gain["names"] == ["baseline topk", "adapted context"] and gain["n"] == 40
    any_row = gain["per_label"][0]
    assert any_row["diff"] == pytest.approx(roc_auc_score(series["true_any"], series["adapted_context_any"])
                                            - roc_auc_score(series["true_any"], series["baseline_topk_any"]))
    assert any_row["boot_low"] <= any_row["diff"] <= any_row["boot_high"]
    assert "The gain over the starting model" in (out / "crossval.md").read_text()
    assert "Which bleed it is: each subtype's AUC among the bleeding series" in (out / "crossval.md").read_text()
    final = read_checkpoint_meta(result.final)
    assert final.operating_points["thresholds"] == pytest.approx(result.thresholds)
    assert final.record["aggregation"]["method"] == "context" and final.record["series_head"]["kind"] == "gru"
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert thresholds["source"]["predictions"] == "out-of-fold series"
    assert thresholds["details"]["any"]["threshold_bootstrap"] <= 20  # resampled patients, as Table 1's CIs
    assert "threshold_ci" in thresholds["details"]["any"]
    d = thresholds["details"]["any"]  # crossval.md's operating points are thresholds.json's, to 3 decimals
    ci = "NA" if not d["threshold_ci"] else f"{d['threshold_ci'][0]:.3f}-{d['threshold_ci'][1]:.3f}"
    median = "NA" if d["threshold_median"] is None else f"{d['threshold_median']:.3f}"
    assert (f"| any | {thresholds['thresholds']['any']:.3f} | {ci} | {median} | {d['sensitivity']:.3f} | "
            f"{d['specificity']:.3f} |") in (out / "crossval.md").read_text()
    table = (out / "table1_series.md").read_text()
    assert "any" in table and (out / "roc_series.png").is_file() and (out / "crossval.md").is_file()
    # resume: a finished cross-validation reruns from its files, to the same numbers
    again = run_crossval(config, phantom_sets / "train", out, options=options, resume=True)
    assert again.comparison.equals(result.comparison)
    with pytest.raises(Exception, match="--resume"):
        run_crossval(config, phantom_sets / "train", out, options=options)


def test_crossval_predicts_out_of_fold_at_the_runs_precision(phantom_sets, tmp_path):
    """The OOF predictions use the run's --precision (they used predict's default, bf16 on a CPU with
    AVX512-BF16, whatever the run asked for): fp32 and bf16 runs give what Predictor gives at each."""
    from ichscan.crossval import CrossvalOptions, _predict_slices
    from ichscan.data import SliceDataset, load_labelled
    from ichscan.model import build_model, load_checkpoint, save_checkpoint
    from ichscan.predict import Predictor
    from ichscan.train import TrainConfig

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m", build_model("resnet10t"), {"windows": ["brain", "blood", "soft_tissue"],
                                                                      "image_size": 32})
    frame = load_labelled(phantom_sets / "train").frame
    part = frame[frame["series_uid"] == frame["series_uid"].iloc[0]].reset_index(drop=True)
    slices = SliceDataset(part, 32, ["brain", "blood", "soft_tissue"], LABELS)
    images = np.stack([slices.image(i) for i in range(len(slices))])
    got = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig.from_preset("finetune", init=str(ckpt), image_size=32, precision=precision)
        model = load_checkpoint(ckpt)[0]
        got[precision] = _predict_slices([model], slices, config, CrossvalOptions())["slice"]
        predictor = Predictor.from_models([model], windows=config.windows, image_size=32, precision=precision)
        np.testing.assert_allclose(got[precision], predictor.predict_arrays(images), atol=1e-6)
    assert np.abs(got["fp32"] - got["bf16"]).max() > 1e-5  # the two precisions do differ: the check has teeth


def _two_member_start(tmp_path):
    """Two random resnet10t checkpoints at 64 px (seeds 0 and 1) and an ensemble manifest of them."""
    from ichscan.model import build_model, save_checkpoint, write_ensemble

    meta = {"windows": ["brain", "blood", "soft_tissue"], "image_size": 64}
    starts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        starts.append(save_checkpoint(tmp_path / f"start{seed}", build_model("resnet10t"), meta))
    return starts, write_ensemble(tmp_path / "pair.json", starts)


def test_crossval_fine_tunes_every_member_and_predicts_their_average(phantom_sets, tmp_path):
    """--members 2 from a two-member ensemble: each fold trains both members (each from its own starting
    weights), the OOF series probabilities are those of the fold's two models as an ensemble through
    ichscan predict's own path (context aggregation), and the final model is an ensemble manifest of two
    carrying the OOF thresholds."""
    from ichscan.crossval import CrossvalOptions, run_crossval
    from ichscan.dicom import find_series
    from ichscan.model import init_member_checkpoints, load_checkpoint, read_manifest, write_ensemble
    from ichscan.predict import Predictor
    from ichscan.series import HeadRecipe
    from ichscan.train import TrainConfig

    starts, manifest = _two_member_start(tmp_path)
    assert [p.resolve() for p in init_member_checkpoints(manifest)] == [Path(p).resolve() for p in starts]
    config = TrainConfig.from_preset("finetune", init=str(manifest), epochs=1, max_steps_per_epoch=1, batch_size=16,
                                    precision="fp32")  # compared with fp32 predictions below
    options = CrossvalOptions(folds=2, members=2, keep_start=0.0, series_head=True, head=HeadRecipe(epochs=1),
                              n_bootstrap=10, baseline=False, augmented_passes=0)
    out = tmp_path / "cv"
    result = run_crossval(config, phantom_sets / "train", out, options=options)
    for k in range(2):
        for i in range(2):
            model, _ = load_checkpoint(out / f"fold-{k}" / f"member-{i}" / "model.json")
            first = model.backbone.layer4[0].conv1.weight  # each member moved from its own start
            own, _ = load_checkpoint(starts[i])
            other, _ = load_checkpoint(starts[1 - i])
            gap_own = (first - own.backbone.layer4[0].conv1.weight).abs().mean()
            gap_other = (first - other.backbone.layer4[0].conv1.weight).abs().mean()
            assert gap_own < 0.1 * gap_other
    # fold 0's series, predicted by fold 0's two models as an ensemble (ichscan predict's path)
    pair = write_ensemble(tmp_path / "fold0.json", [out / "fold-0" / f"member-{i}" / "model.json" for i in (0, 1)])
    predictor = Predictor.from_checkpoint(pair, precision="fp32")
    assert predictor.aggregation == "context"
    folds = pd.read_csv(out / "folds.csv")
    oof = pd.read_csv(out / "oof_series.csv").set_index("series_uid")
    held = set(folds.loc[folds["fold"] == 0, "series_uid"].astype(str))
    checked = 0
    for series in find_series(phantom_sets / "train" / "images").series:
        if str(series.series_uid) in held and checked < 3:
            got = predictor.predict_series(series).prob("any")
            assert oof.loc[str(series.series_uid), "adapted_context_any"] == pytest.approx(got, abs=1e-5)
            checked += 1
    assert checked == 3
    final = read_manifest(result.final)
    assert result.final.name == "ensemble.json" and len(final.members) == 2
    assert final.thresholds == pytest.approx(result.thresholds) and final.aggregation["method"] == "context"


def test_crossval_keep_start_averages_each_fold_model_with_the_starting_model(phantom_sets, tmp_path):
    """--keep-start 0.5 from a two-member ensemble: each fold's OOF series probabilities are those of the
    fold's fine-tuned model (share 0.5) and the two starting members as they were (0.25 each) through
    ichscan predict's own path (mean of the top 3 slices); the final model is that ensemble, the starting
    members copied beside it byte for byte, carrying the OOF thresholds."""
    from ichscan.crossval import CrossvalOptions, run_crossval
    from ichscan.dicom import find_series
    from ichscan.errors import IchscanError
    from ichscan.model import read_manifest, write_ensemble
    from ichscan.predict import Predictor
    from ichscan.train import TrainConfig

    starts, manifest = _two_member_start(tmp_path)
    config = TrainConfig.from_preset("finetune", init=str(manifest), epochs=1, max_steps_per_epoch=1, batch_size=16,
                                    precision="fp32")  # compared with fp32 predictions below
    with pytest.raises(IchscanError, match="series head needs --keep-start 0"):
        run_crossval(config, phantom_sets / "train", tmp_path / "bad", options=CrossvalOptions(series_head=True))
    with pytest.raises(IchscanError, match=r"\[0, 1\)"):
        run_crossval(config, phantom_sets / "train", tmp_path / "bad", options=CrossvalOptions(keep_start=1.0))
    options = CrossvalOptions(folds=2, n_bootstrap=10, baseline=False)  # the default: keep_start 0.5, top-3
    assert options.keep_start == 0.5 and options.primary == "topk"
    out = tmp_path / "cv"
    result = run_crossval(config, phantom_sets / "train", out, options=options)
    blend = write_ensemble(tmp_path / "fold0.json", [out / "fold-0" / "last.json", *starts], [0.5, 0.25, 0.25])
    predictor = Predictor.from_checkpoint(blend, aggregation="topk", top_k=3, precision="fp32")
    alone = Predictor.from_checkpoint(out / "fold-0" / "last.json", aggregation="topk", top_k=3, precision="fp32")
    folds = pd.read_csv(out / "folds.csv")
    oof = pd.read_csv(out / "oof_series.csv").set_index("series_uid")
    held = set(folds.loc[folds["fold"] == 0, "series_uid"].astype(str))
    checked, moved = 0, 0.0
    for series in find_series(phantom_sets / "train" / "images").series:
        if str(series.series_uid) in held and checked < 3:
            got = predictor.predict_series(series).prob("any")
            assert oof.loc[str(series.series_uid), "adapted_topk_any"] == pytest.approx(got, abs=1e-5)
            moved += abs(got - alone.predict_series(series).prob("any"))
            checked += 1
    assert checked == 3 and moved > 1e-3  # the starting members count: the blend is not the fine-tuned model
    final = read_manifest(result.final)
    assert result.final.name == "ensemble.json"
    assert [m.weight for m in final.members] == pytest.approx([0.5, 0.25, 0.25])
    for i in (0, 1):
        copied = out / "final" / f"start-{i}.safetensors"
        assert copied.read_bytes() == starts[i].with_suffix(".safetensors").read_bytes()
    assert final.thresholds == pytest.approx(result.thresholds) and final.aggregation["method"] == "topk"
    assert "averaged with it" in final.trained_on
    assert "averaged with the starting model as it is (its share 0.5)" in (out / "crossval.md").read_text()


def test_crossval_without_a_starting_model_has_nothing_to_keep(phantom_sets, tmp_path):
    """The default keep_start (0.5) with no --init: said once, dropped to 0, the fold model used alone (max)."""
    from ichscan.crossval import CrossvalOptions, run_crossval
    from ichscan.train import TrainConfig

    config = TrainConfig.from_preset("finetune", arch="resnet10t", image_size=32, epochs=1, max_steps_per_epoch=1,
                                     batch_size=16)
    assert config.init is None
    lines: list[str] = []
    result = run_crossval(config, phantom_sets / "train", tmp_path / "cv", report=lines.append,
                          options=CrossvalOptions(folds=2, n_bootstrap=10, final=False))
    assert sum("nothing to keep" in line for line in lines) == 1
    record = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert record["options"]["keep_start"] == 0.0
    assert json.loads((tmp_path / "cv" / "thresholds.json").read_text())["source"]["aggregation"] == "max"
    assert set(result.comparison["model"]) == {"adapted"}  # no starting model: no baseline either


def test_crossval_cli_keep_start_out_of_range_is_one_line(tmp_path, capsys):
    from ichscan.cli import main

    assert main(["crossval", str(tmp_path), "--out", str(tmp_path / "cv"), "--keep-start", "1.5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert any("--keep-start 1.5" in line and "[0, 1)" in line for line in err), err
    assert not (tmp_path / "cv").exists()  # refused before anything is written


def test_predict_uses_the_checkpoints_series_head(tmp_path):
    """``ichscan predict`` with a checkpoint that has a series head: series probabilities are the head's on the
    model's own features, and --aggregation max still gives the maximum over slices."""
    from ichscan.dicom import find_series
    from ichscan.model import attach_series_head, build_model, save_checkpoint
    from ichscan.phantom import generate_dataset
    from ichscan.predict import Predictor

    generate_dataset(tmp_path / "ph", studies=1, seed=3, size=64, slices=(8, 8), layout="series")
    torch.manual_seed(6)
    model = build_model("resnet10t").eval()
    head = attach_series_head(model, HeadConfig(in_features=512).to_dict())
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    path = save_checkpoint(tmp_path / "ck", model, {"windows": ["brain", "blood", "soft_tissue"], "image_size": 64})
    series = find_series(tmp_path / "ph").series[0]
    predictor = Predictor.from_checkpoint(path, tta="none", precision="fp32")
    assert predictor.aggregation == "context"
    pred = predictor.predict_series(series)
    kept, arrays, _, _ = predictor.decode_series(series)
    x = torch.from_numpy(next(iter(arrays.values()))).float() / 255
    with torch.no_grad():
        logits, emb = model.forward_with_embedding(x)
        slice_logits, series_logits = model.series_context(emb, logits)
    assert pred.aggregation == "context"
    assert np.allclose(pred.probs, torch.sigmoid(series_logits).numpy(), atol=1e-4)
    assert np.allclose(pred.slice_probs, torch.sigmoid(slice_logits).numpy(), atol=1e-4)
    plain = Predictor.from_checkpoint(path, tta="none", precision="fp32", aggregation="max").predict_series(series)
    assert np.allclose(plain.probs, plain.slice_probs.max(axis=0))
    assert not np.allclose(plain.probs, pred.probs, atol=1e-3)


def test_cli_train_pretrained_checkpoint_loads_and_says_so(tmp_path, capsys):
    """The reported bug: --pretrained with an ichscan checkpoint loaded nothing. Now every backbone tensor
    loads and the run says so; a checkpoint of another architecture stops with one line naming the file."""
    from ichscan.cli import main
    from ichscan.model import build_model, load_checkpoint, save_checkpoint
    from ichscan.phantom import generate_dataset

    generate_dataset(tmp_path / "ph", studies=4, seed=2, size=64, slices=(6, 6))
    torch.manual_seed(7)
    start = save_checkpoint(tmp_path / "start", build_model("resnet10t"),
                            {"windows": ["brain", "blood", "soft_tissue"], "image_size": 64})
    common = ["train", str(tmp_path / "ph"), "--preset", "quick", "--image-size", "64", "--epochs", "1",
              "--max-steps-per-epoch", "1", "--batch-size", "4", "--folds", "2", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a"), "--pretrained", str(start.with_suffix(".safetensors"))]) == 0
    err = capsys.readouterr().err
    assert "loaded 70/70 backbone tensors of resnet10t and its classifier" in err
    assert main([*common, "--out", str(tmp_path / "b"), "--init", str(start)]) == 0
    assert "init=" in capsys.readouterr().err
    # one step at lr 1e-3 moves the weights only a little from the start, nowhere near a fresh draw
    a, _ = load_checkpoint(tmp_path / "a" / "last.json")
    s, _ = load_checkpoint(start)
    fresh = build_model("resnet10t")
    w = lambda m: m.backbone.conv1[0].weight  # noqa: E731
    assert (w(a) - w(s)).abs().mean() < 0.2 * (w(fresh) - w(s)).abs().mean()
    other = save_checkpoint(tmp_path / "other", build_model("resnet18"),
                            {"windows": ["brain", "blood", "soft_tissue"], "image_size": 64})
    assert main([*common, "--out", str(tmp_path / "c"), "--pretrained", str(other)]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("ichscan train: error:")
    assert "other.json" in err[0] and "resnet18" in err[0]


def test_crossval_aggregation_auto_goes_into_the_thresholds_and_the_final_model(phantom_sets, tmp_path):
    """--aggregation auto: the aggregation.json choice is the best OOF series AUC for any (recomputed here from
    oof_series.csv with scikit-learn), the nested estimate is in comparison.csv as adapted auto, and the
    thresholds and the final model carry the choice."""
    from sklearn.metrics import roc_auc_score

    from ichscan.crossval import CrossvalOptions, run_crossval
    from ichscan.model import read_manifest
    from ichscan.train import TrainConfig

    config = TrainConfig.from_preset("finetune", arch="resnet10t", image_size=32, epochs=1, max_steps_per_epoch=1,
                                     batch_size=16)
    out = tmp_path / "cv"
    result = run_crossval(config, phantom_sets / "train", out,
                          options=CrossvalOptions(folds=2, n_bootstrap=10, aggregation="auto"))
    auto = json.loads((out / "aggregation.json").read_text())
    oof = pd.read_csv(out / "oof_series.csv")
    aucs = {m: roc_auc_score(oof["true_any"], oof[f"adapted_{m}_any"]) for m in ("max", "topk", "noisy_or")}
    assert auto["auc_any"] == pytest.approx(aucs)
    assert aucs[auto["chosen"]] == max(aucs.values()) and auto["default"] == "max"  # no start: max is the recipe's
    nested = result.comparison.set_index(["model", "aggregation"]).loc[("adapted", "auto"), "auc_any"]
    assert nested == pytest.approx(auto["nested_auc_any"], abs=1e-4)
    assert json.loads((out / "thresholds.json").read_text())["source"]["aggregation"] == auto["chosen"]
    final = read_manifest(result.final)
    assert final.aggregation["method"] == auto["chosen"] and "out-of-fold" in final.aggregation["chosen_on"]
    assert f"aggregation `{auto['chosen']}`" in (out / "crossval.md").read_text()
