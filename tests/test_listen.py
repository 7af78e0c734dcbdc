"""``ichscan listen`` end to end on loopback: dcmtk's echoscu/storescu send phantom studies to the node running
as a subprocess (the bundled model), a pynetdicom storage SCP in this process plays the PACS and receives the SR
and key images. The fault test SIGKILLs the node mid-study and mid-prediction and restarts it on the same spool.

Nothing is mocked: real associations, real files, the real model. A few small tests of the spool's recovery
and of the command line's parsing need no network."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ichscan.errors import IchscanError
from ichscan.model import resolve_checkpoint
from ichscan.node import (
    FINAL,
    INSTANCES,
    OUTCOME_FILE,
    Peer,
    Spool,
    decodable_transfer_syntaxes,
    study_key,
)


def _dcmtk(tool: str) -> str | None:
    """dcmtk's ``tool`` on PATH. pynetdicom installs apps of the same names (echoscu, storescu) with other
    options into the virtual environment, which come first on PATH once it is activated."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = shutil.which(tool, path=folder)
        if path is None:
            continue
        try:
            version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "dcmtk" in version.lower():
            return path
    return None


ECHOSCU, STORESCU = _dcmtk("echoscu"), _dcmtk("storescu")
DCMTK = ECHOSCU and STORESCU
needs_dcmtk = pytest.mark.skipif(not DCMTK, reason="dcmtk's echoscu and storescu are not installed "
                                                   "(apt-get install dcmtk); the node is tested with them as the sender")


def _has_dicom_out() -> bool:
    from ichscan.predict.batch import predict_path

    return "dicom_out" in inspect.signature(predict_path).parameters


needs_results = pytest.mark.skipif(
    not _has_dicom_out(), reason="ichscan.predict.batch.predict_path has no dicom_out parameter yet (the TID 1500 SR "
                                 "and key image writer of issue 13); the node refuses to start without it")

IDLE = 1.0  # seconds of quiet that complete a study (30 by default)
READY_TIMEOUT = 120  # the node imports torch and loads the model before it listens
WAIT = 90  # for a study to go through (2 shared cores)
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33",
              "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.35"}


# ------------------------------------------------------------------------------------------------ helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Study:
    uid: str
    files: list[Path]
    patient_name: str
    patient_id: str

    @property
    def key(self) -> str:
        return study_key(self.uid)  # under the tests' site key (conftest sets ICHSCAN_KEY_FILE)


def studies_in(folder: Path) -> list[Study]:
    """The studies of a phantom folder written with layout="series" (<patient>/<study>/<series>/*.dcm)."""
    from pydicom import dcmread

    found = []
    for study_dir in sorted(p for p in folder.glob("*/*") if p.is_dir()):
        files = sorted(study_dir.rglob("*.dcm"))
        ds = dcmread(files[0], stop_before_pixels=True)
        found.append(Study(str(ds.StudyInstanceUID), files, str(ds.PatientName), str(ds.PatientID)))
    return found


class Pacs:
    """A storage SCP (pynetdicom) that keeps what it receives, like the PACS the node sends results to."""

    def __init__(self, port: int):
        self.port = port
        self.received: list = []
        self._lock = threading.Lock()
        self._ae = None

    def start(self) -> Pacs:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title="PACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, decodable_transfer_syntaxes())
        ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self._ae = ae
        return self

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000

    def stop(self) -> None:
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    def of_study(self, uid: str) -> list:
        with self._lock:
            return [ds for ds in self.received if str(ds.StudyInstanceUID) == uid]


