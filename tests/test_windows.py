"""CT windows: values a person can check by hand, aspect-kept resizing, and the lookup-table fast path."""

from __future__ import annotations

import numpy as np
import pytest

from _dicomfactory import head_phantom, write_ct
from ichscan.dicom import read_slice
from ichscan.windows import PAPER_WINDOWS, PRESETS, Window, get_windows, load_windows, window_image


def test_presets_are_the_papers():
    assert PAPER_WINDOWS == ("brain", "blood", "soft_tissue")
    assert [(PRESETS[n].level, PRESETS[n].width) for n in ("brain", "blood", "soft_tissue", "bone")] == [
        (40, 80), (80, 200), (40, 380), (600, 2800)]
    assert PRESETS["brain"].low == 0 and PRESETS["brain"].high == 80


def test_window_values_by_hand():
    hu = np.array([[-1000.0, 0.0, 40.0, 80.0, 1000.0]])
    brain = window_image(hu, "brain", size=None)[0, 0]
    assert brain.tolist() == [0, 0, 128, 255, 255]  # 40 HU: 127.5 rounds up
    blood = window_image(hu, "blood", size=None)[0, 0]
    assert blood.tolist() == [0, 26, 77, 128, 255]  # low -20: 0 HU -> 20/200*255 = 25.5, 40 HU -> 76.5
    f = window_image(hu, "brain", size=None, dtype=np.float32)[0, 0]
    assert f.dtype == np.float32 and f.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_three_windows_stack_into_channels():
    out = window_image(head_phantom(512, 512))
    assert out.shape == (3, 512, 512) and out.dtype == np.uint8
    assert out[:, 0, 0].tolist() == [0, 0, 0]  # air is black in every window
    # blood, 60 HU: brain 60/80*255 = 191.25, blood 80/200*255 = 102, soft tissue 210/380*255 = 140.9
    assert out[:, 256, 256].tolist() == [191, 102, 141]


def test_resize_keeps_aspect_and_pads_with_air():
    hu = np.full((100, 50), 80.0)  # tall image of uniform 80 HU (white in the brain window)
    out = window_image(hu, ["brain", "bone"], size=512)
    assert out.shape == (2, 512, 512)
    cols = np.flatnonzero(out[0].max(axis=0))
    assert (cols.min(), cols.max()) == (128, 383)  # 256 wide, centred: aspect 2:1 kept
    assert out[0, :, :128].max() == 0 and out[0, :, 384:].max() == 0
    assert out[1, 0, 0] == window_image(np.array([[-1000.0]]), "bone", size=None)[0, 0, 0]  # bone pads with air's value
    small = window_image(np.full((32, 32), 40.0), "brain", size=64, dtype=np.float32)
    assert small.shape == (1, 64, 64) and np.allclose(small, 0.5)


def test_get_windows_forms():
    custom = Window("stroke", 32, 8)
    ws = get_windows(["brain", custom, {"name": "wide", "level": 0, "width": 2000}])
    assert [w.name for w in ws] == ["brain", "stroke", "wide"] and ws[2].width == 2000.0
    with pytest.raises(ValueError, match="unknown window"):
        get_windows(["lung"])
    with pytest.raises(ValueError, match="dtype"):
        window_image(np.zeros((4, 4)), dtype=np.float64)


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "693_J2KR.dcm", "CT_small.dcm"])
@pytest.mark.parametrize("size", [512, 256, None])
def test_fast_path_equals_window_image(testdata, name, size):
    path = testdata(name)
    fast = load_windows(path, size=size)
    slow = window_image(read_slice(path).hu, size=size)
    np.testing.assert_array_equal(fast, slow)
    f32 = load_windows(path, size=size, dtype=np.float32)
    np.testing.assert_allclose(f32, window_image(read_slice(path).hu, size=size, dtype=np.float32), atol=1e-6)


def test_fast_path_with_rsna_fix_monochrome1_and_big_endian(tmp_path, testdata):
    true_hu = head_phantom(64, 48)
    rsna = write_ct(tmp_path / "rsna.dcm", stored=np.mod(true_hu.astype(int), 4096), bits_stored=12, signed=False,
                    intercept=0.0)
    assert (load_windows(rsna) == window_image(true_hu)).all()
    mono1 = write_ct(tmp_path / "m1.dcm", true_hu, photometric="MONOCHROME1")
    assert (load_windows(mono1) == window_image(true_hu)).all()  # air stays black
    big = load_windows(testdata("MR_small_bigendian.dcm"), allow_non_ct=True, windows=["bone"])
    little = load_windows(testdata("MR_small.dcm"), allow_non_ct=True, windows=["bone"])
    np.testing.assert_array_equal(big, little)


@pytest.mark.parametrize("shape,size", [((512, 512), 128), ((512, 512), 224), ((300, 512), 97), ((512, 381), 256),
                                        ((64, 64), 128), ((40, 90), 64)])
@pytest.mark.parametrize("n_windows", [2, 3, 4])
def test_packed_lut_resize_gives_the_same_bytes_as_channel_by_channel(shape, size, n_windows):
    # window_stored packs up to four window tables into RGBX words and resizes them in one Pillow pass;
    # every byte must equal windowing the HU image and resizing each channel on its own.
    from ichscan.dicom import StoredPixels
    from ichscan.windows import _packed_window_table, window_stored

    rng = np.random.default_rng(size + n_windows)
    windows = ["brain", "blood", "soft_tissue", "bone"][:n_windows]
    for dtype, intercept in ((np.uint16, -1024.0), (np.int16, 0.0)):
        stored = rng.integers(0, 2400, size=shape).astype(dtype)
        stored[: shape[0] // 3] = 24  # a flat region and sharp edges, as air around a head
        pixels = StoredPixels("random", stored, 1.0, intercept)
        before = _packed_window_table.cache_info()
        fast = window_stored(pixels, windows, size, np.uint8)
        after = _packed_window_table.cache_info()
        assert after.hits + after.misses == before.hits + before.misses + 1  # the packed path ran
        assert fast.shape == (n_windows, size, size)
        np.testing.assert_array_equal(fast, window_image(pixels.hu(), windows, size, np.uint8))
