"""report.html: one self-contained page per run folder (curves, metrics, predictions, config, machine).

The page works offline: plots are inline SVG (report_plots.py), the style sheet is inline, and the
page loads nothing (no script, font, image or CDN). Everything that comes from the run's data is
HTML-escaped. A run that cannot get its report still completes (`write_report_quietly`).
"""

from __future__ import annotations

import difflib
import html
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunewright.errors import RunFolderError
from tunewright.report_data import (
    PREDICTION,
    REPORT_FILE,
    RunRecord,
    read_run,
    reliability_bins,
    scalar_metrics,
)
from tunewright.report_plots import confusion_svg, plots_available, reliability_svg, training_curves

log = logging.getLogger(__name__)

# The page may load nothing: no script, font or remote image (matplotlib's rasters are inline data: URLs).
POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
SAMPLE_ROWS = 20  # text outputs: predictions shown beside their targets
CELL_CHARS = 400  # longer inputs, targets and predictions are cut (the predictions file has them whole)
STYLE = """
:root { --ink: #111827; --muted: #6b7280; --line: #e5e7eb; --soft: #f9fafb; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; background: #f3f4f6; color: var(--ink); line-height: 1.5;
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 32px 64px; }
header h1 { font-size: 26px; margin: 0 0 4px; }
header p { margin: 0; color: var(--muted); }
nav { margin: 16px 0 8px; display: flex; flex-wrap: wrap; gap: 8px; }
nav a { color: var(--accent); text-decoration: none; padding: 3px 10px; border: 1px solid var(--line);
  border-radius: 999px; background: white; font-size: 13px; }
section { background: white; border: 1px solid var(--line); border-radius: 10px; padding: 18px 24px 22px;
  margin: 18px 0; }
h2 { font-size: 19px; margin: 0 0 12px; }
h3 { font-size: 15px; margin: 18px 0 8px; color: #374151; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; background: var(--soft); }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 18px; font-weight: 600; overflow-wrap: anywhere; }
.plots { margin-top: 14px; display: grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); gap: 16px; }
figure { margin: 0; min-width: 0; }  /* lets a grid cell shrink a plot below its drawn size */
figure svg { max-width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.number, th.number { text-align: right; font-variant-numeric: tabular-nums; }
td.text { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px;
  white-space: pre-wrap; overflow-wrap: anywhere; max-width: 360px; }
ins { background: #dcfce7; color: #14532d; text-decoration: none; border-radius: 3px; }
del { background: #fee2e2; color: #7f1d1d; border-radius: 3px; }
.ok { color: #15803d; font-weight: 600; } .bad { color: #b91c1c; font-weight: 600; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px;
  font-size: 13px; overflow-x: auto; max-height: 520px; }
.note { color: var(--muted); font-style: italic; }
.columns { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 8px 32px; }
table.pairs th { background: none; color: var(--muted); font-weight: 500; width: 45%; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 24px; }
"""


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped unless they are already HTML (wrapped in `Markup`)."""
    def cell(tag: str, value: Any, column: int) -> str:
        kind = ' class="number"' if column in numeric else ""
        body = value.html if isinstance(value, Markup) else escape(format_value(value))
        css = f' class="{value.css}"' if isinstance(value, Markup) and value.css else kind
        return f"<{tag}{css}>{body}</{tag}>"

    head = "".join(cell("th", name, column) for column, name in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", value, column) for column, value in enumerate(row)) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Markup:
    """A table cell that is HTML already (built from escaped parts), with an optional CSS class."""

    def __init__(self, html_text: str, css: str = ""):
        self.html, self.css = html_text, css


def pairs(rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column table of names and values (no header row)."""
    body = "".join(f"<tr><th>{escape(name)}</th><td>{escape(format_value(value))}</td></tr>" for name, value in rows)
    return f'<table class="pairs"><tbody>{body}</tbody></table>'


