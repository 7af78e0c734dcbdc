"""Report: Table 1 (Markdown, CSV, JSON), Figure 1 (ROC curves, PNG and SVG) and a one-file HTML report.

Everything is drawn from an ``ichscan.metrics.Evaluation``; nothing here computes a metric of its own
except the ROC curve points the figure plots. matplotlib is imported inside the plotting functions and
used through ``Figure`` objects (Agg canvas), never pyplot, so no global backend state is touched.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from ichscan.fileio import atomic_path, write_text
from ichscan.metrics import METRICS, Estimate, Evaluation

log = logging.getLogger(__name__)

COLUMNS: dict[str, str] = {"acc": "ACC", "prec": "PREC", "rec": "REC", "auc": "AUC", "log_loss": "LOG_LOSS"}
DISCLAIMER = "Research software, not a medical device: not for diagnosis or triage of patients."

ImageSource = Union[bytes, str, os.PathLike]

# --------------------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------------------


def format_number(value: float | None, digits: int = 3) -> str:
    """A number to `digits` decimals, "NA" for None or NaN: how every table ichscan writes shows a number."""
    return "NA" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_estimate(est: Estimate, digits: int = 3, *, interval: str = "") -> str:
    """``0.912 (0.871-0.944)``, ``interval`` before the bounds (``0.912 (95% CI 0.871-0.944)``); ``NA`` when
    undefined; the point alone when there is no CI."""
    if est.value is None:
        return "NA"
    if est.low is None or est.high is None:
        return format_number(est.value, digits)
    value, low, high = (format_number(v, digits) for v in (est.value, est.low, est.high))
    return f"{value} ({interval}{low}\u2013{high})"


def _notes(ev: Evaluation) -> list[tuple[str, str]]:
    """(cell, reason) for every NA value or missing CI, in table order."""
    out = []
    for row in ev.per_label:
        for name in METRICS:
            est = getattr(row, name)
            if est.reason:
                out.append((f"{row.label} {COLUMNS[name]}", est.reason))
    if ev.weighted_log_loss.reason:
        out.append(("weighted log loss", ev.weighted_log_loss.reason))
    return out


def table1_frame(ev: Evaluation, digits: int = 3) -> pd.DataFrame:
    """Table 1 as display strings, one row per label in ``ev.labels`` order."""
    rows = []
    for row in ev.per_label:
        cells = {"Label": row.label,
                 "POS n (%)": f"{row.pos} ({row.pos_pct:.1f}%)",
                 "NEG n (%)": f"{row.neg} ({row.neg_pct:.1f}%)"}
        for name, header in COLUMNS.items():
            cells[header] = format_estimate(getattr(row, name), digits)
        rows.append(cells)
    return pd.DataFrame(rows)


def _unit_words(ev: Evaluation) -> tuple[str, str]:
    rows = {"series": "series", "slice": "images"}.get(ev.level, "cases")
    units = {"patient": "patients", "row": rows}[ev.resampling_unit]
    return rows, units


def threshold_text(t: float, digits: int = 3) -> str:
    """A threshold in ``digits`` significant digits, or as many more as it takes not to read as 0 or 1 when it
    is neither (a noisy-OR threshold of 0.99990 is not "1": every series would be called negative at 1)."""
    for d in range(digits, 17):
        text = f"{t:.{d}g}"
        if (float(text) < 1) == (t < 1) and (float(text) > 0) == (t > 0):
            return text
    return repr(t)


def table1_caption(ev: Evaluation) -> str:
    """One paragraph saying what the numbers are: level, counts, thresholds, CI method."""
    rows, units = _unit_words(ev)
    thresholds = set(ev.thresholds.values())
    if len(thresholds) == 1:
        at = f"threshold {threshold_text(thresholds.pop(), 6)} for every label"
    else:
        at = "per-label thresholds " + ", ".join(f"{k} {threshold_text(v)}" for k, v in ev.thresholds.items())
    text = (f"Table 1. {ev.level.capitalize()}-level results on {ev.n} {rows}"
            + (f" from {ev.n_units} patients" if ev.resampling_unit == "patient" else "")
            + f"; a finding is called when its probability is at or above the {at}"
            + (", a subtype only where any is called too." if ev.calls == "hierarchical" else "."))
    if ev.n_bootstrap:
        text += (f" Brackets: {ev.ci:.0%} percentile bootstrap CI, {ev.n_bootstrap} resamples of {units}"
                 f" (seed {ev.seed}).")
        if ev.resampling_unit == "row":
            text += f" No patient IDs were given, so {rows} were resampled as if independent."
    return text


def _weighted_line(ev: Evaluation, digits: int) -> str:
    return ("Weighted log loss (RSNA 2019; `any` weighted 2, each subtype 1, probabilities clipped at 1e-15): "
            f"{format_estimate(ev.weighted_log_loss, digits)}")


def given_any_line(ev: Evaluation, digits: int = 3) -> str | None:
    """One line of each subtype's AUC among the rows with a bleed (``LabelMetrics.auc_given_any``): whether
    the model tells which bleed it is, which Table 1's AUC, mostly bleed against no bleed, does not say.
    None where no label has it (no ``any`` among the labels)."""
    rows = [r for r in ev.per_label if r.auc_given_any is not None]
    if not rows:
        return None
    n_bleed = int(ev.y_true[:, ev.labels.index("any")].sum())
    unit, _ = _unit_words(ev)
    cells = [f"{r.label} " + (format_estimate(r.auc_given_any, digits) if not r.auc_given_any.na
                              else f"NA ({r.auc_given_any.reason})") for r in rows]
    return (f"Which bleed it is: each subtype's AUC among the {n_bleed} {unit} with any bleed (0.5: it cannot "
            f"tell that subtype from the other bleeds): " + "; ".join(cells))


def table1_markdown(ev: Evaluation, digits: int = 3) -> str:
    """Table 1 in Markdown with its caption, the weighted log loss and a note for every NA."""
    frame = table1_frame(ev, digits)
    notes = _notes(ev)
    marks = {cell: i + 1 for i, (cell, _) in enumerate(notes)}
    lines = [table1_caption(ev), "", "| " + " | ".join(frame.columns) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(frame.columns) - 1)) + "|"]
    for _, cells in frame.iterrows():
        out = []
        for header, text in cells.items():
            mark = marks.get(f"{cells['Label']} {header}")
            out.append(f"{text} [{mark}]" if mark else str(text))
        lines.append("| " + " | ".join(out) + " |")
    lines += ["", _weighted_line(ev, digits)]
    given = given_any_line(ev, digits)
    if given:
        lines += ["", given]
    if notes:
        lines += [""] + [f"[{i + 1}] {cell}: {reason}" for i, (cell, reason) in enumerate(notes)]
    return "\n".join(lines) + "\n"


def table1_records(ev: Evaluation) -> list[dict[str, Any]]:
    """Table 1 as numbers, one dict per label, then one row ``weighted_log_loss`` (CSV layout)."""
    records = []
    for row in ev.per_label:
        rec: dict[str, Any] = {"label": row.label, "threshold": row.threshold, "n": row.n,
                               "pos": row.pos, "pos_pct": row.pos_pct, "neg": row.neg, "neg_pct": row.neg_pct,
                               "tp": row.tp, "fp": row.fp, "fn": row.fn, "tn": row.tn}
        for name in METRICS:
            est = getattr(row, name)
            rec.update({name: est.value, f"{name}_low": est.low, f"{name}_high": est.high,
                        f"{name}_note": est.reason})
        g = row.auc_given_any or Estimate(None)  # ``any`` itself has none
        rec.update({"auc_given_any": g.value, "auc_given_any_low": g.low, "auc_given_any_high": g.high,
                    "auc_given_any_note": g.reason})
        records.append(rec)
    w = ev.weighted_log_loss
    records.append({"label": "weighted_log_loss", "n": ev.n, "log_loss": w.value, "log_loss_low": w.low,
                    "log_loss_high": w.high, "log_loss_note": w.reason})
    return records


def write_table1(ev: Evaluation, out_dir: str | os.PathLike, *, stem: str = "table1",
                 digits: int = 3) -> dict[str, Path]:
    """``<stem>.md``, ``<stem>.csv`` and ``<stem>.json`` (the full ``Evaluation.to_dict``) in ``out_dir``."""
    out = Path(out_dir)
    frame = pd.DataFrame(table1_records(ev))
    return {
        "md": write_text(out / f"{stem}.md", table1_markdown(ev, digits)),
        "csv": write_text(out / f"{stem}.csv", frame.to_csv(index=False, float_format="%.6g")),
        "json": write_text(out / f"{stem}.json", json.dumps(_jsonable(ev.to_dict()), indent=2) + "\n"),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    return obj


# --------------------------------------------------------------------------------------------------
# Figure 1
# --------------------------------------------------------------------------------------------------


def roc_figure(ev: Evaluation, *, digits: int = 3, ncols: int = 3):
    """Figure 1: one ROC panel per label (``any`` first), AUC and CI in each legend, operating point marked.

    Returns a ``matplotlib.figure.Figure`` (Agg canvas); a label without both classes gets a panel that
    says why there is no curve.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    nrows = math.ceil(len(ev.labels) / ncols)
    fig = Figure(figsize=(4.0 * ncols, 4.0 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    rows_word, _ = _unit_words(ev)
    for ax, row, j in zip(axes, ev.per_label, range(len(ev.labels))):
        ax.plot([0, 1], [0, 1], ls=":", lw=1, color="0.6")
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal",
               xlabel="1 \u2212 specificity (FPR)", ylabel="sensitivity (TPR)")
        ax.set_title(f"{row.label} (POS {row.pos} of {row.n})", fontsize=11)
        ax.grid(alpha=0.3)
        if row.auc.na:
            ax.text(0.5, 0.5, f"no ROC curve:\n{row.auc.reason}", ha="center", va="center", fontsize=9,
                    wrap=True, transform=ax.transAxes)
            continue
        fpr, tpr, _ = roc_curve(ev.y_true[:, j], ev.y_prob[:, j])
        legend = format_estimate(row.auc, digits, interval=f"{ev.ci:.0%} CI ")
        ax.plot(fpr, tpr, lw=2, color="C0", label=f"AUC {legend}")
        spec = row.tn / row.neg
        ax.plot([1 - spec], [row.tp / row.pos], "o", color="C3", ms=6,
                label=f"threshold {row.threshold:.3g}: sens {row.tp / row.pos:.2f}, spec {spec:.2f}")
        ax.legend(loc="lower right", fontsize=8.5, frameon=True)
    for ax in axes[len(ev.labels):]:
        ax.set_axis_off()
    fig.suptitle(f"Figure 1. ROC curves, {ev.level}-level, {ev.n} {rows_word}", fontsize=12)
    return fig


def write_roc(ev: Evaluation, out_dir: str | os.PathLike, *, stem: str = "roc",
              formats: Sequence[str] = ("png", "svg"), dpi: int = 150) -> dict[str, Path]:
    """Figure 1 as ``<stem>.png`` and ``<stem>.svg`` (or the ``formats`` asked for) in ``out_dir``."""
    import matplotlib

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    # Fixed hash salt, no date and a fresh figure per format (constrained layout depends on the
    # renderer that drew it last): the same evaluation gives byte-identical SVGs.
    with matplotlib.rc_context({"svg.hashsalt": "ichscan", "svg.fonttype": "path"}):
        for fmt in formats:
            fig = roc_figure(ev)
            path = out / f"{stem}.{fmt}"
            meta = {"Date": None} if fmt in ("svg", "pdf") else {"Software": "ichscan"}
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta)
            paths[fmt] = path
    return paths


