"""ichscan.report: Table 1 in Markdown/CSV/JSON, Figure 1, the one-file HTML report."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest

from ichscan import metrics as m
from ichscan import report as r
from ichscan.labels import LABELS


@pytest.fixture(scope="module")
def ev():
    rng = np.random.default_rng(0)
    n = 120
    y = (rng.random((n, 6)) < 0.3).astype(int)
    y[:, 1] = 0  # epidural absent: NA cells with reasons
    p = np.clip(0.35 * y + 0.65 * rng.random((n, 6)), 0, 1)
    return m.evaluate(y, p, groups=np.arange(n) // 2, n_bootstrap=100, level="series",
                      thresholds=dict(zip(LABELS, (0.5, 0.5, 0.4, 0.5, 0.5, 0.6))))


def test_markdown_table(ev):
    md = r.table1_markdown(ev)
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| Label"))
    assert header == "| Label | POS n (%) | NEG n (%) | ACC | PREC | REC | AUC | LOG_LOSS |"
    body = [line.split(" | ")[0].strip("| ") for line in lines if line.startswith("| ") and line is not header]
    assert body == list(LABELS)
    any_row = next(line for line in lines if line.startswith("| any |"))
    auc = ev["any"].auc
    assert f"{auc.value:.3f} ({auc.low:.3f}\u2013{auc.high:.3f})" in any_row
    assert f"{ev['any'].pos} ({ev['any'].pos_pct:.1f}%)" in any_row
    epi = next(line for line in lines if line.startswith("| epidural |"))
    assert "NA [" in epi
    assert re.search(r"^\[\d\] epidural AUC: no positive cases of epidural: AUC undefined$", md, re.M)
    assert "Weighted log loss" in md and f"{ev.weighted_log_loss.value:.3f}" in md
    assert "120 series from 60 patients" in md and "per-label thresholds" in md
    # which bleed it is, below the table: each subtype's AUC among the series with any bleed
    given = next(line for line in lines if line.startswith("Which bleed it is"))
    n_bleed = int(ev.y_true[:, 0].sum())
    assert f"among the {n_bleed} series with any bleed" in given
    iph = ev["intraparenchymal"].auc_given_any
    assert f"intraparenchymal {iph.value:.3f} ({iph.low:.3f}–{iph.high:.3f})" in given
    assert "epidural NA (no positive cases of epidural: AUC among bleeds undefined)" in given
    assert [cell.split(" ")[0] for cell in given.split("other bleeds): ", 1)[1].split("; ")] == list(LABELS[1:])


def test_a_threshold_near_1_or_0_is_not_printed_as_1_or_0():
    # noisy-OR series probabilities sit near 1, and so do thresholds chosen on them (0.9999 on ctich-dev)
    assert [r.threshold_text(t) for t in (0.5, 0.4622, 0.99990, 0.9999999, 1.0, 0.0, 2e-7)] == [
        "0.5", "0.462", "0.9999", "0.9999999", "1", "0", "2e-07"]


def test_csv_and_json_carry_numbers_and_cis(ev, tmp_path):
    paths = r.write_table1(ev, tmp_path)
    assert {p.name for p in paths.values()} == {"table1.md", "table1.csv", "table1.json"}
    table = pd.read_csv(paths["csv"]).set_index("label")
    assert list(table.index) == [*LABELS, "weighted_log_loss"]
    for name in LABELS:
        row = ev[name]
        assert table.loc[name, "pos"] == row.pos and table.loc[name, "tp"] == row.tp
        assert table.loc[name, "threshold"] == row.threshold
        if not row.auc.na:
            assert table.loc[name, "auc"] == pytest.approx(row.auc.value, rel=1e-5)
            assert table.loc[name, "auc_low"] == pytest.approx(row.auc.low, rel=1e-5)
    assert np.isnan(table.loc["epidural", "auc"]) and "AUC undefined" in table.loc["epidural", "auc_note"]
    given = ev["subdural"].auc_given_any
    assert table.loc["subdural", "auc_given_any"] == pytest.approx(given.value, rel=1e-5)
    assert table.loc["subdural", "auc_given_any_high"] == pytest.approx(given.high, rel=1e-5)
    assert np.isnan(table.loc["any", "auc_given_any"]) and np.isnan(table.loc["weighted_log_loss", "auc_given_any"])
    assert table.loc["weighted_log_loss", "log_loss"] == pytest.approx(ev.weighted_log_loss.value, rel=1e-5)
    doc = json.loads(paths["json"].read_text())
    assert doc["weighted_log_loss"]["value"] == pytest.approx(ev.weighted_log_loss.value)
    assert doc["weighted_log_loss"]["low"] <= doc["weighted_log_loss"]["value"] <= doc["weighted_log_loss"]["high"]
    assert doc["bootstrap"] == {"n": 100, "ci": 0.95, "seed": 0, "method": "percentile"}
    assert doc["resampling_unit"] == "patient" and doc["loss_weights"]["any"] == 2.0
    epi = next(x for x in doc["per_label"] if x["label"] == "epidural")
    assert epi["auc"]["value"] is None and "AUC undefined" in epi["auc"]["reason"]


def test_roc_figure_panels_and_files(ev, tmp_path):
    fig = r.roc_figure(ev)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split(" (")[0] for ax in panels] == list(LABELS)
    legend = [t.get_text() for t in panels[0].get_legend().get_texts()]
    auc = ev["any"].auc
    assert legend[0] == f"AUC {auc.value:.3f} (95% CI {auc.low:.3f}\u2013{auc.high:.3f})"
    assert panels[1].get_legend() is None  # epidural: no curve, a note instead
    assert any("AUC undefined" in t.get_text() for t in panels[1].texts)
    paths = r.write_roc(ev, tmp_path)
    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    svg = paths["svg"].read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    again = r.write_roc(ev, tmp_path / "again", formats=("svg",))
    assert again["svg"].read_bytes() == paths["svg"].read_bytes()  # reproducible


def test_html_report_is_one_file(ev, tmp_path):
    png = (tmp_path / "k.png")
    png.write_bytes(r._figure_png(r.roc_figure(ev), dpi=20))
    entries = [
        r.SeriesEntry(series_uid="1.2.3", probs=dict(zip(LABELS, ev.y_prob[0])), patient_id="P001",
                      key_slice={"brain": png, "blood": png.read_bytes(), "soft tissue": png},
                      truth=dict(zip(LABELS, ev.y_true[0]))),
        {"series_uid": "<script>alert(1)</script>", "probs": {"any": 0.9, "subdural": 0.8},
         "findings": ["any", "subdural"], "key_slice": tmp_path / "missing.png"},
    ]
    path = r.write_html_report(ev, tmp_path / "report.html", entries, title="demo")
    text = path.read_text()
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    base64.b64decode(srcs[0].split(",", 1)[1], validate=True)
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "image not readable" in text  # a missing image is reported in place, not fatal
    assert "Findings: <b>subdural</b>" in text
    assert "Table 1" in text and "not a medical device" in text
    sdh = ev["subdural"].auc_given_any
    assert "<p>Which bleed it is:" in text and f"subdural {sdh.value:.3f} ({sdh.low:.3f}" in text
    assert "href=" not in text  # nothing linked from outside


def test_key_slice_pngs_three_windows():
    hu = np.full((64, 48), -1000.0, dtype=np.float32)
    hu[10:50, 8:40] = 40.0  # brain
    hu[20:30, 15:25] = 70.0  # blood
    pngs = r.key_slice_pngs(hu, size=32, caption="key")
    assert list(pngs) == ["key brain 40/80", "key blood 80/200", "key soft tissue 40/380"]
    from PIL import Image
    import io

    img = Image.open(io.BytesIO(pngs["key brain 40/80"]))
    assert img.size == (32, 32) and img.mode == "L"
    entry = r.SeriesEntry("1.2", {"any": 0.7}, key_slice=pngs)
    assert r._series_html(entry, _ev_stub()).count("data:image/png;base64,") == 3


def _ev_stub():
    y = np.array([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]] * 3)
    return m.evaluate(y, np.clip(y * 0.8 + 0.1, 0, 1), n_bootstrap=0)


def test_write_report_writes_everything(ev, tmp_path):
    paths = r.write_report(ev, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"table1.md", "table1.csv", "table1.json", "roc.png",
                                                "roc.svg", "report.html"}


def test_series_entries_from_evaluation(ev):
    uid = ev.ids[3]
    entries = r.series_entries(ev, {uid: b"\x89PNG..."}, details={uid: {"study_uid": "9.9", "note": "n"}})
    assert len(entries) == ev.n and entries[3].key_slice == b"\x89PNG..." and entries[3].study_uid == "9.9"
    assert entries[0].probs["any"] == pytest.approx(ev.y_prob[0, 0]) and entries[0].truth["any"] == ev.y_true[0, 0]
    assert entries[0].patient_id == ev.groups[0] and entries[0].key_slice is None


def test_splice_markdown(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text("# x\n<!-- ichscan:table1 -->\nold\n<!-- /ichscan:table1 -->\nrest\n")
    r.splice_markdown(doc, "table1", "| a |\n")
    assert doc.read_text() == "# x\n<!-- ichscan:table1 -->\n| a |\n<!-- /ichscan:table1 -->\nrest\n"
    with pytest.raises(ValueError, match="markers"):
        r.splice_markdown(doc, "figure1", "x")
