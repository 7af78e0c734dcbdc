"""``ichscan inspect``: what is in a file, folder or zip - series found and files skipped, with reasons."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples:
  ichscan inspect scan.dcm
  ichscan inspect study_folder/            (recursive)
  ichscan inspect study.zip --json > study.json
  ichscan inspect pet_ct/ --any-modality   (read non-CT images too)
  ichscan inspect ct.nii.gz                (a NIfTI volume in HU: one series, named by its file)

Headers only: quick on large folders; truncated uncompressed pixel data (and a NIfTI file shorter than its
header says) is still caught.
Exit status 0 when at least one usable series was found, 1 otherwise.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="list the CT series in a DICOM file, NIfTI volume, folder or zip, and skipped files with reasons",
        description="Series (UIDs, slices, slice spacing and thickness as ranges with warnings, ordering, tilt, "
                    "fixes) and skipped files.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="a DICOM file, a NIfTI volume (.nii, .nii.gz), a folder (searched recursively) "
                   "or a .zip")
    p.add_argument("--json", action="store_true", help="print JSON for machines instead of a table")
    p.add_argument("--any-modality", action="store_true", help="accept non-CT images (MR, NM, ...)")
    p.add_argument("--keep-patient-id", action="store_true",
                   help="show PatientID (default: a pseudonymous key, see the README's privacy section)")
    p.set_defaults(func=run)


def _fmt(v, spec=".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, (tuple, list)):
        return "x".join(format(x, spec) for x in v)
    return format(v, spec)


def _range(values, spec=".2f") -> str:
    """``4.00`` for one value, ``4.00-7.00`` for a range; ``-`` for none."""
    if not values:
        return "-"
    lo, hi = values[0], values[-1]
    return format(lo, spec) if abs(hi - lo) < 0.005 else f"{format(lo, spec)}-{format(hi, spec)}"


def _warnings(summary: dict) -> list[str]:
    out = []
    if summary["uneven"]:
        lo, _, hi = summary["spacing"]
        out.append(f"uneven slice spacing ({lo:.2f} to {hi:.2f} mm)")
    if summary["overlap_mm"]:
        out.append(f"slices overlap by up to {summary['overlap_mm']:.2f} mm")
    if summary["gap_mm"]:
        out.append(f"gaps of up to {summary['gap_mm']:.2f} mm between slices")
    return out


def scan_to_dict(path: str, scan, patient_ids=None) -> dict:
    from ichscan.geometry import same_scan, spacing_summary
    from ichscan.privacy import Pseudonymizer

    patient_ids = patient_ids or Pseudonymizer()
    series = []
    for i, s in enumerate(scan.series):
        first = s.slices[0]
        # another reconstruction of an earlier series' scan: ichscan predict reads only the least noisy of them
        scan_of = next((t.series_uid for t in scan.series[:i] if same_scan(t, s)), None)
        summary = spacing_summary(s.z, (x.thickness for x in s.slices))
        series.append(
            {
                "patient_id": patient_ids(s.patient_id),
                "study_uid": s.study_uid,
                "series_uid": s.series_uid,
                "series_number": first.series_number,
                "description": s.description,
                "modality": first.modality,
                "n_slices": len(s),
                "rows": first.rows,
                "columns": first.columns,
                "pixel_spacing": list(s.pixel_spacing) if s.pixel_spacing else None,
                "slice_spacing": s.slice_spacing,  # the median
                "slice_spacing_range": [summary["spacing"][0], summary["spacing"][2]] if summary["spacing"] else None,
                "thickness": s.thickness,
                "thickness_range": list(summary["thickness"]) if summary["thickness"] else None,
                "lossy": sorted({x.lossy for x in s.slices if x.lossy}),
                "warnings": _warnings(summary) + [
                    f"lossy compression ({what}) on {sum(x.lossy == what for x in s.slices)} of {len(s)} slices: "
                    "fine detail such as a thin bleed may be lost" for what in sorted({x.lossy for x in s.slices
                                                                                        if x.lossy})],
                "ordered_by": s.ordered_by,
                "tilt_degrees": s.tilt_degrees,
                "fixes": list(s.fixes),
                "kernel": first.kernel,
                "same_scan_as": scan_of,
                "window": [first.window_center, first.window_width],
                "skipped": len(s.skipped),
            }
        )
    return {
        "path": path,
        "usable": scan.usable,
        "series": series,
        "skipped": [{"path": k.path, "reason": k.reason, "kind": k.kind} for k in scan.skipped],
    }


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def run(args) -> int:
    from ichscan.dicom import find_series

    scan = find_series(args.path, pixels=False, allow_non_ct=args.any_modality)
    from ichscan.privacy import Pseudonymizer

    info = scan_to_dict(args.path, scan, Pseudonymizer(keep=args.keep_patient_id))
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
        return 0 if scan.usable else 1
    if info["series"]:
        header = ["#", "series UID", "patient", "mod", "slices", "size", "pixel mm", "spacing mm", "thick mm",
                  "kernel", "ordered by", "tilt", "fixes", "description"]
        rows = [
            [i + 1, s["series_uid"], s["patient_id"] or "-", s["modality"] or "-", s["n_slices"],
             f"{s['rows']}x{s['columns']}",
             _fmt(s["pixel_spacing"], ".3f"), _range(s["slice_spacing_range"]), _range(s["thickness_range"]),
             s["kernel"] or "-", s["ordered_by"], _fmt(s["tilt_degrees"], ".1f"), ",".join(s["fixes"]) or "-",
             s["description"] or "-"]
            for i, s in enumerate(info["series"])
        ]
        print(f"{len(rows)} series in {args.path}")
        print(_table(rows, header))
        number = {s["series_uid"]: i + 1 for i, s in enumerate(info["series"])}
        for i, s in enumerate(info["series"]):
            for warning in s["warnings"]:
                print(f"warning: series #{i + 1}: {warning}")
            if s["same_scan_as"]:
                print(f"note: series #{i + 1} is another reconstruction of the scan in series "
                      f"#{number[s['same_scan_as']]}; ichscan predict reads only the least noisy of them "
                      "(--every-reconstruction: all)")
    else:
        print(f"no usable CT series in {args.path}")
    if scan.skipped:
        print(f"\n{len(scan.skipped)} skipped:")
        for k in scan.skipped:
            print(f"  {k.path}: {k.reason}")
    return 0 if scan.usable else 1
