"""``ichscan listen``: a DICOM node that receives studies, predicts, and sends SR and key images to a PACS."""

from __future__ import annotations

import argparse
import sys

from ichscan.cli._args import non_negative_float, positive_int

EPILOG = """\
examples:
  ichscan listen --send-to PACS@10.0.0.5:104 --spool /var/spool/ichscan --bind 0.0.0.0
  ichscan listen --ae-title ICHSCAN --port 11112 --checkpoint model.json --send-to PACS@pacs:104 \\
                 --spool spool/ --idle 30 --allow-caller CT01 --allow-caller PACS

The node answers C-ECHO and accepts C-STORE of any storage class (uncompressed, deflated, and the
compressed transfer syntaxes pydicom can decode here). Each instance is on disk (fsynced) before it is
acknowledged. A study with no new instance for --idle seconds is complete; complete studies are predicted
one at a time, in order, and the SR (TID 1500) and key images are sent to --send-to (retried with
backoff while it is down). spool/log.jsonl gets one JSON line per study: pseudonymous keys, times,
findings, objects sent, status. Kill it at any moment and start it again on the same spool: nothing
acknowledged is lost, and each study is reported done exactly once. SIGTERM or Ctrl-C stops it cleanly.
No TLS, no query/retrieve, no access control beyond AE titles: run it inside the hospital network only.
Research software, not a medical device: its findings must not be used for patient care.
See docs/hospital.md.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "listen",
        help="run a DICOM node: receive studies (C-STORE), predict, send SR and key images to a PACS",
        description="A DICOM node beside a PACS: C-ECHO and C-STORE in, prediction per complete study, "
                    "DICOM SR and key images out by C-STORE.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    n = p.add_argument_group("network")
    n.add_argument("--ae-title", default="ICHSCAN", help="this node's AE title (default ICHSCAN)")
    n.add_argument("--port", type=_port, default=11112, help="port to listen on (default 11112)")
    n.add_argument("--bind", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    n.add_argument("--send-to", required=True, metavar="AE@HOST:PORT",
                   help="where results go (the PACS, or a router), e.g. PACS@10.0.0.5:104")
    n.add_argument("--allow-caller", action="append", metavar="AE",
                   help="accept associations only from this calling AE title (repeatable; default: any)")
    n.add_argument("--network-timeout", type=_seconds, default=30.0, help="seconds (default 30)")
    s = p.add_argument_group("spool and log")
    s.add_argument("--spool", required=True, help="the node's folder (created mode 0700: it holds patients' images)")
    s.add_argument("--log", help="the per-study JSON lines log (default SPOOL/log.jsonl)")
    s.add_argument("--idle", type=_seconds, default=30.0,
                   help="a study is complete after this many seconds without a new instance (default 30)")
    s.add_argument("--keep-instances", action="store_true",
                   help="keep the received images of done studies in SPOOL/done (failed studies keep theirs always)")
    r = p.add_argument_group("sending results")
    r.add_argument("--retry-delay", type=_seconds, default=10.0,
                   help="seconds before the first resend when --send-to fails; doubles each time (default 10)")
    r.add_argument("--retry-max-delay", type=_seconds, default=600.0, help="longest wait between sends (default 600)")
    r.add_argument("--send-attempts", type=positive_int, default=20,
                   help="attempts before a study is marked send_failed (its results kept in SPOOL/failed) (default 20)")
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", "-c", default="bundled",
                   help="checkpoint .json/.safetensors or ensemble manifest; 'bundled' (the default): the model "
                        "shipped with ichscan, trained on synthetic phantoms only")
    m.add_argument("--thresholds", help='JSON {"method": ..., "thresholds": {label: t}}; otherwise the '
                                        "model's operating points when it carries them, else 0.5")
    m.add_argument("--tta", default="identity,hflip", help="TTA views or groups, as for predict (default identity,hflip)")
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    m.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 where the CPU/GPU computes it natively, else fp32")
    m.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    m.add_argument("--slab", type=non_negative_float, default=0.0, metavar="MM",
                   help="read thin series as slabs of about MM, as for predict (default 0: every slice as it is)")
    m.add_argument("--not-head-ok", action="store_true",
                   help="predict series that fail the head check too (with a warning in the node's output)")
    m.add_argument("--every-reconstruction", action="store_true",
                   help="predict every reconstruction of a scan, as for predict (default: only the least noisy)")
    p.add_argument("--shutdown-grace", type=_seconds, default=60.0,
                   help="on SIGTERM/Ctrl-C, seconds to let the study being predicted finish (default 60); "
                        "past that it is left in SPOOL/processing and redone at the next start")
    p.set_defaults(func=run)


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1 to 65535)")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not more than 0 seconds")
    return value


def run(args) -> int:
    import os
    import signal
    import threading
    from pathlib import Path

    from ichscan.fileio import lock_folder
    from ichscan.node import (
        Node,
        NodeConfig,
        Peer,
        Spool,
        check_ae_title,
        describe_outcome,
    )

    # What can be wrong with the command line is found before torch and the model load: a second, not ten.
    send_to = Peer.parse(args.send_to)
    check_ae_title(args.ae_title)
    Spool(args.spool, args.log).prepare()
    with lock_folder(args.spool):  # another node on this spool stops here (the node locks it again to run)
        pass

    from ichscan.model import BUNDLED, resolve_checkpoint
    from ichscan.predict import Predictor, SelectionRules

    checkpoint = resolve_checkpoint(args.checkpoint)
    try:
        predictor = Predictor.from_checkpoint(checkpoint, device=args.device, tta=args.tta,
                                              precision=args.precision, batch_size=args.batch_size,
                                              slab_mm=args.slab)
    except ValueError as err:
        print(f"ichscan listen: error: {err}", file=sys.stderr)
        return 2
    if args.checkpoint == BUNDLED:
        print(f"using the bundled model ({checkpoint}); trained on "
              f"{predictor.trained_on or 'data its manifest does not name'}", file=sys.stderr)
    elif predictor.trained_on:
        print(f"the model was trained on {predictor.trained_on}", file=sys.stderr)
    config = NodeConfig(
        spool=Path(args.spool), send_to=send_to, ae_title=args.ae_title, port=args.port, bind=args.bind,
        idle=args.idle, log_path=Path(args.log) if args.log else None,
        allowed_callers=tuple(args.allow_caller or ()), retry_delay=args.retry_delay,
        retry_max_delay=args.retry_max_delay, send_attempts=args.send_attempts,
        network_timeout=args.network_timeout, keep_instances=args.keep_instances)
    rules = SelectionRules(not_head_ok=args.not_head_ok, one_per_scan=not args.every_reconstruction)
    node = Node(config, predictor, rules=rules, thresholds=args.thresholds,
                on_record=lambda record: print(describe_outcome(record), flush=True))
    print(f"thresholds: {node.thresholds_from}", file=sys.stderr)

    stop = threading.Event()
    signals = []

    def on_signal(signum, frame):
        signals.append(signum)
        if len(signals) > 1:  # asked twice: leave now; the spool is consistent at every moment
            print("ichscan listen: stopped at once; the next start recovers the spool", file=sys.stderr, flush=True)
            os._exit(130)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    node.start()
    host, port = node.address
    counts = node.counts()
    waiting = counts["incoming"] + counts["queue"] + counts["processing"] + counts["outbox"]
    print(f"listening as {args.ae_title} on {host}:{port}; results to {send_to}; spool {args.spool}"
          + (f" ({waiting} study(ies) from before resumed)" if waiting else ""), file=sys.stderr, flush=True)
    broken = False
    while not stop.wait(1.0):
        if not node.healthy():
            broken = True
            break
    print("ichscan listen: stopping" + (f" after study {node.busy_with}" if node.busy_with else ""),
          file=sys.stderr, flush=True)
    clean = node.stop(grace=args.shutdown_grace)
    if broken:
        print("ichscan listen: error: a thread of the node stopped (see above); start it again: the spool is "
              "recovered", file=sys.stderr, flush=True)
        os._exit(1)
    if not clean:
        print(f"ichscan listen: study {node.busy_with} not finished within {args.shutdown_grace:g}s; it is left in "
              "processing/ and redone at the next start", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)  # the worker thread is still in the model: do not wait for it at interpreter exit
    print("ichscan listen: stopped", file=sys.stderr)
    return 0
