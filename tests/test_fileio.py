"""ichscan.fileio: every output is written whole or not at all, readable by others (0644 under umask 022)."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ichscan.fileio import atomic_path, write_bytes, write_csv, write_json, write_npy, write_parquet, write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_each_writer_makes_0644_files_with_the_content_asked(tmp_path, umask_022):
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    write_text(tmp_path / "sub" / "t.txt", "héllo\r\nline\n")  # folders are created; newlines kept as given
    write_json(tmp_path / "j.json", {"p": tmp_path, "t": (1, 2), "n": np.float32(0.5)})
    write_csv(tmp_path / "c.csv", frame)
    write_parquet(tmp_path / "p.parquet", frame)
    write_npy(tmp_path / "s.npy", np.arange(3, dtype=np.uint8))
    for name in ("b.bin", "sub/t.txt", "j.json", "c.csv", "p.parquet", "s.npy"):
        assert _mode(tmp_path / name) == 0o644, name
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "t.txt").read_bytes() == "héllo\r\nline\n".encode()
    assert json.loads((tmp_path / "j.json").read_text()) == {"p": str(tmp_path), "t": [1, 2], "n": 0.5}
    assert (tmp_path / "j.json").read_text().endswith("}\n")
    assert (tmp_path / "c.csv").read_bytes() == b"a,b\n1,x\n2,y\n"
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "p.parquet"), frame)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), [0, 1, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "c.csv", "j.json", "p.parquet", "s.npy", "sub"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_text(target, "old\n")
    with pytest.raises(TypeError):
        write_json(target, {"x": object()})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_ingest_data_and_phantoms_run_without_torch(tmp_path):
    # Reading DICOM, building the index and the uint8 image cache and writing phantoms must work where torch
    # is not installed: the subprocess does all of it and then reports whether torch got imported.
    code = f"""
import sys
from pathlib import Path
import ichscan.dicom, ichscan.windows, ichscan.render, ichscan.metrics, ichscan.fileio
from ichscan.phantom import generate_dataset
from ichscan.data import build_cache, load_labelled
root = Path({str(tmp_path)!r})
generate_dataset(root / "ph", studies=1, seed=3, size=64, slices=(6, 6), workers=1)
data = load_labelled(root / "ph", workers=1)
report = build_cache(data.frame, root / "cache", 32, workers=1)
assert report.done == 6, report
print('torch' in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
