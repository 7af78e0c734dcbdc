"""``ichscan phantom``: write a synthetic head-CT data set with the five hemorrhage subtypes."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  ichscan phantom --out data/phantoms --studies 200 --seed 0
  ichscan phantom --out small --studies 20 --seed 1 --size 128 --slices 24-32 --workers 2
  ichscan phantom --out mix --studies 50 --seed 2 --prevalence any=0.6,epidural=0.3 --masks
  ichscan phantom --out tree --studies 10 --seed 3 --layout series
  ichscan phantom --out tilted --studies 50 --seed 4 --pitch 20      # scan planes tilted against the head
  ichscan phantom --out adults --studies 50 --seed 5 --calcification 0.75   # pineal, choroid... as in most adults
  ichscan phantom --out exported --studies 50 --seed 6 --export 0.5   # half stored as windowed JPEGs
  ichscan phantom --out rnd --studies 50 --seed 7 --randomize-outside 0.5   # random texture beyond the skull
  ichscan phantom --out rnd2 --studies 50 --seed 7 --randomize-outside 0.5 --outside-margin 25-40  # keep the skull
  ichscan phantom --out broken --studies 50 --seed 8 --fractures 0.3   # skull fractures, bleed or not
  ichscan phantom --out struck --studies 50 --seed 8 --injury 0.7      # the blow's signs over traumatic bleeds
  ichscan phantom --out young --studies 50 --seed 8 --children 0.5     # half the patients children of 2-17

Writes images/ID_<hex>.dcm (or <patient>/<study>/<series>/ with --layout series), labels.csv in the
RSNA stage_2_train.csv format, series_labels.csv, manifest.json and, with --masks, masks/<series>.npz.
The same seed gives the same files whatever --workers is. An interrupted run resumes when rerun with the
same arguments; a folder holding a set made with other arguments is refused unless --overwrite.
Phantoms are not patients: a model trained on them says nothing about real scans. Research software,
not a medical device.
"""


def _slices(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        a = int(lo)
        b = int(hi) if sep else a
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or LOW-HIGH, e.g. 32-40") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 <= LOW <= HIGH")
    return a, b


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "phantom",
        help="write synthetic head-CT phantoms (DICOM + RSNA-style labels)",
        description="Synthetic head-CT series with epidural, subdural, subarachnoid, intraventricular and "
                    "intraparenchymal hemorrhage, written as CT DICOM with RSNA-style labels.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", "-o", required=True, help="folder to write")
    p.add_argument("--studies", type=int, required=True, help="number of studies (one axial series each)")
    p.add_argument("--seed", type=int, required=True, help="random seed: same seed, same files")
    p.add_argument("--size", type=int, default=512, help="image matrix in pixels (default 512; a few series differ)")
    p.add_argument("--slices", type=_slices, default=(32, 40), help="slices per series, N or LOW-HIGH (default 32-40)")
    p.add_argument("--thickness", type=_parsed("ichscan.phantom.dataset", "parse_thickness"), default=(5.0, 5.0),
                   help="slice thickness and spacing in mm, N or LOW-HIGH drawn per series (default 5)")
    p.add_argument("--prevalence", help="share of series per label, e.g. any=0.5,epidural=0.15")
    p.add_argument("--twins", type=float, default=0.0,
                   help="share of series with a bleed followed by a lesion-free twin (same scan without the "
                        "lesions; for training): default 0")
    p.add_argument("--pitch", type=float, default=0.0,
                   help="tilt each series' scan plane against the head (head bent in its holder, or gantry tilt) "
                        "by up to this many degrees (SD half of it; roll a quarter as large): default 0, none")
    for flag, what, default in (
            ("--calcification", "drawn as adult heads with physiological calcification (pineal, choroid plexus, "
                                "falx, basal ganglia at adult rates)", "only the confounders' few"),
            ("--export", "stored as brain- and bone-window 8-bit JPEGs and rebuilt to HU, as some collections and "
                         "PACS exports keep CT", "none"),
            ("--randomize-outside", "whose outside (beyond a few mm outside the inner table) is replaced by random "
                                    "texture, so that a model learns to ignore it (for training)", "none"),
            ("--fractures", "with a skull fracture of the vault drawn apart from any bleed (lucent line, "
                            "sometimes depressed, scalp swelling, air)", "only some epidurals' own"),
            ("--injury", "with a bleed whose head also shows where it was struck (a scalp swelling, often a "
                         "fracture, over the bleed or across the head from it; kept in its twin)",
             "only some epidurals' own"),
            ("--children", "who are children of 2-17 years (a smaller head, a thin vault with wide "
                           "sutures, no atrophy, sinuses still pneumatizing; no adult calcification)", "adults only")):
        p.add_argument(flag, type=float, default=0.0, metavar="SHARE",
                       help=f"share of {'patients' if flag == '--children' else 'series'} {what}: default 0, {default}")
    p.add_argument("--outside-margin", type=_parsed("ichscan.phantom.outside", "parse_margin"), metavar="MM",
                   help="with --randomize-outside: how far outside the inner table the head is kept, N or LOW-HIGH "
                        "mm drawn per series (default 1.5-4; 25-40 keeps the vault's skull and scalp)")
    p.add_argument("--layout", choices=("rsna", "series"), default="rsna",
                   help="rsna: one images/ folder of ID_<hex>.dcm; series: patient/study/series folders")
    p.add_argument("--masks", action="store_true", help="also write lesion masks (masks/<series_uid>.npz)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a set made with other arguments in --out (only the files ichscan wrote there)")
    p.set_defaults(func=run)