def _figure_png(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# HTML report
# --------------------------------------------------------------------------------------------------


@dataclass
class SeriesEntry:
    """One series in the HTML report, as the predict side or the demo describes it.

    ``probs`` maps label to probability. ``findings`` lists what to show as found; None derives it from
    the evaluation's thresholds. ``key_slice`` is a PNG/JPEG (bytes or a path) or a mapping caption ->
    image (e.g. the key slice in three windows). ``truth`` optionally maps label to 0/1.
    """

    series_uid: str
    probs: Mapping[str, float]
    patient_id: str | None = None
    study_uid: str | None = None
    findings: Sequence[str] | None = None
    key_slice: ImageSource | Mapping[str, ImageSource] | None = None
    truth: Mapping[str, int] | None = None
    note: str | None = None


def series_entries(
    ev: Evaluation,
    key_slices: Mapping[str, ImageSource | Mapping[str, ImageSource]] | None = None,
    *,
    details: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[SeriesEntry]:
    """One ``SeriesEntry`` per evaluated row (series), with its probabilities, truth and patient.

    ``key_slices`` maps a series UID (``ev.ids``) to its image(s); ``details`` maps a series UID to extra
    ``SeriesEntry`` fields (``study_uid``, ``note``, ``findings``). Findings follow ``ev.thresholds``.
    """
    out = []
    for i, uid in enumerate(ev.ids):
        uid = str(uid)
        extra = dict((details or {}).get(uid, {}))
        patient = str(ev.groups[i]) if ev.resampling_unit == "patient" else None
        out.append(SeriesEntry(
            series_uid=uid, probs=dict(zip(ev.labels, map(float, ev.y_prob[i]))),
            truth=dict(zip(ev.labels, map(int, ev.y_true[i]))), patient_id=extra.pop("patient_id", patient),
            key_slice=(key_slices or {}).get(uid), **extra,
        ))
    return out


def splice_markdown(path: str | os.PathLike, name: str, block: str) -> Path:
    """Replace the text between ``<!-- ichscan:NAME -->`` and ``<!-- /ichscan:NAME -->`` in ``path``.

    For documents that show generated results (the README's Table 1): the numbers are pasted by code,
    never typed. Raises ValueError when the markers are missing.
    """
    path = Path(path)
    text = path.read_text()
    start, end = f"<!-- ichscan:{name} -->", f"<!-- /ichscan:{name} -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"{path}: no {start} ... {end} markers to replace")
    return write_text(path, text[: i + len(start)] + "\n" + block.strip("\n") + "\n" + text[j:])


def key_slice_pngs(hu: np.ndarray, windows=None, *, size: int | None = 256,
                   caption: str = "") -> dict[str, bytes]:
    """A key slice (HU, H x W) as one grayscale PNG per window, keyed ``"<caption> <window> L/W"``.

    The default windows are the paper's three (brain, blood, soft tissue); pass the result as
    ``SeriesEntry.key_slice``.
    """
    from PIL import Image

    from ichscan.windows import PAPER_WINDOWS, get_windows, window_image

    ws = get_windows(PAPER_WINDOWS if windows is None else windows)
    channels = window_image(hu, ws, size=size, dtype=np.uint8)
    out = {}
    for w, channel in zip(ws, channels):
        buf = io.BytesIO()
        Image.fromarray(channel, mode="L").save(buf, format="PNG", optimize=True)
        name = f"{caption} {w.name.replace('_', ' ')} {w.level:g}/{w.width:g}".strip()
        out[name] = buf.getvalue()
    return out


def _data_uri(image: ImageSource) -> tuple[str | None, str | None]:
    """(data URI, problem): images are inlined so the report is one file."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        try:
            data = Path(image).read_bytes()
        except OSError as err:
            return None, f"image not readable: {image} ({err.strerror or err})"
    if data.startswith(b"\x89PNG"):
        mime = "image/png"
    elif data.startswith(b"\xff\xd8"):
        mime = "image/jpeg"
    elif data.lstrip().startswith(b"<svg") or data.lstrip().startswith(b"<?xml"):
        mime = "image/svg+xml"
    else:
        return None, "not a PNG, JPEG or SVG image"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", None


def _img(image: ImageSource, caption: str, css: str = "") -> str:
    uri, problem = _data_uri(image)
    esc = html.escape
    if uri is None:
        log.warning("HTML report: %s", problem)
        return f'<figure class="missing"><figcaption>{esc(caption)}: {esc(problem)}</figcaption></figure>'
    return (f'<figure><img src="{uri}" alt="{esc(caption)}" {css}>'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _table1_html(ev: Evaluation, digits: int) -> str:
    frame = table1_frame(ev, digits)
    notes = _notes(ev)
    marks = {cell: i + 1 for i, (cell, _) in enumerate(notes)}
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    body = []
    for _, cells in frame.iterrows():
        tds = []
        for header, text in cells.items():
            mark = marks.get(f"{cells['Label']} {header}")
            sup = f"<sup>{mark}</sup>" if mark else ""
            cls = ' class="na"' if text == "NA" else ""
            tds.append(f"<td{cls}>{esc(str(text))}{sup}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    foot = "".join(f"<li value=\"{i + 1}\">{esc(cell)}: {esc(reason)}</li>" for i, (cell, reason) in enumerate(notes))
    return (f"<table class=\"t1\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            + (f"<ol class=\"notes\">{foot}</ol>" if foot else ""))


def _coerce_entry(entry: SeriesEntry | Mapping[str, Any]) -> SeriesEntry:
    if isinstance(entry, SeriesEntry):
        return entry
    known = SeriesEntry.__dataclass_fields__
    return SeriesEntry(**{k: v for k, v in entry.items() if k in known})


def _series_html(entry: SeriesEntry, ev: Evaluation) -> str:
    esc = html.escape
    findings = entry.findings
    if findings is None:
        findings = [name for name in ev.labels
                    if name in entry.probs and entry.probs[name] >= ev.thresholds.get(name, 0.5)]
    shown = [f for f in findings if f != "any"] or (["any"] if "any" in findings else [])
    verdict = ", ".join(shown) if shown else "no hemorrhage called"
    rows = []
    for name in ev.labels:
        if name not in entry.probs:
            continue
        p = float(entry.probs[name])
        called = name in findings
        truth = "" if entry.truth is None or name not in entry.truth else ("yes" if entry.truth[name] else "no")
        rows.append(f"<tr class=\"{'pos' if called else ''}\"><td>{esc(name)}</td><td>{p:.3f}</td>"
                    f"<td><span class=\"bar\" style=\"width:{100 * p:.0f}px\"></span></td>"
                    f"<td>{'called' if called else ''}</td>"
                    + (f"<td>{truth}</td>" if entry.truth is not None else "") + "</tr>")
    truth_head = "<th>truth</th>" if entry.truth is not None else ""
    images = entry.key_slice
    if images is None:
        figures = ""
    elif isinstance(images, Mapping):
        figures = "".join(_img(img, str(caption), 'class="slice"') for caption, img in images.items())
    else:
        figures = _img(images, "key slice", 'class="slice"')
    ids = " &middot; ".join(esc(f"{k} {v}") for k, v in (("patient", entry.patient_id),
                                                         ("study", entry.study_uid)) if v)
    note = f"<p class=\"note\">{esc(entry.note)}</p>" if entry.note else ""
    return (f"<section class=\"series\"><h3>Series {esc(entry.series_uid)}</h3>"
            f"<p class=\"ids\">{ids}</p><p class=\"verdict\">Findings: <b>{esc(verdict)}</b></p>{note}"
            f"<div class=\"row\"><table class=\"probs\"><thead><tr><th>label</th><th>probability</th><th></th>"
            f"<th>call</th>{truth_head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"<div class=\"images\">{figures}</div></div></section>")


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} .disclaimer{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em 1em}
table{border-collapse:collapse;margin:.5em 0} th,td{padding:.25em .6em;border-bottom:1px solid #ddd}
.t1 td{text-align:right;font-variant-numeric:tabular-nums} .t1 td:first-child{text-align:left}
td.na{color:#a33} .notes{font-size:12px;color:#555} .caption{color:#444}
img.roc{max-width:100%} .series{border-top:2px solid #ccc;margin-top:1.5em}
.series .row{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}
.images{display:flex;gap:.5em;flex-wrap:wrap} img.slice{width:256px;image-rendering:pixelated;background:#000}
figure{margin:0} figcaption{font-size:12px;color:#555;text-align:center} figure.missing{color:#a33}
.bar{display:inline-block;height:10px;background:#4a7fb5} tr.pos td{font-weight:600} .ids{color:#666;margin:0}
"""


def html_report(
    ev: Evaluation,
    series: Iterable[SeriesEntry | Mapping[str, Any]] | None = None,
    *,
    title: str = "ichscan evaluation",
    roc_png: ImageSource | None = None,
    extra: Mapping[str, str] | None = None,
    digits: int = 3,
) -> str:
    """A self-contained HTML page: Table 1, the weighted log loss, Figure 1 and one section per series.

    Images (Figure 1 and every key slice) are embedded as base64, so the page is a single file.
    ``roc_png`` reuses an already written Figure 1; otherwise it is drawn here. ``extra`` adds
    "name: text" lines to the summary (e.g. the model and data the demo used).
    """
    esc = html.escape
    if roc_png is None:
        import matplotlib

        with matplotlib.rc_context({"svg.hashsalt": "ichscan"}):
            roc_png = _figure_png(roc_figure(ev))
    rows_word, _ = _unit_words(ev)
    summary = {"level": ev.level, rows_word: str(ev.n),
               "patients": str(ev.n_units) if ev.resampling_unit == "patient" else "unknown",
               "thresholds": ", ".join(f"{k} {v:.3g}" for k, v in ev.thresholds.items())}
    for key in ("pred", "labels"):
        if key in ev.source:
            summary[f"{key} file"] = str(ev.source[key])
    summary.update(extra or {})
    dl = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary.items())
    entries = [_coerce_entry(e) for e in (series or [])]
    sections = "".join(_series_html(e, ev) for e in entries)
    figure = _img(roc_png, "ROC curves per label", 'class="roc"')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class=\"disclaimer\">{esc(DISCLAIMER)}</p>"
        f"<table class=\"summary\">{dl}</table>"
        f"<h2>Table 1</h2><p class=\"caption\">{esc(table1_caption(ev))}</p>{_table1_html(ev, digits)}"
        f"<p>{esc(_weighted_line(ev, digits).replace('`', ''))}</p>"
        + (f"<p>{esc(given)}</p>" if (given := given_any_line(ev, digits)) else "")
        + f"<h2>Figure 1</h2>{figure}"
        + (f"<h2>Series ({len(entries)})</h2>{sections}" if entries else "")
        + "</body></html>\n"
    )


