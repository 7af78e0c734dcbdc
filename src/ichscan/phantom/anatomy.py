"""A head in Hounsfield units, built slice by slice from soft shapes.

Frames: the *head frame* has X towards the patient's left, Y towards the back (posterior) and z upwards
in millimetres, with z = 0 near the orbitomeatal line and the inner table's vertex at ``HeadShape.top``.
Image rows run anterior to posterior and columns right to left of the patient (standard axial display,
ImageOrientationPatient 1/0/0/0/1/0); the head frame is the image frame rotated and shifted in plane.

The whole series is computed at once as ``(n, H, W)`` float32 arrays, and structures that exist only
over a band of levels are computed only on the slices of that band.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ichscan.phantom.geometry import (capsule, ellipse, ellipse_distance, metal_streaks, paint, ramp,
                                     segment_distance, wrap_angle)

# Tissue codes of ``Anatomy.tissue``: what mostly fills each voxel.
AIR, SOFT, FAT, BONE, CSF, VENTRICLE, GREY, WHITE, CALCIUM, METAL, SINUS, GLOBE, DURA, BLOOD = range(14)
TISSUE_NAMES = (
    "air", "soft_tissue", "fat", "bone", "csf", "ventricle", "grey_matter", "white_matter",
    "calcification", "metal", "sinus_air", "globe", "dura", "blood",
)
PARENCHYMA = (GREY, WHITE)
# Pons and medulla: the levels they span (mm) and their centre behind the head's (a share of ``HeadShape.b``),
# shared by the fossa's front wall (``_cranial_cavity``) and the brainstem itself (``_posterior_fossa``).
BRAINSTEM_LEVELS = (-48.0, 12.0)
BRAINSTEM_Y = 0.12
CSF_SPACES = (CSF,)


@dataclass(frozen=True)
class HeadShape:
    """One patient's head: sizes in mm, tissue densities in HU. Shared by a patient's studies."""

    a: float  # inner-table half-width (left-right) at the widest level
    b: float  # inner-table half-length (front-back)
    top: float  # z of the inner table at the vertex
    widest: float  # z of the widest section
    skull: float  # vault thickness
    scalp: float
    atrophy: float  # 0.8 young .. 1.6 old: ventricles, sulci and extra-axial CSF grow with it
    grey: float
    white: float
    csf: float
    coronal: float  # suture angles from the front, radians
    lambdoid: float
    gyri: float  # sulci around the hemisphere: they lie about 2 pi x 70 mm / gyri apart along the surface
    age: int
    # Drawn last, so that every field above is what it was before these were added:
    scalp_fat: float = 0.0  # share of fat in the subcutaneous layer (with its fibrous septa)
    temporalis: float = 0.0  # mm the temporal muscle adds to the scalp over the temporal fossae
    squama: float = 1.0  # the vault's thickness on the sides (parietal, temporal squama) over front and back's
    occiput: float = 0.0  # share of ``scalp`` the scalp adds behind the head, most over the occiput
    # A child's head (``child_head``); an adult's keeps these defaults:
    scale: float = 1.0  # mm of the patient per mm of the head frame: a child's head is a smaller one
    frontal_sinus: float = 1.0  # size of the frontal sinuses, sphenoid sinus and mastoid air cells as a share
    sphenoid_sinus: float = 1.0  # of an adult's (they pneumatize through childhood)
    mastoid: float = 1.0
    suture_gap: float = 0.5  # half-width (mm) of the sutures' fibrous gap: wider while the skull grows


# The structures drawn from a generator of the head's own (``head_rng``) and their tags; a structure with two
# sides draws the right from its tag and the left from the next (``sx`` > 0), so no two may be adjacent.
HEAD_RNG_TAGS = {"tentorium": 23, "ears": 29, "old_hypodensities": 31, "nasal": 37, "teeth": 41, "clip": 43,
                 "mastoid": 53, "ethmoid": 59, "petrous": 61, "condyles": 67, "maxillary": 71, "occipital": 79,
                 "nasopharynx": 83, "zygoma": 84, "muscles": 89, "temporal_squama": 97,
                 "skin": 101}
SIDED = ("mastoid", "petrous", "maxillary")


def head_rng(head: HeadShape, name: str, sx: int = -1) -> np.random.Generator:
    """A generator seeded by the head's own draws and the structure ``name`` (``HEAD_RNG_TAGS``; for a
    structure in ``SIDED``, side ``sx``): the same for every study of a patient, and drawing from it moves no
    other draw of a series."""
    tag = HEAD_RNG_TAGS[name] + int(name in SIDED and sx > 0)
    return np.random.default_rng([int(head.a * 1e6) % 2**31, int(head.top * 1e4) % 2**31, tag])


def slab_share(z: float, thickness: float, centre: float, half: float) -> float:
    """The share of a slice's slab (centred at ``z``, ``thickness`` mm) that a structure spanning ``centre``
    +- ``half`` mm fills, counted against the structure where it is thinner than the slab (so a slice
    through all of a small structure takes it whole): 0 where they do not meet."""
    lo, hi = max(z - thickness / 2, centre - half), min(z + thickness / 2, centre + half)
    return 0.0 if hi <= lo else min(1.0, (hi - lo) / min(thickness, 2 * half))


def sample_head(rng: np.random.Generator) -> HeadShape:
    atrophy = float(rng.uniform(0.8, 1.6))
    return HeadShape(
        # cephalic index (width / length of the inner table) about 0.72-0.92, as measured on real heads
        a=float(rng.uniform(62, 74)),
        b=float(rng.uniform(76, 88)),
        top=float(rng.uniform(102, 118)),
        widest=float(rng.uniform(38, 50)),
        skull=float(rng.uniform(5.0, 7.5)),
        scalp=float(rng.uniform(4.0, 7.0)),
        atrophy=atrophy,
        # measured on real heads (bench/realism.py): intracranial median 31-36 HU, 5th percentile 12-22
        grey=(grey := float(rng.uniform(36, 46))),
        white=float(rng.uniform(max(24.0, grey - 14), grey - 6)),
        csf=float(rng.uniform(2, 12)),
        coronal=float(np.deg2rad(rng.uniform(50, 62))),
        lambdoid=float(np.deg2rad(rng.uniform(122, 138))),
        gyri=float(rng.uniform(22, 28)),
        age=int(np.clip(20 + (atrophy - 0.8) * 75 + rng.normal(0, 6), 18, 95)),
        # measured on real heads (bench/realism.py's sources): the scalp over the vault reads -40..-80 HU a
        # few mm out from the bone (fat), and 8-11 mm thick on the sides at the temporal levels
        scalp_fat=float(rng.uniform(0.6, 0.9)),
        temporalis=float(rng.uniform(2.0, 6.0)),
        # real vaults are 5-8 mm thick front and back but 3.5-4.5 mm on the sides (1-5 at the temporal levels)
        squama=float(rng.uniform(0.5, 0.75)),
        # the scalp is thicker behind than in front: on the two real sources, 4-8.5 mm at the forehead and
        # 6-9.5 mm over the occiput (interquartile, outer table to skin, upper two thirds of the series)
        occiput=float(rng.uniform(0.15, 0.6)),
    )


CHILD_AGES = (2.0, 17.0)  # years: the ages ``child_head`` draws (``--children``); infants are not drawn


def child_head(head: HeadShape, age: float, rng: np.random.Generator) -> HeadShape:
    """``head`` as a child's of ``age`` years (2-17). What changes, from growth charts and paediatric CT:
    - size: the head's circumference is about 87% of an adult's at 2, 92% at 5, 97% at 10 (``scale``; every
      structure shrinks alike, the image's pixels and slices do not);
    - the vault: 2-3 mm thick at 2, an adult's by the late teens, with wider sutures while it grows;
    - no atrophy: small ventricles, sulci and cisterns, the brain filling the skull;
    - the sinuses pneumatize: the frontal sinuses from about 6 years (an adult's size by 15), the sphenoid
      from about 3 (by 12), the mastoid air cells mostly by 10;
    - a thinner scalp with less fat, and a smaller temporalis.
    The rest (densities, sutures' angles, gyri) is the adult draw's. ``rng`` draws only the atrophy."""
    if not CHILD_AGES[0] <= age <= CHILD_AGES[1]:
        raise ValueError(f"child age {age}: expected {CHILD_AGES[0]:g} to {CHILD_AGES[1]:g} years")
    grown = min(1.0, (age - 2.0) / 14.0)  # 0 at 2 years, 1 at 16
    scale = float(1.0 - 0.13 * np.exp(-(age - 2.0) / 6.0))
    return dataclasses.replace(
        head, age=int(age), scale=scale,
        atrophy=float(rng.uniform(0.76, 0.86)),
        # head-frame sizes are the patient's divided by ``scale``
        skull=head.skull * (0.4 + 0.6 * grown) / scale,
        scalp=head.scalp * (0.75 + 0.25 * grown) / scale,
        scalp_fat=head.scalp_fat * (0.6 + 0.4 * grown),
        temporalis=head.temporalis * (0.5 + 0.5 * grown),
        frontal_sinus=float(np.clip((age - 6.0) / 9.0, 0.0, 1.0)),
        sphenoid_sinus=float(np.clip((age - 3.0) / 9.0, 0.0, 1.0)),
        mastoid=float(np.clip(0.3 + 0.7 * (age - 2.0) / 8.0, 0.0, 1.0)),
        suture_gap=0.5 + 0.6 * (1.0 - grown),
    )


@dataclass
class Frame:
    """Where the pixels of one series lie in the head frame."""

    rows: int
    cols: int
    spacing: float  # head-frame mm per pixel, square pixels (the patient's: ``mm_spacing``)
    thickness: float  # head-frame mm (the patient's: ``mm_thickness``)
    z: np.ndarray  # (n,) slice centres, head frame
    angle: float  # in-plane rotation of the head, radians
    shift: tuple[float, float]  # head centre in the image frame (mm from the image centre)
    # No head is an ellipse: (amplitude, harmonic, phase) terms of a smooth radial scaling of the head
    # frame, applied to every structure alike (skull, brain and lesions keep their relations).
    warp: tuple[tuple[float, int, float], ...] = ()
    # Tilt of the scan plane against the head (radians): the plane rises by tan(pitch) mm per mm towards the
    # back of the image and tan(roll) per mm towards the patient's left (``ichscan.phantom.oblique``).
    pitch: float = 0.0
    roll: float = 0.0
    # mm of the patient per mm of the head frame (``HeadShape.scale``): ``spacing``, ``thickness`` and ``z``
    # are head-frame mm, which every structure is drawn in; the scanner and the file see the patient's mm.
    scale: float = 1.0
    X: np.ndarray = field(repr=False, default=None)  # (1, H, W) head frame
    Y: np.ndarray = field(repr=False, default=None)
    x_img: np.ndarray = field(repr=False, default=None)  # (1, H, W) image frame, mm from the centre
    y_img: np.ndarray = field(repr=False, default=None)

    def __post_init__(self):
        x = (np.arange(self.cols, dtype=np.float32) - (self.cols - 1) / 2) * self.spacing
        y = (np.arange(self.rows, dtype=np.float32) - (self.rows - 1) / 2) * self.spacing
        self.x_img = x[None, None, :] + np.zeros((1, self.rows, 1), np.float32)
        self.y_img = y[None, :, None] + np.zeros((1, 1, self.cols), np.float32)
        c, s = np.float32(np.cos(self.angle)), np.float32(np.sin(self.angle))
        dx = self.x_img - np.float32(self.shift[0])
        dy = self.y_img - np.float32(self.shift[1])
        self.X = c * dx + s * dy
        self.Y = -s * dx + c * dy
        if self.warp:
            phi = np.arctan2(self.X, -self.Y)
            scale = np.ones_like(phi)
            for amp, k, ph in self.warp:
                scale += np.float32(amp) * np.cos(k * phi + np.float32(ph))
            self.X = self.X / scale
            self.Y = self.Y / scale

    @property
    def n(self) -> int:
        return len(self.z)

    @property
    def mm_spacing(self) -> float:
        """Pixel size in the patient's mm (the file's PixelSpacing)."""
        return self.spacing * self.scale

    @property
    def mm_thickness(self) -> float:
        return self.thickness * self.scale

    @property
    def mm_z(self) -> np.ndarray:
        return self.z * np.float32(self.scale)


def make_frame(rng, head: HeadShape, n: int, rows: int, cols: int, thickness: float) -> Frame:
    """Where ``n`` slices of ``thickness`` mm (the patient's) lie on ``head``, in a field of view of 200-262 mm."""
    fov = float(rng.uniform(200, 262)) / head.scale  # head-frame mm: a child's head fills less of it
    thickness = thickness / head.scale
    coverage = (n - 1) * thickness
    full = head.top + head.skull + head.scalp + 38.0  # foramen magnum to the top of the scalp
    if coverage >= full:
        extra = coverage - full  # most of the extra length goes to the neck, at most 10 mm above the head
        z0 = -38.0 - rng.uniform(max(0.0, extra - 10.0), extra + 1e-3)
    else:  # thin or few slices: a random band that stays on the head
        z0 = rng.uniform(-38.0, max(-37.9, head.top + head.skull + head.scalp - coverage))
    z = (z0 + thickness * np.arange(n)).astype(np.float32)
    return Frame(
        rows=rows, cols=cols, spacing=fov / max(rows, cols), thickness=thickness, z=z, scale=head.scale,
        # heads lie turned and off-centre: mostly a few degrees, sometimes 20 or more
        angle=float(np.deg2rad(np.clip(rng.normal(0, 6) if rng.random() < 0.8 else rng.normal(0, 16), -35, 35))),
        shift=(float(rng.normal(0, 7)), float(rng.normal(-4, 8))),
        warp=tuple((float(rng.uniform(0.005, 0.035)), int(k), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3, 4, 5)),
    )


@dataclass(frozen=True)
class MassEffect:
    """Brain pushed away from a lesion: midline shift of ``mm`` towards the side opposite ``side``."""

    side: float  # +1 lesion on the patient's left, -1 right
    mm: float
    y: float  # front-back centre of the push
    z: float
    z_half: float


@dataclass
class Anatomy:
    hu: np.ndarray  # (n, H, W) float32
    tissue: np.ndarray  # (n, H, W) uint8 codes
    depth: np.ndarray  # (n, H, W) mm inside the inner table (negative outside)
    sector: np.ndarray  # (n, H, W) uint8: skull bone over each point, 1..6 (see ``sector_of``), 0 base
    cerebrum: np.ndarray  # (n, H, W) bool: supratentorial cavity, where convexity lesions can lie
    side_x: np.ndarray  # (1, H, W) head-frame X
    sulcal_effacement: np.ndarray | None = None
    tissue0: np.ndarray | None = None  # tissue codes before the lesions were painted


def profile(z, z0, z1):
    """Half-ellipse profile over the band z0..z1: 1 at its centre, 0 at and beyond its ends."""
    c = 0.5 * (z0 + z1)
    h = 0.5 * (z1 - z0)
    return np.sqrt(np.clip(1 - ((z - c) / h) ** 2, 0, 1)).astype(np.float32)


# The frontal compartment of the cavity below the supratentorial vault (``_cranial_cavity``): an ellipse
# centred FRONTAL_Y * b in front of the head's centre that grows from nothing at level 0 to FRONTAL_A * a by
# FRONTAL_B * b at ROOF_TOP mm. Its floor, the anterior cranial fossa, is lowest in the midline over the
# cribriform plate and rises over the orbital roofs to the rim.
ROOF_TOP = 12.0
FRONTAL_Y, FRONTAL_A, FRONTAL_B = -0.55, 0.55, 0.32
# Under it (``_skull_base``): each orbit centred ORBIT_X * a to the side and ORBIT_Y * b in front, at most
# ORBIT_HALF mm across and long; the ethmoid cells in the midline, ETHMOID_Y * b in front, ETHMOID_HALF.
ORBIT_X, ORBIT_Y, ORBIT_HALF = 0.36, -0.78, (16.0, 20.0)
ETHMOID_Y, ETHMOID_HALF = -0.62, (11.0, 12.0)


def orbital_roof_height(head: HeadShape, X, Y):
    """Level (mm, head frame) of the anterior cranial fossa's floor under each point: the frontal
    compartment holds the points above it. Beyond the compartment's rim (more than ``ROOF_TOP``) the
    floor is not the orbital roof."""
    rho = np.sqrt((X / (FRONTAL_A * head.a)) ** 2 + ((Y - FRONTAL_Y * head.b) / (FRONTAL_B * head.b)) ** 2)
    return (ROOF_TOP * rho).astype(np.float32)


def cranial_scale(head: HeadShape, z):
    """Relative size of the supratentorial cavity at level z (1 at the widest level, 0 at the vertex)."""
    up = np.clip((z - head.widest) / (head.top - head.widest), 0, 1)
    down = np.clip((head.widest - z) / (head.widest + 20.0), 0, 1)
    return np.where(z >= head.widest, np.sqrt(np.clip(1 - up**2, 0, 1)), 1 - 0.30 * down**1.6).astype(np.float32)


def fossa_outline(head: HeadShape) -> tuple[float, float, float]:
    """The posterior fossa at its widest level: its centre behind the head's (mm, along Y) and its
    half-width and half-length (mm). The cavity, the tentorium over it and the blood on it share these."""
    return 0.36 * head.b, 0.72 * head.a, 0.5 * head.b


def petrous_slope(head: HeadShape) -> float:
    """How far back (mm) the petrous ridges run for each mm out from the petrous apices."""
    return 0.22 * head.b / (0.6 * head.a)


def falx_reach(head: HeadShape, Y, B, z):
    """Where the falx reaches down between the hemispheres: in front of and behind the deep structures
    (beyond 0.36 of ``B``, the cavity's half-length at level ``z``), and all the way across high up."""
    return (np.abs(Y) > 0.36 * B) | (z > head.widest + 22)


def sector_of(head: HeadShape, phi, z):
    """Skull bone over a point: 1/4 frontal, 2/5 parietal, 3/6 occipital (right/left).

    Sutures (coronal, lambdoid, and the sagittal suture between the parietals high up) bound the bones.
    Midline separates sides for the frontal and occipital bones too: a simplification that keeps every
    bone on one side.
    """
    a = np.abs(phi)
    bone = np.where(a < head.coronal, 1, np.where(a < head.lambdoid, 2, 3)).astype(np.uint8)
    high = z > head.widest + 0.35 * (head.top - head.widest)
    # High up the parietals meet at the sagittal suture and the occipital bone is below the cut.
    bone = np.where(high & (bone == 3), 2, bone)
    return bone + np.where(phi >= 0, 3, 0).astype(np.uint8)


def suture_angles(head: HeadShape, z):
    """Angles of the sutures crossing a slice at level z (radians from the front, +left)."""
    angles = [head.coronal, -head.coronal]
    if z > head.widest + 0.35 * (head.top - head.widest):
        angles.append(np.pi)
    else:
        angles += [head.lambdoid, -head.lambdoid]
    return angles


@dataclass
class _Band:
    """Slices of one band of levels, copied out of the series (indexing with an array copies) to be
    painted, then written back by ``_Canvas.put``."""

    idx: np.ndarray  # slice indices in the series
    z: np.ndarray  # (k, 1, 1) their levels
    X: np.ndarray  # head frame: (k, H, W) where a mass displaces the brain, else (1, H, W)
    Y: np.ndarray  # (1, H, W)
    hu: np.ndarray  # (k, H, W)
    tissue: np.ndarray

    def profile(self, z0, z1):
        return profile(self.z, z0, z1)


@dataclass
class _Canvas:
    """The series being painted, with the grids that every structure is drawn on."""

    head: HeadShape
    fr: Frame
    hu: np.ndarray  # (n, H, W) float32, painted in place
    tissue: np.ndarray  # (n, H, W) uint8 codes
    z: np.ndarray  # (n, 1, 1) slice levels
    phi: np.ndarray  # (1, H, W) angle from the front, +pi/2 on the patient's left
    w: np.float32  # partial-volume ramp, mm
    smear: np.ndarray  # (n, 1, 1) one ramp per slice from the vault's slope: the scalp, the cap, the floors' feet
    A: np.ndarray  # (n, 1, 1) half-axes of the supratentorial inner table at each level
    B: np.ndarray
    slab: _Slab | None = None  # the cavity's depth through each voxel's slab (``_slab_through``)

    @property
    def X(self) -> np.ndarray:
        return self.fr.X

    @property
    def Y(self) -> np.ndarray:
        return self.fr.Y

    def band(self, idx: np.ndarray, X: np.ndarray | None = None) -> _Band:
        """The slices ``idx``, copied out to be painted; ``X`` replaces the head-frame X (a displaced grid)."""
        X = self.X if X is None else X
        return _Band(idx=idx, z=self.fr.z[idx][:, None, None], X=X[idx] if X.shape[0] > 1 else X, Y=self.Y,
                     hu=self.hu[idx], tissue=self.tissue[idx])

    def put(self, band: _Band) -> None:
        self.hu[band.idx], self.tissue[band.idx] = band.hu, band.tissue


@dataclass
class _Vault:
    """Outer contour of the skull, level by level: the scalp lies on it and the skull fills it."""

    thickness: np.ndarray  # (n, 1, 1) mm, front and back
    side: np.ndarray  # (n, 1, 1) the thickness on the sides, as a share of ``thickness``
    A: np.ndarray  # (n, 1, 1) half-axes of the outer table
    B: np.ndarray
    above: np.ndarray  # (n, 1, 1) bool: above the inner table's vertex, where the vault is a cap


@dataclass
class _Cavity:
    """The cranial cavity: where the brain and CSF go, and which slices cross its compartments."""

    depth: np.ndarray  # (n, H, W) mm inside the inner table (negative outside)
    cerebrum: np.ndarray  # (n, H, W) bool: inside the supratentorial compartments
    supra: np.ndarray  # indices of the slices through the supratentorial vault
    fossa: np.ndarray  # indices of the slices through the posterior fossa
    fossa_centre: tuple[float, float]
    fossa_depth: np.ndarray | None  # depth in the posterior fossa before the inner table's roughness


def build(head: HeadShape, fr: Frame, rng: np.random.Generator, mass: MassEffect | None = None,
          calcified: dict | None = None, distended: list[dict] | None = None) -> Anatomy:
    """Render the head over the series. ``calcified`` names physiological calcifications to draw;
    ``distended`` lists convexity regions (phi, phi_half, z, z_half) whose sulci blood has widened.

    Structures are painted outside in, each over the ones before; the order also fixes the random draws."""
    cv = _blank_canvas(head, fr)
    vault = _vault_outline(cv)
    _scalp(cv, vault, rng)
    cavity = _cranial_cavity(cv)
    cv.slab = _slab_through(cv, cavity.depth)
    rough = _roughen_inner_table(cv, cavity.depth, rng)
    _skull_vault(cv, vault, cavity.depth, rough, rng)
    _skull_base(cv, cavity.depth, rng)
    _upper_neck(cv)
    _frontal_sinuses(cv)
    _sutures(cv, cavity.depth)
    extra = _csf_and_brain(cv, cavity.depth, rng)
    Xw, efface = _mass_effect(cv, mass)
    _cortex_and_sulci(cv, cavity, extra, efface, distended, rng)
    _deep_cerebrum(cv, cavity, Xw, calcified or {})
    _posterior_fossa(cv, cavity)
    hu, tissue, depth = cv.hu, cv.tissue, cavity.depth
    sinus_hu = _venous_sinuses(head, fr, hu, tissue, depth, rng)
    _tentorium_and_deep_veins(head, fr, hu, tissue, depth, sinus_hu)
    _orbital_roofs(head, fr, hu, tissue, depth)
    _face_and_neck(head, fr, hu, tissue, depth, cv.w, rng)
    _mandibular_condyles(cv, vault, depth)
    _nasal_cavity(cv, vault, depth)
    _nasopharynx(cv, depth)
    _zygomatic_arches(cv, vault, depth)
    _muscle_planes(cv, vault, depth)
    _teeth(cv)
    _middle_fossae(head, fr, hu, tissue, depth)
    _ears(cv, vault, depth)
    _parenchymal_texture(hu, tissue, fr, rng)
    _old_hypodensities(cv, cavity)  # scar: their own density, over the texture of the brain they replaced
    _aneurysm_clip(cv)
    sector = np.where(depth > -30, sector_of(head, cv.phi, cv.z), 0).astype(np.uint8)
    return Anatomy(hu=hu, tissue=tissue, depth=depth, sector=sector, cerebrum=cavity.cerebrum & (depth > 0),
                   side_x=fr.X, sulcal_effacement=efface)


def _blank_canvas(head: HeadShape, fr: Frame) -> _Canvas:
    """Air over the whole series, and the grids shared by every structure."""
    n, H, W = fr.n, fr.rows, fr.cols
    z = fr.z[:, None, None]
    w = np.float32(max(fr.spacing, 0.35))  # partial-volume ramp
    # Through-plane smear: a surface at slope dr/dz smears over thickness * |dr/dz| in plane.
    s = cranial_scale(head, z)
    ds = np.abs(np.gradient(cranial_scale(head, fr.z), fr.z)) if n > 1 else np.zeros(1, np.float32)
    smear = np.sqrt(w**2 + (np.minimum(ds * head.a * fr.thickness, 25.0)[:, None, None]) ** 2).astype(np.float32)
    return _Canvas(head=head, fr=fr, hu=np.full((n, H, W), -1000.0, np.float32), tissue=np.zeros((n, H, W), np.uint8),
                   z=z, phi=np.arctan2(fr.X, -fr.Y), w=w, smear=smear, A=head.a * s, B=head.b * s)


def base_thickening(z):
    """How much thicker than ``head.skull`` the skull is at levels ``z``, as a share: none from 20 mm up,
    3% more per mm below, at most 120% (40 mm below)."""
    return 0.03 * np.clip(20.0 - z, 0, 40)


def _vault_outline(cv: _Canvas) -> _Vault:
    """The skull's outer contour: the inner table plus the vault's thickness, which grows towards the base
    and is thinner on the sides (``head.squama``, thinnest over the temporal fossae); below the skull base
    the contour keeps its size there, and above the inner vertex it closes in a cap as thick as the vault."""
    head, z = cv.head, cv.z
    base = z < 12.0
    tb = head.skull * (1 + base_thickening(z))  # thicker at the base
    side = np.maximum(head.squama * (1 - 0.25 * temporal_share(head, z)), 0.3).astype(np.float32)
    A_out_sk = np.where(base, head.a * float(cranial_scale(head, np.float32(12.0))), cv.A) + tb * side
    B_out_sk = np.where(base, head.b * float(cranial_scale(head, np.float32(12.0))), cv.B) + tb
    above = z > head.top
    cap = np.sqrt(np.clip(1 - ((z - head.top) / (head.skull + 0.1)) ** 2, 0, 1))
    A_out_sk = np.where(above, (head.a * 0.25 + head.skull) * cap, A_out_sk)
    B_out_sk = np.where(above, (head.b * 0.3 + head.skull) * cap, B_out_sk)
    return _Vault(thickness=tb, side=side, A=A_out_sk, B=B_out_sk, above=above)


def temporal_share(head: HeadShape, z):
    """How much of the temporalis lies on the levels ``z`` (0..1): all of it from the zygomatic arch up to
    a little below the widest section, thinning to none at the superior temporal line above it."""
    return np.clip((head.widest + 35.0 - z) / 30.0, 0, 1) * np.clip((z + 25.0) / 15.0, 0, 1)


def _scalp(cv: _Canvas, vault: _Vault, rng: np.random.Generator) -> None:
    """The head's outline: scalp over the skull's outer contour (narrower in the neck), thicker on the sides
    over the temporal fossae, and the nose. In layers: skin outside (``skin_mm``), subcutaneous fat (``head.scalp_fat``
    of it fat, the rest fibrous septa) under it, and on the bone a dense layer: galea and pericranium, and
    the temporalis on the sides. Everything within is painted over later."""
    head, z, X, Y, w, smear = cv.head, cv.z, cv.X, cv.Y, cv.w, cv.smear
    hu, tissue, above = cv.hu, cv.tissue, vault.above
    temporal = head.temporalis * temporal_share(head, z)
    A_head, B_front, B_back = _head_outline(cv, vault)
    # behind the widest point (Y > 0) the outline's half-length grows by the occiput's extra scalp: the two
    # half-ellipses meet with the same tangent at the sides, so the scalp thickens smoothly towards the back
    B_head = np.where(Y > 0, B_back, B_front)
    nose = ellipse(X, Y, 0, -B_head + 3, 9, 14, w) * ((z > -40) & (z < 0))
    d_head = ellipse_distance(X, Y, 0, 0, A_head, B_head)  # one distance, offset for the scalp's layers
    scalp = np.maximum(ramp(d_head, smear), nose)
    paint(hu, tissue, float(rng.uniform(30, 50)), scalp, SOFT)
    under_skin = ramp(d_head + skin_mm(head), smear)
    fat = under_skin * np.float32(head.scalp_fat) * np.clip(1.0 - 0.4 * np.float32(above), 0, 1)
    paint(hu, tissue, float(rng.uniform(-110, -70)), fat)
    galea = 0.6 + 0.1 * head.scalp  # galea and pericranium, mm
    d_dense = ellipse_distance(X, Y, 0, 0, vault.A + galea + 0.5 * temporal, vault.B + galea)
    paint(hu, tissue, float(rng.uniform(35, 55)), np.minimum(ramp(d_dense, smear), under_skin), SOFT)


SKIN_MM = (1.6, 2.8)  # the skin's thickness (epidermis and dense dermis), drawn per head


def skin_mm(head: HeadShape) -> float:
    """The head's skin (head-frame mm): 1.6-2.8 mm of the patient's, from a generator of its own. Both real
    sources show 1.5-2.5 mm of soft-tissue density under the air before any fat; until 7 Dec 2026 the phantom
    drew 1.2 mm, which the edge's ramps and the scanner's blur left as nothing."""
    return float(head_rng(head, "skin").uniform(*SKIN_MM)) / head.scale


def skin_half_width(a, b, y):
    """|X| (mm) of the skin at ``y`` on a level whose outline has half-width ``a`` and half-length ``b``
    (``_head_outline``); 0 beyond its length."""
    return a * np.sqrt(np.clip(1 - (y / b) ** 2, 0, None))


def _head_outline(cv: _Canvas, vault: _Vault):
    """The skin's outline level by level, an ellipse of half-axes (n, 1, 1): half-width, half-length in front
    and half-length behind (the occiput's extra scalp), from the skull's outer contour, the scalp and the
    temporalis; narrower in the neck, closing in a cap above the vertex."""
    head, z, above = cv.head, cv.z, vault.above
    temporal = head.temporalis * temporal_share(head, z)
    capsc = np.sqrt(np.clip(1 - ((z - head.top) / (head.skull + head.scalp + 0.1)) ** 2, 0, 1))
    A_head = np.where(above, (head.a * 0.3 + head.skull + head.scalp) * capsc, vault.A + head.scalp + temporal)
    B_head = np.where(above, (head.b * 0.35 + head.skull + head.scalp) * capsc, vault.B + head.scalp)
    B_back = B_head + head.scalp * head.occiput * np.where(above, capsc, 1.0)
    A_head = np.where(z < -45, A_head * 0.85, A_head)
    return A_head, B_head, B_back


@dataclass(frozen=True)
class Ear:
    """One auricle and its external auditory canal, in head-frame mm. Axially the auricle is a flap of skin
    over cartilage leaving the side of the head behind the canal's opening and running back and out at
    ``angle`` to the skin (flatter where the head rests on it), longest at mid-height, its rim (the helix)
    rolled; the canal is a tube of air from the concha inwards through the temporal bone."""

    z_centre: float  # level of the auricle's middle
    half_height: float  # the auricle spans z_centre +- this
    y_root: float  # where it leaves the head at z_centre (Y: positive behind the widest point)
    lean: float  # mm its root moves back per mm up (the auricle leans back)
    angle: float  # radians out from the skin
    length: float  # mm from root to rim at mid-height
    thickness: float  # mm of the flap
    hu: float  # skin and cartilage
    canal_z: float  # level of the external auditory canal
    canal_length: float  # mm from the skin inwards


EAR_CANAL_RADIUS = 3.5  # mm: the external auditory canal is about 7 mm across


def ears(head: HeadShape) -> tuple[Ear, Ear]:
    """The head's two ears (right, left), from a generator seeded by the head's own draws: the same for
    every study of a patient, and no other draw of a series changes with them. Sizes from anthropometry:
    auricles 55-65 mm high and 25-35 mm wide, standing out 10-45 degrees from the head, their middle about
    level with the canal, which lies at the skull base between the orbits' floor and the mastoid."""
    sub = head_rng(head, "ears")
    z_c = float(sub.uniform(-22, -10))
    out = []
    for _ in range(2):  # the two sides differ a little, as they do
        out.append(Ear(z_centre=z_c + float(sub.uniform(-2, 2)), half_height=float(sub.uniform(27, 33)),
                       y_root=float(sub.uniform(0.04, 0.12)) * head.b, lean=float(sub.uniform(0.15, 0.35)),
                       angle=float(np.deg2rad(sub.uniform(10, 45))), length=float(sub.uniform(20, 30)),
                       thickness=float(sub.uniform(3.0, 5.0)), hu=float(sub.uniform(50, 100)),
                       canal_z=z_c - float(sub.uniform(0, 4)), canal_length=float(sub.uniform(22, 28))))
    return out[0], out[1]


def _ears(cv: _Canvas, vault: _Vault, depth) -> None:
    """Draw ``ears(head)``: the auricles in the air beside the head (nothing inside the head changes), and
    the canals as air from the skin to the temporal bone, outside the cranial cavity. A slice takes each
    canal by the share of its thickness that the canal's 7 mm fill."""
    head, fr, w = cv.head, cv.fr, cv.w
    A_head, _, B_back = _head_outline(cv, vault)
    X, Y = cv.X[0], cv.Y[0]
    t = fr.thickness
    for sx, ear in zip((-1.0, 1.0), ears(head)):
        for i, z in enumerate(fr.z):
            z = float(z)
            hu, tissue = cv.hu[i], cv.tissue[i]
            u = (z - ear.z_centre) / ear.half_height
            a_i, b_i = float(A_head[i].item()), float(B_back[i].item())
            if abs(u) < 1:
                y0 = ear.y_root + ear.lean * (z - ear.z_centre)
                x_skin = skin_half_width(a_i, b_i, y0)
                length = ear.length * np.sqrt(1 - u * u)
                # root (2 mm inside the skin, so that the flap meets it), out and back, then the rim curling in
                out, back = np.sin(ear.angle), np.cos(ear.angle)
                p0 = (sx * (x_skin - 2.0), y0)
                p1 = (p0[0] + sx * out * (0.75 * length + 2.0), p0[1] + back * (0.75 * length + 2.0))
                curl = ear.angle - 0.5
                p2 = (p1[0] + sx * np.sin(curl) * 0.25 * length, p1[1] + np.cos(curl) * 0.25 * length)
                r = ear.thickness / 2
                flap = np.maximum(capsule(X, Y, *p0, *p1, r, w), capsule(X, Y, *p1, *p2, r, w))
                flap = np.maximum(flap, ellipse(X, Y, p2[0], p2[1], 1.25 * r, 1.25 * r, w))  # the helix rolled
                paint(hu, tissue, ear.hu, flap * (tissue == AIR), SOFT)
            share = slab_share(z, t, ear.canal_z, EAR_CANAL_RADIUS)
            if share > 0:
                y_c = ear.y_root - 4.0
                x_skin = skin_half_width(a_i, b_i, y_c)
                deep = x_skin - ear.canal_length + EAR_CANAL_RADIUS  # its rounded end reaches canal_length in
                canal = capsule(X, Y, sx * (x_skin + 1.0), y_c, sx * deep, y_c - 3.0, EAR_CANAL_RADIUS, w)
                paint(hu, tissue, -1000.0, canal * share * (depth[i] < -2.0), SINUS)


RAMUS_TOP = -32.0  # mm: where ``_face_and_neck`` stops drawing the rami and the condylar processes take over


CORTEX_MM = 1.3  # the cortical shell of the condyles and the upper cervical spine over their marrow


def corticated(X, Y, cx, cy, a, b, w, angle=0.0):
    """A bone of cortex over marrow: the fractions of each pixel inside the ellipse (the bone) and inside it
    less ``CORTEX_MM`` (the marrow), to paint in that order."""
    return (ellipse(X, Y, cx, cy, a, b, w, angle=angle),
            ellipse(X, Y, cx, cy, np.maximum(a - CORTEX_MM, 0.1), np.maximum(b - CORTEX_MM, 0.1), w, angle=angle))


def condyle_plan(head: HeadShape) -> dict:
    """The mandible's condyles as ``_mandibular_condyles`` draws them: cortex and marrow (HU), half-axes of
    the condyle's head (mm: across, front to back, up and down), how deep under the skin its middle lies,
    how far its long axis turns inwards and back (radians), and for each side (right, left) the level of its
    middle and how far behind the head's centre it lies (Y, mm): a little below and in front of that side's
    external auditory canal. From a generator of the head's own."""
    sub = head_rng(head, "condyles")
    plan = dict(cortex=float(sub.uniform(1000, 1500)), marrow=float(sub.uniform(250, 450)),
                half_ml=float(sub.uniform(8.0, 10.0)), half_ap=float(sub.uniform(4.0, 5.0)),
                half_z=float(sub.uniform(4.0, 5.5)), inset=float(sub.uniform(12.0, 16.0)),
                turn=float(np.deg2rad(sub.uniform(10, 25))))
    plan["centres"] = [(ear.canal_z - 2.0, ear.y_root - 4.0 - EAR_CANAL_RADIUS - plan["half_ap"] - 1.5)
                       for ear in ears(head)]
    return plan


def _mandibular_condyles(cv: _Canvas, vault: _Vault, depth) -> None:
    """The mandible's condylar processes: from the top of each ramus up and back to the condyle, an oval
    of bone (cortex over marrow, about 18 by 9 mm, its long axis turned inwards and back) in the glenoid
    fossa just in front of the external auditory canal, outside the cranial cavity. From a generator of the
    head's own (until 6 Dec 2026 the rami ended 15-25 mm below the skull base and nothing stood in front of
    the ears' canals)."""
    head, fr, w = cv.head, cv.fr, cv.w
    plan = condyle_plan(head)
    cortex, marrow, half_ml, half_ap, half_z = (plan[k] for k in ("cortex", "marrow", "half_ml", "half_ap", "half_z"))
    A_head, _, B_back = _head_outline(cv, vault)
    X, Y = cv.X[0], cv.Y[0]
    low = np.array([0.61 * head.a, -0.25 * head.b])  # where the ramus stops (``_face_and_neck``)
    inset, turn = plan["inset"], plan["turn"]
    for sx, (top, y_c) in zip((-1.0, 1.0), plan["centres"]):
        for i in np.nonzero((fr.z > RAMUS_TOP - fr.thickness / 2) & (fr.z < top + half_z + fr.thickness / 2))[0]:
            z = float(fr.z[i])
            a_i, b_i = float(A_head[i].item()), float(B_back[i].item())
            x_c = skin_half_width(a_i, b_i, y_c) - inset
            if z < top:  # the neck and the top of the ramus: a plate narrowing upwards
                u = float(np.clip((z - RAMUS_TOP) / (top - RAMUS_TOP), 0, 1))
                cx, cy = (1 - u) * low[0] + u * x_c, (1 - u) * low[1] + u * y_c
                shape = (2.5 + 1.5 * u, 10.0 - 5.5 * u, 0.0)
                share = 1.0
            else:  # the condyle's head, cut by the slab
                cx, cy = x_c, y_c
                f = float(np.sqrt(max(1 - ((z - top) / half_z) ** 2, 0.0)))
                shape = (half_ml * max(f, 0.3), half_ap * max(f, 0.3), sx * turn)
                share = slab_share(z, fr.thickness, top, half_z) if f < 0.3 else 1.0
            outside = (depth[i] < -2.0) & (cv.tissue[i] != AIR)
            bone, inner = corticated(X, Y, sx * cx, cy, shape[0], shape[1], w, angle=shape[2])
            paint(cv.hu[i], cv.tissue[i], cortex, bone * np.float32(share) * outside, BONE)
            paint(cv.hu[i], cv.tissue[i], marrow, inner * np.float32(share) * outside)


@dataclass(frozen=True)
class OldHypodensities:
    """A head's old, bloodless hypodensities (head-frame mm, HU above the head's CSF): chronic territorial
    infarcts, wedges of encephalomalacia from the cortex inwards (angle from the front, its sign the side;
    level, half-height, angular half-width at the surface, depth reached, density); lacunes, small round holes
    in the deep grey matter and the centrum semiovale (x, y, z, radius, density); and how much darker
    the periventricular white matter is (leukoaraiosis, HU) and over how many mm from the ventricles."""

    infarcts: tuple[tuple[float, float, float, float, float, float], ...] = ()
    lacunes: tuple[tuple[float, float, float, float, float], ...] = ()
    leuko_hu: float = 0.0
    leuko_mm: float = 8.0


def old_hypodensities(head: HeadShape) -> OldHypodensities:
    """What ``_old_hypodensities`` draws for ``head``, from a generator seeded by the head's own draws (the
    same for every study of a patient; no other draw changes). They come with age, as on CT of a general
    population: a territorial infarct in 5% of heads at 40 rising to 30% at 90, lacunes from 45 (on
    average 2.5 by 85), periventricular white-matter hypodensity from 55."""
    sub = head_rng(head, "old_hypodensities")
    old = float(np.clip((head.age - 40) / 50, 0, 1))
    infarcts = []
    if sub.random() < 0.05 + 0.25 * old:
        sx = float(sub.choice((-1.0, 1.0)))
        infarcts.append((sx * float(sub.uniform(0.6, 2.4)), head.widest + float(sub.uniform(-15, 30)),
                         float(sub.uniform(8, 20)), float(sub.uniform(0.12, 0.35)), float(sub.uniform(15, 40)),
                         float(sub.uniform(3, 12))))
    lacunes = []
    for _ in range(int(sub.poisson(2.5 * np.clip((head.age - 45) / 40, 0, 1)))):
        sx = float(sub.choice((-1.0, 1.0)))
        if sub.random() < 0.7:  # deep grey: lentiform nuclei, thalami, caudate heads, as _deep_grey_and_insula
            cx, cy = [(0.33 * head.a, -0.02 * head.b), (7.0 + 3 * head.atrophy, 0.12 * head.b),
                      (7.5 + 3.2 * head.atrophy, -0.17 * head.b)][int(sub.integers(3))]
            z = head.widest + float(sub.uniform(-22, 0))
        else:  # centrum semiovale
            cx, cy = float(sub.uniform(15, 35)), float(sub.uniform(-30, 30))
            z = head.widest + float(sub.uniform(10, 35))
        lacunes.append((sx * (cx + float(sub.normal(0, 2.5))), cy + float(sub.normal(0, 2.5)), z,
                        float(sub.uniform(1.5, 5.0)), float(sub.uniform(2, 10))))
    leuko = float(np.clip((head.age - 55) / 35, 0, 1) * sub.uniform(0, 8))
    return OldHypodensities(infarcts=tuple(infarcts), lacunes=tuple(lacunes), leuko_hu=leuko,
                            leuko_mm=float(sub.uniform(5, 12)))


def _old_hypodensities(cv: _Canvas, cavity: _Cavity) -> None:
    """Paint ``old_hypodensities(head)`` over the supratentorial grey and white matter only: the white matter
    darker towards the ventricles, then the infarcts and lacunes at their own density, each voxel by the
    share of its slab the lesion fills; tissue codes stay (an old infarct is scarred brain, not a CSF
    space that subarachnoid blood could fill)."""
    head, fr, w = cv.head, cv.fr, cv.w
    old = old_hypodensities(head)
    if not (old.infarcts or old.lacunes or old.leuko_hu > 0.5):
        return
    t = float(fr.thickness)
    X, Y = cv.X[0], cv.Y[0]
    radius = 0.5 * (head.a + head.b)
    for i in cavity.supra:
        z = float(fr.z[i])
        hu, tissue, depth, phi = cv.hu[i], cv.tissue[i], cavity.depth[i], cv.phi[0]
        brain = (tissue == GREY) | (tissue == WHITE)
        if old.leuko_hu > 0.5:
            vent = tissue == VENTRICLE  # and a calcified glomus in it: the ventricle's space, however it reads
            vent = ndimage.binary_propagation(vent, mask=vent | (tissue == CALCIUM))
            if vent.any():
                d = ndimage.distance_transform_edt(~vent) * fr.spacing
                fall = np.clip(1 - d / old.leuko_mm, 0, 1) * (tissue == WHITE)
                hu -= np.float32(old.leuko_hu) * fall.astype(np.float32)
        for phi0, z0, hz, half, reach, dens in old.infarcts:
            through = float(np.clip((hz - abs(z - z0)) / t + 0.5, 0, 1))  # its share of the slab
            if through <= 0:
                continue
            taper = np.clip(1 - depth / reach, 0, 1) ** 0.6  # a wedge: widest at the cortex
            ragged = 1 + 0.2 * np.sin(0.35 * depth + 3 * phi0) * np.sin(0.25 * z + phi0)  # margins not straight
            arc = np.abs(wrap_angle(phi - phi0)) * np.maximum(radius - depth, 5.0)
            f = ramp(arc - half * radius * taper * ragged, 2.0) * (taper > 0) * through
            paint(hu, tissue, head.csf + dens, f * brain)
        for x0, y0, z0, r, dens in old.lacunes:
            share = slab_share(z, t, z0, r)
            if share <= 0:
                continue
            near = max(abs(z - z0) - t / 2, 0.0)  # the slab's closest approach to its centre
            ri = float(np.sqrt(max(r * r - near * near, 0.0))) + 0.01
            paint(hu, tissue, head.csf + dens, ellipse(X, Y, x0, y0, ri, ri, w) * share * brain)


NASAL_LEVELS = (-50.0, -14.0)  # head-frame mm: from the hard palate up to where the ethmoid cells take over
NASAL_BACK = -0.38  # the choanae, as a share of ``head.b`` in front of the centre
TEETH_LEVELS = {"upper": (-62.0, -50.0), "lower": (-76.0, -63.0)}  # the crowns, under the hard palate


def nasal_plan(head: HeadShape) -> dict:
    """The head's nasal cavity (``_nasal_cavity``): its half-width at the widest (mm), the septum's bow (mm,
    signed), the side whose turbinates are swollen and by how much, and the densities of mucosa, the bony
    septum and walls, and the septal cartilage (HU)."""
    sub = head_rng(head, "nasal")
    return {"half_mm": float(sub.uniform(10.5, 14.0)), "deviation_mm": float(sub.uniform(-3.5, 3.5)),
            "swollen": float(sub.choice((-1.0, 1.0))), "cycle": float(sub.uniform(1.0, 1.4)),
            "mucosa": float(sub.uniform(30, 50)), "bone": float(sub.uniform(400, 900)),
            "cartilage": float(sub.uniform(80, 140))}


def _nasal_cavity(cv: _Canvas, vault: _Vault, depth) -> None:
    """The nasal cavity between the maxillary sinuses, from the nostrils back to the choanae and from the
    hard palate up to the ethmoid: air on either side of the septum (bone behind, cartilage in front, often
    deviated), lined by mucosa, with the inferior and middle turbinates hanging from the lateral walls (one
    side swollen more than the other: the nasal cycle), inside thin bony walls; and the nostrils in the
    external nose. Painted over the face's soft tissue and fat, never over the cranial cavity."""
    head, fr, w = cv.head, cv.fr, cv.w
    rows = np.nonzero((fr.z > NASAL_LEVELS[0] - 2) & (fr.z < NASAL_LEVELS[1] + 2))[0]
    if not len(rows):
        return
    plan = nasal_plan(head)
    half_max, deviation, swollen, cycle = plan["half_mm"], plan["deviation_mm"], plan["swollen"], plan["cycle"]
    mucosa, septum_bone, cartilage = plan["mucosa"], plan["bone"], plan["cartilage"]
    _, B_front, _ = _head_outline(cv, vault)
    X, Y = cv.X[0], cv.Y[0]
    for i in rows:
        z = float(fr.z[i])
        p = float(profile(np.float32(z), *NASAL_LEVELS))
        if p <= 0.05:
            continue
        hu, tissue = cv.hu[i], cv.tissue[i]
        y_front = -float(B_front[i].item()) + 12.0
        y_back = NASAL_BACK * head.b
        yc, half_y = 0.5 * (y_front + y_back), 0.5 * (y_back - y_front)
        half_x = half_max * p ** 0.5
        along = np.clip((Y - y_front) / (y_back - y_front), 0, 1)
        keep = (tissue != AIR) & (depth[i] < -2.0)  # never outside the face, never in the cranial cavity
        paint(hu, tissue, septum_bone, ramp(np.abs(ellipse_distance(X, Y, 0.0, yc, half_x + 0.6, half_y + 0.6)) - 0.6,
                                             w) * keep, BONE)
        inner = ellipse(X, Y, 0.0, yc, half_x, half_y, w)
        paint(hu, tissue, mucosa, inner * keep, SOFT)
        paint(hu, tissue, -1000.0, ellipse(X, Y, 0.0, yc, half_x - 1.2, half_y - 1.2, w) * keep, SINUS)
        for sx in (-1.0, 1.0):  # the turbinates: inferior low down, middle above it
            big = cycle if sx == swollen else 1.0
            for lo, hi, reach in ((NASAL_LEVELS[0] + 2, -30.0, 0.55), (-32.0, NASAL_LEVELS[1] - 2, 0.45)):
                t = float(profile(np.float32(z), lo, hi))
                if t > 0.05:
                    tx = min(half_x * reach * big * t ** 0.5, half_x - 1.5)
                    paint(hu, tissue, mucosa, ellipse(X, Y, sx * (half_x - tx / 2), yc + 0.1 * half_y, tx / 2 + 0.8,
                                                      0.8 * half_y * t ** 0.5, w) * inner, SOFT)
        sx_dev = deviation * np.sin(np.pi * along)
        septum = ramp(np.abs(X - sx_dev) - 1.0, w) * inner
        paint(hu, tissue, cartilage + (septum_bone - cartilage) * np.clip(2 * along - 0.6, 0, 1), septum, BONE)
        if -40 < z < -28:  # the nostrils, in the external nose below its bridge
            for sx in (-1.0, 1.0):
                nostril = ellipse(X, Y, sx * 4.5, -float(B_front[i].item()) - 1.0, 2.6, 4.5, w)
                paint(hu, tissue, -1000.0, nostril * (tissue == SOFT), SINUS)


NASOPHARYNX_LEVELS = (-46.0, -20.0)  # mm: from the soft palate up to the sphenoid's floor


def nasopharynx_plan(head: HeadShape) -> dict:
    """The airway behind the choanae (``_nasopharynx``): its half-width and half-depth (mm) at its middle
    level, and the soft tissue in front of the clivus behind it (the adenoid pad and the prevertebral
    muscles; thicker in a child), mm. From a generator of the head's own."""
    sub = head_rng(head, "nasopharynx")
    child = head.scale < 1.0
    return dict(half_x=float(sub.uniform(9.0, 14.0)), half_y=float(sub.uniform(4.5, 8.0)) * (0.6 if child else 1.0),
                back=float(sub.uniform(6.0, 10.0)) * (1.5 if child else 1.0))


def _nasopharynx(cv: _Canvas, depth) -> None:
    """The nasopharynx: air behind the choanae (where the nasal cavity opens into it, so no wall between),
    in front of the soft tissue that lies on the clivus and the atlas, from the soft palate up to the
    sphenoid. Never in the cranial cavity (until 6 Dec 2026 no slice above the neck had an airway behind
    the nose)."""
    head, fr, w = cv.head, cv.fr, cv.w
    plan = nasopharynx_plan(head)
    X, Y = cv.X[0], cv.Y[0]
    y_back = -0.05 * head.b - 9.0 - plan["back"]  # the clivus's front, less the soft tissue on it
    lo, hi = NASOPHARYNX_LEVELS
    for i in np.nonzero((fr.z > lo - fr.thickness) & (fr.z < hi + fr.thickness))[0]:
        p = float(profile(np.float32(fr.z[i]), *NASOPHARYNX_LEVELS))
        if p <= 0.05:
            continue
        hy = plan["half_y"] * p**0.5
        air = ellipse(X, Y, 0.0, y_back - hy, plan["half_x"] * p**0.5, hy, w)
        air = np.maximum(air, ellipse(X, Y, 0.0, NASAL_BACK * head.b, 6.0 * p**0.5, y_back - hy - NASAL_BACK * head.b,
                                      w) * (Y > NASAL_BACK * head.b))  # the choanae, open into it
        paint(cv.hu[i], cv.tissue[i], -1000.0, air * (depth[i] < -2.0) * (cv.tissue[i] != AIR), SINUS)


def zygoma_plan(head: HeadShape) -> dict:
    """The zygomatic arches (``_zygomatic_arches``): their middle level (mm; about the ear canals', the
    Frankfort plane's), half-height, thickness, depth under the skin (mm) and density (HU)."""
    sub = head_rng(head, "zygoma")
    z = float(np.mean([e.canal_z for e in ears(head)])) + float(sub.uniform(-1.0, 2.0))
    return dict(z=z, half_z=float(sub.uniform(3.5, 5.0)), thick=float(sub.uniform(2.5, 4.0)),
                inset=float(sub.uniform(1.0, 3.0)), hu=float(sub.uniform(900, 1500)))


def _zygomatic_arches(cv: _Canvas, vault: _Vault, depth) -> None:
    """The zygomatic arches: on the slices at the level of the ear canals, a thin bar of bone under the skin
    and fat on each side, from the cheekbone beside the maxillary sinus back to its root in front of the
    condyle, bowed out as the head's side is; with the cheekbone's body in front (until 6 Dec 2026 the
    sides of the face at that level were soft tissue)."""
    head, fr, w = cv.head, cv.fr, cv.w
    plan = zygoma_plan(head)
    A_head, B_front, _ = _head_outline(cv, vault)
    X, Y = cv.X[0], cv.Y[0]
    y_front, y_root = -0.62 * head.b, -0.10 * head.b
    for i, z in enumerate(fr.z):
        share = slab_share(float(z), fr.thickness, plan["z"], plan["half_z"])
        if share <= 0:
            continue
        a_i, b_i = float(A_head[i].item()), float(B_front[i].item())
        x_skin = skin_half_width(a_i, b_i, Y)
        x_out = x_skin - head.scalp - plan["inset"]  # the arch's outer face
        d = np.abs(np.abs(X) - (x_out - plan["thick"] / 2)) - plan["thick"] / 2
        span = ramp(np.maximum(y_front - Y, Y - y_root), w)  # only between the cheekbone and the root
        bar = ramp(d, w) * span
        xb = float(skin_half_width(a_i, b_i, y_front)) - head.scalp - plan["inset"] - 5.0
        for sx in (-1.0, 1.0):  # the cheekbone's body at the front end
            bar = np.maximum(bar, ellipse(X, Y, sx * xb, y_front, 6.0, 7.0, w, angle=-sx * 0.6))
        keep = (depth[i] < -2.0) & np.isin(cv.tissue[i], (SOFT, FAT))
        paint(cv.hu[i], cv.tissue[i], plan["hu"], bar * keep * np.float32(share), BONE)


MUSCLE_TOP = 12.0  # mm: below the vault, where the soft tissue outside the skull is muscle, not scalp


def muscle_plan(head: HeadShape) -> dict:
    """The fat planes between the muscles of the face and neck (``_muscle_planes``): the waves of a smooth
    3-D field whose zero set they are (wave vectors (kx, ky, kz) in radians per mm, amplitudes, phases;
    nearly horizontal, so the planes are sheets running up and down, as muscles do), the planes' thickness
    (mm) and the fat's density, and the waves and size (HU) of the muscles' own variation between them.
    From a generator of the head's own."""
    sub = head_rng(head, "muscles")

    def waves(n: int, lo: float, hi: float) -> tuple:
        lam = sub.uniform(lo, hi, n)
        th = sub.uniform(0, 2 * np.pi, n)
        tilt = sub.normal(0, 0.25, n)  # mostly horizontal wave vectors: sheets that run up and down
        k = 2 * np.pi / lam
        amp, phase = sub.uniform(0.5, 1.0, n), sub.uniform(0, 2 * np.pi, n)
        return tuple(zip(k * np.cos(th), k * np.sin(th), k * tilt, amp, phase))

    return dict(planes=waves(5, 35.0, 80.0), thick=float(sub.uniform(0.5, 1.0)), fat=float(sub.uniform(-100, -60)),
                tone=waves(6, 25.0, 60.0), tone_hu=float(sub.uniform(3.0, 7.0)))


def _field(waves, X, Y, z: float, gradient: bool = True):
    """A sum of plane waves at one level, and (with ``gradient``) its in-plane gradient's magnitude."""
    f = np.zeros(np.shape(X), np.float32)
    gx = np.zeros_like(f)
    gy = np.zeros_like(f)
    for kx, ky, kz, amp, ph in waves:
        arg = np.float32(kx) * X + np.float32(ky) * Y + np.float32(kz * z + ph)
        f += np.float32(amp) * np.cos(arg)
        if gradient:
            sn = np.float32(amp) * np.sin(arg)
            gx -= np.float32(kx) * sn
            gy -= np.float32(ky) * sn
    return f, (np.sqrt(gx * gx + gy * gy) if gradient else None)


def _muscle_planes(cv: _Canvas, vault: _Vault, depth) -> None:
    """Below the vault the soft tissue outside the skull is muscle (masseters, pterygoids, the neck's) in
    sheets with thin planes of fat between them, which axial CT shows as dark lines meandering through the
    grey, and the muscles differ a little in density from one to the next. Drawn on the soft tissue there,
    clear of the skin, as the zero set of a smooth field (``muscle_plan``); until 6 Dec 2026 it was one
    uniform grey with round islands of fat."""
    head, fr, w = cv.head, cv.fr, cv.w
    plan = muscle_plan(head)
    A_head, B_front, B_back = _head_outline(cv, vault)
    X, Y = cv.X[0], cv.Y[0]
    for i in np.nonzero(fr.z < MUSCLE_TOP)[0]:
        z = float(fr.z[i])
        B = np.where(Y > 0, B_back[i], B_front[i])
        inner = ellipse_distance(X, Y, 0, 0, A_head[i], B) < -(head.scalp + 1.0)
        muscle = inner & (cv.tissue[i] == SOFT) & (depth[i] < -2.0)
        if not muscle.any():
            continue
        f, g = _field(plan["planes"], X, Y, z)
        dist = np.abs(f) / np.maximum(g, 1e-3)  # mm to the nearest plane, to first order
        tone, _ = _field(plan["tone"], X, Y, z, gradient=False)
        hu, tissue = cv.hu[i], cv.tissue[i]
        hu += np.where(muscle, np.float32(plan["tone_hu"] / 2) * np.tanh(tone), 0).astype(np.float32)
        paint(hu, tissue, plan["fat"], ramp(dist - plan["thick"] / 2, w) * muscle, FAT)


TEETH_PER_SIDE = 7  # crowns from the midline back on each side of an arch


def tooth_centres(head: HeadShape) -> list[tuple[float, float, float]]:
    """(x, y, angle) of each crown of an arch, right side then left, on a curve just inside the mandible's
    U (``_face_and_neck``)."""
    cy, ax, ay = -0.35 * head.b, 0.58 * head.a, 0.58 * head.b
    out = []
    for sx in (-1.0, 1.0):
        for j in range(TEETH_PER_SIDE):
            ang = (j + 0.5) / TEETH_PER_SIDE * 1.15  # radians round the arch from the midline
            out.append((float(sx * ax * np.sin(ang)), float(cy - ay * np.cos(ang)), float(sx * ang)))
    return out


def teeth_plan(head: HeadShape) -> dict:
    """The head's teeth (``_teeth``): the crowns' density, which crowns hold amalgam fillings (a set of
    (arch, index into ``tooth_centres``); in 20% of heads at 20 rising to 70% at 70), and the fillings'
    streaks (angles, HU)."""
    sub = head_rng(head, "teeth")
    enamel = float(sub.uniform(1500, 2800))
    filled = set()
    if sub.random() < 0.2 + 0.5 * np.clip((head.age - 20) / 50, 0, 1):
        keys = [(arch, k) for arch in TEETH_LEVELS for k in range(2 * TEETH_PER_SIDE)]
        filled = {keys[int(k)] for k in sub.choice(len(keys), size=int(sub.integers(1, 5)), replace=False)}
    return {"enamel": enamel, "filled": filled, "streak_angles": tuple(float(a) for a in sub.uniform(0, np.pi, size=8)),
            "streak_hu": float(sub.uniform(150, 500))}


def _streaked(tissue) -> np.ndarray:
    """Where the teeth's and a clip's streaks are drawn (``geometry.metal_streaks``): the head, not the air
    round it (which the scanner's floor of -1024 HU would clip) nor the metal itself."""
    return ((tissue != AIR) & (tissue != METAL)).astype(np.float32)


def _teeth(cv: _Canvas) -> None:
    """The teeth under the hard palate: crowns of enamel and dentine (1500-2800 HU) in two arches on the
    mandible's curve (``tooth_centres``), upper and lower, 6 x 8 mm each; in a share of heads (more with age)
    some hold amalgam fillings (3000 HU), whose streaks cross the whole slice, as in real CT through the
    teeth. Drawn from ``teeth_plan``, a generator of the head's own."""
    head, fr, w = cv.head, cv.fr, cv.w
    rows = np.nonzero(fr.z < max(hi for _, hi in TEETH_LEVELS.values()) + 3)[0]
    if not len(rows):
        return
    plan = teeth_plan(head)
    enamel, filled, streak_angles, streak_hu = plan["enamel"], plan["filled"], plan["streak_angles"], plan["streak_hu"]
    X, Y = cv.X[0], cv.Y[0]
    for i in rows:
        z = float(fr.z[i])
        hu, tissue = cv.hu[i], cv.tissue[i]
        metal = []
        for arch, (lo, hi) in TEETH_LEVELS.items():
            t = float(profile(np.float32(z), lo - 1, hi + 1))
            if t <= 0.05:
                continue
            for (x0, y0, ang), key in zip(tooth_centres(head), ((arch, k) for k in range(2 * TEETH_PER_SIDE))):
                crown = ellipse(X, Y, x0, y0, 3.2 * t ** 0.5 + 0.01, 4.2 * t ** 0.5 + 0.01, w, angle=ang)
                paint(hu, tissue, enamel, crown * (tissue != AIR), BONE)
                if key in filled and t > 0.5:
                    paint(hu, tissue, 3000.0, ellipse(X, Y, x0, y0, 1.8, 2.2, w), METAL)
                    metal.append((x0, y0))
        for x0, y0 in metal:
            metal_streaks(hu, X, Y, (x0, y0), streak_angles, streak_hu, width_mm=1.0, fade_mm=80.0,
                          where=_streaked(tissue))


CLIP_SITES = {  # where clipped aneurysms sit round the circle of Willis: (x mm, y as a share of b, z mm)
    "anterior_communicating": (0.0, -0.24, 12.0),
    "middle_cerebral": (24.0, -0.16, 12.0),
    "posterior_communicating": (7.0, -0.10, 9.0),
}


def clip_plan(head: HeadShape) -> dict | None:
    """An aneurysm clip from an old operation, in 3% of adult heads (from 35), or None: its site (one of
    ``CLIP_SITES``, either side), the blades' angle, and the strength of its streaks; from a generator of
    the head's own."""
    sub = head_rng(head, "clip")
    if head.age < 35 or sub.random() >= 0.03:
        return None
    site = str(sub.choice(sorted(CLIP_SITES)))
    x, y, z = CLIP_SITES[site]
    sx = float(sub.choice((-1.0, 1.0)))
    return {"site": site, "x": sx * x, "y": y * head.b, "z": z + float(sub.uniform(-3, 3)),
            "angle": float(sub.uniform(0, np.pi)), "streak_hu": float(sub.uniform(300, 800)),
            "streak_angles": tuple(float(a) for a in sub.uniform(0, np.pi, size=10))}


CLIP_HALF = (4.5, 1.6, 3.0)  # mm: the clip's blades, half-length, half-width and half-height


def _aneurysm_clip(cv: _Canvas) -> None:
    """``clip_plan(head)``: metal (3000 HU) by its share of each slice's slab, and on the slices through it
    bright and dark streaks across the head, as real clips draw on CT; the tissue under it is METAL."""
    plan = clip_plan(cv.head)
    if plan is None:
        return
    fr, w = cv.fr, cv.w
    X, Y = cv.X[0], cv.Y[0]
    for i, z in enumerate(fr.z):
        share = slab_share(float(z), float(fr.thickness), plan["z"], CLIP_HALF[2])
        if share <= 0:
            continue
        hu, tissue = cv.hu[i], cv.tissue[i]
        blades = ellipse(X, Y, plan["x"], plan["y"], CLIP_HALF[0], CLIP_HALF[1], w, angle=plan["angle"])
        paint(hu, tissue, 3000.0, blades * share, METAL)
        metal_streaks(hu, X, Y, (plan["x"], plan["y"]), plan["streak_angles"], plan["streak_hu"] * share,
                      width_mm=1.2, fade_mm=70.0, where=_streaked(tissue))


def _cranial_cavity(cv: _Canvas) -> _Cavity:
    """Depth inside the inner table, as the union of soft ellipses: the supratentorial vault above the skull
    base; below it the temporal lobes in the middle cranial fossae and the frontal lobes over the orbital
    roofs, merging into the vault; and the posterior fossa under the tentorium."""
    return _cavity_at(cv.head, cv.fr.z, cv.X, cv.Y)


def _cavity_at(head: HeadShape, levels: np.ndarray, X, Y) -> _Cavity:
    """``_cranial_cavity`` at the head levels ``levels`` (mm, 1-D) on the grid ``X``, ``Y``."""
    n, H, W = len(levels), X.shape[-2], X.shape[-1]
    z = levels[:, None, None]
    sup = (levels >= 12.0) & (levels < head.top)
    depth = np.full((n, H, W), -100.0, np.float32)
    cerebrum = np.zeros((n, H, W), bool)
    if sup.any():
        s = cranial_scale(head, z[sup])
        d = -ellipse_distance(X, Y, 0, 0, head.a * s, head.b * s)
        depth[sup] = d
        cerebrum[sup] = d > 0
    midfossa = np.nonzero((levels > TEMPORAL_LEVELS[0]) & (levels < TEMPORAL_LEVELS[1]))[0]
    if len(midfossa):
        zm = z[midfossa]
        d = np.max(np.stack(_temporal_and_merging(head, X, Y, zm) + [_frontal_depth(head, X, Y, zm)]), axis=0)
        depth[midfossa] = np.maximum(depth[midfossa], d)
        cerebrum[midfossa] |= d > 0
    pf = np.nonzero((levels > -42) & (levels < 20))[0]
    pf_c = (0.0, fossa_outline(head)[0])
    pf_depth = None
    if len(pf):
        d = _posterior_fossa_depth(head, X, Y, z[pf])
        depth[pf] = np.maximum(depth[pf], d)
        pf_depth = d
    return _Cavity(depth=depth, cerebrum=cerebrum, supra=np.nonzero(sup)[0], fossa=pf, fossa_centre=pf_c,
                   fossa_depth=pf_depth)


def _mean_ramp(a, b, width):
    """Mean of ``ramp(x, width)`` as x runs linearly from ``a`` to ``b`` (exact: the ramp's integral)."""
    half = np.float32(width / 2)

    def tail(x):  # integral of the ramp from x to infinity
        return np.where(x < -half, -x, np.where(x > half, np.float32(0), (half - x) ** 2 / (4 * half)))

    run = b - a
    flat = np.abs(run) < 1e-3
    return np.where(flat, ramp((a + b) / 2, width), (tail(a) - tail(b)) / np.where(flat, 1, run)).astype(np.float32)


@dataclass
class _Slab:
    """The cranial cavity's depth at the bottom, centre and top of each voxel's slab. A surface that crosses
    the slab obliquely (the skull curving through a thick slice) fills each voxel by the share of the slab
    that lies on its side, which with depth linear from bottom to centre and from centre to top is exact:
    the slope of each compartment counts where it is (the temporal squama, the lateral frontal and the
    occipital bone, the vertex), and a compartment that begins within the slab fills part of it. Over the
    orbital roofs and the middle fossae's floors (``floor_feet``) the floors' passes draw the slab's shares
    themselves, from the slice as drawn at its centre, so there a voxel keeps the slice's single width."""

    lo: np.ndarray  # (n, H, W) depth (mm) at the slab's bottom and top
    hi: np.ndarray
    width: np.float32  # in-plane ramp, about a pixel
    smear: np.ndarray  # (n, 1, 1) the slice's single width, where ``own`` holds
    own: np.ndarray  # (n, H, W) bool: voxels a floor's pass draws through the slab

    def share(self, depth, level=0.0):
        """(n, H, W) share of each voxel's slab deeper than ``level`` mm inside the inner table (``depth``:
        at the slab's centre). Worked out only where the surface passes within a ramp of the slab: elsewhere
        the voxel is wholly on one side (1 or 0, as the formula gives there)."""
        level = np.broadcast_to(np.asarray(level, np.float32), depth.shape)
        reach = np.float32(self.width / 2 + 1e-3)
        deepest = np.maximum(np.maximum(self.lo, self.hi), depth)
        shallowest = np.minimum(np.minimum(self.lo, self.hi), depth)
        out = (shallowest > level).astype(np.float32)
        near = (shallowest < level + reach) & (deepest > level - reach)
        at = level[near]
        x1 = at - depth[near]
        w = self.width
        out[near] = (_mean_ramp(at - self.lo[near], x1, w) + _mean_ramp(x1, at - self.hi[near], w)) / 2
        own = self.own
        out[own] = ramp(level[own] - depth[own], np.broadcast_to(self.smear, depth.shape)[own])
        return out


def _slab_through(cv: _Canvas, depth) -> _Slab:
    """The cavity through each voxel's slab (``_Slab``): its depth at the slab's faces, beyond -30 and 30 mm
    held there (a compartment absent at a face is simply far). Until 6 Dec 2026 a surface was ramped over one
    width per slice from the supratentorial ellipse's slope alone (``_Canvas.smear``), which left the
    compartments below it as sharp on an 8 mm slice as on a 1 mm one."""
    fr, half = cv.fr, np.float32(cv.fr.thickness / 2)
    lo, hi = (np.clip(_cavity_at(cv.head, fr.z + sign * half, cv.X, cv.Y).depth, -30, 30) for sign in (-1, 1))
    own = np.zeros(depth.shape, bool)
    for foot, levels in floor_feet(cv.head, cv.X[0], cv.Y[0]):
        own[_slices_over(fr, levels)] |= foot
    return _Slab(lo=lo, hi=hi, width=cv.w, smear=cv.smear, own=own)


def _frontal_depth(head: HeadShape, X, Y, zm):
    """Depth (mm) inside the frontal compartment at levels ``zm``: the frontal lobes over the orbital
    roofs, above the orbits (their floor: ``orbital_roof_height``)."""
    tf = np.clip(zm / ROOF_TOP, 0, 1)
    return np.where(tf > 0, -ellipse_distance(X, Y, 0, FRONTAL_Y * head.b, FRONTAL_A * head.a * tf + 0.01,
                                              FRONTAL_B * head.b * tf + 0.01), -100)


def _posterior_fossa_depth(head: HeadShape, X, Y, zp):
    """Depth (mm) inside the posterior fossa at levels ``zp`` (n, 1, 1) between -42 and 20 mm."""
    pf_y, pf_a, pf_b = fossa_outline(head)
    p = profile(zp, -44, 22)
    d = -ellipse_distance(X, Y, 0.0, pf_y, pf_a * p, pf_b * p)
    # In front the fossa ends at the clivus, which the pons and medulla lie against (only their cistern
    # between, ``_posterior_fossa``), and at the sides along the petrous ridges, which run back and out
    # from the petrous apices beside it; what lies before them is bone (until 5 Dec 2026 the fossa was an
    # ellipse reaching two centimetres in front of the brainstem, filled with brain).
    bs = profile(zp, *BRAINSTEM_LEVELS)
    wall = BRAINSTEM_Y * head.b - (9.0 + _brainstem_cistern(head)) * bs - 0.5
    slope = petrous_slope(head)  # the ridges' run, as ``_skull_base`` draws them
    front = (Y - wall - slope * np.maximum(np.abs(X) - 0.15 * head.a, 0)) / np.float32(np.hypot(1, slope))
    d = np.minimum(d, np.where(bs > 0, front, d))
    # above the tentorium (z > 8) the occipital lobes take over: the posterior fossa shrinks away
    return np.where(zp > 8, np.minimum(d, -ellipse_distance(X, Y, 0, pf_y, 0.2 * head.a, 0.25 * head.b)), d)


def _temporal_and_merging(head: HeadShape, X, Y, zm) -> list[np.ndarray]:
    """Depth (mm) inside the cavity's other compartments below the supratentorial vault at levels ``zm``
    (n, 1, 1), in this order: the right and left temporal lobes in the middle cranial fossae, and the ellipse
    through which the compartments merge into the cerebrum near the top of the band."""
    t = temporal_share_of_band(zm)
    sc12 = float(cranial_scale(head, np.float32(12.0)))
    parts = []
    for sx in (-1, 1):
        parts.append(-ellipse_distance(X, Y, *temporal_outline(head, sx, t)))
    parts.append(-ellipse_distance(X, Y, 0, 0, head.a * sc12 * t**3 + 0.01, head.b * sc12 * t**3 + 0.01))
    return parts


# The middle cranial fossae: on each side a compartment for the temporal lobe, an ellipse centred
# TEMPORAL_X * a to the side and TEMPORAL_Y * b in front that grows from its floor at TEMPORAL_LEVELS[0] mm
# (half-axes TEMPORAL_A[0] * a and TEMPORAL_B[0] * b) by TEMPORAL_A[1] * a and TEMPORAL_B[1] * b up to
# TEMPORAL_LEVELS[1] mm, where the supratentorial vault takes over.
TEMPORAL_X, TEMPORAL_Y = 0.55, -0.12
TEMPORAL_A, TEMPORAL_B = (0.18, 0.22), (0.22, 0.18)
TEMPORAL_LEVELS = (-16.0, 12.0)


def temporal_share_of_band(z):
    """How far up the middle fossae's band the levels ``z`` lie: 0 at its floor, 1 at its top."""
    return np.clip((z - TEMPORAL_LEVELS[0]) / (TEMPORAL_LEVELS[1] - TEMPORAL_LEVELS[0]), 0, 1)


def temporal_outline(head: HeadShape, sx: float, t):
    """Centre and half-axes (mm) of the temporal compartment on side ``sx`` at ``t`` (0 at the fossa's
    floor, 1 at the top of the band)."""
    return (sx * TEMPORAL_X * head.a, TEMPORAL_Y * head.b, (TEMPORAL_A[0] + TEMPORAL_A[1] * t) * head.a,
            (TEMPORAL_B[0] + TEMPORAL_B[1] * t) * head.b)


def _roughen_inner_table(cv: _Canvas, depth, rng: np.random.Generator) -> np.ndarray:
    """The inner table is not smooth: digitate markings, ridges and grooves of a millimetre or so, which the
    extra-axial space and the brain follow (they are drawn from ``depth``). Returns the field added to
    ``depth`` (mm), so that the outer table can keep its smooth contour (``_skull_vault``)."""
    scale = float(rng.uniform(4, 10))
    rough = _smooth_field(rng, depth.shape, cv.fr.spacing, scale) * np.float32(rng.uniform(0.2, 1.2))
    rough = np.where(depth > -40, rough, np.float32(0))
    depth += rough
    if cv.slab is not None:  # the same markings through the slab
        cv.slab.lo += rough
        cv.slab.hi += rough
    return rough


VAULT_MIN_MM = 1.2  # the thinnest the vault gets where the inner table's markings cut deep (temporal squama)


def occipital_thinning(head: HeadShape, Y, z):
    """The share of the vault's thickness (``_Vault.thickness``, which grows towards the base) that the bone
    keeps at each point of the levels ``z`` (k, 1, 1): 1 in front and high up; behind the head's centre
    (fully from 0.4 b back) over the posterior fossa it falls to the occipital squama's own, 0.55-0.85 of
    ``head.skull`` (drawn per head) however far the base has thickened: the squama over the cerebellar
    hemispheres is thin, and what lies between it and the skin is the neck's muscles, not bone (until 6 Dec
    2026 the bone there was more than twice the vault's thickness, a ring 12-16 mm thick round the posterior
    fossa on every low slice). The skull's outline, and so the skin's, is unchanged."""
    occ = float(head_rng(head, "occipital").uniform(0.55, 0.85))
    k = base_thickening(z)
    behind = np.clip(Y / (0.4 * head.b), 0, 1)
    return ((1 + k * (1 - behind) + behind * (occ - 1) * np.clip(k / 0.6, 0, 1)) / (1 + k)).astype(np.float32)


TEMPORAL_SQUAMA_MM = (1.2, 3.0)  # the squamous temporal bone's thickness over the temporal lobe, drawn per head


def temporal_squama_mm(head: HeadShape) -> float:
    """The head's temporal squama (head-frame mm): 1.2-3 mm of the patient's, from a generator of its own."""
    return float(head_rng(head, "temporal_squama").uniform(*TEMPORAL_SQUAMA_MM)) / head.scale


def temporal_thinning(head: HeadShape, phi, z, tb):
    """The vault's thickness ``tb`` (head-frame mm, at angles ``phi`` from straight ahead on the levels ``z``)
    with the temporal squama thinned to its own thickness (``temporal_squama_mm``): fully where the temporalis
    lies on every level (``temporal_share``) and from about 25 degrees of straight out to the side, none from
    45 degrees, whatever the base's thickening; never thicker than ``tb``. The squamous temporal bone, the
    lateral wall of the middle fossa, is the thinnest bone of the vault (about 1-3 mm); until 7 Dec 2026 the
    phantom thickened it with the base to 2.5-6 mm. The skull's outline is unchanged: what the bone leaves is
    the temporalis, which the scalp already lays on the bone."""
    side = np.clip((np.sin(phi) ** 2 - 0.5) / 0.3, 0, 1) * temporal_share(head, z)
    return (tb + side * (np.minimum(tb, np.float32(temporal_squama_mm(head))) - tb)).astype(np.float32)


def _skull_vault(cv: _Canvas, vault: _Vault, depth, rough, rng: np.random.Generator) -> None:
    """Skull around the cavity: cortical bone from the inner table out to the vault's thickness (a cap
    above the inner vertex), thinner towards the sides as the outer contour is, with diploe between the
    tables where the bone is thick enough to have it. The inner table follows the roughened ``depth``; the
    outer table lies ``tb`` beyond the cavity's smooth surface (``depth - rough``), so the markings change
    the bone's thickness, not its outline. Measured along 360 rays on brain-filled slices (the residual
    SD of each edge's radius about its 15-degree running mean), real outer tables are the smoother edge:
    0.28 mm against 0.35 at the inner table on CT-ICH, 0.17 against 0.39 on the GE head; until 6 Dec 2026
    the whole vault followed the markings, both edges 0.32 mm, and rippled under a smooth scalp."""
    hu, tissue, X, Y, w, slab = cv.hu, cv.tissue, cv.X, cv.Y, cv.w, cv.slab
    tb = vault.thickness * (1 - (1 - vault.side) * np.sin(cv.phi) ** 2)  # as the contour's offset goes
    tb = temporal_thinning(cv.head, cv.phi, cv.z, tb * occipital_thinning(cv.head, Y, cv.z))
    cortical = float(rng.uniform(1300, 1800))
    diploe = float(rng.uniform(350, 700))
    capfrac = ellipse(X, Y, 0, 0, vault.A, vault.B, cv.smear) * vault.above
    # the outer table's level in the roughened depth (-tb in the smooth one), at least VAULT_MIN_MM out from the
    # inner table: deep markings on a thin squama would otherwise open holes through the vault
    outer = np.minimum(rough - tb, -VAULT_MIN_MM)
    paint(hu, tissue, cortical, np.maximum(slab.share(depth, outer), capfrac), BONE)
    paint(hu, tissue, diploe, slab.share(depth, outer + 1.8) * ramp(depth + 1.3, w) * (tb > 4.0))


def _skull_base(cv: _Canvas, depth, rng: np.random.Generator) -> None:
    """Skull base: dense petrous ridges and clivus, sinuses and orbits carved out of bone and soft tissue,
    then the ridges and air cells that make it cluttered (``_skull_base_clutter``)."""
    head, w = cv.head, cv.w
    lo = np.nonzero(cv.fr.z < 12.0)[0]
    if not len(lo):
        return
    s = cv.band(lo)
    X, Y, h_l, t_l = s.X, s.Y, s.hu, s.tissue
    orbit_band = s.profile(-22, 8)
    for sx in (-1, 1):
        # orbit: fat cone with the globe at its front
        paint(h_l, t_l, -90.0, ellipse(X, Y, sx * ORBIT_X * head.a, ORBIT_Y * head.b, ORBIT_HALF[0] * orbit_band,
                                       ORBIT_HALF[1] * orbit_band, w), FAT)
        g = s.profile(-16, 2)
        paint(h_l, t_l, 12.0, ellipse(X, Y, sx * 0.38 * head.a, -0.95 * head.b, 11.5 * g, 11.5 * g, w), GLOBE)
        paint(h_l, t_l, 110.0, ellipse(X, Y, sx * 0.38 * head.a, -1.08 * head.b, 4 * g, 1.6 * g, w))
        _maxillary_sinus(head, s, sx, w)
        # petrous pyramid: dense bone from the side towards the clivus, between middle and posterior fossae
        _petrous_pyramid(cv, s, sx)
    e = s.profile(-22, 10)
    wall = 1.5 * (e > 0)
    ey, (ea, eb) = ETHMOID_Y * head.b, ETHMOID_HALF
    paint(h_l, t_l, 700.0, ellipse(X, Y, 0, ey, ea * e + wall, eb * e + wall, w), BONE)
    eth = ellipse(X, Y, 0, ey, ea * e, eb * e, w)
    cells = air_cells(head_rng(head, "ethmoid"), (0.0, ey, -6.0), (ea, eb, 16.0), 4.5)
    for k, i in enumerate(s.idx):  # ethmoid air cells: a labyrinth of thin bony septa
        eth[k] *= _cell_air(cells, X[0], Y[0], float(cv.fr.z[i]), cv.fr.thickness, w, eth[k] > 0)
    paint(h_l, t_l, -900.0, eth, SINUS)
    paint(h_l, t_l, 300.0, ellipse(X, Y, 0, ey, 0.9 * e, eb * e, w))  # septum
    sp = s.profile(-12, 8)
    wall = 2.0 * (sp > 0)
    paint(h_l, t_l, 900.0, ellipse(X, Y, 0, -0.28 * head.b, 9 * sp + wall, 8 * sp + wall, w), BONE)
    sp = sp * np.float32(head.sphenoid_sinus)  # unpneumatized in young children: the body stays bone
    paint(h_l, t_l, -900.0, ellipse(X, Y, 0, -0.28 * head.b, 9 * sp, 8 * sp, w), SINUS)  # sphenoid
    cl = s.profile(-40, 0)
    paint(h_l, t_l, 800.0, ellipse(X, Y, 0, -0.05 * head.b, 6 * cl, 9 * cl, w), BONE)  # clivus
    cv.put(s)
    _skull_base_clutter(head, cv.fr, cv.hu, cv.tissue, lo, depth, w, rng)
    for sx in (-1, 1):
        _mastoid(cv, depth, sx)


# Each mastoid's air cells in an adult: a region centred MASTOID_X * a to the side, MASTOID_Y * b behind the
# head's centre and MASTOID_Z mm up, of half-axes MASTOID_HALF mm (a child's smaller, and solid bone at first).
MASTOID_X, MASTOID_Y, MASTOID_Z, MASTOID_HALF = 0.78, 0.24, -16.0, (11.0, 13.0, 15.0)
PETROUS_LOW = -32.0  # mm: the petrous pyramid's lowest level; its widest section lies half-way up to its ridge
INNER_EAR_HU = 25.0  # the labyrinth's fluid


def air_cells(rng: np.random.Generator, centre, half, cell_mm: float) -> cKDTree:
    """The seeds in head-frame mm (a k-d tree of (N, 3) points, ``.data``) of a foam of air cells filling the
    ellipsoid at ``centre`` with half-axes ``half``: each cell is the space nearer its seed than any other (a
    Voronoi foam), so cells of uneven size and shape meet at thin flat septa, as pneumatized bone is built.
    About ``cell_mm`` across on average; seeded once per head, so every slice cuts the same cells."""
    half = np.asarray(half, np.float64)
    volume = 4.0 / 3.0 * np.pi * float(np.prod(half))
    n = max(int(rng.poisson(6.0 * volume / (np.pi * cell_mm**3))), 2)
    u = rng.normal(size=(n, 3))
    u *= (rng.random(n) ** (1 / 3) / np.linalg.norm(u, axis=1))[:, None]  # uniform in the unit ball
    return cKDTree(np.asarray(centre, np.float64) + u * half)


def _cell_air(seeds: cKDTree, X, Y, z: float, thickness: float, w, where, septum: float = 0.6) -> np.ndarray:
    """Share of air in each pixel of one slice (X, Y: (H, W)) of the foam ``air_cells`` seeded, where
    ``where`` holds (0 elsewhere): air except on septa ``septum`` mm thick between neighbouring cells,
    averaged over the slice's slab (a thick slice blurs the septa into a grey honeycomb)."""
    out = np.zeros(np.shape(X), np.float32)
    pick = np.nonzero(where)
    if not len(pick[0]):
        return out
    m = int(np.clip(round(thickness / 1.5), 1, 5))
    xy = np.stack([np.asarray(X)[pick], np.asarray(Y)[pick]], axis=1).astype(np.float64)
    air = np.zeros(len(xy), np.float32)
    for k in range(m):
        zk = z - thickness / 2 + thickness * (k + 0.5) / m
        d, _ = seeds.query(np.column_stack([xy, np.full(len(xy), zk)]), k=2)
        gap = 0.5 * (d[:, 1] - d[:, 0])  # about the distance to the septum between the two nearest cells
        air += ramp(septum / 2 - gap, w)  # air beyond half a septum from the plane between the cells
    out[pick] = air / m
    return out


def petrous_plan(head: HeadShape, sx: int) -> dict:
    """One petrous bone (side ``sx``: -1 right, 1 left) as ``_petrous_pyramid`` draws it, in head-frame mm:
    its axis from the apex ``p0`` by the clivus to the base ``p1`` by the mastoid (the back face, where the
    posterior fossa carves it), its half-width across the axis from ``r_apex`` to ``r_base`` at the level of
    its widest section, its ridge ``top``, its density, and the inner ear's parts in front of the back face:
    ``vestibule``, ``cochlea``, the lateral semicircular ``canal`` (a ring of 3 mm), the internal auditory
    canal ``iac`` (from the back face to the vestibule) and the ``middle_ear``, each (x, y, z) or a pair of
    points, at the level of that side's external auditory canal. From a generator of the head's own."""
    sub = head_rng(head, "petrous", sx)
    r_apex, r_base = float(sub.uniform(3.0, 4.5)), float(sub.uniform(9.0, 13.0))
    top, bone = float(sub.uniform(2.0, 7.0)), float(sub.uniform(1500, 2000))
    p0 = np.array([sx * 0.15 * head.a, -0.02 * head.b])
    p1 = np.array([sx * 0.75 * head.a, 0.20 * head.b])
    axis = p1 - p0
    along = axis / np.hypot(*axis)
    back = np.array([-along[1], along[0]])
    back = back if back[1] > 0 else -back  # across the axis, towards the back of the head
    z = ears(head)[int(sx > 0)].canal_z

    def at(t: float, aside: float, dz: float) -> tuple[float, float, float]:
        q = p0 + t * axis + aside * back
        return float(q[0]), float(q[1]), float(z + dz)

    return dict(p0=(float(p0[0]), float(p0[1])), p1=(float(p1[0]), float(p1[1])), r_apex=r_apex, r_base=r_base,
                top=top, low=PETROUS_LOW, bone=bone, angle=float(np.arctan2(along[1], along[0])),
                vestibule=at(0.62, -4.0, 1.0), cochlea=at(0.52, -8.0, -1.0), canal=at(0.70, -3.5, 2.0),
                iac=(at(0.38, 1.0, 3.0), at(0.56, -4.0, 3.0)), middle_ear=at(0.82, -6.0, 0.0))


def _petrous_pyramid(cv: _Canvas, s: _Band, sx: int) -> None:
    """One petrous temporal bone (``petrous_plan``): a pyramid of the densest bone in the head, its base at
    the side by the mastoid and its apex by the clivus, running back and out between the middle and
    posterior fossae (the cavity, drawn later, carves its faces), its ridge on top; inside it the inner ear
    (cochlea, vestibule and lateral semicircular canal, fluid in bone), the internal auditory canal, and
    the middle ear's air at the end of the external canal. Each of these takes a slice by the share of its
    slab it fills, so thin slices show them and thick ones a hint (until 6 Dec 2026 the petrous ridge was
    a bar 9 mm across with nothing inside)."""
    head, w, fr = cv.head, cv.w, cv.fr
    plan = petrous_plan(head, sx)
    X, Y = s.X[0], s.Y[0]
    p0, p1 = np.array(plan["p0"]), np.array(plan["p1"])
    axis = p1 - p0
    t = np.clip(((X - p0[0]) * axis[0] + (Y - p0[1]) * axis[1]) / float(axis @ axis), 0, 1)
    dist = np.hypot(X - p0[0] - t * axis[0], Y - p0[1] - t * axis[1])
    prof = s.profile(plan["low"], plan["top"])
    half = (plan["r_apex"] + (plan["r_base"] - plan["r_apex"]) * t)[None] * prof
    paint(s.hu, s.tissue, plan["bone"], ramp(dist[None] - half, w) * (prof > 0.05), BONE)
    angle = plan["angle"]
    for k, z in enumerate(s.z[:, 0, 0]):
        z = float(z)
        h, ts = s.hu[k], s.tissue[k]
        x, y, zc = plan["vestibule"]
        if (share := slab_share(z, fr.thickness, zc, 2.0)) > 0:
            paint(h, ts, INNER_EAR_HU, share * ellipse(X, Y, x, y, 2.4, 1.7, w, angle=angle))
        x, y, zc = plan["cochlea"]
        if (share := slab_share(z, fr.thickness, zc, 2.5)) > 0:
            paint(h, ts, INNER_EAR_HU, share * ellipse(X, Y, x, y, 2.6, 2.2, w))
        x, y, zc = plan["canal"]
        if (share := slab_share(z, fr.thickness, zc, 0.5)) > 0:
            paint(h, ts, INNER_EAR_HU, share * ramp(np.abs(np.hypot(X - x, Y - y) - 3.0) - 0.5, w))
        (x0, y0, zc), (x1, y1, _) = plan["iac"]
        if (share := slab_share(z, fr.thickness, zc, 2.2)) > 0:  # nerves and CSF
            paint(h, ts, 15.0, share * capsule(X, Y, x0, y0, x1, y1, 2.2, w))
        x, y, zc = plan["middle_ear"]
        if (share := slab_share(z, fr.thickness, zc, 3.0)) > 0:
            paint(h, ts, -950.0, share * ellipse(X, Y, x, y, 2.5, 4.5, w, angle=angle + np.pi / 2), SINUS)


def _mastoid(cv: _Canvas, depth, sx: int) -> None:
    """One mastoid: bone behind the external auditory canal, riddled with air cells of a few millimetres
    (``air_cells``) between thin septa, outside the cranial cavity; smaller in a child, and solid bone
    before about 3 years. From a generator of the head's own (until 6 Dec 2026 the cells were a regular
    lattice of dots, the same in every head)."""
    head, fr, w = cv.head, cv.fr, cv.w
    size = 0.4 + 0.6 * float(head.mastoid)
    centre = (sx * MASTOID_X * head.a, MASTOID_Y * head.b, MASTOID_Z)
    half = tuple(size * h for h in MASTOID_HALF)
    idx = np.nonzero(np.abs(fr.z - centre[2]) < half[2] + fr.thickness / 2)[0]
    sub = head_rng(head, "mastoid", sx)
    bone, septum = float(sub.uniform(900, 1400)), float(sub.uniform(0.4, 0.9))
    cells = air_cells(sub, centre, half, float(sub.uniform(4.0, 6.5)))
    X, Y = cv.X[0], cv.Y[0]
    for i in idx:
        z = float(fr.z[i])
        f = float(np.sqrt(max(1 - ((z - centre[2]) / half[2]) ** 2, 0.0)))
        share = slab_share(z, fr.thickness, centre[2], half[2])
        if f <= 0.05 and share <= 0:
            continue
        f = max(f, 0.3)  # a slab that only grazes the region takes a little of it (``share``)
        region = ellipse(X, Y, centre[0], centre[1], half[0] * f, half[1] * f, w) * np.float32(share)
        hu, tissue = cv.hu[i], cv.tissue[i]
        outside = (depth[i] < -1.5) & np.isin(tissue, (BONE, SINUS))  # in the temporal bone, not the scalp
        paint(hu, tissue, bone, region * outside, BONE)
        if head.mastoid > 0.4:  # cells from about 3 years
            air = _cell_air(cells, X, Y, z, fr.thickness, w, region > 0, septum)
            paint(hu, tissue, -950.0, region * air * (depth[i] < -2.5) * outside, SINUS)


MAXILLARY_LEVELS = (-48.0, -14.0)  # mm: from the sinus's floor to its roof under the orbit


def maxillary_plan(head: HeadShape, sx: int) -> dict:
    """One maxillary sinus as ``_maxillary_sinus`` draws it: its size against the average, the angle
    (radians) of its posterolateral wall from the coronal plane, the bony wall's thickness (mm) and
    density, and the lining's thickness (0 in most heads; 1-5 mm of thickened mucosa in three in ten
    sinuses) and density. From a generator of the head's own."""
    sub = head_rng(head, "maxillary", sx)
    plan = dict(size=float(sub.uniform(0.85, 1.15)), angle=float(np.deg2rad(sub.uniform(25, 45))),
                wall=float(sub.uniform(0.8, 1.8)), wall_hu=float(sub.uniform(700, 1100)),
                mucosa=0.0, mucosa_hu=float(sub.uniform(20, 45)))
    if sub.random() < 0.3:
        plan["mucosa"] = float(sub.uniform(1.0, 5.0))
    return plan


def maxillary_distance(head: HeadShape, sx: int, X, Y, z, plan: dict | None = None):
    """Signed distance (mm, negative inside) to one maxillary sinus's air at levels ``z`` (k, 1, 1): an
    ellipse cut behind by a straight posterolateral wall running forward and out, so that axially it is a
    rounded triangle, widest in front (the medial wall is the nasal cavity's, drawn over it). ``plan``:
    that sinus's ``maxillary_plan``, when the caller has it."""
    plan = plan or maxillary_plan(head, sx)
    m = profile(z, *MAXILLARY_LEVELS) * np.float32(plan["size"])
    cx, cy = sx * 0.32 * head.a, -0.72 * head.b
    d = ellipse_distance(X, Y, cx, cy, 16.5 * m + 1e-3, 18.5 * m + 1e-3)
    n = (sx * np.sin(plan["angle"]), np.cos(plan["angle"]))  # out of the sinus through its back wall
    back = (X - cx) * np.float32(n[0]) + (Y - (cy + 11.0 * m)) * np.float32(n[1])
    return np.where(m > 0, np.maximum(d, back), np.float32(1e3)).astype(np.float32)


def _maxillary_sinus(head: HeadShape, s: _Band, sx: int, w) -> None:
    """One maxillary sinus (``maxillary_distance``, ``maxillary_plan``): a thin bony wall round air, lined
    in some heads by thickened mucosa (until 6 Dec 2026 each sinus was an ellipse with a 1.5 mm wall, the
    same shape in every head)."""
    plan = maxillary_plan(head, sx)
    d = maxillary_distance(head, sx, s.X, s.Y, s.z, plan)
    paint(s.hu, s.tissue, plan["wall_hu"], ramp(d - plan["wall"], w), BONE)
    paint(s.hu, s.tissue, plan["mucosa_hu"], ramp(d, w), SOFT)
    paint(s.hu, s.tissue, -950.0, ramp(d + plan["mucosa"], w), SINUS)


# The upper cervical spine (``_upper_neck``): the spinal canal's centre SPINE_Y * b behind the head's centre;
# the atlas's ring above C2_TOP mm, the axis's body below it.
SPINE_Y = 0.24
C2_TOP = -46.0


def _upper_neck(cv: _Canvas) -> None:
    """Below the foramen magnum: the atlas, a ring of bone (cortex over marrow) with its lateral masses at the
    sides, the dens of the axis in the front of the ring just behind its anterior arch, and the spinal canal
    with the cord behind the dens; below the atlas the axis's body in front of the canal and its laminae
    round it; and the pharynx. (Until 6 Dec 2026 a disc of bone 30 mm across with the canal in its middle.)"""
    head, w = cv.head, cv.w
    neck = np.nonzero(cv.fr.z < -36)[0]
    if not len(neck):
        return
    s = cv.band(neck)
    X, Y, h_n, t_n = s.X, s.Y, s.hu, s.tissue
    yc = SPINE_Y * head.b
    atlas = (s.z > C2_TOP).astype(np.float32)  # (k, 1, 1): 1 through the atlas, 0 below it
    ring = ramp(np.abs(ellipse_distance(X, Y, 0, yc - 4.0, 18.0, 19.5)) - 1.8, w)  # the ring (the axis's laminae)
    ring = ring * np.where(Y < yc - 10.0, atlas, 1.0)  # its anterior arch is the atlas's only
    right, right_marrow = corticated(X, Y, -16.0, yc - 8.0, 6.0, 9.0, w)  # the lateral masses
    left, left_marrow = corticated(X, Y, 16.0, yc - 8.0, 6.0, 9.0, w)
    masses = np.maximum(right, left)
    dens_r = 5.5 * atlas + 8.0 * (1 - atlas)  # the dens, or the axis's body below the atlas
    dens, dens_marrow = corticated(X, Y, 0, yc - 15.0, dens_r, dens_r, w)
    paint(h_n, t_n, 900.0, np.maximum(np.maximum(ring, masses * atlas), dens), BONE)
    paint(h_n, t_n, 350.0, np.maximum(dens_marrow, np.maximum(right_marrow, left_marrow) * atlas))
    canal = ellipse(X, Y, 0, yc + 3.0, 11.0, 10.0, w) * (1 - masses * atlas)
    paint(h_n, t_n, 8.0, canal * (1 - dens), CSF)
    paint(h_n, t_n, head.white + 8, ellipse(X, Y, 0, yc + 4.0, 5.5, 4.5, w), WHITE)  # cord
    paint(h_n, t_n, -900.0, ellipse(X, Y, 0, -0.35 * head.b, 9.0, 7.0, w), SINUS)  # pharynx
    cv.put(s)


def _frontal_sinuses(cv: _Canvas) -> None:
    """The frontal sinuses: air in the frontal bone, in front of the inner table above the orbits."""
    head = cv.head
    fs = np.nonzero((cv.fr.z > 2) & (cv.fr.z < 32))[0]
    if not len(fs) or head.frontal_sinus <= 0:
        return
    s = cv.band(fs)
    p = s.profile(2, 32) * np.float32(head.frontal_sinus)
    Bi = head.b * cranial_scale(head, s.z)
    paint(s.hu, s.tissue, -950.0, ellipse(s.X, s.Y, 0, -Bi - head.skull * 0.55 - 1.5 * p, 13 * p, 3.5 * p + 0.01,
                                          cv.w), SINUS)
    cv.put(s)


def _sutures(cv: _Canvas, depth) -> None:
    """Sutures: narrow fibrous gaps through the vault, zig-zagging a little."""
    head, fr, hu, tissue, w = cv.head, cv.fr, cv.hu, cv.tissue, cv.w
    vault = np.nonzero((fr.z > 0) & (fr.z < head.top + head.skull))[0]
    R = np.hypot(cv.X, cv.Y)
    for i in vault:
        for ang in suture_angles(head, float(fr.z[i])):
            wig = 0.8 * np.sin(R[0] * 2.3 + ang * 7)
            arc = np.abs(wrap_angle(cv.phi[0] - ang)) * R[0]
            gap = ramp(np.abs(arc - wig) - head.suture_gap, w) * (depth[i] > -head.skull - 2) * (depth[i] < 0.5) \
                * (tissue[i] == BONE)  # through the bone, not out into the scalp where the vault is thin
            paint(hu[i], tissue[i], 150.0, gap * 0.85)


def _brainstem_cistern(head: HeadShape) -> float:
    """Width (mm) of the CSF in front of the pons and medulla: under 1 mm in young heads, 3 with atrophy."""
    return 0.6 + 3.0 * (head.atrophy - 0.8)


def _csf_and_brain(cv: _Canvas, depth, rng: np.random.Generator) -> float:
    """Intracranial contents: CSF fills the cavity, then grey matter inside an extra-axial CSF layer (the
    white matter and the sulci are carved into it later). Returns the layer's width, mm."""
    head, hu, tissue, slab = cv.head, cv.hu, cv.tissue, cv.slab
    inside = slab.share(depth)
    # Extra-axial CSF: next to none in many young heads (brain against the inner table), wide when atrophic.
    extra = (0.8 + 1.4 * (head.atrophy - 0.8)) * float(rng.uniform(0.1, 1.1))
    paint(hu, tissue, head.csf, inside, CSF)
    brain = slab.share(depth, extra)
    paint(hu, tissue, head.grey, brain, GREY)
    return extra


def _mass_effect(cv: _Canvas, mass: MassEffect | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Mass effect: the head-frame X on which the deep structures and the midline are drawn, pushed away
    from a lesion, and how far the sulci near it are effaced (0..1; None without a mass)."""
    head, X, Y, z = cv.head, cv.X, cv.Y, cv.z
    Xw = X
    efface = None
    if mass is not None and mass.mm > 0:
        zprof = np.exp(-0.5 * ((z - mass.z) / max(mass.z_half, 1.0)) ** 2)
        push = mass.mm * zprof * np.exp(-0.5 * ((Y - mass.y) / 55.0) ** 2)
        Xw = X + mass.side * push * np.clip(1 - np.abs(X) / (head.a * 1.1), 0, 1)
        near = ((X + mass.side * head.a) ** 2 + (Y - mass.y) ** 2) / 30.0**2
        efface = np.clip(zprof * np.exp(-0.5 * near) * 1.5, 0, 1)
    return Xw, efface


def _folding_field(sub: np.random.Generator, waves: int, wavelength: float, stretch: tuple[float, float]):
    """A smooth random field over the cortex, unit variance: ``waves`` plane waves of random direction and
    phase in (arc along the surface, depth, z), mm, their wavelengths around ``wavelength`` along the surface
    and ``stretch`` times longer in depth and in z. Returns (field(s, d, z), rms gradient along the surface)."""
    kappa = 2 * np.pi / (wavelength * sub.uniform(0.8, 1.25, waves))
    theta = sub.uniform(0, 2 * np.pi, waves)
    lean = sub.normal(0, 1, waves)
    k_s = (kappa * np.cos(theta)).astype(np.float32)
    k_z = (kappa * np.sin(theta) / stretch[1]).astype(np.float32)
    k_d = (kappa * lean / stretch[0]).astype(np.float32)
    phase = sub.uniform(0, 2 * np.pi, waves).astype(np.float32)
    amp = np.float32(np.sqrt(2.0 / waves))

    def field(sc, dc, zc):
        out = np.zeros(sc.shape, np.float32)
        for i in range(waves):
            out += np.cos(k_s[i] * sc + k_d[i] * dc + k_z[i] * zc + phase[i])
        return out * amp

    return field, float(np.sqrt(np.mean(k_s.astype(np.float64) ** 2)))


def _cortex_and_sulci(cv: _Canvas, cavity: _Cavity, extra: float, efface, distended: list[dict] | None,
                      rng: np.random.Generator) -> None:
    """Cortex, gyri and sulci: white matter under a cortical ribbon that folds, and CSF in the
    supratentorial sulci, widened by atrophy and by blood (``distended``), narrowed by a mass (``efface``).
    Computed only on voxels inside the cavity.

    The sulci are the zero set of a smooth random field over (arc along the surface, depth, z): they run
    from the surface inwards, meander, branch and end, and where a slice cuts one along its length it reads
    as a wider cleft, as real sulci do on axial CT (the generator of 5 Dec 2026, morning, and before drew
    ``gyri`` straight radial spokes of one depth pattern, which a realism discriminator could tell at a
    glance: docs/phantom.md). The white matter reaches up into each gyrus, furthest where the field is
    furthest from zero."""
    head, hu, tissue, w = cv.head, cv.hu, cv.tissue, cv.w
    depth = cavity.depth
    cav = depth > 0
    full = depth.shape
    dc = depth[cav]
    Xc = np.broadcast_to(cv.X, full)[cav]
    Yc = np.broadcast_to(cv.Y, full)[cav]
    zc = np.broadcast_to(cv.z, full)[cav]
    phic = np.arctan2(Xc, -Yc)
    rphase = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    # The folding pattern's own generator, seeded from the draw above: no draw after this one changes.
    sub = np.random.default_rng(np.frombuffer(rphase.tobytes(), np.uint32).tolist())
    # arc length along the surface at the cavity's edge (so that a sulcus keeps its place as it deepens); it
    # jumps where phi wraps, behind the midline, under the interhemispheric fissure drawn there later
    sc = phic * (np.maximum(np.hypot(Xc, Yc), 5) + dc)
    spacing = 2 * np.pi * 70.0 / head.gyri  # mm between sulci along the surface: 16-20 mm
    # a random field crosses zero about twice per wavelength: waves twice the spacing long
    fold, slope = _folding_field(sub, 24, 2 * spacing, stretch=(3.0, 1.3))
    f = fold(sc, dc, zc)
    arc = np.abs(f) / np.float32(slope)  # about the distance (mm, along the surface) to the nearest sulcus
    # Sulci from barely visible (young, thick slices: partial volume) to wide (atrophy).
    sulcus_w = np.float32((0.8 + 1.6 * (head.atrophy - 0.8)) * float(rng.uniform(0.45, 1.15)))
    for reg in distended or ():
        inreg = (np.abs(wrap_angle(phic - reg["phi"])) < reg["phi_half"] * 1.1) \
            & (np.abs(zc - reg["z"]) < reg["z_half"])
        sulcus_w = sulcus_w + np.float32(reg.get("widen", 2.0)) * inreg
    if efface is not None:
        sulcus_w = sulcus_w * (1 - 0.85 * np.broadcast_to(efface, full)[cav])
    sulc_depth = 11.0 + 3 * (head.atrophy - 0.8)
    cortex = 3.5  # 2.5-3 mm of cortex, cut obliquely by slices of several mm
    crown = np.clip(np.abs(f) / 1.6, 0, 1)  # 0 in a sulcus, 1 at a gyrus' crown
    wm_depth = extra + cortex + sulc_depth * (1 - crown) ** 0.8
    h_c, t_c = hu[cav], tissue[cav]
    paint(h_c, t_c, head.white, ramp(wm_depth - dc, w), WHITE)
    deep, _ = _folding_field(sub, 8, 6 * spacing, stretch=(4.0, 1.0))
    fundus = extra + sulc_depth * (0.75 + 0.35 * np.clip(deep(sc, dc, zc), -1.5, 1.5))  # sulci of varied depth
    sul = ramp(arc - sulcus_w / 2, w) * ramp(dc - fundus, w)
    paint(h_c, t_c, head.csf, sul * (cavity.cerebrum[cav] & (zc >= 12)), CSF)
    hu[cav], tissue[cav] = h_c, t_c


def _deep_cerebrum(cv: _Canvas, cavity: _Cavity, Xw, calcified: dict) -> None:
    """The midline and the deep structures of the cerebrum, by level, on the grid a mass displaces (``Xw``).
    Painted in this order because each carves into the ones before."""
    if not len(cavity.supra):
        return
    s = cv.band(cavity.supra, X=Xw)
    depth = cavity.depth[cavity.supra]
    _falx_and_fissure(cv, s, depth)
    _deep_grey_and_insula(cv, s, depth)
    _basal_cisterns(cv, s)
    _ventricles(cv, s)
    _choroid_and_calcifications(cv, s, calcified)
    cv.put(s)


def _interhemispheric(cv: _Canvas, s: _Band):
    """``falx_reach`` on the slices of ``s``."""
    return falx_reach(cv.head, s.Y, cv.B[s.idx], s.z)


def _basal_ganglia_size(head: HeadShape, s: _Band):
    """Relative size of the basal ganglia on each slice of ``s``: 1 at their middle level."""
    return s.profile(head.widest - 26, head.widest + 4)


def _falx_and_fissure(cv: _Canvas, s: _Band, depth) -> None:
    """The interhemispheric fissure, wider with atrophy, with the falx in it."""
    head, w = cv.head, cv.w
    ih = _interhemispheric(cv, s)
    fiss = ramp(np.abs(s.X) - (0.8 + 0.9 * (head.atrophy - 0.8)), w) * ih * (depth > 0)
    paint(s.hu, s.tissue, head.csf, fiss, CSF)
    falx = ramp(np.abs(s.X) - 0.35, w) * ih * (depth > 0.5)
    paint(s.hu, s.tissue, 52.0, falx * 0.9, DURA)


def _deep_grey_and_insula(cv: _Canvas, s: _Band, depth) -> None:
    """Deep grey nuclei (lentiform nuclei, thalami, caudate heads), drawn before the ventricles carve their
    margins, and the Sylvian fissures that bound the insulae laterally."""
    head, w, v, wl = cv.head, cv.w, cv.head.atrophy, cv.head.widest
    X, Y, h_s, t_s = s.X, s.Y, s.hu, s.tissue
    bgb = _basal_ganglia_size(head, s)
    for sx in (-1, 1):
        paint(h_s, t_s, head.grey - 1, ellipse(X, Y, sx * 0.33 * head.a, -0.02 * head.b, 5.5 * bgb + .01,
                                               13 * bgb + .01, w, angle=sx * 0.25), GREY)
        paint(h_s, t_s, head.grey, ellipse(X, Y, sx * (6 + 3 * v), 0.12 * head.b, 6.5 * bgb, 9 * bgb, w), GREY)
        paint(h_s, t_s, head.grey, ellipse(X, Y, sx * (6.5 + 3.2 * v), -0.17 * head.b, 4 * bgb + .01,
                                           6.5 * bgb + .01, w), GREY)
        sy = s.profile(6, wl + 6)
        x_out = sx * head.a * float(cranial_scale(head, np.float32(30.0)))
        # The fissure bows and wavers along its course (phase and bow from the head's own gyri draw, so no
        # new draw), thin in young heads (1 mm) and wide with atrophy (3-4 mm), widest where it opens to the
        # surface: real ones are seldom the straight, even 4-5 mm band they once were here.
        phase = float((head.gyri * 7.3 + 1.7 * sx) % (2 * np.pi))
        t_along = np.clip((X - x_out) / (x_out * 0.62 - x_out), 0, 1)
        Yw = Y - (0.05 * head.b * np.sin(np.pi * t_along) * np.sin(phase)
                  + 1.2 * np.sin(0.35 * X + phase) * (1 - t_along))
        half = (0.4 + 1.4 * (v - 0.8)) * (1.3 - 0.6 * t_along) * sy
        syl = ramp(segment_distance(X, Yw, x_out, -0.08 * head.b, x_out * 0.62, 0.05 * head.b) - half, w) \
            * (sy > 0.05)
        paint(h_s, t_s, head.csf, syl * (depth > 0), CSF)


def _basal_cisterns(cv: _Canvas, s: _Band) -> None:
    """Basal cisterns: the suprasellar star and the ring around the midbrain, with the midbrain in it;
    below the third ventricle and the thalami."""
    head, w, v = cv.head, cv.w, cv.head.atrophy
    X, Y, h_s, t_s = s.X, s.Y, s.hu, s.tissue
    cb = s.profile(2, min(26.0, head.widest - 18))
    rr = np.hypot(X, Y + 0.12 * head.b)
    th = np.arctan2(X, Y + 0.12 * head.b)
    star = ramp(rr - (7 + 2 * v) * cb * (1 + 0.22 * np.cos(5 * th)), w) * (cb > 0.05)
    paint(h_s, t_s, head.csf, star, CSF)
    ring = ellipse(X, Y, 0, 0.11 * head.b, (12.5 + 1.5 * v) * cb + .01, (11 + 1.5 * v) * cb + .01, w)
    paint(h_s, t_s, head.csf, ring, CSF)
    mid = ellipse(X, Y, 0, 0.10 * head.b, 10.5 * cb + .01, 9 * cb + .01, w)
    paint(h_s, t_s, head.white + 4, mid, WHITE)


def _ventricles(cv: _Canvas, s: _Band) -> None:
    """Lateral ventricles (frontal horns, bodies, atria) and the third ventricle, all larger with atrophy."""
    head, w, v, wl = cv.head, cv.w, cv.head.atrophy, cv.head.widest
    X, Y = s.X, s.Y
    ventricles = np.zeros_like(s.hu)
    for sx in (-1, 1):
        fh = s.profile(wl - 22, wl + 8)
        ventricles = np.maximum(ventricles, ellipse(X, Y, sx * (2.2 + 2.6 * v), -0.22 * head.b, 3.5 * v * fh + .01,
                                                    (9 + 4 * v) * fh + .01, w, angle=sx * 0.35))
        body = s.profile(wl + 2, wl + 34)
        ventricles = np.maximum(ventricles, ellipse(X, Y, sx * (5 + 2.5 * v), 0.02 * head.b, 3.2 * v * body + .01,
                                                    22 * body + .01, w, angle=-sx * 0.12))
        atr = s.profile(wl - 22, wl + 10)
        ventricles = np.maximum(ventricles, ellipse(X, Y, sx * (13 + 3 * v), 0.33 * head.b, 4.5 * v * atr + .01,
                                                    8.5 * v * atr + .01, w, angle=sx * 0.5))
    third = s.profile(wl - 32, wl - 4)
    ventricles = np.maximum(ventricles, ellipse(X, Y, 0, 0.02 * head.b, (0.6 + 1.2 * v) * third + .01,
                                                10 * third + .01, w))
    paint(s.hu, s.tissue, head.csf, ventricles, VENTRICLE)


def _choroid_and_calcifications(cv: _Canvas, s: _Band, calcified: dict) -> None:
    """Choroid plexus in the atria, calcified when ``calcified`` has a "choroid" density, and the other
    physiological calcifications it names: basal ganglia, pineal gland, falx."""
    head, w, wl = cv.head, cv.w, cv.head.widest
    X, Y, h_s, t_s = s.X, s.Y, s.hu, s.tissue
    bgb = _basal_ganglia_size(head, s)
    atr = s.profile(wl - 18, wl + 4)
    for sx in (-1, 1):
        _choroid_glomus(cv, s, sx, atr, calcified.get("choroid"))
        if "basal_ganglia" in calcified:
            paint(h_s, t_s, float(calcified["basal_ganglia"]),
                  ellipse(X, Y, sx * 0.30 * head.a, 0.0, 2.2 * bgb + .01, 3.0 * bgb + .01, w), CALCIUM)
    if "pineal" in calcified:
        pb = s.profile(wl - 24, wl - 12)
        paint(h_s, t_s, float(calcified["pineal"]), ellipse(X, Y, 0, 0.25 * head.b, 2.8 * pb + .01,
                                                            2.8 * pb + .01, w), CALCIUM)
    if "falx" in calcified:
        fb = s.profile(wl + 20, wl + 55)
        paint(h_s, t_s, float(calcified["falx"]), ellipse(X, Y, 0, -0.45 * head.b, 1.1 * fb + .01,
                                                          5 * fb + .01, w) * _interhemispheric(cv, s), CALCIUM)


def _choroid_glomus(cv: _Canvas, s: _Band, sx: int, atr, calcified_hu: float | None) -> None:
    """The choroid plexus glomus in one atrium: a lobulated tuft of 3-5 lobules, about 5 x 7 mm in a young
    head and up to 10 x 14 mm in an old one, different on each side, inside the ventricle. Soft tissue
    (grey-matter density), or, where ``calcified_hu`` is given, calcified in clumps (most lobules, each
    60-100% of that density), as adult heads mostly show it. Its layout comes from a generator seeded by
    the head's own draws, so no other draw changes."""
    head, w, v = cv.head, cv.w, cv.head.atrophy
    sub = np.random.default_rng([int(head.gyri * 1e6) % 2**31, int(head.b * 1e4) % 2**31, sx + 1])
    k = int(sub.integers(3, 6))
    dx, dy = sub.uniform(-1.5, 1.5, k) * v, sub.uniform(-2.4, 2.4, k) * v
    radius = sub.uniform(1.0, 2.0, k) * v
    lumps = sub.random(k) < 0.75
    lumps[int(sub.integers(k))] = True  # at least one calcified lobule
    share = sub.uniform(0.6, 1.0, k)
    cx, cy = sx * (13 + 3 * v), 0.36 * head.b
    on = np.nonzero(np.ravel(atr) > 0)[0]  # drawn only on its own slices (a contiguous run): views, not copies
    if not len(on):
        return
    run = slice(int(on[0]), int(on[-1]) + 1)
    X, Y, h_s, t_s, atr = (s.X[run] if s.X.shape[0] > 1 else s.X), s.Y, s.hu[run], s.tissue[run], atr[run]
    inside = t_s == VENTRICLE  # the tuft hangs in the ventricle, never in the brain around it
    for j in range(k):
        lobule = ellipse(X, Y, cx + dx[j], cy + dy[j], radius[j] * atr + .01, radius[j] * atr + .01, w) * inside
        if calcified_hu is not None and lumps[j]:
            paint(h_s, t_s, float(calcified_hu) * float(share[j]), lobule, CALCIUM)
        else:
            paint(h_s, t_s, head.grey, lobule, None)


def _posterior_fossa(cv: _Canvas, cavity: _Cavity) -> None:
    """Posterior fossa: cerebellum with its grey rim, brainstem in its cistern, fourth ventricle and
    cisterna magna; drawn against the fossa's own depth, from before the inner table was roughened."""
    if not len(cavity.fossa):
        return
    head, w, v = cv.head, cv.w, cv.head.atrophy
    s = cv.band(cavity.fossa)
    X, Y, h_p, t_p = s.X, s.Y, s.hu, s.tissue
    dpf = cavity.fossa_depth
    pf_y = cavity.fossa_centre[1]
    inpf = (dpf > 0) & (np.abs(Y - pf_y) < 0.5 * head.b) & (Y > 0.02 * head.b)
    bs = s.profile(*BRAINSTEM_LEVELS)
    paint(h_p, t_p, head.grey + 1, ramp(1.5 - dpf, w) * inpf, GREY)
    # The brainstem's cisterns lie in front of it and at its sides (prepontine, cerebellopontine angles), a
    # millimetre or less in young heads, a few mm with atrophy; behind it are the fourth ventricle and the
    # cerebellum, not a ring of CSF.
    gap = _brainstem_cistern(head)
    paint(h_p, t_p, head.csf, ellipse(X, Y, 0, BRAINSTEM_Y * head.b - 0.5 * gap * bs, (11 + 0.6 * gap) * bs,
                                      (9 + 0.5 * gap) * bs, w) * (dpf > 0), CSF)
    paint(h_p, t_p, head.white + 5, ellipse(X, Y, 0, BRAINSTEM_Y * head.b, 11 * bs + .01, 9 * bs + .01, w), WHITE)
    fv = s.profile(-22, 10)
    paint(h_p, t_p, head.csf, ellipse(X, Y, 0, 0.28 * head.b, (4 + 1.5 * v) * fv + .01, (2.5 + v) * fv + .01, w),
          VENTRICLE)
    cm = s.profile(-42, -8)
    paint(h_p, t_p, head.csf, ellipse(X, Y, 0, pf_y + 0.28 * head.b, (4 + 3 * v) * cm + .01, 6 * cm + .01, w)
          * inpf, CSF)
    cv.put(s)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], spacing: float, scale_mm: float
                  ) -> np.ndarray:
    """A random field of unit standard deviation varying over about ``scale_mm``: drawn on a coarse grid
    and enlarged (cheap at any matrix size)."""
    n, H, W = shape
    step = max(1, int(scale_mm / spacing / 2))
    coarse = rng.standard_normal((n, H // step + 3, W // step + 3)).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, sigma=(0, 1.0, 1.0), mode="wrap")
    coarse /= max(float(coarse.std()), 1e-6)
    up = ndimage.zoom(coarse, (1, step, step), order=1)
    return up[:, :H, :W]


def _parenchymal_texture(hu, tissue, fr: Frame, rng: np.random.Generator) -> None:
    """Real grey and white matter are not flat: slow variations of a few HU (cupping, partial volume of
    small vessels and perivascular spaces, the patient's own variation) over centimetres, and fine
    mottling over millimetres."""
    brainy = np.isin(tissue, PARENCHYMA)
    if not brainy.any():
        return
    slow = _smooth_field(rng, hu.shape, fr.spacing, float(rng.uniform(12, 30))) * np.float32(rng.uniform(0.8, 3.0))
    fine = _smooth_field(rng, hu.shape, fr.spacing, float(rng.uniform(2.5, 5))) * np.float32(rng.uniform(0.5, 2.0))
    hu += np.where(brainy, slow + fine, np.float32(0))


def _skull_base_clutter(head: HeadShape, fr: Frame, hu, tissue, lo, depth, w, rng: np.random.Generator) -> None:
    """The skull base is not a few smooth shapes: bony ridges (clinoids, petrous apices, crista galli,
    sphenoid wings) jut into the cranial fossae and air cells riddle the bone, so bone partial volume
    and dense edges meet brain on every low slice. Drawn as random small bony bits at the margin of the
    cavity and air or bone lumps outside it, on the slices below the supratentorial vault."""
    pneumatized = 0.5 * (head.sphenoid_sinus + head.mastoid)  # 1 in an adult
    for i in lo:
        zi = float(fr.z[i])
        if zi < -44:
            continue
        X, Y = fr.X[0], fr.Y[0]
        d = depth[i]
        edge = np.nonzero((d > 0) & (d < 6))
        k = int(rng.integers(3, 10))
        if len(edge[0]):
            pick = rng.integers(0, len(edge[0]), size=k)
            for j in pick:
                cy, cx = edge[0][j], edge[1][j]
                x0, y0 = float(X[cy, cx]), float(Y[cy, cx])
                frac = ellipse(X, Y, x0, y0, float(rng.uniform(1.0, 4.0)), float(rng.uniform(1.0, 3.0)), w,
                               angle=float(rng.uniform(0, np.pi)))
                paint(hu[i], tissue[i], float(rng.uniform(250, 1400)), frac, BONE)
        outside = np.nonzero((d < -3) & (hu[i] > 200))
        if len(outside[0]):
            pick = rng.integers(0, len(outside[0]), size=int(rng.integers(4, 14)))
            for j in pick:
                cy, cx = outside[0][j], outside[1][j]
                x0, y0 = float(X[cy, cx]), float(Y[cy, cx])
                r = float(rng.uniform(1.5, 6.0))
                frac = ellipse(X, Y, x0, y0, r, r * float(rng.uniform(0.5, 1.0)), w, angle=float(rng.uniform(0, np.pi)))
                if rng.random() < 0.5 * pneumatized:  # air cells, fewer where a child's bone is not yet
                    paint(hu[i], tissue[i], float(rng.uniform(-950, -400)), frac * (d < -1), SINUS)
                else:
                    paint(hu[i], tissue[i], float(rng.uniform(600, 1800)), frac, BONE)


def _venous_sinuses(head: HeadShape, fr: Frame, hu, tissue, depth, rng: np.random.Generator) -> float:
    """Dense dural venous sinuses (45-72 HU, with the haematocrit): the superior sagittal sinus as a
    triangle under the vault in the midline, front and back, and the transverse sinuses along the
    occipital inner table at the tentorium. On every head, the classic mimic of a thin subdural or
    epidural collection. Returns the blood's density, which the deep veins share."""
    value = float(rng.uniform(45, 72))
    X, Y = fr.X, fr.Y
    z = fr.z[:, None, None]
    width = float(rng.uniform(5, 10))
    height = float(rng.uniform(4, 8))
    sup = np.nonzero((fr.z > 10) & (fr.z < head.top - 4))[0]
    if len(sup):
        d = depth[sup]
        half = width / 2 * (1 - d / height)
        # grows from front to back, as the sinus does
        grow = np.where(Y > 0, 1.0, 0.55).astype(np.float32)
        frac = ramp(np.abs(X) - half * grow, max(fr.spacing, 0.35)) * (d > 0) * (d < height)
        h, t = hu[sup], tissue[sup]
        paint(h, t, value, frac * 0.95, DURA)
        hu[sup], tissue[sup] = h, t
    low = np.nonzero((fr.z > -14) & (fr.z < 16))[0]
    if len(low):
        zl = z[low]
        p = profile(zl, -14, 16)
        d = depth[low]
        band = float(rng.uniform(4, 8)) * p
        frac = ramp(d - band, max(fr.spacing, 0.35)) * (d > 0) * (Y > 0.25 * head.b) * (np.abs(X) > 8)
        h, t = hu[low], tissue[low]
        paint(h, t, value, frac * 0.9, DURA)
        hu[low], tissue[low] = h, t
    return value


@dataclass(frozen=True)
class Tentorium:
    """The tentorium cerebelli of one head: a tent of dura over the posterior fossa whose ridge, the
    straight sinus, climbs from the torcula at the back to the vein of Galen behind the pineal, and whose
    leaves fall to the transverse sinuses and petrous ridges at the sides; open in front at the incisura,
    where the midbrain passes. Levels in mm of the head frame (``HeadShape``)."""

    z_lat: float  # where the leaves meet the transverse sinuses and petrous ridges
    z_torc: float  # the ridge at the torcula
    z_galen: float  # the ridge at the vein of Galen, its highest point
    y_torc: float
    y_galen: float
    notch: float  # half-width of the incisura
    power: float  # how the leaves fall away from the ridge: < 1 a steep fall at the sides, > 1 at the ridge
    dura: float  # thickness of the dural sheet, mm
    galen: float  # radius of the vein of Galen, mm
    straight: float  # radius of the straight sinus, mm


def tentorium(head: HeadShape) -> Tentorium:
    """The head's tentorium, from a generator seeded by the head's own draws: the same for every study of
    a patient, and no other draw of a series changes with it."""
    sub = head_rng(head, "tentorium")
    z_lat = float(sub.uniform(6, 11))
    return Tentorium(z_lat=z_lat, z_torc=z_lat + float(sub.uniform(1, 4)),
                     z_galen=head.widest - float(sub.uniform(6, 12)),
                     y_torc=0.84 * head.b, y_galen=0.30 * head.b, notch=float(sub.uniform(12, 16)),
                     power=float(sub.uniform(0.8, 1.4)), dura=float(sub.uniform(0.8, 1.5)),
                     galen=float(sub.uniform(2.5, 4.0)), straight=float(sub.uniform(1.8, 2.8)))


def tentorium_level(head: HeadShape, t: Tentorium, X, Y):
    """Level (mm) of the tentorium over each in-plane point, and the share of each point the sheet
    covers in plane (0 outside the posterior fossa and in the incisura, ramped at its free edge)."""
    span = np.float32(t.y_torc - t.y_galen)
    ridge = t.z_torc + (t.z_galen - t.z_torc) * np.clip((t.y_torc - Y) / span, 0, 1)
    pf_y, pf_a, pf_b = fossa_outline(head)
    half = pf_a * np.sqrt(np.clip(1 - ((Y - pf_y) / pf_b) ** 2, 0, 1)) + 1e-3
    fall = np.clip(1 - np.abs(X) / half, 0, 1) ** np.float32(t.power)
    level = (t.z_lat + (ridge - t.z_lat) * fall).astype(np.float32)
    length = t.y_galen + 0.05 * head.b + 5.0  # from the vein of Galen forward past the petrous apices
    notch = ellipse_distance(X, Y, 0, t.y_galen - length, t.notch, length)
    # over the posterior fossa at its widest, in front along the petrous ridges (as ``_skull_base`` runs them)
    fossa = ellipse_distance(X, Y, 0, pf_y, pf_a, pf_b)
    ridge_y = 0.05 * head.b + petrous_slope(head) * np.maximum(np.abs(X) - 0.15 * head.a, 0)
    cover = ramp(-notch, 1.0) * ramp(fossa, 2.0) * ramp(ridge_y - Y, 2.0)
    return level, cover.astype(np.float32)


def _through_slice(level, z, thickness: float, vertical: float):
    """Share of each voxel of slices at ``z`` (thickness mm) that a sheet at ``level`` of ``vertical`` mm
    (its thickness measured along z) fills."""
    lo = np.maximum(level - vertical / 2, z - thickness / 2)
    hi = np.minimum(level + vertical / 2, z + thickness / 2)
    return (np.clip(hi - lo, 0, None) / thickness).astype(np.float32)


def _tentorium_and_deep_veins(head: HeadShape, fr: Frame, hu, tissue, depth, sinus_hu: float) -> None:
    """The tentorium (dura, 48-58 HU, with its partial volume through each slice: a faint band where the
    tent is cut steeply, a haze where it is cut flat), the straight sinus along its ridge and the vein of
    Galen at its apex (the blood of the other sinuses). Cut axially, the tent is the V that opens forward
    around the midbrain on the slices between the torcula and the vein of Galen, with the vermis inside it
    and the occipital lobes outside: the classic mimic of blood along the tentorium."""
    t = tentorium(head)
    X, Y, w = fr.X, fr.Y, max(fr.spacing, 0.35)
    level, cover = tentorium_level(head, t, X[0], Y[0])
    gy, gx = np.gradient(level, fr.spacing)
    vertical = (t.dura * np.sqrt(1 + gx**2 + gy**2)).astype(np.float32)
    dura_hu = 48.0 + 10.0 * (t.dura - 0.8) / 0.7
    rise = (t.z_galen - t.z_torc) / (t.y_torc - t.y_galen)  # tan of the straight sinus's angle to the slice
    along = t.straight * np.hypot(1, rise) / rise + fr.thickness / 2 / rise  # its half-length, cut obliquely
    sinus_share = min(1.0, 2 * t.straight * np.hypot(1, rise) / fr.thickness)
    galen_share = min(1.0, 2 * t.galen / fr.thickness)
    idx = np.nonzero((fr.z > t.z_lat - fr.thickness) & (fr.z < t.z_galen + t.galen + fr.thickness))[0]
    for i in idx:
        zi = float(fr.z[i])
        inside = (depth[i] > 0.5) & (tissue[i] != BONE)
        frac = _through_slice(level, zi, fr.thickness, vertical) * cover * inside
        paint(hu[i], tissue[i], dura_hu, frac, DURA)
        # the straight sinus: a tube along the ridge, cut obliquely into an ellipse drawn out along Y
        if t.z_torc - fr.thickness / 2 < zi < t.z_galen + fr.thickness / 2:
            yc = t.y_torc - (float(np.clip(zi, t.z_torc, t.z_galen)) - t.z_torc) / rise
            paint(hu[i], tissue[i], sinus_hu,
                  ellipse(X[0], Y[0], 0, yc, t.straight, along, w) * inside * 0.9 * sinus_share, DURA)
        # the vein of Galen, a short wide vein under the splenium
        dz = abs(zi - t.z_galen)
        if dz < t.galen + fr.thickness / 2:
            r = t.galen * np.sqrt(max(0.0, 1 - (max(dz - fr.thickness / 2, 0) / t.galen) ** 2))
            paint(hu[i], tissue[i], sinus_hu, ellipse(X[0], Y[0], 0, t.y_galen, r + .01, 1.3 * r + .01, w)
                  * inside * 0.95 * galen_share, DURA)


def _orbital_roofs(head: HeadShape, fr: Frame, hu, tissue, depth) -> None:
    """The anterior cranial fossa's floor as a slice of some thickness sees it. The orbital roofs rise gently
    (``orbital_roof_height``: a few mm over centimetres), so a slab of a few mm cuts them obliquely: over a
    band a centimetre or more wide each voxel holds brain above the roof, a share of its thin bony plate and
    the orbit, ethmoid cells or bone below. Real scans show this as a bright haze over the frontal lobes
    on the slices just above the orbits, strongest on thick slices; it is drawn here as those shares of the
    three (``_floor_through_slab``). The roofs are not smooth: ridges and hollows of a millimetre or two
    (juga and digitate impressions), drawn by a generator of their own seeded from the head, so that every
    other draw is unchanged."""
    sub = np.random.default_rng([int(head.a * 1e4), int(head.b * 1e4), int(head.top * 1e4), 43])
    plate = float(sub.uniform(*ROOF_PLATE))  # mm of bone along z
    bone_hu = float(sub.uniform(900, 1500))
    bumps = float(sub.uniform(*FLOOR_BUMPS))
    levels = (-plate - bumps, ROOF_TOP + bumps)
    if not len(_slices_over(fr, levels)):
        return
    X, Y = fr.X[0], fr.Y[0]
    height = orbital_roof_height(head, X, Y)
    floor = height + bumps * _smooth_field(sub, (1,) + X.shape, fr.spacing, float(sub.uniform(6, 12)))[0]
    # Below the roof at the series' ends, or where slices overlap: orbital fat, ethmoid air cells or bone.
    below_est = np.full(X.shape, 700.0, np.float32)
    ethmoid = ellipse_distance(X, Y, 0, ETHMOID_Y * head.b, *ETHMOID_HALF) < 0
    below_est[ethmoid] = -500.0
    for sx in (-1, 1):
        below_est[(ellipse_distance(X, Y, sx * ORBIT_X * head.a, ORBIT_Y * head.b, *ORBIT_HALF) < 0) & ~ethmoid] = -90.0

    def elsewhere(z0: float):  # the temporal lobes and the merging ellipse have floors of their own
        return np.max(np.stack(_temporal_and_merging(head, X, Y, np.float32(z0))), axis=0) > 0

    _floor_through_slab(fr, hu, tissue, depth, floor, height < ROOF_TOP, levels, plate, bone_hu, head.grey - 2,
                        below_est, elsewhere)


def _slices_over(fr: Frame, levels: tuple[float, float]) -> np.ndarray:
    """Indices of the slices whose slabs overlap the levels between ``levels`` (mm, head frame)."""
    t = float(fr.thickness)
    return np.nonzero((fr.z + t / 2 > levels[0]) & (fr.z - t / 2 < levels[1]))[0]


def _floor_through_slab(fr: Frame, hu, tissue, depth, floor, foot, levels: tuple[float, float], plate: float,
                        bone_hu: float, above_est, below_est, elsewhere) -> None:
    """Partial volume through the slice over a bony floor of the cranial cavity at ``floor`` (H, W: mm, head
    frame) under the points ``foot``, a plate ``plate`` mm deep (along z) of ``bone_hu``. Every voxel of the
    slices that overlap ``levels`` holds its shares of brain above the floor, the plate, and what lies
    below, outside the points ``elsewhere(z0)`` says belong to another compartment at the slab's lower face
    ``z0``. Brain and what lies below are what the slices draw there: the voxel's own drawing (at its
    centre level) for the side it was drawn as, and the neighbouring slice's for the other side where that
    slice's centre lies beyond the slab (a slice apart in every series the generator draws) and it was
    drawn as that side there; otherwise ``above_est`` and ``below_est``. A voxel drawn as brain whose slab
    lies wholly under the floor (its roughness, or a floor that is not the drawn compartment's) is what
    lies below; one drawn as not brain wholly above the floor is brain. Voxels left mostly plate or below
    are coded bone."""
    t = float(fr.thickness)
    lo = fr.z - t / 2
    hi = fr.z + t / 2
    idx = _slices_over(fr, levels)
    if not len(idx):
        return
    near = np.unique(np.clip(np.concatenate([idx - 1, idx + 1]), 0, fr.n - 1))
    drawn = {int(j): (hu[j].copy(), depth[j] > 0) for j in near}
    for i in idx:
        z0, z1 = float(lo[i]), float(hi[i])
        other = elsewhere(z0)
        above = np.clip((z1 - floor) / t, 0, 1)
        bone = _through_slice(floor - plate / 2, float(fr.z[i]), t, plate)  # the plate: a sheet under the floor
        under = np.clip(1 - above - bone, 0, 1)
        inside = depth[i] > 0  # drawn at the slice's centre level as brain, or as what is under the floor
        cut = foot & ~other & ~((above >= 1) & inside) & ~((under >= 1) & ~inside)
        if not cut.any():
            continue
        h = hu[i]
        up, down = above_est, below_est
        if i + 1 < fr.n and fr.z[i + 1] >= z1:
            up = np.where(drawn[i + 1][1], drawn[i + 1][0], above_est)
        if i > 0 and fr.z[i - 1] <= z0:
            down = np.where(drawn[i - 1][1], below_est, drawn[i - 1][0])
        mixed = above * np.where(inside, h, up) + bone * bone_hu + under * np.where(inside, down, h)
        h[cut] = mixed[cut]
        tissue[i][cut & (above < 0.5)] = BONE
        tissue[i][cut & (above >= 0.5) & ~inside] = GREY


def middle_fossa_floor(head: HeadShape, X, Y, rise: float = 0.0):
    """Level (mm, head frame) of the middle cranial fossae's floors under each point (inf beyond them): the
    level at which the temporal compartment (``temporal_outline``) first holds the point. With ``rise``
    (mm) the floor is a bowl, ``rise`` lower in the middle of the compartment's base than at its rim, and
    its walls run from there up as the compartment grows; with 0 it is the drawn compartment's floor."""
    level = np.full(X.shape, np.inf, np.float32)
    span = TEMPORAL_LEVELS[1] - TEMPORAL_LEVELS[0]
    for sx in (-1, 1):
        def q(t):
            cx, cy, a, b = temporal_outline(head, sx, t)
            return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2

        q0, reach = q(np.float32(0)), q(np.float32(1)) < 1
        lo, hi = np.zeros(X.shape, np.float32), np.ones(X.shape, np.float32)
        for _ in range(16):  # the share of the band at which the growing ellipse first holds the point
            mid = (lo + hi) / 2
            held = q(mid) < 1
            hi, lo = np.where(held, mid, hi), np.where(held, lo, mid)
        wall = TEMPORAL_LEVELS[0] + rise + (span - rise) * hi
        side = np.where(q0 < 1, TEMPORAL_LEVELS[0] + rise * q0, np.where(reach, wall, np.inf))
        level = np.minimum(level, side).astype(np.float32)
    return level


# How far up the middle fossae's walls their floor's partial volume is drawn (a share of the band):
# higher up the walls are steep (the squama) and meet the other compartments.
TEMPORAL_FOOT = 0.6
# The floors' plates (mm along z), ridges (mm) and the middle fossae's bowls (mm), drawn per head in these ranges.
ROOF_PLATE = (0.8, 2.0)
FOSSA_PLATE = (1.0, 3.0)
FOSSA_RISE = (3.0, 9.0)
FLOOR_BUMPS = (0.8, 2.5)


def floor_feet(head: HeadShape, X, Y) -> list[tuple[np.ndarray, tuple[float, float]]]:
    """Where the floors' passes (``_orbital_roofs``, ``_middle_fossae``) draw the partial volume through the
    slab themselves: for each, the points over its floor (H, W) and the levels (mm) its slices can reach with
    the thickest plate and the highest ridges any head draws. A wall of the middle fossae is over the
    floor below ``TEMPORAL_FOOT`` of its height whatever the bowl's depth, so the points need no draw."""
    span = TEMPORAL_LEVELS[1] - TEMPORAL_LEVELS[0]
    fossa_top = TEMPORAL_LEVELS[0] + FOSSA_RISE[1] + (span - FOSSA_RISE[1]) * TEMPORAL_FOOT
    return [(orbital_roof_height(head, X, Y) < ROOF_TOP, (-ROOF_PLATE[1] - FLOOR_BUMPS[1], ROOF_TOP + FLOOR_BUMPS[1])),
            (middle_fossa_floor(head, X, Y) < TEMPORAL_LEVELS[0] + span * TEMPORAL_FOOT,
             (TEMPORAL_LEVELS[0] - FOSSA_PLATE[1] - FLOOR_BUMPS[1], fossa_top + FLOOR_BUMPS[1]))]


def _middle_fossae(head: HeadShape, fr: Frame, hu, tissue, depth) -> None:
    """The middle cranial fossae's floors as a slice of some thickness sees them. The temporal lobes lie
    in two bowls of bone (the greater wings of the sphenoid in front, the squama at the sides, the petrous
    ridges behind) over the infratemporal fossae; a slab of a few mm cuts the curved floor and its walls
    obliquely, so on the slices through the fossae's lower half each voxel near the floor holds brain, a
    share of the 1-3 mm plate and the soft tissue below: the hazy bone over the temporal lobes that real
    scans show on the slices above the skull base, strongest on thick slices (a frequent mimic of blood).
    Drawn as those shares (``_floor_through_slab``), on a floor ``rise`` lower in the middle than at the
    compartment's rim (``middle_fossa_floor``), with ridges and hollows of a millimetre or two; by a
    generator of its own seeded from the head, so that every other draw is unchanged."""
    sub = np.random.default_rng([int(head.a * 1e4), int(head.b * 1e4), int(head.top * 1e4), 47])
    rise = float(sub.uniform(*FOSSA_RISE))  # mm: how much deeper the bowl is in its middle than at its rim
    plate = float(sub.uniform(*FOSSA_PLATE))  # mm of bone along z
    bone_hu = float(sub.uniform(900, 1500))
    bumps = float(sub.uniform(*FLOOR_BUMPS))
    span = TEMPORAL_LEVELS[1] - TEMPORAL_LEVELS[0]
    top = TEMPORAL_LEVELS[0] + rise + (span - rise) * TEMPORAL_FOOT
    levels = (TEMPORAL_LEVELS[0] - plate - bumps, top + bumps)
    if not len(_slices_over(fr, levels)):
        return
    X, Y = fr.X[0], fr.Y[0]
    height = middle_fossa_floor(head, X, Y, rise)
    foot = height < top
    floor = np.where(foot, height, 0) + bumps * _smooth_field(sub, (1,) + X.shape, fr.spacing,
                                                               float(sub.uniform(6, 12)))[0]

    def elsewhere(z0: float):  # the frontal lobes, the merging ellipse and the posterior fossa
        zz = np.float32(z0)
        parts = _temporal_and_merging(head, X, Y, zz)[2:] + [_frontal_depth(head, X, Y, zz)]  # [2:]: merging
        if -42 < z0 < 20:
            parts.append(_posterior_fossa_depth(head, X, Y, zz))
        return np.max(np.stack(parts), axis=0) > 0

    _floor_through_slab(fr, hu, tissue, depth, floor, foot, levels, plate, bone_hu, head.grey - 2,
                        np.float32(40.0), elsewhere)


def _face_and_neck(head: HeadShape, fr: Frame, hu, tissue, depth, w, rng: np.random.Generator) -> None:
    """Below the skull base a head is not one soft-tissue block: fat spaces between the muscles and around
    the jaw (since 6 Dec 2026, afternoon, only the larger of the islands drawn, 14-18 mm across, where every
    island was before; each is still drawn, so no later draw moves), and the mandible: its rami beside the
    maxillary sinuses, and from the teeth down a U of bone in front (until 6 Dec 2026 the U ran through the
    maxillary sinuses)."""
    idx = np.nonzero(fr.z < -8)[0]
    X, Y = fr.X[0], fr.Y[0]
    for i in idx:
        soft = np.nonzero((tissue[i] == SOFT) & (depth[i] < -12))
        if len(soft[0]):
            for j in rng.integers(0, len(soft[0]), size=int(rng.integers(8, 20))):
                x0, y0 = float(X[soft[0][j], soft[1][j]]), float(Y[soft[0][j], soft[1][j]])
                # every island's four draws are taken, so that no later draw moves; only the larger are drawn
                # (fat spaces; the planes between muscles are ``_muscle_planes``)
                r, ratio, angle, fat = (float(rng.uniform(lo, hi)) for lo, hi in
                                        ((2.5, 9), (0.4, 1.0), (0, np.pi), (-110, -60)))
                if r > 7.0:
                    frac = ellipse(X, Y, x0, y0, r, r * ratio, w, angle=angle)
                    paint(hu[i], tissue[i], fat, frac * (tissue[i] == SOFT), FAT)
        if fr.z[i] < -32:
            r_out = ellipse_distance(X, Y, 0, -0.35 * head.b, 0.62 * head.a, 0.62 * head.b)
            jaw = ramp(np.abs(r_out) - 3.5, w) * (Y < -0.25 * head.b)
            if fr.z[i] > TEETH_LEVELS["upper"][1]:  # beside the maxillary sinuses only the rami, not the arch
                jaw = jaw * (Y > -0.55 * head.b)
            paint(hu[i], tissue[i], float(rng.uniform(900, 1600)), jaw * (tissue[i] != AIR), BONE)
