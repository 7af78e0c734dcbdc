"""``ichscan average``: one checkpoint from the weight-space mean of several of the same network."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  ichscan average runs/site/best.json bundled --out runs/site-avg/model
      (a site's fine-tuned model averaged with the model it started from, half and half: weight-space
       ensembling, as WiSE-FT does, which tends to keep what fine-tuning gained and what the start had)
  ichscan average a/best.json b/best.json c/best.json --shares 2,1,1 --out soup/model
  ichscan average --members bundled runs/more/ensemble.json --out soup/pair
      (member by member: soup/pair-member0 averages both ensembles' member 0, and so on;
       soup/pair.json is the ensemble manifest naming them)

Every floating-point weight and batch-norm statistic is the share-weighted mean of the sources'. That is
meaningful only for checkpoints that share a starting point (one fine-tuned from the other, or both from
a third); the sources must be the same architecture, labels, windows and image size, or it stops. A
manifest (or `bundled`) stands for its first member, as with `ichscan train --init`; with --members, every
member counts, member k averaged with member k (all sources the same number of members; a checkpoint is an
ensemble of one). The result is an ordinary checkpoint (model.json + model.safetensors), or with --members
an ensemble manifest and its members, whose JSON lists the sources and their sha256; choose its operating
points anew (`ichscan thresholds --model`), as for any new model.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "average",
        help="average the weights of checkpoints of the same network (weight-space ensembling)",
        description="One checkpoint whose weights are the share-weighted mean of several of the same network.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoints (.json, .safetensors or stem), manifests or 'bundled' (their first member; "
                        "every member with --members)")
    p.add_argument("--shares", help="comma-separated share per checkpoint (default equal), e.g. 0.7,0.3")
    p.add_argument("--members", action="store_true",
                   help="average ensembles member by member: writes STEM-member0, STEM-member1, ... and the "
                        "manifest STEM.json")
    p.add_argument("--out", "-o", required=True, help="the new checkpoint's stem (writes STEM.json and .safetensors)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ichscan.errors import IchscanError
    from ichscan.model import (average_checkpoints, average_ensembles, read_checkpoint_meta, read_manifest,
                               resolve_init_checkpoint)

    shares = None
    if args.shares:
        try:
            shares = [float(x) for x in args.shares.split(",")]
        except ValueError:
            raise IchscanError(f"--shares {args.shares!r}: expected numbers separated by commas, "
                               "e.g. 0.5,0.5") from None
    sources = args.checkpoints if args.members else [resolve_init_checkpoint(c) for c in args.checkpoints]
    path = (average_ensembles if args.members else average_checkpoints)(sources, args.out, shares)
    what = "the weight average"
    if args.members:
        written = read_manifest(path)  # hashes checked
        recorded = written.info["averaged_from"]  # the shares as normalised and recorded
        what = f"an ensemble of {len(written.members)}, member by member {what}"
    else:
        recorded = read_checkpoint_meta(path).record["averaged_from"]
    parts = ", ".join(f"{s} ({a['share']:.3g})" for s, a in zip(sources, recorded))
    print(f"wrote {path}: {what} of {parts}")
    return 0
