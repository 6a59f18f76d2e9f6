"""Progress bars (rich) for long work, and a null object for when they are off."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class NullProgress:
    """Stands in for a progress bar on other processes, in tests and with --quiet."""

    def __enter__(self) -> NullProgress:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def update(self, record: dict[str, Any] | None = None, advance: int = 1) -> None:
        return None


class TrainingProgress:
    """Optimizer steps with the latest loss and tokens/s."""

    def __init__(self, total_steps: int, description: str = "training"):
        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
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


class WorkProgress(TrainingProgress):
    """Items done out of a total (generation, scoring)."""

    def update(self, record: dict[str, Any] | None = None, advance: int = 1) -> None:
        self._bar.update(self._task, advance=advance)


def work_progress(total: int, description: str, enabled: bool) -> WorkProgress | NullProgress:
    return WorkProgress(total, description) if enabled and total > 0 else NullProgress()
