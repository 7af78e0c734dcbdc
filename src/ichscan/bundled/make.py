"""Write the bundled model: ``python -m ichscan.bundled.make CKPT_OR_MANIFEST... --thresholds THR --info INFO``.

Copies the checkpoints into ``src/ichscan/bundled/`` (or ``--out``) and writes ``bundled.json`` through
``ichscan.model.write_bundle``; INFO is a JSON object (recipe, seeds, measured, ...; see write_bundle).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from ichscan.errors import IchscanError
    from ichscan.model import bundled_dir, read_manifest, write_bundle

    p = argparse.ArgumentParser(prog="python -m ichscan.bundled.make", description=__doc__.split("\n\n")[0])
    p.add_argument("members", nargs="+", help="checkpoints (.json) and/or ensemble manifests")
    p.add_argument("--thresholds", required=True, help="operating points chosen on phantom validation "
                                                       "(as `ichscan thresholds` writes them)")
    p.add_argument("--info", required=True, help="JSON object: recipe, seeds, measured, ...")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per member argument (default 1)")
    p.add_argument("--out", type=Path, help=f"folder (default {bundled_dir()})")
    args = p.parse_args(argv)
    try:
        try:
            info = json.loads(Path(args.info).read_text())
        except (OSError, ValueError) as err:
            raise IchscanError(f"not a readable JSON object ({err})", args.info) from None
        manifest = write_bundle(args.out or bundled_dir(), args.members, args.thresholds, info, weights=args.weights)
        bundle = read_manifest(manifest)  # read back: the hashes just written check out
    except IchscanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    total = manifest.stat().st_size
    for m in bundle.members:
        meta_size = m.checkpoint.stat().st_size
        weights = m.checkpoint.with_suffix(".safetensors")
        total += meta_size + weights.stat().st_size
        print(f"{weights.name}  weight {m.weight:g}  sha256 {m.sha256}")
    print(f"{manifest}: {len(bundle.members)} member(s), {total / 2**20:.1f} MiB, trained on {bundle.trained_on}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
