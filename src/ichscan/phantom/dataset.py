"""A phantom data set on disk: DICOM files, RSNA-style labels, series labels, masks and a manifest.

The whole set is planned first in one process (patients, studies, UIDs, image ids, labels wanted,
confounders, file encodings), each from the seed; every series is then drawn from its own generator
seeded by (seed, series index), so the files do not depend on how many workers drew them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
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
from ichscan.fileio import atomic_path, write_json, write_text
from ichscan.labels import LABELS, RSNA_CSV_ORDER, SUBTYPES
from ichscan.phantom import anatomy as an
from ichscan.phantom import writer
from ichscan.phantom.series import PhantomSeries, make_series, sample_confounders

log = logging.getLogger(__name__)

# Share of series with each subtype when nothing else is asked; combinations occur on top.
DEFAULT_PREVALENCE = {"any": 0.5, "epidural": 0.14, "intraparenchymal": 0.18, "intraventricular": 0.14,
                      "subarachnoid": 0.18, "subdural": 0.18}
SECOND_STUDY = 0.15  # share of patients scanned twice
ODD_SIZE = 0.06  # share of series whose matrix is not the requested size


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
    if isinstance(value, str):
        lo, sep, hi = value.partition("-")
        try:
            value = (float(lo), float(hi)) if sep else float(lo)
        except ValueError:
            raise IchscanError(f"thickness {value!r}: expected mm, e.g. 5 or 2.5-8") from None
    lo, hi = (float(value[0]), float(value[1])) if isinstance(value, (tuple, list)) else (float(value),) * 2
    if not 0.1 <= lo <= hi <= 20:
        raise IchscanError(f"thickness {lo}-{hi} mm: expected 0.1 <= low <= high <= 20")
    return lo, hi


def _draw_thickness(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Fixed, or drawn per series from the range in steps of 0.5 mm (what scanners reconstruct)."""
    if lo == hi:
        return lo
    return float(np.clip(np.round(rng.uniform(lo, hi) * 2) / 2, lo, hi))


def plan_dataset(studies: int, seed: int, *, size: int = 512, slices: tuple[int, int] = (32, 40),
                 thickness: float | str | tuple[float, float] = 5.0, prevalence=None,
                 twins: float = 0.0) -> list[SeriesPlan]:
    """Every series of the set, decided from the seed alone (one series per study). ``thickness`` is the
    slice thickness and spacing in mm, or a (low, high) range drawn per series.

    ``twins`` is the share of series with a bleed that are followed by a lesion-free twin: the same
    patient, scan, anatomy, artifacts and noise without the lesions (nor their mass effect), as another
    study of that patient. For training, such pairs leave a model nothing to learn but the blood itself;
    whatever else tells phantoms apart cannot predict the label. Twins count towards ``studies``."""
    if not 0.0 <= twins <= 1.0:
        raise IchscanError(f"twins {twins}: expected a share between 0 and 1")
    t_lo, t_hi = parse_thickness(thickness)
    if studies < 1:
        raise IchscanError(f"studies must be at least 1 (got {studies})")
    lo, hi = int(slices[0]), int(slices[1])
    if not 1 <= lo <= hi:
        raise IchscanError(f"slices {lo}-{hi}: expected 1 <= low <= high")
    if size < 32:
        raise IchscanError(f"size {size}: phantoms need at least 32 pixels")
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
            plans.append(SeriesPlan(
                index=i, seed=seed, patient_index=patient, patient_id=pid,
                study_uid=_uid(seed, "study", i), series_uid=_uid(seed, "series", i), frame_uid=_uid(seed, "for", i),
                sop_uids=tuple(_uid(seed, "sop", i, k) for k in range(n)), image_ids=tuple(ids),
                rows=rows, cols=cols, thickness=_draw_thickness(rng, t_lo, t_hi), subtypes=_subtypes(rng, prev),
                confounders=sample_confounders(rng), encoding=enc,
                header={"date": date, "time": tm, "accession": f"PH{seed % 10000:04d}{i:06d}",
                        "series_number": int(rng.integers(2, 9)), "window": window,
                        "kernel": writer.KERNELS[int(rng.integers(len(writer.KERNELS)))],
                        "manufacturer": writer.MANUFACTURERS[int(rng.integers(len(writer.MANUFACTURERS)))],
                        "kvp": float(rng.choice([100.0, 120.0, 140.0])), "reverse": bool(rng.random() < 0.3),
                        "table_z": float(rng.uniform(-250, 50)), "study_in_patient": st},
            ))
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
    """A patient's head is the same in each of their studies."""
    return an.sample_head(np.random.default_rng([plan.seed, 1, plan.patient_index]))


