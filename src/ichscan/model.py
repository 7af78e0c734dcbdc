"""The classifier: any timm backbone with one logit per label, and checkpoints that describe themselves.

A model takes the three CT windows as produced by ``ichscan.windows.window_image`` — uint8 0..255 or float
in [0, 1], shape (B, C, H, W) — and normalises them itself, so callers never repeat ImageNet constants.
It returns logits in the order of ``model.labels``.

Checkpoint = ``<stem>.safetensors`` (weights) + ``<stem>.json`` (arch, labels, windows, image size, training
config, data summary, metrics). Both are written atomically. An ensemble manifest is a JSON naming checkpoints
relative to itself, optionally with the sha256 of each member's weights (checked on every read), operating
points and provenance. The bundled model (``ichscan/bundled/bundled.json``) is such a manifest.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ichscan import __version__
from ichscan.aggregation import check_aggregation
from ichscan.errors import CheckpointError, ChecksumError, IchscanError, NoBundledModelError
from ichscan.fileio import json_default, write_bytes, write_json
from ichscan.labels import LABELS
from ichscan.thresholds import check_operating_points

log = logging.getLogger(__name__)

DEFAULT_ARCH = "seresnext50_32x4d"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENSEMBLE_KIND = "ichscan-ensemble"
BUNDLED = "bundled"  # what --checkpoint takes for the model shipped inside the package
BUNDLED_MANIFEST = "bundled.json"
BUNDLED_DIR_ENV = "ICHSCAN_BUNDLED_DIR"  # another folder to take the bundled model from (tests)
BUNDLE_MAX_BYTES = 50 * 1024 * 1024  # weights + JSON of a bundle, all members together
PHANTOM_ONLY = "synthetic phantoms (ichscan.phantom); no real CT"


class IchClassifier(nn.Module):
    """A timm backbone behind input normalisation; ``labels`` names the outputs in order."""

    def __init__(
        self,
        backbone: nn.Module,
        labels: Sequence[str],
        arch: str,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        model_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.trained_labels: tuple[str, ...] = tuple(labels)
        self.labels: tuple[str, ...] = tuple(labels)
        self.model_kwargs = dict(model_kwargs or {})
        in_chans = len(mean)
        # Not persistent: they are written to the checkpoint JSON, which is the description of the model.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, in_chans, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, in_chans, 1, 1), persistent=False)
        self.register_buffer("output_index", None, persistent=False)
        self.series_head: nn.Module | None = None  # ichscan.series.SeriesHead, when one was trained

    @property
    def in_chans(self) -> int:
        return int(self.mean.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype) / 255.0
        x = (x - self.mean) / self.std
        logits = self.backbone(x)
        if self.output_index is not None:
            logits = logits.index_select(1, self.output_index)
        return logits

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits in ``trained_labels`` order, the backbone's pooled features) for a batch: what a series
        head reads. ``forward`` gives the same logits, reordered to ``labels``."""
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype) / 255.0
        x = (x - self.mean) / self.std
        features = self.backbone.forward_features(x)
        emb = self.backbone.forward_head(features, pre_logits=True)
        return self.backbone.forward_head(features), emb

    def to_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Outputs in ``trained_labels`` order (last axis) reordered to ``labels``."""
        return logits if self.output_index is None else logits.index_select(-1, self.output_index)

    def series_context(self, emb: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The series head on one series (S, D) / (S, L) or a padded batch: (slice logits, series logits) in
        ``labels`` order; ``logits`` as ``forward_with_embedding`` gives them."""
        if self.series_head is None:
            raise CheckpointError(f"this {self.arch} model has no series head; train one (ichscan series-head)")
        slice_logits, series_logits = self.series_head(emb, logits, mask)
        return self.to_labels(slice_logits), self.to_labels(series_logits)

    def select_labels(self, labels: Sequence[str]) -> IchClassifier:
        """Reorder (or subset) the outputs to ``labels``, by name; returns self."""
        labels = tuple(labels)
        missing = [name for name in labels if name not in self.trained_labels]
        if missing:
            raise CheckpointError(
                f"model was trained on labels {list(self.trained_labels)} and has no output for {missing}"
            )
        if labels == self.trained_labels:
            self.output_index = None
        else:
            index = [self.trained_labels.index(name) for name in labels]
            self.output_index = torch.tensor(index, dtype=torch.long, device=self.mean.device)
        self.labels = labels
        return self


