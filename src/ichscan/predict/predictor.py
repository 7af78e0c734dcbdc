"""The predictor: checkpoints in, probabilities out, for arrays and for series.

Decodes and windows a series as its checkpoints were trained (windows and image size from their JSON),
runs every deterministic TTA view through every member of the ``ichscan.model.Ensemble``, averages, and
aggregates slices into series probabilities (``ichscan.aggregation``) with the slice that drove each finding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ichscan.aggregation import AGGREGATIONS, PER_LABEL, LabelAggregation, aggregate, aggregate_per_label
from ichscan.dicom import SkippedFile
from ichscan.errors import CheckpointError, IchscanError, PixelDataError, SeriesError
from ichscan.fileio import escape_undecodable
from ichscan.geometry import position_along
from ichscan.hardware import autocast_dtype, ieee_fp32, resolve_precision
from ichscan.labels import LABELS
from ichscan.predict.outputs import KeySlice, SeriesPrediction
from ichscan.windows import PAPER_WINDOWS

if TYPE_CHECKING:
    from ichscan.model import Ensemble, EnsembleMember

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Test-time augmentation: fixed views, never random

TTA_VIEWS = ("identity", "hflip", "shift_left", "shift_right", "shift_up", "shift_down", "zoom_in", "zoom_out")
TTA_GROUPS = {
    "none": ("identity",),
    "flip": ("identity", "hflip"),
    "shift": ("shift_left", "shift_right", "shift_up", "shift_down"),
    "zoom": ("zoom_in", "zoom_out"),
    "all": TTA_VIEWS,
}
DEFAULT_TTA = ("identity", "hflip")
SHIFT_FRACTION = 0.05  # of the image side, in pixels rounded
ZOOM_FACTORS = {"zoom_in": 1.1, "zoom_out": 0.9}


def resolve_tta(tta: str | Sequence[str] | None) -> tuple[str, ...]:
    """Expand names and groups (``flip``, ``shift``, ``zoom``, ``all``, ``none``) into views, order kept."""
    if tta is None:
        return DEFAULT_TTA
    names = [t.strip() for t in (tta.split(",") if isinstance(tta, str) else tta) if t.strip()]
    views: list[str] = []
    for name in names:
        expanded = TTA_GROUPS.get(name, (name,))
        for view in expanded:
            if view not in TTA_VIEWS:
                raise ValueError(f"unknown TTA view {view!r}; expected views {', '.join(TTA_VIEWS)} "
                                 f"or groups {', '.join(TTA_GROUPS)}")
            if view not in views:
                views.append(view)
    return tuple(views) or ("identity",)


def _apply_view(x, view: str):
    """One TTA view of a batch (N, C, S, S) of windowed images in [0, 1]; fills with air (0)."""
    import torch
    import torch.nn.functional as F

    if view == "identity":
        return x
    if view == "hflip":
        return x.flip(-1)
    size = x.shape[-1]
    if view.startswith("shift_"):
        s = max(1, round(SHIFT_FRACTION * size))
        out = torch.zeros_like(x)
        if view == "shift_left":
            out[..., :, :-s] = x[..., :, s:]
        elif view == "shift_right":
            out[..., :, s:] = x[..., :, :-s]
        elif view == "shift_up":
            out[..., :-s, :] = x[..., s:, :]
        else:
            out[..., s:, :] = x[..., :-s, :]
        return out
    if view in ZOOM_FACTORS:
        scaled = max(1, round(size * ZOOM_FACTORS[view]))
        y = F.interpolate(x, size=(scaled, scaled), mode="bilinear", align_corners=False, antialias=scaled < size)
        if scaled >= size:
            o = (scaled - size) // 2
            return y[..., o:o + size, o:o + size].contiguous()
        out = torch.zeros_like(x)
        o = (size - scaled) // 2
        out[..., o:o + scaled, o:o + scaled] = y
        return out
    raise ValueError(f"unknown TTA view {view!r}")


# --------------------------------------------------------------------------------------------------
# Loading


def _fold_batchnorm(model: Any) -> bool:
    """Fold each conv + batch norm pair of the backbone into one conv (eval only), in place.

    Same numbers to about 1e-7 in fp32, one pass less over every feature map: 10-35% faster on CPU
    here. Backbones torch.fx cannot trace keep their batch norms. Returns whether it folded.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None or getattr(model, "series_head", None) is not None:
        # A series head reads the backbone's pooled features (forward_features / forward_head), which the
        # traced GraphModule that folding makes no longer offers.
        return False
    try:
        from torch.fx.experimental.optimization import fuse

        model.backbone = fuse(backbone)
        return True
    except Exception as err:  # noqa: BLE001 - any tracing failure just means no folding
        log.debug("batch norm not folded for %s: %s", type(backbone).__name__, err)
        return False