def section(anchor: str, title: str, content: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{content}</section>'


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def figures(plots: Sequence[tuple[str, str]]) -> str:
    """Plots in a grid, each with its caption (the SVG comes from matplotlib, never from the data)."""
    items = "".join(f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>" for caption, svg in plots)
    return f'<div class="plots">{items}</div>'


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document: header, a link per section, the sections, and the inline style sheet."""
    links = "".join(f'<a href="#{anchor}">{escape(name)}</a>' for anchor, name, _ in sections)
    body = "".join(section(anchor, name, content) for anchor, name, content in sections)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body><main>"
        f"<header><h1>{escape(title)}</h1><p>{escape(subtitle)}</p></header><nav>{links}</nav>{body}"
        f"<footer>Written by tunewright on {stamp}.</footer></main></body></html>"
    )


def cards(items: Sequence[tuple[str, Any]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="label">{escape(label)}</div><div class="value">'
        f"{escape(format_value(value))}</div></div>" for label, value in items) + "</div>"


def clock(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "unknown"
    minutes, rest = divmod(float(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {rest:.0f} s" if minutes else f"{rest:.1f} s"


def when(timestamp: Any) -> str:
    if not isinstance(timestamp, int | float):
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def overview(run: RunRecord) -> str:
    training = run.metrics.get("training") or {}
    adapter = run.config.get("adapter")
    kind = adapter.get("type", "?") if isinstance(adapter, dict) else "full fine-tune"
    items: list[tuple[str, Any]] = [
        ("base model", run.config.get("base_model", "unknown")),
        ("training", "none (zero-shot)" if training.get("type") == "none" else kind),
        ("output", f"{run.output.get('name', '?')} ({run.output.get('type', 'text')})"),
        ("steps", training.get("steps", 0)),
        ("training time", clock(training.get("seconds"))),
    ]
    if isinstance(training.get("best_val_loss"), int | float):
        items.append(("best validation loss", training["best_val_loss"]))
    # The kept weights: chosen by trainer.eval_metric at this step.
    if training.get("eval_metric") not in (None, "loss") and isinstance(training.get("best_eval_metric"), int | float):
        items.append((f"kept: best {training['eval_metric']}", training["best_eval_metric"]))
        items.append(("kept step", training.get("best_step")))
    for split, values in scalar_metrics(run.metrics).items():
        for name in ("accuracy", "macro_f1", "exact_match", "rouge_l"):
            if name in values:
                items.append((f"{split} {name}", values[name]))
    return cards(items)


def metrics_section(runs: Sequence[RunRecord]) -> str:
    """One row per metric, one column per (run, split): side by side when comparing."""
    columns = [(run, split, values) for run in runs for split, values in scalar_metrics(run.metrics).items()]
    if not columns:
        return note("No validation or test split was evaluated.")
    names = list(dict.fromkeys(name for _, _, values in columns for name in values))
    several = len(runs) > 1
    headers = ["metric", *[f"{run.name} · {split}" if several else split for run, split, _ in columns]]
    rows = [[name, *[values.get(name, "") for _, _, values in columns]] for name in names]
    return table(headers, rows, numeric=range(1, len(headers)))


def curves_section(runs: Sequence[RunRecord]) -> str:
    logs = [(run.name, run.log) for run in runs if run.log]
    if not logs:
        return note("No training log: nothing was trained (trainer.type none), so there are no curves.")
    if not plots_available():
        return note("Plots need matplotlib: pip install 'tunewright[plot]', then run `tunewright report`.")
    plots = training_curves(logs)
    return figures(plots) if plots else note("The training log holds no values to plot.")


def category_section(run: RunRecord) -> str:
    """Per split: per-class scores, the confusion matrix and the reliability diagram."""
    parts = []
    target = str(run.output.get("name"))
    for split in ("validation", "test"):
        metrics = run.metrics.get(split)
        if not isinstance(metrics, dict):
            continue
        parts.append(f"<h3>{escape(split.capitalize())}</h3>")
        per_class = metrics.get("per_class") or {}
        if isinstance(per_class, dict) and per_class:
            rows = [[label, *(scores.get(key, "") for key in ("precision", "recall", "f1", "support"))]
                    for label, scores in per_class.items() if isinstance(scores, dict)]
            parts.append(table(["label", "precision", "recall", "F1", "support"], rows, numeric=(1, 2, 3, 4)))
        if not plots_available():
            parts.append(note("Plots need matplotlib: pip install 'tunewright[plot]'."))
            continue
        plots = []
        matrix = metrics.get("confusion_matrix")
        if isinstance(matrix, dict) and matrix.get("labels"):
            plots.append(("Rows: the true label; columns: the predicted one.",
                          confusion_svg(matrix["labels"], matrix["matrix"], f"Confusion matrix ({split})")))
        bins = reliability_bins(run.predictions.get(split, []), target)
        if bins:
            ece = metrics.get("expected_calibration_error")
            caption = "Bars on the diagonal mean the probabilities can be taken at their word"
            caption += f" (expected calibration error {ece:.4f})." if isinstance(ece, float) else "."
            plots.append((caption, reliability_svg(bins, f"Reliability ({split})")))
        parts.append(figures(plots))
    return "".join(parts) or note("No validation or test split was evaluated.")


def word_pieces(text: str) -> list[str]:
    """Words, runs of spaces and single symbols: differences are marked per word, not per character."""
    return re.findall(r"\w+|\s+|[^\w\s]", text)


def marked_difference(target: str, prediction: str) -> tuple[str, str]:
    """(target, prediction) as escaped HTML: what the prediction lacks is <del>, what it adds is <ins>."""
    old, new = word_pieces(target), word_pieces(prediction)
    target_html, prediction_html = [], []
    for op, a1, a2, b1, b2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        removed, added = escape("".join(old[a1:a2])), escape("".join(new[b1:b2]))
        if op == "equal":
            target_html.append(removed)
            prediction_html.append(added)
            continue
        if removed:
            target_html.append(f"<del>{removed}</del>")
        if added:
            prediction_html.append(f"<ins>{added}</ins>")
    return "".join(target_html), "".join(prediction_html)


def cut(text: str) -> str:
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS] + " …"


def samples_section(run: RunRecord) -> str:
    """Text outputs: predictions beside targets, the rows that differ first."""
    target = str(run.output.get("name"))
    split = next((name for name in ("validation", "test") if name in run.predictions), None)
    if split is None:
        return note("No predictions were saved for this run (it has no validation or test split).")
    rows = [row for row in run.predictions[split] if target in row and PREDICTION in row]
    wrong = [row for row in rows if str(row[PREDICTION]) != str(row[target])]
    shown = (wrong + [row for row in rows if str(row[PREDICTION]) == str(row[target])])[:SAMPLE_ROWS]
    body = []
    for row in shown:
        inputs = "\n".join(f"{column}: {row.get(column, '')}" for column in run.input_columns)
        gold, predicted = marked_difference(cut(str(row[target])), cut(str(row[PREDICTION])))
        same = str(row[PREDICTION]) == str(row[target])
        body.append([Markup(escape(cut(inputs)), "text"), Markup(gold, "text"), Markup(predicted, "text"),
                     Markup("✓" if same else "✗", "ok" if same else "bad")])
    intro = (f"<p>{len(wrong)} of {len(rows)} {escape(split)} predictions differ from their target. "
             f"{len(shown)} are shown, those that differ first; <del>struck</del> words are missing from the "
             "prediction and <ins>highlighted</ins> ones are extra.</p>")
    return intro + table(["input", "target", "prediction", "match"], body)


def config_section(run: RunRecord) -> str:
    return f"<pre>{escape(run.config_text)}</pre>"


def machine_section(run: RunRecord) -> str:
    status, training = run.status, run.metrics.get("training") or {}
    started, finished = status.get("started"), status.get("finished")
    wall = finished - started if isinstance(started, int | float) and isinstance(finished, int | float) else None
    last_speed = next((r["tokens_per_s"] for r in reversed(run.log) if isinstance(r.get("tokens_per_s"), float)),
                      None)
    timings: list[tuple[str, Any]] = [
        ("started", when(started)), ("finished", when(finished)), ("wall time", clock(wall)),
        ("training", clock(training.get("seconds"))), ("optimizer steps", training.get("steps", 0))]
    if last_speed is not None:
        timings.append(("tokens/s (whole run)", f"{last_speed:,.0f}"))
    if status.get("resumed_from_step"):
        timings.append(("resumed from step", status["resumed_from_step"]))
    if training.get("stopped_early"):
        timings.append(("stopped early", "yes"))
    hardware = status.get("hardware")
    machine = [(key.replace("_", " "), value) for key, value in hardware.items()] if isinstance(hardware, dict) \
        else [("hardware", "not recorded by the tunewright that wrote this run")]
    machine += [("host", status.get("host", "unknown")), ("tunewright", status.get("tunewright_version", "?"))]
    return (f'<div class="columns"><div><h3>Timings</h3>{pairs(timings)}</div>'
            f"<div><h3>Machine</h3>{pairs(machine)}</div></div>")


def render_report(run: RunRecord) -> str:
    """The run's report page as one HTML string."""
    sections = [("overview", "Overview", overview(run)), ("curves", "Training curves", curves_section([run])),
                ("metrics", "Metrics", metrics_section([run]))]
    if run.is_category:
        sections.append(("classes", "Classes and calibration", category_section(run)))
    else:
        sections.append(("predictions", "Predictions", samples_section(run)))
    sections += [("config", "Config", config_section(run)), ("machine", "Timings and hardware", machine_section(run))]
    subtitle = f"{run.folder.resolve()} · finished {when(run.status.get('finished'))}"
    return page(f"tunewright run: {run.name}", subtitle, sections)


def write_html(path: Path, text: str) -> None:
    """Through a temporary file and a rename: a browser never opens half a page."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.chmod(temporary, 0o644)  # mkstemp's file is private; a report is for reading
    os.replace(temporary, path)


def write_report(run_dir: str | Path) -> Path:
    """Write (or rewrite) `report.html` in a complete run folder; returns its path.

    Raises:
        RunFolderError: not a complete run folder.
    """
    run = read_run(run_dir)
    path = run.folder / REPORT_FILE
    try:
        write_html(path, render_report(run))
    except OSError as error:
        raise RunFolderError(f"{path}: cannot write the report ({error.strerror or error}); make the run folder "
                             "writable") from None
    return path


def write_report_quietly(run_dir: Path) -> None:
    """At the end of a run: a report that cannot be written is one warning, never a failed run."""
    try:
        write_report(run_dir)
    except Exception as error:  # noqa: BLE001  # whatever broke, the trained run stays complete and usable
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.warning("%s: report.html not written (%s); run `tunewright report %s` to retry", run_dir, reason,
                    run_dir)