def write_html_report(ev: Evaluation, path: str | os.PathLike,
                      series: Iterable[SeriesEntry | Mapping[str, Any]] | None = None, **kwargs) -> Path:
    """Write ``html_report(ev, series, **kwargs)`` to ``path`` (one file, images inlined)."""
    return write_text(path, html_report(ev, series, **kwargs))


def write_report(
    ev: Evaluation,
    out_dir: str | os.PathLike,
    series: Iterable[SeriesEntry | Mapping[str, Any]] | None = None,
    *,
    html_name: str | None = "report.html",
    **html_kwargs,
) -> dict[str, Path]:
    """Everything at once: table1.md/.csv/.json, roc.png/.svg and (unless ``html_name`` is None) the HTML."""
    paths = {f"table1_{k}": v for k, v in write_table1(ev, out_dir).items()}
    paths.update({f"roc_{k}": v for k, v in write_roc(ev, out_dir).items()})
    if html_name:
        html_kwargs.setdefault("roc_png", paths["roc_png"])
        paths["html"] = write_html_report(ev, Path(out_dir) / html_name, series, **html_kwargs)
    return paths


# --------------------------------------------------------------------------------------------------
# Predictions report (``ichscan predict --html``): per-series key slices on a user's own studies
# --------------------------------------------------------------------------------------------------

