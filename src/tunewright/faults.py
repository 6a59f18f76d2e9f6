"""Faults during training: SIGTERM / Ctrl-C, non-finite losses and gradients, out of memory.

Each is turned into a clean outcome: a checkpoint and TrainingInterrupted, a skipped step or a
TrainingError naming the step, or a retry with smaller micro-batches (see train.window_with_retry).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from tunewright.checkpoint import TrainerState
from tunewright.config import TrainerConfig
from tunewright.errors import TrainingError, TrainingInterrupted

log = logging.getLogger(__name__)


class StopNow(Exception):
    """Raised between micro-batches once a stop was requested (one process only)."""


class StopRequest:
    """SIGTERM and Ctrl-C during training ask for a stop instead of killing the process.

    The loop notices after the current micro-batch, drops the unfinished optimizer step, saves a
    checkpoint of the last finished one and raises TrainingInterrupted. A second Ctrl-C stops at
    once. Python lets only the main thread install handlers; elsewhere signals keep their default.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signal_number in (signal.SIGTERM, signal.SIGINT):
                self._previous[signal_number] = signal.signal(signal_number, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)

    def _handle(self, signal_number: int, _frame: object) -> None:
        if self.signal_number is not None and signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = signal_number
        log.warning(
            "%s received: saving a checkpoint after this micro-batch, then stopping (Ctrl-C again: "
            "stop at once)",
            signal.Signals(signal_number).name,
        )

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop; every process must agree, or DDP would hang."""
        if accelerator.num_processes > 1:
            flags = accelerator.gather(torch.tensor([self.signal_number or 0], device=accelerator.device))
            self.signal_number = self.signal_number or int(flags.max().item()) or None
        return self.signal_number is not None


def interruption(stop: StopRequest, step: int, checkpoint: Path | None) -> TrainingInterrupted:
    signal_number = stop.signal_number or signal.SIGINT
    saved = f"checkpoint saved in {checkpoint}" if checkpoint else "no checkpoint (checkpointing is off)"
    return TrainingInterrupted(
        f"training interrupted by {signal.Signals(signal_number).name} after optimizer step {step}; {saved}; "
        "continue it with `tunewright train ... --resume`",
        signal_number,
    )


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def gradients_finite(parameters: Sequence[nn.Parameter]) -> bool:
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(grad).all() for grad in grads]).all())


def step_is_finite(step_loss: float, parameters: Sequence[nn.Parameter], accelerator: Accelerator) -> bool:
    finite = math.isfinite(step_loss) and gradients_finite(parameters)
    if accelerator.num_processes > 1:  # all processes must take the same decision
        flags = accelerator.gather(torch.tensor([float(finite)], device=accelerator.device))
        finite = bool(flags.min().item() > 0)
    return finite


def skip_nonfinite_step(
    state: TrainerState,
    step: int,
    epoch: int,
    step_loss: float,
    cfg: TrainerConfig,
    last_checkpoint: Path | None,
) -> None:
    """A NaN/inf loss or gradient: record a skipped step (skip_batch), or stop with a clear error.

    Either way the weights are never updated from a non-finite gradient, so every checkpoint is finite.
    """
    what = f"the loss is {step_loss}" if not math.isfinite(step_loss) else "a gradient is not finite"
    if cfg.on_nonfinite == "skip_batch" and len(state.skipped_steps) < cfg.max_skipped_steps:
        state.skipped_steps.append(step)
        log.warning(
            "optimizer step %d (epoch %d): %s; batch skipped (trainer.on_nonfinite: skip_batch)",
            step,
            epoch,
            what,
        )
        return
    kept = f"the last finite checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint exists"
    fix = (
        f"{cfg.max_skipped_steps} steps were skipped already (trainer.max_skipped_steps)"
        if cfg.on_nonfinite == "skip_batch"
        else "or set trainer.on_nonfinite: skip_batch"
    )
    raise TrainingError(
        f"training stopped at optimizer step {step} (epoch {epoch}): {what}; {kept}; "
        f"lower trainer.learning_rate {fix}"
    )
