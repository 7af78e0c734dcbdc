"""Batch augmentation on the training device: the paper's flip, random crop, rotation, brightness, contrast.

Pure functions over a (B, C, H, W) batch of windows in [0, 1]. Randomness comes from a ``torch.Generator``
passed in (kept on the CPU so that the same seed gives the same batch on any device); the sampled
parameters are moved to the batch's device and one ``grid_sample`` does every geometric change at once.
Areas rotated or cropped in from outside the image are 0: air in every CT window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.5  # probability of a left-right flip
    crop_scale: tuple[float, float] = (0.8, 1.0)  # side of the random crop, as a fraction of the image
    rotation: float = 30.0  # degrees, uniform in [-rotation, +rotation]
    brightness: float = 0.1  # additive shift, uniform in [-b, +b] (windows are in [0, 1])
    contrast: float = 0.1  # multiplicative factor, uniform in [1 - c, 1 + c]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | AugmentConfig | None) -> AugmentConfig:
        if isinstance(d, AugmentConfig):
            return d
        d = dict(d or {})
        if "crop_scale" in d:
            d["crop_scale"] = tuple(d["crop_scale"])
        return cls(**d)

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(hflip=0.0, crop_scale=(1.0, 1.0), rotation=0.0, brightness=0.0, contrast=0.0)


@dataclass(frozen=True)
class AugmentParams:
    """Per-image parameters, sampled once and reusable (e.g. to check what was applied)."""

    flip: torch.Tensor  # (B,) bool
    scale: torch.Tensor  # (B,) crop side fraction
    shift: torch.Tensor  # (B, 2) crop centre offset in normalised coordinates
    angle: torch.Tensor  # (B,) radians
    brightness: torch.Tensor  # (B,)
    contrast: torch.Tensor  # (B,)


def sample_params(batch: int, config: AugmentConfig, generator: torch.Generator) -> AugmentParams:
    """Draw the parameters for ``batch`` images from ``generator`` (a CPU generator), in a fixed order."""
    u = torch.rand(batch, 6, generator=generator, dtype=torch.float64)
    flip = u[:, 0] < config.hflip
    lo, hi = config.crop_scale
    scale = lo + (hi - lo) * u[:, 1]
    # The crop stays inside the image: its centre may move by at most (1 - scale) in normalised units.
    shift = (torch.stack([u[:, 2], u[:, 3]], dim=1) * 2 - 1) * (1 - scale)[:, None]
    angle = (u[:, 4] * 2 - 1) * math.radians(config.rotation)
    bc = torch.rand(batch, 2, generator=generator, dtype=torch.float64) * 2 - 1
    brightness = bc[:, 0] * config.brightness
    contrast = 1 + bc[:, 1] * config.contrast
    return AugmentParams(flip, scale, shift, angle, brightness, contrast)


def affine_matrices(params: AugmentParams) -> torch.Tensor:
    """(B, 2, 3) matrices mapping output to input coordinates: crop, then rotate, then flip."""
    cos, sin = torch.cos(params.angle), torch.sin(params.angle)
    s = params.scale
    sign = torch.where(params.flip, -1.0, 1.0).to(s.dtype)
    theta = torch.zeros(len(s), 2, 3, dtype=s.dtype)
    # source = R(angle) @ diag(s * sign, s) @ out + shift
    theta[:, 0, 0] = cos * s * sign
    theta[:, 0, 1] = -sin * s
    theta[:, 1, 0] = sin * s * sign
    theta[:, 1, 1] = cos * s
    theta[:, :, 2] = params.shift
    return theta


def apply_params(images: torch.Tensor, params: AugmentParams, config: AugmentConfig) -> torch.Tensor:
    """Apply sampled ``params`` to float ``images`` (B, C, H, W) in [0, 1]; returns a new tensor."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    out = images
    geometric = config.rotation > 0 or config.crop_scale != (1.0, 1.0)
    if geometric:
        theta = affine_matrices(params).to(device=images.device, dtype=torch.float32)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    elif config.hflip > 0 and bool(params.flip.any()):
        flip = params.flip.to(images.device)
        out = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if config.brightness > 0 or config.contrast > 0:
        c = params.contrast.to(device=images.device, dtype=out.dtype)[:, None, None, None]
        b = params.brightness.to(device=images.device, dtype=out.dtype)[:, None, None, None]
        out = (out * c + b).clamp_(0.0, 1.0)
    if images.shape[1] > 1 and images.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch (uint8 or float in [0, 1], any device) with parameters drawn from ``generator``."""
    params = sample_params(images.shape[0], config, generator)
    return apply_params(images, params, config)
