"""Pictures of phantoms made by code: one per subtype, through the same files and reader as real data.

``python -m ichscan.phantom.pictures docs/images`` writes ``phantom_<subtype>.png``: the slice with the most
blood of a phantom series holding that subtype, in the brain, blood and soft-tissue windows (drawn by
``ichscan.render``), with a fourth panel outlining the lesion mask. Each picture comes from the first seed
(counting up from the one given) whose series has no shunt or motion, so that it shows the lesion.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ichscan.dicom import read_series
from ichscan.labels import SUBTYPES
from ichscan.phantom.dataset import generate_dataset, plan_dataset
from ichscan.render import contact_sheet
from ichscan.windows import window_image

log = logging.getLogger(__name__)

MASK_COLOURS = {"epidural": (255, 80, 80), "subdural": (255, 170, 40), "subarachnoid": (80, 200, 255),
                "intraventricular": (120, 255, 120), "intraparenchymal": (255, 90, 255)}


def subtype_picture(subtype: str, seed: int = 0, size: int = 512, tile: int = 384) -> Image.Image:
    """The key slice of a phantom with ``subtype`` in three windows plus the mask outline."""
    prevalence = {"any": 1.0, **{s: (1.0 if s == subtype else 0.0) for s in SUBTYPES}}
    # The picture is about the lesion: take the first seed from ``seed`` whose series has no metal or motion.
    while any(k in plan_dataset(1, seed, size=size, slices=(36, 36), prevalence=prevalence)[0].confounders
              for k in ("metal", "motion")):
        seed += 1
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, 1, seed, size=size, slices=(36, 36), prevalence=prevalence, masks=True)
        series = read_series(Path(tmp) / "images")
        npz = np.load(next((Path(tmp) / "masks").glob("*.npz")))
        bit = 1 << SUBTYPES.index(subtype)
        by_id = {iid: (npz["masks"][k] & bit) > 0 for k, iid in enumerate(npz["image_ids"])}
        masks = [by_id[s.image_id] for s in series.slices]
        key = int(np.argmax([m.sum() for m in masks]))
        vol = series.volume()
        sl = replace(series.slices[key], hu=vol[key])
        manifest = json.loads((Path(tmp) / "manifest.json").read_text())
    lesion = next(x for x in manifest["series"][0]["lesions"] if x["subtype"] == subtype)
    title = (f"phantom {subtype} ({lesion['kind'].replace('_', ' ')}, {lesion['side']})  |  slice {key + 1}/"
             f"{len(series)}  |  {sl.rows}x{sl.columns}  |  seed {seed}")
    sheet = contact_sheet([sl], tile=tile, title=title)
    # Fourth panel: the lesion mask outlined on the brain window, so the truth can be checked by eye.
    brain = window_image(sl.hu, ("brain",), size=None)[0]
    rgb = np.repeat(brain[:, :, None], 3, axis=2)
    edge = masks[key] & ~ndimage.binary_erosion(masks[key])
    rgb[edge] = MASK_COLOURS[subtype]
    panel = Image.fromarray(rgb).resize((tile, tile), Image.NEAREST)
    out = Image.new("RGB", (sheet.width + tile + 6, sheet.height), (24, 24, 24))
    out.paste(sheet, (0, 0))
    out.paste(panel, (sheet.width, sheet.height - tile - 6))
    ImageDraw.Draw(out).text((sheet.width, sheet.height - tile - 30), "lesion mask", fill=(235, 235, 235))
    return out


def write_pictures(out_dir, seed: int = 0, size: int = 512) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for subtype in SUBTYPES:
        path = out / f"phantom_{subtype}.png"
        subtype_picture(subtype, seed=seed, size=size).save(path)
        log.info("wrote %s", path)
        paths.append(path)
    return paths


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    args = sys.argv[1:]
    for p in write_pictures(args[0] if args else "docs/images", seed=int(args[1]) if len(args) > 1 else 0):
        print(p)
