"""Outputs people can rely on: one-line errors, any file name, one run per folder, phantoms that resume.

Every command error is checked the way a user meets it: exit status 1 (argparse's 2), exactly one line on
stderr, no traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from ichscan.cli import main
from ichscan.errors import FolderInUseError, IchscanError
from ichscan.fileio import LOCK_NAME, escape_undecodable, lock_folder
from ichscan.model import build_model, save_checkpoint
from ichscan.phantom import generate_dataset
from ichscan.windows import PAPER_WINDOWS, PRESETS

BAD_NAME = b"bad\xff.dcm"  # not UTF-8: os.fsdecode gives 'bad\udcff.dcm'


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two one-study phantom folders and a tiny untrained checkpoint."""
    root = tmp_path_factory.mktemp("trust")
    generate_dataset(root / "a", studies=1, seed=5, size=64, slices=(5, 6), layout="series")
    generate_dataset(root / "b", studies=1, seed=6, size=64, slices=(5, 6), layout="series")
    meta = {"windows": [PRESETS[w].to_dict() for w in PAPER_WINDOWS], "image_size": 32}
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root / "m0", build_model("test_efficientnet"), meta)
    return root, checkpoint


def _predict_args(data, checkpoint, out) -> list[str]:
    return ["predict", str(data), "--checkpoint", str(checkpoint), "--out", str(out), "--min-slices", "3",
            "--no-progress"]


# What `ichscan predict` says of its model on stderr before it opens --out (cli/predict.py); an error found
# there follows these lines.
PREDICT_TALK = ("model: ", "thresholds: ")


def _one_line_error(capsys, code: int, expected: int = 1) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith(PREDICT_TALK)]
    assert code == expected, err
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("ichscan "), err
    return lines[0]


# -- one-line errors --------------------------------------------------------------------------------

def test_out_that_is_a_file_is_one_line_for_predict_and_evaluate(setup, tmp_path, capsys):
    root, checkpoint = setup
    taken = tmp_path / "taken.txt"
    taken.write_text("mine\n")
    line = _one_line_error(capsys, main(_predict_args(root / "a", checkpoint, taken)))
    assert str(taken) in line and "needs a folder" in line
    line = _one_line_error(capsys, main(["evaluate", "--pred", str(root / "a" / "series_labels.csv"), "--labels",
                                         str(root / "a" / "series_labels.csv"), "--out", str(taken)]))
    assert str(taken) in line and "needs a folder" in line
    assert taken.read_text() == "mine\n"


