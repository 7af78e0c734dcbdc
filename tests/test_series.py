"""Series assembly: grouping, ordering along the normal, tilt, localizers, duplicates, bad files, zips."""

from __future__ import annotations

import math
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from _dicomfactory import head_phantom, write_ct, write_series
from ichscan.dicom import find_series, read_series, read_slice
from ichscan.errors import SeriesError

A, B = "1.2.826.0.1.3680043.8.498.100", "1.2.826.0.1.3680043.8.498.200"


def kinds(scan) -> dict[str, str]:
    return {k.path.rsplit("/", 1)[-1]: k.kind for k in scan.skipped}


def test_two_series_mixed_and_shuffled(tmp_path):
    write_series(tmp_path, 6, series_uid=A, z0=10.0, step=5.0)
    for i, z in enumerate(random.Random(3).sample([0.0, 2.5, 5.0, 7.5], 4)):
        write_ct(tmp_path / f"b_{i}.dcm", series_uid=B, position=(0.0, 0.0, z), instance=10 - i)
    scan = find_series(tmp_path)
    assert scan.usable and scan.skipped == ()
    by_uid = {s.series_uid: s for s in scan.series}
    a, b = by_uid[A], by_uid[B]
    assert len(a) == 6 and len(b) == 4
    assert [s.position[2] for s in a.slices] == [10.0, 15.0, 20.0, 25.0, 30.0, 35.0]
    assert [s.position[2] for s in b.slices] == [0.0, 2.5, 5.0, 7.5]
    assert a.ordered_by == b.ordered_by == "position"
    assert a.slice_spacing == 5.0 and b.slice_spacing == 2.5 and a.tilt_degrees == 0.0
    assert all(s.hu is None for s in a.slices)  # headers only by default
    with pytest.raises(SeriesError, match="2 series found"):
        read_series(tmp_path)
    one = read_series(tmp_path, series_uid=B)
    vol = one.volume()
    assert vol.shape == (4, 64, 64) and vol.dtype == np.float32
    np.testing.assert_array_equal(vol[0], head_phantom())


def test_flipped_normal_still_runs_inferior_to_superior(tmp_path):
    # orientation (-1,0,0, 0,1,0) has normal (0,0,-1): sorting must not follow it blindly
    for i, z in enumerate([30.0, 10.0, 20.0]):
        write_ct(tmp_path / f"{i}.dcm", series_uid=A, position=(0.0, 0.0, z), orientation=(-1, 0, 0, 0, 1, 0))
    series = read_series(tmp_path, pixels=False)
    assert [s.position[2] for s in series.slices] == [10.0, 20.0, 30.0]


def test_instance_number_fallback(tmp_path):
    for i, n in enumerate([3, 1, 2]):
        write_ct(tmp_path / f"{i}.dcm", series_uid=A, position=None, instance=n)
    series = read_series(tmp_path, pixels=False)
    assert series.ordered_by == "instance_number"
    assert [s.instance_number for s in series.slices] == [1, 2, 3]


def test_gantry_tilt(tmp_path):
    tilt = 15.0
    c, s = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
    zs = [12.0, 0.0, 24.0, 6.0, 18.0]
    for i, z in enumerate(zs):  # the table moves along z; the image planes are tilted about x
        write_ct(tmp_path / f"t{i}.dcm", series_uid=A, position=(-16.0, -16.0, z), orientation=(1, 0, 0, 0, c, -s),
                 instance=i + 1)
    series = read_series(tmp_path, pixels=False)
    assert series.ordered_by == "position"
    assert [x.position[2] for x in series.slices] == sorted(zs)
    assert series.tilt_degrees == pytest.approx(15.0, abs=0.01)
    assert series.slice_spacing == pytest.approx(6.0 * c)  # distance between planes, along the normal


