"""A phantom data set on disk: DICOM files, RSNA-style labels, series labels, masks and a manifest.

The whole set is planned first in one process (patients, studies, UIDs, image ids, labels wanted,
confounders, file encodings), each from the seed; every series is then drawn from its own generator
seeded by (seed, series index), so the files do not depend on how many workers drew them.

While it runs, a run keeps a journal in the folder (``.ichscan-phantom.jsonl``): its arguments, written
before any image, then one line per finished series. A rerun with the same arguments draws only the series
not yet finished; one with other arguments is refused, so a folder never mixes two sets. Once the set is
complete, ``manifest.json`` records the same arguments and the journal is removed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ichscan import __version__
from ichscan.errors import IchscanError
from ichscan.fileio import atomic_path, lock_folder, write_json, write_text
from ichscan.labels import LABELS, RSNA_CSV_ORDER, SUBTYPES
from ichscan.phantom import anatomy as an
from ichscan.phantom import writer
from ichscan.phantom.artifacts import draw_fracture
from ichscan.phantom.export import Export, draw_export, export_series
from ichscan.phantom.geometry import parse_mm_range
from ichscan.phantom.outside import DEFAULT_MARGIN, Outside, draw_outside, parse_margin, randomize_outside
from ichscan.phantom.series import PhantomSeries, make_series, sample_confounders

log = logging.getLogger(__name__)

# Share of series with each subtype when nothing else is asked; combinations occur on top.
DEFAULT_PREVALENCE = {"any": 0.5, "epidural": 0.14, "intraparenchymal": 0.18, "intraventricular": 0.14,
                      "subarachnoid": 0.18, "subdural": 0.18}
SECOND_STUDY = 0.15  # share of patients scanned twice
ODD_SIZE = 0.06  # share of series whose matrix is not the requested size
MAX_SIZE = 2048  # pixels: four times a CT matrix
# A series is drawn whole in memory, about 120 bytes a voxel (1.2 GB at 512 px and 40 slices); 6 GB allows
# 200 slices at 512 px, so what a machine cannot hold is refused at once, not killed hours in.
SERIES_BYTES_PER_VOXEL = 120
MAX_SERIES_BYTES = 6 * 2**30
MAX_PITCH = 30.0  # degrees: gantry tilt goes to about 30, and a head bent further does not fit the holder
TILTED_SLICES = 4  # ``oblique.fine_frame`` draws at most this many thin slices per slice of a tilted series

JOURNAL_NAME = ".ichscan-phantom.jsonl"
SET_FILES = ("labels.csv", "series_labels.csv", "manifest.json")  # written once every series is done


@dataclass(frozen=True)
class SeriesPlan:
    index: int
    seed: int
    patient_index: int
    patient_id: str
    study_uid: str
    series_uid: str
    frame_uid: str
    sop_uids: tuple[str, ...]
    image_ids: tuple[str, ...]
    rows: int
    cols: int
    thickness: float
    subtypes: tuple[str, ...]
    confounders: dict
    encoding: str
    header: dict
    twin_of: int | None = None  # this series repeats that one's scan without its lesions
    pitch: float = 0.0  # degrees: tilt of the scan plane against the head (``ichscan.phantom.oblique``)
    roll: float = 0.0
    export: Export | None = None  # stored as windowed 8-bit JPEGs and rebuilt (``ichscan.phantom.export``)
    outside: Outside | None = None  # random texture beyond the inner table (``ichscan.phantom.outside``)
    child: float | None = None  # the patient is a child of this age, years (``--children``, ``anatomy.child_head``)

    @property
    def n_slices(self) -> int:
        return len(self.image_ids)


@dataclass
class DatasetSummary:
    """What ``generate_dataset`` wrote."""

    out: str
    patients: int
    studies: int
    series: int
    slices: int
    series_positive: dict[str, int]
    slices_positive: dict[str, int]
    confounded_series: int
    seconds: float
    files: dict[str, str] = field(default_factory=dict)
    resumed: int = 0  # series an interrupted run had finished, kept

    def to_dict(self) -> dict:
        return asdict(self)


def parse_prevalence(value: str | Mapping[str, float] | None) -> dict[str, float]:
    """``"any=0.5,epidural=0.2"`` or a mapping, over the defaults; checks names and ranges."""
    prev = dict(DEFAULT_PREVALENCE)
    if value is None:
        return prev
    if isinstance(value, str):
        items = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, sep, num = part.partition("=")
            if not sep:
                raise IchscanError(f"prevalence {part!r}: expected label=fraction, e.g. any=0.5")
            try:
                items[name.strip()] = float(num)
            except ValueError:
                raise IchscanError(f"prevalence {part!r}: {num!r} is not a number") from None
        value = items
    for name, p in value.items():
        if name not in LABELS:
            raise IchscanError(f"prevalence: unknown label {name!r}; expected one of {', '.join(LABELS)}")
        if not 0.0 <= float(p) <= 1.0:
            raise IchscanError(f"prevalence of {name}: {p} is not between 0 and 1")
        prev[name] = float(p)
    return prev


def _hex(*parts) -> str:
    return hashlib.sha1(":".join(str(p) for p in parts).encode()).hexdigest()


def _uid(*parts) -> str:
    """A UID under the 2.25 root (a 128-bit integer, as from a UUID) derived from the seed, not random."""
    return "2.25." + str(int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:32], 16))


def _subtypes(rng: np.random.Generator, prev: dict[str, float]) -> tuple[str, ...]:
    if rng.random() >= prev["any"]:
        return ()
    cond = {s: min(1.0, prev[s] / max(prev["any"], 1e-9)) for s in SUBTYPES}
    chosen = [s for s in SUBTYPES if rng.random() < cond[s] * 0.75]
    if not chosen:
        weights = np.array([cond[s] for s in SUBTYPES]) + 1e-9
        chosen = [SUBTYPES[int(rng.choice(len(SUBTYPES), p=weights / weights.sum()))]]
    return tuple(chosen)


def parse_thickness(value: float | str | tuple[float, float]) -> tuple[float, float]:
    """``5``, ``"5"``, ``"2.5-8"`` or ``(2.5, 8)`` as a (low, high) range in mm."""
    return parse_mm_range(value, "thickness", 0.1, 20.0, "5 or 2.5-8")


def _draw_thickness(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Fixed, or drawn per series from the range in steps of 0.5 mm (what scanners reconstruct)."""
    if lo == hi:
        return lo
    return float(np.clip(np.round(rng.uniform(lo, hi) * 2) / 2, lo, hi))


