"""Training throughput: the whole pipeline (DICOM or cache -> augment -> step) against the model alone.

Prints one JSON object. The pipeline runs through ``ichscan.train.train`` itself (DataLoader, batch
augmentation on the training device, mixed precision, channels_last); "model alone" is the same model,
optimizer, precision and loss on random tensors already on the device, in the same process. The target
is pipeline >= 90% of the model alone.

    python bench/train.py                                  # CPU: resnet10t at 128 px (quick preset)
    python bench/train.py --arch seresnext50_32x4d --size 512 --precision bf16 --device cuda \
        --batch 64 --workers 12 --compile --steps 40       # the paper's model on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_dicoms(folder: Path, n: int, source_px: int = 512) -> list[Path]:
    """``n`` real 512x512 int16 CT slices (pydicom, uncompressed): the cost of decoding RSNA's files."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:source_px, :source_px]
    r = np.hypot(yy - source_px / 2, xx - source_px / 2) / (source_px / 2)
    paths = []
    for i in range(n):
        hu = np.where(r < 0.8, 1000.0, -1000.0)
        hu[r < 0.72] = 30 + rng.normal(0, 6, (r < 0.72).sum())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = f"P{i // 32}", "1.2.3", "1.2.3.4"
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 5.0 * i], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.InstanceNumber = [0.45, 0.45], i + 1
        ds.Rows = ds.Columns = source_px
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.clip(np.round(hu + 1024), 0, 4095).astype(np.uint16).tobytes()
        path = folder / f"ID_{i:09x}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _seconds_per_step(stamps: dict[int, float], warmup: int) -> list[float]:
    """Seconds per step over each interval between readings after ``warmup`` (readings may skip steps)."""
    steps = sorted(k for k in stamps if k >= warmup)
    return [(stamps[b] - stamps[a]) / (b - a) for a, b in zip(steps, steps[1:])]


def model_alone(config, device: torch.device, steps: int, warmup: int) -> list[float]:
    """Seconds per training step on random uint8 batches already on the device.

    The loss is read (a device sync) as often as ``ichscan.train.train`` reads it: every step on a CPU,
    every ``config.log_every`` steps on a GPU."""
    from ichscan.model import build_model
    from ichscan.hardware import autocast_dtype
    from ichscan.train import training_precision, weighted_bce_loss

    torch.manual_seed(0)
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    model = build_model(config.arch, labels=config.labels).to(device=device, memory_format=fmt).train()
    net = torch.compile(model) if config.compile else model
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    amp = autocast_dtype(training_precision(config.precision, device))
    b, s = config.batch_size, config.image_size
    x = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device)
    y = (torch.rand(b, len(config.labels), device=device) < 0.2).float()
    every = 1 if device.type == "cpu" else config.log_every
    stamps: dict[int, float] = {}
    for step in range(1, warmup + steps + 1):
        images = (x.float() / 255).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = net(images)
        loss = weighted_bce_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == warmup or step == warmup + steps:
            float(loss.detach())
            stamps[step] = time.perf_counter()
    return _seconds_per_step(stamps, warmup)


def pipeline(config, dataset, steps: int, warmup: int, out: Path) -> list[float]:
    """Seconds per step of ``ichscan.train.train`` after ``warmup`` steps (from its progress reports)."""
    from ichscan.train import train

    stamps: dict[int, float] = {}

    def progress(event) -> None:
        if event.phase == "train":
            stamps[event.global_step] = time.perf_counter()

    train(config, dataset, None, out, progress=progress, stop_after_steps=warmup + steps)
    if warmup not in stamps:  # on a GPU progress comes every log_every steps: start at the first after warmup
        warmup = min((k for k in stamps if k > warmup), default=warmup)
    return _seconds_per_step(stamps, warmup)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet10t")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--files", type=int, default=64, help="distinct DICOM files (read repeatedly)")
    p.add_argument("--source", default="both", choices=("dicom", "cache", "both"))
    p.add_argument("--workers", type=int, help="DataLoader workers (default: ichscan's choice per source)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved rounds of (model alone, pipelines); rates use the median step time, "
                        "which keeps a busy shared machine from skewing one side")
    args = p.parse_args(argv)

    import pandas as pd

    from ichscan.augment import AugmentConfig
    from ichscan.data import SliceDataset, build_cache, build_index
    from ichscan.train import TrainConfig, default_workers, training_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    config = TrainConfig.from_preset(
        "quick", arch=args.arch, image_size=args.size, batch_size=args.batch, precision=args.precision,
        pretrained=False, compile=args.compile, channels_last=not args.no_channels_last, device=str(device),
        epochs=1, state_every=0, augment=AugmentConfig(),
    )
    total = args.batch * (args.warmup + args.steps)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(), "arch": args.arch, "image_size": args.size, "batch": args.batch,
        "precision": training_precision(args.precision, device),
        "channels_last": config.channels_last, "compile": args.compile, "timed_steps": args.steps,
        "source_pixels": "512x512 int16 DICOM",
    }
    with tempfile.TemporaryDirectory(prefix="ichscan-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        write_dicoms(tmp / "images", args.files)
        index, _ = build_index(tmp / "images", workers=1)
        for name in config.labels:
            index[name] = (np.random.default_rng(1).random(len(index)) < 0.3).astype(np.float32)
        frame = pd.concat([index] * (total // len(index) + 1), ignore_index=True).iloc[:total]
        workers = {src: args.workers if args.workers is not None else default_workers(device)
                   for src in ("dicom", "cache")}
        sources = ["dicom", "cache"] if args.source == "both" else [args.source]
        datasets = {}
        if "dicom" in sources:
            datasets["dicom"] = SliceDataset(frame, args.size, config.windows, config.labels)
        if "cache" in sources:
            build_cache(index, tmp / "cache", args.size, config.windows, workers=1)
            datasets["cache"] = SliceDataset(frame, args.size, config.windows, config.labels, cache=tmp / "cache")
        steps: dict[str, list[float]] = {"alone": []}
        for r in range(args.rounds):
            steps["alone"] += model_alone(config, device, args.steps, args.warmup)
            for src in sources:
                cfg = TrainConfig.from_dict({**config.to_dict(), "workers": workers[src]})
                steps.setdefault(src, []).extend(pipeline(cfg, datasets[src], args.steps, args.warmup,
                                                          tmp / f"run-{src}-{r}"))
    rate = {k: args.batch / float(np.median(v)) for k, v in steps.items()}
    result["model_alone_images_per_s"] = round(rate["alone"], 2)
    for src in sources:
        result[f"pipeline_{src}_images_per_s"] = round(rate[src], 2)
        result[f"ratio_{src}"] = round(rate[src] / rate["alone"], 3)
        result[f"workers_{src}"] = workers[src]
    result["mean_step_s"] = {k: round(float(np.mean(v)), 4) for k, v in steps.items()}
    result["target_met"] = max(result[f"ratio_{src}"] for src in sources) >= 0.9
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
