"""NIfTI in: volumes written to disk with nibabel here, read back as the axial series DICOM gives.

The geometry tests build one volume in the order a DICOM axial series is shown (slices inferior to
superior, rows anterior to posterior, columns the patient's right to left) and store it in many orders,
each with the affine that says so; every one must read back as the same volume with the same geometry.
"""

from __future__ import annotations

import gzip
import json
import math
import zipfile

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ichscan.cli import main
from ichscan.dicom import find_series, read_series, read_slices
from ichscan.errors import IchscanError
from ichscan.geometry import obliquity_degrees
from ichscan.nifti import NiftiError, read_nifti, series_name

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# The patient direction (DICOM LPS) each letter of a storage code names: a stored axis "R" runs toward
# the patient's right.
DIRECTION = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
DISPLAY_AXIS = {"L": 2, "R": 2, "P": 1, "A": 1, "S": 0, "I": 0}  # (slice, row, column) axis of a letter

# The display grid: 8 slices of 12 rows x 10 columns; 5 mm slices, rows 0.9 mm apart, columns 0.8 mm.
SHAPE, SPACING = (8, 12, 10), (5.0, 0.9, 0.8)
ORIGIN = (-3.6, -4.95, -17.5)  # LPS mm of slice 0, row 0, column 0: centred on (0, 0, 0)
MARKER, MARKER_HU = (6, 2, 7), 1000.0  # slice 6 of 8, row 2 of 12, column 7 of 10


def marker_lps() -> np.ndarray:
    """Where the marker sits in the patient: x 2.0 mm (left), y -3.15 (anterior), z 12.5 (superior)."""
    s, r, c = MARKER
    return np.array(ORIGIN) + np.array([c * SPACING[2], r * SPACING[1], s * SPACING[0]])


def display_volume() -> np.ndarray:
    """Air, a water block, a 40 HU gradient over the columns and one bright marker voxel."""
    vol = np.full(SHAPE, -1000.0, dtype=np.float32)
    vol[1:7, 3:10, 2:8] = 0.0
    vol[2:5, 4:8, 3:7] = 40.0 + np.arange(3, 7, dtype=np.float32)
    vol[MARKER] = MARKER_HU
    return vol


def store(display: np.ndarray, code: str, *, origin=ORIGIN, spacing=SPACING) -> tuple[np.ndarray, np.ndarray]:
    """``display`` (slice, row, column; LPS display order) stored with axes along ``code`` (e.g. "RAS":
    stored axis 0 runs to the patient's right, 1 to anterior, 2 to superior), and its RAS affine."""
    axes = [DISPLAY_AXIS[letter] for letter in code]
    assert sorted(axes) == [0, 1, 2], code
    stored = np.transpose(display, axes)
    lps = np.eye(4)
    corner = np.array(origin, dtype=float)  # where stored voxel (0, 0, 0) lies
    for a, letter in enumerate(code):
        d = DISPLAY_AXIS[letter]
        reversed_ = letter in "RAI"
        if reversed_:
            stored = np.flip(stored, axis=a)
            corner += (display.shape[d] - 1) * spacing[d] * np.array(DIRECTION[letter], dtype=float) * -1
        lps[:3, a] = np.array(DIRECTION[letter], dtype=float) * spacing[d]
    lps[:3, 3] = corner
    return np.ascontiguousarray(stored), RAS_FROM_LPS @ lps


