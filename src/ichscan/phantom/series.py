"""One phantom series, in memory: HU volume, lesion masks, anatomy and what was drawn."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ichscan.labels import SUBTYPES
from ichscan.phantom import anatomy as an
from ichscan.phantom import artifacts, lesions, oblique
from ichscan.phantom.anatomy import Frame, HeadShape
from ichscan.phantom.geometry import wrap_angle

# Painted in this order; a later lesion covers an earlier one where they meet.
PAINT_ORDER = ("subarachnoid", "intraventricular", "intraparenchymal", "subdural", "epidural")
CONFOUNDERS = ("pineal", "choroid", "basal_ganglia", "falx", "metal", "motion")
SCALP_HAEMATOMA = 0.25  # share of series with a scalp swelling, bleed or not (head injury without ICH is common)
INJURY_SWELLING = 0.85  # share of blows (``draw_injury``) that swell the scalp
INJURY_FRACTURE = {"epidural": 0.85, "other": 0.45}  # ... that break the vault, by the bleed that places them


@dataclass
class PhantomSeries:
    """A generated series. ``hu`` holds exactly the values written (integers, clipped to what the file
    can store); ``masks[subtype]`` is True where that blood is; ``tissue`` is the anatomy before lesions."""

    hu: np.ndarray  # (n, H, W) float32, integral values
    masks: dict[str, np.ndarray]
    tissue: np.ndarray  # (n, H, W) uint8, anatomy.TISSUE_NAMES codes
    depth: np.ndarray  # (n, H, W) mm inside the inner table
    sector: np.ndarray  # (n, H, W) skull bone over each point
    frame: Frame
    head: HeadShape
    lesions: list[lesions.Lesion]
    confounders: dict = field(default_factory=dict)
    noise_sigma: float = 0.0

    def slice_labels(self) -> np.ndarray:
        """(n, 5) uint8 in ``SUBTYPES`` order: a slice is positive exactly when its mask has voxels."""
        return np.stack([self.masks[s].any(axis=(1, 2)) for s in SUBTYPES], axis=1).astype(np.uint8)

    def series_labels(self) -> dict[str, int]:
        lab = self.slice_labels().any(axis=0)
        out = {s: int(v) for s, v in zip(SUBTYPES, lab)}
        return {"any": int(lab.any()), **out}


def sample_confounders(rng: np.random.Generator, rate: float = 0.35) -> dict:
    """Findings that are not blood. About ``rate`` of series carry at least one."""
    if rng.random() >= rate:
        return {}
    chosen = rng.choice(len(CONFOUNDERS), size=int(rng.integers(1, 4)), replace=False,
                        p=np.array([0.25, 0.2, 0.12, 0.13, 0.12, 0.18]))
    out = {}
    for k in sorted(int(c) for c in chosen):
        name = CONFOUNDERS[k]
        if name in ("pineal", "choroid", "basal_ganglia", "falx"):
            out[name] = float(rng.uniform(100, 400))
        else:
            out[name] = True
    return out


def make_series(head: HeadShape, subtypes: tuple[str, ...], rng: np.random.Generator, *, n: int, rows: int,
                cols: int, thickness: float, confounders: dict, hu_range: tuple[float, float] = (-1024, 3071),
                lesion_rng: np.random.Generator | None = None, pitch: float = 0.0, roll: float = 0.0) -> PhantomSeries:
    """``rng`` draws the scan (position, anatomy, artifacts, noise) and ``lesion_rng`` the lesions, so that
    the same ``rng`` seed without lesions gives the same scan without its bleed (a lesion-free twin).

    ``pitch`` and ``roll`` (degrees) tilt the scan plane against the head: the head bent forward or back in
    its holder, or a tilted gantry, as the pixels show it (the DICOM geometry stays plainly axial). A tilted
    series is drawn on thin slices along the head's axis and each slice resampled as an oblique slab of the
    series' thickness, so that partial volume and the skull's obliquity come out of the geometry."""
    lrng = rng if lesion_rng is None else lesion_rng
    fr = an.make_frame(rng, head, n, rows, cols, thickness)
    if pitch or roll:
        fr = dataclasses.replace(fr, pitch=float(np.deg2rad(pitch)), roll=float(np.deg2rad(roll)))
        fine = oblique.fine_frame(fr)
        anat, masks, planned, drawn = _draw_head(head, subtypes, rng, lrng, fr, fine, confounders)
        anat, masks = oblique.resample(anat, masks, fine, fr)
    else:
        anat, masks, planned, drawn = _draw_head(head, subtypes, rng, lrng, fr, fr, confounders)
    sharpness = float(rng.uniform(0.45, 0.8))
    hu = artifacts.scanner_blur(anat.hu, fr, sharpness, *artifacts.draw_psf_tail(sharpness))
    artifacts.calibration_offset(hu, float(np.clip(rng.normal(1.0, 2.5), -5, 7)))
    if confounders.get("motion"):
        drawn["motion"] = artifacts.motion(hu, fr, rng)
    sigma = float(2.0 + 5.5 * rng.beta(1.3, 3.0))  # 2-7.5 HU at 0.5 mm, mostly 2.5-4.5 (real heads: 2.7-4.1 HU local SD)
    artifacts.add_noise(hu, fr, sigma, rng, grain_mm=float(rng.uniform(0.2, 0.9)))
    np.clip(np.rint(hu, out=hu), hu_range[0], hu_range[1], out=hu)
    return PhantomSeries(hu=hu, masks=masks, tissue=anat.tissue0, depth=anat.depth, sector=anat.sector, frame=fr,
                         head=head, lesions=planned, confounders=drawn, noise_sigma=sigma)


def plan_lesions(subtypes, head: HeadShape, plan_fr: Frame, rng: np.random.Generator) -> list[lesions.Lesion]:
    """Every lesion of ``subtypes`` planned, in paint order, each from ``rng`` in turn: as a series plans
    them first (before any that found no room is planned again), and as ``draw_injury`` plans them again."""
    return [lesions.plan_lesion(s, head, plan_fr, rng) for s in sorted(subtypes, key=PAINT_ORDER.index)]


def _draw_head(head: HeadShape, subtypes: tuple[str, ...], rng: np.random.Generator, lrng: np.random.Generator,
               plan_fr: Frame, fr: Frame, confounders: dict):
    """The object before the scanner sees it, on ``fr``'s slices: anatomy, lesions (placed on the levels
    ``plan_fr`` covers), metal, scalp, holder, beam hardening and subcalvarial brightening. Returns the
    anatomy (with ``tissue0``, the tissue codes before lesions), the lesion masks, the lesions and what was
    drawn besides."""
    planned = plan_lesions(subtypes, head, plan_fr, lrng)
    pushes = [m for m in (les.mass_effect(head) for les in planned) if m is not None]
    mass = max(pushes, key=lambda m: m.mm) if pushes else None
    calc = {k: v for k, v in confounders.items() if k in ("pineal", "choroid", "basal_ganglia", "falx")}
    distended = [dict(les.params, z=les.z, z_half=les.z_half) for les in planned
                 if les.subtype == "subarachnoid" and les.kind == "convexity"]
    anat = an.build(head, fr, rng, mass=mass, calcified=calc, distended=distended)
    anat.tissue0 = anat.tissue.copy()
    masks = {s: np.zeros(anat.hu.shape, bool) for s in SUBTYPES}
    for k, les in enumerate(planned):
        m = lesions.paint_lesion(les, head, fr, anat, lrng)
        for _ in range(8):  # a lesion that found no room on these slices is planned again
            if m.any():
                break
            les = planned[k] = lesions.plan_lesion(les.subtype, head, plan_fr, lrng)
            m = lesions.paint_lesion(les, head, fr, anat, lrng)
        for other in SUBTYPES:  # later paint covers earlier blood
            masks[other] &= ~m
        masks[les.subtype] |= m
    drawn = dict(confounders)
    if confounders.get("metal"):
        drawn["metal"] = artifacts.metal_shunt(anat.hu, anat.tissue, head, fr, rng)
    if rng.random() < SCALP_HAEMATOMA:
        drawn["scalp_haematoma"] = artifacts.scalp_haematoma(anat.hu, anat.tissue, anat.depth, head, fr, rng)
    # A fracture and a blow are drawn from the plan's own numbers (no draw of ``rng`` is taken), never on blood.
    blood = np.logical_or.reduce([masks[s] for s in SUBTYPES]) if {"fracture", "injury"} & set(confounders) else None
    if confounders.get("fracture"):
        drawn["fracture"] = artifacts.skull_fracture(anat.hu, anat.tissue, anat.depth, head, fr,
                                                     confounders["fracture"], keep=blood)
    if confounders.get("injury"):
        drawn["injury"] = draw_injury(confounders["injury"], head, plan_fr, fr, anat, keep=blood)
    if rng.random() < 0.85:
        drawn["holder"] = artifacts.head_holder(anat.hu, anat.tissue, head, fr, rng)
    artifacts.beam_hardening(anat.hu, head, fr, anat, float(rng.uniform(5, 25)))
    # Amplitude 0-40 HU, mostly low (median 10): real heads range from a few HU (CT-ICH) to 30-40 (a GE head)
    # at the inner table; the single uniform draw keeps every later draw of the series as it was.
    amplitude = 40.0 * float(rng.uniform(0, 1)) ** 2
    artifacts.subcalvarial_brightening(anat.hu, anat, amplitude, float(rng.uniform(1.0, 5.0)),
                                       rise=artifacts.vertex_rise(head, fr))
    return anat, masks, planned, drawn


def draw_injury(spec: dict, head: HeadShape, plan_fr: Frame, fr: Frame, anat: an.Anatomy,
                keep: np.ndarray | None = None) -> dict:
    """The signs of the blow that made a series' bleed (``dataset._draw_injury``'s ``spec``): a swelling of
    the scalp, a fracture of the vault, or both, over the bleed or across the head from it
    (``lesions.impact``). The lesions are planned again from their own stream, as the series planned them
    first, so a lesion-free twin places the same blow; the draws here come from ``spec["seed"]`` alone. No
    voxel of ``keep`` (the blood) changes. Returns what was drawn, or ``{"anchor": None}`` when none of
    the series' bleeds is a blow's."""
    stream = np.random.default_rng([int(v) for v in spec["lesion_stream"]])
    planned = plan_lesions(spec["subtypes"], head, plan_fr, stream)
    struck = [(les, lesions.impact(les)) for name in lesions.IMPACT_ORDER for les in planned if les.subtype == name]
    anchor, place = next(((les, at) for les, at in struck if at is not None), (None, None))
    if anchor is None:
        return {"anchor": None}
    phi, z, coup_share = place
    r = np.random.default_rng(int(spec["seed"]))
    coup = bool(r.random() < coup_share)
    phi = float(wrap_angle(np.float64(phi + (0.0 if coup else np.pi) + r.normal(0, 0.2))))
    z = float(np.clip(z + r.normal(0, 8), 0.0, head.top - 15))
    swelling = dict(half=float(r.uniform(0.3, 0.8)), z_half=float(r.uniform(12, 30)), height=float(r.uniform(4, 14)),
                    value=float(r.uniform(40, 70)))
    fracture = artifacts.draw_fracture(r)
    swells = bool(r.random() < INJURY_SWELLING)
    breaks = bool(r.random() < INJURY_FRACTURE["epidural" if anchor.subtype == "epidural" else "other"])
    out = {"anchor": anchor.subtype if anchor.subtype != "intraparenchymal" else "contusion", "coup": coup,
           "phi": round(phi, 3), "z": round(z, 1)}
    if swells or not breaks:
        out["swelling"] = artifacts.scalp_swelling(anat.hu, anat.tissue, anat.depth, head, fr, phi,
                                                   swelling["half"], z, swelling["z_half"], swelling["height"],
                                                   swelling["value"])
    if breaks:
        z_lo, z_hi = artifacts.fracture_levels(head)
        fracture.update(phi=round(phi, 3), height=round(float(np.clip((z - z_lo) / (z_hi - z_lo), 0, 1)), 3),
                        swelling_mm=0.0)
        out["fracture"] = artifacts.skull_fracture(anat.hu, anat.tissue, anat.depth, head, fr, fracture, keep=keep)
    return out
