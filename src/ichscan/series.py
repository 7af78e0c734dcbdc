"""Series-level learning: pooling slices into a series (multiple-instance learning) and a series-context head.

A hospital labels series, not slices; and a reader judges a slice by its neighbours. Two tools for both:

- ``pool_logits``: a series logit from its slices' logits (``max``; ``lse``, a smooth maximum that passes
  gradient to every slice in proportion to how suspicious it is). ``mil_loss`` trains a slice model from
  series labels alone with it, and adds the slice loss where slice labels are known.
- ``SeriesHead``: a bidirectional GRU along z over slice embeddings (the backbone's pooled features) and slice
  logits, as the best RSNA-2019 solutions did. It refines each slice's logits from its neighbours and gives
  series logits; its output layers start at zero, so an untrained head is exactly ``lse`` pooling of the slice
  logits and training can only move it from there. It is trained on frozen embeddings (``fit_series_head``),
  saved inside the checkpoint (``series_head.*`` weights, ``"series_head"`` in the JSON) and used by
  ``ichscan predict`` (aggregation ``context``).

``SeriesDataset`` serves whole series (slices in z order) with series and slice targets, for training from
series labels; ``read_series_labels`` reads ``series_labels.csv``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ichscan.errors import DataError
from ichscan.labels import LABELS, loss_weights

log = logging.getLogger(__name__)

POOLINGS = ("max", "lse")
LSE_SHARPNESS = 5.0  # r of the log-mean-exp: (1/r) log mean exp(r x); r -> infinity is max, r -> 0 the mean
LABEL_LEVELS = ("slice", "series", "both")
SERIES_LABELS_CSV = "series_labels.csv"
HEAD_FORMAT = "ichscan-series-head/1"


# ------------------------------------------------------------------------------------------------ pooling


def pool_logits(logits: torch.Tensor, method: str = "lse", mask: torch.Tensor | None = None,
                sharpness: float = LSE_SHARPNESS) -> torch.Tensor:
    """Series logits (B, L) from slice logits (B, S, L) (or (S, L) -> (L,)); ``mask`` (B, S) marks real slices.

    ``lse``: (1/r) log mean_s exp(r x_s), at most the maximum and at least the maximum - log(S)/r.
    """
    squeeze = logits.dim() == 2
    if squeeze:
        logits = logits.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    if mask is None:
        mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    neg = torch.finfo(logits.dtype).min / 4
    masked = logits.masked_fill(~mask.unsqueeze(-1), neg)
    if method == "max":
        out = masked.max(dim=1).values
    elif method == "lse":
        n = mask.sum(dim=1, keepdim=True).clamp_min(1).to(logits.dtype)
        out = (torch.logsumexp(sharpness * masked, dim=1) - torch.log(n)) / sharpness
    else:
        raise ValueError(f"unknown pooling {method!r}; expected one of {', '.join(POOLINGS)}")
    return out.squeeze(0) if squeeze else out


def split_series(logits: torch.Tensor, lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded (B, S_max, L), mask (B, S_max)) from slices of B series concatenated in order."""
    lengths = [int(n) for n in lengths]
    if sum(lengths) != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} slices for series of lengths summing to {sum(lengths)}")
    parts = torch.split(logits, lengths)
    padded = nn.utils.rnn.pad_sequence(parts, batch_first=True)
    mask = torch.zeros(padded.shape[:2], dtype=torch.bool, device=logits.device)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return padded, mask


def mil_loss(logits: torch.Tensor, targets: dict[str, torch.Tensor], *, pooling: str = "lse",
             weights: Sequence[float] | None = None, slice_weight: float = 1.0) -> torch.Tensor:
    """RSNA weighted log loss on series logits pooled from slice logits, plus ``slice_weight`` times the slice
    loss on the slices whose labels are known (NaN = unknown). ``targets``: ``series`` (B, L), ``slices``
    (N, L), ``lengths`` (B,)."""
    from ichscan.train import weighted_bce_loss

    padded, mask = split_series(logits.float(), targets["lengths"].tolist())
    series_logits = pool_logits(padded, pooling, mask)
    loss = weighted_bce_loss(series_logits, targets["series"], weights)
    slices = targets["slices"]
    if slice_weight and bool((~torch.isnan(slices)).any()):
        loss = loss + slice_weight * weighted_bce_loss(logits, slices, weights)
    return loss


# ------------------------------------------------------------------------------------------- series labels