def _cached_pretrained_file(arch: str) -> Path | None:
    """A file with ImageNet weights for ``arch`` already on this machine (Hugging Face or torch hub cache)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
                found = try_to_load_from_cache(hub_id, filename)
                if isinstance(found, str) and os.path.exists(found):
                    return Path(found)
        except ImportError:  # pragma: no cover - huggingface_hub comes with timm
            pass
    url = getattr(cfg, "url", None)
    if url:
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if hub_dir.exists():
            return hub_dir
    return None


def build_model(
    arch: str = DEFAULT_ARCH,
    labels: Sequence[str] = LABELS,
    pretrained: bool | str | os.PathLike = False,
    in_chans: int = 3,
    **timm_kw: Any,
) -> IchClassifier:
    """A timm backbone ``arch`` with ``len(labels)`` logits.

    ``pretrained``: False (random init); a path to a local weights file (safetensors or a torch state dict, as
    timm publishes them), an ichscan checkpoint (stem, .json or .safetensors), an ensemble manifest (its first
    member) or ``"bundled"``; or True to use weights already in the Hugging Face / torch hub cache. Nothing is
    downloaded: ichscan runs offline, and says where to put the file when there is none. Weights are loaded by
    :func:`load_weights_into`: the whole backbone must match, or ``CheckpointError``.
    """
    import timm

    labels = tuple(labels)
    if not labels:
        raise IchscanError("build_model needs at least one label")
    if not timm.is_model(arch):
        raise IchscanError(f"unknown timm architecture {arch!r}; see timm.list_models() for names")
    weights: Path | str | None = None
    if pretrained is True:
        weights = _cached_pretrained_file(arch)
        if weights is None:
            raise CheckpointError(
                f"no ImageNet weights for {arch!r} in the local cache and ichscan does not download; "
                "download them once (e.g. timm.create_model(arch, pretrained=True) on a connected machine) "
                "and pass the file with --pretrained PATH, or train from scratch with --no-pretrained"
            )
    elif pretrained not in (False, None):
        if isinstance(pretrained, str) and pretrained == BUNDLED:
            weights = BUNDLED
        else:
            weights = Path(pretrained)
            if not weights.is_file() and not checkpoint_paths(weights)[1].is_file():
                raise CheckpointError("pretrained weights file not found; pass an existing .safetensors/.pth "
                                      "or an ichscan checkpoint", weights)
    kwargs = dict(timm_kw)
    # Always built without timm's loader: it skips keys that do not fit with only a warning (an ichscan
    # checkpoint's "backbone." keys loaded nothing); load_weights_into refuses anything but a whole backbone.
    backbone = timm.create_model(arch, pretrained=False, num_classes=len(labels), in_chans=in_chans, **kwargs)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    if len(mean) != in_chans:  # timm keeps 3-channel constants for other channel counts
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    model = IchClassifier(backbone, labels, arch, mean, std, model_kwargs=kwargs)
    if weights is not None:
        report = load_weights_into(model, weights, what="pretrained")
        log.info("%s", report.line())
    return model


# --------------------------------------------------------------------------------------------- checkpoints


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, json) for a checkpoint given as its stem, its .safetensors or its .json."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of ``model`` (unwrapping DDP and torch.compile) as contiguous CPU tensors."""
    model = unwrap(model)
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def unwrap(model: nn.Module) -> nn.Module:
    """The IchClassifier inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; returns the JSON path.

    ``meta`` adds to (and may override) what the model knows about itself: windows, image_size, config,
    data, metrics. The weights are written first, so a JSON on disk always has its weights beside it.
    """
    from safetensors.torch import save as st_save

    weights_path, json_path = checkpoint_paths(path)
    inner = unwrap(model)
    if not isinstance(inner, IchClassifier):
        raise CheckpointError("save_checkpoint expects a model from ichscan.model.build_model", json_path)
    meta = dict(meta or {})
    record = {
        "format": "ichscan-checkpoint/1",
        "arch": inner.arch,
        "labels": list(inner.trained_labels),
        "in_chans": inner.in_chans,
        "normalize": {"mean": inner.mean.flatten().tolist(), "std": inner.std.flatten().tolist()},
        "model_kwargs": inner.model_kwargs,
        "windows": meta.pop("windows", None),
        "image_size": meta.pop("image_size", None),
        "config": meta.pop("config", {}),
        "data": meta.pop("data", {}),
        "metrics": meta.pop("metrics", {}),
        "ichscan_version": __version__,
        "weights": weights_path.name,
    }
    if inner.series_head is not None:
        record["series_head"] = inner.series_head.config.to_dict()
    record.update(meta)
    CheckpointMeta.from_record(record, json_path)  # never write a checkpoint inference could not use
    write_bytes(weights_path, st_save(model_state(inner), metadata={"format": "pt"}))
    write_json(json_path, record)
    return json_path


@dataclass(frozen=True)
class CheckpointMeta:
    """The JSON half of a checkpoint, checked: what inference needs and where the model came from.

    The one reader of checkpoint JSON (like timm's ``PretrainedCfg``): everything else takes these fields
    instead of ``.get()``-ing the JSON. ``record`` is the JSON as written (config, data, metrics, any
    provenance a tool added), for copying it unchanged.
    """

    path: Path  # the JSON
    weights: Path  # the .safetensors it names
    arch: str
    labels: tuple[str, ...]  # output order
    windows: tuple  # ichscan.windows.Window per input channel
    image_size: int
    in_chans: int
    mean: tuple[float, ...] | None  # input normalisation; None: the architecture's default
    std: tuple[float, ...] | None
    model_kwargs: dict[str, Any]
    operating_points: dict[str, Any] | None  # {"method", "thresholds": {label: t}, ...} chosen on validation
    trained_on: str | None  # e.g. PHANTOM_ONLY
    record: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.record.get("config") or {})

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.record.get("data") or {})

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.record.get("metrics") or {})

    @property
    def ichscan_version(self) -> str | None:
        return self.record.get("ichscan_version")

    @classmethod
    def from_record(cls, record: Any, json_path: Path) -> CheckpointMeta:
        """Check a checkpoint record field by field; ``CheckpointError`` names the file and the field."""
        from ichscan.windows import get_windows

        def fail(problem: str) -> CheckpointError:
            return CheckpointError(f"{problem}; is it a checkpoint written by ichscan?", json_path)

        if not isinstance(record, dict):
            raise fail("not a JSON object")
        if record.get("kind") == ENSEMBLE_KIND:
            raise CheckpointError("this is an ensemble manifest, not a single checkpoint; load it with "
                                  "read_manifest or load_ensemble", json_path)
        arch = record.get("arch")
        if not isinstance(arch, str) or not arch:
            raise fail("no 'arch'")
        labels = record.get("labels")
        if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels)
                or len(set(labels)) != len(labels)):
            raise fail(f"'labels' is {labels!r}, not a list of distinct names")
        size = record.get("image_size")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise fail(f"'image_size' is {size!r}, not a positive number of pixels")
        if not record.get("windows"):
            raise fail("no 'windows'")
        try:
            windows = tuple(get_windows(record["windows"]))
        except (ValueError, KeyError, TypeError) as err:
            raise fail(f"unusable 'windows' ({err})") from None
        in_chans = record.get("in_chans", len(windows))
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans != len(windows):
            raise fail(f"the model takes {in_chans!r} channels but the JSON lists {len(windows)} windows")
        norm = record.get("normalize") or {}
        mean = std = None
        if norm:
            try:
                mean, std = tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
            except (KeyError, TypeError, ValueError):
                raise fail("'normalize' is not {\"mean\": [...], \"std\": [...]}") from None
            if len(mean) != in_chans or len(std) != in_chans or not all(v > 0 for v in std):
                raise fail(f"'normalize' does not fit {in_chans} channels")
        kwargs = record.get("model_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise fail("'model_kwargs' is not an object")
        trained_on = record.get("trained_on")
        if trained_on is not None and not isinstance(trained_on, str):
            raise fail("'trained_on' is not text")
        name = record.get("weights")
        weights = json_path.with_name(name) if isinstance(name, str) and name else checkpoint_paths(json_path)[0]
        return cls(json_path, weights, arch, tuple(labels), windows, size, in_chans, mean, std, dict(kwargs),
                   check_operating_points(record.get("operating_points"), json_path, error=CheckpointError),
                   trained_on, record)


def read_checkpoint_meta(path: str | os.PathLike) -> CheckpointMeta:
    """The JSON half of a checkpoint (given as its stem, .json or .safetensors), checked."""
    _, json_path = checkpoint_paths(path)
    if not json_path.is_file():
        raise CheckpointError("checkpoint JSON not found; pass the .json written by `ichscan train`", json_path)
    try:
        record = json.loads(json_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"unreadable checkpoint JSON ({err})", json_path) from err
    return CheckpointMeta.from_record(record, json_path)


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    labels: Sequence[str] | None = None,
) -> tuple[IchClassifier, dict[str, Any]]:
    """(model in eval mode, its CheckpointMeta) from a checkpoint stem, .json or .safetensors.

    Outputs follow the label order written in the checkpoint (``model.labels``), or ``labels`` when given,
    matched by name.
    """
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    if not meta.weights.is_file():
        raise CheckpointError("checkpoint weights (.safetensors) missing beside its JSON", meta.weights)
    try:
        model = build_model(meta.arch, labels=meta.labels, pretrained=False, in_chans=meta.in_chans,
                            **meta.model_kwargs)
    except IchscanError as err:
        raise CheckpointError(err.reason, meta.path) from None
    if meta.mean is not None:
        model.mean.copy_(torch.tensor(meta.mean).view_as(model.mean))
        model.std.copy_(torch.tensor(meta.std).view_as(model.std))
    if meta.record.get("series_head") is not None:
        attach_series_head(model, meta.record["series_head"], meta.path)
    try:
        state = load_file(str(meta.weights), device="cpu")
        model.load_state_dict(state, strict=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"weights do not fit {meta.arch} with {len(meta.labels)} outputs ({first[:200]})",
                              meta.weights) from err
    if labels is not None:
        model.select_labels(labels)
    model.to(map_location).eval()
    return model, meta


