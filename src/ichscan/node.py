"""A DICOM node beside a PACS: studies in by C-STORE, findings back as DICOM SR and key images.

``Node`` is what ``ichscan listen`` runs. Its threads share one spool folder:

* association threads (pynetdicom, one per association): C-ECHO, and C-STORE of any storage SOP class in
  the uncompressed transfer syntaxes and the compressed ones pydicom can decode here. Each instance is
  written durably (temporary file, fsync, rename, folder fsync) under ``incoming/<study key>/`` *before*
  success is returned, so an acknowledged instance survives any crash.
* the closer: a study with no new instance for ``idle`` seconds is complete and moves, by one rename, to
  ``queue/<seq>-<study key>/``.
* the worker: takes the oldest queued study, moves it to ``processing/``, runs
  ``ichscan.predict.batch.predict_path`` on it (series selection, prediction, TID 1500 SR and key images into
  ``results/``) and moves it to ``outbox/`` (or ``failed/``). One study at a time, in order.
* the sender: C-STORE SCU of the oldest ``outbox/`` study's results to the PACS, retried with exponential
  backoff; when the PACS has them, the study moves to ``done/`` and its log line is written.

Every state is a folder and every transition one ``os.rename`` of the study's folder, fsynced, so a study is
always in exactly one state. After a crash (SIGKILL included), ``recover`` resumes from the folders: studies
in ``incoming/`` wait for their idle time again, one found in ``processing/`` is redone from scratch, one in
``outbox/`` is sent again (the SR and key images have deterministic UIDs, so the PACS sees the same objects),
and a study that reached ``done/`` or ``failed/`` whose log line was lost gets it then. The log
(``log.jsonl``) therefore holds exactly one final line per study delivery.

Logs and folder names carry pseudonymous keys (keyed hashes of the UIDs under the site key of
``ichscan.privacy``), never a patient's name or ID; the spool itself holds the received DICOM and must be
protected as any PHI store (it is created mode 0700).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ichscan.dicomout import MANUFACTURER, SR_NAME
from ichscan.errors import IchscanError
from ichscan.fileio import fsync_dir, lock_folder, write_bytes, write_json
from ichscan.privacy import StudyKeys, study_key

log = logging.getLogger(__name__)

# Spool states, in the order a study goes through them.
INCOMING, QUEUE, PROCESSING, OUTBOX, DONE, FAILED = "incoming", "queue", "processing", "outbox", "done", "failed"
STATES = (INCOMING, QUEUE, PROCESSING, OUTBOX, DONE, FAILED)
# Inside a study's folder.
INSTANCES = "instances"  # the received files, <SOPInstanceUID>.dcm
PREDICT = "predict"  # predict_path's --out (CSVs, predictions.json; pseudonymous patient keys)
RESULTS = "results"  # predict_path's dicom_out: the SR and key images sent to the PACS
STUDY_FILE = "study.json"  # receipt times, instance count, processing runs
OUTCOME_FILE = "outcome.json"  # prediction summary, objects to send, send attempts, the final log record
LOG_NAME = "log.jsonl"
MAX_RUNS = 3  # a study whose processing was interrupted this often (the node died each time) is failed
FINAL = ("done", "failed", "send_failed")  # a study's last status: its one line in the log

# CT Image, Enhanced CT Image, Legacy Converted Enhanced CT Image Storage
CT_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
# C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
# A PACS answering with a warning (coercion, elements discarded) has stored the object.
STORED = {0x0000, 0xB000, 0xB006, 0xB007}

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TMP = re.compile(r"^\..*\.tmp$")  # fileio.atomic_path's temporary files


def now_iso() -> str:
    """UTC, to the millisecond, as the log writes times."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------------
# Pseudonymous keys


# --------------------------------------------------------------------------------------------------
# Peers and transfer syntaxes


