"""One page comparing runs: how their configs differ, their metrics side by side, their curves overlaid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunewright.errors import DataError
from tunewright.report import (
    Markup,
    clock,
    curves_section,
    escape,
    metrics_section,
    note,
    page,
    table,
    when,
    write_html,
)
from tunewright.report_data import RunRecord, read_run

MISSING = "(not set)"


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"trainer.learning_rate": 0.001, ...}: one entry per leaf (a list of sections by position)."""
    if isinstance(config, dict):
        items = [(f"{prefix}{key}", value) for key, value in config.items()]
    elif isinstance(config, list) and any(isinstance(value, dict | list) for value in config):
        items = [(f"{prefix}{position}", value) for position, value in enumerate(config)]
    else:
        return {prefix.rstrip("."): config}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{key}.") if isinstance(value, dict | list) and value else {key: value})
    return flat


def config_differences(runs: Sequence[RunRecord]) -> tuple[list[str], list[dict[str, Any]]]:
    """The keys whose values are not the same in every run, and each run's flattened config."""
    flats = [flatten(run.config) for run in runs]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    differing = [key for key in keys if len({repr(flat.get(key, MISSING)) for flat in flats}) > 1]
    return differing, flats


def config_section(runs: Sequence[RunRecord]) -> str:
    differing, flats = config_differences(runs)
    if not differing:
        return note("The configs are identical.")
    rows = [[Markup(f"<code>{escape(key)}</code>"), *(flat.get(key, MISSING) for flat in flats)] for key in differing]
    same = len(set().union(*flats)) - len(differing)
    return (f"<p>{len(differing)} settings differ; the other {same} are the same in every run.</p>"
            + table(["setting", *(run.name for run in runs)], rows))


def runs_section(runs: Sequence[RunRecord]) -> str:
    rows = []
    for run in runs:
        training = run.metrics.get("training") or {}
        rows.append([run.name, str(run.folder), run.config.get("base_model", "?"), training.get("steps", 0),
                     clock(training.get("seconds")), when(run.status.get("finished"))])
    return table(["run", "folder", "base model", "steps", "training time", "finished"], rows, numeric=(3,))


def label_runs(runs: Sequence[RunRecord]) -> None:
    """Runs are named by their folder; folders with the same name are told apart by their whole path."""
    names = [run.folder.resolve().name for run in runs]
    for run, name in zip(runs, names, strict=True):
        run.label = name if names.count(name) == 1 else str(run.folder)


def render_comparison(runs: Sequence[RunRecord]) -> str:
    label_runs(runs)
    sections = [("runs", "Runs", runs_section(runs)), ("config", "Config differences", config_section(runs)),
                ("metrics", "Metrics", metrics_section(runs)), ("curves", "Training curves", curves_section(runs))]
    return page(f"tunewright: {len(runs)} runs compared", " · ".join(run.name for run in runs), sections)


def compare_runs(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """Write one HTML page comparing complete runs; returns its path.

    Raises:
        RunFolderError: a folder that is not a complete run (named).
        DataError: the page cannot be written there.
    """
    runs = [read_run(run_dir) for run_dir in run_dirs]
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_html(output, render_comparison(runs))
    except OSError as error:
        raise DataError(f"{output}: cannot write here ({error.strerror or error}); choose another path") from None
    return output