_PRED_CSS = """
.pbar{position:relative;display:inline-block;width:120px;height:10px;background:#eee;vertical-align:middle}
.pbar .fill{position:absolute;left:0;top:0;bottom:0;background:#4a7fb5}
.pbar .tick{position:absolute;top:-3px;bottom:-3px;width:2px;background:#c33}
.pbar .zone{position:absolute;top:-3px;bottom:-3px;background:rgba(230,150,0,.35)}
.borderline{color:#b36b00;font-weight:bold}
td.FP,td.FN{background:#fde2e2;color:#a11;font-weight:700} td.TP{color:#176c2e} td.TN{color:#666}
img.keyslice{height:160px;image-rendering:pixelated;background:#000} img.strip{width:360px}
img.calib{max-width:100%} .sorter button{margin-right:.5em} .capped{color:#a33}
.conf td{text-align:right;font-variant-numeric:tabular-nums} .conf td:first-child{text-align:left}
"""

_SORT_JS = """
function ichscanSort(key){var c=document.getElementById('series');
var s=Array.prototype.slice.call(c.children);
s.sort(function(a,b){if(key==='any'){return parseFloat(b.dataset.any)-parseFloat(a.dataset.any);}
return a.dataset.uid<b.dataset.uid?-1:(a.dataset.uid>b.dataset.uid?1:0);});
s.forEach(function(e){c.appendChild(e);});}
"""