def write_nifti(path, data: np.ndarray, affine: np.ndarray | None, *, slope=None, inter=None):
    """A NIfTI-1 file exactly as given: ``data`` stored as its own dtype, scl_slope / scl_inter as given
    (nibabel's writer would choose its own scaling)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    if affine is not None:
        hdr.set_sform(affine, code=1)
        hdr.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm")
    if slope is not None:
        hdr["scl_slope"], hdr["scl_inter"] = slope, inter
    hdr.set_data_offset(352)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4)  # the 4 bytes: no header extensions
        fh.write(np.asarray(data).tobytes(order="F"))
    return path


# ------------------------------------------------------------------------------------------------ values


def test_air_and_water_survive_int16_with_scaling_and_float32(tmp_path):
    hu = np.array([-1000, 0, 40, 1000], dtype=np.float32)
    grid = np.resize(hu, (6, 5, 4)).astype(np.float32)
    # int16 stored values with scl_slope 0.5 and scl_inter -1024: (HU + 1024) / 0.5
    stored = ((grid + 1024) / 0.5).astype(np.int16)
    assert stored.min() == 48 and stored.max() == 4048
    a = write_nifti(tmp_path / "int16.nii.gz", stored, np.eye(4), slope=0.5, inter=-1024)
    b = write_nifti(tmp_path / "float32.nii", grid, np.eye(4))
    for path in (a, b):
        volume = read_series(path).volume()
        assert volume.dtype == np.float32
        assert sorted(np.unique(volume)) == [-1000.0, 0.0, 40.0, 1000.0]
        assert volume.size == grid.size


# ---------------------------------------------------------------------------------------------- geometry


STORAGE_ORDERS = [
    "LPS",  # DICOM's own order
    "RAS",  # NIfTI's canonical order (nibabel, MNI)
    "LAS",  # radiological (FSL)
    "RAI",  # flipped: superior slice first
    "LPI",
    "PSR",  # sagittal slices (the slowest stored axis runs left-right)
    "AIL",  # sagittal, flipped
    "RSP",  # coronal slices
    "LIA",  # coronal, flipped
    "SLA",  # axes permuted every way
]


@pytest.mark.parametrize("code", STORAGE_ORDERS)
def test_marker_lands_on_the_same_slice_row_and_column_whatever_the_storage_order(tmp_path, code):
    display = display_volume()
    stored, affine = store(display, code)
    # the marker really is at the patient point it should be (left, anterior, superior) in this storage
    where = np.argwhere(stored == MARKER_HU)[0]
    world_ras = (affine @ np.append(where, 1.0))[:3]
    np.testing.assert_allclose(world_ras, [-2.0, 3.15, 12.5], atol=1e-9)  # RAS: -x left, +y anterior
    path = write_nifti(tmp_path / f"{code}.nii.gz", stored, affine)

    series = read_series(path)
    volume = series.volume()
    assert volume.shape == SHAPE
    assert tuple(np.argwhere(volume == MARKER_HU)[0]) == MARKER  # slice 6 (superior), row 2, column 7
    np.testing.assert_array_equal(volume, display)
    first = series.slices[0]
    assert first.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows run to the left, columns to posterior
    assert first.spacing == (0.9, 0.8) and first.thickness == 5.0
    assert (first.rows, first.columns) == (12, 10)
    np.testing.assert_allclose(first.position, ORIGIN, atol=1e-6)
    assert series.ordered_by == "position" and series.tilt_degrees == 0.0
    np.testing.assert_allclose(series.z, ORIGIN[2] + 5.0 * np.arange(8), atol=1e-6)  # inferior to superior
    assert [s.frame for s in series.slices] == list(range(8))
    assert first.series_description == f"NIfTI stored {code}"
    # the marker's own patient position, from the slice geometry read back
    s, r, c = MARKER
    sl = series.slices[s]
    at = np.array(sl.position) + r * sl.spacing[0] * np.array(sl.orientation[3:]) \
        + c * sl.spacing[1] * np.array(sl.orientation[:3])
    np.testing.assert_allclose(at, marker_lps(), atol=1e-6)


def test_oblique_volume_keeps_its_tilt(tmp_path):
    display = display_volume()
    stored, affine = store(display, "RAS")
    angle = math.radians(12.0)  # pitched 12 degrees about the left-right axis
    rot = np.eye(4)
    rot[1:3, 1:3] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    path = write_nifti(tmp_path / "oblique.nii", stored, rot @ affine)
    series = read_series(path)
    np.testing.assert_array_equal(series.volume(), display)
    assert obliquity_degrees(series.slices[0].orientation) == pytest.approx(12.0, abs=1e-6)
    assert np.all(np.diff(series.z) > 0) and series.tilt_degrees == pytest.approx(0.0, abs=1e-6)


def test_headers_only_scan_decodes_later(tmp_path):
    stored, affine = store(display_volume(), "PSR")
    path = write_nifti(tmp_path / "ct.nii.gz", stored, affine)
    scan = find_series(path, pixels=False)
    (series,) = scan.series
    assert all(s.hu is None for s in series.slices)
    np.testing.assert_array_equal(series.volume(), display_volume())
    with_pixels = read_slices(path)  # every slice, HU decoded
    assert [s.frame for s in with_pixels] == list(range(8))
    np.testing.assert_array_equal(with_pixels[MARKER[0]].hu, display_volume()[MARKER[0]])


def test_series_and_image_ids_name_the_file(tmp_path):
    stored, affine = store(display_volume(), "RAS")
    (tmp_path / "sub-01").mkdir()
    (tmp_path / "sub-02").mkdir()
    write_nifti(tmp_path / "sub-01" / "ct.nii.gz", stored, affine)
    write_nifti(tmp_path / "sub-02" / "ct.nii.gz", stored, affine)  # same file name: still two series
    (tmp_path / "notes.txt").write_text("not an image")
    scan = find_series(tmp_path)
    assert sorted(s.series_uid for s in scan.series) == ["sub-01/ct.nii.gz", "sub-02/ct.nii.gz"]
    first = scan.series[0]
    assert [s.image_id for s in first.slices[:2]] == [f"{first.series_uid}_0", f"{first.series_uid}_1"]
    assert [k.kind for k in scan.skipped] == ["NotDicomError"]
    # given directly, a file is named by its file name; inside a zip by zip/member
    assert find_series(tmp_path / "sub-01" / "ct.nii.gz").series[0].series_uid == "ct.nii.gz"
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as zf:
        zf.write(tmp_path / "sub-01" / "ct.nii.gz", "scans/ct.nii.gz")
    (zipped,) = find_series(tmp_path / "study.zip").series
    assert zipped.series_uid == "study.zip/scans/ct.nii.gz"
    np.testing.assert_array_equal(zipped.volume(), display_volume())
    assert series_name(tmp_path / "sub-01" / "ct.nii.gz", tmp_path) == "sub-01/ct.nii.gz"
    assert series_name(tmp_path / "sub-01" / "ct.nii.gz") == "ct.nii.gz"


# ------------------------------------------------------------------------------------------------ bad input


def _bad(path) -> NiftiError:
    """The one-line error of reading ``path`` with pixels, and the same file skipped by a folder scan."""
    with pytest.raises(NiftiError) as info:
        read_nifti(path)
    err = info.value
    assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
    return err


def test_bad_volumes_give_one_line_errors_naming_the_file(tmp_path):
    stored, affine = store(display_volume(), "RAS")
    good = write_nifti(tmp_path / "good.nii.gz", stored, affine)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    assert "ends early" in _bad(truncated).reason
    raw = write_nifti(tmp_path / "raw.nii", stored, affine)
    cut = tmp_path / "cut.nii"
    cut.write_bytes(raw.read_bytes()[:-100])
    assert "ends early" in _bad(cut).reason

    four_d = write_nifti(tmp_path / "4d.nii.gz", np.stack([stored] * 3, axis=-1), affine)
    assert "4-D volume (shape 10x12x8x3: 3 volumes)" in _bad(four_d).reason
    two_d = write_nifti(tmp_path / "2d.nii.gz", stored[:, :, 0], affine)
    assert "2-D image (shape 10x12)" in _bad(two_d).reason

    with_nan = stored.copy()
    with_nan[0, 0, 0] = np.nan
    nan = write_nifti(tmp_path / "nan.nii.gz", with_nan, affine)
    assert "1 of 960 voxels are not finite" in _bad(nan).reason

    unit = write_nifti(tmp_path / "unit.nii.gz", ((stored + 1000) / 2000).astype(np.float32), affine)
    assert "not Hounsfield units" in _bad(unit).reason and "0..1" in _bad(unit).reason
    picture = write_nifti(tmp_path / "picture.nii.gz", ((stored + 1000) / 8).astype(np.uint8), affine)
    assert "0..255 look like an 8-bit picture" in _bad(picture).reason
    offset = write_nifti(tmp_path / "offset.nii.gz", (stored + 1024).astype(np.int16), affine)
    assert "HU + 1024" in _bad(offset).reason

    no_orientation = write_nifti(tmp_path / "plain.nii.gz", stored, None)
    assert "no orientation" in _bad(no_orientation).reason
    not_nifti = tmp_path / "notes.nii"
    not_nifti.write_text("hello")
    assert "not a single-file NIfTI-1/2 volume" in _bad(not_nifti).reason

    # a folder scan (headers only) skips what the header shows is wrong, and goes on
    scan = find_series(tmp_path)
    skipped = {k.path.rsplit("/", 1)[-1]: k for k in scan.skipped}
    assert set(skipped) == {"truncated.nii.gz", "cut.nii", "4d.nii.gz", "2d.nii.gz", "plain.nii.gz", "notes.nii"}
    assert {k.kind for k in skipped.values()} == {"NiftiError"}
    # values are judged when decoded: the rest are series until then
    assert {s.series_uid for s in scan.series} == {"good.nii.gz", "raw.nii", "nan.nii.gz", "unit.nii.gz",
                                                  "picture.nii.gz", "offset.nii.gz"}
    bad_values = next(s for s in scan.series if s.series_uid == "unit.nii.gz")
    with pytest.raises(IchscanError, match="not Hounsfield units"):
        bad_values.volume()


def test_a_4d_volume_of_one_time_point_is_a_3d_volume(tmp_path):
    stored, affine = store(display_volume(), "LAS")
    path = write_nifti(tmp_path / "t1.nii.gz", stored[..., None], affine)
    np.testing.assert_array_equal(read_series(path).volume(), display_volume())


# --------------------------------------------------------------------------------------- inspect and render


def test_inspect_and_render_a_nifti_file(tmp_path, capsys):
    stored, affine = store(display_volume(), "RSP")
    path = write_nifti(tmp_path / "ct.nii.gz", stored, affine)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    (s,) = info["series"]
    assert s["series_uid"] == "ct.nii.gz" and s["modality"] == "CT" and s["n_slices"] == 8
    assert (s["rows"], s["columns"]) == (12, 10)
    assert s["pixel_spacing"] == [0.9, 0.8] and s["slice_spacing"] == pytest.approx(5.0)
    assert s["thickness"] == 5.0 and s["ordered_by"] == "position" and s["description"] == "NIfTI stored RSP"
    assert main(["inspect", str(path)]) == 0
    assert "1 series in" in capsys.readouterr().out

    png = tmp_path / "sheet.png"
    assert main(["render", str(path), "--out", str(png), "--tile", "64"]) == 0
    assert "8 of 8 slices" in capsys.readouterr().out
    image = np.asarray(Image.open(png).convert("L"))
    assert image.shape[0] > 64 and image.max() > 200  # the bone-bright marker shows in the brain window


# ----------------------------------------------------------------------------------- equivalence with DICOM


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A small phantom DICOM series (96 px, 12 slices) and the same volume as NIfTI, stored RAS (as most
    converters store it) with the affine taken from the DICOM geometry."""
    from ichscan.phantom import generate_dataset

    root = tmp_path_factory.mktemp("nifti_phantom")
    generate_dataset(root / "dicom", studies=1, seed=3, size=96, slices=(12, 12), layout="series")
    series = read_series(root / "dicom")
    first = series.slices[0]
    assert first.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0) and len(series) == 12
    volume = series.volume()
    assert np.array_equal(volume, np.round(volume))  # whole HU: int16 holds them exactly
    spacing = (series.slice_spacing, *first.spacing)
    stored, affine = store(volume, "RAS", origin=first.position, spacing=spacing)
    path = write_nifti(root / "phantom.nii.gz", stored.astype(np.int16), affine)
    return root, series, path