def read_series_labels(path: str | os.PathLike, labels: Sequence[str] = LABELS) -> pd.DataFrame:
    """``series_labels.csv``: one row per series, ``series_uid`` and a 0/1 column per label (``patient_id``
    and ``study_uid`` optional). One-line errors name the file and the line."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"series_uid": str, "patient_id": str, "study_uid": str})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DataError(f"cannot read series labels ({str(err).splitlines()[0]})", path) from None
    missing = [c for c in ("series_uid", *labels) if c not in frame.columns]
    if missing:
        raise DataError(f"series labels lack the columns {missing}; expected series_uid and "
                        f"{', '.join(labels)}", path)
    dup = frame["series_uid"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"line {i + 2}: series {frame['series_uid'].iloc[i]} is labelled twice", path)
    for name in labels:
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = ~values.isin((0, 1))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"line {i + 2}: {name} is {frame[name].iloc[i]!r}, not 0 or 1", path)
        frame[name] = values.astype(np.float32)
    return frame


def series_targets(frame: pd.DataFrame, series_labels: pd.DataFrame | None,
                   labels: Sequence[str] = LABELS) -> pd.DataFrame:
    """One row per series of ``frame`` (index: series_uid): its labels from ``series_labels`` where given,
    else the maximum of its slice labels (a series is positive when any slice is)."""
    labels = list(labels)
    uids = pd.Index(frame["series_uid"].astype(str).unique(), name="series_uid")
    if series_labels is not None:
        table = series_labels.set_index(series_labels["series_uid"].astype(str))[labels]
        found = table.reindex(uids)
    else:
        found = pd.DataFrame(np.nan, index=uids, columns=labels)
    have_slices = [c for c in labels if c in frame]
    if have_slices:
        from_slices = frame.groupby(frame["series_uid"].astype(str))[have_slices].max().reindex(uids)
        found = found.fillna(from_slices)
    return found.astype(np.float32)


# ---------------------------------------------------------------------------------------------- datasets


def series_order(frame: pd.DataFrame) -> list[np.ndarray]:
    """Row indices of ``frame`` per series (first-seen series order), each sorted along z (instance number
    where positions are missing)."""
    out = []
    key_z = frame["z"].to_numpy(np.float64) if "z" in frame else np.full(len(frame), np.nan)
    inst = frame["instance_number"].to_numpy(np.float64) if "instance_number" in frame else np.zeros(len(frame))
    for _, rows in frame.groupby(frame["series_uid"].astype(str), sort=False).indices.items():
        rows = np.asarray(rows)
        z = key_z[rows]
        order = np.lexsort((inst[rows], z)) if np.isfinite(z).all() else np.argsort(inst[rows], kind="stable")
        out.append(rows[order])
    return out


class SeriesDataset:
    """Whole series from a ``SliceDataset``: item i = (uint8 images (S, C, H, W) in z order, targets dict).

    Targets: ``series`` (L,) from ``targets`` (a frame indexed by series_uid, see ``series_targets``) and
    ``slices`` (S, L), NaN where unknown. Series longer than ``max_slices`` are thinned to every k-th slice.
    Use ``collate_series`` as the DataLoader's collate_fn.
    """

    def __init__(self, slices: Any, targets: pd.DataFrame, *, max_slices: int = 64):
        self.slices = slices
        self.labels = tuple(slices.labels)
        self.rows = series_order(slices.frame)
        self.series_uids = [str(slices.frame["series_uid"].iloc[r[0]]) for r in self.rows]
        missing = [u for u in self.series_uids if u not in targets.index]
        if missing:
            raise DataError(f"{len(missing)} series have no series label (first: {missing[0]})")
        self.series_y = targets.loc[self.series_uids, list(self.labels)].to_numpy(np.float32)
        unknown = np.isnan(self.series_y).any(axis=1)
        if unknown.any():
            raise DataError(f"series {self.series_uids[int(np.flatnonzero(unknown)[0])]} has no label for "
                            f"every one of {', '.join(self.labels)}")
        self.max_slices = int(max_slices)

    def __len__(self) -> int:
        return len(self.rows)

    def _rows(self, i: int) -> np.ndarray:
        rows = self.rows[i]
        if len(rows) > self.max_slices:
            step = math.ceil(len(rows) / self.max_slices)
            rows = rows[::step]
        return rows

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        rows = self._rows(i)
        images = np.stack([self.slices.image(int(r)) for r in rows])
        return images, {"series": self.series_y[i], "slices": self.slices.targets[rows]}

    def summary(self) -> dict[str, Any]:
        out = self.slices.summary()
        out["series"] = len(self)
        out["series_positives"] = {name: int(np.nansum(self.series_y[:, j])) for j, name in enumerate(self.labels)}
        return out


def collate_series(batch: Sequence[tuple[np.ndarray, dict[str, np.ndarray]]]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Series concatenated slice-wise: (images (N, C, H, W), {series (B, L), slices (N, L), lengths (B,)})."""
    images = torch.from_numpy(np.concatenate([b[0] for b in batch]))
    return images, {
        "series": torch.from_numpy(np.stack([b[1]["series"] for b in batch])),
        "slices": torch.from_numpy(np.concatenate([b[1]["slices"] for b in batch])),
        "lengths": torch.tensor([len(b[0]) for b in batch], dtype=torch.long),
    }


