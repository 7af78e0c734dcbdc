"""ichscan.dicom on real CT files shipped by pydicom / pydicom-data and on files written for each quirk."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from _dicomfactory import head_phantom, write_ct
from ichscan.dicom import find_series, read_pixels, read_series, read_slice, read_slices
from ichscan.windows import load_windows, window_image
from ichscan.errors import (
    ColourImageError,
    IchscanError,
    NoPixelDataError,
    NotCTError,
    NotDicomError,
    PixelDataError,
)


def pydicom_hu(path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return apply_modality_lut(ds.pixel_array, ds).astype(np.float32)


# ------------------------------------------------------------------------------------------ real files


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_UNCR.dcm", "693_UNCI.dcm", "693_J2KR.dcm", "693_J2KI.dcm",
                                  "J2K_pixelrep_mismatch.dcm"])
def test_real_ct_pixels_equal_pydicom_modality_lut(testdata, name):
    s = read_slice(testdata(name))
    assert s.hu.dtype == np.float32
    np.testing.assert_array_equal(s.hu, pydicom_hu(testdata(name)))
    assert s.modality == "CT" and s.fixes == ()


def test_real_head_ct_metadata_and_air(testdata):
    s = read_slice(testdata("693_UNCR.dcm"))  # a CQ500 head CT slice
    assert s.hu.shape == (512, 512) and (s.rows, s.columns) == (512, 512)
    assert s.hu[40, 256] == -1000.0  # air in front of the head
    air = s.hu[(s.hu > -1200) & (s.hu < -800)]
    assert abs(np.median(air) - (-1000)) < 20
    assert s.hu.min() == -3024.0  # outside the field of view: stored -2000, intercept -1024
    assert s.position == (-122.5, -112.4, 47.0)
    assert s.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert s.spacing == (0.478516, 0.478516) and s.thickness == 5.0
    assert s.instance_number == 21 and s.kernel == "STANDARD" and s.kvp == 140.0
    assert (s.window_center, s.window_width) == (40.0, 100.0)
    assert s.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert s.patient_id == "CQ500-CT-310"
    assert s.sop_uid.endswith(".1802510") and s.image_id == s.sop_uid
    assert s.frame is None


def test_jpeg2000_lossless_equals_uncompressed(testdata):
    np.testing.assert_array_equal(read_slice(testdata("693_J2KR.dcm")).hu, read_slice(testdata("693_UNCR.dcm")).hu)
    # the lossy J2K decodes to exactly the pixels its uncompressed twin was made from
    np.testing.assert_array_equal(read_slice(testdata("693_J2KI.dcm")).hu, read_slice(testdata("693_UNCI.dcm")).hu)


def test_j2k_pixel_representation_mismatch_is_corrected(testdata):
    s = read_slice(testdata("J2K_pixelrep_mismatch.dcm"))
    assert s.hu.min() == -2000.0  # signed values, not 6192
    assert s.window_centers == (40.0, 40.0, 40.0) and s.window_center == 40.0


def test_headers_only_read(testdata):
    s = read_slice(testdata("693_UNCR.dcm"), pixels=False)
    assert s.hu is None and s.rows == 512 and s.position == (-122.5, -112.4, 47.0)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=["rle", "jpegls", "j2k"])
def test_reencoded_real_ct_keeps_hu(testdata, tmp_path, syntax):
    ds = pydicom.dcmread(testdata("693_UNCR.dcm"))
    ds.compress(syntax)
    out = tmp_path / "ct.dcm"
    ds.save_as(out)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_slice(out).hu, read_slice(testdata("693_UNCR.dcm")).hu)


def test_enhanced_multiframe_ct_is_split_per_frame(testdata):
    path = testdata("eCT_Supplemental.dcm")
    slices = read_slices(path)
    assert [s.frame for s in slices] == [0, 1]
    assert [s.position for s in slices] == [(99.5, -301.5, -159.0), (99.5, -301.5, -149.0)]
    assert all(s.orientation == (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0) for s in slices)
    assert all(s.spacing == (0.388672, 0.388672) and s.thickness == 10.0 for s in slices)
    assert [s.instance_number for s in slices] == [2, 1]  # InStackPositionNumber
    assert slices[0].window_center == 49.0 and slices[0].window_width == 102.0
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float32) - 1024.0  # per-frame rescale: slope 1, intercept -1024
    for s, frame in zip(slices, expected):
        np.testing.assert_array_equal(s.hu, frame)
    assert slices[0].image_id.endswith("_0") and slices[0].sop_uid == slices[1].sop_uid
    with pytest.raises(PixelDataError, match="read_slices"):
        read_slice(path)
    series = read_series(path)
    assert len(series) == 2 and series.ordered_by == "position"
    assert [s.position[2] for s in series.slices] == [-159.0, -149.0]  # inferior to superior
    assert series.volume().shape == (2, 512, 512) and series.slice_spacing == 10.0
    lazy = find_series(path).series[0]  # headers only: frames decoded when the volume is asked for
    assert all(s.hu is None for s in lazy.slices)
    np.testing.assert_array_equal(lazy.volume(), series.volume())
    with pytest.raises(PixelDataError, match="multi-frame"):
        read_pixels(path)


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG-LL.dcm"])
def test_non_ct_refused_unless_allowed(testdata, name):
    path = testdata(name)
    with pytest.raises(NotCTError) as err:
        read_slice(path)
    message = str(err.value)
    assert message.startswith(path + ":") and "--any-modality" in message and "\n" not in message
    s = read_slice(path, allow_non_ct=True)
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(s.hu, ds.pixel_array.astype(np.float32))  # no rescale: HU = stored


def test_big_endian_and_deflate_decode(testdata):
    big = read_slice(testdata("MR_small_bigendian.dcm"), allow_non_ct=True)
    little = read_slice(testdata("MR_small.dcm"), allow_non_ct=True)
    np.testing.assert_array_equal(big.hu, little.hu)
    dfl = read_slice(testdata("image_dfl.dcm"), allow_non_ct=True)
    np.testing.assert_array_equal(dfl.hu, pydicom.dcmread(testdata("image_dfl.dcm")).pixel_array)


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEG2000.dcm"])
def test_more_jpeg_flavours_decode(testdata, name):
    path = testdata(name)  # 12-bit JPEG extended, 8-bit JPEG lossless, lossy JPEG 2000
    np.testing.assert_array_equal(read_slice(path, allow_non_ct=True).hu, pydicom.dcmread(path).pixel_array)


def test_undecodable_pixels_say_so_in_one_line(testdata):
    path = testdata("JPEG-lossy.dcm")  # a known-bad JPEG stream: every decoder refuses it
    with pytest.raises(PixelDataError, match="cannot be decoded") as err:
        read_slice(path, allow_non_ct=True)
    assert "\n" not in str(err.value) and "misplaced marker" in str(err.value)


@pytest.mark.parametrize("name, what", [
    ("test-SR.dcm", "SOP class Comprehensive SR Storage"),
    ("rtplan.dcm", "SOP class RT Plan Storage"),
    ("DICOMDIR", "a DICOMDIR, an index of other files"),
    ("priv_SQ.dcm", "SOP class MR Image Storage"),  # named only by its file meta, and no pixels
    ("empty_charset_LEI.dcm", "no SOP class named"),
])
def test_objects_without_pixels(testdata, name, what):
    with pytest.raises(NoPixelDataError) as err:
        read_slice(testdata(name), allow_non_ct=True)
    assert str(err.value).endswith(f"no pixel data ({what}); nothing to read here")


@pytest.mark.parametrize("pixels", [True, False])
def test_truncated_pixel_data(testdata, pixels):
    with pytest.raises(PixelDataError, match="truncated"):
        read_slice(testdata("MR_truncated.dcm"), allow_non_ct=True, pixels=pixels)


def test_truncated_file_written_here(tmp_path):
    path = write_ct(tmp_path / "ct.dcm")
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    for pixels in (True, False):
        with pytest.raises(PixelDataError, match="truncated") as err:
            read_slice(path, pixels=pixels)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_colour_refused(testdata, name):
    with pytest.raises(ColourImageError, match="colour"):
        read_slice(testdata(name), allow_non_ct=True)


def test_not_dicom(tmp_path):
    junk = tmp_path / "README.txt"
    junk.write_text("not an image\n" * 20)
    with pytest.raises(NotDicomError) as err:
        read_slice(junk)
    assert str(err.value).startswith(str(junk) + ": not a DICOM file")
    assert isinstance(err.value, IchscanError)
    with pytest.raises(IchscanError, match="no such file"):
        read_slice(tmp_path / "missing.dcm")


# ------------------------------------------------------------------------------------------ quirks


def test_written_ct_roundtrip(tmp_path):
    hu = head_phantom(64, 64)
    s = read_slice(write_ct(tmp_path / "ct.dcm", hu))
    np.testing.assert_array_equal(s.hu, hu.astype(np.float32))


def test_rsna_corrupted_intercept_recovers_true_hu(tmp_path):
    # RSNA 2019: the signed HU were written into 12 unsigned bits (HU mod 4096) with an intercept near 0.
    true_hu = np.array([[-1000, 0, 60, 1000], [30, -500, 2000, 3000]], dtype=np.int32)
    corrupted = np.mod(true_hu, 4096)  # air -> 3096, water -> 0, blood -> 60
    assert corrupted[0, 0] == 3096
    path = write_ct(tmp_path / "ID_0a1b2c.dcm", stored=corrupted, bits_stored=12, signed=False, intercept=1.0)
    s = read_slice(path)
    assert s.fixes == ("rsna_intercept",)
    np.testing.assert_array_equal(s.hu, true_hu.astype(np.float32))
    assert s.image_id == "ID_0a1b2c"
    # the stored-value path folds the same fix into its lookup: same HU
    np.testing.assert_array_equal(read_pixels(path).hu(), s.hu)


@pytest.mark.parametrize("kw", [dict(bits_stored=12, signed=False, intercept=-1024.0),  # intercept is fine
                                dict(bits_stored=16, signed=False, intercept=0.0),  # not 12 bits
                                dict(bits_stored=12, signed=True, intercept=0.0)])  # signed
def test_rsna_fix_only_where_its_conditions_hold(tmp_path, kw):
    stored = np.array([[0, 60, 1024, 3096]])
    s = read_slice(write_ct(tmp_path / "ct.dcm", stored=stored, **kw))
    assert s.fixes == ()
    np.testing.assert_array_equal(s.hu, (stored + kw["intercept"]).astype(np.float32))


def test_monochrome1_keeps_hu(tmp_path):
    hu = head_phantom()
    m2 = read_slice(write_ct(tmp_path / "m2.dcm", hu))
    m1 = read_slice(write_ct(tmp_path / "m1.dcm", hu, photometric="MONOCHROME1"))
    assert m1.photometric == "MONOCHROME1"
    np.testing.assert_array_equal(m1.hu, m2.hu)  # a display instruction: HU come from the modality LUT alone
    assert m1.hu[0, 0] == -1000.0


def test_multivalued_window(tmp_path):
    s = read_slice(write_ct(tmp_path / "ct.dcm", window_center=[40, 300], window_width=[80, 1500]))
    assert (s.window_center, s.window_width) == (40.0, 80.0)
    assert s.window_centers == (40.0, 300.0) and s.window_widths == (80.0, 1500.0)


def test_non_square_non_512_and_slope(tmp_path):
    hu = head_phantom(100, 60)
    s = read_slice(write_ct(tmp_path / "ct.dcm", hu, slope=0.5, intercept=-1000.0))
    assert s.hu.shape == (100, 60) and (s.rows, s.columns) == (100, 60)
    np.testing.assert_array_equal(s.hu, hu.astype(np.float32))
    np.testing.assert_array_equal(s.hu, pydicom_hu(tmp_path / "ct.dcm"))


def test_missing_rescale_means_identity(tmp_path):
    s = read_slice(write_ct(tmp_path / "ct.dcm", stored=np.array([[-1000, 40]]), intercept=None))
    np.testing.assert_array_equal(s.hu, [[-1000.0, 40.0]])


def test_read_slice_inside_zip(tmp_path):
    path = write_ct(tmp_path / "ct.dcm")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(path, "scans/ct.dcm")
    s = read_slice(archive / "scans" / "ct.dcm")
    np.testing.assert_array_equal(s.hu, read_slice(path).hu)
    assert s.path == str(archive / "scans" / "ct.dcm")


def test_ingest_modules_do_not_import_torch():
    code = "import sys, ichscan.dicom, ichscan.windows, ichscan.render; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_jpeg_baseline_8bit_ct(tmp_path):
    # an 8-bit lossy JPEG CT (some exports do this): HU must follow pydicom's own decode + modality LUT
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    path = write_ct(tmp_path / "plain.dcm", head_phantom(64, 64))
    ds = pydicom.dcmread(path)
    stored = np.clip((head_phantom(64, 64) + 1024) / 8, 0, 255).astype(np.uint8)  # 8 HU per grey level
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleSlope, ds.RescaleIntercept = 8, -1024
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(tmp_path / "jpeg.dcm")
    s = read_slice(tmp_path / "jpeg.dcm")
    np.testing.assert_array_equal(s.hu, pydicom_hu(tmp_path / "jpeg.dcm"))
    assert abs(float(s.hu[0, 0]) - (-1000)) <= 16 and abs(float(s.hu[32, 32]) - 60) <= 16
    np.testing.assert_array_equal(load_windows(tmp_path / "jpeg.dcm"), window_image(s.hu))  # 8-bit lookup table


def test_dataset_without_preamble_or_file_meta(tmp_path):
    # some exporters write the bare dataset (implicit VR little endian), no 128-byte preamble, no 'DICM'
    import io

    ds = pydicom.dcmread(write_ct(tmp_path / "full.dcm"))
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(buf.getvalue())
    assert bare.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_slice(bare).hu, head_phantom())


# ------------------------------------------------------------------------- read_stored after a scan


@pytest.mark.parametrize("name,native", [("CT_small.dcm", True), ("693_UNCR.dcm", True), ("693_UNCI.dcm", True),
                                         ("693_J2KR.dcm", False), ("MR_small_bigendian.dcm", False),
                                         ("image_dfl.dcm", False)])
def test_read_stored_after_a_headers_only_scan_equals_read_pixels(testdata, name, native):
    # the scan records where native pixels lie; reading them from there gives read_pixels' values exactly
    from ichscan.dicom import read_stored

    path = testdata(name)
    s = read_slice(path, pixels=False, allow_non_ct=True)
    assert (s.pixels_at is not None) is native
    fast, slow = read_stored(s, allow_non_ct=True), read_pixels(path, allow_non_ct=True)
    assert fast.stored.dtype == slow.stored.dtype
    np.testing.assert_array_equal(fast.stored, slow.stored)
    assert (fast.slope, fast.intercept, fast.fixes) == (slow.slope, slow.intercept, slow.fixes)


def test_read_stored_does_not_parse_the_file_again(tmp_path):
    # proof that the recorded offset is used: with the DICM marker overwritten (same size, same mtime),
    # parsing the file fails, yet read_stored still returns its pixels
    import os

    from ichscan.dicom import read_stored

    hu = head_phantom(32, 32)
    path = write_ct(tmp_path / "ct.dcm", hu)
    s = read_slice(path, pixels=False)
    data = bytearray(path.read_bytes())
    data[128:132] = b"XXXX"
    path.write_bytes(bytes(data))
    os.utime(path, ns=(s.pixels_at.mtime_ns, s.pixels_at.mtime_ns))
    with pytest.raises(NotDicomError):
        read_pixels(path)
    np.testing.assert_array_equal(read_stored(s).hu(), hu.astype(np.float32))


def test_read_stored_keeps_the_rsna_fix_and_skips_zip_members(tmp_path):
    from ichscan.dicom import read_stored

    true_hu = np.array([[-1000, 0, 60, 1000]], dtype=np.int32)
    path = write_ct(tmp_path / "ID_00ff.dcm", stored=np.mod(true_hu, 4096), bits_stored=12, signed=False,
                    intercept=1.0)
    s = read_slice(path, pixels=False)
    assert s.pixels_at is not None and s.pixels_at.fixes == ("rsna_intercept",)
    np.testing.assert_array_equal(read_stored(s).hu(), true_hu.astype(np.float32))
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(path, "ID_00ff.dcm")
    inside = find_series(archive).series[0].slices[0]
    assert inside.pixels_at is None  # no file offset inside a zip: parsed again
    np.testing.assert_array_equal(read_stored(inside).hu(), true_hu.astype(np.float32))


def test_read_stored_reads_a_file_changed_since_the_scan_afresh(tmp_path):
    import os

    from ichscan.dicom import read_stored

    path = write_ct(tmp_path / "ct.dcm", head_phantom(32, 32))
    s = read_slice(path, pixels=False)
    # replaced by an image of another size (its pixels start elsewhere): the stale offset must not be used
    write_ct(path, np.full((40, 24), 60.0))
    os.utime(path, ns=(s.pixels_at.mtime_ns + 10**9, s.pixels_at.mtime_ns + 10**9))
    np.testing.assert_array_equal(read_stored(s).hu(), np.full((40, 24), 60.0, dtype=np.float32))
    # truncated since the scan: the one-line error of read_pixels, naming the file
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(PixelDataError, match="truncated") as err:
        read_stored(s)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------- Modality LUT Sequence


def _with_lut_sequence(path, first: int, table: np.ndarray, lut_data_bytes: bytes | None = None):
    """Turn a written slice into one whose modality LUT is a Modality LUT Sequence (no rescale)."""
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(path)
    del ds.RescaleIntercept, ds.RescaleSlope
    item = Dataset()
    item.LUTDescriptor = [len(table), first, 16]
    item.ModalityLUTType = "HU"
    item.add_new(0x00283006, "OW", lut_data_bytes if lut_data_bytes is not None else table.astype("<u2").tobytes())
    ds.ModalityLUTSequence = [item]
    ds.save_as(path)
    return path


def test_modality_lut_sequence_gives_pydicoms_values(tmp_path):
    # stored v -> table[v - 10]: below 10 the first entry, past the end the last (DICOM PS3.3 C.11.1)
    stored = np.array([[0, 10, 11, 100], [1000, 2000, 4105, 60000]])
    table = (np.arange(4096) * 3 // 2 + 7).astype(np.uint16)
    path = _with_lut_sequence(write_ct(tmp_path / "lut.dcm", stored=stored, signed=False, intercept=0.0), 10, table)
    expected = np.array([[7, 7, 8, 142], [1492, 2992, 6149, 6149]], dtype=np.float32)
    s = read_slice(path)
    np.testing.assert_array_equal(s.hu, expected)
    np.testing.assert_array_equal(s.hu, pydicom_hu(path))
    assert s.fixes == ()
    np.testing.assert_array_equal(read_pixels(path).hu(), expected)
    assert (load_windows(path, ["bone"], size=None) == window_image(expected, ["bone"], size=None)).all()
    from ichscan.dicom import read_stored

    header = find_series(tmp_path).series[0].slices[0]
    assert header.hu is None and header.pixels_at is None  # the LUT is read with the pixels, not at the scan
    np.testing.assert_array_equal(read_stored(header).hu(), expected)


def test_malformed_modality_lut_sequence_is_one_line_error(tmp_path):
    path = _with_lut_sequence(write_ct(tmp_path / "bad.dcm"), 0, np.arange(4096), lut_data_bytes=b"\0\0" * 10)
    with pytest.raises(PixelDataError, match="Modality LUT Sequence") as err:
        read_slice(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