class NodeProcess:
    """``python -m ichscan listen`` as a subprocess; ready once echoscu gets an answer."""

    count = 0

    def __init__(self, workdir: Path, spool: Path, pacs_port: int, *, port: int | None = None, extra=()):
        self.workdir, self.spool, self.pacs_port = workdir, spool, pacs_port
        self.port = port or free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> NodeProcess:
        NodeProcess.count += 1
        n = NodeProcess.count
        self.out_path = self.workdir / f"node{n}.out"
        self.err_path = self.workdir / f"node{n}.err"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "ichscan", "listen", "--ae-title", "ICHSCAN", "--port", str(self.port),
               "--bind", "127.0.0.1", "--checkpoint", "bundled", "--send-to", f"PACS@127.0.0.1:{self.pacs_port}",
               "--spool", str(self.spool), "--idle", str(IDLE), "--retry-delay", "0.5", "--retry-max-delay", "1",
               *self.extra]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the node exited with {self.proc.returncode}:\n{self.stderr()}")
            if echo(self.port).returncode == 0:
                return
            time.sleep(0.3)
        pytest.fail(f"the node did not answer C-ECHO within {READY_TIMEOUT}s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def echo(port: int) -> subprocess.CompletedProcess:
    return subprocess.run([ECHOSCU, "-aet", "TESTSCU", "-aec", "ICHSCAN", "-to", "5", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60, check=False)


def storescu(port: int, files, *, wait: bool = True, options=()):
    """dcmtk's storescu, one association for the files given; returns the process (finished if ``wait``)."""
    cmd = [STORESCU, "-aet", "MODALITY", "-aec", "ICHSCAN", "-to", "10", *options, "127.0.0.1", str(port),
           *map(str, files)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        proc.communicate(timeout=120)
    return proc


def records(spool: Path) -> list[dict]:
    path = spool / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_records(spool: Path, key: str) -> list[dict]:
    return [r for r in records(spool) if r["study"] == key and r["status"] in FINAL]


def wait_for(what, timeout: float = WAIT, every: float = 0.1, message: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout}s waiting for {message or what}")


def wait_final(spool: Path, key: str, node: NodeProcess | None = None) -> dict:
    def found():
        if node is not None and node.proc.poll() is not None:
            pytest.fail(f"the node exited with {node.proc.returncode}:\n{node.stderr()}")
        return final_records(spool, key)

    return wait_for(found, message=f"the log line of study {key}")[0]


ANY_CODE = "1386000"  # SCT Intracranial hemorrhage: the finding of the label "any" (ichscan.dicomout.FINDINGS)


def probabilities_of(item, code: str) -> list[float]:
    """Values of the NUM items in every SR container (TID 1501 measurement group) whose finding is ``code``."""
    out = []
    children = list(item.get("ContentSequence", []))
    if any(c.get("ValueType") == "CODE" and c.ConceptCodeSequence[0].CodeValue == code for c in children):
        for c in children:
            if c.get("ValueType") == "NUM":
                mv = c.MeasuredValueSequence[0]
                out.append(float(mv.get("FloatingPointValue", mv.NumericValue)))
    for c in children:
        out += probabilities_of(c, code)
    return out


def check_results(pacs: Pacs, study: Study, record: dict) -> None:
    """The PACS holds the study's SR and key images (one per finding called); the SR refers to the study sent and
    holds the probability the log holds."""
    objects = pacs.of_study(study.uid)
    uids = {str(ds.SOPInstanceUID) for ds in objects}
    assert record["objects"] == record["sent"] == len(uids) >= 1
    srs = {str(ds.SOPInstanceUID): ds for ds in objects if str(ds.SOPClassUID) in SR_CLASSES}
    images = uids - set(srs)
    assert len(srs) == len(record["predictions"]) >= 1
    called = sum(yes for p in record["predictions"] for yes in p["decisions"].values())
    assert len(images) == called, "one key image per finding called positive"
    for sr in srs.values():
        assert str(sr.StudyInstanceUID) == study.uid
        evidence = sr.CurrentRequestedProcedureEvidenceSequence
        assert {str(e.StudyInstanceUID) for e in evidence} == {study.uid}
    values = sorted(v for sr in srs.values() for v in probabilities_of(sr, ANY_CODE))
    logged = sorted(p["any"] for p in record["predictions"])
    assert len(values) == len(logged)
    for v, p in zip(values, logged):
        assert math.isclose(v, p, rel_tol=1e-9, abs_tol=1e-12), (v, p)
    # Borderline calls (ichscan.thresholds): the log names the labels the SR marks Equivocal, and `any` is among
    # them exactly when its probability lies inside the bundled model's interval for it
    points = json.loads(Path(resolve_checkpoint("bundled")).read_text())["operating_points"]
    t, (lo, hi) = points["thresholds"]["any"], points["details"]["any"]["threshold_ci"]
    marked = {round(probabilities_of(sr, ANY_CODE)[0], 9): sorted(equivocal_labels(sr)) for sr in srs.values()}
    for p in record["predictions"]:
        assert sorted(p["borderline"]) == marked[round(p["any"], 9)]
        assert ("any" in p["borderline"]) == (min(lo, t) <= p["any"] < max(hi, t))


def equivocal_labels(item) -> set[str]:
    """The labels whose TID 1501 group carries Certainty of Finding (DCM 111012) = Equivocal (SCT 42425007)."""
    from ichscan.dicomout import FINDINGS

    by_code = {v[1]: k for k, v in FINDINGS.items()}
    out = set()
    children = list(item.get("ContentSequence", []))
    codes = [(c.ConceptNameCodeSequence[0].CodeValue, c.ConceptCodeSequence[0].CodeValue) for c in children
             if c.get("ValueType") == "CODE"]
    finding = [v for name, v in codes if name == "121071"]  # DCM Finding
    if finding and ("111012", "42425007") in codes:
        out.add(by_code[finding[0]])
    for c in children:
        out |= equivocal_labels(c)
    return out


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[Study]:
    from ichscan.phantom import generate_dataset

    out = tmp_path_factory.mktemp("listen-phantoms")
    generate_dataset(out, studies=5, seed=41, size=96, slices=(12, 16), layout="series")
    return studies_in(out)


@pytest.fixture(scope="module")
def long_study(tmp_path_factory) -> Study:
    """40 slices of 128 px: its prediction lasts long enough to be killed in the middle of."""
    from ichscan.phantom import generate_dataset

    out = tmp_path_factory.mktemp("listen-long")
    generate_dataset(out, studies=1, seed=42, size=128, slices=(40, 40), layout="series")
    return studies_in(out)[0]


def rle_copy(study: Study, folder: Path) -> Study:
    """The study's files compressed with RLE Lossless (a compressed transfer syntax the node must take)."""
    from pydicom import dcmread
    from pydicom.uid import RLELossless

    folder.mkdir(parents=True)
    files = []
    for f in study.files:
        ds = dcmread(f)
        ds.compress(RLELossless, encoding_plugin="pydicom")
        ds.save_as(folder / f.name, enforce_file_format=True)
        files.append(folder / f.name)
    return Study(study.uid, files, study.patient_name, study.patient_id)


def unusable_study(study: Study, folder: Path) -> Study:
    """A study no CT series can come from: two MR images and one CT whose pixel data is cut in half."""
    from pydicom import dcmread
    from pydicom.uid import MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    study_uid, mr_series, ct_series = generate_uid(), generate_uid(), generate_uid()
    files = []
    for i, f in enumerate(study.files[:3]):
        ds = dcmread(f)
        ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if i < 2:
            ds.Modality = "MR"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.SeriesInstanceUID = mr_series
        else:
            ds.SeriesInstanceUID = ct_series
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        path = folder / f"bad{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Study(study_uid, files, study.patient_name, study.patient_id)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, phantoms):
    """One PACS and one node for the tests that need no restart."""
    if not DCMTK or not _has_dicom_out():
        pytest.skip("needs dcmtk and predict_path(dicom_out=...)")
    work = tmp_path_factory.mktemp("listen-shared")
    pacs = Pacs(free_port()).start()
    node = NodeProcess(work, work / "spool", pacs.port, extra=["--keep-instances"])
    try:
        node.start()
        yield work, pacs, node
    finally:
        node.close()
        pacs.stop()


# ------------------------------------------------------------------------------------------------ tests, no network

def test_peer_parse():
    assert Peer.parse("PACS@10.0.0.5:104") == Peer("PACS", "10.0.0.5", 104)
    assert Peer.parse("ORTHANC@[::1]:4242") == Peer("ORTHANC", "::1", 4242)
    for bad in ("PACS", "PACS@host", "@host:104", "PACS@:104", "PACS@host:x", "PACS@host:70000",
                "A_TITLE_LONGER_THAN_16@host:104"):
        with pytest.raises(IchscanError):
            Peer.parse(bad)


def test_accepted_transfer_syntaxes():
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
    )

    syntaxes = decodable_transfer_syntaxes()
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless):
        assert ts in syntaxes


def test_recovery_writes_each_final_line_once(tmp_path):
    """A study moved to done/ whose log line a crash cut short (or never wrote) is logged exactly once."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    first = {"study": "study-a", "delivery": "00000001-study-a", "status": "done"}
    second = {"study": "study-b", "delivery": "00000002-study-b", "status": "failed", "reason": "no usable CT series"}
    for state, record in (("done", first), ("failed", second)):
        folder = spool.path(state, record["delivery"])
        (folder / INSTANCES).mkdir(parents=True)
        (folder / INSTANCES / "1.2.3.dcm").write_bytes(b"x")
        (folder / OUTCOME_FILE).write_text(json.dumps({"log": record}))
    spool.append_log(first)
    with open(spool.log_path, "a") as fh:  # the second line, cut by SIGKILL
        fh.write('{"study": "study-b", "deliv')
    (spool.path("done", first["delivery"]) / ".x.dcm.123.abcd.tmp").write_bytes(b"half")

    assert spool.recover() == [second]
    assert spool.recover() == []  # idempotent
    assert [r["delivery"] for r in spool.read_log()] == [first["delivery"], second["delivery"]]
    assert not (spool.path("done", first["delivery"]) / INSTANCES).exists()  # done: images removed
    assert (spool.path("failed", second["delivery"]) / INSTANCES / "1.2.3.dcm").exists()  # failed: kept
    assert not list(spool.path("done", first["delivery"]).glob(".*.tmp"))


def test_cli_refuses_bad_destination(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ichscan", "listen", "--send-to", "PACS@nowhere",
                          "--spool", str(tmp_path / "s")], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1
    assert "AE@HOST:PORT" in out.stderr
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------ tests, end to end

@needs_dcmtk
@needs_results
def test_echo_store_and_results(shared, phantoms):
    _, pacs, node = shared
    assert echo(node.port).returncode == 0
    study = phantoms[0]
    sent = storescu(node.port, study.files)
    assert sent.returncode == 0, sent.stdout
    record = wait_final(node.spool, study.key, node)
    assert record["status"] == "done", record
    assert record["instances"] == len(study.files)
    assert record["series"] == 1 and record["runs"] == 1 and record["send_attempts"] == 1
    assert record["received"] <= record["started"] <= record["finished"]
    check_results(pacs, study, record)
    done = node.spool / "done" / record["delivery"]
    assert (done / "results").is_dir() and len(list((done / INSTANCES).glob("*.dcm"))) == len(study.files)

    # The PACS routes the results back to the node with the study: acknowledged, passed over, no new delivery.
    returned = sorted((done / "results").rglob("*.dcm"))
    assert storescu(node.port, returned, options=["-R"]).returncode == 0  # -R: propose the files' own classes
    time.sleep(IDLE + 1.5)
    assert not list((node.spool / "incoming").iterdir()) and not list((node.spool / "queue").iterdir())
    assert len([r for r in records(node.spool) if r["study"] == study.key]) == 1


@needs_dcmtk
@needs_results
def test_two_associations_at_once(shared, phantoms, tmp_path):
    """Two storescu at once, one of them RLE-compressed: each study arrives whole and gets its results."""
    _, pacs, node = shared
    plain, compressed = phantoms[1], rle_copy(phantoms[2], tmp_path / "rle")
    procs = [storescu(node.port, plain.files, wait=False),
             storescu(node.port, compressed.files, wait=False, options=["-xr"])]  # propose RLE Lossless first
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    for study in (plain, compressed):
        record = wait_final(node.spool, study.key, node)
        assert record["status"] == "done", record
        assert record["instances"] == len(study.files)
        check_results(pacs, study, record)
    # stored as sent (the shared node keeps the images of done studies): not decoded, not re-encoded
    from pydicom import dcmread
    from pydicom.uid import RLELossless

    stored = next((node.spool / "done").glob(f"*{compressed.key}")) / INSTANCES
    assert {str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for f in stored.glob("*.dcm")} == {RLELossless}


@needs_dcmtk
@needs_results
def test_a_scan_sent_as_two_reconstructions_is_predicted_once(shared, phantoms, tmp_path):
    """A study holding one scan twice (the second noisier, as thin slices or a sharper kernel make it): the node
    predicts the smoother, logs the other as rejected (one_per_scan) and sends one SR."""
    from _dicomfactory import reconstruct_series

    _, pacs, node = shared
    study = phantoms[4]
    reconstruct_series(study.files[0].parent, tmp_path / "noisy", grain_hu=6.0)
    noisy = sorted((tmp_path / "noisy").glob("*.dcm"))
    assert storescu(node.port, [*study.files, *noisy]).returncode == 0
    record = wait_final(node.spool, study.key, node)
    assert record["status"] == "done", record
    assert record["series"] == 2 and len(record["predictions"]) == 1
    assert [r["rule"] for r in record["rejected"]] == ["one_per_scan"]
    assert record["rejected"][0]["slices"] == len(noisy)
    check_results(pacs, study, record)  # one SR, for the series predicted


@needs_dcmtk
@needs_results
def test_unusable_study_goes_to_failed(shared, phantoms, tmp_path):
    _, pacs, node = shared
    bad = unusable_study(phantoms[3], tmp_path / "bad")
    sent = storescu(node.port, bad.files)
    assert sent.returncode == 0, sent.stdout  # acknowledged: the node owns them now
    record = wait_final(node.spool, bad.key, node)
    assert record["status"] == "failed"
    assert record["reason"].startswith("no usable CT series") and "\n" not in record["reason"]
    assert record["instances"] == 3 and record["sent"] == 0
    kept = node.spool / "failed" / record["delivery"] / INSTANCES
    assert len(list(kept.glob("*.dcm"))) == 3  # kept for inspection
    assert pacs.of_study(bad.uid) == []


@needs_dcmtk
@needs_results
def test_second_node_on_the_same_spool_is_refused(shared):
    _, pacs, node = shared
    other = subprocess.run([sys.executable, "-m", "ichscan", "listen", "--port", str(free_port()), "--send-to",
                            f"PACS@127.0.0.1:{pacs.port}", "--spool", str(node.spool)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert other.returncode == 1
    assert "another ichscan run is writing this folder" in other.stderr


@needs_dcmtk
@needs_results
def test_log_has_no_patient_name_or_id(shared, phantoms):
    """Run last among the shared node's tests: everything they sent went through the log."""
    _, _, node = shared
    text = (node.spool / "log.jsonl").read_text() + node.stdout() + node.stderr()
    assert records(node.spool), "nothing logged"
    for study in phantoms:
        for secret in (study.patient_name, study.patient_id, study.uid):
            assert secret not in text
    names = [p.name for p in node.spool.rglob("*") if p.is_dir()]
    assert not any(study.uid in name for study in phantoms for name in names)


@needs_dcmtk
@needs_results
def test_nothing_lost_across_kills(tmp_path, phantoms, long_study):
    """SIGKILL after half a study was acknowledged, and again mid-prediction; PACS down at the restart; each study
    is done exactly once and its results arrive; an unusable study is failed; SIGTERM stops the node cleanly."""
    spool = tmp_path / "spool"
    pacs = Pacs(free_port()).start()
    nodes = []
    try:
        # 1. Half of a study acknowledged, then SIGKILL before it is complete.
        first = phantoms[4]
        half = len(first.files) // 2
        node = NodeProcess(tmp_path, spool, pacs.port).start()
        nodes.append(node)
        assert storescu(node.port, first.files[:half]).returncode == 0
        node.kill()
        kept = spool / "incoming" / first.key / INSTANCES
        assert len(list(kept.glob("*.dcm"))) == half  # every acknowledged instance is on disk

        # 2. Restart; the rest arrives and joins it.
        node = NodeProcess(tmp_path, spool, pacs.port, port=node.port).start()
        nodes.append(node)
        assert storescu(node.port, first.files[half:]).returncode == 0
        record = wait_final(spool, first.key, node)
        assert record["status"] == "done" and record["instances"] == len(first.files) and record["runs"] == 1
        check_results(pacs, first, record)

        # 3. SIGKILL while the long study is being predicted.
        assert storescu(node.port, long_study.files).returncode == 0
        processing = spool / "processing"

        def predicting_of(study: Study):
            def check():  # study.json says "started" just before the model is called
                for folder in processing.glob(f"*{study.key}"):
                    with contextlib.suppress(OSError, ValueError):
                        return "started" in json.loads((folder / "study.json").read_text())
                return False
            return check

        wait_for(predicting_of(long_study), every=0.005, message="the long study's prediction to start")
        node.kill()
        left = list(processing.glob(f"*{long_study.key}"))
        assert len(left) == 1 and not (left[0] / OUTCOME_FILE).exists(), "killed too late: prediction had finished"
        assert pacs.of_study(long_study.uid) == [] and final_records(spool, long_study.key) == []

        # 4. The PACS is down when the node comes back: the redone study waits in outbox/ and is retried, across
        #    one more SIGKILL (the attempts are counted on disk).
        pacs.stop()

        def failed_sends(at_least: int):
            def check():
                for folder in (spool / "outbox").glob(f"*{long_study.key}"):
                    with contextlib.suppress(OSError, ValueError):
                        outcome = json.loads((folder / OUTCOME_FILE).read_text())
                        if outcome.get("send_attempts", 0) >= at_least:
                            return outcome
                return None
            return check

        node = NodeProcess(tmp_path, spool, pacs.port).start()
        nodes.append(node)
        outcome = wait_for(failed_sends(1), message="a failed send to the stopped PACS")
        assert "association" in outcome["send_error"]
        node.kill()
        node = NodeProcess(tmp_path, spool, pacs.port).start()
        nodes.append(node)
        wait_for(failed_sends(outcome["send_attempts"] + 1), message="a resend after the restart")
        pacs = Pacs(pacs.port).start()
        record = wait_final(spool, long_study.key, node)
        assert record["status"] == "done" and record["runs"] == 2 and record["send_attempts"] >= 3
        assert record["instances"] == len(long_study.files)
        check_results(pacs, long_study, record)

        # 5. An unusable study is failed, its files kept.
        bad = unusable_study(phantoms[0], tmp_path / "bad")
        assert storescu(node.port, bad.files).returncode == 0
        record = wait_final(spool, bad.key, node)
        assert record["status"] == "failed" and record["reason"].startswith("no usable CT series")
        assert len(list((spool / "failed" / record["delivery"] / INSTANCES).glob("*.dcm"))) == 3

        # 6. SIGTERM while a study is predicted: the node finishes it, sends its results, and exits 0.
        last = phantoms[1]
        assert storescu(node.port, last.files).returncode == 0
        wait_for(predicting_of(last), every=0.005, message="the last study's prediction to start")
        assert node.terminate() == 0, node.stderr()
        assert "stopped" in node.stderr()
        record = final_records(spool, last.key)[0]
        assert record["status"] == "done"
        check_results(pacs, last, record)

        for study in (first, long_study, last):  # done: results kept, images removed (no --keep-instances)
            done = next((spool / "done").glob(f"*{study.key}"))
            assert (done / "results").is_dir() and not (done / INSTANCES).exists()

        # Exactly one final line per study, none for anything else.
        finals = [r for r in records(spool) if r["status"] in FINAL]
        assert sorted(r["study"] for r in finals) == sorted([first.key, long_study.key, bad.key, last.key])
        for state in ("incoming", "queue", "processing", "outbox"):
            assert not list((spool / state).iterdir()), state
    finally:
        for node in nodes:
            node.close()
        pacs.stop()
