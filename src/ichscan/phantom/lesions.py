"""The five hemorrhage subtypes: where each may lie, its shape, its density, and its mask.

A lesion is planned first (``plan_lesion``: geometry in the head frame, density, mass effect) so that the
anatomy can be drawn already displaced by it; it is painted afterwards (``paint_lesion``) on the drawn
anatomy, where its mask is cut to the compartment it belongs to: epidural and subdural blood to the
cavity under the inner table, subarachnoid blood to CSF spaces, intraventricular blood to the ventricles,
intraparenchymal blood to grey and white matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage
from scipy.special import ndtri

from ichscan.phantom import anatomy as an
from ichscan.phantom.anatomy import Anatomy, Frame, HeadShape, MassEffect
from ichscan.phantom.geometry import ramp, wrap_angle

MARGIN = np.deg2rad(7.0)  # an epidural stays this far from the sutures that bound it
VERTEX_CLEARANCE = 5.0  # mm: a lesion centre stays this far below the inner table at the vertex


@dataclass(frozen=True)
class Lesion:
    subtype: str
    kind: str  # acute / subacute / chronic (subdural), basal / convexity (SAH), layering / cast (IVH), ...
    z: float  # centre level, mm
    z_half: float  # half extent along z, mm
    hu: float
    side: float = 1.0  # +1 patient's left
    params: dict = field(default_factory=dict)

    def describe(self) -> dict:
        out = {"subtype": self.subtype, "kind": self.kind, "z": round(self.z, 1), "z_half": round(self.z_half, 1),
               "hu": round(self.hu, 1), "side": "left" if self.side > 0 else "right"}
        out.update({k: (round(float(v), 3) if isinstance(v, (float, np.floating)) else v)
                    for k, v in self.params.items() if k != "internal"})
        return out

    def mass_effect(self, head: HeadShape) -> MassEffect | None:
        mm = float(self.params.get("mass_mm", 0.0))
        if mm <= 0:
            return None
        y = float(self.params.get("y", 0.0))
        return MassEffect(side=-self.side, mm=mm, y=y, z=self.z, z_half=max(self.z_half, 15.0))


def _vault_range(head: HeadShape, fr: Frame, lo: float, hi: float, rng, half: float):
    """A centre level inside [lo, hi] and inside the covered slices (so that the lesion is seen); where
    the two do not meet (a scan of the top of the head, a lesion of the lower vault), any covered level
    inside the cranium: never above the vertex, where the cranial cavity has no width."""
    zlo = max(lo, float(fr.z.min()) + 0.5 * fr.thickness)
    zhi = min(hi, float(fr.z.max()) - 0.5 * fr.thickness)
    if zhi <= zlo:
        zlo = float(fr.z.min())
        zhi = max(zlo, min(float(fr.z.max()), head.top - VERTEX_CLEARANCE))
    return float(rng.uniform(zlo, zhi))


def _drawn_from_plan(hu: float, z: float, stream: int) -> np.random.Generator:
    """A generator seeded from a plan's own density and level draws: what it draws changes no draw of the
    plan's ``rng``, so adding a choice to a lesion leaves every other draw of a set as it was."""
    return np.random.default_rng([int(hu * 1e6) % 2**31, int(z * 1e4) % 2**31, stream])


