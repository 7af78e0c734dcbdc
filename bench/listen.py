"""``ichscan listen`` latency: from the last instance of a study acknowledged to its SR received at the PACS.

Prints one JSON object (logs go to stderr). On loopback, in one run:

* ``node``: the node runs as ``python -m ichscan listen`` (a subprocess, model loaded once at its start).
  This script is the modality (a pynetdicom C-STORE SCU sending the 40 slices over one association) and the
  PACS (a pynetdicom storage SCP). The study is sent once to warm the node up (oneDNN builds its kernels on
  first use), then ``--repeats`` times; each time the clock runs from the last C-STORE response to the
  arrival of the SR. That includes ``--idle`` (the quiet time after which a study counts as complete: 30 s
  by default in production, ``--idle`` here), so ``after_idle_s`` is also given: latency minus idle.
  From the node's log line: prediction (series selection, model, SR and key images) and sending, per run.
* ``baseline``: the same prediction through the library with the model loaded, as the node calls it,
  ``predict_path(folder, out, predictor, dicom_out=...)`` on the same 40 files, in a process of its own as the
  node has (best of ``--repeats`` after a warm-up); and ``ichscan predict FOLDER --out ... --dicom-out ...`` as a command, once (a fresh process:
  imports and model loading included), what a folder-based workflow pays per study.
* ``ratio``: node latency after idle / baseline in the library (the node's own cost: spool, renames,
  fsyncs, association), and node latency (idle included) / the command.

Models: ``bundled`` (the demo model shipped with ichscan) and ``paper`` (seresnext50_32x4d at 512 px, the
paper's backbone, random weights: nothing can be downloaded here, and speed does not depend on weights).

    python bench/listen.py                               # both models
    python bench/listen.py --models bundled --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pacs:
    """A storage SCP that notes when each object arrived."""

    def __init__(self):
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.arrivals: list[tuple[float, str]] = []  # (perf_counter, SOP class)
        self.cond = threading.Condition()
        ae = AE(ae_title="PACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        self.port = free_port()
        ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.ae = ae

    def _store(self, event) -> int:
        with self.cond:
            self.arrivals.append((time.perf_counter(), str(event.request.AffectedSOPClassUID)))
            self.cond.notify_all()
        return 0x0000

    def wait_sr(self, after: float, timeout: float) -> float:
        """Arrival time of the first SR that came after ``after``."""
        deadline = time.perf_counter() + timeout
        with self.cond:
            while True:
                for t, sop_class in self.arrivals:
                    if t > after and sop_class.startswith(SR_PREFIX):
                        return t
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise TimeoutError(f"no SR within {timeout}s")
                self.cond.wait(left)

    def stop(self) -> None:
        self.ae.shutdown()


def send_study(datasets, port: int) -> float:
    """C-STORE every dataset over one association; returns perf_counter after the last response."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHSCAN")
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0x0000:
                raise RuntimeError(f"C-STORE failed: {status}")
        acked = time.perf_counter()
    finally:
        assoc.release()
    return acked


def echo(port: int) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHSCAN")
    if not assoc.is_established:
        return False
    ok = getattr(assoc.send_c_echo(), "Status", None) == 0x0000
    assoc.release()
    return ok


def last_record(log_path: Path) -> dict:
    return json.loads(log_path.read_text().splitlines()[-1])


