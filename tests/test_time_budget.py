"""trainer.time_budget: the step count is chosen from the run's own timed steps, the schedule ends with it,
a resumed run keeps it, and conflicting settings are refused.

The budget reads its clock through `tunewright.time_budget.now`, replaced here by a fake clock that
moves one second per reading: every timed step then takes exactly 1 s and every chosen count is exact.
Those tests check the first choice alone (rechecking off); a clock that slows down checks the rechecks.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import train_tiny_run

from tunewright import api, time_budget
from tunewright.config import load_config
from tunewright.errors import ConfigError, TrainingInterrupted
from tunewright.objective import LanguageModelObjective
from tunewright.time_budget import steps_within_budget, validations_between

ROWS = [{"word": word, "echo": word} for word in ["cat", "dog", "sun", "sea"]]  # one step of batch 4


@pytest.fixture
def one_second_per_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter(range(1, 1_000_000))
    monkeypatch.setattr(time_budget, "now", lambda: float(next(readings)))
    monkeypatch.setattr(time_budget, "REPLANS", 0)  # the first choice's arithmetic only


class SlowingClock:
    """A clock of real seconds that a run's steps advance: `step_seconds` a step, more after `slower_from`."""

    def __init__(self, step_seconds: float, slower_from: int, slower_seconds: float) -> None:
        self.time, self.steps = 0.0, 0
        self.step_seconds, self.slower_from, self.slower_seconds = step_seconds, slower_from, slower_seconds

    def now(self) -> float:
        return self.time

    def step(self) -> None:
        self.steps += 1
        self.time += self.slower_seconds if self.steps >= self.slower_from else self.step_seconds


