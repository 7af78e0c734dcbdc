"""Training data: RSNA labels, a header index built once, patient-grouped folds, a dataset, a uint8 cache.

- ``read_labels(csv)``: RSNA ``stage_2_train.csv`` (``ID_<image>_<label>,Label``) -> one row per image, the
  six labels as columns in ichscan's order (by name), duplicate rows dropped, conflicting ones reported.
- ``build_index(files, cache)``: patient / study / series / SOP / z / instance number from DICOM headers, in
  a process pool, in shards kept on disk (an interrupted run resumes), cached as Parquet. Files that cannot
  be read are reported with the reason, and indexing goes on.
- ``assign_folds``: grouped by patient (no patient in two folds), stratified on ``any``.
- ``SliceDataset``: index rows -> (uint8 (C, size, size) windows, float32 targets, NaN = unknown), read from
  DICOM through ``ichscan.windows.load_windows`` or from an ``ImageCache`` built by ``build_cache``
  (``ichscan cache``): one uint8 memmap at the training size with a per-image status array, resumable.

Numpy and pandas only: datasets return numpy arrays (the DataLoader's collate turns them into tensors), so
worker processes that index or cache never import torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichscan.dicom import SkippedFile
from ichscan.errors import DataError, IchscanError
from ichscan.fileio import escape_undecodable, write_json, write_npy, write_parquet
from ichscan.geometry import position_along
from ichscan.hardware import cpu_count
from ichscan.labels import LABELS
from ichscan.windows import PAPER_WINDOWS

log = logging.getLogger(__name__)

INDEX_COLUMNS: tuple[str, ...] = (
    "image_id", "path", "patient_id", "study_uid", "series_uid", "sop_uid", "z", "instance_number",
)
Progress = Callable[[int, int], None]  # (done, total)


# ------------------------------------------------------------------------------------------------- labels


@dataclass
class LabelReport:
    """What reading a label CSV found."""

    path: str
    rows: int = 0
    images: int = 0
    duplicate_rows: int = 0  # exact repeats, dropped
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (image_id, label) given both 0 and 1
    malformed: list[str] = field(default_factory=list)  # IDs of the rows skipped
    # why each was skipped, with its line in the file (the header is line 1)
    malformed_reasons: list[str] = field(default_factory=list)
    incomplete: int = 0  # images missing one or more of the labels (NaN)

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.rows} rows, {self.images} images"]
        if self.duplicate_rows:
            out.append(f"{self.duplicate_rows} duplicate rows dropped")
        if self.conflicts:
            shown = ", ".join(f"{i}_{lab}" for i, lab in self.conflicts[:5])
            out.append(f"{len(self.conflicts)} labels given both 0 and 1 (kept as positive): {shown}"
                       + (" ..." if len(self.conflicts) > 5 else ""))
        if self.malformed:
            out.append(f"{len(self.malformed)} rows skipped, e.g. {self.malformed_reasons[0]}")
        if self.incomplete:
            out.append(f"{self.incomplete} images lack some labels (left unknown)")
        return out


def read_labels(path: str | os.PathLike, labels: Sequence[str] = LABELS) -> tuple[pd.DataFrame, LabelReport]:
    """RSNA label CSV -> (DataFrame ``image_id`` + one float32 column per label, report).

    Exact duplicate rows are dropped; a label given both 0 and 1 for one image is reported and kept as 1
    (a missed bleed costs more than a false alarm in training data review).
    """
    path = Path(path)
    try:
        raw = pd.read_csv(path, dtype={"ID": str}, usecols=["ID", "Label"])
    except FileNotFoundError:
        raise DataError("label CSV not found", path) from None
    except (ValueError, pd.errors.ParserError) as err:
        raise DataError(f"not an RSNA label CSV with columns ID,Label ({err})", path) from err
    report = LabelReport(str(path), rows=len(raw))
    parts = raw["ID"].astype(str).str.rpartition("_")
    frame = pd.DataFrame({"image_id": parts[0], "label": parts[2], "value": pd.to_numeric(raw["Label"],
                                                                                          errors="coerce")})
    bad_id = (frame["image_id"] == "") | ~frame["label"].isin(labels)
    bad_value = ~bad_id & (frame["value"].isna() | ~frame["value"].isin([0, 1]))
    bad = bad_id | bad_value
    if bad.any():
        report.malformed = raw.loc[bad, "ID"].astype(str).tolist()
        for i in np.flatnonzero(bad.to_numpy()):
            rid, value = raw["ID"].iloc[i], raw["Label"].iloc[i]
            why = (f"ID {rid!r} is not ID_<image>_<label> with a label of {', '.join(labels)}" if bad_id.iloc[i]
                   else f"label value {value!r} of {rid} is not 0 or 1")
            report.malformed_reasons.append(f"line {i + 2}: {why}")
        frame = frame[~bad]
    dup = frame.duplicated()
    report.duplicate_rows = int(dup.sum())
    frame = frame[~dup]
    counts = frame.groupby(["image_id", "label"], sort=False).size()
    conflicted = counts[counts > 1]
    report.conflicts = [tuple(k) for k in conflicted.index.tolist()]
    frame = frame.sort_values("value").drop_duplicates(["image_id", "label"], keep="last")
    wide = frame.pivot(index="image_id", columns="label", values="value")
    wide = wide.reindex(columns=list(labels)).astype(np.float32)
    wide = wide.sort_index().reset_index()
    wide.columns.name = None
    report.images = len(wide)
    report.incomplete = int(wide[list(labels)].isna().any(axis=1).sum())
    return wide, report


# -------------------------------------------------------------------------------------------------- index


@dataclass
class IndexReport:
    """What indexing found: files looked at, rows indexed, and the files left out with the reason."""

    files: int = 0
    indexed: int = 0
    problems: list[SkippedFile] = field(default_factory=list)  # files left out of the index, and why
    reused_shards: int = 0
    cache: str | None = None

    def lines(self) -> list[str]:
        out = [f"indexed {self.indexed} of {self.files} files"
               + (f" ({self.reused_shards} shards reused)" if self.reused_shards else "")]
        out += [f"skipped {s.path}: {s.reason}" for s in self.problems]
        return out


def list_dicom_files(root: str | os.PathLike) -> list[Path]:
    """DICOM files under ``root`` (``*.dcm``, or every file when there is none), sorted; a file is itself."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError("no such folder", root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm")
    if not files:
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return files