def parse_pitch(value: float) -> float:
    """``--pitch``: the largest tilt of a series' scan plane against the head, 0 (none) to ``MAX_PITCH`` degrees."""
    pitch = float(value)
    if not 0.0 <= pitch <= MAX_PITCH:
        raise IchscanError(f"pitch {value}: expected 0 to {MAX_PITCH:g} degrees")
    return pitch


def _draw_tilt(seed: int, index: int, pitch: float) -> tuple[float, float]:
    """Pitch and roll (degrees) of one series' scan plane against the head, for ``--pitch`` up to
    ``pitch``: pitch mostly within half of it (normal, SD pitch / 2, clipped), roll a quarter as large.
    Drawn from their own stream, so that sets without ``--pitch`` keep every other draw."""
    if not pitch:
        return 0.0, 0.0
    r = np.random.default_rng([seed, 4, index])
    return (round(float(np.clip(r.normal(0, pitch / 2), -pitch, pitch)), 2),
            round(float(np.clip(r.normal(0, pitch / 8), -pitch / 4, pitch / 4)), 2))


# Physiological calcification in adult heads for ``--calcification``: the share of such heads with each
# (pineal and choroid plexus glomus in most adults on CT, more with age; dural/falx calcification in a
# fraction; basal ganglia in a few percent) and its density range (HU).
ADULT_CALCIFICATION = {"pineal": (0.8, (120.0, 700.0)), "choroid": (0.85, (120.0, 700.0)),
                       "falx": (0.25, (150.0, 700.0)), "basal_ganglia": (0.08, (100.0, 350.0))}


# Options that apply to a share of series, as plan_dataset's keywords and the stamp's arguments; each is
# recorded only when used, so that sets made before it existed still resume.
SHARE_OPTIONS = ("calcification", "export", "randomize_outside", "fractures", "children", "injury")


def _parse_share(what: str, value: float) -> float:
    """A share of series (``--twins`` and ``SHARE_OPTIONS``), 0 to 1."""
    share = float(value)
    if not 0.0 <= share <= 1.0:
        raise IchscanError(f"{what.replace('_', '-')} {value}: expected a share between 0 and 1")
    return share


def _chosen(seed: int, stream: int, index: int, share: float) -> np.random.Generator | None:
    """Series ``index``'s own stream ``[seed, stream, index]`` when its first draw puts it in ``share`` of
    series, else None. An option drawn this way leaves every other draw of a set as it was without it."""
    if not share:
        return None
    r = np.random.default_rng([seed, stream, index])
    return r if r.random() < share else None


def _parse_outside_margin(value, share: float) -> tuple[float, float]:
    """``--outside-margin`` as a (low, high) range in mm; another than the default needs ``--randomize-outside``."""
    margin = parse_margin(value)
    if margin != DEFAULT_MARGIN and not share:
        shown = f"{margin[0]:g}" if margin[0] == margin[1] else f"{margin[0]:g}-{margin[1]:g}"
        raise IchscanError(f"outside-margin {shown} mm applies only with --randomize-outside")
    return margin


def _draw_calcification(seed: int, index: int, share: float) -> dict:
    """The physiological calcifications of one series under ``--calcification share``: with probability
    ``share`` an adult head, each calcification then present with its ``ADULT_CALCIFICATION`` rate and a
    density drawn from its range."""
    r = _chosen(seed, 5, index, share)
    if r is None:
        return {}
    out = {}
    for name, (rate, (lo, hi)) in ADULT_CALCIFICATION.items():
        present, density = r.random() < rate, float(r.uniform(lo, hi))  # both drawn: each kind's draws fixed
        if present:
            out[name] = round(density, 1)
    return out


