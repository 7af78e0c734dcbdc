"""``ichscan index``: the header index of a DICOM folder (patient, study, series, z), built once."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "index", help="index DICOM headers once (parallel, resumable), cached as Parquet",
        description="One row per image: image_id, path, patient_id, study_uid, series_uid, sop_uid, z, "
                    "instance_number. Unreadable files are reported and skipped.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", help="folder of DICOM files (an RSNA layout's images/ is found by itself)")
    p.add_argument("--out", "-o", help="Parquet path (default DATA/ichscan_index.parquet)")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--refresh", action="store_true", help="rebuild even if the index exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from ichscan.data import build_index, find_images_dir

    root = Path(args.data)
    images = find_images_dir(root)
    out = Path(args.out) if args.out else root / "ichscan_index.parquet"
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            bar = tqdm(total=total, desc="index", unit="file")
        bar.n = done
        bar.refresh()

    index, report = build_index(images, out, workers=args.workers, progress=progress, refresh=args.refresh)
    if bar is not None:
        bar.close()
    for line in report.lines():
        print(line, file=sys.stderr)
    print(out)
    return 0