def plan_lesion(subtype: str, head: HeadShape, fr: Frame, rng: np.random.Generator) -> Lesion:
    side = float(rng.choice([-1.0, 1.0]))
    high = head.widest + 0.35 * (head.top - head.widest)
    if subtype == "epidural":
        bone = rng.choice(["temporoparietal", "frontal", "occipital"], p=[0.6, 0.25, 0.15])
        z_half = float(rng.uniform(9, 24))
        if bone == "frontal":
            lo_a, hi_a = 0.0, head.coronal
            z = _vault_range(head, fr, 22, head.top - 20, rng, z_half)
        elif bone == "occipital":
            lo_a, hi_a = head.lambdoid, np.pi
            z = _vault_range(head, fr, 18, high - z_half - 3, rng, z_half)
        else:
            lo_a, hi_a = head.coronal, head.lambdoid
            z = _vault_range(head, fr, 15, head.top - 18, rng, z_half)
        lo_a, hi_a = lo_a + MARGIN, hi_a - MARGIN
        # traumatic epidurals come to CT from a few millimetres thick
        thick = float(rng.choice([rng.uniform(3, 6), rng.uniform(6, 10), rng.uniform(10, 26)], p=[0.2, 0.25, 0.55]))
        # A lens, not a crescent: its length along the table is a few times its thickness.
        radius = head.a * float(an.cranial_scale(head, np.float32(z)))
        half = min(0.5 * (hi_a - lo_a) * float(rng.uniform(0.5, 0.95)), thick * float(rng.uniform(2.0, 3.2)) / radius)
        centre = float(rng.uniform(lo_a + half, hi_a - half))
        hu = float(rng.uniform(58, 85))
        return Lesion("epidural", "acute", z, z_half, hu, side, {
            "phi": side * centre, "phi_half": half, "thickness": thick, "sector_bounds": (float(lo_a - MARGIN),
                                                                                          float(hi_a + MARGIN)),
            "fracture": bool(rng.random() < 0.6), "swirl": bool(rng.random() < 0.2),
            "mass_mm": thick * 0.45, "y": float(-np.cos(centre) * head.b)})
    if subtype == "subdural":
        kind = str(rng.choice(["acute", "subacute", "chronic", "acute_on_chronic"], p=[0.70, 0.10, 0.12, 0.08]))
        hu = {"acute": rng.uniform(55, 82), "subacute": rng.uniform(38, 50), "chronic": rng.uniform(8, 24),
              "acute_on_chronic": rng.uniform(10, 22)}[kind]
        half = float(np.deg2rad(rng.uniform(45, 75)))
        suture = head.coronal if rng.random() < 0.7 else head.lambdoid
        centre = suture + float(rng.uniform(-0.5, 0.5)) * half
        centre = float(np.clip(centre, np.deg2rad(9) + half * 0.4, np.pi - np.deg2rad(9) - half * 0.4))
        z_half = float(rng.uniform(18, 45))
        z = _vault_range(head, fr, 25, head.top - 15, rng, z_half)
        thick = float(rng.choice([rng.uniform(2, 4), rng.uniform(4, 7), rng.uniform(7, 18)], p=[0.15, 0.25, 0.6]))
        if kind != "acute":  # older collections that come to CT are mostly large
            thick = float(rng.uniform(7, 20))
        # Acute subdurals also collect along the tentorium and beside the falx (a tenth each here), chosen
        # by a generator seeded from this plan's own draws, so that every draw of ``rng`` stays as it was.
        site_rng = _drawn_from_plan(hu, z, 29)
        site = str(site_rng.choice(["convexity", "tentorium", "falx"], p=[0.8, 0.1, 0.1]))
        if kind == "acute" and site == "tentorium":
            t = an.tentorium(head)
            return Lesion("subdural", kind, (t.z_lat + t.z_galen) / 2, (t.z_galen - t.z_lat) / 2 + 3, float(hu), side,
                          {"site": site, "thickness": float(site_rng.uniform(2.5, 7)), "mass_mm": 0.0})
        if kind == "acute" and site == "falx":
            y_centre = float(site_rng.uniform(-0.6, 0.6)) * head.b
            return Lesion("subdural", kind, z, z_half, float(hu), side, {
                "site": site, "thickness": float(site_rng.uniform(2, 6)), "y_centre": y_centre,
                "y_half": float(site_rng.uniform(0.2, 0.45)) * head.b, "mass_mm": 0.0})
        return Lesion("subdural", kind, z, z_half, float(hu), side, {
            "phi": side * centre, "phi_half": half, "thickness": thick, "suture": float(suture),
            "mass_mm": thick * 0.55, "y": float(-np.cos(centre) * head.b)})
    if subtype == "subarachnoid":
        kind = str(rng.choice(["basal", "convexity"], p=[0.5, 0.5]))
        hu = float(rng.uniform(55, 80))
        if kind == "basal":
            z_half = float(rng.uniform(12, 22))  # around the circle of Willis, not up to the vertex
            z = _vault_range(head, fr, 8, head.widest - 6, rng, z_half)
            params = {"radius": float(rng.uniform(45, 70))}
        else:
            z_half = float(rng.uniform(10, 25))
            z = _vault_range(head, fr, 25, head.top - 12, rng, z_half)
            params = {"phi": side * float(rng.uniform(0.4, 2.6)), "phi_half": float(np.deg2rad(rng.uniform(25, 60))),
                      "depth": float(rng.uniform(10, 20)), "widen": float(rng.uniform(1.2, 2.5))}
        return _subarachnoid_site(Lesion("subarachnoid", kind, z, z_half, hu, side, params), head, fr)
    if subtype == "intraventricular":
        kind = str(rng.choice(["layering", "cast"], p=[0.6, 0.4]))
        z_half = float(rng.uniform(12, 30))
        z = _vault_range(head, fr, head.widest - 22, head.widest + 15, rng, z_half)
        return Lesion("intraventricular", kind, z, z_half, float(rng.uniform(58, 85)), side,
                      {"level": float(rng.uniform(0.3, 0.65)), "bilateral": bool(rng.random() < 0.6)})
    if subtype == "intraparenchymal":
        # hypertensive bleeds in the basal ganglia, lobar bleeds, and traumatic contusions
        kind = str(rng.choice(["basal_ganglia", "lobar", "contusion"], p=[0.3, 0.4, 0.3]))
        r = float(rng.choice([rng.uniform(4, 8), rng.uniform(8, 22)], p=[0.3, 0.7]))
        lobes = [float(v) for v in rng.uniform(0, 2 * np.pi, 3)]
        oedema = {"oedema": float(rng.uniform(2, 8)), "oedema_drop": float(rng.uniform(6, 14))}
        if kind == "contusion":
            return _plan_contusion(head, fr, side, lobes, oedema, rng)
        if kind == "basal_ganglia":
            z = _vault_range(head, fr, head.widest - 20, head.widest, rng, r)
            x, y = side * 0.3 * head.a, float(rng.uniform(-0.08, 0.1)) * head.b
        else:
            z = _vault_range(head, fr, 22, head.top - 22, rng, r)
            ang = float(rng.uniform(-2.8, 2.8))
            s = float(an.cranial_scale(head, np.float32(z)))
            rad = float(rng.uniform(0.35, 0.7))
            x, y = np.sin(ang) * head.a * s * rad, -np.cos(ang) * head.b * s * rad
            side = 1.0 if x >= 0 else -1.0
        z_half = r * float(rng.uniform(0.7, 1.2))
        return Lesion("intraparenchymal", kind, z, z_half, float(rng.uniform(60, 85)), side, {
            "x": float(x), "y": float(y), "radius": r, **oedema, "mass_mm": max(0.0, r - 8) * 0.6, "lobes": lobes,
            "foci": [[float(x), float(y), z, r, z_half, 0.0]]})
    raise ValueError(f"unknown subtype {subtype!r}")


