"""``ichscan average``: one checkpoint from the weight-space mean of several of the same network."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  ichscan average runs/site/best.json bundled --out runs/site-avg/model
      (a site's fine-tuned model averaged with the model it started from, half and half: weight-space
       ensembling, as WiSE-FT does, which tends to keep what fine-tuning gained and what the start had)
  ichscan average a/best.json b/best.json c/best.json --shares 2,1,1 --out soup/model

Every floating-point weight and batch-norm statistic is the share-weighted mean of the sources'. That is
meaningful only for checkpoints that share a starting point (one fine-tuned from the other, or both from
a third); the sources must be the same architecture, labels, windows and image size, or it stops. A
manifest (or `bundled`) stands for its first member, as with `ichscan train --init`. The result is an
ordinary checkpoint (model.json + model.safetensors) whose JSON lists its sources and their sha256;
choose its operating points anew (`ichscan thresholds --model`), as for any new model.
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
                   help="checkpoints (.json, .safetensors or stem), manifests or 'bundled' (their first member)")
    p.add_argument("--shares", help="comma-separated share per checkpoint (default equal), e.g. 0.7,0.3")
    p.add_argument("--out", "-o", required=True, help="the new checkpoint's stem (writes STEM.json and .safetensors)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ichscan.errors import IchscanError
    from ichscan.model import average_checkpoints, resolve_init_checkpoint

    shares = None
    if args.shares:
        try:
            shares = [float(x) for x in args.shares.split(",")]
        except ValueError:
            raise IchscanError(f"--shares {args.shares!r}: expected numbers separated by commas, "
                               "e.g. 0.5,0.5") from None
    sources = [resolve_init_checkpoint(c) for c in args.checkpoints]
    path = average_checkpoints(sources, args.out, shares)
    total = sum(shares) if shares else len(sources)
    parts = ", ".join(f"{s} ({(shares[i] if shares else 1.0) / total:.3g})" for i, s in enumerate(sources))
    print(f"wrote {path}: the weight average of {parts}")
    return 0
