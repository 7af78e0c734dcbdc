"""The cranial cavity (ichscan.cavity) and windows that see only it: what is kept, what becomes air, and that
training's file path, prediction's series path and a checkpoint's record all cut the same slice the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from _dicomfactory import write_ct
from ichscan.cavity import cavity_mask, cut_to_cavity
from ichscan.dicom import find_series, read_pixels, read_slice
from ichscan.labels import LABELS
from ichscan.model import IchClassifier
from ichscan.predict import Predictor
from ichscan.windows import PAPER_WINDOWS, Window, get_windows, load_windows, window_image

SPACING = 0.5  # mm a pixel
SIZE = 320  # 160 mm across
CAVITY = ("brain:cavity", "blood:cavity", "soft_tissue:cavity")


def _mm_grid(size: int = SIZE):
    y, x = np.mgrid[:size, :size]
    return (y - (size - 1) / 2) * SPACING, (x - (size - 1) / 2) * SPACING


def head(*, gap_mm: float = 0.0, scalp_blood: bool = False, blood_inside: bool = False,
         pineal: bool = True, brain: bool = True) -> np.ndarray:
    """HU at 0.5 mm: brain (30) in a skull ring (1000) of inner radius 60 mm and outer 66, scalp (40) to 72 mm,
    air beyond. Inside: a calcified pineal gland (3 mm across, 500 HU) at the centre and, with
    ``blood_inside``, an epidural lens (70 HU) against the inner table on the right. ``scalp_blood``: a
    scalp haematoma (70 HU) outside the bone on the left. ``gap_mm``: a gap in the ring at the top (brain
    in it). ``brain=False``: air inside the ring."""
    y, x = _mm_grid()
    r = np.hypot(y, x)
    hu = np.full((SIZE, SIZE), -1000.0, np.float32)
    hu[r < 72] = 40.0
    hu[r < 66] = 1000.0
    hu[r < 60] = 30.0 if brain else -1000.0
    if pineal:
        hu[r < 1.5] = 500.0
    if gap_mm:
        hu[(r >= 59) & (r < 66) & (np.abs(x) < gap_mm / 2) & (y < 0)] = 30.0
    if scalp_blood:
        hu[(r >= 66) & (r < 72) & (x < -50) & (np.abs(y) < 15)] = 70.0
    if blood_inside:
        hu[(r < 60) & (x > 52) & (np.abs(y) < 15)] = 70.0
    return hu


def test_the_cavity_is_what_the_skull_encloses_to_the_pixel():
    hu = head(blood_inside=True)
    y, x = _mm_grid()
    r = np.hypot(y, x)
    mask = cavity_mask(hu, (SPACING, SPACING))
    assert mask[r < 60].all()  # brain, the calcified pineal gland and the lens against the inner table
    assert not mask[r >= 60].any()  # not the bone, the scalp or the air
    cut = cut_to_cavity(hu, (SPACING, SPACING))
    centre = SIZE // 2
    assert cut[centre, centre] == 500.0 and cut[centre, centre + 110] == 70.0  # pineal; the lens at x = 55 mm
    assert cut[centre, centre + 125] == -1000.0  # the bone (x = 62.5 mm) is air to the model
    assert cut[centre, centre - 138] == -1000.0  # the scalp (x = -69 mm)
    # pixel spacing matters, not pixels: the same head sampled at 1 mm gives the same area within a ring of pixels
    coarse = hu[::2, ::2]
    area = cavity_mask(coarse, (1.0, 1.0)).sum() * 1.0
    assert abs(area - np.pi * 60**2) < 2 * np.pi * 60 * 1.0


def test_enclosed_air_is_left_out_and_other_fossae_kept():
    """A skull base at 1 mm: bone enclosing a posterior fossa (radius 35 mm), two middle fossae (15 mm) and
    an air-filled sinus (12 mm), each apart from the others."""
    y, x = np.mgrid[:200, :200] - 99.5
    hu = np.full((200, 200), -1000.0, np.float32)
    hu[np.hypot(y, x) < 95] = 40.0  # soft tissue
    hu[np.hypot(y, x) < 88] = 1000.0  # bone, with the compartments cut out of it
    posterior, left, right, sinus = (np.hypot(y - cy, x - cx) < r for cy, cx, r in
                                     ((30, 0, 35), (-30, -40, 15), (-30, 40, 15), (-55, 0, 12)))
    hu[posterior | left | right] = 32.0
    hu[sinus] = -1000.0
    mask = cavity_mask(hu, (1.0, 1.0))
    assert mask[posterior].all() and mask[left].all() and mask[right].all()
    assert not mask[sinus].any()
    assert mask.sum() == (posterior | left | right).sum()


def test_a_fracture_line_is_bridged_and_a_bone_flap_gap_spanned():
    y, x = _mm_grid()
    r = np.hypot(y, x)
    assert cavity_mask(head(gap_mm=6.0), (SPACING, SPACING))[r < 60].all()
    # 40 mm without bone (a bone flap): no closing bridges it; the convex hull of the skull does, and it takes
    # in the brain in the gap up to the chord across the bone's ends (y = -62.9 mm), not the scalp beyond
    hu = head(gap_mm=40.0)
    hu[(y > 74) & (y < 77) & (np.abs(x) < 60)] = 1000.0  # a head holder's bright arc, below in air
    mask = cavity_mask(hu, (SPACING, SPACING))
    assert mask[r < 60].all() and mask[(y < -61) & (y > -62) & (np.abs(x) < 3)].all()
    assert not mask[(r >= 68) | (y < -65)].any()  # the edge is good to a grid block (1 mm) and its refinement
    assert not cavity_mask(head(gap_mm=40.0, brain=False), (SPACING, SPACING)).any()  # no brain: nothing to find
    assert not cavity_mask(np.full((64, 64), 30.0, np.float32), (1.0, 1.0)).any()  # no bone at all
    with pytest.raises(ValueError, match="pixel spacing"):
        cavity_mask(head(), None)


def test_cavity_windows_are_named_recorded_and_read_back():
    brain, blood = get_windows(("brain:cavity", "blood"))
    assert brain == Window("brain", 40, 80, "cavity") and blood.region == "whole"
    assert brain.to_dict() == {"name": "brain", "level": 40, "width": 80, "region": "cavity"}
    assert blood.to_dict() == {"name": "blood", "level": 80, "width": 200}  # as checkpoints always had it
    assert get_windows([brain.to_dict()]) == (brain,) and brain.spec() == "brain:cavity" and blood.spec() == "blood"
    with pytest.raises(ValueError, match="region 'skull'"):
        get_windows({"name": "x", "level": 0, "width": 10, "region": "skull"})
    from ichscan.errors import PixelDataError

    with pytest.raises(PixelDataError, match="pixel spacing"):
        window_image(head(), CAVITY, size=None)


def test_cavity_windows_see_air_outside_and_the_slice_inside():
    hu = head(scalp_blood=True)
    whole = window_image(hu, PAPER_WINDOWS, size=None)
    cut = window_image(hu, CAVITY, size=None, spacing=(SPACING, SPACING))
    mask = cavity_mask(hu, (SPACING, SPACING))
    assert (cut[:, ~mask] == 0).all()  # air is 0 in every paper window
    np.testing.assert_array_equal(cut[:, mask], whole[:, mask])
    assert whole[1][SIZE // 2, SIZE // 2 - 138] > 0  # the scalp haematoma is there for a whole-slice model


def test_a_file_on_disk_is_cut_alike_for_training_and_prediction(tmp_path: Path):
    hu = head(scalp_blood=True, blood_inside=True)
    path = write_ct(tmp_path / "s.dcm", hu, spacing=(SPACING, SPACING))
    assert read_pixels(path).spacing == (SPACING, SPACING)
    want = window_image(cut_to_cavity(read_slice(path).hu, (SPACING, SPACING)), PAPER_WINDOWS, size=128)
    np.testing.assert_array_equal(load_windows(path, CAVITY, 128), want)  # the training cache's path
    series = find_series(tmp_path).series[0]
    pred = Predictor.from_models([_blood_detector()], windows=CAVITY, image_size=128, tta="identity",
                                 precision="fp32")
    _, arrays, _, _ = pred.decode_series(series)
    np.testing.assert_array_equal(next(iter(arrays.values()))[0], want)  # prediction's path


def _blood_detector() -> IchClassifier:
    """``any`` logit = 40 x (largest blood-window value above 0.4, over 4 x 4 blocks): the scalp haematoma or
    the lens (70 HU: 0.45) raise it, brain (0.25) and air (0) do not."""
    detector = nn.Conv2d(3, 1, kernel_size=1)
    with torch.no_grad():
        detector.weight.copy_(torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1))
        detector.bias.fill_(-0.4)
    head_ = nn.Linear(1, len(LABELS))
    with torch.no_grad():
        head_.weight.fill_(0.0)
        head_.weight[0, 0] = 40.0
        head_.bias.fill_(-1.0)
    backbone = nn.Sequential(detector, nn.ReLU(), nn.AvgPool2d(4), nn.AdaptiveMaxPool2d(1), nn.Flatten(), head_)
    return IchClassifier(backbone, LABELS, "blood-detector", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).eval()


@pytest.mark.parametrize("inside", [False, True])
def test_a_cavity_model_does_not_see_blood_in_the_scalp(tmp_path: Path, inside: bool):
    hu = head(scalp_blood=True, blood_inside=inside, pineal=False)  # a calcification is bright in the blood window too
    write_ct(tmp_path / "s.dcm", hu, spacing=(SPACING, SPACING))
    series = find_series(tmp_path).series[0]
    kwargs = dict(image_size=128, tta="identity", precision="fp32")
    whole = Predictor.from_models([_blood_detector()], windows=PAPER_WINDOWS, **kwargs).predict_series(series)
    cavity = Predictor.from_models([_blood_detector()], windows=CAVITY, **kwargs).predict_series(series)
    clean = 1 / (1 + np.exp(1.0))  # sigmoid(-1): no blood seen
    assert whole.probs[0] > 0.6  # the scalp haematoma, or the lens
    if inside:
        assert cavity.probs[0] > 0.6
    else:
        assert cavity.probs[0] == pytest.approx(clean, abs=1e-6)


def test_region_is_asked_for_with_init_and_recorded(tmp_path: Path):
    from ichscan.train import TrainConfig, resolve_init

    config = resolve_init(TrainConfig.from_preset("finetune", init="bundled", region="cavity"))
    assert config.windows == CAVITY  # the bundled model's paper windows, each seeing only the cavity
    assert config.to_dict()["region"] == "cavity"
    from ichscan.train import _window_records

    assert [w.get("region") for w in _window_records(config.windows)] == ["cavity"] * 3  # what checkpoints record
    assert "region" not in TrainConfig.from_preset("finetune").to_dict()  # unasked: the record runs always wrote
    plain = resolve_init(TrainConfig.from_preset("paper", region="cavity", windows=("brain", "blood")))
    assert plain.windows == ("brain:cavity", "blood:cavity")
    from ichscan.errors import IchscanError

    with pytest.raises(IchscanError, match="region 'skull'"):
        resolve_init(TrainConfig.from_preset("paper", region="skull"))


def test_a_whole_slice_cache_is_not_used_for_a_cavity_model(tmp_path: Path):
    from ichscan.data import SliceDataset, build_cache, load_labelled
    from ichscan.errors import DataError

    for i in range(2):
        write_ct(tmp_path / "images" / f"ID_{i:09x}.dcm", head(blood_inside=bool(i)), spacing=(SPACING, SPACING))
    (tmp_path / "labels.csv").write_text("ID,Label\n" + "".join(
        f"ID_{i:09x}_{label},{int(i == 1 and label in ('any', 'epidural'))}\n" for i in range(2) for label in LABELS))
    frame = load_labelled(tmp_path).frame
    build_cache(frame, tmp_path / "cache", 64, PAPER_WINDOWS, workers=1)
    from ichscan.data import ImageCache

    with pytest.raises(DataError, match=r"brain:cavity"):
        SliceDataset(frame, 64, CAVITY, cache=ImageCache(tmp_path / "cache"))
    build_cache(frame, tmp_path / "cache_cavity", 64, CAVITY, workers=1)
    cached = SliceDataset(frame, 64, CAVITY, cache=ImageCache(tmp_path / "cache_cavity"))
    images = {str(frame["image_id"].iloc[j]): cached[j][0] for j in range(len(frame))}
    hu = read_slice(tmp_path / "images" / "ID_000000001.dcm").hu
    np.testing.assert_array_equal(images["ID_000000001"], window_image(cut_to_cavity(hu, (SPACING, SPACING)),
                                                                       PAPER_WINDOWS, 64))


def test_a_cavity_model_warns_when_the_images_have_no_bone(tmp_path: Path, caplog):
    """A series exported in a brain window (bone clipped to 80 HU) has no cavity to find: say so, by series."""
    for i in range(6):
        write_ct(tmp_path / f"s{i}.dcm", np.minimum(head(pineal=False), 80.0), spacing=(SPACING, SPACING),
                 position=(-80.0, -80.0, 5.0 * i), instance=i + 1)
    series = find_series(tmp_path).series[0]
    pred = Predictor.from_models([_blood_detector()], windows=CAVITY, image_size=64, tta="identity", precision="fp32")
    with caplog.at_level("WARNING", logger="ichscan.predict.predictor"):
        pred.predict_series(series)
    assert f"series {series.series_uid}: no cranial cavity found on 4 of its 4 middle slices" in caplog.text
    caplog.clear()
    write_ct(tmp_path / "s0.dcm", head(pineal=False), spacing=(SPACING, SPACING), position=(-80.0, -80.0, 0.0),
             instance=1)
    whole = Predictor.from_models([_blood_detector()], windows=PAPER_WINDOWS, image_size=64, tta="identity",
                                  precision="fp32")
    with caplog.at_level("WARNING", logger="ichscan.predict.predictor"):
        whole.predict_series(find_series(tmp_path).series[0])  # a whole-slice model: nothing to say
    assert "cranial cavity" not in caplog.text


def test_a_slice_without_pixel_spacing_is_skipped_by_a_cavity_model(tmp_path: Path):
    """No PixelSpacing: the cavity cannot be measured in mm; that slice is reported, the series goes on."""
    for i in range(3):
        write_ct(tmp_path / f"s{i}.dcm", head(pineal=False), spacing=(SPACING, SPACING),
                 position=(-80.0, -80.0, 5.0 * i), instance=i + 1)
    import pydicom

    ds = pydicom.dcmread(tmp_path / "s1.dcm")
    del ds.PixelSpacing
    ds.save_as(tmp_path / "s1.dcm")
    headers = find_series(tmp_path).series[0]  # read as predict reads it: pixels come from the stored values
    decoded = type(headers)(**{**headers.__dict__, "slices": [read_slice(s.path) for s in headers.slices]})  # HU
    pred = Predictor.from_models([_blood_detector()], windows=CAVITY, image_size=64, tta="identity", precision="fp32")
    for series in (headers, decoded):
        got = pred.predict_series(series)
        assert len(got.slice_probs) == 2
        assert [(Path(b.path).name, "pixel spacing" in b.reason) for b in got.skipped] == [("s1.dcm", True)]
