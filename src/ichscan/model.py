"""The classifier: any timm backbone with one logit per label, and checkpoints that describe themselves.

A model takes the three CT windows as produced by ``ichscan.windows.window_image`` — uint8 0..255 or float
in [0, 1], shape (B, C, H, W) — and normalises them itself, so callers never repeat ImageNet constants.
It returns logits in the order of ``model.labels``.

Checkpoint = ``<stem>.safetensors`` (weights) + ``<stem>.json`` (arch, labels, windows, image size, training
config, data summary, metrics). Both are written atomically. An ensemble manifest is a JSON naming checkpoints
relative to itself.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ichscan import __version__
from ichscan.errors import CheckpointError, IchscanError
from ichscan.labels import LABELS

log = logging.getLogger(__name__)

DEFAULT_ARCH = "seresnext50_32x4d"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENSEMBLE_KIND = "ichscan-ensemble"


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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
    atomic_write_bytes(weights_path, st_save(model_state(inner), metadata={"format": "pt"}))
    atomic_write_json(json_path, record)
    return json_path


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON half of a checkpoint, checked for the fields inference needs."""
    _, json_path = checkpoint_paths(path)
    if not json_path.is_file():
        raise CheckpointError("checkpoint JSON not found; pass the .json written by `ichscan train`", json_path)
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"unreadable checkpoint JSON ({err})", json_path) from err
    if meta.get("kind") == ENSEMBLE_KIND:
        raise CheckpointError("this is an ensemble manifest; load it with load_ensemble", json_path)
    for key in ("arch", "labels"):
        if key not in meta:
            raise CheckpointError(f"checkpoint JSON has no {key!r}; was it written by ichscan?", json_path)
    return meta


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    labels: Sequence[str] | None = None,
) -> tuple[IchClassifier, dict[str, Any]]:
    """(model in eval mode, meta) from a checkpoint stem, .json or .safetensors.

    Outputs follow the label order written in the checkpoint (``model.labels``), or ``labels`` when given,
    matched by name.
    """
    from safetensors.torch import load_file

    weights_path, json_path = checkpoint_paths(path)
    meta = read_checkpoint_meta(json_path)
    if meta.get("weights"):
        weights_path = json_path.with_name(meta["weights"])
    if not weights_path.is_file():
        raise CheckpointError("checkpoint weights (.safetensors) missing beside its JSON", weights_path)
    norm = meta.get("normalize") or {}
    in_chans = int(meta.get("in_chans", 3))
    model = build_model(meta["arch"], labels=meta["labels"], pretrained=False, in_chans=in_chans,
                        **(meta.get("model_kwargs") or {}))
    if norm:
        model.mean.copy_(torch.tensor(norm["mean"]).view_as(model.mean))
        model.std.copy_(torch.tensor(norm["std"]).view_as(model.std))
    try:
        state = load_file(str(weights_path), device="cpu")
        model.load_state_dict(state, strict=True)
    except Exception as err:
        raise CheckpointError(f"weights do not fit {meta['arch']} with {len(meta['labels'])} outputs: {err}",
                              weights_path) from err
    if labels is not None:
        model.select_labels(labels)
    model.to(map_location).eval()
    return model, meta


# ----------------------------------------------------------------------------------------------- ensembles


class Ensemble(nn.Module):
    """Checkpoints averaged on the probability scale (the paper averages two models).

    ``forward`` returns the weighted mean of the members' sigmoid probabilities, in ``labels`` order.
    Members agree on image size and windows (checked when loading).
    """

    def __init__(self, members: Sequence[IchClassifier], weights: Sequence[float], metas: Sequence[dict],
                 labels: Sequence[str]):
        super().__init__()
        if not members:
            raise CheckpointError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.weights = [float(w) for w in weights]
        self.metas = list(metas)
        self.labels = tuple(labels)
        self.image_size = self.metas[0].get("image_size")
        self.windows = self.metas[0].get("windows")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = sum(self.weights)
        probs = None
        for weight, member in zip(self.weights, self.members):
            p = torch.sigmoid(member(x).float()) * (weight / total)
            probs = p if probs is None else probs + p
        return probs


def write_ensemble(path: str | os.PathLike, checkpoints: Sequence[str | os.PathLike],
                   weights: Sequence[float] | None = None) -> Path:
    """Write an ensemble manifest naming ``checkpoints`` (paths stored relative to the manifest)."""
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
        labels = labels or meta["labels"]
        rel = os.path.relpath(json_path.resolve(), path.parent.resolve())
        members.append({"checkpoint": rel, "weight": float(weight)})
    atomic_write_json(path, {"kind": ENSEMBLE_KIND, "members": members, "labels": list(labels)})
    return path


def load_ensemble(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    labels: Sequence[str] | None = None,
) -> Ensemble:
    """An :class:`Ensemble` from a manifest (or a single checkpoint, as an ensemble of one)."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"unreadable ensemble manifest ({err})", path) from err
    if manifest.get("kind") != ENSEMBLE_KIND:
        if "arch" in manifest:  # a plain checkpoint JSON
            model, meta = load_checkpoint(path, map_location, labels)
            return Ensemble([model], [1.0], [meta], model.labels)
        raise CheckpointError(f"not an ensemble manifest (kind != {ENSEMBLE_KIND!r})", path)
    labels = tuple(labels or manifest.get("labels") or LABELS)
    members, weights, metas = [], [], []
    for entry in manifest.get("members", []):
        ckpt = Path(entry["checkpoint"])
        if not ckpt.is_absolute():
            ckpt = path.parent / ckpt
        model, meta = load_checkpoint(ckpt, map_location, labels)
        members.append(model)
        weights.append(float(entry.get("weight", 1.0)))
        metas.append(meta)
    if not members:
        raise CheckpointError("ensemble manifest names no members", path)
    for key in ("image_size", "windows"):
        values = {json.dumps(m.get(key)) for m in metas}
        if len(values) > 1:
            raise CheckpointError(f"ensemble members disagree on {key}: {sorted(values)}", path)
    return Ensemble(members, weights, metas, labels)
