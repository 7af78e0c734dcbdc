"""Batch augmentation on the training device: the paper's flip, random crop, rotation, brightness, contrast.

Beyond the paper, for training on phantoms that must transfer to real scanners (``sim2real`` preset):
zoom out (``crop_scale`` above 1: the head smaller in the field of view), per-channel brightness, gamma,
Gaussian blur (reconstruction kernels, resampled or JPEG-smoothed images) and additive noise. All are off
by default, and when off they draw nothing from the generator, so older configurations give the same
batches as before.

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
    channel_brightness: float = 0.0  # a further shift per channel, uniform in [-cb, +cb]
    gamma: float = 0.0  # power exp(u), u uniform in [-g, +g], on each window
    blur: float = 0.0  # Gaussian sigma in pixels, uniform in [0, blur], on half of the images
    noise: float = 0.0  # additive Gaussian noise, std uniform in [0, noise], one field for all channels

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

    @property
    def photometric_extras(self) -> bool:
        return bool(self.channel_brightness or self.gamma or self.blur or self.noise)


@dataclass(frozen=True)
class AugmentParams:
    """Per-image parameters, sampled once and reusable (e.g. to check what was applied)."""

    flip: torch.Tensor  # (B,) bool
    scale: torch.Tensor  # (B,) crop side fraction
    shift: torch.Tensor  # (B, 2) crop centre offset in normalised coordinates
    angle: torch.Tensor  # (B,) radians
    brightness: torch.Tensor  # (B,)
    contrast: torch.Tensor  # (B,)
    channel_brightness: torch.Tensor | None = None  # (B, 3): the shift of channels 0, 1, 2 (and on, cycled)
    gamma: torch.Tensor | None = None  # (B,)
    blur: torch.Tensor | None = None  # (B,) sigma in pixels, 0 for no blur
    noise: torch.Tensor | None = None  # (B,) std
    noise_seed: int | None = None  # seeds the noise field, so params alone reproduce the batch


def sample_params(batch: int, config: AugmentConfig, generator: torch.Generator) -> AugmentParams:
    """Draw the parameters for ``batch`` images from ``generator`` (a CPU generator), in a fixed order."""
    u = torch.rand(batch, 6, generator=generator, dtype=torch.float64)
    flip = u[:, 0] < config.hflip
    lo, hi = config.crop_scale
    scale = lo + (hi - lo) * u[:, 1]
    # A crop stays inside the image (its centre moves by at most 1 - scale in normalised units); a zoom out
    # (scale > 1) keeps the whole image in view, moved by at most scale - 1.
    shift = (torch.stack([u[:, 2], u[:, 3]], dim=1) * 2 - 1) * (1 - scale).abs()[:, None]
    angle = (u[:, 4] * 2 - 1) * math.radians(config.rotation)
    bc = torch.rand(batch, 2, generator=generator, dtype=torch.float64) * 2 - 1
    brightness = bc[:, 0] * config.brightness
    contrast = 1 + bc[:, 1] * config.contrast
    if not config.photometric_extras:
        return AugmentParams(flip, scale, shift, angle, brightness, contrast)
    x = torch.rand(batch, 7, generator=generator, dtype=torch.float64)
    channel = (x[:, :3] * 2 - 1) * config.channel_brightness
    gamma = torch.exp((x[:, 3] * 2 - 1) * config.gamma)
    blur = torch.where(x[:, 4] < 0.5, x[:, 5] * 2 * config.blur, torch.zeros_like(x[:, 5]))
    blur = blur.clamp(max=config.blur)
    noise = x[:, 6] * config.noise
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return AugmentParams(flip, scale, shift, angle, brightness, contrast, channel, gamma, blur, noise, noise_seed)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (pixels; 0 leaves it as it is): separable, reflect padding."""
    b, c, h, w = images.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    s = sigma.to(device=images.device, dtype=torch.float32).clamp(min=1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None, :] / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (B, K); sigma ~0 gives a delta
    k = k.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def _photometric_extras(out: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    dev = out.device
    b, c = out.shape[:2]
    if params.blur is not None and bool((params.blur > 0).any()):
        chosen = torch.nonzero(params.blur > 0).flatten()
        out = out.float().clone()
        out[chosen.to(dev)] = _gaussian_blur(out[chosen.to(dev)], params.blur[chosen])
    if params.gamma is not None:
        g = params.gamma.to(device=dev, dtype=out.dtype)[:, None, None, None]
        out = out.clamp(min=0.0) ** g
    if params.channel_brightness is not None:
        idx = torch.arange(c) % params.channel_brightness.shape[1]
        out = out + params.channel_brightness[:, idx].to(device=dev, dtype=out.dtype)[:, :, None, None]
    if params.noise is not None and bool((params.noise > 0).any()):
        g = torch.Generator().manual_seed(int(params.noise_seed))
        # drawn at half resolution and enlarged: CT noise is grainy rather than white, and it is cheaper
        h, w = out.shape[2:]
        field = torch.randn(b, 1, (h + 1) // 2, (w + 1) // 2, generator=g).to(device=dev, dtype=out.dtype)
        field = F.interpolate(field, size=(h, w), mode="bilinear", align_corners=False) * 1.6
        out = out + field * params.noise.to(device=dev, dtype=out.dtype)[:, None, None, None]
    return out.clamp_(0.0, 1.0)


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
    if params.gamma is not None:  # drawn only when the configuration asks for the extras
        out = _photometric_extras(out, params)
    if images.shape[1] > 1 and images.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch (uint8 or float in [0, 1], any device) with parameters drawn from ``generator``."""
    params = sample_params(images.shape[0], config, generator)
    return apply_params(images, params, config)