def test_nifti_gives_the_dicom_probabilities(phantom):
    from ichscan.predict import Predictor

    _, dicom_series, path = phantom
    nifti_series = read_series(path, pixels=False)
    np.testing.assert_array_equal(nifti_series.volume(), dicom_series.volume())
    np.testing.assert_allclose(nifti_series.z, dicom_series.z, atol=1e-4)
    predictor = Predictor.from_checkpoint("bundled", tta="none", precision="fp32")
    from_dicom = predictor.predict_series(dicom_series)
    from_nifti = predictor.predict_series(nifti_series)
    assert from_nifti.slice_probs.shape == (12, 6)
    np.testing.assert_allclose(from_nifti.slice_probs, from_dicom.slice_probs, atol=1e-5)
    assert from_nifti.image_ids[0] == "phantom.nii.gz_0"


def test_cli_predict_names_the_file_and_reports_bad_ones(phantom, tmp_path, capsys):
    root, _, good = phantom
    common = ["--tta", "none", "--precision", "fp32", "--no-progress"]
    assert main(["predict", str(good), "--out", str(tmp_path / "one"), *common]) == 0
    series = pd.read_csv(tmp_path / "one" / "series.csv")
    assert list(series.series_uid) == ["phantom.nii.gz"] and list(series.n_slices) == [12]
    slices = pd.read_csv(tmp_path / "one" / "slices.csv")
    assert list(slices.image_id[:2]) == ["phantom.nii.gz_0", "phantom.nii.gz_1"]
    assert main(["predict", str(root / "dicom"), "--out", str(tmp_path / "dicom"), *common]) == 0
    dicom = pd.read_csv(tmp_path / "dicom" / "series.csv")
    probs = [c for c in series.columns if c.startswith("prob_")]
    np.testing.assert_allclose(series[probs].to_numpy(), dicom[probs].to_numpy(), atol=1e-5)

    # a folder with the good volume, a truncated one and one of 0..1 intensities
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.nii.gz").write_bytes(good.read_bytes())
    (folder / "truncated.nii.gz").write_bytes(good.read_bytes()[:5000])
    img = nib.load(good)
    unit = (np.asarray(img.dataobj, dtype=np.float32) + 1000) / 3000
    write_nifti(folder / "unit.nii.gz", unit.astype(np.float32), img.affine)
    capsys.readouterr()
    assert main(["predict", str(folder), "--out", str(tmp_path / "mixed_out"), *common]) == 0
    err = capsys.readouterr().err
    assert "truncated.nii.gz" in err and "unit.nii.gz" in err
    series = pd.read_csv(tmp_path / "mixed_out" / "series.csv")
    assert list(series.series_uid) == ["good.nii.gz"]
    skipped = pd.read_csv(tmp_path / "mixed_out" / "skipped.csv")
    reasons = " ".join(skipped.fillna("").astype(str).agg(" ".join, axis=1))
    assert "truncated.nii.gz" in reasons and "ends early" in reasons
    assert "unit.nii.gz" in reasons and "not Hounsfield units" in reasons and "0..1" in reasons


