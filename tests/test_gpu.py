"""On a CUDA device (opt-in: ``make test-gpu``, or ``pytest -m gpu``): the bundled model's probabilities on a GPU
against the same model's on the CPU, for the same phantom series. fp32 on a GPU is IEEE fp32
(``ichscan.hardware.ieee_fp32``: no TF32 in cuDNN's convolutions), so it must give the CPU's numbers to the
kernels' summation order; bf16 autocast may move them by up to the tolerance ichscan documents (0.02)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ichscan.dicom import find_series
from ichscan.predict import Predictor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (this machine has none)")]

IEEE_TOL = 1e-4  # GPU against CPU, both IEEE fp32: only the order of summation differs
BF16_TOL = 0.02


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    from ichscan.phantom import generate_dataset

    root = tmp_path_factory.mktemp("gpu")
    generate_dataset(root, studies=2, seed=31, size=256, slices=(20, 24), layout="series", prevalence="any=0.5")
    return find_series(root).series


@pytest.fixture(scope="module")
def on_cpu(series):
    predictor = Predictor.from_checkpoint("bundled", device="cpu", precision="fp32")
    return [predictor.predict_series(s) for s in series]


def test_fp32_on_the_gpu_gives_the_cpu_numbers(series, on_cpu):
    before = torch.backends.cudnn.conv.fp32_precision  # "tf32" by PyTorch's default
    predictor = Predictor.from_checkpoint("bundled", device="cuda", precision="fp32")
    assert predictor.precision == "fp32"
    for s, cpu in zip(series, on_cpu):
        gpu = predictor.predict_series(s)
        assert np.abs(gpu.slice_probs - cpu.slice_probs).max() <= IEEE_TOL
        assert np.abs(gpu.probs - cpu.probs).max() <= IEEE_TOL
        assert [k.index for k in gpu.key_slices] == [k.index for k in cpu.key_slices]
    # the setting is back as it was: ichscan changed it only for its forward passes
    assert torch.backends.cudnn.conv.fp32_precision == before


def test_bf16_on_the_gpu_is_within_the_documented_tolerance(series, on_cpu):
    predictor = Predictor.from_checkpoint("bundled", device="cuda", precision="bf16")
    for s, cpu in zip(series, on_cpu):
        assert np.abs(predictor.predict_series(s).slice_probs - cpu.slice_probs).max() <= BF16_TOL
