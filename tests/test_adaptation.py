"""Test-time batch-norm adaptation (``ichscan predict --adapt-bn``): numbers worked by hand on small
networks, then the Predictor on phantom DICOM series with a tiny timm checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from ichscan.cli import main
from ichscan.dicom import find_series
from ichscan.errors import CheckpointError
from ichscan.model import build_model, load_checkpoint, save_checkpoint
from ichscan.predict import Predictor
from ichscan.predict.adaptation import (
    adapted_batchnorm,
    batchnorm_layers,
    series_share,
    stats_indices,
    stats_slice_limit,
)
from ichscan.windows import PAPER_WINDOWS, PRESETS

EPS = 1e-5  # nn.BatchNorm2d's


def fresh_bn(channels: int) -> nn.BatchNorm2d:
    """A batch norm as after construction: running mean 0, variance 1, weight 1, bias 0; eval mode."""
    return nn.BatchNorm2d(channels, eps=EPS).eval()


def test_the_series_share_is_n_over_prior_plus_n():
    assert series_share(24, 16) == pytest.approx(0.6)
    assert series_share(16, 16) == pytest.approx(0.5)
    assert series_share(5, 0) == 1.0  # no prior: the series' statistics alone
    with pytest.raises(ValueError, match="at least one slice"):
        series_share(0, 16)
    with pytest.raises(ValueError, match="pseudo-slices"):
        series_share(10, -1)


def test_statistics_come_from_at_most_64_evenly_spaced_slices():
    np.testing.assert_array_equal(stats_indices(10), np.arange(10))
    idx = stats_indices(200)
    assert len(idx) == 64 and idx[0] == 0 and idx[-1] == 199
    assert np.all(np.diff(idx) >= 3) and np.all(np.diff(idx) <= 4)  # 199 / 63 = 3.16 apart
    # at most 128 images in the statistics pass: 64 slices with identity and flip, 16 with all 8 views
    assert (stats_slice_limit(1), stats_slice_limit(2), stats_slice_limit(8)) == (64, 64, 16)


def test_with_no_prior_a_layer_normalises_with_the_series_own_mean_and_variance():
    bn = fresh_bn(1)
    x = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 2, 2)  # mean 1.5, variance 1.25
    with torch.inference_mode(), adapted_batchnorm(bn, x, n_slices=1, prior=0, forward=bn):
        assert bn.running_mean.item() == pytest.approx(1.5)
        assert bn.running_var.item() == pytest.approx(1.25)
        y = bn(x)
    expected = (torch.tensor([0.0, 1.0, 2.0, 3.0]) - 1.5) / math.sqrt(1.25 + EPS)
    torch.testing.assert_close(y.flatten(), expected)
    # the model's own statistics are back afterwards: mean 0, variance 1, so y = x / sqrt(1 + eps)
    assert bn.running_mean.item() == 0.0 and bn.running_var.item() == 1.0


def test_a_prior_of_n_pseudo_slices_mixes_the_two_by_n_over_prior_plus_n():
    bn = fresh_bn(2)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([10.0, -4.0]))
        bn.running_var.copy_(torch.tensor([4.0, 9.0]))
    # two slices of a series: channel 0 is 1 everywhere in one and 3 in the other (mean 2, variance 1);
    # channel 1 is 0 everywhere (mean 0, variance 0)
    x = torch.zeros(2, 2, 3, 3)
    x[0, 0], x[1, 0] = 1.0, 3.0
    with torch.inference_mode(), adapted_batchnorm(bn, x, n_slices=2, prior=6, forward=bn):  # share 2/8
        torch.testing.assert_close(bn.running_mean, torch.tensor([0.75 * 10 + 0.25 * 2, 0.75 * -4 + 0.0]))
        torch.testing.assert_close(bn.running_var, torch.tensor([0.75 * 4 + 0.25 * 1, 0.75 * 9 + 0.0]))
    torch.testing.assert_close(bn.running_mean, torch.tensor([10.0, -4.0]))
    torch.testing.assert_close(bn.running_var, torch.tensor([4.0, 9.0]))


def test_layers_adapt_in_sequence_each_seeing_the_adapted_layers_before_it():
    # BN1 -> y = 3 x + 5 -> BN2. With no prior BN1's output has mean 0 and variance 1 (to eps), so BN2
    # must see mean 5 and variance 9; had BN2 read BN1's output under the model's own statistics (mean 0,
    # variance 1 on an input of mean 40, variance 100), it would have seen mean 125 and variance 900.
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2 = fresh_bn(1), fresh_bn(1)

        def forward(self, x):
            return self.bn2(3.0 * self.bn1(x) + 5.0)

    net = Chain().eval()
    x = torch.linspace(-1, 1, 64).view(4, 1, 4, 4)
    x = 40.0 + 10.0 * (x - x.mean()) / x.std(unbiased=False)  # mean 40, variance 100 exactly
    with torch.inference_mode(), adapted_batchnorm(net, x, n_slices=4, prior=0, forward=net) as layers:
        assert len(layers) == 2
        assert net.bn1.running_mean.item() == pytest.approx(40.0, abs=1e-4)
        assert net.bn1.running_var.item() == pytest.approx(100.0, rel=1e-5)
        assert net.bn2.running_mean.item() == pytest.approx(5.0, abs=1e-4)
        assert net.bn2.running_var.item() == pytest.approx(9.0 * 100.0 / (100.0 + EPS), rel=1e-5)


def test_the_model_own_statistics_are_restored_when_the_block_fails():
    bn = fresh_bn(1)
    with pytest.raises(RuntimeError, match="stop"), torch.inference_mode():
        with adapted_batchnorm(bn, torch.full((1, 1, 2, 2), 7.0), n_slices=1, prior=0, forward=bn):
            assert bn.running_mean.item() == 7.0
            raise RuntimeError("stop")
    assert bn.running_mean.item() == 0.0 and bn.running_var.item() == 1.0
    with pytest.raises(ValueError, match="no batch norms"):
        with adapted_batchnorm(nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 2, 2), n_slices=1, prior=0,
                               forward=lambda b: b):
            pass


# ---------------------------------------------------------------------------------------- the Predictor

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ichscan.phantom import generate_dataset

    root = tmp_path_factory.mktemp("adapt")
    generate_dataset(root / "data", studies=3, seed=7, size=64, slices=(6, 9), layout="series")
    torch.manual_seed(0)
    model = build_model("test_efficientnet")
    with torch.no_grad():  # spread the head so that probabilities differ between slices
        for p in model.backbone.get_classifier().parameters():
            p.mul_(20.0)
    meta = {"windows": [PRESETS[w].to_dict() for w in PAPER_WINDOWS], "image_size": 32}
    ckpt = save_checkpoint(root / "tiny", model, meta)
    return root, ckpt, find_series(root / "data").series


def test_predictor_with_no_prior_equals_the_network_normalising_with_the_whole_series(setup):
    _, ckpt, series = setup
    s = series[0]
    # batch size 2: the series is predicted in chunks, yet every chunk uses the whole series' statistics
    pred = Predictor.from_checkpoint(ckpt, tta="none", precision="fp32", batch_size=2, adapt_bn=0)
    got = pred.predict_series(s)
    assert pred.describe()["adapt_bn"] == 0.0
    assert pred.describe()["members"][0]["batchnorm_folded"] is False
    x = torch.from_numpy(pred.preprocess([sl.hu for sl in _decoded(s)])).float() / 255.0
    model, _ = load_checkpoint(ckpt)
    model.eval()
    for m in batchnorm_layers(model):
        m.train()  # normalise with the batch's own statistics, i.e. the whole series at once
    with torch.no_grad():
        expected = torch.sigmoid(model(x)).numpy()
    # 2e-4: the head's x20 spread magnifies the float rounding of two ways of computing a variance
    np.testing.assert_allclose(got.slice_probs, expected, atol=2e-4)
    plain = Predictor.from_checkpoint(ckpt, tta="none", precision="fp32").predict_series(s)
    assert np.abs(plain.slice_probs - got.slice_probs).max() > 1e-3  # adapting changed something


def _decoded(series):
    from ichscan.dicom import read_slice

    return [read_slice(sl.path) for sl in series.slices]


def test_each_series_is_adapted_on_itself_alone_and_a_huge_prior_changes_nothing(setup):
    _, ckpt, series = setup
    kw = {"tta": "identity,hflip", "precision": "fp32"}
    pred = Predictor.from_checkpoint(ckpt, adapt_bn=16, **kw)
    together = {s.series_uid: p.slice_probs for s, p in pred.iter_predict(series)}
    for s in series:  # alone, or after the others: the same numbers
        np.testing.assert_allclose(pred.predict_series(s).slice_probs, together[s.series_uid], atol=1e-6)
    plain = Predictor.from_checkpoint(ckpt, **kw)
    frozen = Predictor.from_checkpoint(ckpt, adapt_bn=1e12, **kw)
    for s in series:
        np.testing.assert_allclose(frozen.predict_series(s).slice_probs, plain.predict_series(s).slice_probs,
                                   atol=1e-5)


def test_adapt_bn_refuses_compile_and_models_without_batch_norms(setup):
    _, ckpt, _ = setup
    with pytest.raises(ValueError, match="torch.compile"):
        Predictor.from_checkpoint(ckpt, adapt_bn=16, compile=True)
    with pytest.raises(ValueError, match="pseudo-slices"):
        Predictor.from_checkpoint(ckpt, adapt_bn=-1)
    model, _ = load_checkpoint(ckpt)
    from ichscan.predict.predictor import _fold_batchnorm

    assert _fold_batchnorm(model.eval())  # batch norms folded into the convolutions: nothing left to adapt
    with pytest.raises(CheckpointError, match="member 1 has none"):
        Predictor.from_models([model], image_size=32, adapt_bn=16)


def test_cli_predict_adapt_bn_records_it_and_rejects_a_negative_prior(setup, capsys):
    root, ckpt, series = setup
    out = root / "out"
    args = ["predict", str(root / "data"), "--checkpoint", str(ckpt), "--min-slices", "3", "--no-progress"]
    assert main([*args, "--out", str(out), "--adapt-bn", "16"]) == 0
    err = capsys.readouterr().err
    assert "batch norms adapted to each series (N = 16)" in err
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["config"]["adapt_bn"] == 16.0 and len(doc["series"]) == len(series)
    with pytest.raises(SystemExit):
        main([*args, "--out", str(root / "out2"), "--adapt-bn", "-1"])
    assert "not a finite number of 0 or more" in capsys.readouterr().err
    assert main([*args, "--out", str(root / "out3"), "--adapt-bn", "16", "--compile"]) == 2
    assert "torch.compile" in capsys.readouterr().err