# ------------------------------------------------------------------------------------------ the series head


@dataclass(frozen=True)
class HeadConfig:
    """What builds a ``SeriesHead`` (kept in the checkpoint JSON under ``series_head``)."""

    in_features: int
    labels: tuple[str, ...] = LABELS
    kind: str = "gru"  # "gru" (bidirectional) or "conv" (two 1-D convolutions, kernel 5)
    hidden: int = 32
    dropout: float = 0.3
    pooling: str = "lse"

    def to_dict(self) -> dict[str, Any]:
        return {"format": HEAD_FORMAT, "in_features": self.in_features, "labels": list(self.labels),
                "kind": self.kind, "hidden": self.hidden, "dropout": self.dropout, "pooling": self.pooling}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadConfig:
        if not isinstance(d, dict) or d.get("format") != HEAD_FORMAT:
            raise ValueError(f"not a series head record (format {d.get('format') if isinstance(d, dict) else d!r})")
        kind, pooling = d.get("kind"), d.get("pooling", "lse")
        if kind not in ("gru", "conv"):
            raise ValueError(f"series head kind {kind!r}: expected gru or conv")
        if pooling not in POOLINGS:
            raise ValueError(f"series head pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        return cls(int(d["in_features"]), tuple(d["labels"]), kind, int(d["hidden"]), float(d["dropout"]), pooling)


class SeriesHead(nn.Module):
    """Slice embeddings (B, S, D) and slice logits (B, S, L) along z -> (slice logits, series logits).

    The embeddings are normalised and projected to ``hidden`` features, joined to the slice logits and read
    along z by a bidirectional GRU (or 1-D convolutions). Two zero-initialised linear maps turn its output
    into corrections: one per slice (added to the slice logits), one for the series (added to the ``pooling``
    of the refined slice logits, from the GRU output max-pooled over z).
    """

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        h, n = config.hidden, len(config.labels)
        self.proj = nn.Sequential(nn.LayerNorm(config.in_features), nn.Dropout(config.dropout),
                                  nn.Linear(config.in_features, h), nn.GELU())
        if config.kind == "gru":
            self.seq = nn.GRU(h + n, h, batch_first=True, bidirectional=True)
        else:
            self.seq = nn.Sequential(nn.Conv1d(h + n, 2 * h, 5, padding=2), nn.GELU(),
                                     nn.Conv1d(2 * h, 2 * h, 5, padding=2), nn.GELU())
        self.slice_out = nn.Linear(2 * h, n)
        self.series_out = nn.Linear(2 * h, n)
        for layer in (self.slice_out, self.series_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, emb: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if emb.dim() == 2:  # one series
            s, ser = self.forward(emb.unsqueeze(0), logits.unsqueeze(0), None if mask is None else mask.unsqueeze(0))
            return s.squeeze(0), ser.squeeze(0)
        if mask is None:
            mask = torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)
        x = torch.cat([self.proj(emb.float()), logits.float()], dim=-1)
        if self.config.kind == "gru":
            lengths = mask.sum(dim=1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.seq(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        else:
            out = self.seq((x * mask.unsqueeze(-1)).transpose(1, 2)).transpose(1, 2)
        slice_logits = logits.float() + self.slice_out(out)
        pooled = out.masked_fill(~mask.unsqueeze(-1), torch.finfo(out.dtype).min / 4).max(dim=1).values
        series_logits = pool_logits(slice_logits, self.config.pooling, mask) + self.series_out(pooled)
        return slice_logits, series_logits


@dataclass
class SeriesFeatures:
    """Per series: slice embeddings (S, D), slice logits (S, L), slice targets (S, L; NaN unknown), the
    series target (L,), and which rows of the slice table the slices are."""

    series_uid: str
    emb: np.ndarray
    logits: np.ndarray
    slice_y: np.ndarray
    series_y: np.ndarray
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@torch.no_grad()
def slice_features(model: nn.Module, dataset: Any, *, device: torch.device | str = "cpu", batch_size: int = 64,
                   augment: Any = None, generator: torch.Generator | None = None,
                   progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, L), embeddings (N, D)) of every image of a ``SliceDataset``, in order; with ``augment``
    (an AugmentConfig) each image is augmented first (training a head on features the model has not
    memorised as they are)."""
    from ichscan.augment import augment_batch

    device = torch.device(device)
    was = model.training
    model.eval()
    logits_out, emb_out = [], []
    n = len(dataset)
    for start in range(0, n, batch_size):
        x = torch.from_numpy(np.stack([dataset.image(i) for i in range(start, min(n, start + batch_size))]))
        x = x.to(device)
        if augment is not None:
            x = augment_batch(x, augment, generator or torch.Generator().manual_seed(0))
        logits, emb = model.forward_with_embedding(x)
        logits_out.append(logits.float().cpu().numpy())
        emb_out.append(emb.float().cpu().numpy())
        if progress:
            progress(min(n, start + batch_size), n)
    model.train(was)
    return np.concatenate(logits_out), np.concatenate(emb_out)


def gather_series(frame: pd.DataFrame, logits: np.ndarray, emb: np.ndarray, targets: pd.DataFrame | None,
                  labels: Sequence[str] = LABELS) -> list[SeriesFeatures]:
    """Slice features grouped into series (z order), with their targets (NaN where unknown)."""
    labels = list(labels)
    slice_y = np.stack([frame[c].to_numpy(np.float32) if c in frame else np.full(len(frame), np.nan, np.float32)
                        for c in labels], axis=1)
    out = []
    for rows in series_order(frame.reset_index(drop=True)):
        uid = str(frame["series_uid"].iloc[rows[0]])
        y = (targets.loc[uid, labels].to_numpy(np.float32) if targets is not None and uid in targets.index
             else np.full(len(labels), np.nan, np.float32))
        out.append(SeriesFeatures(uid, emb[rows], logits[rows], slice_y[rows], y, rows))
    return out


def _pad(items: Sequence[SeriesFeatures]) -> tuple[torch.Tensor, ...]:
    emb = nn.utils.rnn.pad_sequence([torch.from_numpy(s.emb) for s in items], batch_first=True)
    logits = nn.utils.rnn.pad_sequence([torch.from_numpy(s.logits) for s in items], batch_first=True)
    slice_y = nn.utils.rnn.pad_sequence([torch.from_numpy(s.slice_y) for s in items], batch_first=True,
                                        padding_value=float("nan"))
    mask = torch.zeros(emb.shape[:2], dtype=torch.bool)
    for i, s in enumerate(items):
        mask[i, :len(s.emb)] = True
    series_y = torch.from_numpy(np.stack([s.series_y for s in items]))
    return emb, logits, mask, slice_y, series_y


@dataclass(frozen=True)
class HeadRecipe:
    """How ``fit_series_head`` trains: AdamW on frozen features, whole-series batches, at most ``epochs``
    epochs, as many as an inner split of its own training series says."""

    epochs: int = 40
    batch_series: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-2
    slice_weight: float = 0.5  # the slice loss, where slice labels are known, beside the series loss
    seed: int = 0
    inner_fraction: float = 0.2  # series held out to choose the number of epochs (0: train ``epochs``)


def _head_epochs(head: SeriesHead, train: Sequence[SeriesFeatures], recipe: HeadRecipe, epochs: int,
                 val: Sequence[SeriesFeatures] = (), report: Callable[[str], None] | None = None) -> list[float]:
    """Train ``head`` for ``epochs``; returns the series loss on ``val`` after each epoch (empty without)."""
    from ichscan.train import weighted_bce_loss

    weights = loss_weights(tuple(head.config.labels))
    opt = torch.optim.AdamW(head.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    gen = np.random.default_rng(recipe.seed)
    val_losses = []
    for epoch in range(epochs):
        head.train()
        order = gen.permutation(len(train))
        total = 0.0
        for start in range(0, len(order), recipe.batch_series):
            items = [train[i] for i in order[start:start + recipe.batch_series]]
            emb, logits, mask, slice_y, series_y = _pad(items)
            slice_logits, series_logits = head(emb, logits, mask)
            loss = weighted_bce_loss(series_logits, series_y, weights)
            known = ~torch.isnan(slice_y) & mask.unsqueeze(-1)
            if recipe.slice_weight and bool(known.any()):
                loss = loss + recipe.slice_weight * weighted_bce_loss(slice_logits[mask], slice_y[mask], weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(items)
        if val:
            head.eval()
            with torch.no_grad():
                emb, logits, mask, _, series_y = _pad(val)
                val_losses.append(float(weighted_bce_loss(head(emb, logits, mask)[1], series_y, weights)))
        if report and (epoch + 1) % 10 == 0:
            report(f"series head epoch {epoch + 1}/{epochs}: loss {total / len(train):.4f}"
                   + (f", inner validation {val_losses[-1]:.4f}" if val else ""))
    head.eval()
    return val_losses


def fit_series_head(train: Sequence[SeriesFeatures], config: HeadConfig, recipe: HeadRecipe = HeadRecipe(),
                    report: Callable[[str], None] | None = None) -> SeriesHead:
    """Train a ``SeriesHead`` on series features (labels as in ``config.labels``) with the RSNA weighted log
    loss on series logits, plus the slice loss where slice labels are known. CPU, seconds.

    How long: ``recipe.inner_fraction`` of the series (all copies of a series together) is held out, the head
    trained on the rest for up to ``recipe.epochs`` epochs, and the epoch with the lowest held-out series loss
    taken (0: the untrained head, lse pooling, when nothing beats it); then a fresh head is trained on every
    series for that many epochs. A head never trains longer than its own held-out series say it should.
    """
    if not train:
        raise DataError("no series to train a series head on")
    epochs = recipe.epochs
    uids = sorted({s.series_uid for s in train})
    if recipe.inner_fraction > 0 and len(uids) >= 10:
        rng = np.random.default_rng(recipe.seed + 1)
        held = set(rng.choice(uids, size=max(2, round(recipe.inner_fraction * len(uids))), replace=False))
        inner_train = [s for s in train if s.series_uid not in held]
        # the held-out series once each, as they are (the first copy is the plain pass)
        seen: set[str] = set()
        inner_val = [s for s in train if s.series_uid in held and not (s.series_uid in seen or seen.add(s.series_uid))]
        torch.manual_seed(recipe.seed)
        probe = SeriesHead(config)
        with torch.no_grad():
            emb, logits, mask, _, series_y = _pad(inner_val)
            from ichscan.train import weighted_bce_loss

            start_loss = float(weighted_bce_loss(probe.eval()(emb, logits, mask)[1], series_y,
                                                 loss_weights(tuple(config.labels))))
        losses = _head_epochs(probe, inner_train, recipe, recipe.epochs, inner_val)
        best = int(np.argmin(losses))
        epochs = best + 1 if losses[best] < start_loss else 0
        if report:
            report(f"series head: {epochs} epochs (held-out series loss {start_loss:.4f} untrained, "
                   f"{min(losses):.4f} best, {losses[-1]:.4f} after {recipe.epochs})")
    torch.manual_seed(recipe.seed)
    head = SeriesHead(config)
    _head_epochs(head, train, recipe, epochs, report=report)
    head.eval()
    return head


@torch.no_grad()
def apply_series_head(head: SeriesHead, items: Sequence[SeriesFeatures]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per series: (refined slice probabilities (S, L), series probabilities (L,))."""
    head.eval()
    out = []
    for s in items:
        slice_logits, series_logits = head(torch.from_numpy(s.emb), torch.from_numpy(s.logits))
        out.append((torch.sigmoid(slice_logits).double().numpy(), torch.sigmoid(series_logits).double().numpy()))
    return out


def train_series_head(model: nn.Module, slices: Any, targets: pd.DataFrame, *, kind: str = "gru", hidden: int = 32,
                      recipe: HeadRecipe = HeadRecipe(), augment: Any = None, augmented_passes: int = 1,
                      pooling: str = "lse", batch_size: int = 32,
                      say: Callable[[str], None] | None = None) -> nn.Module:
    """Fit a series head on ``model``'s features of the slices of ``slices`` (a ``data.SliceDataset``; series
    labels in ``targets``) and attach it to ``model`` (its backbone frozen, unchanged). One plain pass over the
    slices, and ``augmented_passes`` more with ``augment`` (an AugmentConfig), so the head also reads features
    of images the backbone has not memorised as they are."""
    logits, emb = slice_features(model, slices, batch_size=batch_size)
    items = gather_series(slices.frame, logits, emb, targets, model.trained_labels)
    train = list(items)
    if augment is not None:
        gen = torch.Generator().manual_seed(recipe.seed * 7919 + 17)
        for _ in range(augmented_passes):
            a_logits, a_emb = slice_features(model, slices, batch_size=batch_size, augment=augment, generator=gen)
            train += gather_series(slices.frame, a_logits, a_emb, targets, model.trained_labels)
    config = HeadConfig(in_features=emb.shape[1], labels=tuple(model.trained_labels), kind=kind, hidden=hidden,
                        pooling=pooling)
    head = fit_series_head(train, config, recipe, report=say)
    model.series_head = head.to(model.mean.device)
    return model


# ------------------------------------------------------------------------------------------- loading data


def load_series_data(root: str | os.PathLike, *, level: str = "both", labels_csv: str | os.PathLike | None = None,
                     series_csv: str | os.PathLike | None = None, index_cache: str | os.PathLike | None = None,
                     workers: int | None = None, progress: Callable[[int, int], None] | None = None,
                     labels: Sequence[str] = LABELS) -> tuple[Any, pd.DataFrame]:
    """(``data.LabelledData``, series targets indexed by series_uid) for a folder with slice labels
    (``labels.csv``), series labels (``series_labels.csv``) or both.

    ``level``: ``slice`` needs slice labels; ``series`` withholds slice labels (NaN) and trains from series
    labels alone (from ``series_labels.csv``, else the maximum of each series' slice labels); ``both`` keeps
    what there is. Series named in ``series_labels.csv`` whose slices have no slice labels are kept, unlabelled
    slice-wise, outside ``slice`` level.
    """
    from ichscan.data import LabelledData, LabelReport, build_index, find_images_dir, find_labels_csv, \
        join_labels, read_labels

    if level not in LABEL_LEVELS:
        raise DataError(f"label level {level!r}: expected one of {', '.join(LABEL_LEVELS)}")
    root = Path(root)
    labels = list(labels)
    series_path = Path(series_csv) if series_csv else root / SERIES_LABELS_CSV
    if series_csv and not series_path.is_file():
        raise DataError("series label CSV not found", series_path)
    series_labels = read_series_labels(series_path, labels) if series_path.is_file() else None
    try:
        csv = Path(labels_csv) if labels_csv else find_labels_csv(root)
    except DataError:
        csv = None
    if csv is None and series_labels is None:
        raise DataError(f"no labels.csv, stage_2_train.csv or {SERIES_LABELS_CSV} in this folder", root)
    if level == "slice" and csv is None:
        raise DataError(f"slice-level training needs slice labels (labels.csv); this folder has only "
                        f"{SERIES_LABELS_CSV}: use --label-level series", root)
    index, index_report = build_index(find_images_dir(root), index_cache or root / "ichscan_index.parquet",
                                      workers=workers, progress=progress)
    index = index[~index["image_id"].duplicated(keep="first")]
    if csv is not None:
        label_frame, label_report = read_labels(csv, labels)
        frame, missing = join_labels(index, label_frame, labels)
    else:
        label_report = LabelReport(str(series_path), rows=len(series_labels))
        frame, missing = index.iloc[0:0].copy(), []
        for name in labels:
            frame[name] = np.float32(np.nan)
    if series_labels is not None and level != "slice":
        known = set(series_labels["series_uid"].astype(str))
        extra = index[index["series_uid"].astype(str).isin(known) & ~index["image_id"].isin(frame["image_id"])]
        if len(extra):
            extra = extra.copy()
            for name in labels:
                extra[name] = np.float32(np.nan)
            frame = pd.concat([frame, extra], ignore_index=True)
        absent = sorted(known - set(index["series_uid"].astype(str)))
        missing = list(missing) + [f"series {uid}" for uid in absent]
    targets = series_targets(frame, series_labels if level != "slice" else None, labels)
    unlabelled = targets.index[targets.isna().any(axis=1)]
    if len(unlabelled) and level != "slice":
        log.warning("%d series have no series label and no slice labels; left out", len(unlabelled))
        frame = frame[~frame["series_uid"].astype(str).isin(set(unlabelled))].reset_index(drop=True)
        targets = targets.drop(unlabelled)
    if level == "series":
        frame = frame.copy()
        for name in labels:
            frame[name] = np.float32(np.nan)  # withheld: the model learns from series labels alone
    return LabelledData(frame.reset_index(drop=True), label_report, index_report, missing), targets
