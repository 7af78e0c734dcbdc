"""Heat maps from the model itself: where on a slice the logit of one label came from (Grad-CAM).

``grad_cam(predictor, hu, label)`` runs each ensemble member of an ``ichscan.predict.Predictor`` on the slice
as the predictor windows it (the identity view, fp32), takes the gradient of the label's logit with respect to
the last spatial feature map of the backbone, weights each channel of that map by its mean gradient, keeps
the positive part (Selvaraju et al., Grad-CAM, 2017) and maps the result back onto the slice's own pixels. Members are
averaged by their ensemble weights; the map is scaled so its peak is 1 (all 0 when no region raises the
logit).

The last spatial feature map is found by hooking every module of the backbone and keeping the last output
that is a (B, C, h, w) map with h or w above 1, so it works for any timm CNN, with or without its batch norms
folded into the convolutions (a traced ``GraphModule`` has no ``forward_features``). Transformers without
a spatial map are refused.

A Grad-CAM map is coarse (a 160 px input and a stride-32 backbone give 5 x 5 cells) and shows what drove
this model, not where the blood is: it is a picture for a reader, never a segmentation.

``overlay(grey, heat)`` blends a map in colour onto a grey picture (numpy only); the key images of
``ichscan.dicomout`` and the HTML report use it, so both show the same picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ichscan.errors import IchscanError
from ichscan.labels import LABELS

__all__ = ["HEAT_ALPHA", "HEAT_FLOOR", "grad_cam", "heat_colours", "overlay"]

# Heat below this is not drawn at all, so most of a key image keeps the grey values of the source slice.
HEAT_FLOOR = 0.2
HEAT_ALPHA = 0.6  # opacity of the colour where the heat is 1
# (heat, R, G, B): blue -> cyan -> yellow -> red, the ramp readers know from Grad-CAM pictures
_RAMP = np.array([(HEAT_FLOOR, 0, 64, 255), (0.45, 0, 224, 255), (0.7, 255, 255, 0), (1.0, 255, 0, 0)],
                 dtype=np.float32)


def _fitted_shape(h: int, w: int, size: int) -> tuple[int, int]:
    # where ichscan.windows puts an (h, w) slice inside its square model input
    from ichscan.windows import _fitted_shape as fitted

    return fitted(h, w, size)


def _last_spatial_map(backbone: Any, run) -> tuple[Any, Any]:
    """Run ``run()`` with every module of ``backbone`` hooked; (the last (B, C, h, w) output with h*w > 1,
    the result of ``run``). The map handed on downstream is a copy, so later in-place operations (``x +=
    shortcut``, in-place activations) never change the tensor whose gradient is asked for."""
    import torch

    found: list[Any] = []

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1:
            found.append(output)
            return output.clone()
        return None

    handles = [m.register_forward_hook(hook) for name, m in backbone.named_modules() if name]
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        raise IchscanError(f"{type(backbone).__name__} has no spatial feature map for Grad-CAM (a CNN backbone is "
                           "needed)")
    return found[-1], result


def _member_cam(model: Any, x: Any, column: int) -> np.ndarray:
    """Grad-CAM of one model for one batch of one image (1, C, S, S) in [0, 1]: (h, w) float32, not scaled."""
    import torch

    backbone = getattr(model, "backbone", model)
    x = x.detach().clone().requires_grad_(True)  # so the map needs a gradient even when weights do not
    features, logits = _last_spatial_map(backbone, lambda: model(x))
    score = logits.float()[0, column]
    (grads,) = torch.autograd.grad(score, features)
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features.float()).sum(dim=1))[0]
    return cam.detach().cpu().numpy().astype(np.float32)


def _to_slice(cam: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    """A map over the square model input (cells of the feature grid) -> the slice's (H, W): bilinear onto the
    input, the padding ``ichscan.windows`` added cut off, bilinear onto the slice's pixels."""
    import torch
    import torch.nn.functional as F

    h, w = shape
    nh, nw = _fitted_shape(h, w, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    t = torch.from_numpy(np.ascontiguousarray(cam))[None, None]
    square = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    inside = square[..., top:top + nh, left:left + nw]
    out = F.interpolate(inside, size=(h, w), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def grad_cam(predictor: Any, hu: np.ndarray, label: str, *, members: Sequence[int] | None = None,
             spacing: Sequence[float] | None = None) -> np.ndarray:
    """Grad-CAM of ``label`` on one slice of HU (H, W): float32 (H, W) in [0, 1], peak 1 (0 everywhere when no
    region raises the logit).

    Every member of ``predictor.ensemble`` (or those indexed by ``members``) sees the slice as the predictor
    windows it for that member; maps are scaled to peak 1 each, then averaged with the members' weights.
    fp32 and the identity view whatever the predictor's precision and TTA; gradients are taken inside
    ``torch.enable_grad`` so this works when called from inference code."""
    import torch

    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"expected one (H, W) slice, got shape {hu.shape}")
    column = list(predictor.labels).index(label)
    chosen = list(predictor.ensemble.members)
    if members is not None:
        chosen = [chosen[i] for i in members]
    total = np.zeros(hu.shape, dtype=np.float64)
    weight_sum = 0.0
    with torch.inference_mode(False), torch.enable_grad():
        for member in chosen:
            windows, size = member.prep
            x = predictor.preprocess([hu], (windows, size), spacing)
            x = torch.from_numpy(x).to(predictor.device).float().div_(255.0)
            cam = _to_slice(_member_cam(member.model, x, column), hu.shape, int(size))
            peak = float(cam.max())
            if peak > 0:
                total += member.weight * (cam / peak)
            weight_sum += member.weight
    if weight_sum > 0:
        total /= weight_sum
    peak = float(total.max())
    out = (total / peak) if peak > 0 else total
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def heat_colours(heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(RGB float32 (H, W, 3) in 0..255, opacity float32 (H, W) in 0..HEAT_ALPHA) for a map in [0, 1]."""
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    rgb = np.stack([np.interp(heat, _RAMP[:, 0], _RAMP[:, c]) for c in (1, 2, 3)], axis=-1).astype(np.float32)
    alpha = (HEAT_ALPHA * np.clip((heat - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0)).astype(np.float32)
    return rgb, alpha


def overlay(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """A grey uint8 picture (H, W) with ``heat`` (H, W, in [0, 1]) blended on in colour: uint8 (H, W, 3).

    Where the heat is at or below ``HEAT_FLOOR`` the pixel keeps its grey value exactly (R = G = B = grey)."""
    grey = np.asarray(grey)
    if grey.shape != np.shape(heat):
        raise ValueError(f"picture {grey.shape} and heat map {np.shape(heat)} differ in size")
    rgb, alpha = heat_colours(heat)
    base = np.repeat(grey.astype(np.float32)[..., None], 3, axis=-1)
    a = alpha[..., None]
    out = base * (1.0 - a) + rgb * a
    out = np.where(a > 0, np.clip(np.rint(out), 0, 255), base)
    return out.astype(np.uint8)