def _draw_fracture(seed: int, index: int, share: float) -> dict:
    """One series' skull fracture under ``--fractures share`` (``artifacts.draw_fracture``), as a confounder."""
    r = _chosen(seed, 8, index, share)
    return {} if r is None else {"fracture": draw_fracture(r)}


def lesion_stream(seed: int, index: int) -> list[int]:
    """The seed sequence series ``index`` draws its lesions from (``render_series``; ``--injury`` plans them
    again from it)."""
    return [int(seed), 3, int(index)]


def _draw_injury(seed: int, index: int, share: float, subtypes: tuple[str, ...]) -> dict:
    """Under ``--injury share``, whether a bleeding series' head shows where it was struck
    (``series.draw_injury``): the series' subtypes and the stream its lesions are planned from, so that a
    lesion-free twin, which keeps its source's confounders, places the same blow on the same head."""
    r = _chosen(seed, 11, index, share)
    if r is None or not subtypes:
        return {}
    return {"injury": {"subtypes": list(subtypes), "lesion_stream": lesion_stream(seed, index),
                       "seed": int(r.integers(2**31))}}


def _draw_child(seed: int, patient: int, share: float) -> float | None:
    """A patient's age in years when ``--children share`` makes them a child (2-17, uniform), else None.
    Drawn per patient, so that each of their studies (and a twin) shows the same head."""
    r = _chosen(seed, 9, patient, share)
    return None if r is None else round(float(r.uniform(*an.CHILD_AGES)), 1)


def _draw_export(seed: int, index: int, share: float) -> Export | None:
    """Whether one series is stored as an export (``--export share``) and how (``draw_export``)."""
    r = _chosen(seed, 6, index, share)
    return None if r is None else draw_export(r)


def _draw_outside(seed: int, index: int, share: float, margin: tuple[float, float]) -> Outside | None:
    """Whether one series' outside is randomised (``--randomize-outside share``) and how (``draw_outside``,
    its kept margin drawn from ``margin``, mm)."""
    r = _chosen(seed, 7, index, share)
    return None if r is None else draw_outside(r, margin)


