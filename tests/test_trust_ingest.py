"""Silent wrong answers refused (issue 11): values that cannot be CT numbers, and series that are not head CT.

Bad files are real DICOM written with pydicom (a slice of ``_dicomfactory.write_ct``, a phantom slice or a
pydicom test file, edited); each refusal is one line naming the file and the tag, and ``ichscan predict``
skips such a slice, or rejects such a series, saying why.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from pydicom.pixels import apply_modality_lut

from _dicomfactory import chest_phantom, head_phantom, write_ct, write_series
from ichscan.cli import main
from ichscan.dicom import find_series, read_pixels, read_slice, read_slices, read_stored
from ichscan.errors import IchscanError, PixelDataError
from ichscan.predict import SelectionRules, select_series
from ichscan.predict.selection import looks_like_head
from ichscan.windows import PAPER_WINDOWS, PRESETS, load_windows

REALCT = Path(__file__).resolve().parents[2] / "shared" / "realct"
CHEST = "1.2.826.0.1.3680043.8.498.200"
HEAD = "1.2.826.0.1.3680043.8.498.201"
HEAD_SPACING = (3.5, 3.5)  # head_phantom's 64 pixels then span 224 mm: a head-sized head


def edit(path: Path, **tags) -> Path:
    """Set (or, with None, delete) top-level attributes of a written file."""
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def refused(path: Path, read) -> str:
    with pytest.raises(PixelDataError) as err:
        read(path)
    message = str(err.value)
    assert isinstance(err.value, IchscanError)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


READERS = {
    "read_slice": read_slice,
    "read_pixels": read_pixels,
    "read_stored": lambda p: read_stored(read_slice(p, pixels=False)),
    "load_windows": load_windows,
}


# ----------------------------------------------------------------------------------- values, not CT numbers


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # pydicom's word on NaN and inf: they are the point
@pytest.mark.parametrize("tags,named", [
    (dict(RescaleSlope=0), "RescaleSlope 0 "),
    (dict(RescaleSlope=-1), "RescaleSlope -1 "),
    (dict(RescaleSlope="NaN"), "RescaleSlope nan "),
    (dict(RescaleIntercept="NaN"), "RescaleIntercept nan "),
    (dict(RescaleIntercept="inf"), "RescaleIntercept inf "),
], ids=["slope0", "negative_slope", "nan_slope", "nan_intercept", "inf_intercept"])
def test_rescale_tags_that_cannot_give_ct_numbers_are_refused_from_the_headers(tmp_path, tags, named):
    path = edit(write_ct(tmp_path / "bad.dcm"), **tags)
    for read in (read_slice, lambda p: read_slice(p, pixels=False), read_pixels, load_windows):
        assert named in refused(path, read)
    scan = find_series(tmp_path)  # a headers-only scan already leaves it out, saying why
    assert not scan.series and scan.skipped[0].kind == "PixelDataError" and named in scan.skipped[0].reason


@pytest.mark.parametrize("reader", READERS)
def test_hu_far_outside_the_ct_range_are_refused_where_pixels_are_decoded(tmp_path, reader):
    path = edit(write_ct(tmp_path / "huge.dcm"), RescaleSlope=1e6)  # HU up to 2e9
    assert read_slice(path, pixels=False).pixels_at is not None  # the tags alone are fine
    message = refused(path, READERS[reader])
    assert "huge.dcm" in message and "RescaleSlope 1e+06, RescaleIntercept -1024" in message
    assert "outside -1100..4000 HU" in message


def test_an_8bit_picture_is_not_ct_but_an_8bit_ct_with_air_is(tmp_path):
    picture = np.clip((head_phantom() + 1000) / 8, 0, 255).astype(np.uint8)  # values 0..255, no rescale

    def eight_bit(name, **tags):
        path = write_ct(tmp_path / name)
        ds = pydicom.dcmread(path)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = picture.tobytes()
        ds.save_as(path)
        return edit(path, **tags)

    path = eight_bit("picture.dcm", RescaleSlope=None, RescaleIntercept=None)
    for read in READERS.values():
        message = refused(path, read)
        assert "BitsStored 8 and no air" in message and "lowest 0 HU" in message
    # the same bytes with a rescale that puts air at -1000 HU are an 8-bit CT, read as before
    ct = eight_bit("ct8.dcm", RescaleSlope=8, RescaleIntercept=-1000)
    expected = picture.astype(np.float32) * 8 - 1000
    np.testing.assert_array_equal(read_slice(ct).hu, expected)
    np.testing.assert_array_equal(read_stored(read_slice(ct, pixels=False)).hu(), expected)


def test_a_bad_frame_of_an_enhanced_ct_is_named(testdata, tmp_path):
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(testdata("eCT_Supplemental.dcm"))
    rescale = Dataset()  # frame 1's own rescale, over the shared one (slope 1, intercept -1024)
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 0, -1024, "HU"
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = [rescale]
    ds.save_as(tmp_path / "ect.dcm")
    message = refused(tmp_path / "ect.dcm", read_slices)
    assert "RescaleSlope 0 (frame 1)" in message


@pytest.mark.parametrize("name,centre,corner", [
    ("CT_small.dcm", 904.0, -800.0),  # a thoracic vertebra between the lungs
    ("693_UNCR.dcm", 24.0, -3024.0),  # a CQ500 head; the corner is padding outside the scan circle
    ("693_J2KR.dcm", 24.0, -3024.0),  # the same, JPEG 2000 lossless
    ("693_J2KI.dcm", 32.0, -3040.0),  # JPEG 2000 lossy, 14 bits stored
    ("J2K_pixelrep_mismatch.dcm", 27.0, -2000.0),
])
def test_real_ct_reads_its_known_hu_on_every_path(testdata, name, centre, corner):
    path = testdata(name)
    ds = pydicom.dcmread(path)
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    s = read_slice(path)
    np.testing.assert_array_equal(s.hu, expected)
    assert (s.hu[s.rows // 2, s.columns // 2], s.hu[10, 10]) == (centre, corner)
    np.testing.assert_array_equal(read_pixels(path).hu(), expected)
    np.testing.assert_array_equal(read_stored(read_slice(path, pixels=False)).hu(), expected)


def test_enhanced_multiframe_ct_still_reads_its_frames(testdata):
    path = testdata("eCT_Supplemental.dcm")
    expected = pydicom.dcmread(path).pixel_array.astype(np.float32) - 1024.0  # per-frame intercept -1024
    frames = read_slices(path)
    for s, frame in zip(frames, expected):
        np.testing.assert_array_equal(s.hu, frame)
    assert frames[0].hu[256, 256] == 81.0


# ---------------------------------------------------------------------------------- the head check, images


def test_looks_like_head_on_real_phantom_and_synthetic_slices(testdata, tmp_path):
    assert looks_like_head(read_slice(testdata("693_UNCR.dcm")).hu, (0.478516, 0.478516))  # a real head
    ct_small = read_slice(testdata("CT_small.dcm"))
    assert not looks_like_head(ct_small.hu, ct_small.spacing)  # a vertebra: its canal is a ring, far too small
    for spacing, size in ((3.0, 128), (1.5, 256), (0.75, 512)):
        assert not looks_like_head(chest_phantom(size, size, spacing), (spacing, spacing))
    assert looks_like_head(head_phantom(), HEAD_SPACING)
    assert not looks_like_head(head_phantom(), (0.5, 0.5))  # the same picture 32 mm across: a toy, not a head
    assert not looks_like_head(head_phantom(), None)  # no PixelSpacing: no size
    for blank in (np.full((128, 128), 40.0), np.full((128, 128), -1000.0)):
        assert not looks_like_head(blank, (2.0, 2.0))


def test_the_head_check_measures_the_cavity_alike_at_coarse_and_fine_pixels():
    """The brain region is kept one block away from the bone, and its size is measured with that block
    added back, so that a cavity 84 mm across (a small head's posterior fossa) passes at 3.3 mm pixels as at
    0.45 mm (without it, the coarse slice measured about 78 mm, under the 80 mm minimum), while one 70 mm
    across fails at both."""
    for across, passes in ((84.0, True), (70.0, False)):
        for spacing in (3.3, 0.45):
            n = int(round(220 / spacing))
            y, x = (np.mgrid[:n, :n] - (n - 1) / 2) * spacing
            r = np.hypot(x, y)
            hu = np.full((n, n), -1000.0)
            hu[r < across / 2 + 7] = 1200.0  # a 7 mm skull
            hu[r < across / 2] = 35.0
            assert looks_like_head(hu, (spacing, spacing)) == passes, (across, spacing)


@pytest.fixture(scope="module")
def phantom_heads(tmp_path_factory) -> Path:
    from ichscan.phantom import generate_dataset

    out = tmp_path_factory.mktemp("heads")
    generate_dataset(out, studies=3, seed=21, size=96, slices=(12, 14), layout="series")
    return out


def test_phantom_heads_pass_with_or_without_metadata(phantom_heads, tmp_path):
    selected, rejected = select_series(find_series(phantom_heads).series)
    assert len(selected) == 3 and not rejected
    bare = shutil.copytree(phantom_heads, tmp_path / "bare")
    for f in bare.rglob("*.dcm"):  # no BodyPartExamined, SeriesDescription or ProtocolName: the images decide
        edit(f, BodyPartExamined=None, SeriesDescription=None)
    series = find_series(bare).series
    assert not any(s.slices[0].body_part or s.description for s in series)
    assert len(select_series(series)[0]) == 3


def test_a_chest_is_rejected_by_its_images_whatever_its_metadata_says(tmp_path):
    chest = dict(hu=chest_phantom(), spacing=(3.0, 3.0))
    write_series(tmp_path / "chest", 12, series_uid=CHEST, **chest,
                 tags={"BodyPartExamined": "CHEST", "SeriesDescription": "CT CHEST ABDOMEN PELVIS"})
    write_series(tmp_path / "labelled_head", 12, series_uid=HEAD, **chest,
                 tags={"BodyPartExamined": "HEAD", "SeriesDescription": "CT HEAD WO"})
    scan = find_series(tmp_path)
    selected, rejected = select_series(scan.series)
    assert not selected
    by_uid = {r.series_uid: r for r in rejected}
    assert {r.rule for r in rejected} == {"head_check"}
    assert by_uid[CHEST].detail == ("body part CHEST; skull ring around brain-density tissue on 0 of 6 checked "
                                    "slices (at least 50% needed)")
    assert by_uid[HEAD].detail.startswith("skull ring around brain-density tissue on 0 of 6")  # HEAD is not enough
    assert len(select_series(scan.series, SelectionRules.permissive())[0]) == 2


def test_a_blank_series_is_not_a_head(tmp_path):
    write_series(tmp_path, 12, hu=np.full((64, 64), 30.0), spacing=HEAD_SPACING)
    (rejected,) = select_series(find_series(tmp_path).series)[1]
    assert rejected.rule == "head_check" and "on 0 of 6" in rejected.detail


def test_a_series_whose_checked_slices_cannot_be_read_is_rejected_with_the_first_reason(tmp_path):
    for f in write_series(tmp_path, 12, spacing=HEAD_SPACING):
        edit(f, RescaleSlope=1e6)  # fine tags, values millions of HU out: refused when decoded
    (rejected,) = select_series(find_series(tmp_path).series)[1]
    assert rejected.rule == "head_check"
    assert rejected.detail.startswith(f"none of the slices chosen for the head check could be read ({tmp_path}")
    assert "outside -1100..4000 HU" in rejected.detail


@pytest.mark.parametrize("tags,passes", [
    ({"SeriesDescription": "CT_Chest/Abd"}, False),  # words, whatever separates them
    ({"ProtocolName": "Knee routine"}, False),
    ({"BodyPartExamined": "HEAD", "SeriesDescription": "CT chest"}, True),  # both said: the images decide
    ({"SeriesDescription": "CCT nativ", "BodyPartExamined": "SCHAEDEL"}, True),
    ({"SeriesDescription": "Schädel 5 mm"}, True),
    ({"SeriesDescription": "Chestnut study"}, True),  # a whole word, not a part of one
])
def test_metadata_words_on_a_head_image(tmp_path, tags, passes):
    write_series(tmp_path, 12, series_uid=HEAD, spacing=HEAD_SPACING, tags=tags)
    selected, rejected = select_series(find_series(tmp_path).series)
    assert bool(selected) is passes
    if not passes:
        assert rejected[0].rule == "head_check" and ", though 6 of 6 checked slices show a skull ring" in \
            rejected[0].detail


def test_not_head_ok_predicts_with_a_logged_warning(tmp_path, caplog):
    write_series(tmp_path, 12, series_uid=CHEST, hu=chest_phantom(), spacing=(3.0, 3.0),
                 tags={"BodyPartExamined": "CHEST"})
    with caplog.at_level(logging.WARNING, logger="ichscan.predict.selection"):
        selected, rejected = select_series(find_series(tmp_path).series, SelectionRules(not_head_ok=True))
    assert len(selected) == 1 and not rejected
    (record,) = caplog.records
    assert record.series_uid == CHEST and record.not_head.startswith("body part CHEST")
    assert "does not look like a head CT" in record.getMessage()


def test_realct_heads_pass_the_head_check():
    folder = REALCT / "ge-normal"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (real head CT kept outside the repository; see its README)")
    series = find_series(folder).series
    selected, rejected = select_series(series)
    assert len(selected) == 1 and not rejected, rejected


# ----------------------------------------------------------------------------------------- ichscan predict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from ichscan.model import build_model, save_checkpoint

    torch.manual_seed(0)
    meta = {"windows": [PRESETS[w].to_dict() for w in PAPER_WINDOWS], "image_size": 32}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", build_model("test_efficientnet"), meta)


def predict(checkpoint, folder, out, *extra) -> int:
    return main(["predict", str(folder), "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress",
                 "--tta", "none", *extra])


def test_predict_skips_bad_slices_and_scores_the_series_from_the_good_ones(phantom_heads, checkpoint, tmp_path,
                                                                          capsys):
    study = shutil.copytree(min(phantom_heads.rglob("*.dcm")).parent, tmp_path / "study")
    files = sorted(study.glob("*.dcm"))
    zero = edit(files[3], RescaleSlope=0)  # caught by the headers-only scan
    huge = edit(files[6], RescaleSlope=1e6)  # caught when its pixels are decoded
    assert predict(checkpoint, study, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert f"skipped {zero}: RescaleSlope 0 cannot give CT numbers" in err
    assert f"skipped {huge}: " in err and "of the pixels lie outside -1100..4000 HU with RescaleSlope 1e+06" in err
    series = pd.read_csv(tmp_path / "out" / "series.csv")
    assert len(series) == 1 and series.n_slices[0] == len(files) - 2
    slices = pd.read_csv(tmp_path / "out" / "slices.csv")
    bad_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in (zero, huge)}
    assert not bad_uids & set(slices.sop_uid.astype(str))
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv").set_index("path")
    assert "RescaleSlope 0" in skipped.loc[str(zero), "reason"]
    assert "RescaleSlope 1e+06" in skipped.loc[str(huge), "reason"]


def test_predict_rejects_a_chest_unless_forced(checkpoint, tmp_path, capsys):
    write_series(tmp_path / "in", 12, series_uid=CHEST, hu=chest_phantom(), spacing=(3.0, 3.0),
                 tags={"BodyPartExamined": "CHEST", "SeriesDescription": "CT CHEST ABDOMEN PELVIS"})
    assert predict(checkpoint, tmp_path / "in", tmp_path / "out") == 1  # nothing predicted
    err = capsys.readouterr().err
    assert f"not predicted: series {CHEST} (12 slices): body part CHEST; skull ring" in err and "[head_check]" in err
    assert "--not-head-ok predicts them anyway" in err
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert skipped.kind.tolist() == ["series"] and "body part CHEST" in skipped.reason[0]

    assert predict(checkpoint, tmp_path / "in", tmp_path / "forced", "--not-head-ok") == 0
    err = capsys.readouterr().err
    assert f"WARNING: series {CHEST} does not look like a head CT (body part CHEST; " in err
    assert "its probabilities for this series mean nothing" in err
    assert len(pd.read_csv(tmp_path / "forced" / "series.csv")) == 1
    rules = json.loads((tmp_path / "forced" / "predictions.json").read_text())["config"]["rules"]
    assert rules["head_check"] is True and rules["not_head_ok"] is True