# Subarachnoid blood is seldom a uniform cast of every CSF space in reach. Traumatic SAH, the commonest
# kind, is a few sulci of the convexity, often only parts of them, the interhemispheric fissure along the
# falx, or a Sylvian fissure; even aneurysmal blood fills the basal cisterns unevenly. Each lesion carries
# a smooth 3-D field whose highest ``coverage`` share holds blood (``SAH_PATCH_MM``: its wavelengths), and
# convexity blood lies in one of ``SAH_SITES`` with the sulci it fills widened from not at all to fully.
SAH_SITES = {"sulcal": 0.6, "interhemispheric": 0.25, "sylvian": 0.15}
SAH_FISSURE_MM = 6.0  # interhemispheric blood lies within this of the midline
SAH_PATCH_MM = (14.0, 32.0)
SAH_PATCH_WAVES = 10
# Traumatic SAH is most often a small amount of blood: a few sulci, part of a fissure or of a cistern, seen
# on one to three 5 mm slices. This share of lesions (of every site) is drawn that small: ``SAH_SMALL_Z_MM``
# of half-height (the whole lesion 6-16 mm along z), and a convexity lesion over ``SAH_SMALL_DEG`` of
# half-arc or a fissure's ``SAH_SMALL_FISSURE`` of the head's half-length; the rest keep the wide extents.
SAH_SMALL = 0.5
SAH_SMALL_Z_MM = (3.0, 8.0)
SAH_SMALL_DEG = (10.0, 25.0)
SAH_SMALL_FISSURE = (0.08, 0.18)