def attach_series_head(model: IchClassifier, record: Any, source: str | os.PathLike | None = None) -> nn.Module:
    """Build the (untrained) ``SeriesHead`` a checkpoint JSON's ``series_head`` record describes, on ``model``."""
    from ichscan.series import HeadConfig, SeriesHead

    try:
        config = HeadConfig.from_dict(record)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"'series_head' is not usable: {err}", source) from None
    if tuple(config.labels) != tuple(model.trained_labels):
        raise CheckpointError(f"'series_head' labels {list(config.labels)} differ from the model's "
                              f"{list(model.trained_labels)}", source)
    model.series_head = SeriesHead(config).to(model.mean.device).train(model.training)
    return model.series_head


# ------------------------------------------------------------------------- initialising from weights files

_SERIES_HEAD = "series_head."
_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers, outermost first
_MAX_NAMES = 3


@dataclass(frozen=True)
class WeightsReport:
    """What :func:`load_weights_into` did: ``line()`` says it in one line for the log.

    ``source``: the weights file read; ``kind``: ``"ichscan"`` (a checkpoint, with its JSON) or ``"timm"``
    (a bare state dict, e.g. ImageNet weights); ``loaded``/``total``: backbone tensors without the classifier
    (always all of them: anything less is an error); ``classifier``: ``"loaded"``, ``"reordered"`` (rows
    permuted by label name) or ``"new"`` (left freshly initialised, ``note`` says why); ``arch``: the
    architecture loaded; ``labels``: the checkpoint's labels (None for a bare state dict); ``extra_state``:
    the source's ``series_head.*`` tensors (prefix kept), not loaded; ``manifest``: the ensemble manifest the
    checkpoint was taken from (its first of ``manifest_members`` members), if any.
    """

    source: Path
    kind: str
    loaded: int
    total: int
    classifier: str
    arch: str | None
    labels: tuple[str, ...] | None
    extra_state: dict[str, torch.Tensor] = field(default_factory=dict)
    manifest: Path | None = None
    manifest_members: int = 0
    note: str = ""

    def line(self) -> str:
        head = {"loaded": "and its classifier", "reordered": "and its classifier (rows reordered by label name)",
                "new": "with a new classifier" + (f" ({self.note})" if self.note else "")}[self.classifier]
        if self.kind == "ichscan":
            what = "ichscan checkpoint"
            if self.manifest is not None:
                what += f", first of {self.manifest_members} members of the ensemble {self.manifest}"
            if self.labels:
                what += f", labels {self.labels[0]}..{self.labels[-1]}" if len(self.labels) > 1 else \
                    f", label {self.labels[0]}"
        else:
            what = "timm weights"
        if self.extra_state:
            what += f", {len(self.extra_state)} series_head tensors not loaded"
        return (f"loaded {self.loaded}/{self.total} backbone tensors of {self.arch or 'the model'} {head} "
                f"from {self.source} ({what})")


@dataclass(frozen=True)
class _WeightsSource:
    weights: Path
    kind: str  # "ichscan" | "timm"
    meta: CheckpointMeta | None
    manifest: Path | None = None
    manifest_members: int = 0


def _looks_like_checkpoint_json(path: Path) -> bool:
    doc = _read_json_dict(path) if path.is_file() else None
    return doc is not None and doc.get("kind") != ENSEMBLE_KIND and "arch" in doc and "labels" in doc


def _weights_source(source: str | os.PathLike, what: str = "pretrained") -> _WeightsSource:
    """What a weights source means: a checkpoint, a manifest's first member, ``"bundled"``, or a bare file."""
    path = resolve_checkpoint(source) if isinstance(source, str) and source == BUNDLED else Path(source)
    if is_manifest(path):
        manifest = read_manifest(path)  # recorded sha256 checked
        meta = read_checkpoint_meta(manifest.members[0].checkpoint)
        return _WeightsSource(meta.weights, "ichscan", meta, manifest.path, len(manifest.members))
    json_path = checkpoint_paths(path)[1]
    if path.suffix == ".json" or (not path.is_file() and json_path.is_file()):
        meta = read_checkpoint_meta(path)
        return _WeightsSource(meta.weights, "ichscan", meta)
    if path.suffix == ".safetensors" and _looks_like_checkpoint_json(json_path):
        return _WeightsSource(path, "ichscan", read_checkpoint_meta(json_path))
    if not path.is_file():
        raise CheckpointError(f"{what} weights file not found; pass an existing .safetensors/.pth, an ichscan "
                              "checkpoint or an ensemble manifest", path)
    return _WeightsSource(path, "timm", None)


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch state dict (plain, or under "state_dict" / "model")."""
    if not path.is_file():
        raise CheckpointError("weights file missing", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"unreadable weights file ({first[:200]})", path) from err
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, Mapping) \
        else {}
    if not tensors:
        raise CheckpointError("holds no tensors; pass a state dict (.safetensors/.pth) or an ichscan checkpoint",
                              path)
    return tensors


def _split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone tensors with "module." and "backbone." stripped, ``series_head.*`` tensors with the prefix)."""
    stripped = {}
    for key, value in state.items():
        for prefix in _STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        stripped[key] = value
    wrapped = any(key.startswith("backbone.") for key in stripped)  # an ichscan model: other keys are not ours
    backbone, extra = {}, {}
    for key, value in stripped.items():
        if key.startswith(_SERIES_HEAD):
            extra[key] = value
        elif key.startswith("backbone."):
            backbone[key[len("backbone."):]] = value
        elif not wrapped:
            backbone[key] = value
    return backbone, extra


