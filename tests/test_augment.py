"""Batch augmentation: seeded, the paper's ranges, air where the image moved away."""

from __future__ import annotations

import math

import pytest
import torch

from ichscan.augment import AugmentConfig, augment_batch, sample_params


def batch(n: int = 4, size: int = 24) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_same_seed_same_batch_and_uint8_input():
    x = batch()
    cfg = AugmentConfig()
    a = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    u8 = (x * 255).round().to(torch.uint8)
    d = augment_batch(u8, cfg, torch.Generator().manual_seed(5))
    assert torch.allclose(d, augment_batch(u8.float() / 255, cfg, torch.Generator().manual_seed(5)))


def test_parameters_follow_the_paper_ranges():
    p = sample_params(4000, AugmentConfig(), torch.Generator().manual_seed(0))
    deg = p.angle * 180 / math.pi
    assert float(deg.abs().max()) <= 30.0 and float(deg.abs().max()) > 29.0
    assert 0.45 < float(p.flip.double().mean()) < 0.55
    assert float(p.scale.min()) >= 0.8 and float(p.scale.max()) <= 1.0
    assert bool(((p.shift.abs() <= (1 - p.scale)[:, None] + 1e-12)).all())  # the crop stays inside
    assert float(p.brightness.abs().max()) <= 0.1 and float((p.contrast - 1).abs().max()) <= 0.1


def test_identity_and_flip():
    x = batch()
    none = AugmentConfig.none()
    assert torch.equal(augment_batch(x, none, torch.Generator().manual_seed(0)), x)
    flip = AugmentConfig(hflip=1.0, crop_scale=(1.0, 1.0), rotation=0.0, brightness=0.0, contrast=0.0)
    assert torch.equal(augment_batch(x, flip, torch.Generator().manual_seed(0)), x.flip(-1))
    # The same flip through the geometric path (a vanishing rotation) agrees.
    geo = AugmentConfig(hflip=1.0, crop_scale=(1.0, 1.0), rotation=1e-7, brightness=0.0, contrast=0.0)
    assert torch.allclose(augment_batch(x, geo, torch.Generator().manual_seed(0)), x.flip(-1), atol=1e-4)


def test_rotation_fills_corners_with_air():
    ones = torch.ones(64, 3, 32, 32)
    cfg = AugmentConfig(hflip=0.0, crop_scale=(1.0, 1.0), rotation=30.0, brightness=0.0, contrast=0.0)
    out = augment_batch(ones, cfg, torch.Generator().manual_seed(1))
    params = sample_params(64, cfg, torch.Generator().manual_seed(1))
    big = params.angle.abs() > math.radians(15)
    assert bool(big.any())
    assert float(out[big][:, :, 0, 0].max()) < 0.5  # corners rotated out of view are air (0)
    assert torch.allclose(out[:, :, 16, 16], torch.ones(64, 3), atol=1e-5)  # the centre stays


def test_channels_last_is_kept():
    x = batch().contiguous(memory_format=torch.channels_last)
    out = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(0))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_extras_off_draw_nothing_more():
    """Configurations without the sim2real extras give the batches they always gave."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sample_params(8, AugmentConfig(), g1)
    torch.rand(8, 6, generator=g2, dtype=torch.float64)
    torch.rand(8, 2, generator=g2, dtype=torch.float64)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_blur_keeps_the_mean_and_spreads_a_point_by_sigma():
    from ichscan.augment import _gaussian_blur

    x = torch.zeros(2, 1, 41, 41)
    x[:, :, 20, 20] = 1.0
    out = _gaussian_blur(x, torch.tensor([1.5, 0.0]))
    assert float(out[0].sum()) == pytest.approx(1.0, abs=1e-5)
    yy, xx = torch.meshgrid(torch.arange(41.0) - 20, torch.arange(41.0) - 20, indexing="ij")
    var = float((out[0, 0] * xx**2).sum())
    assert var == pytest.approx(1.5**2, rel=0.02)  # a Gaussian of sigma 1.5 pixels
    assert torch.equal(out[1], x[1])  # sigma 0: unchanged
    flat = torch.full((1, 3, 16, 16), 0.4)
    assert torch.allclose(_gaussian_blur(flat, torch.tensor([1.0])), flat, atol=1e-6)


def test_noise_has_the_drawn_std_and_zoom_out_shows_air_around():
    cfg = AugmentConfig(hflip=0.0, crop_scale=(1.0, 1.0), rotation=0.0, brightness=0.0, contrast=0.0, noise=0.05)
    x = torch.full((16, 3, 64, 64), 0.5)
    g = torch.Generator().manual_seed(4)
    params = sample_params(16, cfg, g)
    from ichscan.augment import apply_params

    out = apply_params(x, params, cfg)
    std = out.std(dim=(1, 2, 3))
    assert torch.allclose(std, params.noise.float(), rtol=0.1, atol=2e-3)
    assert torch.equal(out[:, 0], out[:, 1])  # one field for every window, as one HU image gives
    zoom = AugmentConfig(hflip=0.0, crop_scale=(1.25, 1.25), rotation=0.0, brightness=0.0, contrast=0.0)
    out = augment_batch(torch.ones(2, 3, 40, 40), zoom, torch.Generator().manual_seed(0))
    assert float(out[:, :, 20, 20].min()) == pytest.approx(1.0, abs=1e-5)
    assert float(out[:, :, 0, 0].max()) == 0.0  # the image shrank: air at its edges
