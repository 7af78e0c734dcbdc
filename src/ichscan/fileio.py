"""Atomic files: every output ichscan writes goes through here.

A file is written beside its target under a temporary name, flushed to disk, then renamed over the target,
so a reader (or a run resumed after a crash) sees the old file or the new one, never half of one. The
temporary file is created with mode 0666 less the umask, like ``open(path, "w")``, so outputs are 0644
on a usual system (``tempfile.mkstemp`` would make them 0600, unreadable by the colleague who asked).

It also holds the two other things every writer of a folder needs: ``lock_folder``, so that two runs never
write one folder at once, and ``escape_undecodable``, so that a file name that is not UTF-8 can still be
written into a CSV or JSON output.

numpy and the standard library only: ingest and phantom generation use this module without torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ichscan.errors import FolderInUseError, IchscanError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; folders are not locked there
    fcntl = None

__all__ = ["atomic_path", "fsync_dir", "write_bytes", "write_text", "write_json", "write_csv", "write_parquet", "write_npy",
           "json_default", "lock_folder", "escape_undecodable", "LOCK_NAME"]

LOCK_NAME = ".ichscan.lock"


def fsync_dir(directory: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to by name (pyarrow, numpy, matplotlib); on success
    it is renamed over ``path``, on any exception removed. ``durable``: fsync the file and its folder first,
    so that the new content survives a power cut too; bulk writers of thousands of small files (phantom
    slices) turn it off, a killed process still leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies, as for any new file
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8, newlines written as given (no platform translation: outputs are the same bytes everywhere)."""
    return write_bytes(path, text.encode("utf-8"))


def json_default(obj: Any) -> Any:
    """Paths as strings, tuples as lists, numpy scalars as Python numbers."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, tuple):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
               allow_nan: bool = True, default: Callable[[Any], Any] | None = json_default,
               newline: bool = True) -> Path:
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=default)
    return write_text(path, text + ("\n" if newline else ""))


def write_csv(path: str | os.PathLike, frame: Any, **to_csv: Any) -> Path:
    """A pandas DataFrame as CSV without its index, ``\\n`` line ends; ``to_csv`` keywords pass through."""
    to_csv.setdefault("index", False)
    to_csv.setdefault("lineterminator", "\n")
    return write_text(path, frame.to_csv(**to_csv))


def write_parquet(path: str | os.PathLike, frame: Any) -> Path:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def write_npy(path: str | os.PathLike, array: Any) -> Path:
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
    return Path(path)


@contextlib.contextmanager
def lock_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<folder>/.ichscan.lock`` while writing the folder; another holder raises ``FolderInUseError``.

    An advisory ``flock``, so the kernel lets it go when the process dies however it dies: a lock file
    left behind by a killed run never blocks the next one. The file holds the pid for the message and is
    removed on release, so a finished folder holds only outputs."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, no permission
        raise IchscanError(f"cannot create this folder ({err.strerror or err}); check the path", folder) from None
    path = folder / LOCK_NAME
    if fcntl is None:
        yield path
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            with os.fdopen(fd) as fh:
                pid = fh.read().strip() or "unknown"
            raise FolderInUseError(f"another ichscan run is writing this folder (pid {pid}); wait for it to "
                                   "finish, or use another output folder", folder) from None
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        # The run before us removed the file between our open and our lock: lock the new one instead.
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked, so no other run holds a lock on a file no longer there
        os.close(fd)


def escape_undecodable(text: str) -> str:
    """``text`` with the bytes of a file name that were not UTF-8 (the surrogate escapes ``os.fsdecode``
    gives them) written as backslash escapes, ``bad\\xff.dcm``: UTF-8 files (CSV, JSON) can hold it, and a
    person can still tell which file it was."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates that no file name decoding made
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
