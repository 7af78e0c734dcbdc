"""Messages that say the true problem, where a person would look for it."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from ichscan.data import read_labels
from ichscan.errors import CheckpointError, DataError
from ichscan.labels import LABELS
from ichscan.metrics import join_series_labels
from ichscan.model import build_model, load_ensemble, save_checkpoint, write_ensemble

META = {"windows": ["brain", "blood", "soft_tissue"], "image_size": 32}


def test_label_csv_rows_are_named_by_their_line_and_their_real_fault(tmp_path):
    csv = tmp_path / "stage_2_train.csv"
    csv.write_text("ID,Label\nID_aa_any,1\nID_aa_epidural,yes\nID_aa_bleed,0\ngarbage,1\n")
    _, report = read_labels(csv)
    assert report.malformed_reasons == [
        "line 3: label value 'yes' of ID_aa_epidural is not 0 or 1",
        "line 4: ID 'ID_aa_bleed' is not ID_<image>_<label> with a label of " + ", ".join(LABELS),
        "line 5: ID 'garbage' is not ID_<image>_<label> with a label of " + ", ".join(LABELS),
    ]
    assert "3 rows skipped, e.g. line 3: label value 'yes'" in "\n".join(report.lines())


def test_series_csv_errors_give_file_lines(tmp_path):
    uids = [f"1.2.{i}" for i in range(4)]
    pred = pd.DataFrame({"series_uid": uids, **{f"prob_{n}": [0.1, 0.2, 0.3, 0.4] for n in LABELS}})
    pred.loc[2, "prob_any"] = 1.5  # third data row: line 4 of the file
    pred.to_csv(tmp_path / "series.csv", index=False)
    truth = pd.DataFrame({"series_uid": uids[::-1], **{n: [0, 1, 0, 1] for n in LABELS}})
    truth.loc[0, "subdural"] = 7  # first data row: line 2
    truth.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DataError, match=r"series\.csv: 1 series prediction row\(s\) have probabilities .* "
                                        r"\(first: lines 4 of the file\)"):
        join_series_labels(tmp_path / "series.csv", tmp_path / "labels.csv")
    pred.loc[2, "prob_any"] = 0.5
    pred.to_csv(tmp_path / "series.csv", index=False)
    with pytest.raises(DataError, match=r"labels\.csv: 1 series label row\(s\) .* \(first: lines 2 of the file\)"):
        join_series_labels(tmp_path / "series.csv", tmp_path / "labels.csv")


def test_an_ensemble_manifest_whose_labels_differ_from_a_member_is_refused(tmp_path):
    torch.manual_seed(0)
    a = save_checkpoint(tmp_path / "a", build_model("test_efficientnet"), META)
    manifest = write_ensemble(tmp_path / "e.json", [a])
    doc = json.loads(manifest.read_text())
    doc["labels"] = ["any", "subdural"]
    manifest.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"e\.json: the manifest lists labels \['any', 'subdural'\] but its "
                                              r"member a\.json was trained on"):
        load_ensemble(manifest)


def test_render_with_an_unknown_series_uid_names_the_ones_there(tmp_path, capsys):
    from _dicomfactory import write_series
    from ichscan.cli import main

    write_series(tmp_path / "study", 3, series_uid="1.2.826.0.1.3680043.8.498.5")
    assert main(["render", str(tmp_path / "study"), "--series", "1.2.3.4", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("no series 1.2.3.4 here; --series takes one of: 1.2.826.0.1.3680043.8.498.5 (3 slices)")
    assert len(err.splitlines()) == 1


def test_predict_counts_slices_from_one_and_says_when_spacing_was_uneven(tmp_path, capsys):
    from _dicomfactory import write_ct
    from ichscan.cli import main
    from ichscan.windows import PAPER_WINDOWS, PRESETS

    for i, z in enumerate([0, 4, 8, 12, 19, 26]):
        write_ct(tmp_path / "study" / f"s{i}.dcm", position=(-112.0, -112.0, float(z)), instance=i + 1,
                 sop_uid=f"1.2.826.0.1.3680043.8.498.66.{i}", spacing=(3.5, 3.5))
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m", build_model("test_efficientnet"),
                           {"windows": [PRESETS[w].to_dict() for w in PAPER_WINDOWS], "image_size": 32})
    (tmp_path / "zero.json").write_text(json.dumps({"method": "fixed", "thresholds": dict.fromkeys(LABELS, 0.0)}))
    assert main(["predict", str(tmp_path / "study"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"),
                 "--min-slices", "3", "--no-progress", "--thresholds", str(tmp_path / "zero.json")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("series "))
    assert "of 6)" in line and "(slice 0 of" not in line  # key slices counted 1..6
    assert line.endswith("[scored with uneven slice spacing 4.00-7.00 mm]")


def test_index_reports_a_file_name_that_is_not_utf8_instead_of_crashing(tmp_path):
    import os

    from _dicomfactory import write_series
    from ichscan.data import build_index

    write_series(tmp_path / "d", 2)
    bad = os.path.join(os.fsencode(tmp_path / "d"), b"scan\xff.dcm")
    with open(bad, "wb") as fh:
        fh.write((tmp_path / "d" / sorted(os.listdir(tmp_path / "d"))[0]).read_bytes())
    index, report = build_index(tmp_path / "d", tmp_path / "index.parquet", workers=1)
    assert len(index) == 2
    assert [(p.path.rsplit("/", 1)[-1], p.reason) for p in report.problems] == [
        ("scan\\xff.dcm", "file name is not valid UTF-8; rename the file to use it for training")]


def test_evaluate_out_below_a_file_is_one_line(tmp_path, capsys):
    from ichscan.cli import main

    (tmp_path / "f").write_text("x")
    assert main(["evaluate", "--pred", "p.csv", "--labels", "l.csv", "--out", str(tmp_path / "f" / "sub")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("f/sub: cannot create the output folder (Not a directory)") and "\n" not in err


def test_a_second_demo_into_a_folder_being_written_is_refused(tmp_path):
    from ichscan.demo import run_demo
    from ichscan.errors import FolderInUseError
    from ichscan.fileio import lock_folder

    with lock_folder(tmp_path / "demo"):  # as a running demo holds it
        with pytest.raises(FolderInUseError, match="another ichscan run is writing this folder"):
            run_demo(tmp_path / "demo")