def classifier_keys(backbone: nn.Module) -> tuple[str, ...]:
    """State-dict names of the classifier of a timm ``backbone`` (``fc.weight``, ``fc.bias`` for a ResNet)."""
    get = getattr(backbone, "get_classifier", None)
    heads = get() if callable(get) else None
    if isinstance(heads, nn.Module):
        heads = [heads]
    elif isinstance(heads, (tuple, list)):  # distilled models have two heads
        heads = [h for h in heads if isinstance(h, nn.Module)]
    else:
        return ()
    ids = {id(t) for h in heads for t in (*h.parameters(), *h.buffers())}
    names = [name for name, t in (*backbone.named_parameters(), *backbone.named_buffers()) if id(t) in ids]
    return tuple(name for name in backbone.state_dict() if name in names)


def _mismatch(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
              keys: Sequence[str]) -> tuple[list[str], list[str]]:
    missing = [k for k in keys if k not in source]
    differ = [k for k in keys if k in source and tuple(source[k].shape) != tuple(target[k].shape)]
    return missing, differ


def _timm_filtered(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor] | None:
    """``state`` through the architecture's own ``checkpoint_filter_fn`` (weights in an original layout)."""
    import sys

    fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if not callable(fn):
        return None
    try:
        out = fn(dict(state), backbone)
    except Exception:  # noqa: BLE001 - a filter that does not apply: report the plain mismatch
        return None
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)} if isinstance(out, Mapping) else None


def _names(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMES])
    return shown + (f", ... {len(keys) - _MAX_NAMES} more" if len(keys) > _MAX_NAMES else "")


def load_weights_into(model: nn.Module, source: str | os.PathLike, *, what: str = "pretrained") -> WeightsReport:
    """Load the backbone (and classifier when it fits) of ``model`` from ``source``; returns what it did.

    ``source``: an ichscan checkpoint (stem, .json or .safetensors), an ensemble manifest (its first member),
    ``"bundled"``, or a timm weights file (.safetensors, or a .pth/.bin state dict, possibly under
    "state_dict"/"model"). Leading ``module.`` and ``backbone.`` are stripped from the keys. Every backbone
    tensor but the classifier must be there with the same shape, else ``CheckpointError`` (one line naming the
    file), and nothing is changed. The classifier is loaded when its shape fits and, for a checkpoint, its
    labels are the model's (rows reordered by name when only the order differs); otherwise it stays new. A
    checkpoint of another architecture is refused; a checkpoint's input normalisation is copied.
    ``series_head.*`` tensors come back in ``extra_state``; other non-backbone keys are ignored.
    """
    return _load_resolved(model, _weights_source(source, what), what)


def _load_resolved(model: nn.Module, src: _WeightsSource, what: str) -> WeightsReport:
    inner = unwrap(model)
    if not isinstance(inner, IchClassifier):
        raise CheckpointError("load_weights_into expects a model from ichscan.model.build_model", src.weights)
    meta = src.meta
    if meta is not None:
        if meta.arch != inner.arch:
            raise CheckpointError(f"the {what} checkpoint is a {meta.arch} but the model is a {inner.arch}; "
                                  f"pass a {inner.arch} checkpoint or use --arch {meta.arch}", meta.path)
        if not meta.weights.is_file() and src.weights == meta.weights:
            raise CheckpointError("checkpoint weights (.safetensors) missing beside its JSON", meta.weights)
    backbone, extra = _split_state(_read_state_file(src.weights))
    target = inner.backbone.state_dict()
    head = classifier_keys(inner.backbone)
    required = [k for k in target if k not in head and not k.endswith("num_batches_tracked")]
    missing, differ = _mismatch(backbone, target, required)
    if (missing or differ) and src.kind == "timm":
        filtered = _timm_filtered(backbone, inner.backbone)
        if filtered is not None and not any(_mismatch(filtered, target, required)):
            backbone, missing, differ = filtered, [], []
    if missing or differ:
        matched = len(required) - len(missing) - len(differ)
        parts = ([f"missing: {_names(missing)}"] if missing else []) + \
            ([f"shape differs: {_names(differ)}"] if differ else [])
        raise CheckpointError(f"{what} weights: only {matched} of {len(required)} backbone tensors match "
                              f"{inner.arch} ({'; '.join(parts)}): is this a checkpoint of another architecture?",
                              src.weights)

    new_state = {k: backbone.get(k, v) if k not in head else v for k, v in target.items()}
    labels = tuple(inner.trained_labels)
    classifier, note = "new", ""
    head_missing, head_differ = _mismatch(backbone, target, head)
    if not head:
        note = "the model has none"
    elif head_missing:
        note = "the file has none"
    elif head_differ:
        outs = backbone[head_differ[0]].shape[0] if backbone[head_differ[0]].dim() else "?"
        note = f"{outs} outputs in the file, {len(labels)} here"
    elif meta is not None and meta.labels != labels:
        if set(meta.labels) == set(labels):
            index = torch.tensor([meta.labels.index(name) for name in labels], dtype=torch.long)
            for k in head:
                t = backbone[k]
                new_state[k] = t.index_select(0, index) if t.dim() and t.shape[0] == len(labels) else t
            classifier = "reordered"
        else:
            note = f"the checkpoint's labels {list(meta.labels)} are not the model's"
    else:
        for k in head:
            new_state[k] = backbone[k]
        classifier = "loaded"
    if meta is not None and meta.mean is not None and len(meta.mean) != inner.in_chans:
        raise CheckpointError(f"the {what} checkpoint takes {len(meta.mean)} channels, the model "
                              f"{inner.in_chans}", meta.path)
    try:
        inner.backbone.load_state_dict(new_state, strict=True)
    except Exception as err:  # dtype/device trouble: shapes and names were checked above
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{what} weights do not load into {inner.arch} ({first[:200]})", src.weights) from err
    if meta is not None and meta.mean is not None:
        with torch.no_grad():
            inner.mean.copy_(torch.tensor(meta.mean, dtype=inner.mean.dtype).view_as(inner.mean))
            inner.std.copy_(torch.tensor(meta.std, dtype=inner.std.dtype).view_as(inner.std))
    return WeightsReport(src.weights, src.kind, len(required), len(required), classifier, inner.arch,
                         meta.labels if meta is not None else None, extra, src.manifest, src.manifest_members, note)