def seconds_between(a: str, b: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def run_node(checkpoint: str, datasets, pacs: Pacs, work: Path, idle: float, repeats: int, timeout: float) -> dict:
    spool = work / "spool"
    port = free_port()
    cmd = [sys.executable, "-m", "ichscan", "listen", "--port", str(port), "--checkpoint", checkpoint,
           "--send-to", f"PACS@127.0.0.1:{pacs.port}", "--spool", str(spool), "--idle", str(idle)]
    with open(work / "node.err", "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        while not echo(port):
            if proc.poll() is not None:
                raise RuntimeError(f"the node exited: {(work / 'node.err').read_text()}")
            time.sleep(0.2)
        ready = time.perf_counter() - t0
        runs = []
        for i in range(repeats + 1):  # the first one warms the node up
            acked = send_study(datasets, port)
            arrived = pacs.wait_sr(acked, timeout)
            log_path = spool / "log.jsonl"
            while not log_path.exists() or len(log_path.read_text().splitlines()) < i + 1:
                time.sleep(0.05)  # the log line follows the last object stored
            record = last_record(log_path)
            runs.append({
                "warm_up": i == 0,
                "latency_s": round(arrived - acked, 3),
                "after_idle_s": round(arrived - acked - idle, 3),
                "prediction_s": round(seconds_between(record["started"], record["predicted"]), 3),
                "send_s": round(seconds_between(record["predicted"], record["finished"]), 3),
                "objects": record["objects"],
                "status": record["status"],
            })
            print(f"node {checkpoint}: run {i}: {runs[-1]}", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(300)
    timed = [r for r in runs if not r["warm_up"]]
    best = min(timed, key=lambda r: r["latency_s"])
    return {
        "startup_s": round(ready, 2),
        "latency_s": best["latency_s"],
        "after_idle_s": best["after_idle_s"],
        "latency_median_s": round(float(np.median([r["latency_s"] for r in timed])), 3),
        "runs": runs,
    }


def library_loop(checkpoint: str, folder: Path, work: Path, runs: int) -> None:
    """In a fresh process, as the node has one: load the model once, then ``predict_path`` ``runs`` times on the
    folder, each into new folders; prints the seconds of each run as JSON."""
    from ichscan.model import resolve_checkpoint
    from ichscan.predict import Predictor, predict_path

    logging.getLogger("ichscan").setLevel(logging.ERROR)
    predictor = Predictor.from_checkpoint(resolve_checkpoint(checkpoint))
    times, objects = [], 0
    for i in range(runs):
        t = time.perf_counter()
        run = predict_path(folder, work / f"base{i}", predictor, dicom_out=work / f"base{i}-dicom")
        times.append(time.perf_counter() - t)
        objects = len(run.dicom_files)
        print(f"baseline {checkpoint}: run {i}: {times[-1]:.3f}s", file=sys.stderr)
    print(json.dumps({"times": times, "objects": objects}))


def run_baseline(checkpoint: str, folder: Path, work: Path, repeats: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--library-loop", checkpoint, str(folder), str(work),
                          str(repeats + 1)], check=True, stdout=subprocess.PIPE, text=True)
    loop = json.loads(out.stdout.strip().splitlines()[-1])
    times = loop["times"]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ichscan", "predict", str(folder), "--checkpoint", checkpoint, "--out",
                    str(work / "cli"), "--dicom-out", str(work / "cli-dicom"), "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cli = time.perf_counter() - t
    print(f"baseline {checkpoint}: ichscan predict: {cli:.3f}s", file=sys.stderr)
    return {"library_s": round(min(times[1:]), 3), "library_median_s": round(float(np.median(times[1:])), 3),
            "library_first_s": round(times[0], 3), "ichscan_predict_command_s": round(cli, 3),
            "objects": loop["objects"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bundled,paper", help="comma separated: bundled, paper (default both)")
    ap.add_argument("--slices", type=int, default=40, help="slices of the series (default 40)")
    ap.add_argument("--size", type=int, default=512, help="phantom image size in pixels (default 512)")
    ap.add_argument("--idle", type=float, default=1.0,
                    help="the node's --idle (default 1 s here; 30 s in production)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side, bundled model (default 3)")
    ap.add_argument("--paper-repeats", type=int, default=2, help="timed runs per side, paper model (default 2)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for one SR (default 900)")
    ap.add_argument("--library-loop", nargs=4, metavar=("CKPT", "FOLDER", "WORK", "RUNS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.getLogger("ichscan").setLevel(logging.ERROR)
    if args.library_loop:  # the baseline's own process (run_baseline)
        checkpoint, folder, work, runs = args.library_loop
        library_loop(checkpoint, Path(folder), Path(work), int(runs))
        return

    import torch
    from pydicom import dcmread

    from ichscan.hardware import cpu_bf16_support
    from ichscan.model import build_model, save_checkpoint
    from ichscan.phantom import generate_dataset
    from ichscan.windows import PAPER_WINDOWS, PRESETS

    work = Path(tempfile.mkdtemp(prefix="ichscan-bench-listen-"))
    os.environ["ICHSCAN_KEY_FILE"] = str(work / "site.key")  # never the user's key
    pacs = None
    try:
        generate_dataset(work / "phantoms", studies=1, seed=0, size=args.size, slices=(args.slices, args.slices),
                         layout="series")
        files = sorted((work / "phantoms").rglob("*.dcm"))
        folder = work / "series"
        folder.mkdir()
        for f in files:
            shutil.copy(f, folder / f.name)
        datasets = [dcmread(f) for f in sorted(folder.iterdir())]
        checkpoints = {}
        for name in args.models.split(","):
            name = name.strip()
            if name == "bundled":
                checkpoints[name] = ("bundled", args.repeats)
            elif name == "paper":
                torch.manual_seed(0)
                meta = {"windows": [PRESETS[w].to_dict() for w in PAPER_WINDOWS], "image_size": 512}
                path = save_checkpoint(work / "paper" / "seresnext50", build_model("seresnext50_32x4d"), meta)
                checkpoints[name] = (str(path), args.paper_repeats)
            else:
                ap.error(f"unknown model {name!r}: expected bundled or paper")
        pacs = Pacs()
        results = {}
        for name, (checkpoint, repeats) in checkpoints.items():
            mwork = work / name
            mwork.mkdir(exist_ok=True)
            node = run_node(checkpoint, datasets, pacs, mwork, args.idle, repeats, args.timeout)
            base = run_baseline(checkpoint, folder, mwork, repeats)
            results[name] = {
                "checkpoint": "bundled (resnet10t ensemble of 2, 160 px)" if checkpoint == "bundled"
                else "seresnext50_32x4d, 512 px, random weights (timing only)",
                "node": node,
                "baseline": base,
                "ratio_after_idle_vs_library": round(node["after_idle_s"] / base["library_s"], 2),
                "ratio_latency_vs_command": round(node["latency_s"] / base["ichscan_predict_command_s"], 2),
            }
        report = {
            "benchmark": "ichscan listen: last instance acknowledged -> SR received at the PACS (loopback)",
            "series": {"slices": args.slices, "size": args.size, "source": "ichscan.phantom, uncompressed CT"},
            "idle_s": args.idle,
            "cpu": platform.processor() or platform.machine(),
            "cpu_bf16": cpu_bf16_support(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "timing": "node: best of the timed runs after one warm-up (median too); baseline: best of as many "
                      "runs after a warm-up; the command once",
            "models": results,
        }
        print(json.dumps(report, indent=1))
    finally:
        if pacs is not None:
            pacs.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
