"""Pseudonymous patient keys: outputs name patients by a keyed hash, not by their PatientID.

A site keeps one secret key (32 random bytes, created on first use, readable only by its owner); the same
PatientID always gives the same key, so results can be linked back to the patient by whoever holds the
key file (hash the PatientIDs of the site's list and compare), and by nobody else. Without the key, a key
reveals nothing (HMAC-SHA256). ``--keep-patient-id`` keeps the PatientID itself in outputs, for a site
that wants it. Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from ichscan.errors import IchscanError

KEY_FILE_ENV = "ICHSCAN_KEY_FILE"
KEY_BYTES = 32
PREFIX = "anon-"
DIGITS = 16  # hex digits kept: 64 bits, no collision to fear among a hospital's patients


def default_key_path() -> Path:
    """``$ICHSCAN_KEY_FILE``, else ``$XDG_CONFIG_HOME/ichscan/patient.key`` (``~/.config/ichscan/...``)."""
    env = os.environ.get(KEY_FILE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "ichscan" / "patient.key"


def load_key(path: str | os.PathLike | None = None, *, create: bool = True) -> bytes:
    """The site's key from ``path`` (default :func:`default_key_path`); created (mode 0600) when missing."""
    path = Path(path) if path is not None else default_key_path()
    if not path.is_file() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it just now: use theirs
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(KEY_BYTES).hex().encode() + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
    try:
        key = bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        raise IchscanError("no pseudonym key file; run once without --keep-patient-id to create one", path) from None
    except (OSError, ValueError) as err:
        raise IchscanError(f"unreadable pseudonym key ({err}); it holds 64 hex digits", path) from None
    if len(key) < 16:
        raise IchscanError("pseudonym key too short (at least 16 bytes, as hex)", path)
    return key


class Pseudonymizer:
    """``p(patient_id) -> "anon-<16 hex>"`` (or the PatientID itself with ``keep``); None and "" stay as
    they are. The key is read (or created) on first use only, so runs that never see a patient need none."""

    def __init__(self, *, keep: bool = False, key_path: str | os.PathLike | None = None):
        self.keep = keep
        self.key_path = Path(key_path) if key_path is not None else default_key_path()
        self._key: bytes | None = None

    def __call__(self, patient_id: str | None) -> str | None:
        if self.keep or not patient_id:
            return patient_id
        if self._key is None:
            self._key = load_key(self.key_path)
        digest = hmac.new(self._key, str(patient_id).encode("utf-8", "surrogateescape"), hashlib.sha256)
        return PREFIX + digest.hexdigest()[:DIGITS]

    def describe(self) -> str:
        return "PatientID kept (--keep-patient-id)" if self.keep else f"pseudonymous keys (key file {self.key_path})"


class StudyKeys:
    """``study(uid) -> "study-<16 hex>"``, ``series(uid) -> "series-<16 hex>"``: HMAC-SHA256 under the site key
    (created on first use), so whoever holds the key file can find a study's folder and
    log line from its UID, and nobody else can tell which study it was. Study and series UIDs name a patient's
    examination as surely as a PatientID does, so the log and the spool's folder names carry these instead."""

    def __init__(self, key_path: str | os.PathLike | None = None):
        self._key = load_key(key_path)

    def _digest(self, kind: str, uid: str) -> str:
        mac = hmac.new(self._key, f"{kind}\0{uid}".encode("utf-8", "surrogateescape"), hashlib.sha256)
        return f"{kind}-{mac.hexdigest()[:16]}"

    def study(self, uid: str) -> str:
        return self._digest("study", str(uid))

    def series(self, uid: str) -> str:
        return self._digest("series", str(uid))


def study_key(study_uid: str, key_path: str | os.PathLike | None = None) -> str:
    """The key under which ``ichscan listen`` logs and spools ``study_uid`` (``StudyKeys(key_path).study``)."""
    return StudyKeys(key_path).study(study_uid)