def test_render_refuses_a_folder_and_sizes_that_would_exhaust_memory(setup, tmp_path, capsys):
    root, _ = setup
    line = _one_line_error(capsys, main(["render", str(root / "a"), "--out", str(tmp_path)]))
    assert str(tmp_path) in line and "picture file name" in line
    # --tile 100000 used to allocate tens of GB before the kernel killed it
    line = _one_line_error(capsys, main(["render", str(root / "a"), "--out", str(tmp_path / "x.png"),
                                         "--tile", "100000"]))
    assert "2048" in line
    line = _one_line_error(capsys, main(["render", str(root / "a"), "--out", str(tmp_path / "x.png"),
                                         "--tile", "2048", "--windows", "brain,blood,soft_tissue,bone"]))
    assert "megapixels" in line
    line = _one_line_error(capsys, main(["render", str(root / "a"), "--out", str(tmp_path / "x.png"),
                                         "--max-slices", "-1"]))
    assert "max_slices -1" in line and "samples" not in line  # ours, not numpy's
    line = _one_line_error(capsys, main(["render", str(root / "a"), "--out", str(tmp_path / "x.png"),
                                         "--windows", "foo"]), expected=2)
    assert "unknown window 'foo'" in line
    assert not (tmp_path / "x.png").exists()
    assert main(["render", str(root / "a"), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(setup, tmp_path, capsys):
    root, checkpoint = setup
    line = _one_line_error(capsys, main([*_predict_args(root / "a", checkpoint, tmp_path / "o"), "--device", "cuda"]))
    assert "CUDA is not available on this machine; use --device cpu" in line


def test_unknown_device_and_top_k_are_one_line(setup, tmp_path, capsys):
    root, checkpoint = setup
    base = _predict_args(root / "a", checkpoint, tmp_path / "o")
    line = _one_line_error(capsys, main([*base, "--device", "foo"]), expected=2)
    assert "unknown device 'foo'" in line
    for flag in ("--top-k", "--batch-size"):  # refused by the argument parser: usage and one error line
        with pytest.raises(SystemExit) as stop:
            main([*base, "--aggregation", "topk", flag, "0"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"argument {flag}: 0 is not 1 or more" in err and "Traceback" not in err


def test_thresholds_file_with_a_word_is_one_line_naming_it(setup, tmp_path, capsys):
    root, checkpoint = setup
    thresholds = tmp_path / "thr.json"
    thresholds.write_text(json.dumps({"method": "fixed", "thresholds": {"any": "abc"}}))
    line = _one_line_error(capsys, main([*_predict_args(root / "a", checkpoint, tmp_path / "o"),
                                         "--thresholds", str(thresholds)]))
    assert str(thresholds) in line and "'abc'" in line
    line = _one_line_error(capsys, main(["evaluate", "--pred", str(root / "a" / "series_labels.csv"), "--labels",
                                         str(root / "a" / "series_labels.csv"), "--thresholds", str(thresholds),
                                         "--out", str(tmp_path / "eval")]))
    assert str(thresholds) in line and "'abc'" in line


@pytest.mark.parametrize("change, words", [({"arch": "resnet18"}, "do not fit resnet18"),
                                           ({"image_size": -5}, "'image_size' is -5")])
def test_broken_checkpoint_is_one_line(setup, tmp_path, capsys, change, words):
    root, checkpoint = setup
    meta = json.loads(Path(checkpoint).read_text())
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(dict(meta, **change, weights="broken.safetensors")))
    shutil.copy(Path(checkpoint).with_suffix(".safetensors"), tmp_path / "broken.safetensors")
    line = _one_line_error(capsys, main(_predict_args(root / "a", broken, tmp_path / "o")))
    assert words in line and "broken" in line


def test_phantom_sizes_beyond_memory_are_one_line(tmp_path, capsys):
    line = _one_line_error(capsys, main(["phantom", "--out", str(tmp_path / "p"), "--studies", "1", "--seed", "0",
                                         "--size", "100000"]))
    assert "size 100000" in line
    line = _one_line_error(capsys, main(["phantom", "--out", str(tmp_path / "p"), "--studies", "1", "--seed", "0",
                                         "--size", "1024", "--slices", "1000"]))
    assert "fewer slices" in line
    assert not (tmp_path / "p").exists()


# -- any file name ----------------------------------------------------------------------------------

def test_a_file_name_that_is_not_utf8_is_reported_escaped(setup, tmp_path, capsys):
    root, checkpoint = setup
    data = tmp_path / "in"
    shutil.copytree(root / "a", data)
    with open(os.path.join(os.fsencode(data), BAD_NAME), "wb") as fh:
        fh.write(b"not DICOM at all")
    out = tmp_path / "out"
    for attempt in range(2):  # the rerun (resuming from work/) writes the same whole outputs
        assert main(_predict_args(data, checkpoint, out)) == 0
        capsys.readouterr()
        for name in ("slices.csv", "series.csv", "submission.csv", "skipped.csv", "predictions.json"):
            assert (out / name).is_file()
        skipped = pd.read_csv(out / "skipped.csv")
        assert any(str(p).endswith("bad\\xff.dcm") for p in skipped.path.dropna())
        doc = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
        assert any(item["path"].endswith("bad\\xff.dcm") for item in doc["skipped"])
        assert len(pd.read_csv(out / "series.csv")) == 1
    assert escape_undecodable(os.fsdecode(BAD_NAME)) == "bad\\xff.dcm"


# -- one run per folder -----------------------------------------------------------------------------

def test_predict_refuses_a_folder_holding_another_inputs_results(setup, tmp_path, capsys):
    root, checkpoint = setup
    out = tmp_path / "out"
    assert main(_predict_args(root / "a", checkpoint, out)) == 0
    first = (out / "series.csv").read_bytes()
    capsys.readouterr()
    line = _one_line_error(capsys, main(_predict_args(root / "b", checkpoint, out)))
    assert "another input" in line and "--restart" in line and str(root / "a") in line
    assert (out / "series.csv").read_bytes() == first  # the first run's outputs are untouched
    assert main([*_predict_args(root / "b", checkpoint, out), "--restart"]) == 0
    assert (out / "series.csv").read_bytes() != first
    assert not (out / LOCK_NAME).exists()


def test_a_folder_another_run_is_writing_is_refused(setup, tmp_path, capsys):
    root, checkpoint = setup
    for args in (_predict_args(root / "a", checkpoint, tmp_path / "busy"),
                 ["phantom", "--out", str(tmp_path / "busy"), "--studies", "1", "--seed", "0", "--size", "32",
                  "--slices", "2"]):
        with lock_folder(tmp_path / "busy"):
            line = _one_line_error(capsys, main(args))
        assert f"another ichscan run is writing this folder (pid {os.getpid()})" in line
    assert list((tmp_path / "busy").iterdir()) == []  # nothing written, and the lock file gone with the lock


def test_lock_is_exclusive_and_released(tmp_path):
    with lock_folder(tmp_path):
        with pytest.raises(FolderInUseError), lock_folder(tmp_path):
            pass
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    with lock_folder(tmp_path):  # free again
        pass
    assert not (tmp_path / LOCK_NAME).exists()


def _phantom_args(out, studies: int, seed: int, *extra) -> list[str]:
    return ["phantom", "--out", str(out), "--studies", str(studies), "--seed", str(seed), "--size", "32",
            "--slices", "2-3", *extra]


def test_phantom_refuses_other_arguments_and_overwrite_removes_only_its_files(tmp_path, capsys):
    out = tmp_path / "set"
    assert main(_phantom_args(out, 3, 1, "--masks")) == 0
    first = {p.name for p in (out / "images").iterdir()}
    (out / "notes.txt").write_text("mine\n")
    (out / "images" / "mine.txt").write_text("mine too\n")
    capsys.readouterr()
    line = _one_line_error(capsys, main(_phantom_args(out, 5, 1)))
    assert "studies 3 (now 5)" in line and "masks True (now False)" in line and "--overwrite" in line
    assert {p.name for p in (out / "images").iterdir()} == first | {"mine.txt"}  # nothing written

    assert main(_phantom_args(out, 2, 2, "--layout", "series", "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "images" / "mine.txt").exists()
    assert {p.name for p in (out / "images").iterdir()} == {"mine.txt"}  # the 3 series of seed 1 are gone
    assert not (out / "masks").exists()
    dicom = list(out.rglob("*.dcm"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(dicom) == manifest["counts"]["slices"] and manifest["arguments"]["studies"] == 2
    assert len(pd.read_csv(out / "series_labels.csv")) == 2


def test_phantom_refuses_a_folder_of_unknown_phantom_files(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ID_0123456789.dcm").write_bytes(b"x")
    line = _one_line_error(capsys, main(_phantom_args(tmp_path, 1, 0)))
    assert "no record of their arguments" in line and "--overwrite" in line
    assert main(_phantom_args(tmp_path, 1, 0, "--overwrite")) == 0
    assert not (tmp_path / "images" / "ID_0123456789.dcm").exists()


# -- phantoms resume --------------------------------------------------------------------------------

def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["rsna", "series"])
def test_interrupted_phantom_run_resumes_to_the_same_bytes(tmp_path, layout):
    kwargs = {"studies": 4, "seed": 11, "size": 32, "slices": (3, 4), "layout": layout, "masks": True}
    whole = generate_dataset(tmp_path / "whole", **kwargs)

    seen = []

    def interrupt(n: int) -> None:
        seen.append(n)
        if len(seen) == 2:  # after the second series
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "resumed", **kwargs, progress=interrupt)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    kept = next((tmp_path / "resumed").rglob("*.dcm"))
    inode = kept.stat().st_ino

    again = generate_dataset(tmp_path / "resumed", **kwargs)
    assert again.resumed == 2 and again.slices == whole.slices
    assert kept.stat().st_ino == inode  # a finished series is kept, not drawn again
    assert _digests(tmp_path / "resumed") == _digests(tmp_path / "whole")

    # A finished set has no journal; rerunning it keeps every file as it is (nothing drawn again); with a file
    # missing it is drawn again whole, to the same bytes; other arguments are refused.
    kept = {f: f.stat().st_ino for f in (tmp_path / "resumed").rglob("*") if f.is_file()}
    assert generate_dataset(tmp_path / "resumed", **kwargs).resumed == 4
    assert {f: f.stat().st_ino for f in (tmp_path / "resumed").rglob("*") if f.is_file()} == kept
    next((tmp_path / "resumed").rglob("*.dcm")).unlink()
    assert generate_dataset(tmp_path / "resumed", **kwargs).resumed == 0
    assert _digests(tmp_path / "resumed") == _digests(tmp_path / "whole")
    with pytest.raises(IchscanError, match="seed 11 \\(now 12\\)"):
        generate_dataset(tmp_path / "resumed", **dict(kwargs, seed=12))


def test_phantom_series_with_a_missing_file_is_drawn_again(tmp_path):
    kwargs = {"studies": 3, "seed": 2, "size": 32, "slices": (3, 3)}
    generate_dataset(tmp_path / "whole", **kwargs)

    def interrupt(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "resumed", **kwargs, progress=interrupt)
    next((tmp_path / "resumed" / "images").iterdir()).unlink()  # the one finished series is no longer whole
    assert generate_dataset(tmp_path / "resumed", **kwargs).resumed == 0
    assert _digests(tmp_path / "resumed") == _digests(tmp_path / "whole")
