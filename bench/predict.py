"""CPU prediction speed: ichscan's Predictor against plain timm fp32 eager on the same model and inputs.

Prints one JSON object. Both sides start from the same DICOM folders and give series probabilities
(identity + horizontal flip TTA, maximum over slices) from the same checkpoint:

* ``plain``: ``read_slice`` -> ``window_image`` (uint8, as ours) -> the model in fp32, eager, NCHW, under
  ``torch.no_grad`` -> sigmoid -> mean of views -> max over slices; nothing written.
* ``ours``: ``predict_path`` as ``ichscan predict`` runs it, writing every output file: uint8 windows
  through the lookup-table path, channels_last, ``torch.inference_mode``, bf16 autocast where the CPU
  computes bf16 natively (``precision="auto"``), and the next series decoded in a helper thread while
  the model runs. ``ours_fp32`` is the same without bf16 (what a CPU without AVX512-BF16/AMX gets);
  ``ours_compiled`` adds ``--compile`` (torch.compile, Inductor with frozen weights), whose one-off
  compile is timed separately (``compile_seconds``) and left out of its throughput, as in a batch run.

Also: the latency of one 40-slice series from its folder to ``series.csv`` (model already loaded, and
cold, loading included) and how far ours is from plain fp32 (max |difference| of slice probabilities).

    python bench/predict.py                      # demo scale: resnet10t at 128 px, 4 series of 40 slices
    python bench/predict.py --arch seresnext50_32x4d --size 512 --series 1   # the paper's model
    python bench/predict.py --checkpoint runs/demo/models/model_a.json        # a trained checkpoint
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ichscan.dicom import find_series, read_slice
from ichscan.model import build_model, load_checkpoint, save_checkpoint
from ichscan.hardware import cpu_bf16_support
from ichscan.predict import Predictor, SelectionRules, predict_path
from ichscan.windows import PAPER_WINDOWS, PRESETS, window_image


def make_phantoms(out: Path, n_series: int, n_slices: int, seed: int = 0) -> Path:
    from ichscan.phantom import generate_dataset

    generate_dataset(out, studies=n_series, seed=seed, size=512, slices=(n_slices, n_slices), layout="series")
    return out


def plain_predict(model, folder: Path, windows, size: int) -> dict[str, np.ndarray]:
    """The straightforward pipeline: what one would write with timm and pydicom alone."""
    out = {}
    with torch.no_grad():
        for series in find_series(folder).series:
            x = np.stack([window_image(read_slice(s.path).hu, windows, size, np.uint8) for s in series.slices])
            x = torch.from_numpy(x).float() / 255.0  # the same uint8 windows as ours: same inputs
            p = (torch.sigmoid(model(x)) + torch.sigmoid(model(x.flip(-1)))) / 2
            out[series.series_uid] = p.numpy()
    return out


def ours_predict(predictor: Predictor, folder: Path, out_dir: Path) -> dict[str, np.ndarray]:
    shutil.rmtree(out_dir, ignore_errors=True)
    run = predict_path(folder, out_dir, predictor, rules=SelectionRules.permissive())
    return {p.series_uid: p.slice_probs for p in run.predictions}


def timed(fn, *args):
    t = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet10t", help="timm backbone (default: the demo's resnet10t)")
    ap.add_argument("--size", type=int, default=128, help="image size (default: the demo's 128)")
    ap.add_argument("--checkpoint", help="a trained checkpoint instead of an untrained --arch")
    ap.add_argument("--series", type=int, default=4, help="series in the throughput run (default 4)")
    ap.add_argument("--slices", type=int, default=40, help="slices per series (default 40)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats, best kept (default 5)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--input", help="an existing folder of series instead of generated phantoms")
    args = ap.parse_args()
    logging.getLogger("ichscan").setLevel(logging.ERROR)  # skipped non-DICOM files beside the phantoms

    work = Path(tempfile.mkdtemp(prefix="ichscan-bench-predict-"))
    try:
        data = Path(args.input) if args.input else make_phantoms(work / "phantoms", args.series, args.slices)
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        else:
            torch.manual_seed(0)
            meta = {"windows": [PRESETS[w].to_dict() for w in PAPER_WINDOWS], "image_size": args.size}
            ckpt = save_checkpoint(work / "model", build_model(args.arch), meta)
        model, meta = load_checkpoint(ckpt)
        windows, size = meta.windows, meta.image_size
        series = find_series(data).series
        one = min(series, key=lambda s: abs(len(s) - args.slices))
        one_dir = work / "one"
        one_dir.mkdir()
        for s in one.slices:
            shutil.copy(s.path, one_dir / Path(s.path).name)

        ours = Predictor.from_checkpoint(ckpt, precision="auto", batch_size=args.batch_size)
        ours32 = Predictor.from_checkpoint(ckpt, precision="fp32", batch_size=args.batch_size)
        oursc = Predictor.from_checkpoint(ckpt, precision="auto", batch_size=args.batch_size, compile=True)
        # Warm-up on one series for every side (oneDNN builds its kernels on first use).
        plain_predict(model, one_dir, windows, size)
        ours_predict(ours, one_dir, work / "warm")
        ours_predict(ours32, one_dir, work / "warm")
        compile_seconds = timed(ours_predict, oursc, one_dir, work / "warm")[0]

        times: dict[str, list[float]] = {"plain": [], "ours": [], "ours_fp32": [], "ours_compiled": []}
        results = {}
        for _ in range(args.repeats):  # interleaved, best of: the machine is shared
            for name, fn, fargs in (("plain", plain_predict, (model, data, windows, size)),
                                    ("ours", ours_predict, (ours, data, work / "out")),
                                    ("ours_fp32", ours_predict, (ours32, data, work / "out32")),
                                    ("ours_compiled", ours_predict, (oursc, data, work / "outc"))):
                t, results[name] = timed(fn, *fargs)
                times[name].append(t)
        n_series = len(results["plain"])
        n_slices = sum(len(p) for p in results["plain"].values())

        def rate(name):
            best = min(times[name])
            return {"seconds": round(best, 3), "series_per_s": round(n_series / best, 3),
                    "slices_per_s": round(n_slices / best, 1)}

        def max_diff(name):
            assert results[name].keys() == results["plain"].keys()
            return float(max(np.abs(results[name][k].astype(np.float64) - results["plain"][k]).max()
                             for k in results["plain"]))

        # Model only: one series' worth of images (all TTA views in one batch), same tensor for both.
        x = torch.from_numpy(ours.preprocess([read_slice(s.path).hu for s in one.slices])).float() / 255.0
        x = torch.cat([x, x.flip(-1)])
        member = ours.ensemble.members[0].model

        def model_plain():
            with torch.no_grad():
                return model(x)

        def model_ours():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                         enabled=ours.precision == "bf16"):
                return member(x.contiguous(memory_format=torch.channels_last))

        model_plain(), model_ours()
        model_times = {"plain": [], "ours": []}
        for _ in range(3 * args.repeats):  # short calls: many tries catch the quiet moments
            model_times["plain"].append(timed(model_plain)[0])
            model_times["ours"].append(timed(model_ours)[0])
        model_ms = {k: round(1000 * min(v) / len(x), 3) for k, v in model_times.items()}
        model_ms.update({f"{k}_median": round(1000 * float(np.median(v)) / len(x), 3) for k, v in model_times.items()})

        latency_warm = min(timed(ours_predict, ours, one_dir, work / f"lat{i}")[0] for i in range(args.repeats))

        def cold():
            p = Predictor.from_checkpoint(ckpt, precision="auto", batch_size=args.batch_size)
            return ours_predict(p, one_dir, work / "cold")

        latency_cold = timed(cold)[0]
        report = {
            "benchmark": "ichscan predict, CPU",
            "arch": meta.arch,
            "image_size": size,
            "checkpoint": "trained" if args.checkpoint else "untrained (speed does not depend on weights)",
            "series": n_series,
            "slices": n_slices,
            "tta": list(ours.tta),
            "batch_size": args.batch_size,
            "cpu": platform.processor() or platform.machine(),
            "cpu_bf16": cpu_bf16_support(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "precision_auto": ours.precision,
            "plain_timm_fp32_eager": rate("plain"),
            "ours": rate("ours"),
            "ours_fp32": rate("ours_fp32"),
            "ours_compiled": rate("ours_compiled"),
            "speedup": round(min(times["plain"]) / min(times["ours"]), 2),
            "speedup_fp32": round(min(times["plain"]) / min(times["ours_fp32"]), 2),
            "speedup_compiled": round(min(times["plain"]) / min(times["ours_compiled"]), 2),
            "compile_seconds": round(compile_seconds, 1),
            "target_speedup": 2.0,
            "model_only_ms_per_image": dict(model_ms, speedup=round(model_ms["plain"] / model_ms["ours"], 2)),
            "timing": "best of the interleaved repeats (the 2 cores are shared); medians in median_s",
            "median_s": {k: round(float(np.median(v)), 3) for k, v in times.items()},
            "max_abs_prob_diff_vs_plain": {k: max_diff(k) for k in ("ours", "ours_fp32", "ours_compiled")},
            "latency_one_series_s": {"slices": len(one), "warm": round(latency_warm, 3), "cold": round(latency_cold, 3)},
        }
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