def plan_dataset(studies: int, seed: int, *, size: int = 512, slices: tuple[int, int] = (32, 40),
                 thickness: float | str | tuple[float, float] = 5.0, prevalence=None,
                 twins: float = 0.0, pitch: float = 0.0, calcification: float = 0.0,
                 export: float = 0.0, randomize_outside: float = 0.0,
                 outside_margin: float | str | tuple[float, float] = DEFAULT_MARGIN,
                 fractures: float = 0.0, children: float = 0.0, injury: float = 0.0) -> list[SeriesPlan]:
    """Every series of the set, decided from the seed alone (one series per study). ``thickness`` is the
    slice thickness and spacing in mm, or a (low, high) range drawn per series.

    ``twins`` is the share of series with a bleed that are followed by a lesion-free twin: the same
    patient, scan, anatomy, artifacts and noise without the lesions (nor their mass effect), as another
    study of that patient. For training, such pairs leave a model nothing to learn but the blood itself;
    whatever else tells phantoms apart cannot predict the label. Twins count towards ``studies``.

    ``pitch`` (degrees, 0 for none) tilts each series' scan plane against the head by up to that much
    (``_draw_tilt``); a twin keeps its source's tilt. Tilted series take 2-5 times as long to draw.

    ``calcification`` (0 to 1) is the share of series drawn as adult heads with physiological calcification
    (``ADULT_CALCIFICATION``: pineal, choroid plexus, falx, basal ganglia), added to the confounders the
    series has anyway; a twin keeps its source's.

    ``export`` (0 to 1) is the share of series stored as windowed 8-bit JPEGs and rebuilt to HU, as some
    collections and exports keep CT (``ichscan.phantom.export``); a twin is stored as its source is.

    ``randomize_outside`` (0 to 1) is the share of series whose outside (beyond a few mm outside the inner
    table) is replaced by random texture (``ichscan.phantom.outside``); a twin gets its source's.
    ``outside_margin`` (mm, a number or a (low, high) range drawn per series) is how far outside the inner
    table the head is kept (default 1.5-4); 25-40 keeps the vault's skull and scalp.

    ``fractures`` (0 to 1) is the share of series with a skull fracture of the vault drawn apart from any
    bleed (``artifacts.draw_fracture``: a lucent line, sometimes a depressed piece, scalp swelling, air),
    as head injury leaves one with or without blood inside; a twin keeps its source's. Without it, the only
    fractures are those some epidurals draw over themselves.

    ``children`` (0 to 1) is the share of patients who are children of 2-17 years (``anatomy.child_head``:
    a smaller head, a thin vault with wide sutures, no atrophy, sinuses still pneumatizing), as head CT after
    injury is often of a child; their series carry no ``calcification`` (adult heads only). Each option
    draws from its own stream, so a set keeps every other draw when one is added.

    ``injury`` (0 to 1) is the share of bleeding series whose head also shows where it was struck, as
    traumatic bleeds of every kind come with a swollen scalp and often a fracture, not only epidurals:
    a scalp swelling and sometimes a fracture over the bleed (coup) or opposite it (contrecoup), placed
    from its first traumatic lesion (``series.draw_injury``; bleeds that are not traumatic, such as a
    hypertensive bleed or blood in the basal cisterns alone, get none). A twin keeps its source's blow,
    so that the signs of the blow are not the signs of the blood."""
    _parse_share("twins", twins)
    export = _parse_share("export", export)
    randomize_outside = _parse_share("randomize_outside", randomize_outside)
    margin = _parse_outside_margin(outside_margin, randomize_outside)
    t_lo, t_hi = parse_thickness(thickness)
    pitch = parse_pitch(pitch)
    calcification = _parse_share("calcification", calcification)
    fractures = _parse_share("fractures", fractures)
    children = _parse_share("children", children)
    injury = _parse_share("injury", injury)
    if studies < 1:
        raise IchscanError(f"studies must be at least 1 (got {studies})")
    lo, hi = int(slices[0]), int(slices[1])
    if not 1 <= lo <= hi:
        raise IchscanError(f"slices {lo}-{hi}: expected 1 <= low <= high")
    if not 32 <= size <= MAX_SIZE:
        raise IchscanError(f"size {size}: phantoms need 32 to {MAX_SIZE} pixels")
    drawn = hi * (TILTED_SLICES if pitch else 1)  # a tilted series is drawn on up to 4x as many thin slices
    if drawn * size * size * SERIES_BYTES_PER_VOXEL > MAX_SERIES_BYTES:
        most = MAX_SERIES_BYTES // (size * size * SERIES_BYTES_PER_VOXEL) // (drawn // hi)
        raise IchscanError(f"a series of {hi} slices of {size}x{size} pixels{' tilted' if pitch else ''} needs "
                           f"about {drawn * size * size * SERIES_BYTES_PER_VOXEL / 2**30:.0f} GB of memory to "
                           f"draw; use fewer slices (at most {most} at this size) or a smaller size")
    prev = parse_prevalence(prevalence)
    rng = np.random.default_rng([seed, 0])
    names = list(writer.ENCODINGS)
    weights = np.array([writer.ENCODING_WEIGHTS[k] for k in names])
    plans: list[SeriesPlan] = []
    seen: set[str] = set()
    patient = 0
    while len(plans) < studies:
        n_studies = 2 if (rng.random() < SECOND_STUDY and studies - len(plans) >= 2) else 1
        pid = "ID_" + _hex(seed, "patient", patient)[:9]
        child = _draw_child(seed, patient, children)
        for st in range(n_studies):
            if len(plans) >= studies:  # a twin took the place of this patient's second study
                break
            i = len(plans)
            n = int(rng.integers(lo, hi + 1))
            rows = cols = size
            if rng.random() < ODD_SIZE:
                rows = cols = max(32, int(round(size * float(rng.choice([0.75, 0.875, 1.25])) / 2)) * 2)
            ids = []
            for k in range(n):
                salt = 0
                while True:
                    iid = "ID_" + _hex(seed, "image", i, k, salt)[:9]
                    if iid not in seen:
                        break
                    salt += 1
                seen.add(iid)
                ids.append(iid)
            date, tm = writer.study_datetime(rng)
            enc = names[int(rng.choice(len(names), p=weights / weights.sum()))]
            window = writer.WINDOW_TAGS[int(rng.integers(len(writer.WINDOW_TAGS)))]
            tilt = _draw_tilt(seed, i, pitch)
            plans.append(SeriesPlan(
                index=i, seed=seed, patient_index=patient, patient_id=pid,
                study_uid=_uid(seed, "study", i), series_uid=_uid(seed, "series", i), frame_uid=_uid(seed, "for", i),
                sop_uids=tuple(_uid(seed, "sop", i, k) for k in range(n)), image_ids=tuple(ids),
                rows=rows, cols=cols, thickness=_draw_thickness(rng, t_lo, t_hi), subtypes=_subtypes(rng, prev),
                confounders={**sample_confounders(rng),
                             **({} if child is not None else _draw_calcification(seed, i, calcification)),
                             **_draw_fracture(seed, i, fractures)}, encoding=enc,
                header={"date": date, "time": tm, "accession": f"PH{seed % 10000:04d}{i:06d}",
                        "series_number": int(rng.integers(2, 9)), "window": window,
                        "kernel": writer.KERNELS[int(rng.integers(len(writer.KERNELS)))],
                        "manufacturer": writer.MANUFACTURERS[int(rng.integers(len(writer.MANUFACTURERS)))],
                        "kvp": float(rng.choice([100.0, 120.0, 140.0])), "reverse": bool(rng.random() < 0.3),
                        "table_z": float(rng.uniform(-250, 50)), "study_in_patient": st},
                pitch=tilt[0], roll=tilt[1], export=_draw_export(seed, i, export),
                outside=_draw_outside(seed, i, randomize_outside, margin), child=child,
            ))
            if injury:
                plans[-1] = dataclasses.replace(plans[-1], confounders={
                    **plans[-1].confounders, **_draw_injury(seed, i, injury, plans[-1].subtypes)})
            src = plans[-1]
            if twins and src.subtypes and len(plans) < studies and rng.random() < twins:
                plans.append(_twin(src, len(plans), seen))
        patient += 1
    return plans


