"""trainer.time_budget: the optimizer-step count that fits a wall-clock budget, measured on the run's own steps.

The first step pays one-time costs (allocation, kernel selection, compilation), so it is not timed; the
next TIMED_STEPS steps give the seconds per step (validations and checkpoints between them excluded).
One validation is timed then too (when there are validation rows), and the step count is fixed so that
the steps done, the remaining steps and every validation still scheduled fit the budget. The schedule
is then rebuilt over that count, so the learning rate decays to the end of the budget; the count is kept
in the checkpoints, so a resumed run continues towards the same total instead of measuring again.

A machine's pace drifts: on a 2-core Intel Xeon with AMX, steps ran 20-25% slower after the first
hundred than the first few, and a run planned on them overran its budget by a third. So after the
first choice the count is checked again every tenth of it, at the wall-clock pace of the steps since
the last check (checkpoints and logging included, validations apart), and the schedule is rebuilt
over the new count when it changed.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

TIMED_STEPS = 4  # steps timed after the first one
# The schedule's length while the first steps are timed: long, so that they warm up gently and never
# reach the end of a decay.
PROVISIONAL_STEPS = 1000
REPLANS = 10  # after the first choice, the count is checked again every 1/REPLANS of it (0: never)


def validations_between(done: int, total: int, eval_every: int | None) -> int:
    """How many validations fit() runs after step `done` up to `total` (every `eval_every`, and at the end)."""
    if total <= done:
        return 0
    if eval_every is None:
        return 1
    count = total // eval_every - done // eval_every
    return count + (1 if total % eval_every else 0)


def steps_within_budget(seconds_left: float, done: int, step_seconds: float, validation_seconds: float,
                        eval_every: int | None) -> int:
    """The largest total step count whose remaining steps and validations fit `seconds_left` (at least `done`)."""
    def cost(total: int) -> float:
        return (total - done) * step_seconds + validations_between(done, total, eval_every) * validation_seconds

    total = done + max(0, math.floor(seconds_left / step_seconds))
    while total > done and cost(total) > seconds_left:
        total -= 1
    return total


def now() -> float:
    """The clock the budget reads (tests replace it with a fake one)."""
    return time.perf_counter()


@dataclass
class StepBudget:
    """Times the steps of this process and says when enough were timed to choose the total."""

    seconds: float
    started: float = field(default_factory=lambda: now())  # when fit() began to count against the budget
    durations: list[float] = field(default_factory=list)  # seconds of each step of this process
    step_started: float = 0.0
    checked_step: int | None = None  # the step of the last choice (None: not chosen yet)
    checked_at: float = 0.0  # the clock then
    validating: float = 0.0  # seconds spent validating since then (their own cost is planned apart)

    def clock(self) -> float:
        return now()

    def step_starts(self) -> None:
        self.step_started = now()

    def step_done(self) -> bool:
        """Count a finished step; True once the timed steps are done and the total should be chosen."""
        self.durations.append(now() - self.step_started)
        return len(self.durations) == TIMED_STEPS + 1

    def step_seconds(self) -> float:
        timed = self.durations[1:]  # not the first: it pays one-time costs
        return max(sum(timed) / len(timed), 1e-9)

    def choose(self, done: int, validation_seconds: float, eval_every: int | None) -> dict[str, float]:
        """The total step count and how it was reached (what metrics.json records as training.time_budget)."""
        reading = now()
        step_seconds = self.step_seconds()
        total = steps_within_budget(self.seconds - (reading - self.started), done, step_seconds, validation_seconds,
                                    eval_every)
        self.checked_step, self.checked_at, self.validating = done, reading, 0.0
        log.info("trainer.time_budget %.0f s: %d optimizer steps (%.3g s a step, %.3g s a validation)",
                 self.seconds, total, step_seconds, validation_seconds)
        return {"seconds": self.seconds, "steps": total, "step_seconds": step_seconds,
                "validation_seconds": validation_seconds}

    def validated(self, seconds: float) -> None:
        """A validation took `seconds` (planned by its own measure, so kept out of the step pace)."""
        self.validating += seconds

    def check_due(self, done: int, total: int) -> bool:
        """Whether the count should be checked again after step `done` of `total`."""
        if self.checked_step is None or REPLANS <= 0 or done >= total:
            return False
        return done - self.checked_step >= max(TIMED_STEPS, math.ceil(total / REPLANS))

    def check(self, done: int, decision: dict[str, float], eval_every: int | None) -> dict[str, float]:
        """The decision again at the pace since the last check; the same one when its count still fits."""
        assert self.checked_step is not None
        reading = now()
        step_seconds = max((reading - self.checked_at - self.validating) / (done - self.checked_step), 1e-9)
        self.checked_step, self.checked_at, self.validating = done, reading, 0.0
        steps = steps_within_budget(self.seconds - (reading - self.started), done, step_seconds,
                                    decision["validation_seconds"], eval_every)
        if steps == decision["steps"]:
            return decision
        log.info("trainer.time_budget %.0f s: %d optimizer steps instead of %d (%.3g s a step since step %d)",
                 self.seconds, steps, decision["steps"], step_seconds, done)
        return {**decision, "steps": steps, "step_seconds": step_seconds,
                "replanned": decision.get("replanned", 0) + 1}