# --------------------------------------------------------------------------------------------------
# Pixels

def _windowed_series(series: Any, preps: Sequence[tuple], allow_non_ct: bool = False
                     ) -> tuple[list, dict[tuple, np.ndarray], list[SkippedFile]]:
    """Decode and window every slice of a (headers-only) series for each (windows, size) in ``preps``.

    uint8 windows, as training caches them: single-frame files go through ``read_stored`` (native pixels
    straight from the offset the scan recorded, no second parse) and the
    lookup-table path of ``ichscan.windows`` (no float HU image); slices already holding HU and
    frames of multi-frame objects are windowed from HU, which gives the same bytes. Slices that cannot
    be decoded are dropped and reported, the rest kept.
    """
    from ichscan.dicom import read_stored
    from ichscan.windows import window_image, window_stored

    kept, bad = [], []
    out: dict[tuple, list[np.ndarray]] = {prep: [] for prep in preps}
    frames: dict[str, dict | IchscanError] = {}
    for s in series.slices:
        try:
            if getattr(s, "hu", None) is not None:
                images = [window_image(s.hu, windows, size, np.uint8, s.spacing) for windows, size in preps]
            elif getattr(s, "frame", None) is not None:
                frame = _frame(s, frames, allow_non_ct)
                images = [window_image(frame.hu, windows, size, np.uint8, frame.spacing) for windows, size in preps]
            else:
                stored = read_stored(s, allow_non_ct=allow_non_ct)
                images = [window_stored(stored, windows, size, np.uint8) for windows, size in preps]
        except IchscanError as err:
            # one line per slice dropped (a resumed run counts kept + skipped against the series' slices)
            bad.append(SkippedFile(str(err.path or s.path), err.reason, type(err).__name__, str(series.series_uid)))
            continue
        kept.append(s)
        for prep, image in zip(preps, images):
            out[prep].append(image)
    return kept, {prep: np.stack(v) for prep, v in out.items() if v}, bad


# --------------------------------------------------------------------------------------------------
# Thin slices read as slabs

SLAB_MM = 5.0  # ``--slab``'s usual value: the thickness head CT is read at, the middle of the bundled model's 2.5-8 mm
GAP_FACTOR = 1.5  # a step this many times the series' usual spacing is a gap: no slab reaches across it


def slab_groups(slices: Sequence[Any], slab_mm: float | None) -> list[list[int]] | None:
    """Indices of ``slices`` (sorted along the normal) grouped into slabs of about ``slab_mm``, or None when
    the series is not thin: its usual spacing (the median step between positions) is at least half of
    ``slab_mm``, or positions are missing. Slices are grouped in z order, k = round(slab_mm / spacing) to a
    slab and shared out evenly within each run of evenly spaced slices (no slab reaches across a gap, and
    the last slab of a run is never a leftover of one or two slices)."""
    if not slab_mm or len(slices) < 2:
        return None
    z = [_z(s) for s in slices]
    if any(v is None for v in z):
        return None
    steps = np.abs(np.diff(np.asarray(z, dtype=np.float64)))
    spacing = float(np.median(steps))
    if not spacing > 0 or spacing >= slab_mm / 2:
        return None
    k = max(2, int(round(slab_mm / spacing)))
    runs, start = [], 0
    for i, step in enumerate(steps, start=1):
        if step > GAP_FACTOR * spacing:
            runs.append(range(start, i))
            start = i
    runs.append(range(start, len(slices)))
    groups = []
    for run in runs:
        n = max(1, int(round(len(run) / k)))
        groups.extend([int(i) for i in part] for part in np.array_split(np.asarray(run), n))
    return groups


def slab_mean(images: Sequence[np.ndarray]) -> np.ndarray:
    """A slab from its slices' HU images: their mean, summed in float64, as float32 (one image: itself). What
    prediction reads, and what the key images of ``ichscan.dicomout`` and ``ichscan.report`` show."""
    if len(images) == 1:
        return np.asarray(images[0], dtype=np.float32)
    return np.mean([np.asarray(hu, dtype=np.float64) for hu in images], axis=0).astype(np.float32)