def _twin(src: SeriesPlan, i: int, seen: set[str]) -> SeriesPlan:
    """``src``'s scan again, lesion-free, under new UIDs and image ids (another study of the patient)."""
    ids = []
    for k in range(src.n_slices):
        salt = 0
        while (iid := "ID_" + _hex(src.seed, "image", i, k, salt)[:9]) in seen:
            salt += 1
        seen.add(iid)
        ids.append(iid)
    s = src.seed
    return dataclasses.replace(
        src, index=i, study_uid=_uid(s, "study", i), series_uid=_uid(s, "series", i), frame_uid=_uid(s, "for", i),
        sop_uids=tuple(_uid(s, "sop", i, k) for k in range(src.n_slices)), image_ids=tuple(ids), subtypes=(),
        header=dict(src.header, accession=f"PH{s % 10000:04d}{i:06d}", study_in_patient=src.header["study_in_patient"] + 1),
        twin_of=src.index)


def head_for(plan: SeriesPlan) -> an.HeadShape:
    """A patient's head is the same in each of their studies; a child's is drawn as an adult's, then made
    a child's (``anatomy.child_head``) from a stream of its own."""
    head = an.sample_head(np.random.default_rng([plan.seed, 1, plan.patient_index]))
    if plan.child is None:
        return head
    return an.child_head(head, plan.child, np.random.default_rng([plan.seed, 10, plan.patient_index]))


def render_series(plan: SeriesPlan) -> PhantomSeries:
    """Draw one planned series in memory (no files)."""
    scan = plan.index if plan.twin_of is None else plan.twin_of
    rng = np.random.default_rng([plan.seed, 2, scan])
    lesion_rng = np.random.default_rng(lesion_stream(plan.seed, plan.index))
    enc = writer.ENCODINGS[plan.encoding]
    ps = make_series(head_for(plan), plan.subtypes, rng, n=plan.n_slices, rows=plan.rows, cols=plan.cols,
                     thickness=plan.thickness, confounders=plan.confounders, hu_range=enc.hu_range,
                     lesion_rng=lesion_rng, pitch=plan.pitch, roll=plan.roll)
    if plan.outside is not None:  # the twin's texture is its source's: the same stream, the same scan
        ps.hu = randomize_outside(ps.hu, ps.depth, ps.frame.mm_spacing, plan.outside,
                                  np.random.default_rng([plan.seed, 7, scan, 1]), enc.hu_range)
    if plan.export is not None:  # the masks stay: the blood is where it was, only its pixels were stored lossily
        ps.hu = export_series(ps.hu, ps.frame.mm_spacing, plan.export, enc.hu_range)
    return ps


def _series_dir(out: Path, plan: SeriesPlan, layout: str) -> Path:
    if layout == "rsna":
        return out / "images"
    return out / plan.patient_id / plan.study_uid / plan.series_uid


def _series_files(out: Path, plan: SeriesPlan, layout: str, masks: bool) -> list[Path]:
    """Every file one series writes: its slices, and its masks when asked for."""
    folder = _series_dir(out, plan, layout)
    files = [folder / f"{iid}.dcm" for iid in plan.image_ids]
    if masks:
        files.append(out / "masks" / f"{plan.series_uid}.npz")
    return files


def _head_record(head: an.HeadShape, plan: SeriesPlan) -> dict:
    """The head's age and atrophy in the manifest, and a child's scale (``anatomy.child_head``)."""
    out = {"age": head.age, "atrophy": round(head.atrophy, 2)}
    return out if plan.child is None else {**out, "scale": round(head.scale, 3)}


