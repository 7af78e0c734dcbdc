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
    timm publishes them); or True to use weights already in the Hugging Face / torch hub cache. Nothing is
    downloaded: ichscan runs offline, and says where to put the file when there is none.
    """
    import timm

    labels = tuple(labels)
    if not labels:
        raise IchscanError("build_model needs at least one label")
    if not timm.is_model(arch):
        raise IchscanError(f"unknown timm architecture {arch!r}; see timm.list_models() for names")
    weights: Path | None = None
    if pretrained is True:
        weights = _cached_pretrained_file(arch)
        if weights is None:
            raise CheckpointError(
                f"no ImageNet weights for {arch!r} in the local cache and ichscan does not download; "
                "download them once (e.g. timm.create_model(arch, pretrained=True) on a connected machine) "
                "and pass the file with --pretrained PATH, or train from scratch with --no-pretrained"
            )
    elif pretrained not in (False, None):
        weights = Path(pretrained)
        if not weights.is_file():
            raise CheckpointError("pretrained weights file not found; pass an existing .safetensors/.pth", weights)
    kwargs = dict(timm_kw)
    if weights is not None:
        try:
            backbone = timm.create_model(
                arch,
                pretrained=True,
                pretrained_cfg_overlay={"file": str(weights), "hf_hub_id": None, "url": None},
                num_classes=len(labels),
                in_chans=in_chans,
                **kwargs,
            )
        except Exception as err:  # timm raises many kinds for a file that does not fit
            raise CheckpointError(f"could not load pretrained weights for {arch}: {err}", weights) from err
        log.info("loaded ImageNet weights for %s from %s", arch, weights)
    else:
        backbone = timm.create_model(arch, pretrained=False, num_classes=len(labels), in_chans=in_chans, **kwargs)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    if len(mean) != in_chans:  # timm keeps 3-channel constants for other channel counts
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return IchClassifier(backbone, labels, arch, mean, std, model_kwargs=kwargs)


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