def _called(pred, thresholds: Mapping[str, float]) -> list[str]:
    """Labels at or above their threshold; ``any`` alone when nothing is called (its key slice is still shown)."""
    decisions = pred.decisions(dict(thresholds))
    return [name for name in pred.labels if decisions[name]] or ["any"]


def _outcome(truth: int, called: bool) -> str:
    return ("TP" if called else "FN") if truth else ("FP" if called else "TN")


def _strip_png(pred, thresholds: Mapping[str, float]) -> bytes:
    """Slice probability against z (slice number where z is unknown), one strip per label, threshold dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = pred.n_slices
    zs = [v for v in pred.z if v is not None]
    if len(zs) == n and n:
        x, xlabel = np.asarray(zs, dtype=float), "z (mm)"
    else:
        x, xlabel = np.arange(1, n + 1), "slice"
    fig = Figure(figsize=(4.5, 0.55 * len(pred.labels) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(pred.labels), 1, sharex=True, squeeze=False).ravel()
    called = pred.decisions(dict(thresholds))
    for j, (ax, name) in enumerate(zip(axes, pred.labels)):
        t = float(thresholds.get(name, 0.5))
        probs = pred.slice_probs[:, j]
        ax.plot(x, probs, "-o", ms=2, lw=1, color="C3" if called[name] else "C0")
        ax.axhline(t, ls="--", lw=0.8, color="0.4")
        ax.set_ylim(-0.05, 1.05)
        ax.set_yticks([0, 1])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel(xlabel, fontsize=7)
    return _figure_png(fig, dpi=80)


def _calibration_png(y_true: np.ndarray, y_prob: np.ndarray, labels: Sequence[str], bins: int = 10) -> bytes:
    """Reliability diagrams, 10 equal-width bins: ``any``, and the subtypes pooled; bin counts annotated."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, squeeze=False).ravel()
    labels = list(labels)
    ia = labels.index("any") if "any" in labels else 0
    rest = [j for j in range(len(labels)) if j != ia]
    panels = [("any", y_true[:, ia], y_prob[:, ia]),
              ("subtypes pooled", y_true[:, rest].ravel(), y_prob[:, rest].ravel())]
    edges = np.linspace(0.0, 1.0, bins + 1)
    for ax, (name, y, p) in zip(axes, panels):
        which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
        mean_p, freq, count = [], [], []
        for b in range(bins):
            sel = which == b
            if sel.any():
                mean_p.append(float(p[sel].mean()))
                freq.append(float(y[sel].mean()))
                count.append(int(sel.sum()))
        ax.plot([0, 1], [0, 1], ls=":", lw=1, color="0.6")
        ax.plot(mean_p, freq, "-o", color="C0")
        for mp, fq, c in zip(mean_p, freq, count):
            ax.annotate(str(c), (mp, fq), textcoords="offset points", xytext=(4, 4), fontsize=7, color="0.3")
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal", xlabel="mean predicted probability",
               ylabel="observed frequency")
        ax.set_title(f"{name} ({len(y)} predictions)", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Calibration: reliability diagram, {bins} bins (numbers: predictions per bin)", fontsize=11)
    return _figure_png(fig)


def _key_slice_image(hu: np.ndarray, windows, size: int, heat: np.ndarray | None = None) -> bytes:
    """The key slice in each of the model's windows, side by side in one PNG (``key_slice_pngs`` per window);
    with ``heat`` (the slice's Grad-CAM map, ``ichscan.heatmap``) a last panel in colour: the blood window with
    the map blended on, as the DICOM key images show it."""
    from PIL import Image

    parts = [np.asarray(Image.open(io.BytesIO(png))) for png in key_slice_pngs(hu, windows, size=size).values()]
    if heat is not None:
        from ichscan.heatmap import overlay
        from ichscan.windows import resize_keep_aspect, window_image

        grey = window_image(hu, "blood", size=size, dtype=np.uint8)[0]
        parts.append(overlay(grey, resize_keep_aspect(np.asarray(heat, dtype=np.float32), size, 0.0)))
        parts = [p if p.ndim == 3 else np.repeat(p[..., None], 3, axis=-1) for p in parts]
    gap = np.full((parts[0].shape[0], 2, *parts[0].shape[2:]), 255, dtype=np.uint8)
    row = [parts[0]]
    for part in parts[1:]:
        row += [gap, part]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(row, axis=1), mode="RGB" if row[0].ndim == 3 else "L").save(
        buf, format="PNG", optimize=True)
    return buf.getvalue()