def _frame(s: Any, frames: dict, allow_non_ct: bool) -> Any:
    """The decoded frame ``s`` stands for, of a multi-frame object (or NIfTI volume); ``frames`` holds the one
    object decoded last (or its error, which its other frames share without decoding it again)."""
    from ichscan.dicom import read_slices

    if s.path not in frames:
        frames.clear()
        try:
            frames[s.path] = {f.frame: f for f in read_slices(s.path, allow_non_ct=allow_non_ct)}
        except IchscanError as err:
            frames[s.path] = err
    got = frames[s.path]
    if isinstance(got, IchscanError):
        raise got
    return got[s.frame]


def _slice_hu(s: Any, frames: dict, allow_non_ct: bool) -> tuple[np.ndarray, Any]:
    """(HU image float32, pixel spacing) of one slice of a headers-only series (``frames`` as for ``_frame``)."""
    from ichscan.dicom import read_stored

    if getattr(s, "hu", None) is not None:
        return np.asarray(s.hu, dtype=np.float32), s.spacing
    if getattr(s, "frame", None) is not None:
        frame = _frame(s, frames, allow_non_ct)
        return np.asarray(frame.hu, dtype=np.float32), frame.spacing
    stored = read_stored(s, allow_non_ct=allow_non_ct)
    return np.asarray(stored.hu(), dtype=np.float32), stored.spacing


def _windowed_slabs(series: Any, groups: Sequence[Sequence[int]], preps: Sequence[tuple], allow_non_ct: bool = False
                    ) -> tuple[list, dict[tuple, np.ndarray], list[SkippedFile], tuple[int, ...]]:
    """``_windowed_series`` for a thin series read as slabs: each group of slices is averaged in HU (the
    mean of what its slices hold, as a scanner's thick reconstruction is) and windowed once. Returns the
    slices kept, {prep: uint8 images, one per slab}, the files dropped and the slab of each slice kept. A
    slice that cannot be decoded is dropped and reported and its slab made of the others; a slab with none
    left is left out."""
    from ichscan.windows import window_image

    kept, bad, slab_of = [], [], []
    out: dict[tuple, list[np.ndarray]] = {prep: [] for prep in preps}
    frames: dict = {}
    for group in groups:
        hus, spacing, members = [], None, []
        for i in group:
            s = series.slices[i]
            try:
                hu, sp = _slice_hu(s, frames, allow_non_ct)
                if hus and hu.shape != hus[0].shape:
                    raise PixelDataError(f"image of {hu.shape[1]}x{hu.shape[0]} pixels in a series of "
                                         f"{hus[0].shape[1]}x{hus[0].shape[0]}: not averaged into a slab", s.path)
            except IchscanError as err:
                bad.append(SkippedFile(str(err.path or s.path), err.reason, type(err).__name__, str(series.series_uid)))
                continue
            hus.append(hu)
            spacing = spacing if spacing is not None else sp
            members.append(s)
        if not members:
            continue
        mean = slab_mean(hus)
        try:
            images = [window_image(mean, windows, size, np.uint8, spacing) for windows, size in preps]
        except IchscanError as err:
            bad.extend(SkippedFile(str(err.path or s.path), err.reason, type(err).__name__, str(series.series_uid))
                       for s in members)
            continue
        for prep, image in zip(preps, images):
            out[prep].append(image)
        slab_of.extend([len(out[preps[0]]) - 1] * len(members))
        kept.extend(members)
    return kept, {prep: np.stack(v) for prep, v in out.items() if v}, bad, tuple(slab_of)


def _z(s: Any) -> float | None:
    """Position along the slice's own normal in mm (ichscan.geometry), to 1e-6 mm as the outputs record it."""
    pos = getattr(s, "position", None)
    if pos is None:
        return None
    return round(position_along(pos, getattr(s, "normal", None)), 6)


