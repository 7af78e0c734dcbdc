"""Batch augmentation: seeded, the paper's ranges, air where the image moved away."""

from __future__ import annotations

import math

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