def test_a_run_that_slows_down_is_replanned_to_end_within_its_budget(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps take 1 s while the count is chosen, then 1.5 s: the first plan alone would overrun by a third."""
    clock = SlowingClock(1.0, slower_from=8, slower_seconds=1.5)
    monkeypatch.setattr(time_budget, "now", clock.now)
    original = LanguageModelObjective.forward

    def forward_then_tick(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        clock.step()  # one forward per step here (batch 4, four rows)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LanguageModelObjective, "forward", forward_then_tick)
    run = train_tiny_run(tiny_model_dir, tmp_path / "run", {"time_budget": 60, "learning_rate": 0.01,
                                                              "lr_scheduler": "linear", "checkpoint_steps": None})
    decision = json.loads((run / "metrics.json").read_text())["training"]["time_budget"]
    # Chosen after 5 steps of 1 s: 60 steps. At 1.5 s a step from step 8 that would end at about 87 s.
    assert decision["replanned"] >= 1 and decision["step_seconds"] == pytest.approx(1.5)
    assert clock.time <= 60 + 1.5  # the budget, within one step
    assert decision["steps"] == json.loads((run / "metrics.json").read_text())["training"]["steps"] < 60
    assert log_records(run)[-1]["learning_rate"] == 0.0  # the schedule still ends with the last step


def tiny_config(base_model: Path, trainer: dict, split: list[float]) -> dict:
    return {
        "base_model": str(base_model),
        "input_features": [{"name": "word"}],
        "output_features": [{"name": "echo"}],
        "prompt": {"template": "say {word}:"},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "trainer": {"batch_size": 4, "learning_rate": 0.01, "lr_scheduler": "linear", **trainer},
        "generation": {"max_new_tokens": 3},
        "preprocessing": {"split": split},
    }


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()]


def test_the_count_fits_the_budget_and_the_schedule_decays_to_its_end(
    tiny_model_dir: Path, tmp_path: Path, one_second_per_reading: None
) -> None:
    # Clock readings: 1 at the start, 2 per step (5 steps: 2..11), 12 when choosing. 11 s are spent,
    # 19 are left at 1 s a step: 5 + 19 = 24 steps. The epochs (3 steps by default) are ignored.
    run = train_tiny_run(tiny_model_dir, tmp_path / "run", {"time_budget": 30, "learning_rate": 0.01,
                                                              "lr_scheduler": "linear"})
    training = json.loads((run / "metrics.json").read_text())["training"]
    assert training["time_budget"] == {"seconds": 30, "steps": 24, "step_seconds": 1.0, "validation_seconds": 0.0}
    assert training["steps"] == 24
    rates = {record["step"]: record["learning_rate"] for record in log_records(run)}
    # The default 5% warmup is of the chosen count (1 of 24 steps); the linear decay then runs over the
    # other 23 and reaches zero at the last one.
    assert rates[5] == pytest.approx(0.01 * 19 / 23) and rates[12] == pytest.approx(0.01 * 12 / 23)
    assert rates[24] == 0.0


def test_one_timed_validation_and_the_scheduled_ones_are_counted(
    tiny_model_dir: Path, tmp_path: Path, one_second_per_reading: None
) -> None:
    # 8 rows: 6 train (2 steps an epoch), 2 validate.
    config = tiny_config(tiny_model_dir, {"time_budget": 40, "eval_every": 10}, [0.75, 0.25, 0.0])
    result = api.train(config, ROWS * 2, tmp_path / "run", show_progress=False)
    decision = result.metrics["training"]["time_budget"]
    # The validation at step 5 takes readings 12-13 (1 s); choosing reads 14: 13 s spent, 27 left. Steps 6..T
    # at 1 s each plus the validations at 10, 20 and T (1 s each) fit 27 s up to T = 29 (24 s + 3 s).
    assert decision["validation_seconds"] == 1.0 and decision["steps"] == 29
    validated = [record["step"] for record in log_records(result.run_dir) if "val_loss" in record]
    assert validated == [5, 10, 20, 29]


@contextmanager
def sigterm_at_forward(call: int) -> Iterator[None]:
    """SIGTERM to this process just before the `call`-th training forward pass (one per step here)."""
    calls = 0

    def hook(module: torch.nn.Module, _args: object) -> None:
        nonlocal calls
        if isinstance(module, LanguageModelObjective) and module.training:
            calls += 1
            if calls == call:
                os.kill(os.getpid(), signal.SIGTERM)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_a_resumed_run_keeps_the_chosen_count(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_second_per_reading: None
) -> None:
    config = tiny_config(tiny_model_dir, {"time_budget": 30, "checkpoint_steps": 4}, [1.0, 0.0, 0.0])
    with sigterm_at_forward(10), pytest.raises(TrainingInterrupted):
        api.train(config, ROWS, tmp_path / "run", show_progress=False)
    # A slower clock now: measuring again would choose far fewer steps; the resumed run must not.
    slow = iter(range(10, 10_000_000, 10))
    monkeypatch.setattr(time_budget, "now", lambda: float(next(slow)))
    resumed = api.train(config, ROWS, tmp_path / "run", show_progress=False, resume=True)
    assert resumed.metrics["training"]["steps"] == 24
    assert resumed.metrics["training"]["time_budget"]["steps"] == 24
    assert log_records(tmp_path / "run")[-1]["learning_rate"] == 0.0


@pytest.mark.parametrize(("trainer", "adapter", "expected"), [
    ({"time_budget": 60, "max_steps": 10}, "lora", "trainer: set max_steps or time_budget, not both"),
    ({"time_budget": 60}, "adalora", "trainer.time_budget: adalora's rank schedule needs the step count"),
    ({"time_budget": 0}, "lora", "trainer.time_budget"),
])
def test_conflicting_settings_are_one_line_config_errors(
    tiny_model_dir: Path, trainer: dict, adapter: str, expected: str
) -> None:
    config = tiny_config(tiny_model_dir, trainer, [1.0, 0.0, 0.0])
    config["adapter"] = {"type": adapter}
    with pytest.raises(ConfigError, match="^config: ") as error:
        load_config(config)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_validations_between_counts_the_periodic_ones_and_the_last() -> None:
    assert validations_between(5, 29, 10) == 3  # 10, 20, 29
    assert validations_between(5, 30, 10) == 3  # 10, 20, 30
    assert validations_between(5, 29, None) == 1  # only the last
    assert validations_between(5, 5, None) == 0


def test_steps_within_budget_never_goes_below_the_steps_done() -> None:
    assert steps_within_budget(-3.0, 5, 1.0, 0.0, None) == 5
    assert steps_within_budget(10.0, 5, 1.0, 2.0, None) == 13  # 8 steps + the last validation
    # 12 steps (6 s) and the validations at 8, 12, 16 and 17 (4 s); 18 would need 10.5 s.
    assert steps_within_budget(10.0, 5, 0.5, 1.0, 4) == 17