@dataclass(frozen=True)
class Peer:
    """A remote DICOM application entity: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        ae, at, address = str(text).partition("@")
        host, colon, port = address.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:104
        if not (at and colon and ae and host and port.isdigit()):
            raise IchscanError(f"{text!r}: expected AE@HOST:PORT, e.g. PACS@10.0.0.5:104")
        check_ae_title(ae)
        if not 0 < int(port) < 65536:
            raise IchscanError(f"{text!r}: port {port} is not between 1 and 65535")
        return cls(ae, host, int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def check_ae_title(title: str) -> str:
    """An AE title is 1 to 16 characters of printable ASCII, not only spaces, no backslash (PS3.5 AE)."""
    if not 0 < len(title) <= 16 or not title.strip() or "\\" in title or not all(32 <= ord(c) < 127 for c in title):
        raise IchscanError(f"AE title {title!r}: 1 to 16 printable ASCII characters, no backslash")
    return title


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes the node accepts: uncompressed, deflated, and every compressed one whose pixel data a
    pydicom decoder installed here can read (JPEG, JPEG-LS, JPEG 2000, RLE with the pylibjpeg plugins)."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    syntaxes = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
                uid.ExplicitVRBigEndian]
    for ts in uid.AllTransferSyntaxes:
        if ts in syntaxes or not ts.is_compressed:
            continue
        try:
            if get_decoder(ts).is_available:
                syntaxes.append(ts)
        except (NotImplementedError, ValueError):  # no decoder for this syntax in pydicom
            continue
    return [str(ts) for ts in syntaxes]


# --------------------------------------------------------------------------------------------------
# The spool: folders are states, a rename is a transition


def _rename(src: Path, dst: Path) -> None:
    """Move a study folder to its next state; durable once both folders' entries are on disk."""
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _seq_of(name: str) -> int:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


class Spool:
    """The node's folder: ``incoming/ queue/ processing/ outbox/ done/ failed/`` and ``log.jsonl``."""

    def __init__(self, root: str | os.PathLike, log_path: str | os.PathLike | None = None):
        self.root = Path(root)
        self.log_path = Path(log_path) if log_path is not None else self.root / LOG_NAME
        self._log_lock = threading.Lock()
        self._seq_lock = threading.Lock()
        self._seq = 0

    def path(self, state: str, name: str = "") -> Path:
        return self.root / state / name if name else self.root / state

    def prepare(self) -> None:
        """Create the folders (the root mode 0700: it holds patients' images)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            for state in STATES:
                self.path(state).mkdir(exist_ok=True)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise IchscanError(f"cannot create the spool ({err.strerror or err}); check the path", self.root) from None
        if self.root.stat().st_mode & 0o077:
            log.warning("the spool %s can be read by other users (mode %o); it holds patients' images: "
                        "chmod 700 it", self.root, self.root.stat().st_mode & 0o777)
        seqs = [_seq_of(p.name) for state in STATES[1:] for p in self.list(state)]
        self._seq = max(seqs, default=0)

    def list(self, state: str) -> list[Path]:
        """Study folders in ``state``, oldest first (by sequence number; incoming by name)."""
        folder = self.path(state)
        if not folder.is_dir():
            return []
        items = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(items, key=lambda p: (_seq_of(p.name), p.name))

    def next_name(self, key: str) -> str:
        with self._seq_lock:
            self._seq += 1
            return f"{self._seq:08d}-{key}"

    # -- the log ------------------------------------------------------------------------------------
    def append_log(self, record: dict) -> None:
        """One JSON line, appended and fsynced (so a line that is in the log stays there)."""
        line = json.dumps(record, sort_keys=False, allow_nan=False, separators=(",", ":")) + "\n"
        with self._log_lock:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)

    def read_log(self) -> list[dict]:
        """The log's records; a line cut short by a crash is dropped from the file first."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return []
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.log_path, "r+b") as fh:
                fh.truncate(keep)
                fh.flush()
                os.fsync(fh.fileno())
            log.warning("dropped a log line cut short by a crash (%d bytes); it is written again below", len(data) - keep)
            data = data[:keep]
        records = []
        for line in data.decode("utf-8", "replace").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    def recover(self, *, keep_instances: bool = False) -> list[dict]:
        """After a crash: drop half-written files and a half-written log line; write the log line of every study
        that reached done/ or failed/ without one (it crashed in between). Returns those records. Idempotent."""
        n = self.clean_temporaries()
        if n:
            log.info("removed %d half-written file(s) of an interrupted run", n)
        logged = {r.get("delivery") for r in self.read_log() if r.get("status") in FINAL}
        written = []
        for state in (DONE, FAILED):
            for folder in self.list(state):
                record = _read_json(folder / OUTCOME_FILE).get("log")
                if record and folder.name not in logged:
                    self.append_log(record)
                    written.append(record)
                if state == DONE and not keep_instances and (folder / INSTANCES).exists():
                    shutil.rmtree(folder / INSTANCES, ignore_errors=True)
        return written

    def clean_temporaries(self) -> int:
        """Remove half-written files of a crashed run (never acknowledged, so never promised to anyone)."""
        removed = 0
        for state in STATES:
            for study in self.list(state):
                for folder in (study, study / INSTANCES):
                    if not folder.is_dir():
                        continue
                    for f in folder.iterdir():
                        if _TMP.match(f.name) and f.is_file():
                            f.unlink()
                            removed += 1
        # a half-made incoming folder (see Node._open_incoming) holds nothing acknowledged
        for f in self.path(INCOMING).iterdir():
            if f.name.startswith(".") and f.is_dir():
                shutil.rmtree(f, ignore_errors=True)
        return removed