def _parsed(module: str, name: str):
    """An argparse type that calls ichscan's parser ``module.name`` (imported when used, so that the CLI
    starts quickly) and turns its one-line error into argparse's."""
    def parse(text: str):
        import importlib

        from ichscan.errors import IchscanError

        try:
            return getattr(importlib.import_module(module), name)(text)
        except IchscanError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def run(args) -> int:
    from tqdm import tqdm

    from ichscan.phantom import generate_dataset, parse_prevalence, plan_dataset
    from ichscan.phantom.dataset import SHARE_OPTIONS
    from ichscan.phantom.outside import DEFAULT_MARGIN

    prevalence = parse_prevalence(args.prevalence)  # fail before any work on a bad value
    margin = DEFAULT_MARGIN if args.outside_margin is None else args.outside_margin
    shares = {name: getattr(args, name) for name in SHARE_OPTIONS}
    total = sum(p.n_slices for p in plan_dataset(args.studies, args.seed, size=args.size, slices=args.slices,
                                                 thickness=args.thickness, prevalence=prevalence,
                                                 twins=args.twins, pitch=args.pitch,
                                                 outside_margin=margin, **shares))
    bar = None

    def progress(n: int) -> None:
        nonlocal bar
        if bar is None:  # opened with the first slice, so a refusal before any work is one line on stderr
            bar = tqdm(total=total, unit="slice", desc="phantoms")
        bar.update(n)

    try:
        summary = generate_dataset(args.out, args.studies, args.seed, size=args.size, slices=args.slices,
                                   thickness=args.thickness, prevalence=prevalence, layout=args.layout,
                                   masks=args.masks, workers=args.workers, progress=progress, twins=args.twins,
                                   overwrite=args.overwrite, pitch=args.pitch,
                                   outside_margin=margin, **shares)
    finally:
        if bar is not None:
            bar.close()
    pos = ", ".join(f"{k} {v}" for k, v in summary.series_positive.items())
    resumed = f" ({summary.resumed} series kept from an earlier run)" if summary.resumed else ""
    print(f"wrote {summary.slices} slices, {summary.series} series of {summary.patients} patients to {summary.out} "
          f"in {summary.seconds:.1f} s ({summary.slices / max(summary.seconds, 1e-9):.0f} slices/s){resumed}")
    print(f"series positive: {pos}; with confounders: {summary.confounded_series}")
    return 0