def _write_one(plan: SeriesPlan, out: str, layout: str, masks: bool) -> dict:
    ps = render_series(plan)
    out_p = Path(out)
    head = ps.head
    h = plan.header
    fr = ps.frame
    sh = writer.SeriesHeader(
        patient_id=plan.patient_id, patient_name=f"PHANTOM^{plan.patient_id[3:]}",
        patient_sex="F" if int(plan.patient_id[3:5], 16) % 2 else "M", patient_age=head.age,
        study_uid=plan.study_uid, series_uid=plan.series_uid, frame_uid=plan.frame_uid,
        study_date=h["date"], study_time=h["time"], accession=h["accession"], series_number=h["series_number"],
        thickness=plan.thickness, spacing=fr.mm_spacing, rows=plan.rows, cols=plan.cols,
        origin_xy=(-(plan.cols - 1) / 2 * fr.mm_spacing, -(plan.rows - 1) / 2 * fr.mm_spacing),
        table_z=h["table_z"], encoding=writer.ENCODINGS[plan.encoding], window=h["window"], kernel=h["kernel"],
        manufacturer=h["manufacturer"], kvp=h["kvp"], reverse_instances=h["reverse"])
    paths = [str(f) for f in _series_files(out_p, plan, layout, masks=False)]
    writer.write_series(paths, ps.hu, fr.mm_z, list(plan.sop_uids), sh)
    slice_lab = ps.slice_labels()
    if masks:
        bits = np.zeros(ps.hu.shape, np.uint8)
        for k, s in enumerate(SUBTYPES):
            bits |= (ps.masks[s].astype(np.uint8) << k)
        (out_p / "masks").mkdir(parents=True, exist_ok=True)
        with atomic_path(out_p / "masks" / f"{plan.series_uid}.npz", durable=False) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, masks=bits, image_ids=np.array(plan.image_ids), subtypes=np.array(SUBTYPES))
    return {
        "slice_labels": slice_lab.tolist(),
        "series_labels": ps.series_labels(),
        "manifest": {
            "patient_id": plan.patient_id, "study_uid": plan.study_uid, "series_uid": plan.series_uid,
            "n_slices": plan.n_slices, "rows": plan.rows, "cols": plan.cols, "spacing_mm": round(fr.mm_spacing, 4),
            "thickness_mm": plan.thickness, "encoding": plan.encoding, "noise_sigma_hu": round(ps.noise_sigma, 2),
            "twin_of": plan.twin_of, "subtypes_planned": list(plan.subtypes), "lesions": [les.describe() for les in ps.lesions],
            "confounders": ps.confounders, "head": _head_record(head, plan),
            **({"pitch_deg": plan.pitch, "roll_deg": plan.roll} if plan.pitch or plan.roll else {}),
            **({"export": plan.export.describe()} if plan.export is not None else {}),
            **({"randomized_outside": plan.outside.describe()} if plan.outside is not None else {}),
        },
    }


def _stamp(studies: int, seed: int, size: int, slices: tuple[int, int], thickness, prevalence, layout: str,
           masks: bool, twins: float, pitch: float = 0.0, outside_margin=DEFAULT_MARGIN, **shares: float) -> dict:
    """The arguments that decide a set's files, as the journal and the manifest record them."""
    arguments = {"studies": studies, "size": size, "slices": list(slices),
                 "thickness": list(parse_thickness(thickness)), "twins": twins,
                 "prevalence": parse_prevalence(prevalence), "layout": layout, "masks": masks}
    if pitch:  # recorded only when used, so sets made before --pitch existed still resume
        arguments["pitch"] = parse_pitch(pitch)
    for name in SHARE_OPTIONS:  # likewise
        if shares.get(name):
            arguments[name] = _parse_share(name, shares[name])
    if parse_margin(outside_margin) != DEFAULT_MARGIN:  # likewise
        arguments["outside_margin"] = list(parse_margin(outside_margin))
    return json.loads(json.dumps({"kind": "ichscan-phantoms", "seed": seed, "arguments": arguments},
                                 default=_jsonable))