def render_series(plan: SeriesPlan) -> PhantomSeries:
    """Draw one planned series in memory (no files)."""
    scan = plan.index if plan.twin_of is None else plan.twin_of
    rng = np.random.default_rng([plan.seed, 2, scan])
    lesion_rng = np.random.default_rng([plan.seed, 3, plan.index])
    enc = writer.ENCODINGS[plan.encoding]
    return make_series(head_for(plan), plan.subtypes, rng, n=plan.n_slices, rows=plan.rows, cols=plan.cols,
                       thickness=plan.thickness, confounders=plan.confounders, hu_range=enc.hu_range,
                       lesion_rng=lesion_rng)


def _series_dir(out: Path, plan: SeriesPlan, layout: str) -> Path:
    if layout == "rsna":
        return out / "images"
    return out / plan.patient_id / plan.study_uid / plan.series_uid


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
        thickness=plan.thickness, spacing=fr.spacing, rows=plan.rows, cols=plan.cols,
        origin_xy=(-(plan.cols - 1) / 2 * fr.spacing, -(plan.rows - 1) / 2 * fr.spacing),
        table_z=h["table_z"], encoding=writer.ENCODINGS[plan.encoding], window=h["window"], kernel=h["kernel"],
        manufacturer=h["manufacturer"], kvp=h["kvp"], reverse_instances=h["reverse"])
    folder = _series_dir(out_p, plan, layout)
    paths = [str(folder / f"{iid}.dcm") for iid in plan.image_ids]
    writer.write_series(paths, ps.hu, fr.z, list(plan.sop_uids), sh)
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
            "n_slices": plan.n_slices, "rows": plan.rows, "cols": plan.cols, "spacing_mm": round(fr.spacing, 4),
            "thickness_mm": plan.thickness, "encoding": plan.encoding, "noise_sigma_hu": round(ps.noise_sigma, 2),
            "twin_of": plan.twin_of, "subtypes_planned": list(plan.subtypes), "lesions": [les.describe() for les in ps.lesions],
            "confounders": ps.confounders, "head": {"age": head.age, "atrophy": round(head.atrophy, 2)},
        },
    }


def generate_dataset(out, studies: int, seed: int, size: int = 512, slices: tuple[int, int] = (32, 40),
                     thickness: float | str | tuple[float, float] = 5.0, prevalence=None, layout: str = "rsna",
                     masks: bool = False, workers: int = 1, progress: Callable[[int], None] | None = None,
                     twins: float = 0.0) -> DatasetSummary:
    """Write a phantom set under ``out`` (see docs/phantom.md); ``progress(n)`` is told of n more slices."""
    if layout not in ("rsna", "series"):
        raise IchscanError(f"layout {layout!r}: expected 'rsna' or 'series'")
    t0 = time.perf_counter()
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    plans = plan_dataset(studies, seed, size=size, slices=slices, thickness=thickness, prevalence=prevalence,
                         twins=twins)
    job = partial(_write_one, out=str(out_p), layout=layout, masks=masks)
    results = []
    if workers <= 1:
        for plan in plans:
            results.append(job(plan))
            if progress:
                progress(plan.n_slices)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
            for plan, res in zip(plans, ex.map(job, plans, chunksize=1)):
                results.append(res)
                if progress:
                    progress(plan.n_slices)

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
        confounded_series=sum(1 for p in plans if p.confounders), seconds=round(time.perf_counter() - t0, 2),
        files={"labels": str(labels_path), "series_labels": str(series_path),
               "images": str(out_p / "images") if layout == "rsna" else str(out_p)},
    )
    manifest = {
        "kind": "ichscan-phantoms", "ichscan_version": __version__, "seed": seed,
        "arguments": {"studies": studies, "size": size, "slices": list(slices), "thickness": list(parse_thickness(thickness)), "twins": twins,
                      "prevalence": parse_prevalence(prevalence), "layout": layout, "masks": masks},
        "counts": {k: v for k, v in summary.to_dict().items() if k not in ("out", "seconds", "files")},
        "label_order": list(LABELS),
        "series": [r["manifest"] for r in results],
    }
    write_json(out_p / "manifest.json", manifest, indent=1, default=_jsonable, newline=False)
    log.info("wrote %d slices of %d series to %s in %.1f s", n_slices, len(plans), out_p, summary.seconds)
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