def header_row(path: str) -> dict[str, Any]:
    """One index row from a file's headers (raises IchscanError for files that cannot be used)."""
    from ichscan.dicom import read_slice

    s = read_slice(path, pixels=False)
    z = math.nan if s.position is None else position_along(s.position, s.normal)
    return {
        "image_id": s.image_id, "path": str(path), "patient_id": s.patient_id, "study_uid": s.study_uid,
        "series_uid": s.series_uid, "sop_uid": s.sop_uid, "z": z,
        "instance_number": -1 if s.instance_number is None else int(s.instance_number),
    }


def _index_shard(paths: list[str]) -> pd.DataFrame:
    """Rows for ``paths``; an ``error`` column holds the reason a file was left out (None when indexed)."""
    rows = []
    for p in paths:
        if escape_undecodable(p) != p:  # Parquet holds UTF-8 only, and a training run must reopen the file
            rows.append({"path": escape_undecodable(p), "error": "file name is not valid UTF-8; rename the file "
                                                               "to use it for training"})
            continue
        try:
            row = header_row(p)
            row["error"] = None
        except IchscanError as err:
            row = {"path": p, "error": err.reason}
        except Exception as err:  # noqa: BLE001 - one bad file must not stop a 750,000-file index
            row = {"path": p, "error": f"unreadable ({type(err).__name__}: {err})"}
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[*INDEX_COLUMNS, "error"])
    frame["z"] = frame["z"].astype(np.float64)
    frame["instance_number"] = frame["instance_number"].fillna(-1).astype(np.int64)
    for col in ("image_id", "patient_id", "study_uid", "series_uid", "sop_uid", "error"):
        frame[col] = frame[col].astype(object)
    return frame


def _pool(workers: int) -> ProcessPoolExecutor:
    import multiprocessing as mp

    # forkserver: never fork a parent that may hold torch/OpenMP threads.
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("forkserver"))