def _read_journal(path: Path) -> tuple[dict | None, dict[int, dict]]:
    """The stamp and the finished series by index; a line a killed run left half written is passed over."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return None, {}
    entries = []
    for line in lines:
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    if not entries or not isinstance(entries[0], dict) or entries[0].get("kind") != "ichscan-phantoms":
        return None, {}
    return entries[0], {e["index"]: e for e in entries[1:] if isinstance(e, dict) and isinstance(e.get("index"), int)}


def _previous_run(out: Path) -> tuple[dict | None, dict[int, dict]]:
    """The stamp of the set already in ``out`` (None when there is none) and the series it finished."""
    stamp, finished = _read_journal(out / JOURNAL_NAME)
    if stamp is None:  # a set written before ichscan kept a journal: its manifest records the same arguments
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            doc = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
            stamp = {"kind": doc["kind"], "seed": doc["seed"], "arguments": doc["arguments"]}
    return stamp, finished


def _holds_phantoms(out: Path) -> bool:
    return (any((out / name).exists() for name in SET_FILES)
            or any(True for _ in out.glob("images/ID_*.dcm")) or any(p.is_dir() for p in out.glob("ID_*")))


def _differences(previous: dict, wanted: dict) -> str:
    before = {"seed": previous.get("seed"), **previous.get("arguments", {})}
    now = {"seed": wanted["seed"], **wanted["arguments"]}
    return ", ".join(f"{k} {before.get(k)} (now {now[k]})" for k in now if before.get(k) != now[k])


def _remove_set(out: Path, previous: dict | None) -> None:
    """Remove what an earlier run wrote and nothing else: the files its arguments plan (with no record of
    them, RSNA-layout images and masks by name), labels, manifest and journal; its folders once empty."""
    files: list[Path] = []
    if previous is not None:
        args = previous["arguments"]
        plans = plan_dataset(args["studies"], previous["seed"], size=args["size"], slices=tuple(args["slices"]),
                             thickness=tuple(args.get("thickness", (5.0, 5.0))), prevalence=args["prevalence"],
                             twins=args.get("twins", 0.0), pitch=args.get("pitch", 0.0),
                             outside_margin=tuple(args.get("outside_margin", DEFAULT_MARGIN)),
                             **{name: args.get(name, 0.0) for name in SHARE_OPTIONS})
        for plan in plans:
            files += _series_files(out, plan, args.get("layout", "rsna"), args.get("masks", False))
    else:
        files += [*out.glob("images/ID_*.dcm"), *out.glob("masks/*.npz")]
    for f in files + [out / name for name in (*SET_FILES, JOURNAL_NAME)]:
        f.unlink(missing_ok=True)
    folders = {parent for f in files for parent in f.parents if out in parent.parents}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # series, study, patient, images/
        with contextlib.suppress(OSError):  # not empty: something else lives there
            folder.rmdir()


def _start_journal(out: Path, stamp: dict, plans: list[SeriesPlan], layout: str, masks: bool,
                   overwrite: bool) -> dict[int, str]:
    """Check ``out`` against the set already there and begin the journal; returns the journal lines of the
    series to keep (finished, and every file still there) by index."""
    previous, finished = _previous_run(out)
    if overwrite:
        _remove_set(out, previous)
        previous, finished = None, {}
    elif previous is not None and previous != stamp:
        raise IchscanError(f"this folder holds phantoms made with other arguments ({_differences(previous, stamp)}); "
                           "use another --out, or --overwrite to replace them", out)
    elif previous is None and _holds_phantoms(out):
        raise IchscanError("this folder holds phantom files with no record of their arguments; use another --out, "
                           "or --overwrite to replace them", out)
    kept = {}
    for i, entry in sorted(finished.items()):
        if (i < len(plans) and entry.get("series_uid") == plans[i].series_uid
                and all(f.exists() for f in _series_files(out, plans[i], layout, masks))):
            kept[i] = json.dumps(entry, default=_jsonable)
    write_text(out / JOURNAL_NAME, "".join(line + "\n" for line in [json.dumps(stamp), *kept.values()]))
    return kept


def _set_files(out_p: Path, layout: str) -> dict[str, str]:
    return {"labels": str(out_p / "labels.csv"), "series_labels": str(out_p / "series_labels.csv"),
            "images": str(out_p / "images") if layout == "rsna" else str(out_p)}


def _finished_set(out_p: Path, stamp: dict, plans: list[SeriesPlan], layout: str, masks: bool
                  ) -> DatasetSummary | None:
    """The set already in ``out_p`` when it is finished (a manifest, no journal), was made with ``stamp`` and
    still has every file it planned: kept as it is, its summary from its manifest. Else None."""
    if (out_p / JOURNAL_NAME).exists() or _previous_run(out_p)[0] != stamp:
        return None
    try:
        counts = json.loads((out_p / "manifest.json").read_text(encoding="utf-8"))["counts"]
        kept = {k: counts[k] for k in ("patients", "studies", "series", "slices", "series_positive",
                                       "slices_positive", "confounded_series")}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = _set_files(out_p, layout)
    if not (Path(files["labels"]).is_file() and Path(files["series_labels"]).is_file()) \
            or not all(f.exists() for plan in plans for f in _series_files(out_p, plan, layout, masks)):
        return None
    return DatasetSummary(out=str(out_p), **kept, seconds=0.0, files=files, resumed=len(plans))


def generate_dataset(out, studies: int, seed: int, size: int = 512, slices: tuple[int, int] = (32, 40),
                     thickness: float | str | tuple[float, float] = 5.0, prevalence=None, layout: str = "rsna",
                     masks: bool = False, workers: int = 1, progress: Callable[[int], None] | None = None,
                     twins: float = 0.0, overwrite: bool = False, pitch: float = 0.0,
                     calcification: float = 0.0, export: float = 0.0,
                     randomize_outside: float = 0.0,
                     outside_margin: float | str | tuple[float, float] = DEFAULT_MARGIN,
                     fractures: float = 0.0, children: float = 0.0, injury: float = 0.0) -> DatasetSummary:
    """Write a phantom set under ``out`` (see docs/phantom.md); ``progress(n)`` is told of n more slices.

    Resumes: series an interrupted run finished are kept and only the rest drawn, and the files come out
    byte for byte as an uninterrupted run writes them; a finished set of the same arguments with all its
    files is kept as it is (``resumed`` counts every series). A folder holding a set made with other
    arguments is refused unless ``overwrite``, which first removes that set's files (only those). One run at
    a time writes a folder (``ichscan.fileio.lock_folder``)."""
    if layout not in ("rsna", "series"):
        raise IchscanError(f"layout {layout!r}: expected 'rsna' or 'series'")
    t0 = time.perf_counter()
    out_p = Path(out)
    if out_p.exists() and not out_p.is_dir():
        raise IchscanError("is a file; --out needs a folder", out_p)
    plans = plan_dataset(studies, seed, size=size, slices=slices, thickness=thickness, prevalence=prevalence,
                         twins=twins, pitch=pitch, calcification=calcification, export=export,
                         randomize_outside=randomize_outside, outside_margin=outside_margin, fractures=fractures,
                         children=children, injury=injury)
    stamp = _stamp(studies, seed, size, slices, thickness, prevalence, layout, masks, twins, pitch,
                   calcification=calcification, export=export, randomize_outside=randomize_outside,
                   outside_margin=outside_margin, fractures=fractures, children=children,
                   injury=injury)
    with lock_folder(out_p):
        summary = None if overwrite else _finished_set(out_p, stamp, plans, layout, masks)
        if summary is None:
            lines = _start_journal(out_p, stamp, plans, layout, masks, overwrite)
            summary = _write_set(out_p, plans, lines, stamp, layout, masks, workers, progress)
    summary.seconds = round(time.perf_counter() - t0, 2)
    log.info("wrote %d slices of %d series to %s in %.1f s (%d series resumed)", summary.slices, summary.series,
             out_p, summary.seconds, summary.resumed)
    return summary


def _write_set(out_p: Path, plans: list[SeriesPlan], lines: dict[int, str], stamp: dict, layout: str, masks: bool,
               workers: int, progress: Callable[[int], None] | None) -> DatasetSummary:
    """Draw the series not in ``lines``, journal each as it finishes, then write labels and manifest."""
    resumed = len(lines)
    todo = [plan for plan in plans if plan.index not in lines]
    if progress:
        for plan in plans:
            if plan.index in lines:
                progress(plan.n_slices)
    job = partial(_write_one, out=str(out_p), layout=layout, masks=masks)
    with open(out_p / JOURNAL_NAME, "a", encoding="utf-8") as journal:
        def finished(plan: SeriesPlan, result: dict) -> None:
            # The line is written after the series' last file, so a listed series is whole on disk.
            lines[plan.index] = json.dumps({"index": plan.index, "series_uid": plan.series_uid, "result": result},
                                           default=_jsonable)
            journal.write(lines[plan.index] + "\n")
            journal.flush()
            if progress:
                progress(plan.n_slices)

        if workers <= 1:
            for plan in todo:
                finished(plan, job(plan))
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
                for plan, res in zip(todo, ex.map(job, todo, chunksize=1)):
                    finished(plan, res)
    # Each series' results as its journal line holds them, so resumed and new series give the same bytes.
    results = [json.loads(lines[plan.index])["result"] for plan in plans]

    labels_path = out_p / "labels.csv"
    series_path = out_p / "series_labels.csv"
    # csv's own "\r\n" line ends, as RSNA's stage_2_train.csv has them.
    buf = io.StringIO()
    wr = csv.writer(buf)
    wr.writerow(["ID", "Label"])
    for plan, res in zip(plans, results):
        for iid, row in zip(plan.image_ids, res["slice_labels"]):
            values = dict(zip(SUBTYPES, row))
            values["any"] = int(any(row))
            for name in RSNA_CSV_ORDER:
                wr.writerow([f"{iid}_{name}", int(values[name])])
    write_text(labels_path, buf.getvalue())
    buf = io.StringIO()
    wr = csv.writer(buf)
    wr.writerow(["patient_id", "study_uid", "series_uid", "n_slices", *LABELS])
    for plan, res in zip(plans, results):
        wr.writerow([plan.patient_id, plan.study_uid, plan.series_uid, plan.n_slices,
                     *(res["series_labels"][k] for k in LABELS)])
    write_text(series_path, buf.getvalue())

    n_slices = sum(p.n_slices for p in plans)
    series_pos = {k: sum(r["series_labels"][k] for r in results) for k in LABELS}
    slice_arr = np.concatenate([np.asarray(r["slice_labels"], np.int64).reshape(-1, len(SUBTYPES)) for r in results])
    slices_pos = {"any": int(slice_arr.any(axis=1).sum()),
                  **{s: int(slice_arr[:, k].sum()) for k, s in enumerate(SUBTYPES)}}
    summary = DatasetSummary(
        out=str(out_p), patients=len({p.patient_id for p in plans}), studies=len(plans), series=len(plans),
        slices=n_slices, series_positive=series_pos, slices_positive=slices_pos,
        confounded_series=sum(1 for p in plans if p.confounders), seconds=0.0,
        files=_set_files(out_p, layout),
        resumed=resumed,
    )
    manifest = {
        "kind": stamp["kind"], "ichscan_version": __version__, "seed": stamp["seed"], "arguments": stamp["arguments"],
        "counts": {k: v for k, v in summary.to_dict().items() if k not in ("out", "seconds", "files", "resumed")},
        "label_order": list(LABELS),
        "series": [r["manifest"] for r in results],
    }
    write_json(out_p / "manifest.json", manifest, indent=1, default=_jsonable, newline=False)
    # The manifest now stands for the journal (same arguments); a finished set holds only its outputs.
    (out_p / JOURNAL_NAME).unlink()
    return summary


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o).__name__)