def resolve_init_checkpoint(source: str | os.PathLike) -> Path:
    """The checkpoint JSON that ``source`` means: a checkpoint (stem, .json, .safetensors), an ensemble
    manifest's first member, or ``"bundled"``'s (``NoBundledModelError`` without one); else CheckpointError."""
    return _init_source(source).meta.path


def init_member_checkpoints(source: str | os.PathLike) -> list[Path]:
    """Every checkpoint JSON ``source`` holds, in order: a manifest's (or ``"bundled"``'s) members, or the one
    checkpoint (recorded hashes checked); CheckpointError for anything else."""
    path = resolve_checkpoint(source) if isinstance(source, str) and source == BUNDLED else Path(source)
    if is_manifest(path):
        return [Path(m.checkpoint) for m in read_manifest(path).members]
    return [resolve_init_checkpoint(source)]


def _init_source(source: str | os.PathLike) -> _WeightsSource:
    src = _weights_source(source, what="init")
    if src.meta is None:
        raise CheckpointError("not an ichscan checkpoint or ensemble manifest; --init takes a checkpoint "
                              "(.json/.safetensors/stem), a manifest or 'bundled' (ImageNet weights: --pretrained)",
                              src.weights)
    return src


def init_model_from(source: str | os.PathLike, labels: Sequence[str] = LABELS,
                    ) -> tuple[IchClassifier, CheckpointMeta, WeightsReport]:
    """(model, its checkpoint's meta, report): a model of the checkpoint's architecture, channels and
    model_kwargs with outputs ``labels``, and every weight of the checkpoint (``ichscan train --init``).

    The classifier comes along when the labels are the checkpoint's (in any order); otherwise it is new
    and the report says so. Returned in training mode, on the CPU.
    """
    src = _init_source(source)
    meta = src.meta
    try:
        model = build_model(meta.arch, labels=labels, pretrained=False, in_chans=meta.in_chans, **meta.model_kwargs)
    except IchscanError as err:
        raise CheckpointError(err.reason, meta.path) from None
    report = _load_resolved(model, src, what="init")
    return model, meta, report


# ----------------------------------------------------------------------------------------------- ensembles


@dataclass
class EnsembleMember:
    """One model of an ensemble: outputs already matched to the ensemble's labels by name, its checked
    checkpoint record, and its share of the average (the members' weights add up to 1)."""

    model: IchClassifier
    meta: CheckpointMeta
    weight: float

    @property
    def prep(self) -> tuple[tuple, int]:
        """(windows, image size): what its input must be; members that share it share preprocessing."""
        return self.meta.windows, self.meta.image_size