def build_index(
    files: str | os.PathLike | Iterable[str | os.PathLike],
    cache: str | os.PathLike | None = None,
    *,
    workers: int | None = None,
    shard_size: int = 2000,
    progress: Progress | None = None,
    refresh: bool = False,
    patient_ids: Callable[[str | None], str | None] | None = None,
) -> tuple[pd.DataFrame, IndexReport]:
    """Header index of ``files`` (a folder, or paths): (DataFrame with INDEX_COLUMNS, report).

    ``patient_id`` holds what ``patient_ids`` makes of each PatientID: by default a pseudonymous key
    (``ichscan.privacy``), which groups a patient's images for patient-level folds as well as the ID does.

    With ``cache`` (a .parquet path) a finished index is loaded instead of rebuilt (``refresh`` rebuilds),
    and shards are kept in ``<cache>.parts/`` while building, so an interrupted run resumes where it stopped.
    Unusable files are reported (``report.problems``) and stored with their reason in the cache.
    """
    from ichscan.privacy import PREFIX, Pseudonymizer

    pseudo = patient_ids or Pseudonymizer()

    def pseudonymous(frame: pd.DataFrame) -> pd.DataFrame:
        # idempotent: an index written by an older ichscan, with PatientIDs, reads back pseudonymous too
        ids = frame["patient_id"]
        done_already = ids.isna() | ids.astype(str).str.startswith(PREFIX)
        if getattr(pseudo, "keep", False) or done_already.all():
            return frame
        frame = frame.copy()
        frame["patient_id"] = [v if d else pseudo(v) for v, d in zip(ids, done_already)]
        return frame

    cache_path = Path(cache) if cache is not None else None
    if cache_path is not None and cache_path.is_file() and not refresh:
        full = pseudonymous(pd.read_parquet(cache_path))
        return _split_index(full, IndexReport(cache=str(cache_path)))
    if isinstance(files, (str, os.PathLike)):
        paths = [str(p) for p in list_dicom_files(files)]
    else:
        paths = sorted(str(p) for p in files)
    report = IndexReport(files=len(paths), cache=None if cache_path is None else str(cache_path))
    shards = [paths[i : i + shard_size] for i in range(0, len(paths), shard_size)]
    parts_dir = cache_path.with_name(cache_path.name + ".parts") if cache_path is not None else None
    results: dict[int, pd.DataFrame] = {}
    todo: list[int] = []
    for k, shard in enumerate(shards):
        part = parts_dir / f"shard-{k:06d}.parquet" if parts_dir else None
        if part is not None and part.is_file() and not refresh:
            try:
                done = pseudonymous(pd.read_parquet(part))
                if done["path"].tolist() == shard:
                    results[k] = done
                    report.reused_shards += 1
                    continue
            except Exception:  # noqa: BLE001 - a damaged shard is simply redone
                pass
        todo.append(k)
    done_files = sum(len(shards[k]) for k in results)
    if progress:
        progress(done_files, len(paths))

    def finish(k: int, frame: pd.DataFrame) -> None:
        nonlocal done_files
        frame = pseudonymous(frame)
        results[k] = frame
        if parts_dir is not None:
            write_parquet(parts_dir / f"shard-{k:06d}.parquet", frame)
        done_files += len(shards[k])
        if progress:
            progress(done_files, len(paths))

    workers = cpu_count() if workers is None else max(1, workers)
    if workers == 1 or len(todo) <= 1:
        for k in todo:
            finish(k, _index_shard(shards[k]))
    else:
        with _pool(workers) as pool:
            futures = {pool.submit(_index_shard, shards[k]): k for k in todo}
            for fut in as_completed(futures):
                finish(futures[fut], fut.result())
    frames = [results[k] for k in range(len(shards))]
    full = pd.concat(frames, ignore_index=True) if frames else _index_shard([])
    if cache_path is not None:
        write_parquet(cache_path, full)
        if parts_dir is not None and parts_dir.is_dir():
            for part in parts_dir.glob("shard-*.parquet"):
                part.unlink()
            try:
                parts_dir.rmdir()
            except OSError:
                pass
    return _split_index(full, report)


_TEXT_COLUMNS = ("image_id", "path", "patient_id", "study_uid", "series_uid", "sop_uid", "error")


def _split_index(full: pd.DataFrame, report: IndexReport) -> tuple[pd.DataFrame, IndexReport]:
    full = full.copy()
    for col in _TEXT_COLUMNS:  # the same dtypes whether built now or read back from Parquet
        full[col] = full[col].astype(object).where(full[col].notna(), None)
    bad = full["error"].notna()
    report.problems = [SkippedFile(path, reason) for path, reason in
                       zip(full.loc[bad, "path"].astype(str), full.loc[bad, "error"].astype(str))]
    index = full.loc[~bad, list(INDEX_COLUMNS)].reset_index(drop=True)
    report.files = report.files or len(full)
    report.indexed = len(index)
    return index, report


