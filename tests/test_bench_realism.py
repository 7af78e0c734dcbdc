"""bench/realism.py: the pieces checked on arrays whose answers a person can work out."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
REALCT = REPO.parent / "shared" / "realct"


@pytest.fixture(scope="module")
def realism():
    spec = importlib.util.spec_from_file_location("bench_realism", REPO / "bench" / "realism.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def skull(size=200, spacing=1.0, inner=60.0, outer=66.0, gap_mm=0.0):
    """Air, a 1000 HU bone ring (optionally with a gap at 3 o'clock) around a 30 HU disc; radii in mm."""
    yy, xx = (np.mgrid[:size, :size] - (size - 1) / 2) * spacing
    r = np.hypot(yy, xx)
    hu = np.full((size, size), -1000.0)
    hu[(r >= inner) & (r < outer)] = 1000.0
    hu[r < inner] = 30.0
    if gap_mm:
        hu[(np.abs(yy) < gap_mm / 2) & (xx > 0) & (r >= inner)] = -1000.0
    return hu, r


@pytest.mark.parametrize("spacing", [1.0, 0.5])
def test_mask_of_a_skull_ring_is_the_disc_less_the_erosion(realism, spacing):
    size = int(200 / spacing)
    hu, r = skull(size, spacing)
    mask = realism.intracranial_mask(hu, (spacing, spacing), erode_mm=3.0)
    # inner radius 60 mm, 3 mm eroded: a disc of 57 mm, to within the mask's grid of about 1 mm
    assert mask[r <= 55.5].all()
    assert not mask[r >= 58.5].any()
    area = mask.sum() * spacing**2
    assert area == pytest.approx(np.pi * 57**2, rel=0.04)


def test_mask_closes_narrow_gaps_keeps_hu_range_and_is_empty_without_skull(realism):
    hu, r = skull(gap_mm=8.0)  # a suture-wide gap: closed
    hu[(r < 5)] = 1000.0  # a calcification: inside, but outside -100..200 HU
    mask = realism.intracranial_mask(hu, (1.0, 1.0))
    assert mask[(r > 8) & (r < 55)].all() and not mask[r < 5].any()
    open_hu, _ = skull(gap_mm=40.0)  # a craniectomy-wide gap: nothing is enclosed
    assert not realism.intracranial_mask(open_hu, (1.0, 1.0)).any()
    assert not realism.intracranial_mask(np.full((64, 64), 30.0), (1.0, 1.0)).any()


def test_region_views_keep_what_they_name(realism):
    hu, r = skull()  # brain (r < 60 mm), bone 60-66 mm
    hu[(r >= 66) & (r < 72)] = 40.0  # scalp
    hu[(r >= 88) & (r < 92)] = 500.0  # a head holder's arc, 16 mm outside the scalp
    mask = realism.intracranial_mask(hu, (1.0, 1.0))  # a disc of 57 mm (60 less the 3 mm erosion)
    grown = realism.around(mask, (1.0, 1.0), 20.0)
    assert grown[r <= 76].all() and not grown[r >= 78].any()  # 57 + 20 mm, to within the mask's 1 mm grid
    assert np.array_equal(realism.around(mask, (0.5, 0.5), 10.0), grown)  # millimetres, not pixels
    assert realism.region_view(hu, mask, (1.0, 1.0), "whole") is hu
    inner = realism.region_view(hu, mask, (1.0, 1.0), "intracranial")
    assert np.all(inner[mask] == 30.0) and np.all(inner[~mask] == 0.0)
    cranium = realism.region_view(hu, mask, (1.0, 1.0), "cranium", cranium_mm=20.0)
    assert np.all(cranium[(r >= 61) & (r < 65)] == 1000.0) and np.all(cranium[(r >= 67) & (r < 71)] == 40.0)
    assert np.all(cranium[r >= 78] == -1000.0)  # holder and background become air
    assert np.all(cranium[r < 55] == 30.0)
    cavity = realism.region_view(hu, mask, (1.0, 1.0), "cavity")  # what a --region cavity model sees: not eroded
    assert np.all(cavity[r < 59.5] == 30.0) and np.all(cavity[r >= 60.5] == -1000.0)
    empty = np.zeros_like(mask)
    assert np.all(realism.region_view(hu, empty, (1.0, 1.0), "cranium") == -1000.0)
    with pytest.raises(ValueError, match="region"):
        realism.region_view(hu, mask, (1.0, 1.0), "face")


def test_detrend_removes_a_plane_and_keeps_what_is_orthogonal_to_it(realism):
    yy, xx = np.mgrid[:16, :16]
    plane = 40 + 0.7 * yy - 1.3 * xx
    checker = np.where((yy + xx) % 2, 1.0, -1.0)  # zero mean, no slope
    out = realism.detrend_plane(np.stack([plane, plane + checker]))
    np.testing.assert_allclose(out[0], 0, atol=1e-10)
    np.testing.assert_allclose(out[1], checker, atol=1e-10)


def test_nps_of_white_noise_is_flat_and_integrates_to_the_variance(realism):
    sigma, dx, n = 5.0, 0.5, 64
    patches = np.random.default_rng(0).normal(0, sigma, (300, n, n))
    nps, fy, fx = realism.nps_2d(patches, (dx, dx))
    df = 1 / (n * dx)
    # Parseval, exactly for these patches, and sigma^2 to within sampling
    assert nps.sum() * df * df == pytest.approx((patches**2).mean(), rel=1e-9)
    assert nps.sum() * df * df == pytest.approx(sigma**2, rel=0.02)
    edges = np.arange(0, 1.0 + 0.025, 0.05)  # Nyquist 1 cycle/mm
    s, c = realism.radial_bins(nps, fy, fx, edges)
    profile = s[c > 0] / c[c > 0]
    np.testing.assert_allclose(profile, sigma**2 * dx * dx, rtol=0.1)  # flat at sigma^2 dx dy
    f = ((edges[:-1] + edges[1:]) / 2)[c > 0]
    assert realism.curve_summary(f, profile)["centroid_cpmm"] == pytest.approx(0.5, abs=0.03)


def test_histogram_stats_and_distances(realism):
    low = realism.HIST_LOW
    counts = np.zeros(301, np.int64)
    counts[np.arange(0, 101) - low] = 1  # one pixel at each of 0..100 HU
    st = realism.hist_stats(counts)
    assert (st["median_hu"], st["p5_hu"], st["p95_hu"]) == (50, 5, 95)
    assert st["share_50_90"] == pytest.approx(41 / 101, abs=1e-4)
    shifted = np.roll(counts, -5)  # -5..95 HU
    d = realism.hist_distance(counts, shifted)
    assert d["wasserstein_hu"] == pytest.approx(5.0, abs=0.2)  # a little less: -20..100 cuts the tails alike
    assert realism.hist_distance(counts, counts) == {"wasserstein_hu": 0.0, "js_distance": 0.0,
                                                     "js_distance_5hu_bins": 0.0}


def test_evenly_spreads_indices(realism):
    assert realism.evenly(10, 5).tolist() == [0, 2, 4, 7, 9]
    assert realism.evenly(3, 5).tolist() == [0, 1, 2]


def _groups(n_groups, per_group, label):
    return np.repeat([f"{label}{g}" for g in range(n_groups)], per_group)


def test_discriminators_tell_different_sets_apart_and_not_the_same(realism):
    pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    n_groups, per = 12, 10  # 120 images per class
    groups = np.r_[_groups(n_groups, per, "a"), _groups(n_groups, per, "b")]
    y = np.r_[np.ones(n_groups * per), np.zeros(n_groups * per)].astype(int)
    splits = realism.grouped_folds(y, groups, 4, seed=0)
    for tr, te in splits:  # grouped: no patient on both sides
        assert not set(groups[tr]) & set(groups[te])

    def images(mean_a, mean_b):
        a = rng.normal(mean_a, 30, (n_groups * per, 3, 32, 32))
        b = rng.normal(mean_b, 30, (n_groups * per, 3, 32, 32))
        return np.clip(np.r_[a, b], 0, 255).astype(np.uint8)

    def auc(scores):
        return realism.auc_report(scores, y, splits)["oof_auc"]

    different, same = images(90, 160), images(120, 120)
    # images of a source in no fold, half like each class: the folds' models score them as their class
    unseen = np.r_[images(90, 160)[:20], images(90, 160)[-20:]]
    scores, unseen_scores = realism.cnn_oof(different, y, splits, seed=0, epochs=2, extra=unseen)
    assert auc(scores) > 0.95
    assert unseen_scores.shape == (40,)
    assert unseen_scores[:20].min() > unseen_scores[20:].max()
    assert abs(auc(realism.cnn_oof(same, y, splits, seed=0, epochs=2)) - 0.5) < 0.15

    feats = rng.normal(0, 1, (len(y), 4))
    assert abs(auc(realism.logreg_oof(feats, y, splits)) - 0.5) < 0.15
    feats[y == 1, 0] += 4.0
    feats[::7, 1] = np.nan  # missing features (no flat patch) are imputed
    assert auc(realism.logreg_oof(feats, y, splits)) > 0.95
    # an unseen source like the real class: the discriminator tells phantoms from it as well as from the
    # real class (it learnt what is real); one like the phantoms: it reads it as phantom (it learnt a site)
    like_real, like_phantom = rng.normal(0, 1, (60, 4)), rng.normal(0, 1, (60, 4))
    like_phantom[:, 0] += 4.0
    lr_scores, u = realism.logreg_oof(feats, y, splits, extra=np.r_[like_real, like_phantom])
    assert np.array_equal(lr_scores, realism.logreg_oof(feats, y, splits))  # the same out-of-fold scores
    assert ((u >= 0) & (u <= 1)).all()
    real_like = realism.unseen_real_report(lr_scores, y, u[:60], "like_real")
    phantom_like = realism.unseen_real_report(lr_scores, y, u[60:], "like_phantom")
    assert real_like["auc_phantom_vs_it"] > 0.95 and abs(real_like["auc_real_vs_it"] - 0.5) < 0.15
    assert abs(phantom_like["auc_phantom_vs_it"] - 0.5) < 0.15 and phantom_like["auc_real_vs_it"] > 0.95


def test_unseen_real_report_on_hand_made_scores(realism):
    y = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    got = realism.unseen_real_report(scores, y, np.array([0.75, 0.15]), "ge_normal")
    # phantoms above the unseen slices: 0.9, 0.8 > 0.75 and all three > 0.15, 5 of 6 pairs; the unseen above
    # the real: 0.75 > all three, 0.15 > 0.1 only, 4 of 6; none above the phantoms' median 0.8
    assert got == {"source": "ge_normal", "slices": 2, "auc_phantom_vs_it": 0.8333, "auc_real_vs_it": 0.6667,
                   "share_above_median_phantom": 0.0}
    brain = np.array([True, True, False, True, True, False])
    sub = realism.unseen_real_report(scores, y, np.array([0.75, 0.15]), "ge_normal", brain,
                                     np.array([True, False]))["slices_with_intracranial_mask"]
    # phantoms 0.9, 0.8 against 0.75: both above; 0.75 against real 0.1, 0.2: above both
    assert sub == {"slices": 1, "auc_phantom_vs_it": 1.0, "auc_real_vs_it": 1.0, "share_above_median_phantom": 0.0}


def test_grad_cam_finds_the_patch_that_tells_the_classes_apart(realism, tmp_path):
    """Both classes are the same noise, but class 1 carries a bright 16 px square in the top-left
    quadrant of a 64 px image: the CNN's out-of-fold evidence for class 1 lies mostly on the square
    (a sixteenth of the image), and the picture shows it in red there."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    n_groups, per = 12, 10
    groups = np.r_[_groups(n_groups, per, "a"), _groups(n_groups, per, "b")]
    y = np.r_[np.ones(n_groups * per), np.zeros(n_groups * per)].astype(int)
    images = np.clip(rng.normal(100, 25, (len(y), 3, 64, 64)), 0, 255)
    images[y == 1, :, 8:24, 8:24] += 80
    images = images.astype(np.uint8)
    splits = realism.grouped_folds(y, groups, 4, seed=0)
    scores, maps = realism.cnn_oof(images, y, splits, seed=0, epochs=3, cam=True)
    assert realism.auc_report(scores, y, splits)["oof_auc"] > 0.95
    assert maps.shape == (len(y), 8, 8)  # 64 px / 8: two blocks of a strided conv and a pool each
    _, fine = realism.cnn_oof(images, y, splits, seed=0, epochs=3, cam=True, cam_blocks=1)
    assert fine.shape == (len(y), 16, 16)  # one block in: 4 px cells, the square's 16 of 256 of them
    inside = fine[y == 1][:, 2:6, 2:6].sum() / fine[y == 1].sum()
    assert inside > 0.3, inside
    square = np.zeros((64, 64), np.uint8)
    square[8:24, 8:24] = 3  # "intracranial": the square; the rest "air"
    regions = np.broadcast_to(square, (len(y), 64, 64))
    where = realism.cam_summary(maps, regions, y, np.linspace(0, 1, len(y)))["phantom"]["by_level"]["all"]
    assert where["area_share"]["intracranial"] == pytest.approx(1 / 16, abs=1e-3)
    assert where["evidence_share"]["intracranial"] > 0.4  # 0.57 here: nine times its share of the image
    png = tmp_path / "cam.png"
    realism.write_cam_pictures(png, images, maps, y, np.tile(np.linspace(0, 1, len(y) // 2), 2), per_row=4)
    from PIL import Image

    sheet = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert sheet.shape == (6 * 128, 110 + 4 * 128, 3)  # three thirds for each class, four slices a row, 2x zoom
    tile = sheet[:128, 110:238]  # the first phantom slice: red over the square, not far from it
    redness = tile[..., 0] - tile[..., 1]
    assert redness[16:48, 16:48].mean() > 2 * redness[80:, 80:].mean() + 10


def test_region_labels_name_cavity_band_body_and_air(realism):
    hu, r = skull()  # 1 mm pixels: a 60 mm disc, a 6 mm bone ring, air beyond
    hu[5:15, 90:110] = 40.0  # "face": soft tissue more than 20 mm out from the cavity
    mask = realism.intracranial_mask(hu, (1.0, 1.0))
    lab = realism.region_labels(hu, mask, (1.0, 1.0), 200)
    c = 100
    assert lab[c, c] == 3 and lab[c, c + 58] == 2  # inside; 2 mm under the inner table (eroded 3 mm)
    assert lab[c, c + 63] == 2 and lab[c, c + 75] == 2  # the bone; air 18 mm beyond the mask
    assert lab[10, 100] == 1 and lab[c, c + 90] == 0 and lab[0, 0] == 0
    assert realism.REGIONS[lab[10, 100]] == "outside_cranium"
    half = realism.region_labels(hu, mask, (1.0, 1.0), 100)  # resized as the windowed image is
    assert half.shape == (100, 100) and half[50, 50] == 3 and half[5, 50] == 1


def test_repeats_keep_the_first_run_and_spread_the_others_over_seeds(realism):
    """Feature 0 tells the classes apart and feature 1 carries nothing: every repeat finds the first near
    1; with only feature 1, the runs scatter around 0.5 and their SD is that scatter."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    n_groups, per = 12, 10
    groups = np.r_[_groups(n_groups, per, "a"), _groups(n_groups, per, "b")]
    y = np.r_[np.ones(n_groups * per), np.zeros(n_groups * per)].astype(int)
    feats = rng.normal(0, 1, (len(y), 2))
    feats[y == 1, 0] += 3.0
    images = np.clip(rng.normal(100, 25, (len(y), 3, 32, 32)) + 60 * y[:, None, None, None], 0, 255).astype(np.uint8)
    got = realism.repeat_spread(feats, images, y, groups, folds=4, seed=7, n=3, epochs=2, threads=1,
                                first={"logreg": 0.123, "cnn": 0.456})
    assert got["runs"] == 3 and got["seeds"] == [7, 8, 9]
    assert got["logreg"]["oof_auc"][0] == 0.123 and got["cnn"]["oof_auc"][0] == 0.456  # the first as given
    assert min(got["logreg"]["oof_auc"][1:]) > 0.95 and min(got["cnn"]["oof_auc"][1:]) > 0.95
    a = got["logreg"]["oof_auc"]
    assert got["logreg"]["sd"] == pytest.approx(np.std(a, ddof=1), abs=1e-4)
    assert got["logreg"]["range"] == [min(a), max(a)]
    none = realism.repeat_spread(feats[:, 1:], None, y, groups, folds=4, seed=7, n=5, epochs=2, threads=1,
                                 first={"logreg": 0.5, "cnn": None})
    assert "cnn" not in none and abs(none["logreg"]["mean"] - 0.5) < 0.1 and 0 < none["logreg"]["sd"] < 0.1
    # an unseen source like the real class: each repeat tells phantoms from it as from the real class
    like_real = rng.normal(0, 1, (30, 2))
    like_real_images = np.clip(rng.normal(100, 25, (30, 3, 32, 32)), 0, 255).astype(np.uint8)
    with_unseen = realism.repeat_spread(feats, images, y, groups, folds=4, seed=7, n=3, epochs=2, threads=1,
                                        first={"logreg": 0.123, "cnn": 0.456, "logreg_unseen": 0.2,
                                               "cnn_unseen": 0.3},
                                        unseen={"features": like_real, "images": like_real_images})
    assert with_unseen["logreg"]["oof_auc"] == got["logreg"]["oof_auc"]  # the same runs besides
    assert with_unseen["logreg_unseen"]["oof_auc"][0] == 0.2 and with_unseen["cnn_unseen"]["oof_auc"][0] == 0.3
    for name in ("logreg_unseen", "cnn_unseen"):
        assert min(with_unseen[name]["oof_auc"][1:]) > 0.9


def test_auc_by_level_scores_each_third_of_the_series_apart(realism):
    # 4 slices per class in each third; the scores separate the classes perfectly at the skull base,
    # not at all in the middle (every score equal) and backwards at the vertex
    levels = np.tile([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0], 2)
    y = np.r_[np.ones(12), np.zeros(12)].astype(int)
    scores = np.r_[[0.9] * 4 + [0.5] * 4 + [0.1] * 4, [0.2] * 4 + [0.5] * 4 + [0.8] * 4]
    splits = [(np.arange(24), np.arange(24))]
    rep = realism.auc_report(scores, y, splits, levels=levels)["oof_auc_by_level"]
    assert rep["lower_third"] == {"oof_auc": 1.0, "slices": {"positive": 4, "negative": 4}}
    assert rep["middle_third"]["oof_auc"] == 0.5 and rep["upper_third"]["oof_auc"] == 0.0
    assert "oof_auc_by_level" not in realism.auc_report(scores, y, splits)


def test_auc_by_cavity_area_scores_slices_alike_in_brain_apart(realism):
    # the same scores as above, banded by how much intracranial mask each slice holds instead of by level:
    # none (0), small (20 cm2), mid (70) and large (150 cm2); the mid band holds only one class
    y = np.r_[np.ones(8), np.zeros(8)].astype(int)
    cavity = np.r_[[0, 0, 20, 20, 150, 150, 150, 150], [0, 0, 20, 20, 70, 70, 150, 150]]
    scores = np.r_[[0.9, 0.8, 0.1, 0.2, 0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.9, 0.8, 0.5, 0.5, 0.5, 0.5]]
    rep = realism.auc_report(scores, y, [(np.arange(16), np.arange(16))], cavity=cavity)["oof_auc_by_cavity_area"]
    assert list(rep) == ["none", "0-40cm2", "40-100cm2", ">=100cm2"]
    assert rep["none"] == {"slices": {"positive": 2, "negative": 2}, "oof_auc": 1.0}
    assert rep["0-40cm2"]["oof_auc"] == 0.0 and rep[">=100cm2"]["oof_auc"] == 0.5
    assert rep["40-100cm2"] == {"slices": {"positive": 0, "negative": 2}}  # one class: no AUC


def test_head_section_is_the_largest_body_region_not_the_holder(realism):
    hu, r = skull(size=400, spacing=0.5)  # 0.5 mm pixels, 200 mm across: the skull's outer radius is 66 mm
    assert realism.head_section_cm2(hu, (0.5, 0.5)) == pytest.approx(np.pi * 6.6 ** 2, rel=0.01)
    hu[390:396, :] = 200.0  # a holder's slat across the image, 29 mm below the skull: 6 cm2
    assert realism.head_section_cm2(hu, (0.5, 0.5)) == pytest.approx(np.pi * 6.6 ** 2, rel=0.01)
    assert realism.head_section_cm2(np.full((50, 50), -1000.0), (1.0, 1.0)) == 0.0


def test_a_phantom_series_goes_through_the_same_path(realism, tmp_path):
    from ichscan.dicom import find_series
    from ichscan.phantom import generate_dataset

    generate_dataset(tmp_path, studies=1, seed=3, size=96, slices=(12, 12))
    series = find_series(tmp_path).series
    st = realism.scan_source("phantom", series, patch=16, image_size=32, window_at=[0, 5])
    assert st.slices == 12 and len(st.features) == 12 and len(st.groups) == 12
    assert st.levels[0] == 0.0 and st.levels[11] == 1.0 and st.levels[6] == pytest.approx(6 / 11)
    assert sorted(st.images) == [0, 5] and st.images[5].shape == (3, 32, 32) and st.images[5].dtype == np.uint8
    assert st.slices_with_mask > 0 and st.hist.sum() > 0
    stats = realism.hist_stats(st.hist)
    assert 15 <= stats["median_hu"] <= 45  # brain
    # Only the cranial contents: outside the mask 0 HU, which the soft-tissue window (40/380) shows as grey
    # level round(255 * (0 - 40 + 190) / 380) = 101 and the brain window (40/80) as 0; the bone is gone.
    inner = realism.scan_source("phantom", series, patch=16, image_size=32, window_at=[5], region="intracranial")
    whole, only = st.images[5], inner.images[5]
    assert only[2, 0, 0] == 101 and only[0, 0, 0] == 0 and whole[2, 0, 0] == 0  # a corner: air in the whole slice
    assert only[2].max() < 200 < whole[2].max()  # the skull (over 230 HU) is bright only in the whole slice
    assert (only[0] > 0).mean() > 0.2  # the brain is still there


@pytest.mark.skipif(not (REALCT / "ge-normal").is_dir(),
                    reason=f"real CT not found at {REALCT} (outside the repository; absent in a fresh clone)")
def test_real_ge_series_masks_brain(realism):
    from ichscan.dicom import find_series

    series = find_series(REALCT / "ge-normal").series
    st = realism.scan_source("ge_normal", series, patch=64)
    assert st.slices == 28 and st.slices_with_mask >= 18  # the skull base and vertex may enclose nothing
    stats = realism.hist_stats(st.hist)
    assert 20 <= stats["median_hu"] <= 40 and stats["share_50_90"] < 0.1  # brain, no bleed
    nps = realism.nps_source(st)
    assert st.patches > 50 and 2 < nps["noise_std_hu"] < 15


def test_vault_width_is_the_first_bone_beyond_the_brain_by_direction(realism):
    """A brain disc (30 HU, radius 50 mm) in a bone ring (1200 HU) 6 mm thick straight ahead and behind
    and 2 mm at the sides (each within 35 degrees), scalp (40 HU) and, 10 mm further out, a head holder's
    bone-dense arc behind (which must not count): each direction's median width is the ring's there to
    within 0.5 mm (0.25 mm steps, bilinear, 0.5 mm pixels), its peak 1200 HU. By third, a slice at 0.1
    counts as lower; no mask, no rays."""
    spacing = (0.5, 0.5)
    yy, xx = (np.mgrid[:320, :320] - 159.5) * 0.5
    r = np.hypot(yy, xx)
    theta = np.arctan2(yy, xx)  # 2 mm of bone beyond r = 50 within 35 degrees of the sides, 6 mm ahead and behind
    reach = np.where(np.abs(np.sin(theta)) < np.sin(np.deg2rad(35)), 52.0,
                     np.where(np.abs(np.cos(theta)) < np.sin(np.deg2rad(35)), 56.0, 54.0))
    outer = r / reach
    hu = np.full(r.shape, -1000.0)
    hu[np.hypot(xx / 60.0, yy / 64.0) < 1] = 40.0
    hu[(np.abs(np.hypot(xx, yy) - 72.0) < 1.0) & (yy > 40)] = 600.0  # the holder, behind
    hu[outer < 1] = 1200.0
    hu[r < 50] = 30.0
    mask = r < 45
    rows = realism.vault_widths(hu, mask, spacing)
    assert len(rows) == realism.VAULT_RAYS
    sector = realism.vault_sector(rows[:, 0])
    for name, want in (("front", 6.0), ("back", 6.0), ("sides", 2.0)):
        sel = rows[sector == name]
        assert len(sel) >= 5 and abs(float(np.median(sel[:, 1])) - want) <= 0.5, (name, sel[:, 1])
        assert np.all(np.abs(sel[:, 2] - 1200.0) < 1.0)
    summary = realism.vault_summary([(0.1, rows)])
    assert summary["middle_third"]["sides"] is None
    low = summary["lower_third"]
    assert low["sides"]["rays"] == int((sector == "sides").sum())
    assert abs(low["sides"]["width_mm_p10_p25_p50_p75"][2] - 2.0) <= 0.5 and low["back"]["peak_hu_median"] == 1200.0
    assert realism.vault_widths(hu, np.zeros(r.shape, bool), spacing).shape == (0, 3)


def test_scalp_profile_reads_skin_fat_and_bone_in_from_the_head_s_edge(realism):
    """A head of discs (0.5 mm pixels): brain inside 60 mm, bone to 66, fat (-90 HU) to 69, skin (40 HU) to
    71, air beyond, and 20 mm further out a head holder's dense arc behind (not the head, not counted): every
    ray reads the skin 0.5-1 mm in from its edge (its last sample in the head), fat at 2.5-3.5 mm and bone
    at 6 mm; rays with no bone within 12 mm of the skin (a flap of soft tissue 20 mm thick on one side) are
    left out. By third, a slice at level 0.5 counts as middle; no head, no rays."""
    spacing = (0.5, 0.5)
    yy, xx = (np.mgrid[:360, :360] - 179.5) * 0.5
    r = np.hypot(yy, xx)
    hu = np.full(r.shape, -1000.0)
    hu[(np.abs(r - 90.0) < 1.0) & (yy > 30)] = 600.0  # the holder
    hu[r < 71] = 40.0
    hu[(r < 91) & (xx > 0) & (np.abs(yy) < 8)] = 40.0  # a thick flap out to one side: no bone under its skin
    hu[r < 69] = -90.0
    hu[r < 66] = 1200.0
    hu[r < 60] = 30.0
    rows = realism.scalp_profiles(hu, spacing)
    assert 60 <= len(rows) < realism.SCALP_RAYS  # the rays through the flap are out
    mm = np.arange(rows.shape[1]) * realism.SCALP_STEP_MM
    med = np.median(rows, axis=0)
    assert np.all(np.abs(med[(mm >= 0.5) & (mm <= 1.0)] - 40.0) < 1.0)
    assert np.all(np.abs(med[(mm >= 2.5) & (mm <= 3.5)] + 90.0) < 1.0)
    assert abs(med[mm == 6.0][0] - 1200.0) < 1.0
    summary = realism.scalp_summary([(0.5, rows)])
    assert summary["lower_third"] is None and summary["middle_third"]["rays"] == len(rows)
    assert summary["mm_in_from_skin"][:3] == [0.0, 0.5, 1.0]
    assert summary["middle_third"]["median_hu"][2] == pytest.approx(40.0, abs=1)
    assert realism.scalp_profiles(np.full((50, 50), -1000.0), spacing).shape[0] == 0


def test_inner_table_width_is_the_dense_band_between_brain_and_bone(realism):
    """A brain disc (30 HU, radius 50 mm) under a band of 90 HU ``w`` mm wide, then 8 mm of bone (1200 HU) and
    air: every ray reads ``w`` to within 1 mm, its median within 0.5 mm (0.5 mm steps, nearest of 0.5 mm
    pixels), 1.5 mm and 6 mm here. By third, a slice at level 0.1 counts as lower and one at 0.9 as upper,
    by intracranial area one of 150 cm2 as over 100 and one of 20 as up to 40; share_wide counts the rays
    of at least 3 mm."""
    spacing = (0.5, 0.5)
    yy, xx = (np.mgrid[:300, :300] - 149.5) * 0.5
    r = np.hypot(yy, xx)
    got = {}
    for w in (1.5, 6.0):
        hu = np.full(r.shape, -1000.0)
        hu[r < 58 + w] = 1200.0
        hu[r < 50 + w] = 90.0
        hu[r < 50] = 30.0
        mask = r < 45
        widths = realism.inner_table_widths(hu, mask, spacing)
        assert len(widths) == realism.INNER_TABLE_RAYS
        assert abs(float(np.median(widths)) - w) <= 0.5 and np.all(np.abs(widths - w) <= 1.0), (w, widths)
        got[w] = widths
    summary = realism.inner_table_summary([(0.1, 150.0, got[1.5]), (0.9, 20.0, got[6.0])])
    assert summary["lower_third"]["share_wide"] == 0.0 and summary["upper_third"]["share_wide"] == 1.0
    assert summary["middle_third"] is None and summary["lower_third"]["rays"] == realism.INNER_TABLE_RAYS
    by_area = summary["by_cavity_area"]  # the same slices by intracranial area: 150 cm2 and 20 cm2
    assert by_area[">=100cm2"]["share_wide"] == 0.0 and by_area["0-40cm2"]["share_wide"] == 1.0
    assert by_area["40-100cm2"] is None and "none" not in by_area
    assert realism.inner_table_widths(hu, np.zeros(r.shape, bool), spacing).size == 0


def test_small_band_shares_count_the_discriminator_s_pixels_in_each_hu_band(realism):
    """A 512 px slice of air with a 256 px square of 0 HU and, inside it, a 128 px square of 180 HU: resized
    to 128 px the squares are 64 and 32 px wide, so the shares are 3/16 of the pixels in -20..20 HU and 1/16
    in 130..229, less what the resampling's blurred edges (under two pixel rows round each square) leave
    between bands, and none at 230 and up. A non-square slice is padded
    with air to a square, as the discriminator's windows are. The summary: per mille by third, and the
    AUC of each band for a source against ctich-dev (here every phantom slice holds less soft tissue: 0)."""
    from types import SimpleNamespace

    hu = np.full((512, 512), -1000.0)
    hu[128:384, 128:384] = 0.0
    hu[192:320, 192:320] = 180.0
    soft, thin, bone = realism.small_band_shares(hu, 128)
    edges = 2 * 4 * (64 + 32) / 128**2  # two pixel rows round both squares
    assert 3 / 16 - edges < soft <= 3 / 16 and 1 / 16 - edges < thin <= 1 / 16
    assert bone == 0.0
    wide = np.full((256, 512), -1000.0)
    wide[:, :256] = 0.0  # half the slice, a quarter of the padded square
    assert realism.small_band_shares(wide, 128)[0] == pytest.approx(0.25, abs=2 / 128)
    # resized HU are not whole: 229.6 is thin bone (grey in every window), 230 bone, 20.3 soft tissue
    assert realism.small_band_shares(np.full((128, 128), 229.6), 128) == [0.0, 1.0, 0.0]
    assert realism.small_band_shares(np.full((128, 128), 230.0), 128) == [0.0, 0.0, 1.0]
    assert realism.small_band_shares(np.full((128, 128), 20.3), 128) == [1.0, 0.0, 0.0]

    def source(name, shares):
        return SimpleNamespace(name=name, levels=[0.1, 0.5, 0.9] * 2, small_bands=[list(v) for v in shares])

    real = source("ctich_dev", [(0.06, 0.03, 0.1)] * 6)
    phantom = source("phantom", [(0.02, 0.03, 0.1)] * 6)
    out = realism.small_band_summary([phantom, real])
    assert out["per_mille"]["ctich_dev"]["-20_to_20"] == {"all": 60.0, "lower_third": 60.0,
                                                          "middle_third": 60.0, "upper_third": 60.0}
    auc = out["auc_against_ctich_dev"]["phantom"]
    assert auc["-20_to_20"]["all"] == 0.0 and auc["130_to_229"]["middle_third"] == 0.5
    assert "ctich_dev" not in out["auc_against_ctich_dev"]