def test_a_volume_that_fails_to_decode_is_decoded_once_not_once_per_slice(tmp_path, monkeypatch):
    """Prediction windows a NIfTI volume's slices as frames of one file: when the file fails (0..1 values),
    every slice is dropped with the file's reason, and the file is decoded once, not once per slice."""
    import ichscan.dicom as dicom
    from ichscan.dicom import find_series
    from ichscan.predict.predictor import _windowed_series

    data, affine = store(display_volume(), "RAS")
    path = write_nifti(tmp_path / "unit.nii.gz", (data + 1000.0).astype(np.float32) / 3000.0, affine)
    series = find_series(path).series[0]
    calls = []
    real = dicom.read_slices

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(dicom, "read_slices", counted)
    kept, arrays, bad = _windowed_series(series, [(("brain",), 64)])
    assert kept == [] and len(bad) == len(series.slices) > 1
    assert len(calls) == 1 and all("0..1" in b.reason for b in bad)


def test_html_report_shows_a_volumes_key_slice(phantom, tmp_path):
    """--html finds a NIfTI volume's key slice (a frame of the one file) by its image id and draws it."""
    _, _, good = phantom
    out = tmp_path / "html"
    assert main(["predict", str(good), "--out", str(out), "--tta", "none", "--precision", "fp32", "--no-progress",
                 "--html"]) == 0
    page = (out / "report.html").read_text()
    assert 'class="keyslice"' in page and "not found under the input" not in page
    assert "multi-frame" not in page
