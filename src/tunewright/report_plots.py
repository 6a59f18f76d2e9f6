"""The report's plots, drawn by matplotlib (the `plot` extra) as inline SVG: no file and no network.

Figures are built with `matplotlib.figure.Figure` (never pyplot), and styles are set in an
`rc_context`, so drawing a report changes no process-wide matplotlib state.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tunewright.report_data import ReliabilityBin, series

COLORS = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")
STYLE: dict[str, Any] = {
    "svg.fonttype": "none",  # text stays text: smaller files, and the page's font draws it
    "font.family": "sans-serif",
    "font.size": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e7eb",
    "axes.edgecolor": "#9ca3af",
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "legend.frameon": False,
}


@dataclass
class Line:
    label: str
    steps: list[float]
    values: list[float]
    color: str
    dashed: bool = False
    markers: bool = False


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def _figure(width: float = 6.4, height: float = 3.4) -> Iterator[Any]:
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        yield Figure(figsize=(width, height), layout="constrained")


def svg_text(figure: Any) -> str:
    """The figure as an `<svg>` element to inline in HTML (the XML prolog and doctype dropped)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def curve_svg(title: str, ylabel: str, lines: Sequence[Line], log_scale: bool = False) -> str | None:
    """Values over optimizer steps, one line each; None when no line has a point."""
    drawn = [line for line in lines if line.steps]
    if not drawn:
        return None
    from matplotlib.ticker import MaxNLocator
    with _figure() as figure:
        axes = figure.add_subplot()
        for line in drawn:
            axes.plot(line.steps, line.values, label=line.label, color=line.color, linewidth=1.6,
                      linestyle="--" if line.dashed else "-", marker="o" if line.markers else None, markersize=4)
        axes.set_title(title, loc="left")
        axes.set_xlabel("optimizer step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(ylabel)
        if log_scale and all(value > 0 for line in drawn for value in line.values):
            axes.set_yscale("log")
        if len(drawn) > 1:
            axes.legend(fontsize=9)
        return svg_text(figure)


def training_curves(runs: Sequence[tuple[str, list[dict[str, Any]]]]) -> list[tuple[str, str]]:
    """(caption, svg) of the loss, learning-rate and tokens/s curves, each run in its own colour."""
    several = len(runs) > 1
    loss_lines, rate_lines, speed_lines = [], [], []
    for index, (name, log) in enumerate(runs):
        color = COLORS[index % len(COLORS)]
        prefix = f"{name}: " if several else ""
        loss_lines.append(Line(f"{prefix}training loss", *series(log, "loss"), color=color))
        loss_lines.append(Line(f"{prefix}validation loss", *series(log, "val_loss"),
                               color=color if several else COLORS[1], dashed=True, markers=True))
        rate_lines.append(Line(name, *series(log, "learning_rate"), color=color))
        speed_lines.append(Line(name, *series(log, "tokens_per_s"), color=color))
    plots = [
        ("Training loss per optimizer step, and validation loss at each evaluation.",
         curve_svg("Loss", "loss", loss_lines)),
        ("Learning rate after each optimizer step (the schedule).", curve_svg("Learning rate", "rate", rate_lines)),
        ("Training throughput: tokens processed per second since the start.",
         curve_svg("Tokens per second", "tokens/s", speed_lines)),
    ]
    return [(caption, svg) for caption, svg in plots if svg is not None]


def confusion_svg(labels: Sequence[str], matrix: Sequence[Sequence[int]], title: str) -> str:
    """Counts of [true][predicted] labels, each cell written in; the diagonal is what was right."""
    size = min(9.0, max(3.6, 0.55 * len(labels) + 2.2))
    with _figure(size, size * 0.9) as figure:
        axes = figure.add_subplot()
        axes.grid(False)
        axes.imshow(matrix, cmap="Blues")
        ticks = range(len(labels))
        axes.set_xticks(ticks, [str(label) for label in labels], rotation=45 if len(labels) > 4 else 0,
                        ha="right" if len(labels) > 4 else "center")
        axes.set_yticks(ticks, [str(label) for label in labels])
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        axes.set_title(title, loc="left")
        peak = max((max(row) for row in matrix if row), default=0)
        for row, counts in enumerate(matrix):
            for column, count in enumerate(counts):
                axes.text(column, row, str(count), ha="center", va="center", fontsize=9,
                          color="white" if count > peak / 2 else "#111827")
        return svg_text(figure)


def reliability_svg(bins: Sequence[ReliabilityBin], title: str) -> str:
    """Accuracy against confidence per probability bin, beside the diagonal of perfect calibration."""
    with _figure(4.6, 4.0) as figure:
        axes = figure.add_subplot()
        axes.plot([0, 1], [0, 1], linestyle=":", color="#6b7280", label="perfectly calibrated")
        axes.bar([b.low for b in bins], [b.accuracy for b in bins], width=[b.high - b.low for b in bins],
                 align="edge", color=COLORS[0], alpha=0.75, edgecolor="white", label="accuracy in bin")
        axes.plot([b.confidence for b in bins], [b.accuracy for b in bins], "o", color=COLORS[1], markersize=4,
                  label="mean confidence")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel("predicted probability")
        axes.set_ylabel("share correct")
        axes.set_title(title, loc="left")
        axes.legend(fontsize=8, loc="upper left")
        return svg_text(figure)
