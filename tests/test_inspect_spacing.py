"""``ichscan inspect`` reports slice spacing and thickness as ranges, and warns where a stack is uneven."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _dicomfactory import write_ct
from ichscan.cli import main
from ichscan.geometry import spacing_summary

REALCT = Path(__file__).resolve().parents[1].parent / "shared" / "realct"


def test_spacing_summary_of_a_stack_that_changes_step():
    s = spacing_summary([0, 4, 8, 15, 22], [5.0] * 5)
    assert s["spacing"] == (4.0, 5.5, 7.0) and s["thickness"] == (5.0, 5.0)
    assert s["uneven"] and s["overlap_mm"] == 1.0 and s["gap_mm"] == 2.0
    even = spacing_summary([0, 5, 10], [5.0, 5.0, 5.0])
    assert not even["uneven"] and even["overlap_mm"] is None and even["gap_mm"] is None
    assert spacing_summary([3.0], [5.0])["spacing"] is None


def test_inspect_prints_ranges_and_warnings(tmp_path, capsys):
    for i, z in enumerate([0, 4, 8, 15, 22]):
        write_ct(tmp_path / f"s{i}.dcm", position=(-16.0, -16.0, float(z)), instance=i + 1,
                 sop_uid=f"1.2.826.0.1.3680043.8.498.77.{i}", thickness=5.0 if i < 3 else 7.0)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "spacing mm" in out and "gap mm" not in out
    assert "  4.00-7.00  " in out and "  5.00-7.00  " in out
    assert "warning: series #1: uneven slice spacing (4.00 to 7.00 mm)" in out
    assert "warning: series #1: slices overlap by up to 3.00 mm" in out
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["series"][0]
    assert info["slice_spacing_range"] == [4.0, 7.0] and info["thickness_range"] == [5.0, 7.0]
    assert info["slice_spacing"] == 5.5 and len(info["warnings"]) == 3


@pytest.mark.skipif(not (REALCT / "ge-normal").is_dir(),
                    reason=f"no real head CT at {REALCT} (../shared/realct beside the repository; not shipped with it)")
def test_inspect_of_a_real_head_with_two_slice_steps(capsys):
    assert main(["inspect", str(REALCT / "ge-normal")]) == 0
    out = capsys.readouterr().out
    assert "4.00-7.00" in out  # thickness 4 mm then 7 mm
    assert "warning: series #1: uneven slice spacing" in out


def test_inspect_flags_lossy_compression(testdata, capsys):
    assert main(["inspect", testdata("693_J2KI.dcm")]) == 0
    out = capsys.readouterr().out
    assert ("warning: series #1: lossy compression (JPEG 2000 (lossy allowed), declared lossy, 338.687:1) on 1 of 1 "
            "slices: fine detail such as a thin bleed may be lost") in out
    assert main(["inspect", testdata("693_J2KR.dcm")]) == 0  # the lossless twin: no word
    assert "lossy" not in capsys.readouterr().out