def test_localizer_duplicate_and_bad_files_are_reported(tmp_path, testdata):
    paths = write_series(tmp_path, 4, series_uid=A)
    write_ct(tmp_path / "scout.dcm", series_uid=A, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
             position=(0.0, -100.0, 0.0), orientation=(0, 1, 0, 0, 0, -1))
    write_ct(tmp_path / "sagittal.dcm", series_uid=A, orientation=(0, 1, 0, 0, 0, -1))  # no LOCALIZER flag
    shutil.copy(paths[0], tmp_path / "zz_copy.dcm")  # same SOP instance again
    truncated = write_ct(tmp_path / "truncated.dcm", series_uid=A, position=(0.0, 0.0, 99.0))
    truncated.write_bytes(truncated.read_bytes()[:-500])
    shutil.copy(testdata("test-SR.dcm"), tmp_path / "report.dcm")
    (tmp_path / "README.txt").write_text("exported by a PACS\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    for pixels in (False, True):
        scan = find_series(tmp_path, pixels=pixels)
        assert len(scan.series) == 1 and len(scan.series[0]) == 4
        assert kinds(scan) == {
            "scout.dcm": "localizer",
            "sagittal.dcm": "orientation",
            "zz_copy.dcm": "duplicate",
            "truncated.dcm": "PixelDataError",
            "report.dcm": "NoPixelDataError",
            "README.txt": "NotDicomError",
            ".DS_Store": "NotDicomError",
        }
        reasons = {k.path.rsplit("/", 1)[-1]: k.reason for k in scan.skipped}
        assert "truncated" in reasons["truncated.dcm"] and "duplicate SOP" in reasons["zz_copy.dcm"]
        assert {k.kind for k in scan.series[0].skipped} == {"localizer", "orientation", "duplicate"}


def test_only_junk_is_not_usable(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    scan = find_series(tmp_path)
    assert not scan.usable and kinds(scan) == {"notes.txt": "NotDicomError"}
    with pytest.raises(SeriesError, match="no usable CT series"):
        read_series(tmp_path)


def test_non_ct_in_folder_needs_allow(tmp_path):
    write_series(tmp_path, 3, series_uid=A, modality="MR")
    assert not find_series(tmp_path).usable
    assert len(find_series(tmp_path, allow_non_ct=True).series[0]) == 3


def test_zip_is_read_in_memory(tmp_path):
    folder = tmp_path / "study"
    write_series(folder, 3, series_uid=A, z0=-5.0)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, f"DICOM/{p.name}")
        zf.writestr("DICOM/README.txt", "hello")
    scan = find_series(archive)
    assert len(scan.series) == 1 and kinds(scan) == {"README.txt": "NotDicomError"}
    series = scan.series[0]
    assert series.slices[0].path.startswith(str(archive) + "/DICOM/")
    assert [s.position[2] for s in series.slices] == [-5.0, 0.0, 5.0]
    vol = series.volume()  # read lazily from the zip
    np.testing.assert_array_equal(vol[1], read_slice(folder / series.slices[1].path.rsplit("/", 1)[-1]).hu)
    # a zip inside a folder is opened too
    assert len(find_series(tmp_path).series) == 1 and len(find_series(tmp_path).series[0]) == 3


def test_single_file_series(tmp_path):
    path = write_ct(tmp_path / "one.dcm", series_uid=A)
    series = read_series(path)
    assert len(series) == 1 and series.ordered_by == "position" and series.slice_spacing is None
    assert series.volume().shape == (1, 64, 64)


def test_corrupt_zip_member_is_reported_and_others_read(tmp_path):
    good = write_ct(tmp_path / "src" / "a.dcm", series_uid=A)
    archive = tmp_path / "in" / "study.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(good, "a.dcm")
        zf.writestr("b.dcm", good.read_bytes().replace(b"PHANTOM1", b"PHANTOM2"))
    data = bytearray(archive.read_bytes())
    at = data.find(b"PHANTOM2")
    data[at] ^= 0xFF  # flip a byte in b.dcm's stored data: its CRC no longer matches
    archive.write_bytes(bytes(data))
    (tmp_path / "in" / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    scan = find_series(tmp_path / "in")
    assert len(scan.series) == 1 and scan.series[0].slices[0].path.endswith("study.zip/a.dcm")
    assert kinds(scan) == {"b.dcm": "BadZipFile", "broken.zip": "BadZipFile"}


def test_a_scout_series_is_kept_flagged_and_selection_rejects_it(tmp_path):
    from ichscan.predict import SelectionRules, select_series

    write_series(tmp_path, 12, series_uid=A, spacing=(3.5, 3.5))  # head-sized pixels: the head check passes it
    scout = "1.2.826.0.1.3680043.8.498.99"
    for k, orientation in enumerate([(1, 0, 0, 0, 0, -1), (0, 1, 0, 0, 0, -1)]):  # AP and lateral topograms
        write_ct(tmp_path / f"topo{k}.dcm", series_uid=scout, sop_uid=f"{scout}.{k}", instance=k + 1,
                 image_type=("ORIGINAL", "PRIMARY", "TOPOGRAM"), orientation=orientation)
    scan = find_series(tmp_path)
    by_uid = {s.series_uid: s for s in scan.series}
    assert set(by_uid) == {A, scout}  # ingest keeps the scout series ...
    assert by_uid[scout].is_localizer and not by_uid[A].is_localizer
    assert [k.kind for k in by_uid[scout].skipped] == ["orientation"]  # its lateral view is another plane
    # ... selection decides: the default rules reject it by its image type, the permissive ones keep it.
    selected, rejected = select_series(scan.series)
    assert [s.series_uid for s in selected] == [A]
    assert [(r.series_uid, r.rule) for r in rejected] == [(scout, "exclude_image_types")]
    assert "TOPOGRAM" in rejected[0].detail
    assert len(select_series(scan.series, SelectionRules.permissive())[0]) == 2
    # A study folder still reads as its one volume.
    assert read_series(tmp_path).series_uid == A


def test_zips_inside_a_zip_are_opened(tmp_path):
    paths = write_series(tmp_path / "s", 3, series_uid=A)
    inner = tmp_path / "series1.zip"
    with zipfile.ZipFile(inner, "w") as zf:
        for p in paths:
            zf.write(p, f"CT/{p.name}")
    outer = tmp_path / "export.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(inner, "study/series1.zip")
    scan = find_series(outer)  # headers only: pixels are read later through the nested path
    assert [len(s) for s in scan.series] == [3] and not scan.skipped
    first = scan.series[0].slices[0]
    assert first.path.startswith(f"{outer}/study/series1.zip/CT/")
    np.testing.assert_array_equal(scan.series[0].volume()[0], read_slice(tmp_path / "s" / Path(first.path).name).hu)
    np.testing.assert_array_equal(read_slice(first.path).hu, scan.series[0].volume()[0])


def test_iter_hu_reads_headers_only_slices_and_hands_back_errors(tmp_path):
    from ichscan.dicom import iter_hu
    from ichscan.errors import PixelDataError

    paths = write_series(tmp_path, 3, series_uid=A)
    series = find_series(tmp_path).series[0]
    expected = series.volume()
    paths[1].write_bytes(paths[1].read_bytes()[:-500])  # truncated after the scan
    got = list(iter_hu(series.slices))
    np.testing.assert_array_equal(got[0][1], expected[0])
    np.testing.assert_array_equal(got[2][1], expected[2])
    assert isinstance(got[1][1], PixelDataError) and got[1][0] is series.slices[1]
