"""Progress bars (rich, on stderr) for long work, a null object for when they are off, and --quiet for
the libraries' own bars, logs and warnings."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Warnings these libraries raise from their own code are hidden by --quiet; tunewright's own still show.
LIBRARY_MODULES = r"(transformers|peft|accelerate|torch|huggingface_hub|safetensors|tokenizers)(\.|$)"
LIBRARY_LOGGERS = ("transformers", "peft", "accelerate", "torch", "huggingface_hub")
# Phase lines have their own logger, so the server (whose requests are not phases) can turn them off.
phase_log = logging.getLogger("tunewright.phases")


def log_phase(done: str, started: float) -> None:
    """One line when a phase of long work ends, with its time: an info log, on stderr; --quiet hides it."""
    phase_log.info("%s in %.1f s", done, time.perf_counter() - started)


def progress_console() -> Console:
    """Bars go to stderr, so stdout carries only a command's machine-readable output."""
    return Console(stderr=True)


def progress_wanted(show_progress: bool | None) -> bool:
    """None (the API default): bars when stderr is a terminal or a notebook, never into logs or pipes."""
    if show_progress is not None:
        return show_progress
    console = progress_console()
    return console.is_terminal or console.is_jupyter


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """No loading bars, info logs or warnings from transformers, peft, accelerate, torch or the Hub.

    Everything is restored on exit, so a caller's own settings (or a test's) survive.
    """
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging

    bars_were_on = transformers_logging.is_progress_bar_enabled()
    hub_bars_were_on = not hub.are_progress_bars_disabled()
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    transformers_logging.disable_progress_bar()  # also the Hub's
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=LIBRARY_MODULES)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if bars_were_on:
            transformers_logging.enable_progress_bar()  # which turns the Hub's back on as well
        if hub_bars_were_on:
            hub.enable_progress_bars()
        else:
            hub.disable_progress_bars()


class NullProgress:
    """Stands in for a progress bar on other processes, in tests and with --quiet."""

    def __enter__(self) -> NullProgress:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def update(self, record: dict[str, Any] | None = None, advance: int = 1) -> None:
        return None

    def set_total(self, total: int) -> None:
        return None


class TrainingProgress:
    """Optimizer steps with the latest loss and tokens/s."""

    def __init__(self, total_steps: int, description: str = "training"):
        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
            console=progress_console(),
        )
        self._task = self._bar.add_task(description, total=total_steps, status="")

    def __enter__(self) -> TrainingProgress:
        self._bar.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._bar.stop()

    def update(self, record: dict[str, Any] | None = None, advance: int = 1) -> None:
        status = ""
        if record:
            status = f"loss {record['loss']:.4f}  {record['tokens_per_s']:.0f} tok/s"
            if "val_loss" in record:
                status += f"  val {record['val_loss']:.4f}"
        self._bar.update(self._task, advance=advance, status=status)

    def set_total(self, total: int) -> None:
        """The run's length once known (trainer.time_budget chooses it after the first steps)."""
        self._bar.update(self._task, total=total)


class WorkProgress(TrainingProgress):
    """Items done out of a total (generation, scoring)."""

    def update(self, record: dict[str, Any] | None = None, advance: int = 1) -> None:
        self._bar.update(self._task, advance=advance)


def work_progress(total: int, description: str, enabled: bool) -> WorkProgress | NullProgress:
    return WorkProgress(total, description) if enabled and total > 0 else NullProgress()
