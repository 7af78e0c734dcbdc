"""Phantoms: files read back through ichscan.dicom with the HU generated, labels agree with masks,
anatomy in HU, subtype geometry, and a trivial feature that does not solve the task."""

from __future__ import annotations

import csv
import dataclasses
import filecmp
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import UID
from scipy import ndimage
from scipy.spatial import cKDTree
from sklearn.metrics import roc_auc_score

from ichscan.dicom import find_series, read_slice
from ichscan.errors import IchscanError
from ichscan.labels import LABELS, RSNA_CSV_ORDER, SUBTYPES
from ichscan.phantom import anatomy as an
from ichscan.phantom import generate_dataset, parse_prevalence, plan_dataset, render_series, writer
from ichscan.phantom.series import make_series


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    summary = generate_dataset(out, 6, seed=3, size=64, slices=(8, 10), masks=True,
                               prevalence={"any": 0.8})
    return out, summary


def _labels_csv(path: Path) -> dict[str, int]:
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ID", "Label"]
    return {r[0]: int(r[1]) for r in rows[1:]}


def test_files_read_back_with_generated_hu(small_set):
    out, summary = small_set
    plans = plan_dataset(6, 3, size=64, slices=(8, 10), prevalence={"any": 0.8})
    assert summary.slices == sum(p.n_slices for p in plans)
    for plan in plans:
        ps = render_series(plan)
        for k, iid in enumerate(plan.image_ids):
            s = read_slice(out / "images" / f"{iid}.dcm")
            assert s.image_id == iid
            assert (s.patient_id, s.study_uid, s.series_uid, s.sop_uid) == (
                plan.patient_id, plan.study_uid, plan.series_uid, plan.sop_uids[k])
            assert s.hu.shape == (plan.rows, plan.cols)
            np.testing.assert_array_equal(s.hu, ps.hu[k])
            assert s.thickness == pytest.approx(5.0)
            assert s.position[2] == pytest.approx(plan.header["table_z"] + ps.frame.z[k], abs=1e-3)


def test_labels_agree_with_masks(small_set):
    out, _ = small_set
    labels = _labels_csv(out / "labels.csv")
    with open(out / "series_labels.csv") as f:
        series_rows = {r["series_uid"]: r for r in csv.DictReader(f)}
    assert list(next(iter(series_rows.values())))[:4] == ["patient_id", "study_uid", "series_uid", "n_slices"]
    masks = sorted((out / "masks").glob("*.npz"))
    assert len(masks) == len(series_rows) == 6
    n_positive, mixed = 0, 0
    for path in masks:
        npz = np.load(path)
        row = series_rows[path.stem]
        assert int(row["n_slices"]) == len(npz["image_ids"])
        per_slice = []
        for k, iid in enumerate(npz["image_ids"]):
            has = {s: bool(((npz["masks"][k] >> j) & 1).any()) for j, s in enumerate(SUBTYPES)}
            has["any"] = any(has.values())
            per_slice.append(has)
            for name in RSNA_CSV_ORDER:
                assert labels.pop(f"{iid}_{name}") == int(has[name])
        for name in LABELS:
            assert int(row[name]) == int(any(s[name] for s in per_slice))
        if row["any"] == "1":
            n_positive += 1
            assert sum(s["any"] for s in per_slice) > 0
            mixed += sum(s["any"] for s in per_slice) < len(per_slice)
    assert not labels  # no label rows without an image
    assert n_positive >= 2 and mixed >= 1  # lesions span runs of slices: slice labels differ from series labels


@pytest.mark.parametrize("name", sorted(writer.ENCODINGS))
def test_every_encoding_round_trips(tmp_path, name):
    enc = writer.ENCODINGS[name]
    rng = np.random.default_rng(0)
    lo, hi = enc.hu_range
    # CT numbers (ingest refuses images that are mostly not), with the encoding's extremes in two pixels
    hu = rng.integers(max(int(lo), -1024), min(int(hi), 3071) + 1, size=(2, 16, 16)).astype(np.float32)
    hu[0, 0, :2] = lo, hi
    plan = plan_dataset(1, 0, size=32, slices=(2, 2))[0]
    header = writer.SeriesHeader(
        patient_id="ID_0", patient_name="P", patient_sex="M", patient_age=50, study_uid=plan.study_uid,
        series_uid=plan.series_uid, frame_uid=plan.frame_uid, study_date="20200101", study_time="120000",
        accession="A1", series_number=2, thickness=5.0, spacing=0.5, rows=16, cols=16, origin_xy=(-4.0, -4.0),
        table_z=0.0, encoding=enc, window=("40", "80"), kernel="H30s", manufacturer="x", kvp=120.0,
        reverse_instances=True)
    paths = [str(tmp_path / f"ID_00{k}.dcm") for k in range(2)]
    writer.write_series(paths, hu, np.array([0.0, 5.0]), list(plan.sop_uids), header)
    for k, p in enumerate(paths):
        ds = dcmread(p)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert (ds.BitsStored, ds.PixelRepresentation) == (enc.bits_stored, int(enc.signed))
        assert ds.InstanceNumber == 2 - k
        s = read_slice(p)
        np.testing.assert_array_equal(s.hu, hu[k])
        if name == "rsna_corrupt":
            assert float(ds.RescaleIntercept) > -100 and s.fixes == ("rsna_intercept",)
            # read naively, the wrapped values are not HU: air would come out as bone
            assert not np.array_equal(ds.pixel_array.astype(np.float32) + float(ds.RescaleIntercept), hu[k])
        else:
            assert s.fixes == ()


def test_same_seed_same_files_whatever_the_workers(tmp_path):
    a = generate_dataset(tmp_path / "a", 3, seed=9, size=40, slices=(4, 5), workers=1)
    b = generate_dataset(tmp_path / "b", 3, seed=9, size=40, slices=(4, 5), workers=2)
    assert a.slices == b.slices
    names = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b" / "images").iterdir())
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a" / "images", tmp_path / "b" / "images", names, shallow=False)
    assert not mismatch and not errors
    for f in ("labels.csv", "series_labels.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_plan_patients_uids_and_variety():
    plans = plan_dataset(120, 4, size=512, slices=(32, 40))
    per_patient = Counter(p.patient_id for p in plans)
    assert max(per_patient.values()) == 2 and min(per_patient.values()) == 1  # some patients scanned twice
    uids = [u for p in plans for u in (p.study_uid, p.series_uid, *p.sop_uids)]
    assert len(set(uids)) == len(uids) and all(UID(u).is_valid for u in uids[:50])
    ids = [i for p in plans for i in p.image_ids]
    assert len(set(ids)) == len(ids) and all(i.startswith("ID_") and len(i) == 12 for i in ids)
    assert {p.encoding for p in plans} == set(writer.ENCODINGS)
    assert any(p.rows != 512 for p in plans) and all(32 <= p.n_slices <= 40 for p in plans)
    confounded = sum(bool(p.confounders) for p in plans) / len(plans)
    assert 0.2 < confounded < 0.5
    assert any(p.confounders and not p.subtypes for p in plans)  # negatives carry confounders too
    assert any(p.confounders and p.subtypes for p in plans)
    assert plan_dataset(120, 4)[7] == plans[7]  # planning is deterministic
    assert all(not p.subtypes for p in plan_dataset(30, 1, prevalence="any=0"))


def test_prevalence_parsing():
    assert parse_prevalence("any=0.3, epidural=0.2")["epidural"] == 0.2
    for bad in ("any", "nonsense=0.1", "any=2", "any=x"):
        with pytest.raises(IchscanError):
            parse_prevalence(bad)


PLANE = np.zeros((3, 3, 3), bool)
PLANE[1] = ndimage.generate_binary_structure(2, 1)  # erode within each slice, not across slices


def _interior(mask, px=1):
    return ndimage.binary_erosion(mask, PLANE, iterations=px) if mask.any() else mask


def test_tissue_hu_ranges():
    rng = np.random.default_rng(2)
    head = an.sample_head(rng)
    ps = make_series(head, (), rng, n=36, rows=128, cols=128, thickness=5.0, confounders={})
    t = ps.tissue
    med = {name: float(np.median(ps.hu[_interior(t == code)])) for code, name in enumerate(an.TISSUE_NAMES)
           if _interior(t == code).sum() > 20}
    assert med["air"] == pytest.approx(-1000, abs=10)
    # grey 36-46 and white 24-40 HU, plus the scanner's calibration offset (-5..+7 HU)
    assert 31 <= med["grey_matter"] <= 53
    assert 19 <= med["white_matter"] <= 47
    assert med["grey_matter"] - med["white_matter"] >= 4
    assert 0 <= med["ventricle"] <= 15
    assert med["fat"] < -30
    bone = ps.hu[t == an.BONE]
    assert 700 <= np.percentile(bone, 90) <= 1900 and bone.max() <= 2100
    assert med["sinus_air"] < -500
    # vertex high, skull base low: the top slices hold little brain, the bottom ones dense bone
    brain = ((t == an.GREY) | (t == an.WHITE)).sum(axis=(1, 2))
    assert brain.argmax() not in (0, len(brain) - 1)
    assert (t[:4] == an.SINUS).any() or (t[:4] == an.GLOBE).any()


def _lesion_series(subtype, seed, size=96):
    rng = np.random.default_rng(seed)
    head = an.sample_head(rng)
    ps = make_series(head, (subtype,), rng, n=34, rows=size, cols=size, thickness=5.0, confounders={})
    m = ps.masks[subtype]
    assert m.any(), f"{subtype} seed {seed}: empty mask"
    assert m.any(axis=(1, 2)).sum() < ps.frame.n
    return ps, m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_epidural_lens_touches_inner_table_within_sutures(seed):
    ps, m = _lesion_series("epidural", seed)
    for i in np.nonzero(m.any(axis=(1, 2)))[0]:
        near = ndimage.binary_dilation(m[i], iterations=2)
        assert (ps.tissue[i][near] == an.BONE).any()  # against the inner table
    sectors = np.unique(ps.sector[m])
    assert len(sectors) == 1 and sectors[0] > 0  # one skull bone: never across a suture


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subdural_crosses_sutures_not_midline(seed):
    ps, m = _lesion_series("subdural", seed)
    sectors = set(np.unique(ps.sector[m]).tolist())
    assert len(sectors) >= 2
    assert sectors <= {1, 2, 3} or sectors <= {4, 5, 6}  # one side only
    for i in np.nonzero(m.any(axis=(1, 2)))[0]:
        assert (ps.tissue[i][ndimage.binary_dilation(m[i], iterations=2)] == an.BONE).any()


@pytest.mark.parametrize("subtype,allowed", [
    ("intraventricular", (an.VENTRICLE,)),
    ("subarachnoid", (an.CSF,)),
    ("intraparenchymal", (an.GREY, an.WHITE)),
])
def test_blood_lies_in_its_compartment(subtype, allowed):
    for seed in (0, 1, 2):
        ps, m = _lesion_series(subtype, seed)
        assert np.isin(ps.tissue[m], allowed).all()
        # blood is blood: acute lesions are hyperdense on the image
        inner = _interior(m, 1) if _interior(m, 1).sum() > 10 else m
        assert 45 <= np.median(ps.hu[inner]) <= 95


def _lesion_seed(subtype, head, fr, wanted):
    """The first seed whose lesion generator plans a ``subtype`` lesion of which ``wanted(lesion)`` holds."""
    from ichscan.phantom import lesions

    for seed in range(400):
        if wanted(lesions.plan_lesion(subtype, head, fr, np.random.default_rng(seed))):
            return seed
    raise AssertionError(f"no such {subtype} lesion planned")


def _within_psf(mask, spacing_mm, structure=None):
    """``mask`` grown by the scanner's point spread (``artifacts.PSF_REACH_MM`` in plane) and one pixel more:
    a change to the object shows in the image only there."""
    from ichscan.phantom import artifacts

    reach = int(np.ceil(artifacts.PSF_REACH_MM / spacing_mm)) + 1
    return ndimage.binary_dilation(mask, structure, iterations=reach)


def _own_streams(seed):
    """A head and a fresh scan generator for ``seed``, each on a stream of its own as a phantom set draws
    them (``dataset.head_for``, ``render_series``), so that a field added to the head moves nothing else."""
    return an.sample_head(np.random.default_rng([seed, 1])), np.random.default_rng([seed, 2])


def _lesion_and_twin(subtype, seed, wanted, n, size):
    """One scan with a ``subtype`` lesion of which ``wanted`` holds, and the same scan without it (same head,
    position and noise), as ``make_series`` draws them, head and scan on ``_own_streams``."""
    head, rng = _own_streams(seed)
    lseed = _lesion_seed(subtype, head, an.make_frame(rng, head, n, size, size, 5.0), wanted)  # make_series' frame

    def render(subtypes):
        return make_series(head, subtypes, _own_streams(seed)[1], n=n, rows=size, cols=size,
                           thickness=5.0, confounders={}, lesion_rng=np.random.default_rng(lseed))

    return render((subtype,)), render(())


def test_subarachnoid_sites_and_coverage_are_drawn_without_moving_the_plan():
    """Convexity blood lies in sulci, the interhemispheric fissure or a Sylvian fissure in about the shares
    of ``SAH_SITES``, each lesion holding blood in a share of its reach; the draws that place it come from
    a generator of its own, so the plan's generator is left exactly where the old plan left it (its
    next draw is the same whatever the site)."""
    from ichscan.phantom import lesions

    rng = np.random.default_rng(3)
    head = an.sample_head(rng)
    fr = an.make_frame(rng, head, 36, 64, 64, 5.0)
    sites, after = Counter(), set()
    for s in range(600):
        r = np.random.default_rng(s)
        les = lesions.plan_lesion("subarachnoid", head, fr, r)
        sites[les.params["site"]] += 1
        lo, hi = (0.6, 1.0) if les.kind == "basal" else (0.35, 0.9)
        assert lo <= les.params["coverage"] <= hi
        # the plan took side, kind, density, extent, level and 1 (basal) or 4 (convexity) shape draws
        ref = np.random.default_rng(s)
        ref.choice([-1.0, 1.0]), ref.choice(["basal", "convexity"], p=[0.5, 0.5]), ref.uniform(55, 80)
        ref.uniform(0, 1), ref.uniform(0, 1)
        for _ in range(1 if les.kind == "basal" else 4):
            ref.uniform(0, 1)
        after.add(r.uniform() == ref.uniform())
    assert after == {True}
    conv = sites["sulcal"] + sites["interhemispheric"] + sites["sylvian"]
    assert 240 <= sites["basal"] <= 360 and conv == 600 - sites["basal"]
    for site, share in lesions.SAH_SITES.items():
        assert abs(sites[site] / conv - share) < 0.07, (site, sites[site] / conv)


def test_small_subarachnoid_blood_keeps_its_site_and_spans_few_slices(monkeypatch):
    """About half of all subarachnoid lesions are small, at every site: the same site, coverage and centre
    as the plan drew, 6-16 mm along z instead of 20-50, a convexity lesion over 10-25 degrees of half-arc;
    painted into a 5 mm series, a small lesion's blood lies on at most four slices and a wide one's reaches
    further. The extent is drawn last from the site's own generator, so the site test above holds as it was,
    and the same seed planned with every lesion wide and with every lesion small differs only in extent."""
    from ichscan.phantom import lesions

    rng = np.random.default_rng(3)
    head = an.sample_head(rng)
    fr = an.make_frame(rng, head, 36, 64, 64, 5.0)
    small = Counter()
    for s in range(400):
        les = lesions.plan_lesion("subarachnoid", head, fr, np.random.default_rng(s))
        small[les.params["extent"]] += 1
        if les.params["extent"] == "small":
            assert 3.0 <= les.z_half <= 8.0
            if les.params["site"] == "sulcal":
                assert np.rad2deg(les.params["phi_half"]) <= 25.0 + 1e-9
        else:
            assert les.z_half >= 10.0
    assert abs(small["small"] / 400 - lesions.SAH_SMALL) < 0.07, small

    for s in range(40):
        planned = {}
        for share in (0.0, 1.0):
            monkeypatch.setattr(lesions, "SAH_SMALL", share)
            planned[share] = lesions.plan_lesion("subarachnoid", head, fr, np.random.default_rng(s))
        wide, tiny = planned[0.0], planned[1.0]
        assert (tiny.kind, tiny.z, tiny.side, tiny.hu) == (wide.kind, wide.z, wide.side, wide.hu)
        assert {k: tiny.params[k] for k in ("site", "coverage", "patch_seed")} == \
            {k: wide.params[k] for k in ("site", "coverage", "patch_seed")}
        assert tiny.z_half < wide.z_half and (wide.params["extent"], tiny.params["extent"]) == ("wide", "small")
    monkeypatch.undo()

    spans = {}
    for extent in ("small", "wide"):
        ps, _ = _lesion_and_twin("subarachnoid", 12, lambda les, e=extent: les.params["site"] == "sulcal"
                                 and les.params["extent"] == e, 34, 160)
        spans[extent] = int(ps.masks["subarachnoid"].any(axis=(1, 2)).sum())
    assert 1 <= spans["small"] <= 4 < spans["wide"], spans


@pytest.mark.parametrize("site", ["sulcal", "interhemispheric", "sylvian", "basal"])
def test_subarachnoid_blood_is_patchy_and_fills_its_csf_as_partial_volume(site):
    """Against the lesion-free twin (same scan, same noise): the blood is denser than the CSF it replaces
    inside its mask; the grey matter bordering it gains density too (its share of CSF is blood now: no
    dark rim of CSF around the blood); nothing changes away from CSF; interhemispheric blood stays in the
    fissure, Sylvian blood on its side around the fissure."""
    from ichscan.phantom import lesions

    # head 12: each site's lesion holds 50 or more voxels there, enough to measure the grey rim around it
    ps, twin = _lesion_and_twin("subarachnoid", 12, lambda les: les.params["site"] == site
                                and les.params["extent"] == "wide", 34, 160)
    les = ps.lesions[0]
    assert les.params["site"] == site  # planned once: it found CSF to fill
    m = ps.masks["subarachnoid"]
    assert m.any() and np.isin(ps.tissue[m], (an.CSF,)).all()
    diff = ps.hu.astype(np.float32) - twin.hu.astype(np.float32)
    assert diff[m].mean() > 25  # blood (55-80 HU) over CSF (2-12 HU), blurred at its edges
    rim = np.zeros_like(m)
    for i in np.nonzero(m.any(axis=(1, 2)))[0]:
        rim[i] = ndimage.binary_dilation(m[i], iterations=1) & ~m[i]
    rim &= ps.tissue == an.GREY
    assert rim.sum() > 10 and diff[rim].mean() > 4, diff[rim].mean()
    far = ~_within_psf(np.isin(ps.tissue, (an.CSF,)), ps.frame.mm_spacing, PLANE)
    if site == "sulcal":  # blood widens its sulci, also some too thin to be mostly CSF anywhere
        assert np.mean(diff[far] != 0) < 1e-4
    else:  # float32 filtering leaves far voxels within 1e-3 HU, which rounding to whole HU flips at .5 now and then
        assert np.mean(diff[far] != 0) < 1e-5 and np.abs(diff[far]).max() <= 1
    X, Y = np.broadcast_to(ps.frame.X, m.shape), np.broadcast_to(ps.frame.Y, m.shape)
    if site == "interhemispheric":
        assert np.abs(X[m]).max() < lesions.SAH_FISSURE_MM
    if site == "sylvian":  # one side, out from the insula, around the fissure, at or below the widest level
        assert (np.sign(X[m]) == les.side).all() and np.abs(X[m]).min() > 0.3 * ps.head.a
        assert -0.35 * ps.head.b < Y[m].min() and Y[m].max() < 0.15 * ps.head.b
        assert les.z <= ps.head.widest + 2


@pytest.mark.parametrize("site", ["sulcal", "basal"])
def test_subarachnoid_patches_hold_their_coverage_of_the_reach(site):
    """The same lesion painted on the same anatomy with its patch field's coverage at 0.5 and at 0.999:
    the half-covered mask lies inside the fully covered one and holds about half of it (the field is
    smooth, so a lesion's few patches make the share vary; with the old painting it was all of it)."""
    import dataclasses

    from ichscan.phantom import lesions

    head, rng = _own_streams(14)
    fr = an.make_frame(rng, head, 34, 160, 160, 5.0)
    lseed = _lesion_seed("subarachnoid", head, fr,
                         lambda les: les.params["site"] == site and les.params["extent"] == "wide")
    les = lesions.plan_lesion("subarachnoid", head, fr, np.random.default_rng(lseed))
    distended = [dict(les.params, z=les.z, z_half=les.z_half)] if les.kind == "convexity" else None  # as drawn
    anat = an.build(head, fr, rng, distended=distended)

    def painted(coverage):
        a = dataclasses.replace(anat, hu=anat.hu.copy(), tissue=anat.tissue.copy())
        les_c = dataclasses.replace(les, params=dict(les.params, coverage=coverage))
        return lesions.paint_lesion(les_c, head, fr, a, np.random.default_rng(0))

    half, full = painted(0.5), painted(0.999)
    assert full.sum() > 100
    assert not (half & ~full).any()
    assert 0.3 <= half.sum() / full.sum() <= 0.7, half.sum() / full.sum()  # 0.40 sulcal, 0.52 basal here


def test_contusions_cluster_at_the_skull_base():
    """Traumatic contusions are where the brain meets the floors of the anterior and middle fossae: most
    clusters start below the widest level of the head, in the orbitofrontal cortex or a temporal pole, and
    many hold several foci; none pushes the midline."""
    from ichscan.phantom import lesions

    rng = np.random.default_rng(4)
    head = an.sample_head(rng)
    fr = an.make_frame(rng, head, 40, 64, 64, 5.0)
    cont = [les for les in (lesions.plan_lesion("intraparenchymal", head, fr, np.random.default_rng(s))
                            for s in range(400)) if les.kind == "contusion"]
    assert 80 <= len(cont) <= 160  # 30% of 400
    low = [les for les in cont if les.params["foci"][0][2] < head.widest - 10]
    assert len(low) / len(cont) >= 0.6
    temporal = [les for les in cont if les.params["site"] == "temporal_pole"]
    assert temporal and all(abs(les.params["foci"][0][0]) > 0.2 * head.a for les in temporal)
    assert all(les.params["foci"][0][2] < 20 for les in temporal)
    assert np.mean([len(les.params["foci"]) >= 3 for les in cont]) >= 0.4
    assert all(les.mass_effect(head) is None for les in cont)


def test_contusion_is_blood_in_brain_with_oedema_around_it():
    """Against its lesion-free twin (same scan, same noise), a contusion adds blood density inside its mask,
    only in grey and white matter, and lowers the brain around it (oedema)."""
    ps, twin = _lesion_and_twin("intraparenchymal", 5, lambda les: les.kind == "contusion", 30, 128)
    assert ps.lesions[0].kind == "contusion"
    m = ps.masks["intraparenchymal"]
    assert m.any()
    assert np.isin(ps.tissue[m], (an.GREY, an.WHITE)).all()
    diff = ps.hu.astype(np.float32) - twin.hu.astype(np.float32)
    assert diff[m].mean() > 15  # blood (52-82 HU) over brain (24-46 HU), blurred at its edges
    ring = np.zeros_like(m)
    for i in np.nonzero(m.any(axis=(1, 2)))[0]:
        ring[i] = ndimage.binary_dilation(m[i], iterations=3) & ~ndimage.binary_dilation(m[i], iterations=1)
    ring &= np.isin(ps.tissue, (an.GREY, an.WHITE))
    assert ring.sum() > 10 and diff[ring].mean() < -1.5, diff[ring].mean()  # oedema: darker than the twin


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_lesions_of_a_scan_of_the_vertex_stay_inside_the_cranium(subtype):
    """A scan that covers only the top of the head (above a lower-vault lesion's levels) still gets a
    lesion centre inside the cranium: an occipital epidural planned there once divided by the zero width
    of the cavity above the vertex."""
    from dataclasses import replace

    from ichscan.phantom import lesions

    rng = np.random.default_rng(11)
    head = an.sample_head(rng)
    fr = an.make_frame(rng, head, 10, 32, 32, 5.0)
    fr = replace(fr, z=np.linspace(head.top - 38, head.top + 7, 10).astype(np.float32))
    for seed in range(60):
        les = lesions.plan_lesion(subtype, head, fr, np.random.default_rng(seed))
        assert les.z <= head.top - lesions.VERTEX_CLEARANCE + 1e-6, (seed, les.z, head.top)
        assert float(an.cranial_scale(head, np.float32(les.z))) > 0


def test_trivial_feature_does_not_solve_the_task():
    """Count of voxels 50-90 HU inside the skull, per series: must not separate `any` (AUC <= 0.85)."""
    plans = plan_dataset(40, 21, size=64, slices=(32, 40))
    feature, label = [], []
    for plan in plans:
        ps = render_series(plan)
        v = ps.hu[ps.depth > 0]
        feature.append(int(((v >= 50) & (v <= 90)).sum()))
        label.append(ps.series_labels()["any"])
    assert 10 <= sum(label) <= 30
    auc = roc_auc_score(label, feature)
    assert auc <= 0.85, auc


def test_cli_series_layout(tmp_path, capsys):
    from ichscan.cli import main

    out = tmp_path / "tree"
    assert main(["phantom", "--out", str(out), "--studies", "2", "--seed", "1", "--size", "48",
                 "--slices", "4-5", "--layout", "series", "--prevalence", "any=1"]) == 0
    assert "slices" in capsys.readouterr().out
    scan = find_series(out)
    assert len(scan.series) == 2
    assert {Path(k.path).name for k in scan.skipped} == {"labels.csv", "series_labels.csv", "manifest.json"}
    for series in scan.series:
        folder = Path(series.slices[0].path).parent
        assert folder.name == series.series_uid and folder.parent.name == series.study_uid
        assert folder.parent.parent.name == series.patient_id
    with open(out / "series_labels.csv") as f:
        assert any(r["any"] == "1" for r in csv.DictReader(f))
    assert (out / "manifest.json").exists() and (out / "labels.csv").exists()


def test_soft_ellipse_matches_the_direct_formula():
    from ichscan.phantom.geometry import ellipse, ellipse_distance, ramp

    y, x = np.mgrid[-60:60:97j, -60:60:97j].astype(np.float32)
    X, Y = x[None], y[None]
    a = np.array([0.0, 8.0, 20.0], np.float32)[:, None, None]
    for Xg in (X, X + np.linspace(-8, 8, 3, dtype=np.float32)[:, None, None]):  # plain and warped grids
        got = ellipse(Xg, Y, 12.0, -5.0, a, a * 1.5, 1.2, angle=0.3)
        want = ramp(ellipse_distance(Xg, Y, 12.0, -5.0, a, a * 1.5, 0.3), 1.2)
        want[0] = 0.0  # an ellipse of size 0 is absent, not a dot
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=1e-6)


