"""Data: RSNA labels, the header index (resumable, reporting bad files), folds, the dataset and the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _dicomfactory import write_ct
from pydicom.uid import generate_uid

from ichscan.data import (
    ImageCache,
    SliceDataset,
    assign_folds,
    build_cache,
    build_index,
    load_labelled,
    read_labels,
)
from ichscan.errors import DataError
from ichscan.labels import LABELS, RSNA_CSV_ORDER
from ichscan.privacy import Pseudonymizer
from ichscan.windows import load_windows


def write_slice(path: Path, patient: str, study: str, series: str, z: float, instance: int, seed: int = 0) -> Path:
    """A small real CT slice (uncompressed int16, intercept -1024) with a 4x4 blood-like square."""
    rng = np.random.default_rng(seed)
    hu = np.full((48, 40), -1000.0)
    hu[6:42, 5:35] = 30 + rng.normal(0, 5, (36, 30))
    hu[20:24, 15:19] = 70 + seed % 7
    return write_ct(path, hu, patient_id=patient, study_uid=study, series_uid=series,
                    position=(-10.0, -12.0, z), instance=instance)


def make_rsna_folder(root: Path, patients: int = 8, slices: int = 3) -> pd.DataFrame:
    """``images/ID_*.dcm`` + ``labels.csv`` in RSNA's layout; returns the truth (image_id, patient, any...)."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    truth, rows = [], []
    k = 0
    for p in range(patients):
        study, series = generate_uid(), generate_uid()
        for s in range(slices):
            image_id = f"ID_{k:09x}"
            write_slice(root / "images" / f"{image_id}.dcm", f"P{p}", study, series, z=5.0 * s, instance=s + 1, seed=k)
            sub = (rng.random(5) < 0.3).astype(int)
            values = dict(zip(LABELS[1:], sub))
            values["any"] = int(sub.max())
            truth.append({"image_id": image_id, "patient_id": f"P{p}", **values})
            rows += [(f"{image_id}_{name}", values[name]) for name in RSNA_CSV_ORDER]
            k += 1
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(root / "labels.csv", index=False)
    return pd.DataFrame(truth)


def test_read_labels_drops_duplicates_and_reports_conflicts(tmp_path):
    rows = [
        ("ID_aa_epidural", 0), ("ID_aa_intraparenchymal", 1), ("ID_aa_intraventricular", 0),
        ("ID_aa_subarachnoid", 0), ("ID_aa_subdural", 0), ("ID_aa_any", 1),
        ("ID_aa_any", 1),  # exact duplicate
        ("ID_bb_epidural", 0), ("ID_bb_intraparenchymal", 0), ("ID_bb_intraventricular", 0),
        ("ID_bb_subarachnoid", 0), ("ID_bb_subdural", 0), ("ID_bb_any", 0),
        ("ID_bb_subdural", 1),  # conflicts with the 0 above
        ("ID_cc_any", 0),  # incomplete: five labels unknown
        ("garbage", 1),
    ]
    csv = tmp_path / "stage_2_train.csv"
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(csv, index=False)
    frame, report = read_labels(csv)
    assert list(frame.columns) == ["image_id", *LABELS]
    assert frame["image_id"].tolist() == ["ID_aa", "ID_bb", "ID_cc"]
    assert report.duplicate_rows == 1
    assert report.conflicts == [("ID_bb", "subdural")]
    assert report.malformed == ["garbage"]
    assert report.incomplete == 1
    row = frame.set_index("image_id")
    assert row.loc["ID_aa", "any"] == 1 and row.loc["ID_aa", "intraparenchymal"] == 1
    assert row.loc["ID_bb", "subdural"] == 1  # conflict kept as positive
    assert np.isnan(row.loc["ID_cc", "epidural"]) and row.loc["ID_cc", "any"] == 0
    assert any("conflict" in line or "both 0 and 1" in line for line in report.lines())