class Ensemble:
    """Models averaged on the probability scale (the paper's final model averages two).

    Each member's outputs are re-ordered by label name (``IchClassifier.select_labels``) to ``labels``, so
    checkpoints trained with any label order mix. Members may differ in windows and image size:
    ``predict.Predictor`` windows a series once per distinct ``prep``. ``manifest`` carries the operating
    points, aggregation and ``trained_on`` the model was shipped with.
    """

    def __init__(self, members: Sequence[EnsembleMember], labels: Sequence[str] = LABELS,
                 manifest: Manifest | None = None):
        if not members:
            raise CheckpointError("an ensemble needs at least one member")
        total = sum(m.weight for m in members)
        if total <= 0:
            raise CheckpointError("ensemble weights must add up to more than 0")
        self.members = [dataclasses.replace(m, weight=m.weight / total) for m in members]
        self.labels = tuple(labels)
        for m in self.members:
            if tuple(m.model.labels) != self.labels:
                m.model.select_labels(self.labels)
        self.manifest = manifest

    @property
    def preps(self) -> list[tuple[tuple, int]]:
        return list(dict.fromkeys(m.prep for m in self.members))

    @property
    def image_size(self) -> int:
        return self.members[0].meta.image_size

    @property
    def windows(self) -> tuple:
        return self.members[0].meta.windows

    def average(self, member_probs: Sequence[Any]) -> Any:
        """The weighted mean of per-member probabilities (numpy arrays or tensors, member order)."""
        if len(member_probs) != len(self.members):
            raise ValueError(f"{len(member_probs)} probability arrays for {len(self.members)} members")
        out = None
        for member, p in zip(self.members, member_probs):
            out = member.weight * p if out is None else out + member.weight * p
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, L) for images every member takes as they are (one shared ``prep``)."""
        if len(self.preps) > 1:
            raise CheckpointError("members differ in windows or image size; predict with ichscan.predict.Predictor")
        return self.average([torch.sigmoid(m.model(x).float()) for m in self.members])


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_checkpoint(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """A checkpoint's weights and JSON copied to ``dest`` (its stem: ``dest``.safetensors and .json, the JSON
    naming the new weights file); returns the new JSON. The copy is checked as any checkpoint read is."""
    meta = read_checkpoint_meta(source)
    if not meta.weights.is_file():
        raise CheckpointError("checkpoint weights (.safetensors) missing beside its JSON", meta.weights)
    weights_path, json_path = checkpoint_paths(dest)
    write_bytes(weights_path, meta.weights.read_bytes())
    write_json(json_path, dict(meta.record, weights=weights_path.name))
    read_checkpoint_meta(json_path)
    return json_path


# What must agree for two checkpoints' weights to be averaged: the same network, fed the same way.
_SAME_NETWORK = ("arch", "labels", "in_chans", "normalize", "model_kwargs", "windows", "image_size", "series_head")


def average_checkpoints(sources: Sequence[str | os.PathLike], dest: str | os.PathLike,
                        shares: Sequence[float] | None = None) -> Path:
    """One checkpoint whose every floating-point weight and batch-norm statistic is the ``shares``-weighted
    mean (default equal) of ``sources``' (weight-space ensembling, as WiSE-FT averages a model with its
    fine-tuned descendant; meaningful for checkpoints that share a starting point). Integer buffers (batch
    norm's step counts) are the first source's. The sources must be the same network fed the same way
    (``_SAME_NETWORK``) with the same tensors; the JSON is the first source's, with empty metrics and
    ``averaged_from`` naming each source, its sha256, share and training config. Returns the new JSON."""
    from safetensors.torch import load_file
    from safetensors.torch import save as st_save

    weights_path, json_path = checkpoint_paths(dest)
    if len(sources) < 2:
        raise CheckpointError("averaging needs at least two checkpoints", json_path)
    shares = [1.0] * len(sources) if shares is None else [float(x) for x in shares]
    if len(shares) != len(sources) or min(shares) < 0 or sum(shares) <= 0:
        raise CheckpointError(f"shares {shares}: give one non-negative share per checkpoint, not all zero", json_path)
    total = sum(shares)
    metas = [read_checkpoint_meta(src) for src in sources]
    first = metas[0]
    for meta in metas[1:]:
        differ = [k for k in _SAME_NETWORK if meta.record.get(k) != first.record.get(k)]
        if differ:
            raise CheckpointError(f"cannot average with {first.path}: {', '.join(differ)} differ", meta.path)
    states = []
    for meta in metas:
        if not meta.weights.is_file():
            raise CheckpointError("checkpoint weights (.safetensors) missing beside its JSON", meta.weights)
        states.append(load_file(str(meta.weights), device="cpu"))
    for meta, state in zip(metas[1:], states[1:]):
        odd = sorted(k for k in state.keys() ^ states[0].keys()) or sorted(
            k for k in state if state[k].shape != states[0][k].shape)
        if odd:
            raise CheckpointError(f"cannot average with {first.weights}: tensors differ ({_names(odd)})", meta.weights)
    out = {}
    for key, tensor in states[0].items():
        if tensor.is_floating_point():
            acc = sum(st[key].double() * (w / total) for st, w in zip(states, shares))
            out[key] = acc.to(tensor.dtype).contiguous()
        else:
            out[key] = tensor.clone()
    record = dict(first.record, weights=weights_path.name, metrics={}, averaged_from=[
        {"checkpoint": str(meta.path), "sha256": sha256_file(meta.weights), "share": w / total,
         "config": meta.record.get("config", {})} for meta, w in zip(metas, shares)])
    write_bytes(weights_path, st_save(out, metadata={"format": "pt"}))
    write_json(json_path, record)
    read_checkpoint_meta(json_path)
    return json_path


def average_ensembles(sources: Sequence[str | os.PathLike], dest: str | os.PathLike,
                      shares: Sequence[float] | None = None) -> Path:
    """Member by member: member k of the result is ``average_checkpoints`` of every source's member k, written
    as ``DEST-member{k}``, and ``DEST.json`` is the ensemble manifest naming them (equal weights, hashes
    recorded, no operating points: choose them anew). Each source is a manifest, ``"bundled"`` or a single
    checkpoint (an ensemble of one); all must hold the same number of members. Returns the manifest."""
    _, manifest_path = checkpoint_paths(dest)
    stem = manifest_path.with_name(manifest_path.name[:-len(".json")])
    if len(sources) < 2:
        raise CheckpointError("averaging needs at least two ensembles", manifest_path)
    members = [init_member_checkpoints(src) for src in sources]
    n = len(members[0])
    for src, ms in zip(sources[1:], members[1:]):
        if len(ms) != n:
            raise CheckpointError(f"{len(ms)} member(s) where {sources[0]} has {n}: averaging member by member "
                                  "needs ensembles of the same size", src)
    averaged = [average_checkpoints([ms[k] for ms in members], f"{stem}-member{k}", shares) for k in range(n)]
    normalised = [a["share"] for a in read_checkpoint_meta(averaged[0]).record["averaged_from"]]
    return write_ensemble(manifest_path, averaged, sha256=True, extra={"averaged_from": [
        {"source": str(src), "share": share} for src, share in zip(sources, normalised)]})


def write_ensemble(path: str | os.PathLike, checkpoints: Sequence[str | os.PathLike],
                   weights: Sequence[float] | None = None, *, sha256: bool = False,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write an ensemble manifest naming ``checkpoints`` (paths stored relative to the manifest).

    ``sha256``: also record the hash of each member's weights, which every later read checks.
    ``extra``: more keys for the manifest (operating points, trained_on, provenance), after the standard ones.
    """
    path = Path(path)
    if path.suffix != ".json":
        path = path.with_suffix(".json")
    weights = list(weights) if weights is not None else [1.0] * len(checkpoints)
    if len(weights) != len(checkpoints) or not checkpoints:
        raise CheckpointError("give one weight per checkpoint and at least one checkpoint", path)
    members, labels = [], None
    for ckpt, weight in zip(checkpoints, weights):
        _, json_path = checkpoint_paths(ckpt)
        meta = read_checkpoint_meta(json_path)
        labels = labels or list(meta.labels)
        rel = os.path.relpath(json_path.resolve(), path.parent.resolve())
        entry: dict[str, Any] = {"checkpoint": rel, "weight": float(weight)}
        if sha256:
            weights_path = meta.weights
            if not weights_path.is_file():
                raise CheckpointError("checkpoint weights (.safetensors) missing beside its JSON", weights_path)
            entry["safetensors"] = os.path.relpath(weights_path.resolve(), path.parent.resolve())
            entry["sha256"] = sha256_file(weights_path)
            entry["bytes"] = weights_path.stat().st_size
        members.append(entry)
    record = {"kind": ENSEMBLE_KIND, "members": members, "labels": list(labels)}
    for key, value in (extra or {}).items():
        if key in record:
            raise CheckpointError(f"extra manifest key {key!r} would replace a standard one", path)
        record[key] = value
    write_json(path, record)
    return path


# ------------------------------------------------------------------------------- manifests, one reader


@dataclass(frozen=True)
class ManifestMember:
    """One checkpoint of an ensemble: its JSON, its weight, and the sha256 of its weights when recorded."""

    checkpoint: Path
    weight: float = 1.0
    sha256: str | None = None


@dataclass(frozen=True)
class Manifest:
    """An ensemble manifest, or one checkpoint read as an ensemble of one: what ``read_manifest`` returns.

    ``operating_points``: ``{"method": ..., "thresholds": {label: t}, ...}`` (the shape of a thresholds
    file), chosen on validation data when the model was made; ``trained_on``: what the model saw;
    ``info``: every other key (recipe, seeds, ichscan_version, git_commit, measured...).
    """

    path: Path
    members: tuple[ManifestMember, ...]
    labels: tuple[str, ...] | None = None
    operating_points: dict[str, Any] | None = None
    trained_on: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # ``{"method": "max" | "topk" | "noisy_or", "top_k": k, ...}``: how slices become a series, when the
    # model was made with a choice (chosen on validation, as the operating points are)
    aggregation: dict[str, Any] | None = None

    @property
    def thresholds(self) -> dict[str, float] | None:
        """Per-label thresholds of the operating points, or None when the model carries none."""
        if not self.operating_points:
            return None
        return {name: float(t) for name, t in self.operating_points["thresholds"].items()}


_MANIFEST_KEYS = ("kind", "members", "labels", "operating_points", "trained_on", "aggregation")
def _read_json_dict(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def is_manifest(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ensemble manifest (rather than a checkpoint or anything else)."""
    path = Path(path)
    if path.suffix != ".json" or not path.is_file():
        return False
    doc = _read_json_dict(path)
    return doc is not None and doc.get("kind") == ENSEMBLE_KIND


def read_manifest(path: str | os.PathLike, *, verify: bool = True) -> Manifest:
    """The one reader of ensemble manifests (a checkpoint .json/.safetensors/stem reads as an ensemble of one).

    With ``verify``, each member whose sha256 the manifest records is hashed and compared: a mismatch is a
    ``ChecksumError`` naming the file. Manifests without hashes (as ``ichscan train`` writes them) read as before.
    """
    path = Path(path)
    doc = _read_json_dict(path) if path.suffix == ".json" and path.is_file() else None
    if doc is None or doc.get("kind") != ENSEMBLE_KIND:
        _, json_path = checkpoint_paths(path)
        meta = read_checkpoint_meta(json_path)
        return Manifest(meta.path, (ManifestMember(meta.path),), meta.labels, meta.operating_points, meta.trained_on,
                        aggregation=check_aggregation(meta.record.get("aggregation"), meta.path, error=CheckpointError))
    entries = doc.get("members")
    if not isinstance(entries, list) or not entries:
        raise CheckpointError("ensemble manifest names no members", path)
    members = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("checkpoint"):
            raise CheckpointError(f"member {i} of the ensemble manifest names no checkpoint", path)
        ckpt = Path(entry["checkpoint"])
        members.append(ManifestMember(ckpt if ckpt.is_absolute() else path.parent / ckpt,
                                      float(entry.get("weight", 1.0)), entry.get("sha256")))
    labels = doc.get("labels")
    manifest = Manifest(path, tuple(members), tuple(labels) if labels else None,
                        check_operating_points(doc.get("operating_points"), path, error=CheckpointError),
                        doc.get("trained_on"), {k: v for k, v in doc.items() if k not in _MANIFEST_KEYS},
                        check_aggregation(doc.get("aggregation"), path, error=CheckpointError))
    if verify:
        verify_manifest(manifest)
    return manifest


def verify_manifest(manifest: Manifest) -> None:
    """Hash the weights of every member with a recorded sha256; ``ChecksumError`` naming the first that differs."""
    for member in manifest.members:
        if not member.sha256:
            continue
        weights_path = read_checkpoint_meta(member.checkpoint).weights
        if not weights_path.is_file():
            raise CheckpointError(f"checkpoint weights missing (named in {manifest.path.name})", weights_path)
        digest = sha256_file(weights_path)
        if digest != member.sha256.lower():
            raise ChecksumError(
                f"sha256 {digest[:16]}... differs from {member.sha256[:16]}... recorded in {manifest.path}; "
                "the file is damaged or was replaced (reinstall, or rewrite the manifest)", weights_path)


def load_ensemble(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    labels: Sequence[str] | None = None,
) -> Ensemble:
    """An :class:`Ensemble` from a manifest, ``"bundled"`` or a single checkpoint (an ensemble of one);
    recorded hashes checked. Outputs follow ``labels`` (default: the manifest's, else LABELS)."""
    manifest = read_manifest(resolve_checkpoint(path))
    labels = tuple(labels or manifest.labels or LABELS)
    members = []
    for entry in manifest.members:
        meta = read_checkpoint_meta(entry.checkpoint)
        if manifest.labels is not None and set(meta.labels) != set(manifest.labels):
            raise CheckpointError(f"the manifest lists labels {list(manifest.labels)} but its member {meta.path.name} "
                                  f"was trained on {list(meta.labels)}; rewrite the manifest", manifest.path)
        model, meta = load_checkpoint(entry.checkpoint, map_location, labels)
        members.append(EnsembleMember(model, meta, entry.weight))
    return Ensemble(members, labels, manifest)


def set_operating_points(path: str | os.PathLike, points: Mapping[str, Any]) -> Path:
    """Store operating points (a thresholds file's dict, chosen on validation) in a checkpoint's JSON or an
    ensemble manifest, so that ``ichscan predict`` uses them; returns the JSON written. Weights untouched."""
    path = Path(path)
    doc = _read_json_dict(path) if path.suffix == ".json" and path.is_file() else None
    if doc is not None and doc.get("kind") == ENSEMBLE_KIND:
        target = path
    else:
        target = read_checkpoint_meta(path).path
        doc = json.loads(target.read_text())
    doc["operating_points"] = check_operating_points(dict(points), target, error=CheckpointError)
    if doc.get("kind") != ENSEMBLE_KIND:
        CheckpointMeta.from_record(doc, target)
    write_json(target, doc)
    return target


# ------------------------------------------------------------------------------------------ bundled model


def bundled_dir() -> Path:
    """Where the bundled model lives: ``$ICHSCAN_BUNDLED_DIR`` when set, else ``ichscan/bundled/``."""
    env = os.environ.get(BUNDLED_DIR_ENV)
    return Path(env) if env else Path(__file__).with_name("bundled")


def bundled_checkpoint(directory: str | os.PathLike | None = None) -> Path:
    """The manifest of the model shipped with ichscan (``bundled.json``); ``NoBundledModelError`` if absent."""
    path = Path(directory if directory is not None else bundled_dir()) / BUNDLED_MANIFEST
    if not path.is_file():
        raise NoBundledModelError("no bundled model in this install; pass --checkpoint CKPT_OR_MANIFEST", path)
    return path


def resolve_checkpoint(name_or_path: str | os.PathLike | None = None) -> Path:
    """What a ``--checkpoint`` means: None or ``"bundled"`` is the bundled model, anything else a path."""
    if name_or_path is None or (isinstance(name_or_path, str) and name_or_path == BUNDLED):
        return bundled_checkpoint()
    return Path(name_or_path)


def _git_commit() -> str | None:
    """HEAD of the repository this ichscan is imported from (``-dirty`` with uncommitted changes), if any."""
    here = str(Path(__file__).parent)
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head or None


def _bundle_sources(members: str | os.PathLike | Sequence[str | os.PathLike],
                    weights: Sequence[float] | None) -> list[tuple[Path, float]]:
    items = [members] if isinstance(members, (str, os.PathLike)) else list(members)
    given = list(weights) if weights is not None else None
    if given is not None and len(given) != len(items):
        raise CheckpointError("give one weight per member (or none)")
    sources: list[tuple[Path, float]] = []
    for i, item in enumerate(items):
        manifest = read_manifest(item)  # a manifest brings its members and weights
        for m in manifest.members:
            sources.append((m.checkpoint, m.weight * (given[i] if given else 1.0)))
    if not sources:
        raise CheckpointError("a bundle needs at least one checkpoint")
    return sources


def _thresholds_doc(thresholds: Any) -> dict[str, Any]:
    if hasattr(thresholds, "to_dict"):  # ichscan.metrics.OperatingPoints
        return thresholds.to_dict()
    if isinstance(thresholds, Mapping):
        doc = dict(thresholds)
        return doc if "thresholds" in doc else {"method": "manual", "thresholds": doc}
    path = Path(thresholds)
    doc = _read_json_dict(path)
    if doc is None:
        raise CheckpointError('not a readable thresholds JSON {"method": ..., "thresholds": {label: t}}', path)
    return doc


def write_bundle(out_dir: str | os.PathLike, members: str | os.PathLike | Sequence[str | os.PathLike],
                 thresholds: Any, info: Mapping[str, Any], *, weights: Sequence[float] | None = None,
                 max_bytes: int = BUNDLE_MAX_BYTES) -> Path:
    """Copy checkpoints into ``out_dir`` as ``member<i>.safetensors/.json`` and write ``bundled.json``; returns it.

    ``members``: checkpoints and/or ensemble manifests (their weights kept, times ``weights``).
    ``thresholds``: the operating points chosen on phantom validation, a thresholds file as ``ichscan
    thresholds`` writes it, its dict, or ``OperatingPoints``. ``info``: provenance: ``recipe`` (preset
    name) and ``seeds`` (default: the members' training configs), ``trained_on`` (default: phantoms only),
    ``measured`` (free text/numbers), ``git_commit`` and ``ichscan_version`` (default: the members' version
    and this repository's HEAD), any other key kept as given. The result is an ordinary ensemble manifest
    with sha256 per member; more than ``max_bytes`` in all is refused.
    """
    out = Path(out_dir)
    target = out / BUNDLED_MANIFEST
    sources = _bundle_sources(members, weights)
    points = check_operating_points(_thresholds_doc(thresholds), target, error=CheckpointError)
    points.setdefault("chosen_on", "phantom validation series")
    metas = [read_checkpoint_meta(ckpt) for ckpt, _ in sources]
    files = [(f"member{i}", meta.weights, meta.record) for i, meta in enumerate(metas)]
    for _, weights_path, _ in files:
        if not weights_path.is_file():
            raise CheckpointError("checkpoint weights (.safetensors) missing beside its JSON", weights_path)
    size = sum(w.stat().st_size + len(json.dumps(meta, default=json_default)) for _, w, meta in files)
    if size > max_bytes:
        raise CheckpointError(f"the bundle would take {size / 2**20:.1f} MiB, more than {max_bytes / 2**20:.0f} "
                              "MiB; use a smaller model or store weights in fp16", out)
    info = dict(info)
    configs = [meta.config for meta in metas]
    recipe = info.pop("recipe", None) or ", ".join(dict.fromkeys(str(c["preset"]) for c in configs if "preset" in c))
    seeds = info.pop("seeds", None)
    if seeds is None and all("seed" in c for c in configs):
        seeds = {"training": [c["seed"] for c in configs]}
    if not recipe or seeds is None:
        raise CheckpointError("info needs 'recipe' (preset name) and 'seeds': the members' configs do not say", out)
    versions = list(dict.fromkeys(str(m.ichscan_version) for m in metas if m.ichscan_version))
    extra = {
        "trained_on": info.pop("trained_on", PHANTOM_ONLY),
        "operating_points": points,
        "recipe": recipe,
        "seeds": seeds,
        "ichscan_version": info.pop("ichscan_version", None) or (", ".join(versions) or __version__),
        "git_commit": info.pop("git_commit", None) or _git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "measured": info.pop("measured", {}),
        **info,
    }
    payload = [(stem, weights_path.read_bytes(), meta) for stem, weights_path, meta in files]  # before deleting
    previous = read_manifest(target, verify=False) if is_manifest(target) else None
    keep = {f"{stem}{ext}" for stem, _, _ in files for ext in (".json", ".safetensors")}
    for member in previous.members if previous else ():  # files of an earlier bundle not rewritten now
        doc = _read_json_dict(member.checkpoint) or {}
        weights_name = doc.get("weights") if isinstance(doc.get("weights"), str) else None
        for stale in (member.checkpoint, member.checkpoint.with_name(weights_name) if weights_name
                      else checkpoint_paths(member.checkpoint)[0]):
            if stale.parent.resolve() == out.resolve() and stale.name not in keep and stale.is_file():
                stale.unlink()
    copied = []
    for stem, data, meta in payload:
        write_bytes(out / f"{stem}.safetensors", data)
        write_json(out / f"{stem}.json", dict(meta, weights=f"{stem}.safetensors"))
        copied.append(out / f"{stem}.json")
    return write_ensemble(target, copied, [w for _, w in sources], sha256=True, extra=extra)