def _subarachnoid_site(les: Lesion, head: HeadShape, fr: Frame) -> Lesion:
    """Where in its reach the blood lies, drawn by a generator seeded from the plan's own draws, so that
    every draw of the plan's ``rng`` stays as it was."""
    sr = _drawn_from_plan(les.hu, les.z, 31)
    p = dict(les.params, patch_seed=int(sr.integers(2**31)))
    z = les.z
    if les.kind == "basal":
        p["coverage"] = float(sr.uniform(0.6, 1.0))
        p["site"] = "basal"
        return _extent(Lesion(les.subtype, les.kind, z, les.z_half, les.hu, les.side, p), head, sr)
    p["coverage"] = float(sr.uniform(0.35, 0.9))
    site = str(sr.choice(list(SAH_SITES), p=list(SAH_SITES.values())))
    p["site"] = site
    if site == "sulcal":
        p["widen"] = p["widen"] * float(sr.uniform(0.0, 1.0))
    else:  # fissures are not sulci of the convexity: nothing there is widened
        p["widen"] = 0.0
    if site == "interhemispheric":  # the fissure's front or back half, where the falx reaches down
        p["y_centre"] = float(sr.choice([-1.0, 1.0]) * sr.uniform(0.45, 0.8) * head.b)
        p["y_half"] = float(sr.uniform(0.15, 0.35) * head.b)
    elif site == "sylvian":  # at the levels of the fissure, under the widest section
        z = _vault_range(head, fr, 10, head.widest + 2, sr, les.z_half)
    return _extent(Lesion(les.subtype, les.kind, z, les.z_half, les.hu, les.side, p), head, sr)


def _extent(les: Lesion, head: HeadShape, sr: np.random.Generator) -> Lesion:
    """Small (a share ``SAH_SMALL``) or wide, drawn last from the site's generator, so that the site, its
    coverage and its level are what they were before small lesions existed. A small lesion keeps its centre
    and shrinks along z and, on the convexity, across it."""
    if sr.random() >= SAH_SMALL:
        return replace(les, params=dict(les.params, extent="wide"))
    p = dict(les.params, extent="small")
    z_half = min(les.z_half, float(sr.uniform(*SAH_SMALL_Z_MM)))
    if p["site"] == "sulcal":
        p["phi_half"] = min(p["phi_half"], float(np.deg2rad(sr.uniform(*SAH_SMALL_DEG))))
    elif p["site"] == "interhemispheric":
        p["y_half"] = min(p["y_half"], float(sr.uniform(*SAH_SMALL_FISSURE)) * head.b)
    return replace(les, z_half=z_half, params=p)


