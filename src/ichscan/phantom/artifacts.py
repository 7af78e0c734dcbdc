"""What the scanner and the patient add: blur, noise, metal streaks, beam hardening, motion.

Each function takes the series volume (n, H, W) in HU and changes it in place or returns a new one;
randomness comes from the generator passed in.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ichscan.phantom import anatomy as an
from ichscan.phantom.anatomy import Frame, HeadShape
from ichscan.phantom.geometry import capsule, ellipse, ellipse_distance, metal_streaks, paint, ramp, wrap_angle


NOISE_THICKNESS_MM = 5.0  # the slice thickness a series' drawn noise level is for


PSF_TAIL_SHARE = (0.02, 0.07)  # draw_psf_tail's ranges: share of the signal in the point spread's tail
PSF_TAIL_MM = (1.2, 2.5)  # and the tail's Gaussian sigma
PSF_TRUNCATE = 3.0  # scanner_blur's Gaussians end at 3 sigma: nothing changes further from a change than
PSF_REACH_MM = PSF_TRUNCATE * PSF_TAIL_MM[1]  # this, in plane (the core's sigma is at most 0.8 mm)


def scanner_blur(hu: np.ndarray, fr: Frame, sharpness_mm: float, tail: float = 0.0,
                 tail_mm: float = 2.0) -> np.ndarray:
    """The scanner's point spread in plane: a Gaussian core of ``sharpness_mm`` (the reconstruction kernel)
    and a long tail, ``tail`` of the signal spread as a Gaussian of ``tail_mm`` (scatter, off-focal
    radiation, the kernel's own wings). The tail is what makes dense bone glow a millimetre or two into
    the brain beside it: a 1200 HU table with a tail of 0.05 over 2 mm adds about 15 HU 1 mm from its edge."""
    sigma = sharpness_mm / fr.mm_spacing  # the scanner's mm, the patient's
    out = hu if sigma < 0.15 else ndimage.gaussian_filter(hu, sigma=(0, sigma, sigma), mode="nearest",
                                                          truncate=PSF_TRUNCATE)
    if tail > 0:
        wide = tail_mm / fr.mm_spacing
        out = (1.0 - tail) * out + tail * ndimage.gaussian_filter(hu, sigma=(0, wide, wide), mode="nearest",
                                                                    truncate=PSF_TRUNCATE)
    return out.astype(np.float32, copy=False)


def draw_psf_tail(sharpness_mm: float) -> tuple[float, float]:
    """(share, mm) of ``scanner_blur``'s tail, from a generator seeded by the kernel's own sharpness draw, so
    that drawing it moves no other draw of a series. Share 0.02-0.07 over 1.2-2.5 mm: with it the median
    profile across the inner table of 12 phantoms reads 1-2 mm into the brain as the real sources do
    (docs/phantom.md, "The bone's glow")."""
    g = np.random.default_rng([int(sharpness_mm * 1e9) % 2**31, 41])
    return float(g.uniform(*PSF_TAIL_SHARE)), float(g.uniform(*PSF_TAIL_MM))


def add_noise(hu: np.ndarray, fr: Frame, sigma_hu: float, rng: np.random.Generator, grain_mm: float = 0.3) -> None:
    """Correlated quantum noise of ``sigma_hu`` at 0.5 mm pixels and 5 mm slices (higher in the dense skull base).

    Coarser pixels average several native ones, so the noise they show is lower, as on a real image
    reduced to that size: sigma scales as sqrt(0.5 mm / spacing) (correlated grain averages less than
    white noise would). Thinner slices collect fewer photons, so their noise is higher: sigma scales as
    sqrt(5 mm / thickness), as on a scanner at a fixed dose (a 0.625 mm slice shows 2.8 times the noise of
    a 5 mm one). ``grain_mm`` is the noise's correlation length, which the reconstruction kernel
    sets: short for sharp (bone) kernels, long for smooth (soft-tissue) ones."""
    sigma_hu = (sigma_hu * min(1.0, float(np.sqrt(0.5 / fr.mm_spacing)))
                * float(np.sqrt(NOISE_THICKNESS_MM / fr.mm_thickness)))
    white = rng.standard_normal(hu.shape, dtype=np.float32)
    corr = max(0.35, grain_mm / fr.mm_spacing)  # pixels: CT noise is blotchy rather than white
    noise = ndimage.gaussian_filter(white, sigma=(0, corr, corr), mode="wrap", truncate=3.0)
    r = int(np.ceil(3 * corr))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / corr) ** 2)
    k /= k.sum()
    noise *= np.float32(1.0 / np.sum(k**2))  # back to unit variance: (sum k^2)^2 in two dimensions
    level = np.where(fr.z < 10, 1.35, 1.0).astype(np.float32)[:, None, None]
    inside = hu > -900  # air outside the head is not noisy in a way anyone reads
    hu += np.where(inside, noise * np.float32(sigma_hu) * level, noise * np.float32(2.0))


def beam_hardening(hu: np.ndarray, head: HeadShape, fr: Frame, anat: an.Anatomy, strength: float) -> None:
    """Dark bands between the petrous bones across the posterior fossa (the Hounsfield bar)."""
    idx = np.nonzero((fr.z > -25) & (fr.z < 12))[0]
    X, Y = fr.X[0], fr.Y[0]
    for i in idx:
        p = float(an.profile(np.float32(fr.z[i]), -25, 12))
        band = np.exp(-0.5 * ((Y - 0.18 * head.b - 0.1 * np.abs(X)) / 5.0) ** 2) * np.exp(-0.5 * (X / 40) ** 2)
        streak = 0.5 * np.cos(np.arctan2(Y - 0.2 * head.b, X) * 14) * np.exp(-np.hypot(X, Y - 0.2 * head.b) / 35)
        hu[i] -= (strength * p * (band + streak) * (anat.depth[i] > 0)).astype(np.float32)


def metal_shunt(hu: np.ndarray, tissue: np.ndarray, head: HeadShape, fr: Frame, rng: np.random.Generator) -> dict:
    """A ventricular shunt: burr-hole valve in the skull, catheter to the frontal horn, streaks from metal."""
    side = float(rng.choice([-1.0, 1.0]))
    z0 = head.widest + float(rng.uniform(-5, 25))
    ang = side * float(rng.uniform(0.5, 1.9))
    X, Y = fr.X[0], fr.Y[0]
    s = float(an.cranial_scale(head, np.float32(z0)))
    px, py = np.sin(ang) * (head.a * s + head.skull * 0.5), -np.cos(ang) * (head.b * s + head.skull * 0.5)
    tx, ty = side * 4.5, -0.2 * head.b
    idx = np.nonzero(np.abs(fr.z - z0) < 9)[0]
    w = max(fr.spacing, 0.35)
    for i in idx:
        zz = float(fr.z[i]) - z0
        valve = ellipse(X, Y, px, py, 3.0, 3.0, w) * (abs(zz) < 5)
        cath = capsule(X, Y, px, py, tx, ty, 0.9, w) * (abs(zz) < 8)
        frac = np.maximum(valve, cath * 0.9)
        paint(hu[i], tissue[i], 2800.0, frac, an.METAL)
        # Streaks: bright and dark lines through the metal, fading with distance.
        strength = float(rng.uniform(60, 160)) * (1.0 if abs(zz) < 5 else 0.4)
        angles = [float(rng.uniform(0, np.pi)) for _ in range(6)]
        metal_streaks(hu[i], X, Y, (px, py), angles, strength, width_mm=1.2, fade_mm=60.0)
    return {"side": "left" if side > 0 else "right", "z": round(z0, 1)}


def motion(hu: np.ndarray, fr: Frame, rng: np.random.Generator) -> list[int]:
    """Smear a short run of slices along a random direction, with a faint ghost."""
    n = fr.n
    start = int(rng.integers(0, max(1, n - 3)))
    run = list(range(start, min(n, start + int(rng.integers(1, 5)))))
    ang = float(rng.uniform(0, np.pi))
    length_px = float(rng.uniform(2.0, 6.0)) / fr.spacing * 1.0
    offs = np.linspace(-length_px / 2, length_px / 2, 5)
    for i in run:
        acc = np.zeros_like(hu[i])
        for o in offs:
            acc += np.roll(hu[i], (int(round(o * np.sin(ang))), int(round(o * np.cos(ang)))), axis=(0, 1))
        ghost = np.roll(hu[i], (int(round(length_px * np.sin(ang))), int(round(length_px * np.cos(ang)))), axis=(0, 1))
        hu[i] = 0.9 * acc / len(offs) + 0.1 * ghost
    return run


def head_holder(hu: np.ndarray, tissue: np.ndarray, head: HeadShape, fr: Frame, rng: np.random.Generator) -> dict:
    """The head rest under the occiput and beside the head: thin plastic or carbon arcs (100-400 HU) a few
    millimetres to centimetres from the scalp, in the image frame (gravity, not the head, sets where
    they lie), on every slice; sometimes a second, wider arc (the shell of the holder or a cushion)."""
    X, Y = fr.x_img[0] - np.float32(fr.shift[0]), fr.y_img[0] - np.float32(fr.shift[1])
    w = max(fr.spacing, 0.35)
    drawn = []
    for k in range(1 + int(rng.random() < 0.4)):
        gap = float(rng.uniform(4, 18)) + 14.0 * k
        rx = head.a + head.skull + head.scalp + head.temporalis + gap + float(rng.uniform(0, 10))
        ry = head.b + head.skull + head.scalp * (1 + head.occiput) + gap  # the gap is from the skin behind
        cy = float(rng.uniform(-10, 10))
        thick = float(rng.uniform(1.2, 3.5))
        value = float(rng.uniform(100, 450))
        span = np.deg2rad(float(rng.uniform(60, 110)))  # from straight back towards each side
        d = np.abs(ellipse_distance(X, Y, 0, cy, rx, ry))
        ang = np.abs(np.arctan2(X, Y - cy))  # 0 straight back (down in the image)
        frac = ramp(d - thick / 2, w) * (ang < span)
        paint(hu, tissue, value, frac[None] * (hu <= -900))  # only in the air around the head
        drawn.append({"gap_mm": round(gap, 1), "hu": round(value), "span_deg": round(float(np.rad2deg(span)))})
    return {"arcs": drawn}


def subcalvarial_brightening(hu: np.ndarray, anat: an.Anatomy, amplitude: float, reach_mm: float,
                             rise: np.ndarray | None = None) -> None:
    """Beam-hardening residue and partial volume next to the vault: the outer few millimetres of the
    cranial contents read some HU too dense on many scanners, a common mimic of a thin subdural.
    ``amplitude`` HU at the inner table, falling off over ``reach_mm``. ``rise`` (one value per slice, 0 at
    and below the head's widest level, 1 at the inner table's vertex) widens the band towards the vertex,
    where the slice cuts the vault obliquely: reach x (1 + 0.8 rise). Measured on two real sources
    (docs/phantom.md), the band is about twice as wide on the upper slices as on the middle ones."""
    d = anat.depth
    rise = np.zeros(len(d), np.float32) if rise is None else np.clip(np.asarray(rise, np.float32), 0, 1)
    reach = np.broadcast_to((reach_mm * (1.0 + 0.8 * rise))[:, None, None], d.shape)
    near = (d > 0) & (d < 4 * reach)
    hu[near] += (amplitude * np.exp(-d[near] / reach[near])).astype(np.float32)


def vertex_rise(head: HeadShape, fr: Frame) -> np.ndarray:
    """Per slice, 0 at and below the head's widest level rising to 1 at the inner table's vertex."""
    return np.clip((fr.z - head.widest) / max(head.top - head.widest, 1.0), 0, 1).astype(np.float32)


def calibration_offset(hu: np.ndarray, offset_hu: float) -> None:
    """Scanners differ in their water calibration by a few HU: every tissue (not the air) shifts alike."""
    hu[hu > -500] += np.float32(offset_hu)


def scalp_haematoma(hu: np.ndarray, tissue: np.ndarray, depth: np.ndarray, head: HeadShape, fr: Frame,
                    rng: np.random.Generator) -> dict:
    """A swelling of the scalp (40-70 HU dome over the vault) from a blow to the head: outside the skull,
    so not intracranial haemorrhage, and as common in injured heads without a bleed as with one."""
    centre = float(rng.uniform(-np.pi, np.pi))
    half = float(rng.uniform(0.35, 0.9))
    z0 = float(rng.uniform(head.widest - 20, head.top - 10))
    z_half = float(rng.uniform(12, 35))
    height = float(rng.uniform(4, 16))
    value = float(rng.uniform(40, 70))
    return scalp_swelling(hu, tissue, depth, head, fr, centre, half, z0, z_half, height, value)


def scalp_swelling(hu: np.ndarray, tissue: np.ndarray, depth: np.ndarray, head: HeadShape, fr: Frame,
                   centre: float, half: float, z0: float, z_half: float, height: float, value: float) -> dict:
    """A dome of ``value`` HU on the scalp, ``height`` mm at its top: centred at angle ``centre`` (radians
    from the front, positive to the patient's left) and level ``z0``, reaching ``half`` radians around the
    head and ``z_half`` mm up and down. It only adds: tissue denser than it stays as it was."""
    X, Y = fr.X[0], fr.Y[0]
    phi = np.arctan2(X, -Y)
    for i in np.nonzero(np.abs(fr.z - z0) < z_half)[0]:
        zi = float(np.sqrt(max(0.0, 1 - ((fr.z[i] - z0) / z_half) ** 2)))
        dphi = np.abs(np.angle(np.exp(1j * (phi - centre)))) / half
        dome = height * np.clip(1 - dphi**2, 0, None) * zi
        d = depth[i]
        swell = (d < -head.skull * 1.2) & (d > -head.skull - head.scalp - dome) & (dome > 0.5)
        hu[i][swell] = np.maximum(hu[i][swell], value)
        tissue[i][swell & (tissue[i] == an.AIR)] = an.SOFT
    return {"phi": round(centre, 2), "z": round(z0, 1), "height_mm": round(height, 1), "hu": round(value)}


def draw_fracture(rng: np.random.Generator) -> dict:
    """A skull fracture of the vault, as ``skull_fracture`` draws it, in numbers only (plain floats, so it
    travels in a series' plan and its metadata): where around the head and how high (a share of the vault's
    height), how long along z, how wide, whether a piece is depressed, and whether the scalp swells and air
    gets in. Drawn apart from any bleed: head injury breaks the skull with or without blood inside."""
    return {
        "phi": round(float(rng.uniform(-np.pi, np.pi)), 3),
        "height": round(float(rng.uniform(0.0, 1.0)), 3),  # 0: the temporal squama, 1: near the vertex
        "z_half": round(float(rng.uniform(8, 35)), 1),  # mm along z
        "slope": round(float(rng.uniform(-0.6, 0.6)), 3),  # mm around the head per mm up: the line runs oblique
        "width": round(float(rng.choice([rng.uniform(0.4, 1.2), rng.uniform(1.2, 3.0)], p=[0.8, 0.2])), 2),
        "depressed_mm": round(float(rng.uniform(2, 6)) if rng.random() < 0.25 else 0.0, 1),
        "segment": round(float(rng.uniform(0.08, 0.2)), 3),  # half-angle of a depressed piece (radians)
        "swelling_mm": round(float(rng.uniform(3, 14)) if rng.random() < 0.7 else 0.0, 1),
        "swelling_hu": round(float(rng.uniform(35, 65)), 1),
        "air": int(rng.integers(1, 6)) if rng.random() < 0.3 else 0,  # bubbles of pneumocephalus
        "air_seed": int(rng.integers(2**31)),
        "fill_hu": round(float(rng.uniform(15, 60)), 1),  # what fills the gap: soft tissue, blood, partial volume
    }


def fracture_levels(head: HeadShape) -> tuple[float, float]:
    """The levels (mm) that a fracture's ``height`` 0 and 1 stand for: the temporal squama, and the vault
    a little below the vertex."""
    return -10.0, head.top - 12.0


def skull_fracture(hu: np.ndarray, tissue: np.ndarray, depth: np.ndarray, head: HeadShape, fr: Frame,
                   spec: dict, keep: np.ndarray | None = None) -> dict:
    """Draw the fracture ``spec`` (``draw_fracture``) into the series: a lucent line through the vault's
    bone (filled with ``fill_hu``), running obliquely across the slices; in some, a piece between two such
    lines pushed ``depressed_mm`` inwards (bone where brain was, scalp where bone was); a swelling of the
    scalp over it; a few bubbles of air just inside the inner table. No voxel of ``keep`` (the blood) is
    changed, so the labels stay what they were. Returns ``spec`` with ``slices``: where it was drawn."""
    X, Y = fr.X[0], fr.Y[0]
    r = np.hypot(X, Y)
    phi = np.arctan2(X, -Y)
    w = max(fr.spacing, 0.35)
    radians_per_mm = spec["slope"] / max(float(np.median(r)), 1.0)  # the line's drift around the head, per mm up
    z_lo, z_hi = fracture_levels(head)
    z0 = z_lo + spec["height"] * (z_hi - z_lo)
    z_half = float(spec["z_half"])
    depressed = float(spec["depressed_mm"])
    if depressed:
        z_half = min(z_half, 18.0)
    air_rng = np.random.default_rng(int(spec["air_seed"]))
    done = []
    for i in np.nonzero(np.abs(fr.z - z0) < z_half)[0]:
        zi = float(np.sqrt(max(0.0, 1 - ((fr.z[i] - z0) / z_half) ** 2)))
        centre = spec["phi"] + radians_per_mm * (float(fr.z[i]) - z0)
        dphi = wrap_angle(phi - centre)
        h, t, d = hu[i], tissue[i], depth[i]
        free = np.ones(h.shape, bool) if keep is None else ~keep[i]
        in_bone = (d < 0.5) & (d > -head.skull * 1.6 - 2) & (t == an.BONE) & free
        if not in_bone.any():
            continue
        lines = [centre]
        if depressed:
            seg = float(spec["segment"])
            lines = [centre - seg, centre + seg]
            piece = (np.abs(dphi) < seg) & (d > -head.skull * 1.6 - 3) & (d < depressed + 1.0) & free
            gy, gx = np.gradient(d)
            norm = np.hypot(gy, gx) + 1e-6
            shift = depressed / fr.spacing  # pixels: each point shows what lay that far further out
            rows, cols = np.nonzero(piece)
            # depth grows inwards, so "further out" is against its gradient
            src_r = rows - shift * gy[rows, cols] / norm[rows, cols]
            src_c = cols - shift * gx[rows, cols] / norm[rows, cols]
            moved = ndimage.map_coordinates(h, [src_r, src_c], order=1, mode="nearest")
            moved_t = ndimage.map_coordinates(t, [src_r, src_c], order=0, mode="nearest")
            h[rows, cols] = moved
            t[rows, cols] = moved_t
            in_bone = (d < depressed + 1.0) & (d > -head.skull * 1.6 - 2) & (t == an.BONE) & free
        for c in lines:
            arc = np.abs(wrap_angle(phi - c)) * r
            gap = in_bone & (ramp(arc - spec["width"] / 2, w) >= 0.5)
            h[gap] = spec["fill_hu"]
            t[gap] = an.SOFT
        if spec["swelling_mm"]:
            span = 0.35 + (float(spec["segment"]) if depressed else 0.0)
            dome = spec["swelling_mm"] * np.clip(1 - (dphi / span) ** 2, 0, None) * zi
            swell = (d < -head.skull * 1.2) & (d > -head.skull - head.scalp - dome) & (dome > 0.5) & (h < 20) & free
            h[swell] = spec["swelling_hu"]
            t[swell] = an.SOFT
        done.append(int(i))
    if spec["air"] and done:
        for _ in range(int(spec["air"])):
            i = int(air_rng.choice(done))
            centre = spec["phi"] + float(air_rng.normal(0, 0.15))
            rad = float(air_rng.uniform(0.8, 2.5))
            dd = float(air_rng.uniform(rad + 0.3, 6.0))
            at = np.abs(wrap_angle(phi - centre)) * r
            d = depth[i]
            bubble = (at ** 2 + (d - dd) ** 2 < rad ** 2)
            if keep is not None:
                bubble &= ~keep[i]
            hu[i][bubble] = float(air_rng.uniform(-1000, -700))
            tissue[i][bubble] = an.AIR
    return {**spec, "slices": done}