def test_lesion_free_twins_differ_only_by_the_bleed():
    """A twin is the same scan without its lesions: outside the lesions and what they push or swell, the
    HU are identical, and the twin is another study of the same patient with labels all 0."""
    plans = plan_dataset(10, 3, size=64, slices=(16, 18), twins=1.0, prevalence="any=0.9")
    twins = [p for p in plans if p.twin_of is not None]
    assert len(twins) >= 3 and len(plans) == 10
    for t in twins[:2]:
        src = plans[t.twin_of]
        assert src.subtypes and not t.subtypes
        assert t.patient_id == src.patient_id and t.study_uid != src.study_uid
        assert not set(t.image_ids) & set(src.image_ids)
        a, b = render_series(src), render_series(t)
        assert b.series_labels()["any"] == 0 and a.series_labels()["any"] == 1
        blood = np.zeros(a.hu.shape, bool)
        for m in a.masks.values():
            blood |= m
        same = a.hu == b.hu
        assert not same[blood].all()
        assert same.mean() > 0.95  # mass effect, oedema and widened sulci are all that differ besides
    assert all(p.twin_of is None for p in plan_dataset(10, 3, size=64, slices=(16, 18)))
    for seed in range(6):  # twins count towards the studies asked, second studies included
        assert len(plan_dataset(3, seed, size=32, slices=(4, 4), twins=1.0, prevalence="any=1")) == 3


def test_subcalvarial_brightening_is_exponential_inside_the_table_and_widens_towards_the_vertex():
    """amplitude x exp(-depth / reach) inside the inner table only, with the reach 1.8x as long on the
    inner table's vertex slice as at and below the head's widest level (the vault cut obliquely)."""
    from ichscan.phantom import artifacts

    rng = np.random.default_rng(4)
    head = an.sample_head(rng)
    fr = an.make_frame(rng, head, 40, 96, 96, 5.0)
    anat = an.build(head, fr, rng)
    rise = artifacts.vertex_rise(head, fr)
    assert rise[fr.z <= head.widest].max() == 0 and rise[fr.z >= head.top].min() == 1
    assert np.all(np.diff(rise) >= 0)
    hu0 = anat.hu.copy()
    artifacts.subcalvarial_brightening(anat.hu, anat, 20.0, 3.0, rise=rise)
    added = anat.hu - hu0
    assert (added[anat.depth <= 0] == 0).all()  # nothing outside the cranial cavity
    for i in (int(np.argmin(np.abs(fr.z - head.widest + 10))), int(np.argmax(np.where(rise < 1, rise, -1)))):
        reach = 3.0 * (1 + 0.8 * rise[i])
        near = (anat.depth[i] > 0) & (anat.depth[i] < 4 * reach)
        assert near.any() and np.allclose(added[i][near], 20.0 * np.exp(-anat.depth[i][near] / reach), atol=1e-3)
        assert (added[i][anat.depth[i] >= 4 * reach] == 0).all()
    # Without ``rise`` the band is as wide on every slice.
    plain = an.build(head, fr, np.random.default_rng(5))
    h1 = plain.hu.copy()
    artifacts.subcalvarial_brightening(plain.hu, plain, 20.0, 3.0)
    d = plain.depth[(plain.depth > 0) & (plain.depth < 12)]
    assert np.allclose((plain.hu - h1)[(plain.depth > 0) & (plain.depth < 12)], 20.0 * np.exp(-d / 3.0), atol=1e-3)


def test_holder_and_scalp_haematoma_stay_outside_the_cranium():
    """The head rest is painted only into air, at its plastic's HU; a scalp haematoma only outside the
    skull, so neither can be mistaken for (or counted as) intracranial blood."""
    from ichscan.phantom import artifacts

    rng = np.random.default_rng(4)
    head = an.sample_head(rng)
    fr = an.make_frame(rng, head, 24, 96, 96, 5.0)
    anat = an.build(head, fr, rng)
    hu0, tissue0 = anat.hu.copy(), anat.tissue.copy()
    drawn = artifacts.scalp_haematoma(anat.hu, anat.tissue, anat.depth, head, fr, np.random.default_rng(1))
    changed = anat.hu != hu0
    assert changed.any()
    assert (anat.depth[changed] < -head.skull).all()  # beyond the inner table by a skull's thickness
    assert np.allclose(anat.hu[changed], drawn["hu"], atol=0.5)  # (recorded rounded) the swelling's density, raised to, never lowered
    hu1 = anat.hu.copy()
    arcs = artifacts.head_holder(anat.hu, anat.tissue, head, fr, np.random.default_rng(2))["arcs"]
    changed = anat.hu != hu1
    assert changed.any() and (hu1[changed] <= -900).all()  # drawn into air only
    assert anat.hu[changed].max() <= max(a["hu"] for a in arcs) + 1e-3
    assert (tissue0[changed] == an.AIR).all()


CALCIFIED = ("pineal", "choroid", "falx", "basal_ganglia")


def test_calcification_adds_adult_calcifications_and_changes_nothing_else():
    import dataclasses

    kw = dict(size=64, slices=(8, 10), prevalence="any=0.9", twins=1.0)
    plans, plain = plan_dataset(400, 6, calcification=0.75, **kw), plan_dataset(400, 6, **kw)
    assert [dataclasses.replace(p, confounders={}) for p in plans] == [dataclasses.replace(p, confounders={})
                                                                        for p in plain]
    for p, q in zip(plans, plain):  # the confounders a series had stay; calcifications are added
        assert {k: v for k, v in p.confounders.items() if k not in CALCIFIED} == \
               {k: v for k, v in q.confounders.items() if k not in CALCIFIED}
        assert set(q.confounders) <= set(p.confounders)
        assert all(120 <= p.confounders[k] <= 700 for k in ("pineal", "choroid") if k in p.confounders
                   and k not in q.confounders)

    def share(ps, name):
        return float(np.mean([name in p.confounders for p in ps]))

    # adult rates: 0.75 of heads x 0.85 have a calcified choroid plexus, x 0.8 a calcified pineal (0.64, 0.60),
    # besides the few the confounders draw; without the option they stay few
    assert 0.6 <= share(plans, "choroid") <= 0.8 and 0.55 <= share(plans, "pineal") <= 0.8
    assert share(plain, "choroid") < 0.2 and share(plain, "pineal") < 0.25
    twins = [p for p in plans if p.twin_of is not None]
    assert twins and all(t.confounders == plans[t.twin_of].confounders for t in twins)
    with pytest.raises(IchscanError, match="calcification 1.5"):
        plan_dataset(2, 6, size=64, slices=(8, 10), calcification=1.5)


def test_calcification_draws_dense_foci_on_the_same_head(tmp_path):
    """A series drawn with and without --calcification: the same head, noise and artifacts, and the images
    differ only next to the calcified voxels, which are dense (blurred and partial-volumed, well over 100 HU)."""
    plans = plan_dataset(12, 3, size=128, slices=(24, 24), calcification=1.0)
    plain = plan_dataset(12, 3, size=128, slices=(24, 24))
    p, q = next((p, q) for p, q in zip(plans, plain) if "pineal" in p.confounders and not q.confounders)
    a, b = render_series(p), render_series(q)
    calcium = a.tissue == an.CALCIUM
    assert calcium.sum() > 20 and not (b.tissue == an.CALCIUM).any()
    assert np.median(a.hu[calcium]) > 150
    differs = a.hu != b.hu
    assert differs.any() and not (differs & ~_within_psf(calcium, a.frame.mm_spacing)).any()
    generate_dataset(tmp_path / "set", 2, seed=3, size=64, slices=(8, 8), calcification=0.5)
    manifest = (tmp_path / "set" / "manifest.json").read_text()
    assert '"calcification": 0.5' in manifest


def test_fractures_are_drawn_apart_from_the_bleed_and_change_nothing_else():
    """--fractures: a share of series, bleeding or not alike, gets a fracture; every other draw of the set
    stays as it was, and a twin keeps its source's."""
    import dataclasses

    kw = dict(size=64, slices=(8, 10), prevalence="any=0.6", twins=0.5)
    plans, plain = plan_dataset(600, 9, fractures=0.3, **kw), plan_dataset(600, 9, **kw)
    assert [dataclasses.replace(p, confounders={}) for p in plans] == [dataclasses.replace(p, confounders={})
                                                                        for p in plain]
    for p, q in zip(plans, plain):
        assert {k: v for k, v in p.confounders.items() if k != "fracture"} == q.confounders
    sources = [p for p in plans if p.twin_of is None]
    broken = np.array(["fracture" in p.confounders for p in sources])
    bleeding = np.array([bool(p.subtypes) for p in sources])
    assert 0.25 <= broken.mean() <= 0.35
    # independent of the bleed: as common without blood as with it (a fracture says nothing of the label)
    assert abs(broken[bleeding].mean() - broken[~bleeding].mean()) < 0.1
    twins = [p for p in plans if p.twin_of is not None]
    assert twins and all(t.confounders == plans[t.twin_of].confounders for t in twins)
    assert not any("fracture" in p.confounders for p in plain)
    with pytest.raises(IchscanError, match="fractures 1.5"):
        plan_dataset(2, 6, size=64, slices=(8, 10), fractures=1.5)


def test_skull_fracture_breaks_the_vault_and_leaves_the_blood_alone():
    """A fracture's gap is drawn in bone at the fill density; a depressed piece puts bone inside the inner
    table; nothing changes deeper than the piece or the air reaches, and no voxel of ``keep`` changes."""
    from ichscan.phantom import artifacts

    head, rng = _own_streams(4)
    fr = an.make_frame(rng, head, 24, 160, 160, 5.0)  # 1.3-1.6 mm pixels: a 2 mm gap holds whole ones
    anat = an.build(head, fr, rng)
    spec = dict(artifacts.draw_fracture(np.random.default_rng(0)), height=0.5, z_half=20.0, depressed_mm=4.0,
                segment=0.15, width=2.0, swelling_mm=8.0, air=3, fill_hu=30.0)
    keep = np.zeros(anat.hu.shape, bool)
    keep[:, 75:85, :] = True  # a band of "blood" across every slice
    hu0, tissue0 = anat.hu.copy(), anat.tissue.copy()
    drawn = artifacts.skull_fracture(anat.hu, anat.tissue, anat.depth, head, fr, spec, keep=keep)
    changed = anat.hu != hu0
    assert drawn["slices"] and changed.any()
    assert not changed[keep].any()
    assert (anat.depth[changed] < 8.5).all()  # the piece reaches 4 + 1 mm in; a bubble's centre 6, its radius 2.5
    gap = changed & (tissue0 == an.BONE) & (anat.hu == 30.0)
    # bone turned to the fill density along the lines (fewer whole pixels of it since the temporal squama is
    # 1.2-3 mm: 17 where the base-thickened squama gave more than 20)
    assert gap.sum() > 10
    inside = changed & (anat.depth > 0.5) & (anat.hu > 300)
    assert inside.sum() > 5  # the depressed piece: bone where brain was
    # swelling (or the skin that the depressed piece brings in from further out), not air or fat
    assert (anat.hu[changed & (anat.depth < -head.skull * 1.2) & (hu0 < 20)] >= 20.0).all()
    air = changed & (anat.hu <= -700) & (anat.depth > 0)
    assert air.any() and (anat.tissue[air] == an.AIR).all()  # pneumocephalus just inside the table


def test_fractures_leave_labels_and_blood_as_they_were(tmp_path):
    """A head with extra-axial bleeds drawn with and without a wide, depressed fracture, at eight places
    around the head: the masks (labels) and every blood voxel's HU are the same (compared before the
    scanner's blur and noise), although the same fracture drawn without protecting the blood would have
    changed some of it. --fractures is recorded in the manifest."""
    from ichscan.phantom import artifacts
    from ichscan.phantom.series import _draw_head

    head = an.sample_head(np.random.default_rng(11))
    base = dict(artifacts.draw_fracture(np.random.default_rng(0)), height=0.6, z_half=35.0, depressed_mm=6.0,
                segment=0.2, width=3.0, swelling_mm=10.0, air=5)

    def draw(confounders):
        rng = np.random.default_rng(5)
        fr = an.make_frame(rng, head, 20, 96, 96, 5.0)
        anat, masks, _, _ = _draw_head(head, ("epidural", "subdural"), rng, np.random.default_rng(6), fr, fr,
                                       confounders)
        return anat, masks, fr

    plain, masks0, fr = draw({})
    blood = np.logical_or.reduce([masks0[s] for s in SUBTYPES])
    assert blood.sum() > 100
    unprotected = False
    for phi in np.linspace(-np.pi, np.pi, 8, endpoint=False):
        spec = dict(base, phi=float(phi))
        anat, masks, _ = draw({"fracture": spec})
        assert all(np.array_equal(masks[s], masks0[s]) for s in SUBTYPES)
        assert (anat.hu != plain.hu).any()
        assert np.array_equal(anat.hu[blood], plain.hu[blood])
        bare = plain.hu.copy()
        artifacts.skull_fracture(bare, plain.tissue.copy(), plain.depth, head, fr, spec)  # no keep
        unprotected |= bool((bare[blood] != plain.hu[blood]).any())
    assert unprotected
    generate_dataset(tmp_path / "set", 2, seed=3, size=64, slices=(8, 8), fractures=0.5)
    assert '"fractures": 0.5' in (tmp_path / "set" / "manifest.json").read_text()