def _usable_device(device: str) -> Any:
    """``device`` as a torch.device this machine has; a name it lacks is one line, not torch's traceback."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise IchscanError("CUDA is not available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise IchscanError(f"there is no {dev} on this machine ({count} GPU(s): cuda:0 to cuda:{count - 1}); "
                               "pick one of those or use --device cpu")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise IchscanError("MPS is not available on this machine; use --device cpu")
    return dev


# --------------------------------------------------------------------------------------------------
# Predictor

class Predictor:
    """One or more checkpoints, TTA views and a precision: arrays or series in, probabilities out.

    ``Predictor.from_checkpoint(path)`` takes a checkpoint (``.safetensors`` or its ``.json``), an
    ensemble manifest or ``"bundled"``. Probabilities are averaged over TTA views, then over the members
    of the ``ichscan.model.Ensemble`` (weighted), after the sigmoid; columns always in
    ``ichscan.labels.LABELS`` order whatever order a checkpoint uses.
    """

    def __init__(
        self,
        ensemble: Ensemble,
        *,
        device: str = "cpu",
        tta: str | Sequence[str] | None = DEFAULT_TTA,
        precision: str = "auto",
        batch_size: int = 64,
        aggregation: str = "max",
        top_k: int = 3,
        channels_last: bool = True,
        compile: bool = False,
        operating_points: dict | None = None,
        trained_on: str | None = None,
        sources: Sequence[str] | None = None,
        folded: Sequence[bool] | None = None,
        adapt_bn: float | None = None,
        slab_mm: float | None = None,
        label_aggregation: Sequence[LabelAggregation] | None = None,
    ):
        import torch

        if tuple(ensemble.labels) != LABELS:
            raise CheckpointError(f"a Predictor's ensemble must output {', '.join(LABELS)} in that order")
        if aggregation not in (*AGGREGATIONS, PER_LABEL):
            raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")
        if (aggregation == PER_LABEL) != (label_aggregation is not None):
            raise ValueError("aggregation 'per_label' and label_aggregation (one LabelAggregation per label) go "
                             "together")
        if label_aggregation is not None and len(label_aggregation) != len(LABELS):
            raise ValueError(f"label_aggregation: {len(label_aggregation)} entries for {len(LABELS)} labels")
        self.label_aggregation = tuple(label_aggregation) if label_aggregation is not None else None
        if int(top_k) < 1:
            raise ValueError(f"top_k {top_k}: expected a positive number of slices")
        if aggregation == "context":
            lacking = [i for i, m in enumerate(ensemble.members) if getattr(m.model, "series_head", None) is None]
            if lacking:
                raise CheckpointError(f"aggregation 'context' needs a series head in every model; member "
                                      f"{lacking[0] + 1} has none (train one with ichscan series-head, or choose "
                                      f"max, topk or noisy_or)")
        if adapt_bn is not None:
            adapt_bn = float(adapt_bn)
            if not adapt_bn >= 0:
                raise ValueError(f"adapt_bn {adapt_bn}: expected a number of pseudo-slices >= 0")
            if compile:
                raise ValueError("adapt_bn changes batch-norm statistics per series, which torch.compile "
                                 "freezes into the compiled model; use one or the other")
            from ichscan.predict.adaptation import batchnorm_layers

            lacking = [i for i, m in enumerate(ensemble.members) if not batchnorm_layers(m.model)]
            if lacking:
                raise CheckpointError(f"adapt_bn needs batch norms with running statistics; member {lacking[0] + 1} "
                                      f"has none (folded into its convolutions, or another normalisation)")
        self.adapt_bn = adapt_bn
        if slab_mm is not None and not float(slab_mm) >= 0:
            raise ValueError(f"slab_mm {slab_mm}: expected a thickness in mm (0 or None: every slice as it is)")
        self.slab_mm = float(slab_mm) if slab_mm else None
        self.labels = LABELS
        self.device = _usable_device(device)
        self.tta = resolve_tta(tta)
        self.precision = resolve_precision(precision, str(device))
        self._autocast = autocast_dtype(self.precision)
        self.batch_size = max(1, int(batch_size))
        self.aggregation = aggregation
        self.top_k = int(top_k)
        self.channels_last = channels_last
        # torch.compile (Inductor; on CPU with weights frozen as constants): 20-25% faster per image, for
        # a one-off compile of 5-15 s per checkpoint on first use (cached on disk by torch after that) -
        # worth it for batch runs, not for one study. Falls back to eager if compiling fails.
        self.compile = bool(compile)
        self._runners: dict[int, Any] = {}
        self.ensemble = ensemble
        n = len(ensemble.members)
        # where each member came from and whether its batch norms were folded, for describe()
        self._sources = list(sources) if sources is not None else [str(m.meta.path) for m in ensemble.members]
        self._folded = list(folded) if folded is not None else [False] * n
        for m in ensemble.members:
            m.model.eval().to(self.device)
            if channels_last:
                m.model.to(memory_format=torch.channels_last)
        self._preps = ensemble.preps
        # What the checkpoint or manifest says of itself (ichscan.model.Manifest): thresholds chosen on
        # validation when it was made, and the data it was trained on.
        self.operating_points = operating_points
        self.trained_on = trained_on

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, fold_batchnorm: bool = True, **kwargs) -> Predictor:
        """A checkpoint, an ensemble manifest or ``"bundled"``; keyword arguments as for the constructor.

        Read by ``ichscan.model.read_manifest`` (recorded hashes checked); its operating points and
        ``trained_on`` come along. ``fold_batchnorm`` folds batch norms into the convolutions of the
        freshly loaded models (inference only; fp32 results move by about 1e-7)."""
        from ichscan.model import load_ensemble

        ensemble = load_ensemble(path, labels=LABELS)
        manifest = ensemble.manifest
        # our own copies, loaded just now: safe to change in place; adapting batch norms needs them unfolded
        fold_batchnorm = fold_batchnorm and kwargs.get("adapt_bn") is None
        folded = [fold_batchnorm and _fold_batchnorm(m.model.eval()) for m in ensemble.members]
        kwargs.setdefault("operating_points", manifest.operating_points)
        kwargs.setdefault("trained_on", manifest.trained_on)
        if kwargs.get("aggregation") is None:  # the model's own choice, else its series head, else max
            heads = all(getattr(m.model, "series_head", None) is not None for m in ensemble.members)
            chosen = manifest.aggregation or {"method": "context" if heads else "max"}
            kwargs["aggregation"] = chosen["method"]
            if chosen["method"] == PER_LABEL:  # each label its own aggregation and Platt map (ichscan crossval)
                from ichscan.aggregation import label_aggregations

                kwargs["label_aggregation"] = label_aggregations(chosen, LABELS, path, error=CheckpointError)
            if chosen["method"] == "topk" and kwargs.get("top_k") is None:
                kwargs["top_k"] = chosen.get("top_k", 3)
        if kwargs.get("top_k") is None:
            kwargs.pop("top_k", None)
        sources = [os.path.abspath(m.meta.path) for m in ensemble.members]
        return cls(ensemble, sources=sources, folded=folded, **kwargs)

    @classmethod
    def from_models(cls, models: Sequence[Any], *, windows: Sequence = PAPER_WINDOWS,
                    image_size: int = 512, labels: Sequence[str] | None = None,
                    weights: Sequence[float] | None = None, **kwargs) -> Predictor:
        """Models already in memory (e.g. right after training) taking windowed images in [0, 1] and
        returning logits in ``labels`` order (default: each model's ``.labels``, else LABELS); all share
        one preprocessing."""
        from ichscan.model import CheckpointMeta, Ensemble, EnsembleMember

        weights = weights or [1.0] * len(models)
        members = []
        for i, (m, w) in enumerate(zip(models, weights)):
            names = list(labels or getattr(m, "labels", None) or LABELS)
            record = {"arch": str(getattr(m, "arch", type(m).__name__)), "labels": names, "windows": list(windows),
                      "image_size": int(image_size)}
            meta = CheckpointMeta.from_record(record, Path(f"<model {i}>"))
            members.append(EnsembleMember(m.eval(), meta, float(w)))
        return cls(Ensemble(members, LABELS), sources=[f"<model {i}>" for i in range(len(models))], **kwargs)

    @property
    def windows(self) -> tuple:
        return self._preps[0][0]

    @property
    def image_size(self) -> int:
        return self._preps[0][1]

    def describe(self) -> dict:
        """What a run used, for the JSON output and for checking a resumed run matches."""
        described = {
            "members": [{"checkpoint": source, "weight": m.weight, "batchnorm_folded": folded}
                        for m, source, folded in zip(self.ensemble.members, self._sources, self._folded)],
            "windows": [dataclasses.asdict(w) if dataclasses.is_dataclass(w) else list(w) for w in self.windows],
            "image_size": self.image_size,
            "tta": list(self.tta),
            "precision": self.precision,
            "aggregation": self.aggregation,
            "top_k": self.top_k,
            **({"label_aggregation": {name: spec.to_dict() for name, spec in zip(LABELS, self.label_aggregation)}}
               if self.label_aggregation is not None else {}),
            "batch_size": self.batch_size,
            "device": str(self.device),
            "compile": self.compile,
        }
        if self.slab_mm:  # only when asked (keeps earlier runs' configs, and their resume, as they were)
            described["slab_mm"] = self.slab_mm
        if self.adapt_bn is not None:  # only when asked (keeps earlier runs' configs, and their resume, as they were)
            described["adapt_bn"] = self.adapt_bn
        if self.trained_on:  # only when the model says (keeps earlier runs' configs, and their resume, as they were)
            described["trained_on"] = self.trained_on
        return described

    # -- preprocessing (numpy) --------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray], prep: tuple | None = None,
                   spacing: Sequence[float] | None = None) -> np.ndarray:
        """HU slices -> uint8 (N, C, S, S), windowed and sized as the (first) checkpoint expects; ``spacing``
        (row, column mm, one for all the slices) is needed by a model whose windows see only the cavity."""
        from ichscan.windows import window_image

        windows, size = prep or self._preps[0]
        return np.stack([window_image(hu, windows, size, np.uint8, spacing) for hu in images])

    # -- model ------------------------------------------------------------------------------------
    def _precision(self):
        """The block a forward pass runs in: autocast to bf16 / fp16, or IEEE fp32 (no TF32 on a GPU, so that
        fp32 gives a GPU the numbers it gives a CPU; ``hardware.ieee_fp32``)."""
        import torch

        if self._autocast is not None:
            return torch.autocast(device_type=self.device.type, dtype=self._autocast)
        return ieee_fp32()

    def _forward(self, model, x):
        with self._precision():
            return model(x).float()

    def _runner(self, i: int, member: EnsembleMember):
        """What runs member ``i``: the model, or its compiled form once ``compile`` asked for it."""
        if not self.compile:
            return member.model
        if i not in self._runners:
            import torch

            # dynamic: series leave last batches of every size; one compile serves them all
            options = {"freezing": True} if self.device.type == "cpu" else None
            self._runners[i] = torch.compile(member.model, dynamic=True, options=options)
        return self._runners[i]

    def _view_batch(self, images: np.ndarray, views: Sequence[str]):
        """Windowed images (n, C, S, S) -> one tensor batch of every TTA view (views x n), on the device,
        in [0, 1] and in the memory format the models run in."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)  # what IchClassifier does with uint8, done before TTA
        batch = torch.cat([_apply_view(x, v) for v in views]) if len(views) > 1 else _apply_view(x, views[0])
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _adapted(self, member: EnsembleMember, x_all: np.ndarray, views: Sequence[str]):
        """A context in which ``member`` normalises with statistics mixed from its own and this series'
        (``adapt_bn``; ``ichscan.predict.adaptation``); a no-op without ``adapt_bn``."""
        if self.adapt_bn is None:
            return contextlib.nullcontext()
        from ichscan.predict.adaptation import adapted_batchnorm, stats_indices, stats_slice_limit

        chosen = stats_indices(len(x_all), stats_slice_limit(len(views)))
        batch = self._view_batch(x_all[chosen], views)
        return adapted_batchnorm(member.model, batch, n_slices=len(x_all), prior=self.adapt_bn,
                                 forward=lambda b: self._forward(member.model, b))

    def _run(self, i: int, member: EnsembleMember, batch):
        runner = self._runner(i, member)
        if runner is member.model:
            return self._forward(runner, batch)
        try:
            return self._forward(runner, batch)
        except Exception as err:  # Inductor needs a C++ compiler (CPU) or Triton (GPU); eager always works
            text = str(err).strip().splitlines()
            log.warning("torch.compile failed for %s (%s); running it eagerly", self._sources[i],
                        text[0] if text else type(err).__name__)
            self._runners[i] = member.model
            return self._forward(member.model, batch)

    def predict_arrays(self, arrays: np.ndarray | dict[tuple, np.ndarray]) -> np.ndarray:
        """Probabilities (N, 6) in LABELS order for windowed images (N, C, S, S): uint8 0..255 or float 0..1.
        With ``adapt_bn`` the images are taken to be one series: its batch-norm statistics come from all of them."""
        import torch

        if isinstance(arrays, np.ndarray):  # one preprocessing for all members
            arrays = {prep: arrays for prep in self._preps}
        n = len(next(iter(arrays.values())))
        views = self.tta
        chunk = max(1, self.batch_size // len(views))
        per_member = []
        if self.aggregation == "context":
            return self._context_arrays(arrays, n, views, chunk)
        with torch.inference_mode():
            for i, member in enumerate(self.ensemble.members):
                x_all = arrays[member.prep]
                member_probs = np.empty((n, len(LABELS)), dtype=np.float64)
                with self._adapted(member, x_all, views):
                    self._member_probs(i, member, x_all, member_probs, views, chunk)
                per_member.append(member_probs)
        probs = self.ensemble.average(per_member)
        if not np.all(np.isfinite(probs)):
            raise CheckpointError("the model returned NaN or infinite outputs; check the checkpoint "
                                  "(or try --precision fp32)", self._sources[0])
        return probs.astype(np.float32)

    def _member_probs(self, i: int, member: EnsembleMember, x_all: np.ndarray, out: np.ndarray,
                      views: Sequence[str], chunk: int) -> None:
        """Member ``i``'s probabilities for every image of ``x_all`` into ``out``, averaged over the views."""
        import torch

        for start in range(0, len(x_all), chunk):
            logits = self._run(i, member, self._view_batch(x_all[start:start + chunk], views))
            p = torch.sigmoid(logits).double().cpu().numpy()  # LABELS order: the ensemble chose it
            out[start:start + chunk] = p.reshape(len(views), -1, len(LABELS)).mean(axis=0)

    def _context_arrays(self, arrays: dict, n: int, views: Sequence[str], chunk: int) -> np.ndarray:
        """Aggregation ``context``: each member's slice logits and embeddings (averaged over the TTA views) go
        through its series head; returns the refined slice probabilities (N, 6) and keeps each member's series
        probabilities in ``self._series_probs`` (averaged over members like slice probabilities)."""
        import torch

        slice_parts, series_parts = [], []
        with torch.inference_mode():
            for member in self.ensemble.members:
                model, x_all = member.model, arrays[member.prep]
                rows_logits, rows_emb = [], []
                with self._adapted(member, x_all, views):
                    for start in range(0, n, chunk):
                        batch = self._view_batch(x_all[start:start + chunk], views)
                        with self._precision():
                            logits, emb = model.forward_with_embedding(batch)
                        m = min(chunk, n - start)
                        rows_logits.append(logits.float().reshape(len(views), m, -1).mean(0))
                        rows_emb.append(emb.float().reshape(len(views), m, -1).mean(0))
                logits_sum, emb_sum = torch.cat(rows_logits), torch.cat(rows_emb)  # (N, L), (N, D): one series
                with ieee_fp32():  # the series head runs in fp32 whatever the backbone ran in
                    slice_logits, series_logits = model.series_context(emb_sum, logits_sum)
                slice_parts.append(torch.sigmoid(slice_logits).double().cpu().numpy())
                series_parts.append(torch.sigmoid(series_logits).double().cpu().numpy())
        probs = self.ensemble.average(slice_parts)
        self._series_probs = self.ensemble.average(series_parts)
        if not (np.all(np.isfinite(probs)) and np.all(np.isfinite(self._series_probs))):
            raise CheckpointError("the model returned NaN or infinite outputs; check the checkpoint "
                                  "(or try --precision fp32)", self._sources[0])
        return probs.astype(np.float32)

    # -- series -----------------------------------------------------------------------------------
    def decode_series(self, series: Any, allow_non_ct: bool = False
                      ) -> tuple[list, dict[tuple, np.ndarray], list, tuple[int, ...] | None]:
        """Decode and window a series: (slices kept, {prep: uint8 images}, bad files, the slab of each slice
        kept or None). A thin series (``slab_groups``) is read as slabs of about ``slab_mm``: one image per
        slab. Numpy only, so it runs in a helper thread while the model works on the previous series."""
        groups = slab_groups(series.slices, self.slab_mm)
        if groups is not None:
            return _windowed_slabs(series, groups, self._preps, allow_non_ct)
        return (*_windowed_series(series, self._preps, allow_non_ct), None)

    def predict_series(self, series: Any, *, loaded: tuple | None = None, allow_non_ct: bool = False
                       ) -> SeriesPrediction:
        """Probabilities for one ``CTSeries`` (headers-only or with pixels). Slices that cannot be
        decoded are dropped and listed in ``SeriesPrediction.skipped``; none left raises SeriesError."""
        kept, arrays, bad, slab_of = loaded if loaded is not None else self.decode_series(series, allow_non_ct)
        if not kept:
            err = SeriesError(f"none of its {len(bad)} slices could be decoded", f"series {series.series_uid}")
            err.skipped = tuple(bad)  # the files at fault, for the batch report
            raise err
        self._check_cavity(series, arrays)
        probs = self.predict_arrays(arrays)  # one row per image read: a slice, or a slab of a thin series
        return self._assemble(series, kept, probs, bad, slab_of)

    def _check_cavity(self, series: Any, arrays: dict[tuple, np.ndarray]) -> None:
        """A model that sees only the cranial cavity is blind where none is found; say so when that is most of
        the middle half of a series (where a head has its cavity on every slice), as images without bone
        (windowed exports, a skull stripped already) or a wide defect would leave it."""
        for (windows, _), images in arrays.items():
            if not any(getattr(w, "region", "whole") == "cavity" for w in windows) or len(images) < 4:
                continue
            n = len(images)
            middle = images[n // 4: n - n // 4]
            blank = int((middle.reshape(len(middle), -1).max(axis=1) == 0).sum())
            if blank > len(middle) // 2:
                log.warning("series %s: no cranial cavity found on %d of its %d middle slices, and this model sees "
                            "only the cavity: those slices are air to it; do the images keep the skull's bone "
                            "(> 300 HU)?", series.series_uid, blank, len(middle))

    def predict_series_arrays(self, arrays: np.ndarray | dict[tuple, np.ndarray]
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One series' windowed images (z order) -> (slice probabilities (N, 6) float32, series probabilities
        (6,) by this predictor's aggregation, key slice index per label): what ``predict_series`` reports."""
        slice_probs = self.predict_arrays(arrays)
        probs, key = self._series_of(slice_probs)
        return slice_probs, probs, key

    def _series_of(self, slice_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Series probabilities from the float32 slice probabilities, so a prediction reloaded from
        # its JSON aggregates to the very same numbers.
        if self.aggregation == "context":  # the series head's own series probabilities (predict_arrays kept them)
            return (np.asarray(self._series_probs, dtype=np.float64),
                    np.argmax(np.asarray(slice_probs, dtype=np.float64), axis=0))
        if self.label_aggregation is not None:
            return aggregate_per_label(slice_probs, self.label_aggregation)
        return aggregate(slice_probs, self.aggregation, self.top_k)

    def _assemble(self, series, kept, read_probs, bad, slab_of=None) -> SeriesPrediction:
        probs, key = self._series_of(read_probs)
        slice_probs = read_probs
        if slab_of is not None:  # every slice gets its slab's probabilities; a key slab's middle slice is its key slice
            slab_of = np.asarray(slab_of)
            slice_probs = read_probs[slab_of]
            members = [np.flatnonzero(slab_of == j) for j in range(len(read_probs))]
            middle = [int(m[len(m) // 2]) for m in members]
            key = np.asarray([middle[int(k)] for k in key])
        sop_uids = tuple(str(s.sop_uid) for s in kept)
        image_ids = tuple(str(s.image_id) for s in kept)
        zs = tuple(_z(s) for s in kept)
        keys = tuple(
            KeySlice(name, int(key[j]), sop_uids[key[j]], image_ids[key[j]], zs[key[j]], float(slice_probs[key[j], j]))
            for j, name in enumerate(LABELS)
        )
        return SeriesPrediction(
            series_uid=str(series.series_uid),
            study_uid=series.study_uid,
            patient_id=series.patient_id,
            labels=LABELS,
            slice_probs=slice_probs,
            probs=probs,
            key_slices=keys,
            sop_uids=sop_uids,
            image_ids=image_ids,
            paths=tuple(escape_undecodable(str(s.path)) for s in kept),
            z=zs,
            aggregation=self.aggregation,
            skipped=tuple(bad),
            slabs=tuple(int(j) for j in slab_of) if slab_of is not None else (),
            slab_mm=self.slab_mm if slab_of is not None else None,
        )

    def iter_predict(self, series_list: Sequence[Any], *, prefetch: bool = True, allow_non_ct: bool = False
                     ) -> Iterator[tuple[Any, SeriesPrediction | IchscanError]]:
        """Predict series in order, yielding (series, prediction or error). With ``prefetch`` the next
        series is decoded in a helper thread while the model runs on the current one."""
        if not prefetch or len(series_list) < 2:
            for s in series_list:
                try:
                    yield s, self.predict_series(s, allow_non_ct=allow_non_ct)
                except IchscanError as err:
                    yield s, err
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ichscan-decode") as pool:
            pending = pool.submit(self.decode_series, series_list[0], allow_non_ct)
            for i, s in enumerate(series_list):
                loaded_future = pending
                pending = (pool.submit(self.decode_series, series_list[i + 1], allow_non_ct)
                           if i + 1 < len(series_list) else None)
                try:
                    yield s, self.predict_series(s, loaded=loaded_future.result())
                except IchscanError as err:
                    yield s, err
                except BaseException:
                    if pending is not None:
                        pending.cancel()
                    raise
