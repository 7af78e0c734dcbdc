"""Scan planes tilted against the head (``ichscan phantom --pitch``): slab geometry on volumes whose every
value is known, the direction of the tilt on a drawn head, and the plans, files and labels of a tilted set."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ichscan.dicom import find_series
from ichscan.errors import IchscanError
from ichscan.labels import SUBTYPES
from ichscan.phantom import anatomy as an
from ichscan.phantom import generate_dataset, oblique, plan_dataset
from ichscan.phantom.series import make_series


def _frame(pitch_deg=0.0, roll_deg=0.0, n=5, thickness=5.0, size=32, spacing=4.0):
    return an.Frame(rows=size, cols=size, spacing=spacing, thickness=thickness,
                    z=(10.0 + thickness * np.arange(n)).astype(np.float32), angle=0.0, shift=(0.0, 0.0),
                    pitch=float(np.deg2rad(pitch_deg)), roll=float(np.deg2rad(roll_deg)))


def test_level_offset_is_the_tilted_plane():
    fr = _frame(pitch_deg=20, roll_deg=5)
    off = oblique.level_offset(fr)[0]
    # rows run to the back of the head: the plane rises tan(20) = 0.364 mm per mm towards the back
    r, c = 31, 0  # last row: y = +62 mm; first column: x = -62 mm
    assert fr.y_img[0, r, c] == pytest.approx(62.0) and fr.x_img[0, r, c] == pytest.approx(-62.0)
    assert off[r, c] == pytest.approx(62 * np.tan(np.deg2rad(20)) - 62 * np.tan(np.deg2rad(5)), abs=1e-4)
    assert off[r, c] == pytest.approx(22.566 - 5.424, abs=1e-2)


def test_fine_frame_covers_every_slab():
    fr = _frame(pitch_deg=20, n=40)
    fine = oblique.fine_frame(fr)
    off = oblique.level_offset(fr)
    assert fine.thickness == pytest.approx(2.0)  # half of 5 mm, at most 2
    few = oblique.fine_frame(_frame(pitch_deg=20, n=5))  # 5 slices span 25 mm plus 2 x 45 of tilt: 115 mm
    assert few.n <= 4 * 8 + 2 and few.thickness > 2.0
    assert fine.pitch == 0.0 and fine.n <= 4 * max(fr.n, 8) + 2
    assert fine.z[0] - fine.thickness / 2 <= fr.z.min() + off.min() - fr.thickness / 2
    assert fine.z[-1] + fine.thickness / 2 >= fr.z.max() + off.max() + fr.thickness / 2
    np.testing.assert_allclose(np.diff(fine.z), fine.thickness, atol=1e-4)


def test_slab_mean_of_a_linear_ramp_is_the_level_at_its_centre():
    # a volume whose value is its own level in mm: the mean over any slab is the level at the slab's centre
    fr = _frame(pitch_deg=18, roll_deg=-4)
    fine = oblique.fine_frame(fr)
    vol = np.broadcast_to(fine.z[:, None, None], (fine.n, fr.rows, fr.cols)).astype(np.float32)
    slabs = oblique._Slabs(fine, fr)
    expected = fr.z[:, None, None] + oblique.level_offset(fr)
    # exact for a ramp of fine slices up to the two partly covered fine slices at the slab's ends, each
    # off by at most step^2 / 8 mm over the slab's 5 mm
    bound = 2 * fine.thickness**2 / 8 / fr.thickness
    err = np.abs(slabs.mean(vol) - expected)
    assert err.max() <= bound + 1e-4 and err.mean() < bound / 2
    # nearest: the fine slice whose own span holds the centre, so within half a fine slice of it
    assert np.abs(slabs.nearest(vol) - expected).max() <= fine.thickness / 2 + 1e-4


def test_slab_partial_volume_of_a_thin_layer():
    # 1000 HU in one fine slice (2 mm thick) and 0 elsewhere: a 5 mm slab centred on it reads 2/5 of it,
    # one centred 5 mm away nothing, and one centred 3 mm away overlaps 0.5 mm of it: 100 HU
    fr = _frame(n=3)
    fine = oblique.fine_frame(fr)
    assert fine.thickness == pytest.approx(2.0)
    k = int(np.argmin(np.abs(fine.z - fr.z[1])))
    fr = dataclasses.replace(fr, z=np.array([fine.z[k], fine.z[k] + 5.0, fine.z[k] + 3.0], np.float32))
    vol = np.zeros((fine.n, fr.rows, fr.cols), np.float32)
    vol[k] = 1000.0
    out = oblique._Slabs(fine, fr).mean(vol)
    np.testing.assert_allclose(out[:, 7, 9], [400.0, 0.0, 100.0], atol=1e-2)


def _top_brain_row(ps) -> float:
    """Mean image row (0 = front) of the brain on the highest slice that still holds 200 brain pixels."""
    brain = np.isin(ps.tissue, (an.GREY, an.WHITE))
    top = max(i for i in range(len(brain)) if brain[i].sum() >= 200)
    return float(np.nonzero(brain[top])[0].mean())


def test_the_tilt_has_the_right_direction_on_a_drawn_head():
    head = an.sample_head(np.random.default_rng(1))
    drawn = {}
    for pitch in (-20.0, 20.0):
        drawn[pitch] = make_series(head, ("subdural",), np.random.default_rng(5), n=40, rows=128, cols=128,
                                   thickness=5.0, confounders={}, lesion_rng=np.random.default_rng(7),
                                   pitch=pitch)
    # same head, same frame (drawn first from the same seed): only the tilt differs
    assert drawn[20.0].frame.shift == drawn[-20.0].frame.shift
    # pitch +20: the plane rises towards the back, so near the vertex only the front of the brain is left
    # (rows near 0); pitch -20 the reverse. 128 px over 200-262 mm: 20 rows are 31-41 mm.
    assert _top_brain_row(drawn[20.0]) < _top_brain_row(drawn[-20.0]) - 20
    for ps in drawn.values():
        assert ps.hu.shape == (40, 128, 128) and np.all(ps.hu == np.rint(ps.hu))
        lab = ps.slice_labels()
        assert lab[:, SUBTYPES.index("subdural")].any() and ps.series_labels()["subdural"] == 1  # the subdural survived resampling
        assert np.array_equal(lab.any(axis=1), np.stack(list(ps.masks.values())).any(axis=(0, 2, 3)))
        # where the mask says blood, the slab reads the blood's own density (this one is chronic, 12.8 HU; the
        # bone's glow adds a few HU to a thin collection against the table: 8.2 over it here), not brain's
        blood = ps.hu[ps.masks["subdural"]]
        assert abs(np.median(blood) - ps.lesions[0].hu) < 10 and np.median(blood) < ps.head.white


def test_plans_record_the_tilt_and_twins_keep_it():
    plans = plan_dataset(40, 6, size=64, slices=(8, 10), prevalence="any=0.9", twins=1.0, pitch=20)
    pitches = np.array([p.pitch for p in plans])
    rolls = np.array([p.roll for p in plans])
    assert np.all(np.abs(pitches) <= 20) and np.all(np.abs(rolls) <= 5)
    assert np.abs(pitches).max() > 5 and (pitches > 0).any() and (pitches < 0).any()
    twins = [p for p in plans if p.twin_of is not None]
    assert twins and all((t.pitch, t.roll) == (plans[t.twin_of].pitch, plans[t.twin_of].roll) for t in twins)
    # without --pitch nothing else changes: the same plans, untilted
    flat = plan_dataset(40, 6, size=64, slices=(8, 10), prevalence="any=0.9", twins=1.0)
    assert [dataclasses.replace(p, pitch=0.0, roll=0.0) for p in plans] == flat
    assert all(p.pitch == 0.0 and p.roll == 0.0 for p in flat)
    with pytest.raises(IchscanError, match="pitch 31"):
        plan_dataset(2, 6, size=64, slices=(8, 10), pitch=31)


def test_a_tilted_set_is_written_read_back_and_redrawn_the_same(tmp_path):
    out = tmp_path / "tilted"
    s = generate_dataset(out, 3, seed=4, size=64, slices=(10, 12), thickness="2.5-8", masks=True, pitch=20,
                         prevalence="any=1.0")
    man = json.loads((out / "manifest.json").read_text())
    assert man["arguments"]["pitch"] == 20.0
    series = {m["series_uid"]: m for m in man["series"]}
    assert all("pitch_deg" in m and abs(m["pitch_deg"]) <= 20 for m in series.values())
    scan = find_series(out / "images")
    assert len(scan.series) == 3 and not scan.skipped
    for ser in scan.series:
        vol = ser.volume()
        assert vol.shape[0] == series[ser.series_uid]["n_slices"]
        assert -1024 <= vol.min() and vol.max() <= 3071
        assert ser.z is not None and np.allclose(np.diff(ser.z), series[ser.series_uid]["thickness_mm"], atol=1e-3)
    assert sum(s.series_positive.values()) >= 3
    # same arguments: accepted, and drawn again byte for byte; other arguments (no pitch): refused
    before = {f.name: f.read_bytes() for f in (out / "images").iterdir()}
    generate_dataset(out, 3, seed=4, size=64, slices=(10, 12), thickness="2.5-8", masks=True, pitch=20,
                     prevalence="any=1.0")
    assert {f.name: f.read_bytes() for f in (out / "images").iterdir()} == before
    with pytest.raises(IchscanError, match="other arguments"):
        generate_dataset(out, 3, seed=4, size=64, slices=(10, 12), thickness="2.5-8", masks=True,
                         prevalence="any=1.0")