def test_injury_is_planned_for_bleeding_series_only_and_changes_nothing_else():
    """--injury: a share of the bleeding series (never a clean one) gets the signs of a blow, planned from
    their own stream, so every other draw of the set stays as it was; a twin keeps its source's blow."""
    kw = dict(size=64, slices=(8, 10), prevalence="any=0.6", twins=0.5)
    plans, plain = plan_dataset(600, 9, injury=0.7, **kw), plan_dataset(600, 9, **kw)
    assert [dataclasses.replace(p, confounders={}) for p in plans] == [dataclasses.replace(p, confounders={})
                                                                        for p in plain]
    for p, q in zip(plans, plain):
        assert {k: v for k, v in p.confounders.items() if k != "injury"} == q.confounders
    sources = [p for p in plans if p.twin_of is None]
    struck = np.array(["injury" in p.confounders for p in sources])
    bleeding = np.array([bool(p.subtypes) for p in sources])
    assert not struck[~bleeding].any()
    assert 0.62 <= struck[bleeding].mean() <= 0.78
    for p in sources:
        if "injury" in p.confounders:
            spec = p.confounders["injury"]
            assert spec["subtypes"] == list(p.subtypes) and spec["lesion_stream"] == [9, 3, p.index]
    twins = [p for p in plans if p.twin_of is not None]
    assert twins and all(t.confounders == plans[t.twin_of].confounders for t in twins)
    with pytest.raises(IchscanError, match="injury 1.5"):
        plan_dataset(2, 6, size=64, slices=(8, 10), injury=1.5)


def _struck(subtypes, coup_seed, twin=False, spec_seed=None):
    """A head drawn as a phantom set draws series 0 of seed 5 (before the scanner), with ``subtypes`` and
    the signs of a blow drawn from ``coup_seed`` (none for None); ``twin`` draws it lesion-free."""
    from ichscan.phantom.series import _draw_head

    head, rng = _own_streams(5)
    fr = an.make_frame(rng, head, 24, 128, 128, 5.0)
    spec = None if coup_seed is None else {"subtypes": list(subtypes), "lesion_stream": [5, 3, 0], "seed": coup_seed}
    anat, masks, planned, drawn = _draw_head(head, () if twin else subtypes, rng, np.random.default_rng([5, 3, 0]),
                                             fr, fr, {} if spec is None else {"injury": spec})
    return head, fr, anat, masks, planned, drawn


@pytest.mark.parametrize("subtype", ["subdural", "epidural"])
def test_injury_lands_over_the_bleed_or_across_the_head_and_the_twin_shows_the_same_blow(subtype):
    """The blow's swelling lies over the bleed (coup) or across the head from it (contrecoup), as its record
    says; it adds scalp and breaks bone only outside the cranial cavity's blood, leaving masks and blood HU
    as they were; and the lesion-free twin shows the very same swelling and fracture."""
    from ichscan.phantom.geometry import wrap_angle

    head, fr, plain, masks0, planned, _ = _struck((subtype,), None)
    les = planned[0]
    blood = masks0[subtype]
    assert blood.sum() > 50
    phi = np.arctan2(fr.X[0], -fr.Y[0])
    twin_plain = _struck((subtype,), None, twin=True)[2]
    seen = set()
    for seed in range(12):
        _, _, anat, masks, _, drawn = _struck((subtype,), seed)
        inj = drawn["injury"]
        assert inj["anchor"] == subtype
        assert all(np.array_equal(masks[s], masks0[s]) for s in SUBTYPES)
        assert np.array_equal(anat.hu[blood], plain.hu[blood])
        changed = anat.hu != plain.hu
        assert changed.any() and (anat.depth[changed] < 8.5).all()  # outside, or a depressed piece's reach
        scalp = changed & (anat.depth < -head.skull * 1.2) & (plain.hu < 20) & (anat.hu >= 40)  # air turned scalp
        if "swelling" in inj:
            assert scalp.sum() > 30
            centre = np.angle(np.exp(1j * phi[np.nonzero(scalp)[1:]]).mean())
            expected = les.params["phi"] + (0.0 if inj["coup"] else np.pi)
            assert abs(wrap_angle(centre - expected)) < 0.9, (seed, inj)
        # everything the blow changed outside the cavity lies around its own angle: the swelling's reach
        # (0.8 rad at most) or the fracture line's drift across its slices (0.6 mm per mm, 35 mm up or down)
        outside = np.nonzero(changed & (anat.depth < 0))
        assert abs(wrap_angle(phi[outside[1:]] - inj["phi"])).max() < 1.3, (seed, inj)
        if "fracture" in inj:
            assert inj["fracture"]["slices"] and inj["fracture"]["swelling_mm"] == 0.0
            assert inj["fracture"]["phi"] == inj["phi"]
            broken = changed & (plain.tissue == an.BONE) & (anat.hu < plain.hu - 200)
            assert broken.any()  # the lucent line: bone turned to soft tissue's density
        seen.add((inj["coup"], "fracture" in inj))
        _, _, twin, twin_masks, _, twin_drawn = _struck((subtype,), seed, twin=True)
        assert not any(m.any() for m in twin_masks.values())
        assert twin_drawn["injury"] == inj
        # the same voxels, so the same blow; apart only where the source differs from its twin anyway (its
        # blood, its mass effect, an epidural's own fracture and swelling), where the twin's piece or air
        # may reach and the source's may not
        own = plain.hu != twin_plain.hu
        assert np.array_equal((twin.hu != twin_plain.hu) & ~own, changed & ~own)
        assert (changed & ~own).any()
    # each way of showing a blow occurs: coup, and for a subdural contrecoup; with and without a fracture
    assert (True, True) in seen and (True, False) in seen
    assert (subtype == "epidural") == (not any(not c for c, _ in seen))


def test_injury_needs_a_traumatic_bleed():
    """A hypertensive bleed of the basal ganglia or blood only in the basal cisterns is not a blow's: the
    series records no anchor and its head is drawn as without the option; a convexity contusion is."""
    from ichscan.phantom import lesions

    les = lesions.Lesion("intraparenchymal", "basal_ganglia", 30.0, 8.0, 70.0, 1.0, {"x": 20.0, "y": 0.0})
    assert lesions.impact(les) is None
    assert lesions.impact(lesions.Lesion("subarachnoid", "basal", 20.0, 10.0, 70.0, 1.0, {"site": "basal"})) is None
    contusion = lesions.Lesion("intraparenchymal", "contusion", 40.0, 6.0, 70.0, -1.0,
                               {"site": "convexity", "foci": [[-50.0, 0.0, 41.0, 5.0, 5.0, 0.2]]})
    phi, z, coup = lesions.impact(contusion)
    assert phi == pytest.approx(-np.pi / 2) and z == 41.0 and coup == lesions.COUP["convexity_contusion"]
    from ichscan.phantom.series import draw_injury

    head, fr, anat, _, _, _ = _struck(("intraventricular",), None)
    before = anat.hu.copy()
    spec = {"subtypes": ["intraventricular"], "lesion_stream": [5, 3, 0], "seed": 3}
    assert draw_injury(spec, head, fr, fr, anat) == {"anchor": None}
    assert np.array_equal(anat.hu, before)


def test_export_round_trip_keeps_the_brain_window_and_coarsens_the_rest():
    """Values a reader can check: inside the brain window HU come back to within a grey level (120/255 =
    0.47 HU) on flat regions; air floors at the bone window's lower edge (700 - 3200/2 = -900 HU); bone
    comes back to within a bone-window grey level (12.5 HU) plus JPEG error."""
    from ichscan.phantom.export import Export, export_series

    e = Export(brain=(40.0, 120.0), bone=(700.0, 3200.0), quality=90, pixel_mm=0.35)
    hu = np.full((1, 128, 128), -1000.0, np.float32)
    hu[0, 16:112, 16:112] = 1000.0  # skull
    hu[0, 28:100, 28:100] = 30.0  # brain
    hu[0, 52:76, 52:76] = 70.0  # blood
    out = export_series(hu, 0.9, e, (-1024, 3071))[0]
    assert out.dtype == np.float32 and np.array_equal(out, np.rint(out))
    assert abs(out[40, 40] - 30) <= 0.5 and abs(out[64, 64] - 70) <= 0.5
    assert out[4, 4] == -900.0  # air: below the brain window, rebuilt from the bone window's floor
    assert abs(out[20, 64] - 1000) <= 13
    # The export is lossy where the image changes: the brain-blood edge is smoothed by the resampling.
    assert 30 < out[64, 52] < 70 or 30 < out[64, 51] < 70
    # Quantisation: the grey levels of a brain-window ramp come back at about 120/255 HU apart.
    ramp = np.tile(np.linspace(-10, 90, 128, dtype=np.float32), (128, 1))[None]
    back = export_series(ramp, 0.35, Export((40.0, 120.0), (700.0, 3200.0), 95, 0.35), (-1024, 3071))[0]
    assert np.abs(back[64, 8:120] - ramp[0, 64, 8:120]).max() <= 1.0


def test_export_stores_a_share_of_series_and_changes_nothing_else(tmp_path):
    import dataclasses

    kw = dict(size=64, slices=(8, 10), prevalence="any=0.9", twins=1.0)
    plans, plain = plan_dataset(200, 6, export=0.5, **kw), plan_dataset(200, 6, **kw)
    assert [dataclasses.replace(p, export=None) for p in plans] == plain
    share = np.mean([p.export is not None for p in plans if p.twin_of is None])
    assert 0.35 <= share <= 0.65
    for p in plans:
        if p.export is not None:
            assert 35 <= p.export.brain[0] <= 45 and 80 <= p.export.brain[1] <= 160
            assert 70 <= p.export.quality <= 95 and 0.3 <= p.export.pixel_mm <= 0.5
    twins = [p for p in plans if p.twin_of is not None]
    assert twins and all(t.export == plans[t.twin_of].export for t in twins)  # stored as its source was
    # The same scan exported: its labels and masks are the plain one's; its pixels are not.
    p, q = next((p, q) for p, q in zip(plans, plain) if p.export is not None and p.subtypes)
    a, b = render_series(p), render_series(q)
    assert all(np.array_equal(a.masks[s], b.masks[s]) for s in SUBTYPES)
    assert a.series_labels() == b.series_labels() and not np.array_equal(a.hu, b.hu)
    floor = p.export.bone[0] - p.export.bone[1] / 2  # air comes back no darker than the bone window's floor
    assert a.hu[b.hu < -950].min() >= max(floor, -1024) - 0.5
    with pytest.raises(IchscanError, match="export 2"):
        plan_dataset(2, 6, size=64, slices=(8, 10), export=2)
    generate_dataset(tmp_path / "set", 3, seed=3, size=64, slices=(8, 8), export=1.0)
    manifest = (tmp_path / "set" / "manifest.json").read_text()
    assert '"export": 1.0' in manifest and '"quality":' in manifest
    # Read back through ichscan.dicom, the files hold exactly the exported HU.
    plan = plan_dataset(3, 3, size=64, slices=(8, 8), export=1.0)[0]
    series = next(s for s in find_series(tmp_path / "set").series if s.series_uid == plan.series_uid)
    assert np.array_equal(series.volume(), render_series(plan).hu)


@pytest.mark.parametrize("flag, bad, drawn", [
    ("--export", "1.5", lambda s: set(s["export"]) == {"brain", "bone", "quality", "pixel_mm"}),
    ("--fractures", "-0.1", lambda s: "fracture" in s["confounders"]),
    ("--children", "2", lambda s: s["head"]["age"] < 18 and s["head"]["scale"] < 1),
    ("--injury", "1.01", lambda s: ("injury" in s["confounders"]) == bool(s["subtypes_planned"])),
])
def test_cli_share_option_is_recorded_and_refused_out_of_range(tmp_path, capsys, flag, bad, drawn):
    import json

    from ichscan.cli import main

    out = tmp_path / "set"
    assert main(["phantom", "--out", str(out), "--studies", "3", "--seed", "1", "--size", "48",
                 "--slices", "4-5", flag, "1"]) == 0
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["arguments"][flag[2:]] == 1.0
    assert all(drawn(s) for s in doc["series"])
    capsys.readouterr()
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--studies", "2", "--seed", "1", flag, bad]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag[2:]} {bad}" in err[0]


def test_randomize_outside_changes_only_what_lies_beyond_the_inner_table(tmp_path):
    import dataclasses
    import json

    kw = dict(size=96, slices=(10, 12), prevalence="any=0.9", twins=1.0)
    plans, plain = plan_dataset(60, 6, randomize_outside=0.5, **kw), plan_dataset(60, 6, **kw)
    assert [dataclasses.replace(p, outside=None) for p in plans] == plain
    assert 0.25 <= np.mean([p.outside is not None for p in plans if p.twin_of is None]) <= 0.75
    twins = [p for p in plans if p.twin_of is not None]
    assert twins and all(t.outside == plans[t.twin_of].outside for t in twins)
    p, q = next((p, q) for p, q in zip(plans, plain) if p.outside is not None and p.subtypes)
    o = p.outside
    assert 1.5 <= o.margin_mm <= 4 and -1000 <= o.low <= o.high <= 2000 and 2 <= o.grain_mm <= 25
    a, b = render_series(p), render_series(q)
    inside = a.depth >= 0
    assert np.array_equal(a.hu[inside], b.hu[inside])  # the cranial contents, blood included, untouched
    assert all(np.array_equal(a.masks[s], b.masks[s]) for s in SUBTYPES)
    away = a.depth < -o.margin_mm
    assert (a.hu[away] != b.hu[away]).mean() > 0.9
    # The new texture spans the drawn range (white noise of noise_hu on top), whatever the head had there.
    assert o.low - 6 * o.noise_hu <= np.median(a.hu[away]) <= o.high + 6 * o.noise_hu
    # A twin's outside is its source's texture: outside the blood's reach the two are the same scan.
    t = next(t for t in twins if t.outside is not None)
    src, twin = render_series(plans[t.twin_of]), render_series(t)
    far = src.depth < -t.outside.margin_mm
    assert np.array_equal(src.hu[far], twin.hu[far])
    with pytest.raises(IchscanError, match="randomize-outside 1.5"):
        plan_dataset(2, 6, size=64, slices=(8, 10), randomize_outside=1.5)
    generate_dataset(tmp_path / "set", 2, seed=3, size=64, slices=(8, 8), randomize_outside=1.0)
    doc = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert doc["arguments"]["randomize_outside"] == 1.0
    assert all("randomized_outside" in s for s in doc["series"])