def _patch_field(seed: int, X, Y, z: float) -> np.ndarray:
    """A smooth random field over the head frame, about standard normal at every point: the same at a
    point whichever slice holds it."""
    r = np.random.default_rng(seed)
    k = 2 * np.pi / r.uniform(*SAH_PATCH_MM, SAH_PATCH_WAVES)
    d = r.standard_normal((SAH_PATCH_WAVES, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    ph = r.uniform(0, 2 * np.pi, SAH_PATCH_WAVES)
    out = np.zeros(np.broadcast_shapes(X.shape, Y.shape), np.float32)
    for j in range(SAH_PATCH_WAVES):
        out += np.cos(k[j] * (d[j, 0] * X + d[j, 1] * Y + d[j, 2] * z) + ph[j]).astype(np.float32)
    return out * np.float32(np.sqrt(2.0 / SAH_PATCH_WAVES))


def _paint_subarachnoid(les: Lesion, head: HeadShape, fr: Frame, anat: Anatomy, i: int, zi: float, X, Y, phi):
    """Blood in the CSF spaces within the lesion's reach, where its patch field holds blood: each voxel
    gains its share of CSF times the blood's density over CSF's, so that a partly filled sulcus reads as
    partial volume does, without a rim of CSF around the blood. Returns the mask: the voxels that were
    mostly CSF and are now mostly blood."""
    hu, tissue, depth = anat.hu[i], anat.tissue[i], anat.depth[i]
    p = les.params
    site = p["site"]
    if site == "basal":
        sel = np.hypot(X, Y + 0.05 * head.b) < p["radius"] * (0.6 + 0.4 * zi)
    elif site == "interhemispheric":
        sel = (np.abs(X) < SAH_FISSURE_MM) & (np.abs(Y - p["y_centre"]) < p["y_half"] * zi)
    elif site == "sylvian":
        sel = (np.sign(X) == les.side) & (np.abs(X) > 0.3 * head.a) & (Y > -0.35 * head.b) & (Y < 0.15 * head.b)
    else:
        dphi = wrap_angle(phi - p["phi"]) / p["phi_half"]
        sel = (np.abs(dphi) < zi) & (depth < p["depth"]) & (np.sign(X) == np.sign(p["phi"]))
    sel &= depth > 0
    csf = tissue == an.CSF
    reach = sel & (csf | ((tissue == an.GREY) & ndimage.binary_dilation(csf, iterations=1)))
    if not reach.any():
        return np.zeros(hu.shape, bool)
    field = _patch_field(int(p["patch_seed"]), X[reach], Y[reach], float(fr.z[i]))
    fill = np.clip((field - float(ndtri(1.0 - p["coverage"]))) / 0.5 + 0.5, 0, 1)
    share = np.clip((head.grey - hu[reach]) / (head.grey - head.csf), 0, 1)
    hu[reach] += (share * fill * (les.hu - head.csf)).astype(np.float32)
    blood = np.zeros(hu.shape, bool)
    blood[reach] = share * fill >= 0.6
    region = blood & csf
    tissue[region] = an.BLOOD
    return region


# Where traumatic contusions lie: the brain strikes the rough floors of the anterior and middle cranial
# fossae, so most are in the orbitofrontal cortex above the orbital roofs and in the temporal poles; fewer
# on the convexity. Each is a cluster of small haemorrhagic foci, mottled with oedema ("salt and pepper"),
# and a quarter have a second (contrecoup) cluster on the other side.
CONTUSION_SITES = {"frontal_base": 0.4, "temporal_pole": 0.35, "convexity": 0.25}


def _contusion_cluster(site: str, side: float, head: HeadShape, fr: Frame, rng: np.random.Generator):
    """Foci ``[x, y, z, radius, z_half, mottle]`` of one contusion cluster at ``site`` on ``side``."""
    if site == "frontal_base":
        z = _vault_range(head, fr, 6, 26, rng, 6)
        s = float(an.cranial_scale(head, np.float32(z)))
        x = side * float(rng.uniform(0.04, 0.35)) * head.a
        y = -float(rng.uniform(0.55, 0.78)) * head.b * s
    elif site == "temporal_pole":
        z = _vault_range(head, fr, -8, 14, rng, 6)
        # within the temporal compartment at that level
        cx, cy, half_a, half_b = an.temporal_outline(head, side, float(an.temporal_share_of_band(z)))
        x = cx + side * float(rng.uniform(-0.4, 0.5)) * half_a
        y = cy - float(rng.uniform(0.3, 0.85)) * half_b
    else:
        z = _vault_range(head, fr, head.widest - 24, head.widest + 12, rng, 6)
        ang = side * float(rng.uniform(0.3, 1.9))
        s = float(an.cranial_scale(head, np.float32(z)))
        rad = float(rng.uniform(0.62, 0.82))
        x, y = np.sin(ang) * head.a * s * rad, -np.cos(ang) * head.b * s * rad
    spread = float(rng.uniform(2, 10))
    n = int(min(1 + rng.poisson(2.0), 7))
    foci = []
    for k in range(n):
        r = float(rng.uniform(2.5, 9.0)) if k == 0 else float(rng.uniform(1.2, 4.5))
        dx, dy, dz = (rng.normal(0, spread, 3) * (1.0, 1.0, 0.5)) if k else (0.0, 0.0, 0.0)
        foci.append([float(x + dx), float(y + dy), float(z + dz), r, r * float(rng.uniform(0.7, 1.3)),
                     float(rng.uniform(0.0, 0.45))])
    return foci


def _plan_contusion(head: HeadShape, fr: Frame, side: float, lobes, oedema, rng: np.random.Generator) -> Lesion:
    site = str(rng.choice(list(CONTUSION_SITES), p=list(CONTUSION_SITES.values())))
    foci = _contusion_cluster(site, side, head, fr, rng)
    if rng.random() < 0.25:  # contrecoup: another cluster on the other side
        foci += _contusion_cluster(str(rng.choice(["frontal_base", "temporal_pole"])), -side, head, fr, rng)
    lo = min(f[2] - f[4] for f in foci)
    hi = max(f[2] + f[4] for f in foci)
    x0, y0 = foci[0][0], foci[0][1]
    return Lesion("intraparenchymal", "contusion", 0.5 * (lo + hi), 0.5 * (hi - lo), float(rng.uniform(55, 82)),
                  1.0 if x0 >= 0 else -1.0, {
                      "x": float(x0), "y": float(y0), "radius": float(foci[0][3]), "site": site,
                      # bruised brain swells more around its blood than a hypertensive bleed does
                      **oedema, "oedema": float(rng.uniform(2, 10)), "mass_mm": 0.0, "lobes": lobes, "foci": foci,
                      "focus_hu": [float(rng.uniform(52, 82)) for _ in foci]})


# Where the head was struck, for the bleeds a blow makes: an epidural lies under the blow (its artery torn
# by the fracture); subdurals, contusions and subarachnoid blood of the convexity lie under it (coup) or
# across the head from it (contrecoup), the basal contusions of the frontal and temporal lobes mostly from a
# blow to the back of the head. Each subtype's share of coup, for ``impact``.
COUP = {"epidural": 1.0, "subdural": 0.5, "convexity_contusion": 0.7, "basal_contusion": 0.4, "subarachnoid": 0.6}
IMPACT_ORDER = ("epidural", "subdural", "intraparenchymal", "subarachnoid")  # the first found places the blow


def impact(les: Lesion) -> tuple[float, float, float] | None:
    """``(phi, z, coup)`` for a traumatic lesion against the vault: its angle around the head (radians from
    the front, positive to the patient's left) and level, and the chance that the blow landed over it
    rather than across the head. None for bleeds that are not a blow's: a hypertensive or lobar bleed,
    blood in the basal cisterns or the Sylvian fissure, a subdural along the falx or the tentorium."""
    p = les.params
    if les.subtype == "epidural" or (les.subtype == "subdural" and "phi" in p):
        return float(p["phi"]), float(les.z), COUP[les.subtype]
    if les.subtype == "intraparenchymal" and les.kind == "contusion":
        x, y, z = p["foci"][0][:3]
        coup = COUP["convexity_contusion" if p["site"] == "convexity" else "basal_contusion"]
        return float(np.arctan2(x, -y)), float(z), coup
    if les.subtype == "subarachnoid" and p.get("site") == "sulcal":
        return float(p["phi"]), float(les.z), COUP["subarachnoid"]
    return None


def _dural_layer(les: Lesion, head: HeadShape, X, Y):
    """Where a subdural along the tentorium or the falx lies in plane, the same on every slice: for the
    tentorium, the leaf's level under each point (blood on its upper face, on one side, thickest halfway
    out along the leaf) and the layer's thickness there; for the falx, each point's distance from the
    midline towards the lesion's side and the layer's thickness over its stretch front to back (before
    the level's own profile)."""
    p = les.params
    if p["site"] == "tentorium":
        level, cover = an.tentorium_level(head, an.tentorium(head), X, Y)
        half = an.fossa_outline(head)[1]
        h = p["thickness"] * np.clip(np.sin(np.pi * np.clip(np.abs(X) / half, 0, 1)) * 1.3, 0.15, 1.0)
        return level, h * (cover > 0.5) * (np.sign(X) == les.side)
    dy = (Y - p["y_centre"]) / p["y_half"]
    return X * les.side, p["thickness"] * np.clip(1 - dy**2, 0, None) ** 0.8


def _dural_subdural(les: Lesion, head: HeadShape, fr: Frame, anat: Anatomy, i: int, layer, Y):
    """Slice ``i`` of a subdural along the tentorium or the falx (``layer`` from ``_dural_layer``): the
    voxels the blood mostly fills and the share of every voxel it fills, through the slice's thickness,
    inside the cavity."""
    z = float(fr.z[i])
    inside = (anat.depth[i] > 0.5) & (anat.tissue[i] != an.BONE)
    if les.params["site"] == "tentorium":
        level, h = layer
        lo = np.maximum(level, z - fr.thickness / 2)
        hi = np.minimum(level + h, z + fr.thickness / 2)
        frac = np.clip(np.clip(hi - lo, 0, None) / np.minimum(np.maximum(h, 1e-6), fr.thickness), 0, 1) * (h > 0)
    else:
        off, h = layer  # mm from the midline towards the lesion's side; the layer's thickness
        h = h * float(an.profile(np.float32(z), les.z - les.z_half, les.z + les.z_half))
        frac = ramp(off - 0.35 - h, max(fr.spacing, 0.35)) * (off > 0.35) * (h > 0.3)
        B = head.b * an.cranial_scale(head, np.float32(z))  # the cavity's half-length here
        frac = frac * an.falx_reach(head, Y, B, z) * (anat.tissue[i] != an.VENTRICLE)
    frac = (frac * inside).astype(np.float32)
    return frac >= 0.5, frac


def _zprof(fr: Frame, les: Lesion):
    """(n, 1, 1) half-ellipse profile of the lesion along z, with the slices it touches."""
    zp = an.profile(fr.z, les.z - les.z_half, les.z + les.z_half)
    return zp[:, None, None], np.nonzero(zp > 0)[0]


def paint_lesion(les: Lesion, head: HeadShape, fr: Frame, anat: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Draw the lesion into ``anat`` (HU and tissue) and return its boolean mask (n, H, W)."""
    mask = np.zeros(anat.hu.shape, bool)
    zp, idx = _zprof(fr, les)
    if len(idx) == 0:
        return mask
    X, Y = fr.X[0], fr.Y[0]
    phi = np.arctan2(X, -Y)
    w = max(fr.spacing, 0.35)
    p = les.params
    dural = les.subtype == "subdural" and p.get("site") in ("tentorium", "falx")
    layer = _dural_layer(les, head, X, Y) if dural else None
    for i in idx:
        hu, tissue, depth = anat.hu[i], anat.tissue[i], anat.depth[i]
        zi = float(zp[i, 0, 0])
        if layer is not None:
            region, frac = _dural_subdural(les, head, fr, anat, i, layer, Y)
            hu += frac * (les.hu - hu)
            tissue[region] = an.BLOOD
            mask[i] = region
        elif les.subtype in ("epidural", "subdural"):
            dphi = wrap_angle(phi - p["phi"]) / p["phi_half"]
            if les.subtype == "epidural":  # biconvex lens
                h = p["thickness"] * np.sqrt(np.clip(zi**2 - dphi**2, 0, None))
            else:  # crescent following the inner table, thickest in its middle
                h = p["thickness"] * np.clip(1 - dphi**2, 0, None) ** 1.2 * zi
            region = (ramp(depth - h, w) >= 0.5) & (depth > 0) & anat.cerebrum[i] & (np.abs(dphi) < 1)
            if les.subtype == "epidural":
                lo, hi = p["sector_bounds"]
                region &= (np.abs(phi) > lo + 1e-3) & (np.abs(phi) < hi - 1e-3) & (np.sign(phi) == les.side)
            else:
                region &= np.sign(X) == les.side
            value = np.full(hu.shape, les.hu, np.float32)
            if les.kind == "acute_on_chronic" and region.any():  # fresh blood layers in the dependent part
                level = np.percentile(fr.y_img[0][region], 55)
                value = np.where(fr.y_img[0] > level, float(p.get("fresh", 65.0)), les.hu).astype(np.float32)
            if p.get("swirl"):
                value = value - 18 * (np.sin(X * 0.6) * np.sin(Y * 0.6) > 0.6)
            hu[region] = value[region]
            tissue[region] = an.BLOOD
            mask[i] = region
            if les.subtype == "epidural" and p.get("fracture") and region.any():
                f_ang = p["phi"] + 0.3 * p["phi_half"] * np.sign(np.sin(p["phi"] * 7))
                arc = np.abs(wrap_angle(phi - f_ang)) * np.hypot(X, Y)
                line = (ramp(arc - 0.45, w) >= 0.35) & (depth < 0.5) & (depth > -head.skull * 3 - 3) \
                    & (tissue == an.BONE)
                hu[line] = np.minimum(hu[line], 60.0)
                # scalp swelling over the fracture
                dome = 7.0 * np.clip(1 - (dphi / 0.8) ** 2, 0, None) * zi  # a dome over the fracture
                swell = (depth < -head.skull * 1.2) & (depth > -head.skull - head.scalp - dome) & (hu < 20)
                hu[swell] = float(rng.uniform(40, 60))
                tissue[swell] = an.SOFT
        elif les.subtype == "subarachnoid":
            mask[i] = _paint_subarachnoid(les, head, fr, anat, i, zi, X, Y, phi)
        elif les.subtype == "intraventricular":
            vent = tissue == an.VENTRICLE
            if not p["bilateral"]:
                vent &= (np.sign(X) == les.side) | (np.abs(X) < 3)
            if les.kind == "layering":  # blood settles in the occipital horns: a horizontal fluid level
                vent &= Y > 0.12 * head.b
                yv = fr.y_img[0][vent]
                if yv.size == 0:
                    continue
                level = yv.max() - p["level"] * (yv.max() - yv.min())
                region = vent & (fr.y_img[0] >= level)
            else:
                region = vent
            hu[region] = les.hu
            tissue[region] = an.BLOOD
            mask[i] = region
        elif les.subtype == "intraparenchymal":
            paren = (tissue == an.GREY) | (tissue == an.WHITE)
            core = np.zeros(hu.shape, bool)
            near = np.zeros(hu.shape, bool)
            value = np.full(hu.shape, les.hu, np.float32)
            a0, a1, a2 = p["lobes"]
            focus_hu = p.get("focus_hu")
            for k, (fx, fy, fz, radius, z_half, mottle) in enumerate(p["foci"]):
                dz = (float(fr.z[i]) - fz) / max(z_half, 1e-3) * radius
                if abs(dz) >= radius:
                    continue
                dx, dy = X - fx, Y - fy
                th = np.arctan2(dy, dx)
                lobes = 0.18 * np.sin(3 * th + a0 + k) + 0.1 * np.sin(5 * th + a1) + 0.06 * np.sin(2 * th + a2)
                rmod = radius * (1 + lobes)  # lobulated, not a disc
                rr = np.sqrt(dx**2 + dy**2 + dz**2)
                inside = (rr < rmod) & paren
                if mottle > 0 and inside.any():  # blood mixed with bruised, oedematous brain
                    field = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32),
                                                    0.6 / max(fr.spacing, 0.1))
                    field /= float(field[inside].std()) + 1e-6
                    inside &= field > float(ndtri(mottle))
                if focus_hu is not None:
                    value[inside] = focus_hu[k]
                core |= inside
                near |= (rr < rmod + p["oedema"]) & paren
            rim = near & ~core & (depth > 1.5)
            if core.any():
                hu[rim] = np.minimum(hu[rim], float(head.white) - p.get("oedema_drop", 10.0))
            hu[core] = value[core]
            tissue[core] = an.BLOOD
            mask[i] = core
    return mask