def test_index_reports_bad_files_resumes_and_caches(tmp_path):
    truth = make_rsna_folder(tmp_path / "d", patients=4, slices=3)
    images = tmp_path / "d" / "images"
    (images / "ID_6431af929.dcm").write_bytes(b"not a dicom file at all" * 10)  # like RSNA's unreadable one
    good = images / f"{truth.image_id[0]}.dcm"
    truncated = images / "ID_00000ffff.dcm"
    truncated.write_bytes(good.read_bytes()[:-500])
    calls = []
    cache = tmp_path / "index.parquet"
    files = sorted(str(p) for p in images.glob("*.dcm"))
    index, report = build_index(files, cache, workers=1, shard_size=4, progress=lambda d, t: calls.append((d, t)))
    assert report.files == 14 and report.indexed == 12
    bad = {s.path: s.reason for s in report.problems}
    assert set(bad) == {str(images / "ID_6431af929.dcm"), str(truncated)}
    assert "truncated" in bad[str(truncated)]
    assert calls[-1] == (14, 14)
    assert list(index.columns)[:8] == ["image_id", "path", "patient_id", "study_uid", "series_uid", "sop_uid",
                                       "z", "instance_number"]
    row = index.set_index("image_id").loc[truth.image_id[2]]
    assert row["z"] == pytest.approx(10.0) and row["instance_number"] == 3
    assert row["patient_id"] == Pseudonymizer()("P0")  # the index names patients by their pseudonym
    # Loading again reads the cache (reports kept).
    again, report2 = build_index(files, cache)
    pd.testing.assert_frame_equal(index, again)
    assert {s.path: s.reason for s in report2.problems} == bad
    # Resume: shards left from an interrupted run are reused.
    parts = Path(str(cache) + ".parts")
    cache.unlink()
    parts.mkdir()
    from ichscan.data import _index_shard

    _index_shard(files[:4]).to_parquet(parts / "shard-000000.parquet", index=False)
    resumed, report3 = build_index(files, cache, workers=2, shard_size=4)
    assert report3.reused_shards == 1
    pd.testing.assert_frame_equal(resumed.sort_values("path").reset_index(drop=True),
                                  index.sort_values("path").reset_index(drop=True))
    assert not parts.exists()


def test_load_labelled_joins_and_reports_missing(tmp_path):
    truth = make_rsna_folder(tmp_path / "d", patients=3, slices=2)
    (tmp_path / "d" / "images" / f"{truth.image_id[1]}.dcm").unlink()
    data = load_labelled(tmp_path / "d", workers=1)
    assert data.missing == [truth.image_id[1]]
    assert len(data.frame) == len(truth) - 1
    merged = data.frame.merge(truth, on="image_id", suffixes=("", "_truth"))
    for name in LABELS:
        assert (merged[name] == merged[f"{name}_truth"]).all()
    assert any("no usable file" in line for line in data.lines())


def test_folds_group_patients_and_stratify():
    rng = np.random.default_rng(0)
    n = 600
    frame = pd.DataFrame({
        "patient_id": [f"P{i // 6}" for i in range(n)],
        "study_uid": [f"S{i // 6}" for i in range(n)],
        "any": (rng.random(n) < 0.3).astype(float),
    })
    folds = assign_folds(frame, n_folds=5, seed=0)
    assert set(folds) == {0, 1, 2, 3, 4}
    per_patient = pd.Series(folds).groupby(frame["patient_id"]).nunique()
    assert (per_patient == 1).all()
    rates = pd.Series(frame["any"].to_numpy()).groupby(folds).mean()
    assert rates.max() - rates.min() < 0.1
    with pytest.raises(DataError):
        assign_folds(frame.iloc[:12], n_folds=5)


def test_dataset_and_cache_agree_and_cache_resumes(tmp_path):
    make_rsna_folder(tmp_path / "d", patients=3, slices=3)
    data = load_labelled(tmp_path / "d", workers=1)
    frame = data.frame
    ds = SliceDataset(frame, size=32)
    assert ds.labels == LABELS and len(ds) == 9 and not ds.cached
    image, target = ds[4]
    assert image.dtype == np.uint8 and image.shape == (3, 32, 32)
    np.testing.assert_array_equal(image, load_windows(frame.path[4], size=32))
    np.testing.assert_array_equal(target, frame.loc[4, list(LABELS)].to_numpy(np.float32))
    # A cache interrupted after the first chunk resumes and then matches DICOM decoding exactly.
    root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_cache(frame, root, 32, workers=1, chunk=4,
                    progress=lambda d, t: (_ for _ in ()).throw(KeyboardInterrupt) if d >= 4 else None)
    status = np.load(root / "status.npy")
    assert status.sum() == 4
    report = build_cache(frame, root, 32, workers=2, chunk=2)
    assert report.done == 9 and report.written == 5 and not report.failures
    cached = SliceDataset(frame, size=32, cache=root)
    assert cached.cached
    for i in range(len(ds)):
        np.testing.assert_array_equal(cached[i][0], ds[i][0])
    with pytest.raises(DataError, match="another size"):
        build_cache(frame, root, 64, workers=1)
    with pytest.raises(DataError, match="px"):
        SliceDataset(frame, size=64, cache=root)
    assert ImageCache(root).get(frame.image_id[0]).shape == (3, 32, 32)


def test_cache_reports_unreadable_files(tmp_path):
    make_rsna_folder(tmp_path / "d", patients=2, slices=2)
    frame = load_labelled(tmp_path / "d", workers=1).frame
    Path(frame.path[1]).write_bytes(b"gone bad")
    report = build_cache(frame, tmp_path / "c", 32, workers=1)
    assert report.done == 3 and list(report.failures) == [frame.image_id[1]]