def test_outside_margin_keeps_skull_and_scalp_and_randomizes_beyond(tmp_path, capsys):
    import dataclasses
    import json

    kw = dict(size=96, slices=(10, 12), prevalence="any=0.9,epidural=0.9", twins=0.5, randomize_outside=0.5)
    near, wide = plan_dataset(40, 6, **kw), plan_dataset(40, 6, outside_margin="25-40", **kw)
    # Only the kept margin differs: which series are randomised, and their textures, are drawn as before.
    assert [dataclasses.replace(p, outside=None) for p in wide] == [dataclasses.replace(p, outside=None) for p in near]
    pairs = [(p, q) for p, q in zip(wide, near) if p.outside is not None]
    assert pairs and all(q.outside is not None for _, q in pairs)
    assert all(25 <= p.outside.margin_mm <= 40 and dataclasses.replace(p.outside, margin_mm=0)
               == dataclasses.replace(q.outside, margin_mm=0) for p, q in pairs)
    p = next(p for p, _ in pairs if p.subtypes)
    plain = render_series(dataclasses.replace(p, outside=None))
    a = render_series(p)
    m = p.outside.margin_mm
    # The skull (5-7.5 mm, thicker at the base) and scalp (4-7 mm) lie within 25 mm of the inner table on the
    # slices that have a cranial cavity: kept to the HU, as is everything inside.
    kept = a.depth >= -m
    assert np.array_equal(a.hu[kept], plain.hu[kept])
    vault = (a.depth < -1) & (a.depth > -12) & (plain.hu > 300)
    assert vault.sum() > 100 and np.array_equal(a.hu[vault], plain.hu[vault])  # bone there, unchanged
    away = a.depth < -m
    assert away.any() and (a.hu[away] != plain.hu[away]).mean() > 0.9
    with pytest.raises(IchscanError, match="outside-margin 25-40 mm applies only with --randomize-outside"):
        plan_dataset(2, 6, size=64, slices=(8, 10), outside_margin="25-40")
    with pytest.raises(IchscanError, match="outside-margin 40-25 mm"):
        plan_dataset(2, 6, size=64, slices=(8, 10), randomize_outside=1.0, outside_margin=(40, 25))
    # Recorded in the manifest (only when not the default, so earlier sets still resume) and refused when
    # the folder's set was made with another margin.
    out = tmp_path / "set"
    generate_dataset(out, 2, seed=3, size=64, slices=(8, 8), randomize_outside=1.0, outside_margin=30)
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["arguments"]["outside_margin"] == [30.0, 30.0]
    assert all(s["randomized_outside"]["margin_mm"] == 30.0 for s in doc["series"])
    with pytest.raises(IchscanError, match="outside_margin"):
        generate_dataset(out, 2, seed=3, size=64, slices=(8, 8), randomize_outside=1.0)
    from ichscan.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse's own one-line usage error
        main(["phantom", "--out", str(tmp_path / "bad"), "--studies", "2", "--seed", "1",
              "--randomize-outside", "1", "--outside-margin", "abc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert "outside-margin 'abc'" in err[-1]


RAY_MM = 0.25  # step along the rays below


def _level(head, z: float) -> np.ndarray:
    """One 200 mm slice of ``head`` at level ``z`` (0.5 mm pixels, upright and centred), before the scanner."""
    fr = an.Frame(rows=400, cols=400, spacing=0.5, thickness=1.0, z=np.array([z], np.float32), angle=0.0,
                  shift=(0.0, 0.0))
    return an.build(head, fr, np.random.default_rng(0)).hu[0]


def _ray(hu: np.ndarray, angle: float) -> np.ndarray:
    """HU from the slice's centre outward every ``RAY_MM``, at ``angle`` radians from the front towards the
    patient's left (as the phantom's angles run); ``hu`` as ``_level`` makes it."""
    from scipy.ndimage import map_coordinates

    r = np.arange(0, 100, RAY_MM) / 0.5
    c = (hu.shape[0] - 1) / 2
    return map_coordinates(hu, [c - r * np.cos(angle), c + r * np.sin(angle)], order=1)


def _outer_bone(ray: np.ndarray) -> tuple[int, int]:
    """Indices of the first and last sample of the outermost run of bone (> 300 HU) along ``ray``."""
    outer = inner = int(np.nonzero(ray > 300)[0].max())
    while inner > 0 and ray[inner - 1] > 300:
        inner -= 1
    return inner, outer


def _scalp_profile(ray: np.ndarray) -> tuple[float, float]:
    """The scalp along ``ray``: thickness (mm, from the outer table to air, < -500 HU) and median HU."""
    start = _outer_bone(ray)[1] + 1
    air = start + np.nonzero(ray[start:] < -500)[0][0]
    return (air - start) * RAY_MM, float(np.median(ray[start:air]))


def _bone_mm(hu: np.ndarray, angles_deg) -> float:
    """The vault's thickness (mm): the outermost run of bone along rays at ``angles_deg`` (0 the front, 90
    the side), the median over them, so that a suture or a rough patch on one ray does not decide it."""
    widths = [np.subtract(*_outer_bone(_ray(hu, np.deg2rad(a)))[::-1]) + 1 for a in angles_deg]
    return float(np.median(widths)) * RAY_MM


def test_scalp_is_fat_under_the_skin_and_thicker_over_the_temporal_fossae():
    """Real heads (the CT-ICH and GE heads of bench/realism.py's sources) read -40..-80 HU a few mm out
    from the outer table (subcutaneous fat), and their scalp is some 8-11 mm thick on the sides at the
    temporal levels, where the temporalis lies, against 5-8 mm over the forehead."""
    import dataclasses

    base = dataclasses.replace(an.sample_head(np.random.default_rng(5)), scalp=6.0)
    got, side_rays = {}, {}
    for name, fat, temporalis in (("fatty", 0.8, 5.0), ("lean", 0.0, 0.0)):
        hu = _level(dataclasses.replace(base, scalp_fat=fat, temporalis=temporalis), base.widest + 5.0)
        side_rays[name] = _ray(hu, np.pi / 2)
        got[name] = {"front": _scalp_profile(_ray(hu, 0.0)), "side": _scalp_profile(side_rays[name])}
    front_mm, front_hu = got["fatty"]["front"]
    side_mm = got["fatty"]["side"][0]
    assert 5.0 <= front_mm <= 7.5  # the scalp's 6 mm, give or take the partial-volume ramp
    assert -80 <= front_hu <= -20  # fat and septa: 80% of -110..-70 HU over skin of 30-50
    assert side_mm - front_mm == pytest.approx(5.0, abs=1.5)  # the temporalis on this level, all of it
    # muscle on the bone, fat over it, then the skin (``skin_mm``); since the skin is 1.6-2.8 mm, not 1.2, the
    # median across the whole scalp is no longer fat's, so read its layers
    side = side_rays["fatty"]
    start = _outer_bone(side)[1] + 1
    layers = side[start:start + np.nonzero(side[start:] < -500)[0][0]]
    assert np.median(layers[:int(3.0 / RAY_MM)]) > 20 and np.median(layers[-int(1.0 / RAY_MM):]) > 0
    assert (layers < -40).sum() * RAY_MM >= 1.0
    assert got["lean"]["front"][1] > 20 and got["lean"]["side"][0] == pytest.approx(front_mm, abs=1.0)
    assert an.temporal_share(base, base.widest + 5.0) == 1.0 and an.temporal_share(base, base.widest + 35.0) == 0.0


def test_scalp_thickens_towards_the_occiput():
    """Real scalp is thicker behind than in front: outer table to skin, 4-8.5 mm at the forehead and 6-9.5
    mm over the occiput on CT-ICH (quartiles, upper two thirds of the series), 7.5 and more on the GE head.
    The phantom adds ``head.occiput`` of ``head.scalp`` straight back, less towards the sides, none in
    front; the extra is fat under the skin, as the rest of the scalp."""
    import dataclasses

    base = dataclasses.replace(an.sample_head(np.random.default_rng(5)), scalp=6.0, scalp_fat=0.8, temporalis=0.0)
    z = base.widest + 15.0
    got = {}
    for occiput in (0.0, 0.5):
        hu = _level(dataclasses.replace(base, occiput=occiput), z)
        got[occiput] = {name: _scalp_profile(_ray(hu, np.deg2rad(a)))
                        for name, a in (("front", 0), ("side", 90), ("back_oblique", 135), ("back", 180))}
    flat, thick = got[0.0], got[0.5]
    assert flat["back"][0] == pytest.approx(flat["front"][0], abs=1.0)  # without it, the same all round
    assert thick["back"][0] - flat["back"][0] == pytest.approx(3.0, abs=0.75)  # half of the 6 mm scalp
    assert flat["back_oblique"][0] + 0.5 < thick["back_oblique"][0] < thick["back"][0] - 0.5  # tapering
    for name in ("front", "side"):  # nothing changes in front of the widest point
        assert thick[name][0] == pytest.approx(flat[name][0], abs=0.25)
    assert -80 <= thick["back"][1] <= -20  # fat and septa, as in front


def test_sutures_cut_the_bone_and_not_the_scalp(monkeypatch):
    """A suture is a gap through the vault: drawing the sutures changes bone and nothing else (the gap used
    to be painted 2 mm out into the scalp, a bright line where the vault is thin)."""
    import dataclasses

    head = dataclasses.replace(an.sample_head(np.random.default_rng(5)), scalp_fat=0.8, squama=0.6)
    fr = an.Frame(rows=200, cols=200, spacing=1.0, thickness=5.0, z=np.array([head.widest + 10.0, head.top - 10.0],
                  np.float32), angle=0.0, shift=(0.0, 0.0))
    with_sutures = an.build(head, fr, np.random.default_rng(0))
    monkeypatch.setattr(an, "_sutures", lambda cv, depth: None)
    without = an.build(head, fr, np.random.default_rng(0))
    changed = with_sutures.hu != without.hu
    assert changed.sum() > 50  # the coronal and lambdoid (or sagittal) sutures on both slices
    # bone, or the inner table's edge that the cranial contents paint over later; never scalp or air
    assert np.isin(without.tissue[changed], (an.BONE, an.CSF)).all()
    assert (with_sutures.hu[changed] < without.hu[changed]).all()  # gaps: less dense than the bone


def test_slab_share_is_the_overlap_of_slab_and_structure():
    """A 5 mm slab centred 4.5 mm above an 8 mm structure's centre holds 2 mm of it: 2/5; a 1 mm slab through
    it holds it wholly; a 10 mm slab round a 6 mm one takes all of it; slabs that miss it, nothing."""
    assert an.slab_share(4.5, 5.0, 0.0, 4.0) == pytest.approx(0.4)
    assert an.slab_share(0.0, 1.0, 0.0, 4.0) == 1.0
    assert an.slab_share(0.0, 10.0, 0.0, 3.0) == 1.0
    assert an.slab_share(10.0, 5.0, 0.0, 4.0) == 0.0 and an.slab_share(6.5, 5.0, 0.0, 4.0) == 0.0
    head = an.sample_head(np.random.default_rng(3))
    ears = an.head_rng(head, "ears").random()
    assert ears == an.head_rng(head, "ears").random() != an.head_rng(head, "old_hypodensities").random()
    assert an.head_rng(head, "petrous", -1).random() != an.head_rng(head, "petrous", 1).random()
    assert an.head_rng(head, "ears", 1).random() == ears  # a structure without sides ignores the side
    # every structure and side draws from its own stream: no two tags meet, counting the left sides
    tags = [t for name, t in an.HEAD_RNG_TAGS.items() for t in ((t, t + 1) if name in an.SIDED else (t,))]
    assert len(set(tags)) == len(tags)
    for name in an.HEAD_RNG_TAGS:  # a new head_rng is what each plan draws from (the tags fix today's phantoms)
        assert an.head_rng(head, name).bit_generator.state == np.random.default_rng(
            [int(head.a * 1e6) % 2**31, int(head.top * 1e4) % 2**31, an.HEAD_RNG_TAGS[name]]).bit_generator.state


def test_inner_table_is_rough_and_the_outer_table_smooth():
    """Digitate markings roughen the inner table; the outer table keeps a smooth outline under the scalp.
    Measured on real heads along 360 rays (bench/realism.py's sources, brain-filled slices; the residual SD
    of each edge's radius about its 15-degree running mean): 0.35 mm inner against 0.28 outer on CT-ICH,
    0.39 against 0.17 on the GE head. Here, on one slice of a head whose markings are drawn large: the inner
    edge (first sample over 300 HU out from the centre) wanders by over half a millimetre, the outer (last
    one) by a few hundredths, so the markings change the bone's thickness, not its outline."""
    from scipy.ndimage import uniform_filter1d

    head = an.sample_head(np.random.default_rng(5))
    hu = _level(head, head.widest + 10.0)
    inner, outer = [], []
    for a in range(360):
        ray = _ray(hu, np.deg2rad(a))
        inner.append(np.nonzero(ray > 300)[0][0] * RAY_MM)
        outer.append(_outer_bone(ray)[1] * RAY_MM)
    inner, outer = np.array(inner), np.array(outer)

    def wander(edge):  # robust SD (mm) about the running mean over 15 rays
        d = edge - uniform_filter1d(edge, 15, mode="wrap")
        return float(np.median(np.abs(d)) * 1.4826)

    assert wander(inner) > 0.5
    assert wander(outer) < 0.15
    assert wander(outer - inner) > 0.5  # the thickness carries the markings


def test_deep_markings_never_open_the_vault(monkeypatch):
    """Where the vault is thin (a 5 mm skull, the sides at half of it, less over the temporal fossae) and the
    markings deep, the bone keeps at least ``VAULT_MIN_MM``; without that floor the markings would cut holes
    through the squama on this head."""
    import dataclasses

    head = dataclasses.replace(an.sample_head(np.random.default_rng(5)), skull=5.0, squama=0.5)

    def thinnest(hu):  # mm of the outermost run of bone, the thinnest of 360 rays (none: a hole)
        widths = []
        for a in range(360):
            ray = _ray(hu, np.deg2rad(a))
            widths.append((np.subtract(*_outer_bone(ray)[::-1]) + 1) * RAY_MM if (ray > 300).any() else 0.0)
        return min(widths)

    z = head.widest - 10.0
    assert thinnest(_level(head, z)) >= an.VAULT_MIN_MM - 2 * RAY_MM
    monkeypatch.setattr(an, "VAULT_MIN_MM", -100.0)  # no floor
    assert thinnest(_level(head, z)) < 0.5


def test_ears_stand_out_beside_the_head_and_their_canals_run_into_the_temporal_bone(monkeypatch):
    """Each side has an auricle, a flap of skin and cartilage (``Ear.thickness`` of ``Ear.hu``) in the air beside
    the head, and an external auditory canal, air from the skin 22-28 mm in, outside the cranial cavity. They
    come from a generator of the head's own, so nothing else a series draws changes: without them, every
    other pixel is the same."""
    head = an.sample_head(np.random.default_rng([6, 1]))
    right, left = an.ears(head)
    assert (right, left) == an.ears(head) and right != left
    for ear in (right, left):
        assert 27 <= ear.half_height <= 33 and 3.0 <= ear.thickness <= 5.0 and 22 <= ear.canal_length <= 28
    levels = np.array([right.z_centre, right.canal_z, right.z_centre + right.half_height + 12.0], np.float32)
    fr = an.Frame(rows=600, cols=600, spacing=0.4, thickness=1.0, z=levels, angle=0.0, shift=(0.0, 0.0))
    with_ears = an.build(head, fr, np.random.default_rng(0))
    monkeypatch.setattr(an, "_ears", lambda cv, vault, depth: None)
    without = an.build(head, fr, np.random.default_rng(0))
    changed = with_ears.hu != without.hu
    assert not changed[2].any()  # above the auricles and their canals: nothing
    assert not (changed & (without.depth > -2.0)).any()  # never in the cranial cavity
    flap = changed & (without.tissue == an.AIR)
    canal = changed & ~flap
    # the auricle at its mid-level: a band of about thickness x (length + root) beside each side of the head
    x_img = fr.x_img[0]
    for sx, ear in ((-1, right), (1, left)):
        side = flap[0] & (np.sign(x_img) == sx)
        area = side.sum() * 0.4**2
        assert ear.thickness * ear.length * 0.6 < area < ear.thickness * (ear.length + 6) * 1.3
        assert np.median(with_ears.hu[0][side]) == pytest.approx(ear.hu, abs=1.0)
    # the canals: air at their level on both sides, reaching in about their length from the skin
    at_canal = canal[1] & (with_ears.hu[1] < -500)
    assert np.median(with_ears.hu[1][canal[1]]) < -900  # air (its edges partial volume)
    for sx, ear in ((-1, right), (1, left)):
        xs = np.abs(x_img[at_canal & (np.sign(x_img) == sx)])
        skin = np.abs(x_img[(without.hu[1] > -500) & (np.abs(fr.y_img[0] - (ear.y_root - 4.0)) < 0.5)]).max()
        assert skin - xs.min() == pytest.approx(ear.canal_length, abs=2.5)


def test_old_hypodensities_come_with_age():
    """Old infarcts, lacunes and periventricular white-matter hypodensity are drawn for the head from a
    generator of its own, more often the older the head: a territorial infarct in 5% of heads under 40 and
    in about a fifth over 65, no lacune under 45, no white-matter hypodensity up to 55."""
    heads = [an.sample_head(np.random.default_rng([s, 1])) for s in range(800)]
    olds = [an.old_hypodensities(h) for h in heads]
    assert olds[3] == an.old_hypodensities(heads[3])
    ages = np.array([h.age for h in heads])
    infarct = np.array([bool(o.infarcts) for o in olds])
    assert infarct[ages < 40].mean() < 0.1 and 0.08 < infarct[ages >= 65].mean() < 0.35
    assert not any(o.lacunes for o, a in zip(olds, ages) if a < 45)
    assert any(o.lacunes for o, a in zip(olds, ages) if a >= 65)
    assert all(o.leuko_hu == 0 for o, a in zip(olds, ages) if a <= 55)


def test_old_hypodensities_darken_only_brain_by_their_share_of_the_slab(monkeypatch):
    """A wedge of old infarct from the cortex inwards and a 4 mm lacune read the head's CSF plus their drawn
    density where they fill the slab, over grey and white matter only, the tissue codes kept (scarred brain,
    not a CSF space subarachnoid blood could fill). A 5 mm slice centred 4.5 mm above the lacune's centre
    holds 2 mm of its 8: its centre pixel moves 2/5 of the way to the lacune's density."""
    head = an.sample_head(np.random.default_rng([6, 1]))
    z0 = head.widest + 10.0
    drawn = an.OldHypodensities(infarcts=((1.2, z0, 15.0, 0.25, 30.0, 8.0),),
                                lacunes=((-20.0, 0.0, z0, 4.0, 5.0),), leuko_hu=6.0, leuko_mm=10.0)

    def render(old, z, thickness):
        monkeypatch.setattr(an, "old_hypodensities", lambda h: old)
        fr = an.Frame(rows=400, cols=400, spacing=0.5, thickness=thickness, z=np.array([z], np.float32),
                      angle=0.0, shift=(0.0, 0.0))
        return fr, an.build(head, fr, np.random.default_rng(0))

    fr, a = render(drawn, z0, 1.0)
    _, b = render(an.OldHypodensities(), z0, 1.0)
    X, Y = fr.X[0], fr.Y[0]
    assert np.array_equal(a.tissue, b.tissue)
    changed = a.hu[0] != b.hu[0]
    assert changed.any() and np.isin(b.tissue[0][changed], (an.GREY, an.WHITE)).all()
    brain = np.isin(b.tissue[0], (an.GREY, an.WHITE))
    core = brain & (np.abs(np.arctan2(X, -Y) - 1.2) < 0.08) & (a.depth[0] > 3) & (a.depth[0] < 12)
    assert core.sum() > 20 and np.allclose(a.hu[0][core], head.csf + 8.0, atol=1.0)
    lacune = brain & (np.hypot(X + 20.0, Y) < 3.0)
    assert lacune.sum() > 20 and np.allclose(a.hu[0][lacune], head.csf + 5.0, atol=0.5)
    # leukoaraiosis: white matter darker next to the ventricles, less further out, untouched beyond 10 mm
    white, vent = b.tissue[0] == an.WHITE, b.tissue[0] == an.VENTRICLE
    d = ndimage.distance_transform_edt(~vent) * 0.5
    far_from_lesions = ~core & (np.hypot(X + 20.0, Y) > 6.0) & (np.abs(np.arctan2(X, -Y) - 1.2) > 0.6)
    drop = (b.hu[0] - a.hu[0])
    near, mid, far = (white & far_from_lesions & m for m in ((d < 2), (d > 6) & (d < 8), d > 11))
    assert drop[near].mean() > drop[mid].mean() > 0.5 and np.abs(drop[far]).max() < 1e-3
    # through a thick slab: 2 mm of the lacune's 8 in a 5 mm slice
    only_lacune = an.OldHypodensities(lacunes=((-20.0, 0.0, z0, 4.0, 5.0),))
    fr5, a5 = render(only_lacune, z0 + 4.5, 5.0)
    _, b5 = render(an.OldHypodensities(), z0 + 4.5, 5.0)
    centre = np.unravel_index(np.argmin(np.hypot(fr5.X[0] + 20.0, fr5.Y[0])), fr5.X[0].shape)
    before = b5.hu[0][centre]
    assert a5.hu[0][centre] == pytest.approx(before + 0.4 * (head.csf + 5.0 - before), abs=0.05)


def _face_level(head, z: float, size=500, spacing=0.4, thickness=1.0):
    fr = an.Frame(rows=size, cols=size, spacing=spacing, thickness=thickness, z=np.array([z], np.float32),
                  angle=0.0, shift=(0.0, 0.0))
    return fr, an.build(head, fr, np.random.default_rng(0))


def _at(fr, arr, x, y):
    """``arr``'s value at the pixel nearest head-frame (x, y) mm (an upright, centred frame)."""
    return arr[int(round(y / fr.spacing + (fr.rows - 1) / 2)), int(round(x / fr.spacing + (fr.cols - 1) / 2))]


def test_nasal_cavity_is_air_either_side_of_the_septum_between_the_maxillary_sinuses(monkeypatch):
    """Mid-way up the nasal cavity the row through its middle reads: bony wall, air (with a turbinate's
    mucosa on it), the septum (cartilage in front, bone behind) where the plan bows it, air, wall; nothing in
    the cranial cavity changes, and without the pass that spot is solid face."""
    head = an.sample_head(np.random.default_rng([5, 1]))
    plan = an.nasal_plan(head)
    assert plan == an.nasal_plan(head) and 10.5 <= plan["half_mm"] <= 14 and abs(plan["deviation_mm"]) <= 3.5
    fr, with_nose = _face_level(head, -32.0)
    monkeypatch.setattr(an, "_nasal_cavity", lambda cv, vault, depth: None)
    _, without = _face_level(head, -32.0)
    changed = with_nose.hu[0] != without.hu[0]
    assert not (changed & (without.depth[0] > -2.0)).any()
    X, Y = fr.X[0], fr.Y[0]
    nasal = changed & (np.abs(X) < plan["half_mm"] + 2)
    yc = float(np.median(Y[nasal]))
    row = np.abs(Y - yc) < 0.25
    xs = X[row]
    hu = with_nose.hu[0][row]
    septum = xs[(hu > 60) & (np.abs(xs) < plan["half_mm"] - 3)]
    assert len(septum) and abs(float(np.median(septum)) - plan["deviation_mm"]) < 1.0
    for side in (-1, 1):  # air between the septum and each wall
        gap = hu[(np.sign(xs - plan["deviation_mm"]) == side) & (np.abs(xs - plan["deviation_mm"]) > 2.0)
                 & (np.abs(xs) < plan["half_mm"] - 2.0)]
        assert (gap < -500).any()
    assert _at(fr, without.hu[0], plan["deviation_mm"] + 3.0, yc) > -200  # solid face without it


def test_metal_streaks_are_lines_dark_and_bright_in_turn_fading_with_distance():
    """Two streaks through the origin, dark at 0 rad and bright at pi/2, 100 HU at the metal, fading over
    50 mm: 20 mm along the bright one reads +100 e^-0.4 = 67.0 HU (the dark one's tail there is nil), 20 mm
    along the dark one -67.0; a point off both lines nothing; where the mask is 0, nothing at all."""
    from ichscan.phantom.geometry import metal_streaks

    y, x = (np.mgrid[:81, :81] - 40).astype(np.float32)  # 1 mm pixels, the metal at the centre
    hu = np.zeros((81, 81), np.float32)
    metal_streaks(hu, x, y, (0.0, 0.0), [0.0, np.pi / 2], 100.0, width_mm=1.0, fade_mm=50.0)
    assert hu[40 + 20, 40] == pytest.approx(100 * np.exp(-0.4), abs=0.01)  # along +Y: pi/2
    assert hu[40, 40 + 20] == pytest.approx(-100 * np.exp(-0.4), abs=0.01)  # along +X: 0
    assert abs(hu[40 + 20, 40 + 20]) < 1e-3  # 45 degrees: 14 mm from each line
    masked = np.zeros_like(hu)
    metal_streaks(masked, x, y, (0.0, 0.0), [0.0, np.pi / 2], 100.0, width_mm=1.0, fade_mm=50.0,
                  where=(x < 0).astype(np.float32))
    assert not masked[:, 40:].any() and masked[40, 40 - 20] == pytest.approx(-100 * np.exp(-0.4), abs=0.01)


def test_teeth_and_their_fillings_streak_only_their_own_slices(monkeypatch):
    """Crowns of enamel on each arch at the crowns' level (every ``tooth_centres`` point reads the plan's
    enamel, or 3000 HU where filled); a filling's streaks change the slice through it far from the teeth,
    and no slice above the teeth."""
    import dataclasses

    head = dataclasses.replace(an.sample_head(np.random.default_rng([5, 1])), age=70)
    plan = an.teeth_plan(head)
    z = float(np.mean(an.TEETH_LEVELS["upper"]))
    fr, a = _face_level(head, z)
    centres = an.tooth_centres(head)
    assert len(centres) == 2 * an.TEETH_PER_SIDE
    for k, (x0, y0, _) in enumerate(centres):
        want = 3000.0 if ("upper", k) in plan["filled"] else plan["enamel"]
        assert _at(fr, a.hu[0], x0, y0) == pytest.approx(want, abs=1.0)
    monkeypatch.setattr(an, "teeth_plan", lambda h: dict(plan, filled={("upper", 3)}))
    _, one = _face_level(head, z)
    _, one_above = _face_level(head, -30.0)
    monkeypatch.setattr(an, "teeth_plan", lambda h: dict(plan, filled=set()))
    _, none = _face_level(head, z)
    _, none_above = _face_level(head, -30.0)
    head_px = none.tissue[0] != an.AIR
    far = head_px & (np.hypot(fr.X[0] - centres[3][0], fr.Y[0] - centres[3][1]) > 40)
    assert np.mean(np.abs(one.hu[0] - none.hu[0])[far] > 5) > 0.01  # streaks across the slice
    assert np.array_equal(one_above.hu, none_above.hu)


def test_an_aneurysm_clip_is_metal_by_the_circle_of_willis_with_streaks_on_its_slices(monkeypatch):
    """About 3% of adult heads carry a clip from an old aneurysm operation, at one of ``CLIP_SITES``: its
    centre reads 3000 HU on the slice through it, its streaks change the head far from it (never the air
    round the head), and a slice clear of it is untouched."""
    heads = [an.sample_head(np.random.default_rng([s, 1])) for s in range(1500)]
    plans = [an.clip_plan(h) for h in heads]
    adults = [p for p, h in zip(plans, heads) if h.age >= 35]
    assert 0.01 < np.mean([p is not None for p in adults]) < 0.06
    assert all(p is None for p, h in zip(plans, heads) if h.age < 35)
    k = next(i for i, p in enumerate(plans) if p is not None)
    head, plan = heads[k], plans[k]
    assert plan == an.clip_plan(head) and plan["site"] in an.CLIP_SITES

    def level(z, clipped):
        monkeypatch.setattr(an, "clip_plan", lambda h: plan if clipped else None)
        return _face_level(head, z)

    fr, a = level(plan["z"], True)
    _, b = level(plan["z"], False)
    assert _at(fr, a.hu[0], plan["x"], plan["y"]) == pytest.approx(3000.0, abs=1.0)
    assert _at(fr, a.tissue[0], plan["x"], plan["y"]) == an.METAL
    far = np.hypot(fr.X[0] - plan["x"], fr.Y[0] - plan["y"]) > 30
    diff = np.abs(a.hu[0] - b.hu[0])
    assert np.mean(diff[far & (b.tissue[0] != an.AIR)] > 5) > 0.01
    assert not diff[b.tissue[0] == an.AIR].any()
    clear = plan["z"] + an.CLIP_HALF[2] + 1.0  # a 1 mm slice whose slab ends 0.5 mm above the clip
    assert np.array_equal(level(clear, True)[1].hu, level(clear, False)[1].hu)


def test_mandible_is_rami_beside_the_maxillary_sinuses_and_an_arch_below():
    """Beside the maxillary sinuses the mandible is two rami behind them; its arch runs in front only from
    the teeth down (it used to cross the sinuses, bone where they are air)."""
    head = an.sample_head(np.random.default_rng([5, 1]))
    front = (0.5 * head.a, -0.35 * head.b - 0.62 * head.b * np.sqrt(1 - (0.5 / 0.62) ** 2))  # on the U, in front
    ramus = (0.62 * head.a * np.sqrt(1 - (0.05 / 0.62) ** 2), -0.40 * head.b)  # on the U, behind the sinus
    fr, sinus_level = _face_level(head, -40.0)
    _, teeth_level = _face_level(head, -58.0)
    on_u = [(sx * 0.62 * head.a * np.sin(t), -0.35 * head.b - 0.62 * head.b * np.cos(t))
            for t in np.linspace(0.2, 1.3, 23) for sx in (-1, 1)]
    level = np.full((1, 1, 1), -40.0, np.float32)
    in_sinus = [q for q in on_u if min(an.maxillary_distance(head, sx, np.float32(q[0]), np.float32(q[1]), level).item()
                                       for sx in (-1, 1)) < -2.0]
    assert len(in_sinus) >= 3 and all(_at(fr, sinus_level.hu[0], *q) < -500 for q in in_sinus)  # the sinus's air
    assert _at(fr, sinus_level.tissue[0], *ramus) == an.BONE
    assert _at(fr, teeth_level.tissue[0], *front) == an.BONE


def test_air_cells_meet_at_septa_of_the_given_thickness():
    """Two cells seeded 10 mm apart meet at a flat septum half-way: air beyond the septum (1.0), bone on the
    plane between them (0.0) and half air at its face (the ramp's middle); a foam's seed count follows the
    volume over the cell size (6 V / (pi d^3), Poisson) and lies inside its ellipsoid."""
    x = np.arange(-6.0, 6.01, 0.1, dtype=np.float32)
    X, Y = np.meshgrid(x, x)
    seeds = cKDTree(np.array([[-5.0, 0.0, 0.0], [5.0, 0.0, 0.0]]))
    air = an._cell_air(seeds, X, Y, 0.0, 0.5, np.float32(0.1), np.ones_like(X, bool), septum=0.6)
    col = lambda v: int(round((v + 6.0) / 0.1))  # noqa: E731
    row = air[col(0.0)]  # through both seeds: the gap to the septum's plane is |x|
    assert row[col(0.0)] == pytest.approx(0.0) and row[col(0.3)] == pytest.approx(0.5, abs=0.02)
    assert row[col(-2.0)] == pytest.approx(1.0) and row[col(4.0)] == pytest.approx(1.0)
    assert not an._cell_air(seeds, X, Y, 0.0, 0.5, np.float32(0.1), np.zeros_like(X, bool)).any()
    half = (11.0, 13.0, 15.0)
    counts = []
    for k in range(20):
        cells = an.air_cells(np.random.default_rng(k), (50.0, 20.0, -16.0), half, 5.0)
        u = (cells.data - (50.0, 20.0, -16.0)) / half
        assert (np.sum(u**2, axis=1) <= 1 + 1e-9).all()
        counts.append(len(cells.data))
    want = 6 * (4 / 3 * np.pi * np.prod(half)) / (np.pi * 5.0**3)
    assert abs(np.mean(counts) - want) < 3 * np.sqrt(want / 20)


def test_mastoid_air_cells_are_a_foam_of_uneven_cells_outside_the_cavity(monkeypatch):
    """An adult's mastoid, cut by a 1 mm slice at its middle level: air cells (under -500 HU) of uneven size
    between septa of bone, some 30-90% of the region air, never inside the cranial cavity; the two sides'
    cells differ and a second build of the same head draws the same ones. A young child's (``mastoid``
    0.4 or less, under about 3 years) has bone and no cells. The pass takes no draw of the series' generator:
    without it the pixels away from the mastoids are unchanged."""
    head = an.sample_head(np.random.default_rng([7, 1]))
    fr = an.Frame(rows=500, cols=500, spacing=0.4, thickness=1.0, z=np.array([an.MASTOID_Z], np.float32),
                  angle=0.0, shift=(0.0, 0.0))
    drawn = an.build(head, fr, np.random.default_rng(0))
    assert np.array_equal(drawn.hu, an.build(head, fr, np.random.default_rng(0)).hu)
    monkeypatch.setattr(an, "_mastoid", lambda *a, **k: None)
    plain = an.build(head, fr, np.random.default_rng(0))
    monkeypatch.undo()
    changed = drawn.hu[0] != plain.hu[0]
    X, Y = fr.X[0], fr.Y[0]
    patterns = []
    for sx in (-1, 1):
        c = (sx * an.MASTOID_X * head.a, an.MASTOID_Y * head.b)
        region = an.ellipse(X, Y, *c, *an.MASTOID_HALF[:2], np.float32(0.4)) > 0.5
        near = an.ellipse(X, Y, *c, an.MASTOID_HALF[0] + 1, an.MASTOID_HALF[1] + 1, np.float32(0.4)) > 0
        assert not (changed & ~near & (np.sign(X) == sx)).any()
        mine = region & (drawn.depth[0] < -3.0) & np.isin(plain.tissue[0], (an.BONE, an.SINUS))  # its bone
        air = mine & (drawn.hu[0] < -500)
        assert 0.3 < air.sum() / mine.sum() < 0.9
        assert (mine & (drawn.hu[0] > 400)).sum() > 0.1 * mine.sum()  # the septa
        labels, n = ndimage.label(air)
        sizes = np.bincount(labels.ravel())[1:] * 0.16  # mm2
        sizes = sizes[sizes > 1.0]
        assert n >= 8 and sizes.max() > 3 * np.median(sizes)
        patterns.append(air[:, :250][:, ::-1] if sx < 0 else air[:, 250:])  # the right side's half mirrored
    assert not np.array_equal(*patterns)
    assert not (changed & (drawn.depth[0] > -1.5)).any()
    child = an.child_head(head, 2.0, np.random.default_rng(3))
    assert child.mastoid <= 0.4
    fr_c = dataclasses.replace(fr, spacing=0.4)
    young = an.build(child, fr_c, np.random.default_rng(0))
    monkeypatch.setattr(an, "_mastoid", lambda *a, **k: None)
    bare = an.build(child, fr_c, np.random.default_rng(0))
    newly_air = (young.hu[0] < -500) & (bare.hu[0] >= -500)
    assert (young.hu[0] != bare.hu[0]).any() and not newly_air.any()


def test_petrous_bone_widens_to_its_base_and_holds_the_inner_ear():
    """Drawn alone on air, each petrous bone is the plan's density out to its half-width across the axis,
    ``r_apex`` + (``r_base`` - ``r_apex``) t at the share t of the way from apex to base, times the band's
    profile at the slice's level, and the vestibule on its slice reads the labyrinth's fluid. In a whole
    head the cavity carves its back face and the skull base's clutter may land on it, and the vestibule
    still reads the fluid where the slice has it outside the cranial cavity (but for the clutter)."""
    found = fluid = 0
    for seed in range(10):
        head = an.sample_head(np.random.default_rng([seed, 1]))
        for sx in (-1, 1):
            plan = an.petrous_plan(head, sx)
            assert plan == an.petrous_plan(head, sx) and 1500 <= plan["bone"] <= 2000
            if seed < 2:
                p0, p1 = np.array(plan["p0"]), np.array(plan["p1"])
                across = np.array([-(p1 - p0)[1], (p1 - p0)[0]]) / np.hypot(*(p1 - p0))
                z = -26.0
                fr = an.Frame(rows=500, cols=500, spacing=0.4, thickness=0.5, z=np.array([z], np.float32),
                              angle=0.0, shift=(0.0, 0.0))
                cv = an._blank_canvas(head, fr)
                band = cv.band(np.arange(1))
                an._petrous_pyramid(cv, band, sx)
                prof = float(an.profile(np.float32(z), plan["low"], plan["top"]))
                for t in (0.25, 0.75):
                    q = p0 + t * (p1 - p0)
                    want = (plan["r_apex"] + (plan["r_base"] - plan["r_apex"]) * t) * prof
                    for sign in (-1, 1):
                        reach = [d for d in np.arange(0, 20, 0.1)
                                 if _at(fr, band.hu[0], *(q + sign * d * across)) > 1000]
                        assert max(reach) == pytest.approx(want, abs=0.5)
                    assert _at(fr, band.hu[0], *q) == pytest.approx(plan["bone"], abs=1.0)
                x, y, z = plan["vestibule"]
                fr = dataclasses.replace(fr, z=np.array([z], np.float32), thickness=1.0)
                cv = an._blank_canvas(head, fr)
                band = cv.band(np.arange(1))
                an._petrous_pyramid(cv, band, sx)
                assert _at(fr, band.hu[0], x, y) == pytest.approx(an.INNER_EAR_HU, abs=0.5)
            x, y, z = plan["vestibule"]
            fr, a = _face_level(head, z)
            if _at(fr, a.depth[0], x, y) < -1.0:
                found += 1
                fluid += abs(_at(fr, a.hu[0], x, y) - an.INNER_EAR_HU) <= 1.0
    assert found >= 10 and fluid >= 0.75 * found, (found, fluid)


def test_mandibular_condyle_stands_in_front_of_the_ear_canal(monkeypatch):
    """At its middle level each condyle is bone outside the cranial cavity in front of that side's external
    auditory canal: marrow (the plan's) at its centre inside a cortex (the plan's density), though the
    middle fossa may take a part of it; the slices clear of it do not change."""
    head = an.sample_head(np.random.default_rng([3, 1]))
    plan = an.condyle_plan(head)
    assert plan == an.condyle_plan(head)
    for sx, (top, y_c), ear in zip((-1, 1), plan["centres"], an.ears(head)):
        assert y_c < ear.y_root - 4.0 - an.EAR_CANAL_RADIUS  # in front of the canal
        fr, a = _face_level(head, top)
        monkeypatch.setattr(an, "_mandibular_condyles", lambda *a, **k: None)
        _, b = _face_level(head, top)
        monkeypatch.undo()
        side = (a.hu[0] != b.hu[0]) & (np.sign(fr.X[0]) == sx)
        assert side.sum() * 0.16 > 0.3 * np.pi * plan["half_ml"] * plan["half_ap"]
        assert (a.depth[0][side] < -2.0).all()
        cy, cx = (np.mean(v) for v in np.nonzero(side))
        centre = a.hu[0][int(round(cy)), int(round(cx))]
        assert centre == pytest.approx(plan["marrow"], abs=5.0)
        assert a.hu[0][side].max() == pytest.approx(plan["cortex"], abs=5.0)
        assert np.mean(fr.Y[0][side]) == pytest.approx(y_c, abs=1.0)
    top, _ = plan["centres"][0]
    clear = max(c[0] for c in plan["centres"]) + plan["half_z"] + 1.0
    _, a = _face_level(head, clear)
    monkeypatch.setattr(an, "_mandibular_condyles", lambda *a, **k: None)
    _, b = _face_level(head, clear)
    assert np.array_equal(a.hu, b.hu)


def test_maxillary_sinus_is_a_rounded_triangle_in_a_thin_wall():
    """Mid-way up, each maxillary sinus is air inside a thin bony wall (the plan's density, its thickness)
    and its back wall is straight: the air stops at a line running forward and out at the plan's angle,
    which a plain ellipse would cross; where the plan thickens the lining, mucosa separates wall and air."""
    for seed in range(6):
        head = an.sample_head(np.random.default_rng([seed, 1]))
        z = float(np.mean(an.MAXILLARY_LEVELS))
        fr, a = _face_level(head, z)
        for sx in (-1, 1):
            plan = an.maxillary_plan(head, sx)
            assert plan == an.maxillary_plan(head, sx)
            d = an.maxillary_distance(head, sx, fr.X, fr.Y, np.full((1, 1, 1), z, np.float32))[0]
            air = (d < -plan["mucosa"] - 1.0) & (a.depth[0] < -3) & (np.abs(fr.X[0]) > 16)  # clear of the nose
            assert np.median(a.hu[0][air]) == pytest.approx(-950.0, abs=1.0)
            wall = (d > 0.3) & (d < plan["wall"] - 0.3) & (np.abs(fr.X[0]) > 16)
            if wall.any():
                assert np.median(a.hu[0][wall]) == pytest.approx(plan["wall_hu"], abs=60.0)
            if plan["mucosa"] > 2.0:
                lining = (d < -0.6) & (d > -plan["mucosa"] + 0.6) & (np.abs(fr.X[0]) > 16)
                assert np.median(a.hu[0][lining]) == pytest.approx(plan["mucosa_hu"], abs=5.0)
            # the straight back wall: along the line 1 mm inside it the sinus is air, 1 mm outside it never
            m = float(an.profile(np.float32(z), *an.MAXILLARY_LEVELS)) * plan["size"]
            n = np.array([sx * np.sin(plan["angle"]), np.cos(plan["angle"])])
            c = np.array([sx * 0.32 * head.a, -0.72 * head.b + 11.0 * m])
            along = np.array([n[1], -n[0]])
            for off, want_air in ((-1.5 - plan["mucosa"], True), (plan["wall"] + 1.5, False)):
                pts = [c + off * n + t * along for t in np.linspace(-3, 3, 7)]
                inside = [an.ellipse_distance(np.float32(q[0]), np.float32(q[1]), sx * 0.32 * head.a, -0.72 * head.b,
                                              16.5 * m, 18.5 * m) < -2 for q in pts]
                got = [_at(fr, a.hu[0], *q) < -500 for q, i in zip(pts, inside) if i and abs(q[0]) > 16]
                assert got and all(g == want_air for g in got), (seed, sx, off, got)


def test_occipital_bone_over_the_cerebellum_is_the_squama_not_a_ring():
    """``occipital_thinning`` keeps the whole vault in front and high up, and behind the posterior fossa
    leaves ``head.skull`` times the head's share (0.55-0.85) however thick the base has grown; on a slice
    through the cerebellum the bone straight behind the cavity is that thick (within the inner table's
    markings), with soft tissue, not bone, outside it."""
    head = an.sample_head(np.random.default_rng([2, 1]))
    assert an.base_thickening(np.float32(-30.0)) == pytest.approx(1.2)  # 3% a mm below 20 mm, at most 120%
    assert an.base_thickening(np.float32(25.0)) == 0.0 and an.base_thickening(np.float32(10.0)) == pytest.approx(0.3)
    share = an.occipital_thinning(head, np.float32(0.5 * head.b), np.float32(-30.0)) * (1 + 1.2)
    assert 0.55 <= float(share) <= 0.85
    assert float(an.occipital_thinning(head, np.float32(-20.0), np.float32(-30.0))) == pytest.approx(1.0)
    assert float(an.occipital_thinning(head, np.float32(50.0), np.float32(30.0))) == pytest.approx(1.0)
    fr, a = _face_level(head, -24.0, thickness=0.5)
    thick = []
    for x in (-12.0, -6.0, 6.0, 12.0):
        col = int(round(x / fr.spacing + (fr.cols - 1) / 2))
        back = np.nonzero(a.depth[0][:, col] > 0)[0].max()  # the cavity's last row straight back
        run = 0
        while a.hu[0][back + 1 + run, col] > 300:
            run += 1
        thick.append(run * fr.spacing)
        assert a.hu[0][back + run + 3, col] < 100  # muscle outside it
    assert np.median(thick) == pytest.approx(head.skull * float(share), abs=1.5)


def test_skin_is_a_layer_of_soft_tissue_before_the_fat(monkeypatch):
    """Out to the side on a level above the temporalis, the scalp reads from the air inwards: the skin
    (``skin_mm``, 1.6-2.8 mm drawn per head) at soft-tissue density, then the subcutaneous fat, where the
    first sample under 0 HU lies. With the old 1.2 mm the fat began sooner; the outline and everything
    deeper than the skin are the same."""
    drawn = []
    for seed in range(4):
        head = an.sample_head(np.random.default_rng([seed, 1]))
        skin = an.skin_mm(head)
        assert an.SKIN_MM[0] <= skin <= an.SKIN_MM[1] and skin == an.skin_mm(head)
        drawn.append(skin)
        z = head.widest + 45.0  # above the temporalis: skin, fat, galea, bone
        assert an.temporal_share(head, np.float32(z)) == 0.0
        fr, new = _face_level(head, z, spacing=0.2, size=1000)
        with monkeypatch.context() as m:
            m.setattr(an, "skin_mm", lambda head: 1.2)
            _, old = _face_level(head, z, spacing=0.2, size=1000)
        row = (fr.rows - 1) // 2
        for a in (new, old):
            outline = np.nonzero(a.hu[0][row] > -500)[0][[0, -1]]
            assert np.array_equal(outline, np.nonzero(new.hu[0][row] > -500)[0][[0, -1]])
        edge = np.nonzero(new.hu[0][row] > -500)[0][-1]  # the skin's outer edge, out to the patient's left
        inward = lambda a: a.hu[0][row, edge - np.arange(int(8.0 / fr.spacing))]
        assert 25 <= float(inward(new)[int(round(skin / 2 / fr.spacing))]) <= 55  # the skin
        # where it ends: the first sample below 0 HU inwards (fat, or the thin scalp's dense layer bordering it)
        ends = lambda a: np.nonzero(inward(a)[1:] < 0)[0][0] * fr.spacing + fr.spacing
        assert skin - 0.4 <= ends(new) <= skin + 0.6, (seed, skin, ends(new))
        assert ends(old) <= 1.2 + 0.6
        deeper = np.abs(fr.X[0]) < np.abs(fr.X[0][row, edge]) - skin - 1.0
        assert np.array_equal(new.hu[0][deeper & (np.abs(fr.Y[0]) < 5)], old.hu[0][deeper & (np.abs(fr.Y[0]) < 5)])
    assert max(drawn) - min(drawn) > 0.3


def test_temporal_squama_is_thin_under_the_temporalis_and_the_outline_stays(monkeypatch):
    """``temporal_thinning`` takes the vault straight out to the side, on the levels the temporalis covers,
    to the head's own squama (1.2-3 mm, drawn per head), however thick the base made it; from 45 degrees of
    the side, and above the temporalis, it leaves the bone alone, and it never thickens it. Drawn, the bone
    out to each side loses millimetres (the median over rows 2 mm apart, which the inner table's markings
    thin or thicken), what it left reads as the temporalis' soft tissue, the skull's outline (and the skin)
    stay where they were, and straight ahead and inside the cavity nothing changes."""
    drawn, lost = [], []
    for seed in range(4):
        head = an.sample_head(np.random.default_rng([seed, 1]))
        squama = an.temporal_squama_mm(head)
        assert an.TEMPORAL_SQUAMA_MM[0] <= squama <= an.TEMPORAL_SQUAMA_MM[1]
        assert squama == an.temporal_squama_mm(head)  # the head's own, every study alike
        drawn.append(squama)
        z = np.float32(0.0)  # the middle fossa: temporalis all over it, the base thickened by 60%
        assert an.temporal_share(head, z) == 1.0
        tb = np.float32(6.0)
        side, ahead, oblique = (float(an.temporal_thinning(head, np.float32(phi), z, tb))
                                for phi in (np.pi / 2, 0.0, np.pi / 4))
        assert side == pytest.approx(min(squama, 6.0), abs=1e-5) and ahead == oblique == pytest.approx(6.0)
        assert float(an.temporal_thinning(head, np.float32(-np.pi / 2), z, np.float32(1.0))) == pytest.approx(1.0)
        above = np.float32(head.widest + 40.0)
        assert float(an.temporal_thinning(head, np.float32(np.pi / 2), above, tb)) == pytest.approx(6.0)
        fr, thin = _face_level(head, 20.0)  # above the skull base's clutter, which picks its spots among the bone
        with monkeypatch.context() as m:
            m.setattr(an, "temporal_thinning", lambda head, phi, z, tb: tb)
            _, thick = _face_level(head, 20.0)
        centre = (fr.cols - 1) // 2
        for sx in (-1, 1):
            widths = {"thin": [], "thick": []}
            for y_mm in np.arange(-6.0, 6.1, 2.0):
                row = int(round(y_mm / fr.spacing + (fr.rows - 1) / 2))
                c = centre
                while thin.depth[0][row, c] >= 0:  # out to the cavity's edge
                    c += sx
                for name, a in (("thin", thin), ("thick", thick)):
                    run, k = 0, c - sx
                    while a.hu[0][row, k + sx] <= 300 and abs(k - c) < 3:
                        k += sx  # the partial-volume pixel at the inner table
                    while a.hu[0][row, k + sx] > 300:
                        run, k = run + 1, k + sx
                    widths[name].append(run * fr.spacing)
            assert np.all(np.array(widths["thin"]) <= np.array(widths["thick"]) + 1e-6), (seed, sx, widths)
            lost.append(np.median(widths["thick"]) - np.median(widths["thin"]))
        gone = (thick.hu[0] > 300) & (thin.hu[0] < 100) & (thin.depth[0] < -1.0)
        assert gone.sum() > 50 and 30 <= np.median(thin.hu[0][gone]) <= 60  # the temporalis where the bone was
        row = (fr.rows - 1) // 2
        skin = lambda a: np.nonzero(a.hu[0][row] > -300)[0][[0, -1]]
        assert np.array_equal(skin(thin), skin(thick))
        same = (np.abs(fr.X[0]) < 5) | (thin.depth[0] > 2)  # straight ahead and behind, and the cavity
        assert np.array_equal(thin.hu[0][same], thick.hu[0][same])
    assert max(drawn) - min(drawn) > 0.3  # drawn per head
    assert np.median(lost) >= 0.8, lost


def test_nasopharynx_is_air_behind_the_choanae_in_front_of_the_clivus():
    """At its middle level the nasopharynx is air behind the nasal cavity, with the plan's soft tissue
    between it and the clivus, outside the cranial cavity."""
    for seed in range(4):
        head = an.sample_head(np.random.default_rng([seed, 1]))
        plan = an.nasopharynx_plan(head)
        z = float(np.mean(an.NASOPHARYNX_LEVELS))
        fr, a = _face_level(head, z)
        y_back = -0.05 * head.b - 9.0 - plan["back"]
        assert _at(fr, a.hu[0], 0.0, y_back - plan["half_y"]) == pytest.approx(-1000.0, abs=1.0)
        assert _at(fr, a.depth[0], 0.0, y_back - plan["half_y"]) < -2
        assert _at(fr, a.hu[0], 0.0, y_back + min(plan["back"], 6.0) / 2) > -100  # the tissue on the clivus


def test_zygomatic_arches_are_bars_of_bone_beside_the_face_at_the_ear_canals(monkeypatch):
    """On the slice at the arches' level each side gains a bar of bone (the plan's density) running from the
    cheekbone to the arch's root, outside the cranial cavity; a slice clear of them does not change."""
    head = an.sample_head(np.random.default_rng([4, 1]))
    plan = an.zygoma_plan(head)
    assert plan == an.zygoma_plan(head)
    fr, a = _face_level(head, plan["z"])
    monkeypatch.setattr(an, "_zygomatic_arches", lambda *a, **k: None)
    _, b = _face_level(head, plan["z"])
    monkeypatch.undo()
    gained = (a.hu[0] != b.hu[0])
    assert (a.depth[0][gained] < -2.0).all()
    for sx in (-1, 1):
        side = gained & (np.sign(fr.X[0]) == sx)
        assert a.hu[0][side].max() == pytest.approx(plan["hu"], abs=1.0)
        ys = fr.Y[0][side & (a.hu[0] > 500)]
        assert ys.min() < -0.62 * head.b and ys.max() > -0.10 * head.b - 1.0
    clear = plan["z"] + plan["half_z"] + 1.0
    _, c = _face_level(head, clear)
    monkeypatch.setattr(an, "_zygomatic_arches", lambda *a, **k: None)
    _, d = _face_level(head, clear)
    assert np.array_equal(c.hu, d.hu)


def test_fat_planes_run_between_the_muscles_below_the_vault(monkeypatch):
    """Below the vault the soft tissue outside the skull gains thin planes of fat (the plan's density where a
    plane fills the pixel) along the zero set of the plan's field, a few per cent of it, and the muscles a
    few HU of variation; nothing changes in the cranial cavity, in the skin, or on a slice above the band."""
    head = an.sample_head(np.random.default_rng([6, 1]))
    plan = an.muscle_plan(head)
    assert plan == an.muscle_plan(head) and 0.5 <= plan["thick"] <= 1.0
    fr, a = _face_level(head, -30.0)
    monkeypatch.setattr(an, "_muscle_planes", lambda *a, **k: None)
    _, b = _face_level(head, -30.0)
    _, b_high = _face_level(head, an.MUSCLE_TOP + 2.0)
    monkeypatch.undo()
    _, a_high = _face_level(head, an.MUSCLE_TOP + 2.0)
    assert np.array_equal(a_high.hu, b_high.hu)
    changed = a.hu[0] != b.hu[0]
    assert (b.tissue[0][changed] == an.SOFT).all() and (a.depth[0][changed] < -2.0).all()
    f, g = an._field(plan["planes"], fr.X[0], fr.Y[0], -30.0)
    on_plane = changed & (np.abs(f) / g < plan["thick"] / 2 - 0.25)
    assert np.allclose(a.hu[0][on_plane], plan["fat"], atol=0.5)
    soft = (b.tissue[0] == an.SOFT) & (b.depth[0] < -2.0)
    share = (a.tissue[0] == an.FAT)[soft].mean() - (b.tissue[0] == an.FAT)[soft].mean()
    assert 0.005 < share < 0.15
    between = changed & (np.abs(f) / g > plan["thick"] / 2 + 1.0)  # clear of the planes: the muscles' tone
    tone = (a.hu[0] - b.hu[0])[between]
    assert 0.5 < np.std(tone) and np.abs(tone).max() <= plan["tone_hu"] / 2


def test_atlas_is_a_ring_round_the_dens_and_the_cord():
    """Through the atlas (below the posterior fossa): the dens's marrow (350 HU) behind the anterior arch's
    cortex (900 HU) with soft tissue between them, a lateral mass of bone on each side, the cord in the
    canal's CSF behind the dens and the posterior arch's cortex behind the canal; below the atlas the axis's
    body takes the dens's place and no anterior arch stands in front of it."""
    head = an.sample_head(np.random.default_rng([2, 1]))
    yc = an.SPINE_Y * head.b
    fr, a = _face_level(head, an.C2_TOP + 1.0)
    assert _at(fr, a.depth[0], 0.0, yc) < 0  # below the cranial cavity
    assert _at(fr, a.hu[0], 0.0, yc - 15.0) == pytest.approx(350.0, abs=1.0)  # the dens
    assert _at(fr, a.hu[0], 0.0, yc - 23.5) == pytest.approx(900.0, abs=1.0)  # the anterior arch
    assert _at(fr, a.hu[0], 0.0, yc - 21.0) < 200  # the gap between them
    for sx in (-1, 1):
        assert _at(fr, a.hu[0], sx * 16.0, yc - 8.0) == pytest.approx(350.0, abs=1.0)  # a lateral mass
    assert _at(fr, a.tissue[0], 0.0, yc + 4.0) == an.WHITE  # the cord
    assert _at(fr, a.hu[0], 0.0, yc + 11.0) == pytest.approx(8.0, abs=1.0)  # CSF behind it
    assert _at(fr, a.hu[0], 0.0, yc + 15.5) == pytest.approx(900.0, abs=1.0)  # the posterior arch
    _, b = _face_level(head, an.C2_TOP - 2.0)
    assert _at(fr, b.hu[0], 0.0, yc - 15.0) == pytest.approx(350.0, abs=1.0)  # the axis's body
    assert _at(fr, b.hu[0], 0.0, yc - 23.5) < 200  # no anterior arch


def test_vault_is_thinner_on_the_sides_than_front_and_back():
    """Real vaults (CT-ICH, the GE head) are 5-8 mm thick over the forehead and occiput but 3.5-4.5 mm on
    the sides, thinnest over the temporal fossae; the phantom's side share is ``head.squama`` (less a
    quarter at the temporal levels), front and back the full ``head.skull``, and where the temporalis lies
    (``temporal_share``) the sides go to the temporal squama's own thickness (``temporal_thinning``)."""
    import dataclasses

    head = dataclasses.replace(an.sample_head(np.random.default_rng(5)), skull=7.0, squama=0.6)
    squama_mm = an.temporal_squama_mm(head)
    front_rays, side_rays = range(-25, 26, 5), list(range(80, 101, 5)) + list(range(-100, -79, 5))
    for z in (head.widest + 5.0, head.widest + 20.0):
        t = float(an.temporal_share(head, z))  # 1 and 0.5
        got = {}
        for squama in (0.6, 1.0):
            hu = _level(dataclasses.replace(head, squama=squama), z)
            got[squama] = (_bone_mm(hu, front_rays), _bone_mm(hu, side_rays))
        for squama, (front, sides) in got.items():
            side_mm = 7.0 * squama * (1 - 0.25 * t)
            assert front == pytest.approx(7.0, abs=1.2)
            assert sides == pytest.approx(side_mm + t * (min(side_mm, squama_mm) - side_mm), abs=1.0), (z, squama)
        assert got[0.6][1] < 0.75 * got[0.6][0]
        assert got[0.6][0] == pytest.approx(got[1.0][0], abs=0.5)  # front and back as they were


def _tissue_by_depth(head, z: float):
    """(tissue codes, mm inside the inner table) of one 0.5 mm slice of ``head`` at ``z``, 400 x 400, centred."""
    fr = an.Frame(rows=400, cols=400, spacing=0.5, thickness=1.0, z=np.array([z], np.float32), angle=0.0,
                  shift=(0.0, 0.0))
    tissue = an.build(head, fr, np.random.default_rng(0)).tissue[0]
    bone = tissue == an.BONE
    cavity = ndimage.binary_fill_holes(bone) & ~bone
    parts, n = ndimage.label(cavity)
    cavity = parts == 1 + int(np.argmax(ndimage.sum(cavity, parts, range(1, n + 1))))
    return tissue, ndimage.distance_transform_edt(cavity) * 0.5


def _cortical_band(head, z: float):
    """(tissue codes, mask of the cortical band) of one 0.5 mm slice of ``head`` at ``z``: the band 1.5-14 mm
    inside the inner table, the interhemispheric fissure (4 mm either side of the midline) left out."""
    tissue, inside = _tissue_by_depth(head, z)
    x = (np.arange(400) - 199.5) * 0.5
    return tissue, (inside > 1.5) & (inside < 14) & (np.abs(x)[None, :] > 4)


def test_sulci_are_irregular_clefts_that_widen_with_age():
    """Sulci meander, branch and end at uneven intervals, as real ones do on axial CT, where they used to be
    straight spokes at even angles (the gaps between neighbouring sulci then varied by a third of their mean;
    now by over half); older heads have wider ones (more CSF in the cortical band)."""
    import dataclasses

    spreads, shares = [], {}
    for seed in (5, 6, 7, 8):
        head = an.sample_head(np.random.default_rng(seed))
        for atrophy in (0.9, 1.5):
            for dz in (10.0, 30.0):
                tissue, band = _cortical_band(dataclasses.replace(head, atrophy=atrophy), head.widest + dz)
                sulci = (tissue == an.CSF) & band
                shares[seed, atrophy, dz] = sulci.sum() / band.sum()
                parts, n = ndimage.label(sulci, np.ones((3, 3)))
                size = ndimage.sum(sulci, parts, range(1, n + 1))
                centres = ndimage.center_of_mass(sulci, parts, range(1, n + 1))
                angles = np.sort([np.arctan2(c[1] - 199.5, 199.5 - c[0]) for c, s in zip(centres, size) if s >= 8])
                gaps = np.diff(np.concatenate([angles, angles[:1] + 2 * np.pi]))
                assert len(angles) >= 5 and 0.005 < shares[seed, atrophy, dz] < 0.12
                spreads.append(gaps.std() / gaps.mean())
                extent = max(max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in ndimage.find_objects(parts))
                assert extent * 0.5 < 30  # clefts a few mm to two centimetres long, never a ring
    assert np.median(spreads) > 0.5, spreads  # the spokes measured 0.31
    for seed in (5, 6, 7, 8):
        for dz in (10.0, 30.0):
            assert shares[seed, 1.5, dz] > 1.5 * shares[seed, 0.9, dz]


def test_the_folding_pattern_changes_the_cortex_and_no_other_draw(monkeypatch):
    """The folds are drawn from a generator of their own, seeded by the cortex's own draw: with the folding
    left unpainted (the same two draws taken from the head's generator), everything outside the cranial
    cavity (at each slice's centre) is identical, and what changes is the cortex (grey, white matter, sulcal CSF)."""
    import dataclasses

    head = dataclasses.replace(an.sample_head(np.random.default_rng(6)), atrophy=1.3)
    fr = an.Frame(rows=200, cols=200, spacing=1.0, thickness=5.0,
                  z=np.array([head.widest + 10.0, head.widest + 30.0], np.float32), angle=0.0, shift=(0.0, 0.0))
    folded = an.build(head, fr, np.random.default_rng(0))

    def unfolded(cv, cavity, extra, efface, distended, rng):
        rng.uniform(0, 2 * np.pi, 3)
        rng.uniform(0.45, 1.15)

    monkeypatch.setattr(an, "_cortex_and_sulci", unfolded)
    plain = an.build(head, fr, np.random.default_rng(0))
    changed = folded.hu != plain.hu
    assert changed.sum() > 500
    cortex = np.isin(folded.tissue[changed], (an.GREY, an.WHITE, an.CSF))
    assert cortex.mean() > 0.95  # the rest: deep structures laid partly over the folds at their edges
    # outside the cavity at the slice's centre (a voxel inside it whose slab is mostly bone holds some cortex)
    outside = np.isin(plain.tissue, (an.AIR, an.SOFT, an.FAT, an.BONE)) & (plain.depth <= 0)
    assert outside.sum() > 10_000 and np.array_equal(folded.hu[outside], plain.hu[outside])
    assert np.array_equal(folded.tissue[outside], plain.tissue[outside])


def test_grey_matter_fills_the_outer_centimetre_and_white_matter_the_depth():
    """Both real sources (bench/realism.py's CT-ICH and GE heads, upper half of each series) read about 40
    HU 2-5 mm inside the inner table, 36-37 HU 8-12 mm in and 30-34 HU 15-40 mm in: cortex folded into gyri
    fills most of the outer centimetre. The phantom's cortex (3.5 mm, white matter deepest under the
    sulci) is grey over most of the outer 8 mm, about half of 8-12 mm, and white beyond (its white matter
    used to begin a few mm in, which left the band under the table 2-3 HU darker than real)."""
    for seed in (5, 6, 7, 8):
        head = an.sample_head(np.random.default_rng(seed))
        for dz in (10.0, 30.0):
            tissue, inside = _tissue_by_depth(head, head.widest + dz)
            brain = np.isin(tissue, (an.GREY, an.WHITE))

            def grey(lo: float, hi: float) -> float:
                return float((tissue[(inside > lo) & (inside <= hi) & brain] == an.GREY).mean())

            assert grey(2, 8) > 0.7 and 0.35 < grey(8, 12) < 0.8 and grey(15, 25) < 0.05, (seed, dz)


def test_brainstem_cisterns_lie_in_front_and_at_the_sides_and_widen_with_age():
    """The cisterns of the brainstem are the prepontine and cerebellopontine ones, in front and at its
    sides, with the clivus in front of them; behind it lie the fourth ventricle and the cerebellum. The
    phantom's used to be a ring of CSF 2-3 mm wide all round, so its lower slices held several times the
    deep CSF of real heads (docs/phantom.md). Along rays out of the brainstem's centre (mid-pons level,
    0.5 mm pixels): CSF in front, up to about 1 mm in a young head and 2.5 mm or more in an old one, bone
    right after it, and next to none behind it at 45 degrees either side of the midline."""
    import dataclasses

    from scipy.ndimage import map_coordinates

    for seed in (5, 6, 7):
        head = an.sample_head(np.random.default_rng(seed))
        front = {}
        for atrophy in (0.8, 1.6):
            tissue, _ = _tissue_by_depth(dataclasses.replace(head, atrophy=atrophy), -10.0)
            centre = 199.5 + 0.12 * head.b / 0.5  # row of the brainstem's centre (rows run to the back)

            def ray(angle: float) -> np.ndarray:  # tissue codes every 0.1 mm out of the centre; 0 = forward
                r = np.arange(0, 30, 0.1) / 0.5
                return map_coordinates(tissue, [centre - r * np.cos(angle), 199.5 + r * np.sin(angle)], order=0)

            def csf_beyond_stem(codes: np.ndarray) -> float:  # mm of CSF right after the brainstem's edge
                edge = int(np.nonzero(codes != an.WHITE)[0][0])
                after = codes[edge:] == an.CSF
                return float(np.argmin(after) if not after.all() else len(after)) * 0.1

            assert ray(0)[0] == an.WHITE
            front[atrophy] = csf_beyond_stem(ray(0.0))
            ahead = ray(0.0)
            ahead = ahead[int(np.nonzero(ahead != an.WHITE)[0][0]):]
            # then the clivus: the fossa no longer reaches two centimetres in front of the brainstem
            assert np.nonzero(ahead == an.BONE)[0][0] * 0.1 <= front[atrophy] + 1.5, (seed, atrophy)
            for back in (np.deg2rad(135), np.deg2rad(-135)):
                assert csf_beyond_stem(ray(back)) <= 0.6, (seed, atrophy)  # the ring: 2.3-3.1 mm
        assert front[0.8] <= 1.2 and front[1.6] >= 2.5, (seed, front)


def test_choroid_glomus_is_a_tuft_in_each_atrium_calcified_in_clumps():
    """The choroid plexus glomus hangs in each atrium as a tuft of lobules (about 5 x 7 mm young, up to
    10 x 14 mm old), different on the two sides; an adult head's is calcified in clumps. Calcifying it
    changes nothing outside the ventricles (it used to be one 5 x 7 mm ellipse of fixed place and size,
    and bright spots like real calcified glomera drew intraventricular calls from the bundled model on
    clean real heads: docs/training.md)."""
    import dataclasses

    areas = {}
    for seed in (5, 6, 7):
        for atrophy in (0.85, 1.55):
            head = dataclasses.replace(an.sample_head(np.random.default_rng(seed)), atrophy=atrophy)
            fr = an.Frame(rows=400, cols=400, spacing=0.5, thickness=5.0, z=np.array([head.widest - 8], np.float32),
                          angle=0.0, shift=(0.0, 0.0))
            plain = an.build(head, fr, np.random.default_rng(0))
            calc = an.build(head, fr, np.random.default_rng(0), calcified={"choroid": 500.0})
            changed = plain.hu[0] != calc.hu[0]
            assert changed.any() and (plain.tissue[0][changed] == an.VENTRICLE).all()
            dense = (calc.tissue[0] == an.CALCIUM) & (calc.hu[0] > 250)
            x = (np.arange(400) - 199.5) * 0.5
            left, right = dense & (x[None, :] > 0), dense & (x[None, :] < 0)
            areas[seed, atrophy] = (left.sum() * 0.25, right.sum() * 0.25)
            assert min(areas[seed, atrophy]) > 1.0 and max(areas[seed, atrophy]) < 120, areas
            assert not np.array_equal(left, np.fliplr(right))  # not a mirror image
    for seed in (5, 6, 7):
        assert sum(areas[seed, 1.55]) > 1.5 * sum(areas[seed, 0.85]), areas


def test_thin_phantom_slices_carry_the_noise_of_their_thickness():
    """Noise at a fixed dose grows as 1 / sqrt(thickness): the same draw at 1.25 mm is exactly twice that at 5 mm."""
    from ichscan.phantom import anatomy as an
    from ichscan.phantom.artifacts import add_noise

    def noise(thickness):
        fr = an.Frame(rows=64, cols=64, spacing=0.5, thickness=thickness, z=np.array([40.0], np.float32),
                      angle=0.0, shift=(0.0, 0.0))
        hu = np.full((1, 64, 64), 30.0, np.float32)
        add_noise(hu, fr, 4.0, np.random.default_rng(7))
        return hu - 30.0

    assert np.allclose(noise(1.25), 2.0 * noise(5.0), atol=1e-4)
    assert np.allclose(noise(10.0), noise(5.0) / np.sqrt(2.0), atol=1e-4)


def _head_frame(seed: int, z: list[float], thickness: float = 5.0, size: int = 400, spacing: float = 0.5):
    head = an.sample_head(np.random.default_rng(seed))
    fr = an.Frame(rows=size, cols=size, spacing=spacing, thickness=thickness, z=np.array(z, np.float32),
                  angle=0.0, shift=(0.0, 0.0))
    return head, fr


def test_tentorium_is_a_v_opening_forward_with_the_straight_sinus_at_its_apex(monkeypatch):
    """Cut axially between the torcula and the vein of Galen, the tentorium is a band of dura on each side
    whose leaves come together behind (the straight sinus, dense with blood, at the apex) and part in front
    around the midbrain. With the tentorium and deep veins left undrawn, nothing else changes: they take
    no draw of the head's generator."""
    for seed in (5, 6, 7):
        head, _ = _head_frame(seed, [0.0])
        t = an.tentorium(head)
        z = t.z_torc + 0.45 * (t.z_galen - t.z_torc)
        head, fr = _head_frame(seed, [z], thickness=2.5)
        drawn = an.build(head, fr, np.random.default_rng(0))
        monkeypatch.setattr(an, "_tentorium_and_deep_veins", lambda *a, **k: None)
        plain = an.build(head, fr, np.random.default_rng(0))
        monkeypatch.undo()
        rise = drawn.hu[0] - plain.hu[0]
        assert (rise >= -1e-3).all()  # dura and venous blood are denser than the brain they lie in
        changed = rise > 0.5
        assert np.isin(plain.tissue[0][changed], (an.GREY, an.WHITE, an.CSF, an.VENTRICLE, an.DURA)).all()
        x = (np.arange(400) - 199.5) * 0.5  # head frame mm: columns run to the patient's left, rows to the back

        def band_half_width(row_y: float) -> float:  # |X| of the band's densest point on one row, left side
            r = int(round(row_y / 0.5 + 199.5))
            left = np.where(x > 4, rise[r], 0)
            return float(x[int(np.argmax(left))]) if left.max() > 3 else float("nan")

        # the leaves part towards the front: the band lies further out on a row nearer the midbrain
        y_apex = t.y_torc - (z - t.z_torc) / (t.z_galen - t.z_torc) * (t.y_torc - t.y_galen)
        back, front = band_half_width(y_apex - 8), band_half_width(y_apex - 24)
        assert 3 < back < front, (seed, back, front)
        # the straight sinus: blood density in the midline at the apex, none of it at the same row's sides
        r = int(round(y_apex / 0.5 + 199.5))
        c = int(np.argmin(np.abs(x)))
        assert drawn.hu[0][r, c] > 40 and rise[r, c] > 8, (seed, drawn.hu[0][r, c])
        # in front of the vein of Galen (the incisura) the midline is untouched
        r_front = int(round((t.y_galen - 12) / 0.5 + 199.5))
        assert abs(rise[r_front, c]) < 1e-3


def test_tentorium_partial_volume_shrinks_with_slice_thickness(monkeypatch):
    """A sheet of dura about 1 mm thick fills a larger share of a thin slice than of a thick one: drawn at
    the same level, the tent's densest rise over the brain outside the midline (where the straight sinus
    is) falls as the slice thickens, and on a 10 mm slice it is a haze of a few HU."""
    head, _ = _head_frame(6, [0.0])
    t = an.tentorium(head)
    z = t.z_torc + 0.4 * (t.z_galen - t.z_torc)
    peaks = {}
    for thickness in (1.0, 5.0, 10.0):
        _, fr = _head_frame(6, [z], thickness=thickness)
        drawn = an.build(head, fr, np.random.default_rng(0))
        monkeypatch.setattr(an, "_tentorium_and_deep_veins", lambda *a, **k: None)
        plain = an.build(head, fr, np.random.default_rng(0))
        monkeypatch.undo()
        x = (np.arange(400) - 199.5) * 0.5
        rise = (drawn.hu[0] - plain.hu[0])[:, np.abs(x) > 8]
        peaks[thickness] = float(rise.max())
    # dura 48-58 HU over brain of about 30: a full voxel rises by 15-30 HU
    assert peaks[1.0] > 12 and peaks[1.0] > peaks[5.0] > peaks[10.0] > 1, peaks
    assert peaks[10.0] < 0.5 * peaks[1.0], peaks


@pytest.mark.parametrize("site", ["tentorium", "falx"])
def test_subdurals_along_the_tentorium_and_falx_lie_on_the_dura_on_one_side(site):
    """A tentorial subdural is blood on the upper face of one leaf, a falcine one a layer beside the falx
    on one side; both are labelled, and the blood is the lesion's density where it fills the voxel."""
    from ichscan.phantom import lesions

    head, _ = _head_frame(5, [0.0])
    t = an.tentorium(head)
    zs = list(np.arange(t.z_lat, t.z_galen + 5, 2.5)) if site == "tentorium" else [70.0, 80.0]
    head, fr = _head_frame(5, zs, thickness=2.5)
    anat = an.build(head, fr, np.random.default_rng(0))
    if site == "tentorium":
        les = lesions.Lesion("subdural", "acute", (t.z_lat + t.z_galen) / 2, (t.z_galen - t.z_lat) / 2 + 3, 70.0,
                             1.0, {"site": site, "thickness": 5.0, "mass_mm": 0.0})
    else:
        les = lesions.Lesion("subdural", "acute", 75.0, 20.0, 70.0, 1.0, {
            "site": site, "thickness": 4.0, "y_centre": -0.3 * head.b, "y_half": 0.35 * head.b, "mass_mm": 0.0})
    before = anat.hu.copy()
    mask = lesions.paint_lesion(les, head, fr, anat, np.random.default_rng(0))
    assert mask.sum() > 300
    x = np.broadcast_to(fr.X, mask.shape)
    assert (x[mask] > 0).all()  # the patient's left only
    # where what it lies on was not denser than the blood: dura, or brain sharing its slab with the bone that
    # curves through the slice, stays brighter where the blood fills only part of the voxel
    soft = before[mask] <= 70.0
    assert soft.mean() > 0.9
    blood = anat.hu[mask][soft]
    assert blood.max() <= 70.0 + 1e-3 and (np.abs(blood - 70.0) < 1e-3).mean() > 0.3 and np.median(blood) > 55
    if site == "falx":
        assert x[mask].max() < 0.35 + 4.0 + 0.5  # within the layer's thickness of the midline
    else:
        level, cover = an.tentorium_level(head, t, fr.X[0], fr.Y[0])
        for i in np.nonzero(mask.any(axis=(1, 2)))[0]:
            above = np.broadcast_to(level, mask[i].shape)[mask[i]]
            # on the sheet's upper face: its level lies within the slice or just below it
            assert (above <= fr.z[i] + fr.thickness / 2 + 1e-3).all() and (cover[mask[i]] > 0.5).all()


def test_some_acute_subdurals_are_planned_along_the_tentorium_and_falx():
    """About a tenth of acute subdurals each lie along the tentorium and the falx; the choice takes no draw
    from the plan's generator, so every lesion planned after a subdural is what it was."""
    from ichscan.phantom import lesions

    head = an.sample_head(np.random.default_rng(3))
    fr = an.Frame(rows=64, cols=64, spacing=4.0, thickness=5.0, z=np.arange(-40, 120, 5, dtype=np.float32),
                  angle=0.0, shift=(0.0, 0.0))
    sites = Counter()
    for seed in range(400):
        rng = np.random.default_rng(seed)
        les = lesions.plan_lesion("subdural", head, fr, rng)
        sites[les.params.get("site", "convexity")] += 1
        after = rng.random()
        if les.params.get("site") in ("tentorium", "falx"):
            assert les.kind == "acute"
            # the same draws as a convexity plan: the generator is where it would have been
            rng2 = np.random.default_rng(seed)
            lesions.plan_lesion("subdural", head, fr, rng2)
            assert rng2.random() == after
    assert 15 < sites["tentorium"] < 50 and 15 < sites["falx"] < 50, sites


def test_a_childs_head_grows_towards_an_adults():
    """``child_head``: the head's size against an adult's (growth charts: about 87% of the circumference at
    2 years, 92% at 5, 97% at 10), a thin vault (40% of the adult draw at 2, all of it from 16), no atrophy,
    and sinuses that pneumatize with age (frontal from 6, sphenoid from 3)."""
    head = an.sample_head(np.random.default_rng(4))
    kids = {age: an.child_head(head, age, np.random.default_rng(0)) for age in (2.0, 5.0, 10.0, 17.0)}
    assert [round(kids[a].scale, 2) for a in (2.0, 5.0, 10.0)] == [0.87, 0.92, 0.97] and kids[17.0].scale > 0.98
    # head-frame sizes are the patient's over the scale: the vault in the patient's mm
    assert kids[2.0].skull * kids[2.0].scale == pytest.approx(0.4 * head.skull)
    assert kids[10.0].skull * kids[10.0].scale == pytest.approx((0.4 + 0.6 * 8 / 14) * head.skull)
    assert kids[17.0].skull * kids[17.0].scale == pytest.approx(head.skull)
    assert (kids[2.0].frontal_sinus, kids[2.0].sphenoid_sinus, kids[5.0].frontal_sinus) == (0.0, 0.0, 0.0)
    assert kids[10.0].frontal_sinus == pytest.approx(4 / 9) and kids[17.0].frontal_sinus == 1.0
    assert kids[2.0].suture_gap == pytest.approx(1.1) and kids[17.0].suture_gap == 0.5
    assert all(0.76 <= k.atrophy <= 0.86 and k.age == int(a) for a, k in kids.items())
    # the rest is the adult draw's
    assert (kids[5.0].grey, kids[5.0].white, kids[5.0].coronal, kids[5.0].a) == (head.grey, head.white,
                                                                                 head.coronal, head.a)
    assert head.scale == 1.0 and head.frontal_sinus == 1.0 and head.suture_gap == 0.5
    with pytest.raises(ValueError, match="child age 1"):
        an.child_head(head, 1.0, np.random.default_rng(0))


def _widest_cavity_mm(ps) -> float:
    """The cranial cavity's widest extent across any row of any slice, in the patient's mm."""
    return float(max((d > 0).sum(axis=1).max() for d in ps.depth)) * ps.frame.mm_spacing


def test_a_childs_head_is_drawn_smaller_in_the_same_field_of_view():
    """The same head drawn as a 4-year-old's and as an adult's on the same draws: the pixels and slices are
    the patient's millimetres alike, and the child's cavity is ``scale`` as wide; its vault is thinner."""
    head = an.sample_head(np.random.default_rng(4))
    kid = an.child_head(head, 4.0, np.random.default_rng(0))
    adult, child = (make_series(h, (), np.random.default_rng(7), n=30, rows=256, cols=256, thickness=5.0,
                                confounders={}) for h in (head, kid))
    assert child.frame.mm_spacing == pytest.approx(adult.frame.mm_spacing)
    assert 200 <= child.frame.mm_spacing * 256 <= 262
    assert child.frame.mm_thickness == pytest.approx(5.0) and child.frame.thickness == pytest.approx(5.0 / kid.scale)
    assert np.allclose(np.diff(child.frame.mm_z), 5.0, atol=1e-4)
    assert _widest_cavity_mm(child) / _widest_cavity_mm(adult) == pytest.approx(kid.scale, abs=0.02)
    # the vault over the forehead, in the patient's mm: at 4 years (0.4 + 0.6 x 2/14) of the adult draw
    z, rays = head.widest + 20.0, range(-25, 26, 5)
    adult_mm, child_mm = _bone_mm(_level(head, z), rays), _bone_mm(_level(kid, z), rays) * kid.scale
    assert adult_mm == pytest.approx(head.skull, abs=1.2)
    assert child_mm == pytest.approx((0.4 + 0.6 * 2 / 14) * head.skull, abs=1.0) and child_mm < 0.6 * adult_mm


def test_a_young_childs_frontal_and_sphenoid_sinuses_are_not_yet_air():
    """Air in the frontal bone (levels above the skull base, only the frontal sinuses have any) and in the
    sphenoid body: none at 2-4 years, some at 12, an adult's most."""
    head = an.sample_head(np.random.default_rng(4))

    def air(h):
        ps = make_series(h, (), np.random.default_rng(7), n=40, rows=192, cols=192, thickness=3.0, confounders={})
        z = ps.frame.z
        sinus = ps.tissue == an.SINUS
        Y = ps.frame.Y[0]
        sphenoid = (np.abs(ps.frame.X[0]) < 10) & (np.abs(Y + 0.28 * h.b) < 9)
        return int(sinus[z > 13].sum()), int(sinus[(z > -10) & (z < 6)][:, sphenoid].sum())
    adult, twelve, two = air(head), air(an.child_head(head, 12.0, np.random.default_rng(0))), \
        air(an.child_head(head, 2.5, np.random.default_rng(0)))
    assert two == (0, 0)
    assert 0 < twelve[0] < adult[0] and twelve[1] > 0 and adult[1] > 0


def test_children_are_a_share_of_patients_and_change_nothing_else():
    """--children: a share of patients, each of their studies (and a twin) the same child; every other draw
    of the set stays as it was, except that a child has no adult calcification."""
    import dataclasses

    from ichscan.phantom.dataset import head_for

    kw = dict(size=64, slices=(8, 10), prevalence="any=0.6", twins=0.5, calcification=1.0)
    plans, plain = plan_dataset(600, 9, children=0.25, **kw), plan_dataset(600, 9, **kw)
    uncalcified = plan_dataset(600, 9, **{**kw, "calcification": 0.0})
    assert [dataclasses.replace(p, child=None, confounders={}) for p in plans] == \
           [dataclasses.replace(p, confounders={}) for p in plain]
    # an adult's confounders are the plain set's; a child's those the set has without --calcification
    for p, q, u in zip(plans, plain, uncalcified):
        assert p.confounders == (q.confounders if p.child is None else u.confounders)
    dropped = [p for p, q, u in zip(plans, plain, uncalcified)
               if p.child is not None and q.confounders != u.confounders]
    assert len(dropped) > 20  # children whom the adult rates would have given calcifications
    by_patient: dict[int, set] = {}
    for p in plans:
        by_patient.setdefault(p.patient_index, set()).add(p.child)
    assert all(len(ages) == 1 for ages in by_patient.values())
    young = [a for (a,) in by_patient.values() if a is not None]
    assert 0.18 <= len(young) / len(by_patient) <= 0.32 and all(2 <= a <= 17 for a in young)
    kid = next(p for p in plans if p.child is not None)
    h = head_for(kid)
    assert h.age == int(kid.child) and h.scale < 1 and head_for(plain[kid.index]).scale == 1.0
    assert not any(p.child is not None for p in plain)
    with pytest.raises(IchscanError, match="children 1.5"):
        plan_dataset(2, 6, size=64, slices=(8, 10), children=1.5)


def test_childrens_files_carry_the_patients_millimetres(tmp_path):
    """A child's series as written: PixelSpacing and the slice positions in the patient's mm (the field of
    view 200-262 mm, slices the thickness apart), PatientAge under 18 years, the scale in the manifest."""
    import json

    generate_dataset(tmp_path, 2, seed=4, size=64, slices=(6, 6), thickness=4.0, children=1.0)
    frames = {p.series_uid: render_series(p).frame for p in plan_dataset(2, 4, size=64, slices=(6, 6),
                                                                         thickness=4.0, children=1.0)}
    for s in find_series(tmp_path).series:
        fr = frames[s.series_uid]
        assert fr.scale < 0.99  # drawn in a head frame larger than the patient's mm
        assert s.slice_spacing == pytest.approx(4.0, abs=1e-3) and fr.thickness == pytest.approx(4.0 / fr.scale)
        assert s.pixel_spacing[0] == pytest.approx(fr.spacing * fr.scale, rel=1e-5)
        assert 200 <= s.pixel_spacing[0] * 64 <= 262
        ds = dcmread(s.slices[0].path, stop_before_pixels=True)
        assert int(ds.PatientAge[:3]) < 18 and float(ds.SliceThickness) == 4.0
    heads = [s["head"] for s in json.loads((tmp_path / "manifest.json").read_text())["series"]]
    assert all(h["age"] < 18 and 0.86 < h["scale"] < 1 for h in heads)


def test_the_frontal_compartment_lies_above_the_orbital_roof():
    """``orbital_roof_height`` is the floor the cavity is drawn with: over the frontal compartment (away
    from the temporal lobes and the merging ellipse), thin slices hold brain above it and none below it,
    but for the inner table's roughness (a millimetre or so)."""
    for seed in (1, 2):
        head, fr = _head_frame(seed, [2.0, 5.0, 8.0, 10.0], thickness=0.5, size=256, spacing=0.9)
        anat = an.build(head, fr, np.random.default_rng(0))
        X, Y = fr.X[0], fr.Y[0]
        floor = an.orbital_roof_height(head, X, Y)
        agree, total = 0, 0
        for i, z in enumerate(fr.z):
            other = np.max(np.stack(an._temporal_and_merging(head, X, Y, np.float32(z))), axis=0) > -2
            clear = (floor < an.ROOF_TOP) & ~other & (np.abs(floor - z) > 2.0)
            agree += int(((anat.depth[i] > 0) == (z > floor))[clear].sum())
            total += int(clear.sum())
        assert total > 1000 and agree > 0.97 * total, (seed, agree, total)


def test_a_thick_slice_over_the_orbital_roofs_is_the_mean_of_the_thin_slices_it_spans(monkeypatch):
    """Partial volume through the slice: a 5 mm voxel over the anterior cranial fossa's floor holds what the
    ten 0.5 mm slices across it hold, on average (brain, the roof's plate, the orbit or bone under it),
    where drawn at its centre level alone it was brain or bone (the pass left out: about 240 HU off per
    voxel, and the band's median 70-290 HU off; since the ethmoid cells are a foam averaged through the slab,
    about 195 HU per voxel)."""
    def compare(seed, z):
        head, thick = _head_frame(seed, [z - 5, z, z + 5], thickness=5.0, size=256, spacing=0.9)
        _, thin = _head_frame(seed, list(z - 2.25 + 0.5 * np.arange(10)), thickness=0.5, size=256, spacing=0.9)
        a = an.build(head, thick, np.random.default_rng(1)).hu[1]
        b = an.build(head, thin, np.random.default_rng(1)).hu.mean(axis=0)
        floor = an.orbital_roof_height(head, thick.X[0], thick.Y[0])
        band = (floor < an.ROOF_TOP) & (np.abs(floor - z) < 2.0) & (thick.Y[0] < -0.4 * head.b)
        return abs(float(np.median(a[band]) - np.median(b[band]))), float(np.median(np.abs(a - b)[band]))

    cases = [(seed, z) for seed in (0, 1, 2) for z in (4.0, 8.0)]
    drawn = [compare(*c) for c in cases]
    assert max(d[0] for d in drawn) < 120, drawn
    assert np.mean([d[1] for d in drawn]) < 180, drawn
    monkeypatch.setattr(an, "_orbital_roofs", lambda *a, **k: None)
    centre = [compare(*c) for c in cases]
    assert np.mean([d[1] for d in centre]) > max(150, 2 * np.mean([d[1] for d in drawn])), (centre, drawn)


# Each floor drawn through the slice: the pass, a level over its floor, a level far below it, and the points
# over the floor.
FLOOR_PASSES = {
    "orbital_roofs": ("_orbital_roofs", 6.0, -30.0, lambda h, X, Y: an.orbital_roof_height(h, X, Y) < an.ROOF_TOP),
    "middle_fossae": ("_middle_fossae", -12.0, -34.0, lambda h, X, Y: np.isfinite(an.middle_fossa_floor(h, X, Y))),
}


@pytest.mark.parametrize("floor", sorted(FLOOR_PASSES))
def test_a_floor_haze_widens_with_slice_thickness_and_takes_no_draw(monkeypatch, floor):
    """Over the anterior cranial fossa's floor (the orbital roofs) and the middle fossae's: the band a slice
    over the floor shows as neither brain nor bone (80-600 HU) is wider on a 5 mm slice than on a 1 mm one,
    as a gently rising plate cut by a thicker slab spreads further; and the pass changes only the slices
    over its floor, taking no draw of the head's generator."""
    name, level, below, over = FLOOR_PASSES[floor]
    head, _ = _head_frame(3, [0.0])
    widths = {}
    for thickness in (1.0, 5.0):
        _, fr = _head_frame(3, [level], thickness=thickness, size=256, spacing=0.9)
        hu = an.build(head, fr, np.random.default_rng(0)).hu[0]
        widths[thickness] = int(((hu > 80) & (hu < 600) & over(head, fr.X[0], fr.Y[0])).sum())
    assert widths[5.0] > 1.5 * widths[1.0], widths
    _, fr = _head_frame(3, [below, level, 40.0], thickness=5.0, size=128, spacing=1.8)
    drawn = an.build(head, fr, np.random.default_rng(0))
    monkeypatch.setattr(an, name, lambda *a, **k: None)
    plain = an.build(head, fr, np.random.default_rng(0))
    assert np.array_equal(drawn.hu[[0, 2]], plain.hu[[0, 2]])
    assert not np.array_equal(drawn.hu[1], plain.hu[1])


def test_the_orbital_roof_haze_takes_from_neighbours_only_beyond_the_slab():
    """What lies below the roof in a voxel's slab comes from the slice below when that slice's centre lies
    beyond the slab (a marker of 5000 HU there shows up), and never from a slice that overlaps the slab,
    where the pass falls back to orbit, ethmoid or bone of at most 700 HU (with the plate, at most 1500)."""
    head, _ = _head_frame(2, [0.0])
    peaks = {}
    for below in (1.0, 4.0):  # a slice apart (5 mm slices), or overlapping the slab of the slice at 6 mm
        _, fr = _head_frame(2, [below, 6.0], thickness=5.0, size=256, spacing=0.9)
        hu = np.stack([np.full((256, 256), 5000.0, np.float32), np.full((256, 256), 30.0, np.float32)])
        tissue = np.zeros(hu.shape, np.uint8)
        depth = np.full(hu.shape, 10.0, np.float32)  # brain at the slice's centre everywhere
        depth[0] = -10.0  # and under the roof on the slice below
        an._orbital_roofs(head, fr, hu, tissue, depth)
        peaks[below] = float(hu[1].max())
    assert peaks[1.0] > 2000, peaks
    assert 100 < peaks[4.0] <= 1500, peaks


def test_the_temporal_compartments_lie_above_the_middle_fossa_floor():
    """``middle_fossa_floor`` with no bowl is the floor the temporal compartments are drawn with: away from
    the other compartments, thin slices hold brain above it and none below it, but for the inner table's
    roughness. With a bowl of ``rise`` mm the floor lies at or above that one: at the drawn level in the middle
    of each fossa's base, rising to ``rise`` mm above it at the base's rim."""
    for seed in (1, 2):
        head, fr = _head_frame(seed, [-15.0, -12.0, -8.0, -4.0], thickness=0.5, size=256, spacing=0.9)
        anat = an.build(head, fr, np.random.default_rng(0))
        X, Y = fr.X[0], fr.Y[0]
        floor = an.middle_fossa_floor(head, X, Y)
        agree, total = 0, 0
        for i, z in enumerate(fr.z):
            zz = np.float32(z)
            others = an._temporal_and_merging(head, X, Y, zz)[2:] + [an._frontal_depth(head, X, Y, zz),
                                                                      an._posterior_fossa_depth(head, X, Y, zz)]
            clear = np.isfinite(floor) & (np.max(np.stack(others), axis=0) < -2) & (np.abs(floor - z) > 2.0)
            agree += int(((anat.depth[i] > 0) == (z > floor))[clear].sum())
            total += int(clear.sum())
        assert total > 1000 and agree > 0.97 * total, (seed, agree, total)
        bowl = an.middle_fossa_floor(head, X, Y, rise=6.0)
        base = floor == an.TEMPORAL_LEVELS[0]
        assert base.sum() > 200 and np.all(bowl[np.isfinite(floor)] >= floor[np.isfinite(floor)] - 1e-4)
        assert bowl[base].min() < an.TEMPORAL_LEVELS[0] + 0.5 and bowl[base].max() > an.TEMPORAL_LEVELS[0] + 5.0


def test_a_thick_slice_over_the_middle_fossae_is_the_mean_of_the_thin_slices_it_spans(monkeypatch):
    """Partial volume through the slice: a 5 mm voxel over the bottom of a middle cranial fossa holds what
    the ten 0.5 mm slices across it hold, on average (the temporal lobe, the floor's plate, the soft tissue
    under it). Drawn at its centre level alone it was brain (or soft tissue) throughout: 150-600 HU off per
    voxel (median over the bowls' front halves), where the pass leaves it 1-7 HU off."""
    def slices(seed, z):
        head, thick = _head_frame(seed, [z - 5, z, z + 5], thickness=5.0, size=256, spacing=0.9)
        _, thin = _head_frame(seed, list(z - 2.25 + 0.5 * np.arange(10)), thickness=0.5, size=256, spacing=0.9)
        base = an.middle_fossa_floor(head, thick.X[0], thick.Y[0]) == an.TEMPORAL_LEVELS[0]  # the bowls' bottoms
        return head, thick, thin, base & (thick.Y[0] < 0)  # in front of the petrous ridges

    cases = [(seed, z) for seed in (0, 1, 2) for z in (-15.0, -13.0)]
    truth = [an.build(h, thin, np.random.default_rng(1)).hu.mean(axis=0)
             for h, _, thin, _ in (slices(*c) for c in cases)]

    def errors():
        out = []
        for c, b in zip(cases, truth):
            head, thick, _, band = slices(*c)
            a = an.build(head, thick, np.random.default_rng(1)).hu[1]
            out.append((abs(float(np.median(a[band]) - np.median(b[band]))), float(np.median(np.abs(a - b)[band]))))
        return out

    drawn = errors()
    monkeypatch.setattr(an, "_middle_fossae", lambda *a, **k: None)
    centre = errors()
    assert max(d[1] for d in drawn) < 40 and np.mean([d[0] for d in drawn]) < 40, drawn
    assert np.mean([d[1] for d in centre]) > 100, centre


def test_a_floor_pass_makes_the_drawing_agree_with_the_floor_on_both_sides():
    """Where the floor's ridges lift it above a whole slab that was drawn as brain, the voxel becomes what
    lies below (here the slice below's 200 HU); where they drop it below a whole slab drawn as not brain, it
    becomes brain (the slice above's 30 HU); voxels wholly on the side they were drawn as stay untouched."""
    fr = an.Frame(rows=4, cols=4, spacing=1.0, thickness=2.0, z=np.array([0.0, 2.0, 4.0], np.float32),
                  angle=0.0, shift=(0.0, 0.0))
    hu = np.stack([np.full((4, 4), 200.0, np.float32), np.full((4, 4), 90.0, np.float32),
                   np.full((4, 4), 30.0, np.float32)])
    depth = np.stack([np.full((4, 4), -5.0, np.float32), np.where(np.arange(4) < 2, 5.0, -5.0)[None].repeat(4, 0),
                      np.full((4, 4), 5.0, np.float32)]).astype(np.float32)
    tissue = np.zeros(hu.shape, np.uint8)
    floor = np.array([[8.0, 8.0, 8.0, 8.0], [-8.0, -8.0, -8.0, -8.0], [8.0, -8.0, 8.0, -8.0],
                      [1.0, 1.0, 1.0, 1.0]], np.float32)  # rows: above the slab, below it, mixed, ...
    an._floor_through_slab(fr, hu, tissue, depth, floor, np.ones((4, 4), bool), (1.5, 2.5), 0.0, 1000.0,
                           np.float32(35.0), np.float32(40.0), lambda z0: np.zeros((4, 4), bool))
    got = hu[1]
    # columns 0-1 drawn as brain (depth > 0), 2-3 as not
    assert np.allclose(got[0, :2], 200.0) and np.allclose(got[0, 2:], 90.0)  # floor above the whole slab
    assert np.allclose(got[1, :2], 90.0) and np.allclose(got[1, 2:], 30.0)  # floor below the whole slab
    assert np.array_equal(hu[[0, 2]], np.stack([np.full((4, 4), 200.0), np.full((4, 4), 30.0)]))


def test_a_thick_slice_holds_the_cavity_as_the_thin_slices_it_spans_do():
    """Partial volume of the cranial cavity's surfaces through the slab, voxel by voxel: a 5 mm voxel's share
    inside the inner table is the mean of the shares of the fifty 0.1 mm slices it spans, to within 0.03 on
    average over the voxels the surface crosses: where the occipital bone curves under the posterior fossa
    (-28 mm), where the temporal squama and the lateral frontal bone rise beside the floors (-10 mm; the
    floors' own passes draw the slab over them, ``floor_feet``), in the middle of the vault and near the
    vertex. The single width per slice the vault had before (``_Canvas.smear``, the supratentorial
    ellipse's slope alone) was 0.05-0.2 off at the base and the vertex; in the middle of the vault, where
    that slope is the whole story, both are close."""
    from ichscan.phantom.geometry import ramp

    def frame(z, thickness):
        return an.Frame(rows=256, cols=256, spacing=0.9, thickness=thickness, z=np.array(z, np.float32),
                        angle=0.0, shift=(0.0, 0.0))

    for seed in (0, 1):
        head = an.sample_head(np.random.default_rng(seed))
        for z, where in ((-28.0, "base"), (-10.0, "base"), (head.top - 5, "vertex"), (60.0, "middle")):
            cv = an._blank_canvas(head, frame([z - 5, z, z + 5], 5.0))
            depth = an._cranial_cavity(cv).depth
            slab = an._slab_through(cv, depth)
            voxel = slab.share(depth)[1]
            before = ramp(-depth, cv.smear)[1]
            thin = an._blank_canvas(head, frame(list(z - 2.45 + 0.1 * np.arange(50)), 0.1))
            truth = ramp(-an._cranial_cavity(thin).depth, thin.w).mean(axis=0)
            crossed = (((truth > 0.02) & (truth < 0.98)) | ((voxel > 0.02) & (voxel < 0.98))) & ~slab.own[1]
            err, err_before = np.abs(voxel - truth)[crossed].mean(), np.abs(before - truth)[crossed].mean()
            assert crossed.sum() > 200 and err < 0.03, (seed, z, err)
            if where == "middle":
                assert err_before < 0.03, (seed, z, err, err_before)
            else:
                assert err_before > 0.05 and err < err_before / 3, (seed, z, err, err_before)


def test_the_head_is_painted_through_the_slab():
    """``build`` paints the vault and the brain with the slab's shares: voxels whose centre lies more than
    1 mm inside the inner table but whose slab is 15% or more outside it (the occipital bone under the
    posterior fossa at -28 mm, the vertex) hold bone's partial volume, a median of 150-210 HU on 5 mm slices.
    Painted from the centre's depth alone, as before 6 Dec 2026, they were brain or CSF: 31-42 HU."""
    for seed in (0, 1):
        head = an.sample_head(np.random.default_rng(seed))
        for z in (-28.0, head.top - 5):
            fr = an.Frame(rows=256, cols=256, spacing=0.9, thickness=5.0, z=np.array([z - 5, z, z + 5], np.float32),
                          angle=0.0, shift=(0.0, 0.0))
            anat = an.build(head, fr, np.random.default_rng(0))
            cv = an._blank_canvas(head, fr)
            depth = an._cranial_cavity(cv).depth
            slab = an._slab_through(cv, depth)
            pick = (depth[1] > 1.0) & (slab.share(depth)[1] < 0.85) & ~slab.own[1]
            assert pick.sum() > 80 and np.median(anat.hu[1][pick]) > 110, (seed, z, pick.sum())


def test_scanner_psf_tail_makes_bone_glow_into_the_brain_beside_it():
    """A 1200 HU half-plane of bone beside 40 HU brain, 0.25 mm pixels: the Gaussian core of 0.5 mm alone
    leaves the brain 0.875 mm from the edge at 40 + 1160 x Phi(-1.75) HU; a tail of 0.05 over 2 mm adds
    0.05 x 1160 x (Phi(-0.44) - Phi(-1.75)) = 15.6 HU there and next to nothing 8 mm away, and keeps the total (the
    point spread sums to one). Its share and width come from the kernel's own draw, not from the scan's
    generator."""
    from scipy.stats import norm

    from ichscan.phantom import artifacts

    fr = an.Frame(rows=1, cols=400, spacing=0.25, thickness=5.0, z=np.array([0.0], np.float32), angle=0.0,
                  shift=(0.0, 0.0))
    x = (np.arange(400) - 199.5) * 0.25  # mm; the edge between pixels 199 and 200
    hu = np.broadcast_to(np.where(x > 0, 1200.0, 40.0).astype(np.float32), (1, 40, 400)).copy()
    core = artifacts.scanner_blur(hu, fr, 0.5)[0, 20]
    both = artifacts.scanner_blur(hu, fr, 0.5, tail=0.05, tail_mm=2.0)[0, 20]
    at1, at8 = 196, 167  # pixel centres 0.875 and 8.125 mm from the edge, in the brain
    assert x[at1] == -0.875 and x[at8] == -8.125
    assert core[at1] == pytest.approx(40 + 1160 * norm.cdf(-0.875 / 0.5), abs=3.0)  # a sampled Gaussian kernel
    glow = 0.05 * 1160 * (norm.cdf(-0.875 / 2) - norm.cdf(-0.875 / 0.5))  # 15.6 HU
    assert both[at1] - core[at1] == pytest.approx(glow, abs=1.0)
    assert abs(both[at8] - core[at8]) < 0.1
    assert both[100:300].sum() == pytest.approx(hu[0, 20, 100:300].sum(), rel=1e-4)
    share, mm = artifacts.draw_psf_tail(0.6)
    assert (share, mm) == artifacts.draw_psf_tail(0.6) != artifacts.draw_psf_tail(0.61)
    assert 0.02 <= share <= 0.07 and 1.2 <= mm <= 2.5 and artifacts.PSF_REACH_MM == 7.5
