"""``ichscan render``: a PNG of a slice, or of a series as a contact sheet, in CT windows side by side."""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = """\
examples:
  ichscan render scan.dcm --out scan.png
  ichscan render study_folder/ --out sheet.png --max-slices 25
  ichscan render study.zip --out sheet.png --series 1.2.840....   (pick a series; default the largest)
  ichscan render scan.dcm --out bone.png --windows brain,bone
  ichscan render ct.nii.gz --out sheet.png           (a NIfTI volume in HU: its axial slices)

Windows are level/width presets: brain 40/80, blood 80/200, soft_tissue 40/380, bone 600/2800.
Research software, not a medical device: pictures are for checking data, not for diagnosis.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "render",
        help="draw a DICOM slice, a series or a NIfTI volume in CT windows side by side (PNG)",
        description="A slice, or a series as a contact sheet, in the paper's three windows side by side.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="a DICOM file, a NIfTI volume (.nii, .nii.gz), a folder or a .zip")
    p.add_argument("--out", "-o", required=True, help="PNG to write")
    p.add_argument("--windows", default="brain,blood,soft_tissue", help="comma-separated presets")
    p.add_argument("--max-slices", type=int, default=16, help="slices on a contact sheet, evenly spread (default 16)")
    p.add_argument("--series", help="SeriesInstanceUID to draw when there are several (a NIfTI volume's is its "
                   "path under the folder given)")
    p.add_argument("--tile", type=int, help="pixels per slice image (default: 512 for one slice, smaller on sheets)")
    p.add_argument("--any-modality", action="store_true", help="accept non-CT images (MR, NM, ...)")
    p.set_defaults(func=run)


def run(args) -> int:
    from PIL import Image

    from ichscan.errors import IchscanError
    from ichscan.fileio import atomic_path
    from ichscan.render import render_path

    if os.path.isdir(args.out):
        raise IchscanError("is a folder; --out needs a picture file name, e.g. sheet.png", args.out)
    extension = os.path.splitext(args.out)[1].lower()
    picture_format = Image.registered_extensions().get(extension)
    if picture_format is None:
        raise IchscanError(f"{extension or 'no extension'}: not a picture type Pillow writes; name the file .png",
                           args.out)
    windows = [w.strip() for w in args.windows.split(",") if w.strip()]
    try:
        result = render_path(args.path, windows, max_slices=args.max_slices, series_uid=args.series,
                             allow_non_ct=args.any_modality, tile=args.tile)
    except ValueError as err:  # an unknown window name
        print(f"ichscan render: error: {err}", file=sys.stderr)
        return 2
    with atomic_path(args.out) as tmp:  # the format by the name asked for, not the temporary's
        result.image.save(tmp, format=picture_format)
    w, h = result.image.size
    what = "1 slice" if result.n_slices == 1 else f"{len(result.shown)} of {result.n_slices} slices"
    print(f"wrote {args.out} ({w}x{h}): {what}, windows {', '.join(x.name for x in result.windows)}")
    return 0