# --------------------------------------------------------------------------------------------------
# Sending results


def send_files(files: Sequence[Path], peer: Peer, *, calling_ae: str, timeout: float = 30.0) -> tuple[int, str | None]:
    """C-STORE every file to ``peer`` over one association. Returns (how many the peer stored, error or None);
    the caller resends all of them on error (the objects keep their UIDs, so a PACS replaces, not duplicates)."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    datasets = []
    for f in files:
        try:
            datasets.append(dcmread(f))
        except Exception as err:  # noqa: BLE001 - one line in the log, whatever pydicom raised
            return 0, f"cannot read result {Path(f).name}: {err}"
    contexts: dict[str, list[str]] = {}
    for ds in datasets:
        syntaxes = contexts.setdefault(str(ds.SOPClassUID), [])
        for ts in (str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in syntaxes:
                syntaxes.append(ts)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        return 0, f"association with {peer} {why} (is the PACS up, and does it know AE {calling_ae}?)"
    stored = 0
    error = None
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                error = f"no answer from {peer} to a C-STORE (connection lost or timed out)"
                break
            if int(code) not in STORED:
                error = f"{peer} refused a {ds.SOPClassUID.name} object with status 0x{int(code):04X}"
                break
            stored += 1
    except Exception as err:  # noqa: BLE001 - a peer can fail in many ways; the study is retried
        error = f"sending to {peer} failed: {err}"
    finally:
        if assoc.is_established:
            assoc.release()
    return stored, error


# --------------------------------------------------------------------------------------------------
# The node


@dataclass
class NodeConfig:
    """What ``ichscan listen`` is told. Times in seconds."""

    spool: Path
    send_to: Peer
    ae_title: str = "ICHSCAN"
    port: int = 11112
    bind: str = "127.0.0.1"
    idle: float = 30.0
    log_path: Path | None = None
    allowed_callers: tuple[str, ...] = ()  # calling AE titles accepted; empty: any
    retry_delay: float = 10.0  # first wait after a failed send; doubles up to retry_max_delay
    retry_max_delay: float = 600.0
    send_attempts: int = 20  # then the study is failed with status send_failed (results kept)
    network_timeout: float = 30.0
    keep_instances: bool = False  # keep the received images of done studies (failed ones are always kept)
    max_associations: int = 16
    key_path: Path | None = None  # the site key (ichscan.privacy); default: its default


@dataclass
class _OpenStudy:
    folder: Path
    last: float  # monotonic time of the last instance written
    writing: int = 0  # instances being written now: the closer leaves the study alone meanwhile
    received: int = 0


@dataclass
class NodeStatus:
    """Counters for the CLI and the tests (what the node did since it started)."""

    instances: int = 0
    refused: int = 0
    ignored: int = 0  # ichscan's own results sent back to it
    queued: int = 0
    processed: int = 0
    failed: int = 0
    sent: int = 0
    redone: list[str] = field(default_factory=list)


class Node:
    """Receive, predict, send back. ``start()`` recovers the spool and opens the port; ``stop()`` closes it.

    Each study goes through ``ichscan.predict.batch.predict_path(..., dicom_out=...)`` with ``predictor`` (loaded
    by the caller, once), ``rules`` and ``thresholds``. ``on_record`` gets each study's log record once it is
    written (from the worker or sender thread).
    """

    def __init__(self, config: NodeConfig, predictor: Any, *, rules: Any = None,
                 thresholds: dict[str, float] | str | os.PathLike | None = None, patient_ids: Any = None,
                 on_record: Callable[[dict], None] | None = None):
        from ichscan.predict.batch import predict_path as predict
        from ichscan.thresholds import run_points

        if "dicom_out" not in inspect.signature(predict).parameters:
            raise IchscanError("this ichscan's predict_path cannot write DICOM results (no dicom_out parameter); "
                               "the node needs the SR / key image writer of issue 13")
        check_ae_title(config.ae_title)
        self.config = config
        self.predictor = predictor
        self.rules = rules
        # a file is read once, here: its thresholds and intervals hold for every study, whatever becomes of it
        points = run_points(thresholds, getattr(predictor, "operating_points", None))
        self._thresholds_given, self.thresholds, self.thresholds_from = points.given, points.thresholds, points.source
        self._predict = predict
        self._patient_ids = patient_ids
        self._on_record = on_record
        self.keys = StudyKeys(config.key_path)
        self.spool = Spool(config.spool, config.log_path)
        self.status = NodeStatus()
        self._lock = threading.Lock()  # the open studies, and the rename of one into the queue
        self._open: dict[str, _OpenStudy] = {}
        self._stopping = threading.Event()
        self._receiving = False
        self._work = threading.Event()
        self._send = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ae = None
        self._server = None
        self._lock_cm = None
        self.busy_with: str | None = None  # the study the worker holds, for the CLI's shutdown message

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Lock the spool (one node per spool), recover what a previous run left, open the port, start work."""
        self.spool.prepare()
        self._lock_cm = lock_folder(self.spool.root)
        self._lock_cm.__enter__()
        try:
            self.recover()
            self._start_server()
        except BaseException:
            self._lock_cm.__exit__(None, None, None)
            self._lock_cm = None
            raise
        self._threads = [threading.Thread(target=self._guard(loop), name=f"ichscan-{name}", daemon=True)
                         for name, loop in (("closer", self._closer_loop), ("worker", self._worker_loop),
                                            ("sender", self._sender_loop))]
        for t in self._threads:
            t.start()

    def stop(self, grace: float = 60.0) -> bool:
        """Stop receiving, let instances being written finish, let the worker finish its study and the sender send
        the results that are ready (up to ``grace`` seconds; a study waiting out a backoff stays in outbox/).
        Returns whether everything stopped in time; what did not is picked up by the next start (a study in
        processing/ is redone, outbox/ is sent)."""
        self._stopping.set()
        self._work.set()
        self._send.set()
        with self._lock:
            self._receiving = False  # instances from now on are refused (the sender keeps them, sends again)
        if self._server is not None:
            self._server.shutdown()  # no new associations
        deadline = time.monotonic() + min(grace, 10.0)
        while time.monotonic() < deadline:  # instances being written now are finished and acknowledged
            with self._lock:
                if not any(s.writing for s in self._open.values()):
                    break
            time.sleep(0.02)
        if self._ae is not None:
            self._ae.shutdown()  # aborts associations still open: their unacknowledged instances are resent
        clean = True
        end = time.monotonic() + grace
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
            clean = clean and not t.is_alive()
        if self._lock_cm is not None and clean:
            self._lock_cm.__exit__(None, None, None)
            self._lock_cm = None
        return clean

    def _guard(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            except BaseException:  # a bug: say so loudly; the spool keeps the state for the next start
                log.exception("%s stopped", threading.current_thread().name)
                raise
        return run

    def healthy(self) -> bool:
        """False once a thread of the node died (a bug; the log says which): restart the node, it recovers."""
        return all(t.is_alive() for t in self._threads)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2] if self._server is not None else (self.config.bind, self.config.port)

    # -- recovery ------------------------------------------------------------------------------------
    def recover(self) -> None:
        """Make the spool consistent after whatever stopped the last run (SIGKILL included)."""
        for record in self.spool.recover(keep_instances=self.config.keep_instances):
            log.info("logged %s, finished before the interruption", record.get("delivery"))
        for folder in self.spool.list(PROCESSING):
            log.warning("study %s was being processed when the node stopped; it is redone from scratch", folder.name)
        now = time.monotonic()
        for folder in self.spool.list(INCOMING):
            (folder / INSTANCES).mkdir(exist_ok=True)
            count = _count(folder / INSTANCES)
            self._open[folder.name] = _OpenStudy(folder, now, received=count)
            log.info("study %s: %d instance(s) received before the interruption; complete after %gs of quiet",
                     folder.name, count, self.config.idle)

    # -- receiving -----------------------------------------------------------------------------------
    def _start_server(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        cfg = self.config
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = cfg.network_timeout
        ae.require_called_aet = True  # a study addressed to another AE title is not ours
        if cfg.allowed_callers:
            ae.require_calling_aet = list(cfg.allowed_callers)
        syntaxes = decodable_transfer_syntaxes()
        ae.add_supported_context(Verification)
        # Every storage class: a router sends whole studies (dose reports, localizers, key images) and many
        # stop the whole transfer at the first refused object; the worker keeps only usable CT series.
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        self._receiving = True
        try:
            self._server = ae.start_server((cfg.bind, cfg.port), block=False, evt_handlers=handlers)
        except OSError as err:
            raise IchscanError(f"cannot listen on {cfg.bind}:{cfg.port} ({err.strerror or err}); is another node "
                               "or program using the port?") from None
        self._ae = ae

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _on_store(self, event: Any) -> int:
        try:
            ds = event.dataset
            study_uid = str(ds.StudyInstanceUID or "").strip()
            sop_uid = str(event.request.AffectedSOPInstanceUID or ds.SOPInstanceUID or "").strip()
        except Exception as err:  # noqa: BLE001 - the peer sent something pydicom cannot read
            log.warning("refused an instance that cannot be decoded: %s", err)
            self.status.refused += 1
            return CANNOT_UNDERSTAND
        if not study_uid or not sop_uid:
            log.warning("refused an instance without StudyInstanceUID or SOPInstanceUID")
            self.status.refused += 1
            return CANNOT_UNDERSTAND
        if _made_by_ichscan(ds):
            # Our own SR or key image, routed back with the study: acknowledged, not input (no loop).
            log.info("passed over an object ichscan made (%s)", getattr(ds.SOPClassUID, "name", ds.SOPClassUID))
            self.status.ignored += 1
            return SUCCESS
        data = event.encoded_dataset(include_meta=True)  # as sent: no re-encoding, compressed pixels untouched
        key = self.keys.study(study_uid)
        name = (sop_uid if _UID.match(sop_uid) and len(sop_uid) <= 64 else hashlib.sha1(sop_uid.encode()).hexdigest())
        with self._lock:
            if not self._receiving:
                return OUT_OF_RESOURCES  # shutting down: the sender keeps it and sends it again
            study = self._open.get(key)
            if study is None:
                try:
                    study = self._open_incoming(key)
                except OSError as err:
                    log.error("cannot create a spool folder for study %s: %s", key, err)
                    return OUT_OF_RESOURCES
                self._open[key] = study
            study.writing += 1
        try:
            write_bytes(study.folder / INSTANCES / f"{name}.dcm", data)  # temp, fsync, rename, folder fsync
        except OSError as err:
            log.error("cannot store an instance of study %s: %s", key, err)
            return OUT_OF_RESOURCES
        finally:
            with self._lock:
                study.writing -= 1
                study.last = time.monotonic()
        with self._lock:
            study.received += 1
            self.status.instances += 1
        return SUCCESS

    def _open_incoming(self, key: str) -> _OpenStudy:
        """``incoming/<key>/instances/``, made under a hidden name and renamed, so it appears whole."""
        final = self.spool.path(INCOMING, key)
        if final.exists():  # not closed yet (recovered, or by hand)
            (final / INSTANCES).mkdir(exist_ok=True)
        else:
            tmp = self.spool.path(INCOMING, f".{key}.{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / INSTANCES).mkdir(parents=True)
            _rename(tmp, final)
        return _OpenStudy(final, time.monotonic())

    def _closer_loop(self) -> None:
        tick = min(0.5, max(0.05, self.config.idle / 5))
        while not self._stopping.wait(tick):
            self.close_idle()

    def close_idle(self, force: bool = False) -> int:
        """Queue every study with no new instance for ``idle`` seconds (all quiet ones with ``force``)."""
        queued = 0
        now = time.monotonic()
        with self._lock:
            for key, study in list(self._open.items()):
                if study.writing or (not force and now - study.last < self.config.idle):
                    continue
                del self._open[key]
                if _count(study.folder / INSTANCES):
                    self._enqueue(key, study)
                    queued += 1
                else:  # every write failed: nothing was acknowledged
                    shutil.rmtree(study.folder, ignore_errors=True)
        if queued:
            self._work.set()
        return queued

    def _enqueue(self, key: str, study: _OpenStudy) -> None:
        files = [f for f in (study.folder / INSTANCES).iterdir() if f.suffix == ".dcm"]
        times = [f.stat().st_mtime for f in files]
        record = {"study": key, "received": _iso(min(times)) if times else now_iso(),
                  "last_received": _iso(max(times)) if times else now_iso(), "queued": now_iso(),
                  "instances": len(files), "runs": 0}
        name = self.spool.next_name(key)
        record["delivery"] = name
        write_json(study.folder / STUDY_FILE, record)
        _rename(study.folder, self.spool.path(QUEUE, name))
        self.status.queued += 1
        log.info("study %s complete (%d instance(s)); queued as %s", key, len(files), name)

    # -- processing ----------------------------------------------------------------------------------
    def _worker_loop(self) -> None:
        while not self._stopping.is_set():
            folder = self._next_job()
            if folder is None:
                self._work.wait(1.0)
                self._work.clear()
                continue
            self.busy_with = folder.name
            try:
                self.process(folder)
            finally:
                self.busy_with = None

    def _next_job(self) -> Path | None:
        # A study left in processing/ by a crash is older than anything queued: it goes first.
        for state in (PROCESSING, QUEUE):
            items = self.spool.list(state)
            if items:
                return items[0]
        return None

    def process(self, folder: Path) -> Path:
        """One study, from queue/ or processing/, to outbox/ or failed/. Returns its new folder."""
        spool = self.spool
        if folder.parent.name == QUEUE:
            target = spool.path(PROCESSING, folder.name)
            _rename(folder, target)
            folder = target
        else:
            self.status.redone.append(folder.name)
        # From scratch: nothing of an interrupted run (or of a failed one an operator queued again) is trusted.
        for leftover in (PREDICT, RESULTS):
            shutil.rmtree(folder / leftover, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (folder / OUTCOME_FILE).unlink()
        study = _read_json(folder / STUDY_FILE)
        study.setdefault("delivery", folder.name)
        study.setdefault("study", folder.name.split("-", 1)[-1])
        study["runs"] = int(study.get("runs", 0)) + 1
        study["started"] = now_iso()
        write_json(folder / STUDY_FILE, study)
        outcome: dict[str, Any] = {"instances": _count(folder / INSTANCES)}
        if study["runs"] > MAX_RUNS:  # it took the node down each time (out of memory, a crash in a library)
            outcome["reason"] = (f"processing was interrupted {MAX_RUNS} times (the node killed or crashed while "
                                 "predicting it); kept for inspection")
            return self._finish_failed(folder, study, outcome, "failed")
        log.info("processing %s (run %d)", folder.name, study["runs"])
        try:
            return self._predict_study(folder, study, outcome)
        except Exception as err:  # a bug or the disk: this study must not stop the node, nor come back forever
            log.exception("study %s: internal error", folder.name)
            outcome["reason"] = _one_line(f"internal error ({type(err).__name__}: {err}); please report this")
            return self._finish_failed(folder, study, outcome, "failed")

    def _predict_study(self, folder: Path, study: dict, outcome: dict) -> Path:
        try:
            run = self._predict(folder / INSTANCES, folder / PREDICT, self.predictor, rules=self.rules,
                                thresholds=self._thresholds_given, dicom_out=folder / RESULTS,
                                patient_ids=self._patient_ids)
        except Exception as err:
            log.warning("study %s failed: %s", folder.name, err, exc_info=not isinstance(err, IchscanError))
            outcome["reason"] = _one_line(getattr(err, "reason", None) or f"{type(err).__name__}: {err}")
            return self._finish_failed(folder, study, outcome, "failed")
        outcome["predicted"] = now_iso()
        outcome.update(self._summarise(run))
        files = [Path(f) for f in getattr(run, "dicom_files", None) or []]
        if not run.predictions:
            outcome["reason"] = _why_nothing(run)
            return self._finish_failed(folder, study, outcome, "failed")
        missing = len(run.predictions) - sum(1 for f in files if f.name == SR_NAME)
        if missing > 0:  # the PACS would get a partial answer: keep the study for a person to look at
            why = [f.reason for f in run.failed if "DICOM results" in f.reason]
            outcome["reason"] = _one_line(f"DICOM results not written for {missing} of {len(run.predictions)} "
                                          f"predicted series" + (f": {why[0]}" if why else ""))
            return self._finish_failed(folder, study, outcome, "failed")
        outcome["objects"] = [os.path.relpath(Path(f).resolve(), folder.resolve()) for f in files]
        outcome["send_attempts"] = 0
        write_json(folder / OUTCOME_FILE, outcome)
        target = self.spool.path(OUTBOX, folder.name)
        _rename(folder, target)
        self.status.processed += 1
        self._send.set()
        return target

    def _summarise(self, run: Any) -> dict:
        intervals = getattr(run, "intervals", None)
        series = [{"series": self.keys.series(p.series_uid), "slices": p.n_slices, "any": p.prob("any"),
                   "decisions": p.decisions(self.thresholds),
                   "borderline": p.borderline_labels(self.thresholds, intervals) or []}
                  for p in run.predictions]
        uids = {p.series_uid for p in run.predictions} | {r.series_uid for r in run.rejected}
        uids |= {f.series_uid for f in run.failed if f.series_uid}
        return {
            "series": len(uids),
            "predicted_series": series,
            "rejected_series": [{"series": self.keys.series(r.series_uid), "slices": r.n_slices, "rule": r.rule}
                                for r in run.rejected],
            "skipped_files": len(run.skipped),
            "failed_files": len(run.failed),
        }

    def _finish_failed(self, folder: Path, study: dict, outcome: dict, status: str) -> Path:
        record = self._record(study, outcome, status)
        outcome["log"] = record
        write_json(folder / OUTCOME_FILE, outcome)
        target = self.spool.path(FAILED, folder.name)
        _rename(folder, target)
        self._log(record)
        self.status.failed += 1
        log.warning("study %s %s: %s", folder.name, status, outcome.get("reason") or outcome.get("send_error"))
        return target

    def _record(self, study: dict, outcome: dict, status: str) -> dict:
        """The study's log line: pseudonymous keys, times, counts, findings, what was sent, the status."""
        return {
            "study": study.get("study"),
            "delivery": study.get("delivery"),
            "status": status,
            "reason": outcome.get("reason") or outcome.get("send_error"),
            "received": study.get("received"),
            "last_received": study.get("last_received"),
            "queued": study.get("queued"),
            "started": study.get("started"),
            "predicted": outcome.get("predicted"),
            "finished": now_iso(),
            "runs": study.get("runs"),
            "instances": outcome.get("instances", study.get("instances")),
            "series": outcome.get("series", 0),
            "predictions": outcome.get("predicted_series", []),
            "rejected": outcome.get("rejected_series", []),
            "skipped_files": outcome.get("skipped_files", 0),
            "objects": len(outcome.get("objects", [])),
            "sent": outcome.get("sent", 0),
            "send_attempts": outcome.get("send_attempts", 0),
            "send_to": str(self.config.send_to),
            "thresholds_from": self.thresholds_from,
        }

    # -- sending -------------------------------------------------------------------------------------
    def _sender_loop(self) -> None:
        while True:
            finishing = self._stopping.is_set() and not self._worker_running()
            items = self.spool.list(OUTBOX)
            if not items:
                if finishing:
                    return
                self._send.wait(0.2 if self._stopping.is_set() else 1.0)
                self._send.clear()
                continue
            folder = items[0]  # in order: the oldest study's results first
            wait = float(_read_json(folder / OUTCOME_FILE).get("next_try", 0)) - time.time()
            if wait > 0:
                if finishing:  # waiting out a backoff is the next start's job
                    return
                self._send.wait(min(wait, 0.2 if self._stopping.is_set() else 1.0))
                continue
            if self.send(folder).parent.name == OUTBOX and finishing:
                return  # the PACS is not answering: the next start sends it

    def _worker_running(self) -> bool:
        return any(t.name == "ichscan-worker" and t.is_alive() for t in self._threads)

    def send(self, folder: Path) -> Path:
        """One attempt at the study's results; to done/ when the PACS has them all, else retried later."""
        outcome = _read_json(folder / OUTCOME_FILE)
        files = [folder / rel for rel in outcome.get("objects", [])]
        attempts = int(outcome.get("send_attempts", 0)) + 1
        stored, error = send_files(files, self.config.send_to, calling_ae=self.config.ae_title,
                                   timeout=self.config.network_timeout)
        outcome["send_attempts"] = attempts
        study = _read_json(folder / STUDY_FILE)
        if error is None:
            outcome["sent"] = stored
            outcome.pop("send_error", None)
            outcome.pop("next_try", None)
            record = self._record(study, outcome, "done")
            outcome["log"] = record
            write_json(folder / OUTCOME_FILE, outcome)
            target = self.spool.path(DONE, folder.name)
            _rename(folder, target)
            if not self.config.keep_instances:
                shutil.rmtree(target / INSTANCES, ignore_errors=True)
            self._log(record)
            self.status.sent += 1
            log.info("study %s done: %d object(s) sent to %s", folder.name, stored, self.config.send_to)
            return target
        outcome["send_error"] = _one_line(error)
        outcome["sent"] = stored
        if attempts >= self.config.send_attempts:
            outcome["reason"] = f"send failed after {attempts} attempt(s): {outcome['send_error']}"
            return self._finish_failed(folder, study, outcome, "send_failed")
        delay = min(self.config.retry_max_delay, self.config.retry_delay * 2 ** (attempts - 1))
        outcome["next_try"] = time.time() + delay
        write_json(folder / OUTCOME_FILE, outcome)
        log.warning("study %s: %s; attempt %d of %d, next in %.0fs", folder.name, error, attempts,
                    self.config.send_attempts, delay)
        return folder

    def _log(self, record: dict) -> None:
        self.spool.append_log(record)
        if self._on_record is not None:
            try:
                self._on_record(record)
            except Exception:
                log.exception("on_record failed")

    # -- for the CLI and tests -----------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Studies per spool state now."""
        return {state: len(self.spool.list(state)) for state in STATES}


def _made_by_ichscan(ds: Any) -> bool:
    """An SR or key image ichscan wrote (``ichscan.dicomout``): never a CT image, made by us."""
    try:
        return str(ds.get("Manufacturer", "")) == MANUFACTURER and str(ds.get("SOPClassUID", "")) not in CT_CLASSES
    except Exception:  # noqa: BLE001 - an element pydicom cannot decode: not ours
        return False


def _count(folder: Path) -> int:
    return sum(1 for f in folder.iterdir() if f.suffix == ".dcm") if folder.is_dir() else 0


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_DOTTED = re.compile(r"[0-9]+(?:\.[0-9]+){2,}")


def _one_line(text: Any, limit: int = 300) -> str:
    """For the log: one line, and no UID (a message may name a file or series by it; versions stay)."""
    text = _DOTTED.sub(lambda m: "<uid>" if len(m.group()) >= 12 else m.group(), " ".join(str(text).split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _why_nothing(run: Any) -> str:
    """One line: why a study gave no prediction (rejected series by rule, skipped files by kind)."""
    parts = []
    if run.rejected:
        # quoted text in a rule's detail is a tag's free text (a series description): a site may put anything there
        rules = Counter(f"{r.rule} ({_QUOTED.sub(chr(39) * 2, r.detail)})" for r in run.rejected)
        parts.append(f"{len(run.rejected)} series rejected: " + "; ".join(
            f"{n}x {what}" if n > 1 else what for what, n in rules.most_common(3)))
    bad = list(run.skipped) + list(run.failed)
    if bad:
        kinds = Counter(s.kind for s in bad)
        first = {}
        for s in bad:
            first.setdefault(s.kind, s.reason)
        parts.append(f"{len(bad)} file(s) unusable: " + "; ".join(
            f"{n} {kind} ({first[kind]})" for kind, n in kinds.most_common(3)))
    return _one_line("no usable CT series: " + (", ".join(parts) if parts else "no image in the study"))


def describe_outcome(record: dict) -> str:
    """One line for a person, from a log record."""
    if record.get("status") == "done":
        finds = ", ".join(f"any {p['any']:.2f}" for p in record.get("predictions", []))
        return (f"{record.get('delivery')}: done, {record.get('instances')} instance(s), {finds}; "
                f"{record.get('sent')} object(s) sent")
    return f"{record.get('delivery')}: {record.get('status')}: {record.get('reason')}"


__all__ = [
    "LOG_NAME",
    "STATES",
    "Node",
    "NodeConfig",
    "NodeStatus",
    "Peer",
    "Spool",
    "StudyKeys",
    "check_ae_title",
    "decodable_transfer_syntaxes",
    "describe_outcome",
    "send_files",
    "study_key",
]