def join_labels(index: pd.DataFrame, labels: pd.DataFrame,
                label_names: Sequence[str] = LABELS) -> tuple[pd.DataFrame, list[str]]:
    """Index rows with their labels: (labelled rows, image IDs that have labels but no usable file).

    Indexed images without labels are left out (they cannot be trained on); the IDs returned are the
    missing or unreadable files (RSNA's ID_6431af929 is one).
    """
    dup = index["image_id"].duplicated(keep="first")
    if dup.any():
        log.warning("%d files share an image ID with another file; keeping the first", int(dup.sum()))
        index = index[~dup]
    merged = index.merge(labels[["image_id", *label_names]], on="image_id", how="inner", validate="one_to_one")
    missing = sorted(set(labels["image_id"]) - set(index["image_id"]))
    return merged.reset_index(drop=True), missing


# -------------------------------------------------------------------------------------------------- folds


def assign_folds(frame: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold number per row: grouped by patient (study when the patient ID is empty), stratified on ``any``."""
    from sklearn.model_selection import StratifiedGroupKFold

    if len(frame) == 0:
        raise DataError("cannot make folds of an empty index")
    groups = frame["patient_id"].astype(str).where(frame["patient_id"].astype(str) != "", frame["study_uid"])
    n_groups = groups.nunique()
    if n_groups < n_folds:
        raise DataError(f"{n_groups} patients cannot fill {n_folds} folds; use fewer folds or more data")
    y = frame["any"].fillna(0).astype(int).to_numpy() if "any" in frame else np.zeros(len(frame), int)
    if len(np.unique(y)) < 2:
        y = np.zeros(len(frame), int)  # nothing to stratify on
    folds = np.full(len(frame), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    import warnings

    with warnings.catch_warnings():  # small sets: "least populated class has only n members" is expected
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(frame)), y, groups.to_numpy())):
            folds[val_idx] = k
    return folds


# ---------------------------------------------------------------------------------------------- the cache


CACHE_FORMAT = "ichscan-cache/1"
TODO, DONE, FAILED = 0, 1, 2


def _window_labels(windows: Sequence[Any]) -> list[str]:
    """Window records -> their labels (``brain``, ``brain:cavity``) for messages."""
    from ichscan.windows import get_windows

    return [w.label for w in get_windows(windows)]


def _window_dicts(windows: Sequence[Any]) -> list[dict[str, Any]]:
    from ichscan.windows import get_windows

    return [w.to_dict() for w in get_windows(windows)]


class ImageCache:
    """Windowed uint8 images at one size, in a memmap: ``images.u8`` (N, C, S, S), ``status.npy`` (N,),
    ``ids.parquet`` (image_id, path), ``meta.json`` (format, size, windows, shape), ``failures.json``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise DataError("not an ichscan image cache (no meta.json); build one with `ichscan cache`", self.root)
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != CACHE_FORMAT:
            raise DataError(f"cache format {self.meta.get('format')!r} is not {CACHE_FORMAT}", self.root)
        self.size = int(self.meta["size"])
        self.windows = self.meta["windows"]
        self.shape = tuple(self.meta["shape"])
        ids = pd.read_parquet(self.root / "ids.parquet")
        self.image_ids = ids["image_id"].astype(str).tolist()
        self.paths = ids["path"].astype(str).tolist()
        self.row_of = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self._images: np.memmap | None = None

    @property
    def status(self) -> np.ndarray:
        return np.load(self.root / "status.npy")

    def images(self) -> np.memmap:
        if self._images is None:  # opened lazily, so each DataLoader worker maps the file itself
            self._images = np.memmap(self.root / "images.u8", dtype=np.uint8, mode="r", shape=self.shape)
        return self._images

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    def get(self, image_id: str) -> np.ndarray:
        return np.asarray(self.images()[self.row_of[image_id]])

    def matches(self, size: int, windows: Sequence[Any]) -> bool:
        return self.size == int(size) and self.windows == _window_dicts(windows)


@dataclass
class CacheReport:
    root: str
    total: int = 0
    done: int = 0
    written: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # image_id -> reason

    def lines(self) -> list[str]:
        out = [f"{self.root}: {self.done} of {self.total} images cached ({self.written} written this run)"]
        out += [f"failed {k}: {v}" for k, v in self.failures.items()]
        return out


def _cache_chunk(root: str, shape: tuple[int, ...], rows: list[int], paths: list[str], size: int,
                 windows: list[dict[str, Any]]) -> tuple[list[int], dict[int, str]]:
    from ichscan.windows import load_windows

    images = np.memmap(Path(root) / "images.u8", dtype=np.uint8, mode="r+", shape=shape)
    ok, failed = [], {}
    for row, path in zip(rows, paths):
        try:
            images[row] = load_windows(path, windows, size)
            ok.append(row)
        except IchscanError as err:
            failed[row] = err.reason
        except Exception as err:  # noqa: BLE001 - report and go on
            failed[row] = f"unreadable ({type(err).__name__}: {err})"
    images.flush()
    del images
    return ok, failed


def build_cache(
    frame: pd.DataFrame,
    root: str | os.PathLike,
    size: int,
    windows: Sequence[Any] = PAPER_WINDOWS,
    *,
    workers: int | None = None,
    chunk: int = 256,
    progress: Progress | None = None,
) -> CacheReport:
    """Window and resize every row of ``frame`` (image_id, path) into ``root``; resumes an unfinished cache.

    The status array is written atomically after each chunk, so an interrupted run redoes at most the
    chunks in flight. A cache built for another size, windows or image list is refused, not overwritten.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wins = _window_dicts(windows)
    ids = frame[["image_id", "path"]].astype(str).reset_index(drop=True)
    if ids["image_id"].duplicated().any():
        raise DataError("image IDs repeat in the index; one cache row per image", root)
    shape = (len(ids), len(wins), int(size), int(size))
    meta = {"format": CACHE_FORMAT, "size": int(size), "windows": wins, "shape": list(shape), "dtype": "uint8"}
    meta_path = root / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        old_ids = pd.read_parquet(root / "ids.parquet") if (root / "ids.parquet").is_file() else None
        if old != meta or old_ids is None or old_ids["image_id"].tolist() != ids["image_id"].tolist():
            raise DataError("this folder holds a cache for another size, windows or image list; "
                            "choose another folder or delete it", root)
        status = np.load(root / "status.npy")
    else:
        # Data files first, meta.json last: a folder with meta.json is always a complete layout.
        with open(root / "images.u8", "wb") as fh:
            fh.truncate(int(np.prod(shape)))
        write_parquet(root / "ids.parquet", ids)
        status = np.zeros(len(ids), dtype=np.uint8)
        write_npy(root / "status.npy", status)
        write_json(meta_path, meta)
    failures_path = root / "failures.json"
    failures: dict[str, str] = json.loads(failures_path.read_text()) if failures_path.is_file() else {}
    report = CacheReport(str(root), total=len(ids))
    todo = np.flatnonzero(status != DONE).tolist()
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    done = int((status == DONE).sum())
    if progress:
        progress(done, len(ids))
    paths = ids["path"].tolist()
    image_ids = ids["image_id"].tolist()

    def finish(ok: list[int], failed: dict[int, str]) -> None:
        nonlocal done
        status[ok] = DONE
        for row, reason in failed.items():
            status[row] = FAILED
            failures[image_ids[row]] = reason
        for row in ok:
            failures.pop(image_ids[row], None)
        write_npy(root / "status.npy", status)
        done += len(ok)
        report.written += len(ok)
        if progress:
            progress(done, len(ids))

    workers = cpu_count() if workers is None else max(1, workers)
    args = lambda rows: (str(root), shape, rows, [paths[r] for r in rows], int(size), wins)  # noqa: E731
    try:
        if workers == 1 or len(chunks) <= 1:
            for rows in chunks:
                finish(*_cache_chunk(*args(rows)))
        else:
            with _pool(workers) as pool:
                futures = [pool.submit(_cache_chunk, *args(rows)) for rows in chunks]
                for fut in as_completed(futures):
                    finish(*fut.result())
    finally:
        write_json(failures_path, failures)
    report.done = done
    report.failures = dict(failures)
    return report


# ------------------------------------------------------------------------------------------------ dataset


class SliceDataset:
    """Index rows -> (uint8 windows (C, size, size), float32 targets in ``labels`` order; NaN = unknown).

    A map-style dataset for ``torch.utils.data.DataLoader``. With ``cache`` (an ImageCache or its folder,
    built at the same size and windows), images come from the cache where it has them and from DICOM
    otherwise. ``labels`` names the target columns; ``image_ids`` and ``frame`` say which rows these are.
    """

    def __init__(self, frame: pd.DataFrame, size: int = 512, windows: Sequence[Any] = PAPER_WINDOWS,
                 labels: Sequence[str] = LABELS, cache: ImageCache | str | os.PathLike | None = None):
        self.frame = frame.reset_index(drop=True)
        self.size = int(size)
        self.windows = _window_dicts(windows)
        self.labels = tuple(labels)
        self.paths = self.frame["path"].astype(str).tolist()
        self.image_ids = self.frame["image_id"].astype(str).tolist()
        cols = [self.frame[name].to_numpy(np.float32) if name in self.frame else
                np.full(len(self.frame), np.nan, np.float32) for name in self.labels]
        self.targets = np.stack(cols, axis=1) if cols else np.zeros((len(self.frame), 0), np.float32)
        self.cache: ImageCache | None = None
        self.cache_rows = np.full(len(self.frame), -1, dtype=np.int64)
        if cache is not None:
            self.cache = cache if isinstance(cache, ImageCache) else ImageCache(cache)
            if not self.cache.matches(self.size, self.windows):
                raise DataError(f"cache is {self.cache.size} px with windows "
                                f"{_window_labels(self.cache.windows)}; this dataset needs {self.size} px "
                                f"with {_window_labels(self.windows)}", self.cache.root)
            status = self.cache.status
            for i, image_id in enumerate(self.image_ids):
                row = self.cache.row_of.get(image_id, -1)
                if row >= 0 and status[row] == DONE:
                    self.cache_rows[i] = row
            missing = int((self.cache_rows < 0).sum())
            if missing:
                log.warning("%d of %d images are not in the cache %s; they are read from DICOM",
                            missing, len(self.frame), self.cache.root)

    @property
    def cached(self) -> bool:
        """True when every image comes from the cache (no DICOM decoding while training)."""
        return self.cache is not None and bool((self.cache_rows >= 0).all())

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> np.ndarray:
        row = self.cache_rows[i]
        if row >= 0:
            return np.array(self.cache.images()[row])
        from ichscan.windows import load_windows

        return load_windows(self.paths[i], self.windows, self.size)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.image(i), self.targets[i]

    def summary(self) -> dict[str, Any]:
        """Counts for the checkpoint's ``data`` record."""
        out: dict[str, Any] = {"images": len(self)}
        for col in ("patient_id", "study_uid", "series_uid"):
            if col in self.frame:
                out[col.replace("_uid", "").replace("_id", "") + "s"] = int(self.frame[col].nunique())
        out["positives"] = {name: int(np.nansum(self.targets[:, j])) for j, name in enumerate(self.labels)}
        return out


# ------------------------------------------------------------------------------------ one folder, end to end


@dataclass
class LabelledData:
    """A labelled index for one RSNA-layout folder and everything found on the way."""

    frame: pd.DataFrame
    label_report: LabelReport
    index_report: IndexReport
    missing: list[str]  # labelled image IDs with no usable file

    def lines(self) -> list[str]:
        out = self.label_report.lines() + self.index_report.lines()
        if self.missing:
            out.append(f"{len(self.missing)} labelled images have no usable file: "
                       + ", ".join(self.missing[:5]) + (" ..." if len(self.missing) > 5 else ""))
        return out


def find_labels_csv(root: Path) -> Path:
    for name in ("labels.csv", "stage_2_train.csv", "stage_1_train.csv"):
        if (root / name).is_file():
            return root / name
    raise DataError("no labels.csv or stage_2_train.csv in this folder; pass --labels", root)


IMAGE_DIRS = ("images", "stage_2_train", "stage_2_train_images")


def find_images_dir(root: str | os.PathLike) -> Path:
    """The images folder of an RSNA-layout ``root`` (``images/`` or RSNA's own names), else ``root`` itself."""
    root = Path(root)
    return next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), root)


def load_labelled(
    root: str | os.PathLike,
    *,
    labels_csv: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    index_cache: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    labels: Sequence[str] = LABELS,
) -> LabelledData:
    """Labels + header index of an RSNA-layout folder (``labels.csv`` or ``stage_2_train.csv``, and
    ``images/`` or ``stage_2_train/``), joined. The index is cached (default ``<root>/ichscan_index.parquet``)."""
    root = Path(root)
    csv = Path(labels_csv) if labels_csv else find_labels_csv(root)
    if images is None:
        images = find_images_dir(root)
    label_frame, label_report = read_labels(csv, labels)
    cache = Path(index_cache) if index_cache else root / "ichscan_index.parquet"
    index, index_report = build_index(images, cache, workers=workers, progress=progress)
    frame, missing = join_labels(index, label_frame, labels)
    return LabelledData(frame, label_report, index_report, missing)