def _confusion_rows(truth: Mapping[str, Mapping[str, int]], predictions, thresholds: Mapping[str, float],
                    labels: Sequence[str]) -> list[dict[str, Any]]:
    from ichscan.metrics import confusion_counts

    labelled = [p for p in predictions if p.series_uid in truth]
    calls = [p.decisions(dict(thresholds)) for p in labelled]  # each series' calls, once
    rows = []
    for name in labels:
        t = float(thresholds.get(name, 0.5))
        y = np.array([int(truth[p.series_uid][name]) for p in labelled], dtype=float)
        called = np.array([c[name] for c in calls], dtype=float)
        c = confusion_counts(y, called)
        npv = c.tn / (c.tn + c.fn) if c.tn + c.fn else math.nan
        rows.append({"label": name, "threshold": t, "n": len(labelled), "tp": int(c.tp), "fp": int(c.fp),
                     "fn": int(c.fn), "tn": int(c.tn), "sensitivity": c.recall, "specificity": c.specificity,
                     "ppv": c.precision, "npv": npv})
    return rows


def predictions_report(
    predictions: Sequence[Any],
    thresholds: Mapping[str, float],
    *,
    windows,
    folder: str | os.PathLike | None,
    labels: Mapping[str, Mapping[str, int]] | None = None,
    trained_on: str | None = None,
    title: str = "ichscan predictions",
    max_series: int = 200,
    image_size: int = 160,
    digits: int = 3,
    predictor: Any | None = None,
    intervals: Any | None = None,
) -> str:
    """A self-contained HTML page of ``ichscan predict`` results: one section per series.

    Each section shows the called findings (``any`` when none) with their key slice in ``windows``,
    slice probability against z per label with the thresholds, and a bar per label. ``folder`` is where
    the DICOM files are (the predict input; key slices are found by SOP Instance UID, as the demo does).
    ``labels`` maps series UID to {label: 0/1}: each call is then marked TP/FP/FN/TN, and a summary
    (confusion counts, sensitivity, specificity, PPV, NPV) and a reliability diagram are added. More
    than ``max_series`` series: the highest-``any`` ones are shown, and the page says so. Slices are
    counted from 1. Patient IDs are shown as the predictions hold them (pseudonyms unless kept). With
    ``predictor`` (the ``ichscan.predict.Predictor`` that made the predictions) each key slice gets one more
    panel: the finding's Grad-CAM heat map on the blood window (``ichscan.heatmap``), as in the DICOM key images.
    With ``intervals`` (``ichscan.thresholds.ThresholdIntervals``) each bar shades its threshold's interval and
    a borderline call, made or not, says "borderline".
    """
    from ichscan.dicom import find_series, read_slice, read_slices
    from ichscan.errors import IchscanError
    from ichscan.predict.predictor import slab_mean

    esc = html.escape
    preds = list(predictions)
    label_names = tuple(preds[0].labels) if preds else tuple(thresholds)
    shown = preds
    capped = len(preds) > max_series
    if capped:
        shown = sorted(preds, key=lambda p: -p.prob("any"))[:max_series]

    # by image id, which names a frame of a multi-frame object or NIfTI volume too (their frames share a SOP UID)
    where: dict[str, tuple[str, int | None]] = {}
    if folder is not None and shown:
        try:
            where = {s.image_id: (s.path, s.frame) for series in find_series(folder, pixels=False).series
                     for s in series.slices}
        except (IchscanError, OSError, ValueError) as err:  # probabilities still shown; images say why not
            log.warning("HTML report: cannot scan %s for key slices: %s", folder, err)
    image_cache: dict[tuple[str, str | None], Any] = {}
    last_image: dict[str, tuple[Any, Any]] = {}  # one key image's (HU, spacing): a series' findings often share it
    last_frames: dict[str, dict[int | None, Any]] = {}  # one multi-frame file or volume, decoded once

    def read_key_slice(path: str, frame: int | None) -> Any:
        if frame is None:
            return read_slice(path)
        if path not in last_frames:
            last_frames.clear()
            last_frames[path] = {f.frame: f for f in read_slices(path)}
        return last_frames[path][frame]

    def key_image(image_id: str, caption: str, label: str, slab: Sequence[str] = ()) -> str:
        """``slab``: the other slices the model read with this one, averaged in HU (``ichscan predict --slab``)."""
        missing = [i for i in (image_id, *slab) if i not in where]
        if missing:
            return (f'<figure class="missing"><figcaption>{esc(caption)}: slice {esc(missing[0])} not found under '
                    f"the input</figcaption></figure>")
        path, frame = where[image_id]
        key = (image_id, label if predictor is not None else None)
        if key not in image_cache:
            try:
                if image_id not in last_image:  # the key slice, or the slab the model read: its slices' mean
                    last_image.clear()
                    key_slice = read_key_slice(path, frame)
                    last_image[image_id] = (slab_mean([key_slice.hu] + [read_key_slice(*where[i]).hu for i in slab]),
                                            key_slice.spacing)
                hu, spacing = last_image[image_id]
                heat = None
                if predictor is not None:
                    from ichscan.heatmap import grad_cam

                    try:
                        heat = grad_cam(predictor, hu, label, spacing=spacing)
                    except IchscanError as err:  # a backbone without a spatial map: the slice without heat
                        log.warning("HTML report: no heat map for %s: %s", path, err)
                image_cache[key] = _key_slice_image(hu, windows, image_size, heat)
            except (IchscanError, OSError, ValueError) as err:  # one bad file costs its image only
                image_cache[key] = f"{path}: {err}"
        image = image_cache[key]
        if isinstance(image, str):
            return f'<figure class="missing"><figcaption>{esc(caption)}: {esc(image)}</figcaption></figure>'
        return _img(image, caption, 'class="keyslice"')

    from ichscan.windows import get_windows

    window_names = ", ".join(f"{w.name.replace('_', ' ')} {w.level:g}/{w.width:g}" for w in get_windows(windows))
    sections = []
    for p in shown:
        truth = (labels or {}).get(p.series_uid)
        called = _called(p, thresholds)
        decisions = p.decisions(dict(thresholds))
        borderline = p.borderline(dict(thresholds), intervals)
        withheld = p.withheld(dict(thresholds))
        rows = []
        for j, name in enumerate(p.labels):
            prob, t = float(p.probs[j]), float(thresholds.get(name, 0.5))
            key = p.key_slice(name)
            outcome = _outcome(int(truth[name]), decisions[name]) if truth is not None else ""
            zone = intervals.zone(name, t) if intervals is not None else None
            shade = (f"<span class=\"zone\" style=\"left:{100 * zone[0]:.1f}%;width:{100 * (zone[1] - zone[0]):.1f}%\">"
                     "</span>" if zone is not None else "")
            bar_title = f"threshold {t:.3g}" + (f", {intervals.describe(name, t)}" if zone is not None else "")
            call = "called" if decisions[name] else ("above its threshold; not called, any is not"
                                                     if name in withheld else "")
            if borderline[name]:
                call = f"<span class=\"borderline\">{call + ', ' if call else ''}borderline</span>"
            rows.append(
                f"<tr class=\"{'pos' if decisions[name] else ''}\"><td>{esc(name)}</td><td>{prob:.{digits}f}</td>"
                f"<td><span class=\"pbar\" title=\"{esc(bar_title)}\">{shade}<span class=\"fill\" "
                f"style=\"width:{100 * min(max(prob, 0.0), 1.0):.1f}%\"></span><span class=\"tick\" "
                f"style=\"left:{100 * min(max(t, 0.0), 1.0):.1f}%\"></span></span></td><td>{t:.3g}</td>"
                f"<td>{call}</td><td>{key.index + 1} of {p.n_slices}</td>"
                + (f"<td>{'yes' if truth[name] else 'no'}</td><td class=\"{outcome}\">{outcome}</td>"
                   if truth is not None else "") + "</tr>")
        truth_head = "<th>truth</th><th>call vs truth</th>" if truth is not None else ""
        figures = []
        for name in called:
            key = p.key_slice(name)
            z = f", z {key.z:.1f} mm" if key.z is not None else ""
            caption = (f"{name} {p.prob(name):.{digits}f}: key {p.slab_text(key.index)}{z}"
                       f" ({'slab' if len(p.slab_members(key.index)) > 1 else 'slice'} probability "
                       f"{key.prob:.{digits}f})")
            if predictor is not None:
                caption += "; heat map (Grad-CAM) on the blood window"
            slab = [p.image_ids[i] for i in p.slab_members(key.index) if i != key.index]
            figures.append(key_image(key.image_id, caption, name, slab))
        strip = _img(_strip_png(p, thresholds), "slice probability per label (dashed: threshold)", 'class="strip"')
        verdict = ", ".join(n + (" (borderline)" if borderline[n] else "") for n in called if decisions[n]) \
            or "no hemorrhage called" + (" (borderline)" if borderline.get("any") else "")
        ids = " &middot; ".join(esc(f"{k} {v}") for k, v in (("patient", p.patient_id), ("study", p.study_uid)) if v)
        note = ""
        if p.skipped:
            note = f"<p class=\"note\">{len(p.skipped)} slice(s) left out: unreadable</p>"
        if labels is not None and truth is None:
            note += "<p class=\"note\">no labels for this series</p>"
        sections.append(
            f"<section class=\"series\" data-uid=\"{esc(p.series_uid)}\" data-any=\"{p.prob('any'):.6f}\">"
            f"<h3>Series {esc(p.series_uid)}</h3><p class=\"ids\">{ids}"
            f"{' &middot; ' if ids else ''}{p.n_slices} slices</p>"
            f"<p class=\"verdict\">Findings: <b>{esc(verdict)}</b></p>{note}"
            f"<div class=\"row\"><table class=\"probs\"><thead><tr><th>label</th><th>probability</th><th></th>"
            f"<th>threshold</th><th>call</th><th>key slice</th>{truth_head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{strip}</div>"
            f"<div class=\"images\">{''.join(figures)}</div></section>")

    summary = {
        "series predicted": str(len(preds)),
        "model trained on": trained_on or "not named by the model's manifest",
        "thresholds": ", ".join(f"{k} {float(v):.3g}" for k, v in thresholds.items()),
        "borderline calls": (f"the probability lies inside its threshold's {intervals.level:.0%} interval (shaded on "
                             "each bar; the thresholds chosen on resampled validation cases), so an operating point "
                             "chosen on other cases could call it the other way; "
                             + ", ".join(f"{k} {z[0]:.3g}-{z[1]:.3g}" for k, v in thresholds.items()
                                         if (z := intervals.zone(k, float(v))) is not None)
                             if intervals is not None else "not marked: the thresholds carry no interval"),
        "key slice windows": window_names + ("; last panel: the finding's Grad-CAM heat map (ichscan.heatmap) on "
                                             "the blood window 80/200" if predictor is not None else ""),
        "labels": (f"{sum(p.series_uid in labels for p in preds)} of {len(preds)} series labelled"
                   if labels is not None else "none given"),
    }
    dl = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary.items())
    evaluation = ""
    if labels is not None:
        conf = _confusion_rows(labels, preds, thresholds, label_names)
        head = "".join(f"<th>{h}</th>" for h in ("label", "threshold", "n", "TP", "FP", "FN", "TN", "sensitivity",
                                                 "specificity", "PPV", "NPV"))
        body = "".join(
            f"<tr data-label=\"{esc(r['label'])}\"><td>{esc(r['label'])}</td><td>{r['threshold']:.3g}</td>"
            f"<td>{r['n']}</td><td class=\"tp\">{r['tp']}</td><td class=\"fp\">{r['fp']}</td>"
            f"<td class=\"fn\">{r['fn']}</td><td class=\"tn\">{r['tn']}</td>"
            + "".join(f"<td class=\"{k}\">{format_number(r[k], digits)}</td>"
                      for k in ("sensitivity", "specificity", "ppv", "npv")) + "</tr>"
            for r in conf)
        labelled = [p for p in preds if p.series_uid in labels]
        calib = ""
        if labelled:
            y_true = np.array([[int(labels[p.series_uid][n]) for n in label_names] for p in labelled], dtype=float)
            y_prob = np.array([[p.prob(n) for n in label_names] for p in labelled], dtype=float)
            calib = _img(_calibration_png(y_true, y_prob, label_names), "calibration (reliability diagram)",
                         'class="calib"')
        evaluation = (
            f"<h2>Against the labels</h2><p class=\"caption\">Series-level, {len(labelled)} labelled series; a "
            "finding is called when its probability is at or above its threshold, a subtype only where "
            "<code>any</code> is called. NA: no series to divide by. "
            "Small sets give unstable numbers; <code>ichscan evaluate</code> adds confidence intervals.</p>"
            f"<table class=\"conf\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{calib}")
    cap_note = (f"<p class=\"capped\">Showing the {len(shown)} series with the highest <code>any</code> "
                f"probability of {len(preds)}; every series is in series.csv.</p>" if capped else "")
    sorter = ("<p class=\"sorter\">Sort series: <button type=\"button\" onclick=\"ichscanSort('any')\">by any "
              "probability</button><button type=\"button\" onclick=\"ichscanSort('uid')\">by series UID</button></p>")
    trained = esc(trained_on) if trained_on else "data the model's manifest does not name"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{_CSS}{_PRED_CSS}</style><script>{_SORT_JS}</script></head><body>"
        f"<h1>{esc(title)}</h1><p class=\"disclaimer\">{esc(DISCLAIMER)} The model was trained on {trained}.</p>"
        f"<table class=\"summary\">{dl}</table>{evaluation}"
        f"<h2>Series ({len(shown)})</h2>{cap_note}{sorter}<div id=\"series\">{''.join(sections)}</div>"
        "</body></html>\n"
    )


def write_predictions_report(path: str | os.PathLike, predictions: Sequence[Any], thresholds: Mapping[str, float],
                             **kwargs) -> Path:
    """Write ``predictions_report(predictions, thresholds, **kwargs)`` to ``path`` (one file, images inlined)."""
    return write_text(path, predictions_report(predictions, thresholds, **kwargs))
