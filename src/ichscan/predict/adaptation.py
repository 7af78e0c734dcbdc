"""Test-time batch-norm adaptation: each series normalised partly with its own feature statistics.

A network trained on one kind of image (phantoms, one scanner) normalises every layer with the mean and
variance its batch norms saw in training. On images from elsewhere those statistics are off: covariate
shift, which AdaBN (Li et al., 2016) corrects by re-estimating them on the new domain. Following Schneider
et al. (NeurIPS 2020), the model's own statistics act as a prior worth ``prior`` pseudo-slices:

    mean = N/(N+n) * mean_model + n/(N+n) * mean_series      (the same for the variance)

with N = ``prior`` and n the series' slice count. The series' statistics are taken layer by layer in one
forward pass (each batch norm's input already passed the adapted layers before it), then every slice of
the series is predicted with them and the model's own statistics are put back. No weight changes and no
label is read; a series is adapted on itself alone, so its result never depends on other series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

STATS_SLICES = 64  # at most this many evenly spaced slices give a series' statistics
# ... and at most this many images in that one forward pass, TTA views included (memory: at 512 px a
# large backbone's activations for 128 images already take several GiB)
STATS_IMAGES = 128


def stats_slice_limit(n_views: int) -> int:
    """How many slices the statistics pass may take with ``n_views`` TTA views: 64 with identity and flip,
    16 with all eight views."""
    return max(1, min(STATS_SLICES, STATS_IMAGES // max(1, n_views)))


def batchnorm_layers(model: Any) -> list[Any]:
    """The model's batch norms that keep running statistics (what eval mode normalises with)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m for m in model.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]


def stats_indices(n: int, limit: int = STATS_SLICES) -> np.ndarray:
    """Indices of at most ``limit`` slices spread evenly over ``n``, first and last included."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, limit)).astype(int))


def series_share(n_slices: int, prior: float) -> float:
    """The weight n/(N+n) the series' own statistics get against the model's (``prior`` = N)."""
    if n_slices < 1:
        raise ValueError("a series needs at least one slice to adapt to")
    if not prior >= 0:
        raise ValueError(f"batch-norm prior {prior}: expected a number of pseudo-slices >= 0")
    return n_slices / (prior + n_slices)


@contextmanager
def adapted_batchnorm(model: Any, batch: Any, *, n_slices: int, prior: float,
                      forward: Callable[[Any], Any]) -> Iterator[list[Any]]:
    """Within the block, every batch norm of ``model`` uses statistics mixed from its own and ``batch``'s.

    ``batch``: the images the statistics come from (a series' slices, TTA views included), as ``forward``
    takes them; ``forward(batch)`` runs the model once (its outputs are discarded). The model must be in
    eval mode. Yields the adapted layers; their own statistics are restored on leaving, also on error.
    """
    import torch

    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError("the model has no batch norms with running statistics to adapt (folded into the "
                         "convolutions, or a normalisation of another kind)")
    share = series_share(n_slices, prior)
    saved = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    index = {id(m): i for i, m in enumerate(layers)}

    def mix(module, args):
        x = args[0].float()
        dims = [d for d in range(x.dim()) if d != 1]  # every axis but the channels
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        i = index[id(module)]
        module.running_mean.copy_((1.0 - share) * saved[i][0] + share * mean.to(saved[i][0].dtype))
        module.running_var.copy_((1.0 - share) * saved[i][1] + share * var.to(saved[i][1].dtype))

    hooks = [m.register_forward_pre_hook(mix) for m in layers]
    try:
        try:
            forward(batch)
        finally:
            for h in hooks:
                h.remove()
        yield layers
    finally:
        with torch.no_grad():
            for m, (mean, var) in zip(layers, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
