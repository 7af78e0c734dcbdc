"""``ichscan cache``: window and resize every image once into a uint8 cache at the training size."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  ichscan cache rsna/ --out rsna/cache512 --size 512
  ichscan cache phantoms/train --out phantoms/train/cache128 --size 128
  ichscan train rsna/ --out runs/paper --cache rsna/cache512

The cache is one uint8 memmap (images.u8) with a status array; an interrupted run resumes where it
stopped, and files that cannot be read are listed (failures.json) while the rest are cached.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache", help="preprocess DICOM into a uint8 image cache at the training size (resumable)",
        description="Decode, window and resize every indexed image once, for when decoding is the bottleneck.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", help="folder of DICOM files (an RSNA layout's images/ is found by itself)")
    p.add_argument("--out", "-o", required=True, help="cache folder (created; reused to resume)")
    p.add_argument("--size", type=int, default=512, help="training image size in pixels (default 512)")
    p.add_argument("--windows", default="brain,blood,soft_tissue",
                   help="comma-separated window presets (default: the paper's brain,blood,soft_tissue)")
    p.add_argument("--index", help="header index Parquet (default DATA/ichscan_index.parquet)")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from ichscan.data import build_cache, build_index, find_images_dir

    root = Path(args.data)
    images = find_images_dir(root)
    index_path = Path(args.index) if args.index else root / "ichscan_index.parquet"
    bars: dict[str, tqdm] = {}

    def progress(name):
        def update(done: int, total: int) -> None:
            if args.no_progress:
                return
            bar = bars.setdefault(name, tqdm(total=total, desc=name, unit="img", leave=False))
            bar.n = done
            bar.refresh()
        return update

    index, report = build_index(images, index_path, workers=args.workers, progress=progress("index"))
    for line in report.lines():
        print(line, file=sys.stderr)
    windows = [w.strip() for w in args.windows.split(",") if w.strip()]
    result = build_cache(index, args.out, args.size, windows, workers=args.workers, progress=progress("cache"))
    for bar in bars.values():
        bar.close()
    for line in result.lines():
        print(line, file=sys.stderr)
    print(args.out)
    return 0 if result.done == result.total else 1
