"""Checkpoints and exact resume: a killed or interrupted run, once resumed, equals an unbroken one.

The faults are real: a SIGKILL of a subprocess running the CLI, and SIGTERM / SIGINT delivered to
this process while it trains. They are sent from a global forward pre-hook at a chosen training
forward call, so the point of the kill (inside a gradient-accumulation window, or while a
checkpoint is being written) is exact and the tests are deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import SHARED_DATA, copy_rows
from safetensors.torch import load_file
from typer.testing import CliRunner

from tunewright import api
from tunewright.checkpoint import CHECKPOINT_DIR, list_checkpoints, read_trainer_state
from tunewright.cli import app
from tunewright.errors import TrainingInterrupted
from tunewright.objective import LanguageModelObjective
from tunewright.run import read_status, set_status


def calls_before(step: int) -> int:
    """Training forward calls before optimizer step `step` (1-based) starts.

    18 training rows in micro-batches of 2, two per optimizer step: each epoch has 5 steps, the
    first four take 2 forward calls and the fifth (the epoch's last, odd micro-batch) takes 1.
    """
    return sum(1 if done % 5 == 4 else 2 for done in range(step - 1))


@pytest.fixture
def resume_config(tiny_config: dict, tmp_path: Path) -> Path:
    config = {
        **tiny_config,
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG must be restored
        "trainer": {
            "max_steps": 8,
            "batch_size": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 0.01,
            "checkpoint_steps": 2,
            "keep_checkpoints": 2,
            "eval_every": 2,
            "seed": 7,
            "precision": "fp32",  # the killed run is a subprocess, out of reach of conftest's fp32_by_default
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def data_csv(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    copy_rows(24).to_csv(path, index=False)
    return path


def train_args(config: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--quiet", "train", "-c", str(config), "-d", str(data), "-o", str(out), *extra]


def log_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "training_log.jsonl").read_text(encoding="utf-8").splitlines()
    keys = ("step", "epoch", "loss", "learning_rate", "val_loss")
    return [{key: record.get(key) for key in keys} for record in map(json.loads, lines)]


def assert_same_run(resumed: Path, straight: Path) -> None:
    """Per-step losses, learning rates and val losses, and the final adapter tensors, exactly equal."""
    assert log_records(resumed) == log_records(straight)
    a = load_file(resumed / "adapter_model.safetensors")
    b = load_file(straight / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert read_status(resumed)["status"] == "complete"


@pytest.fixture
def straight_run(resume_config: Path, data_csv: Path, tmp_path: Path) -> Path:
    out = tmp_path / "straight"
    api.train(resume_config, data_csv, out, show_progress=False)
    return out


@contextmanager
def signal_at_forward(call: int, signal_number: int,
                      objective_type: type[torch.nn.Module] = LanguageModelObjective) -> Iterator[None]:
    """Send `signal_number` to this process just before the `call`-th training forward pass of an `objective_type`."""
    calls = 0

    def hook(module: torch.nn.Module, _args: object) -> None:
        nonlocal calls
        if isinstance(module, objective_type) and module.training:
            calls += 1
            if calls == call:
                os.kill(os.getpid(), signal_number)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from tunewright import checkpoint
    from tunewright.objective import LanguageModelObjective
    from tunewright.cli import app

    mode, at, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    calls = {"forward": 0, "save": 0}

    def hook(module, _args):
        if mode == "forward" and isinstance(module, LanguageModelObjective) and module.training:
            calls["forward"] += 1
            if calls["forward"] == at:
                os.kill(os.getpid(), signal.SIGKILL)

    real_save = checkpoint.torch.save

    def save_then_die(obj, path):
        # A kill between two files of a checkpoint: weights are written, the rest never is.
        calls["save"] += 1
        if mode == "save" and calls["save"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, path)

    checkpoint.torch.save = save_then_die
    torch.nn.modules.module.register_module_forward_pre_hook(hook)
    app(args)
    """
)


def run_killed(tmp_path: Path, mode: str, at: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "kill_script.py"
    script.write_text(KILL_SCRIPT, encoding="utf-8")
    tests_dir = str(Path(__file__).parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, str(script), mode, str(at), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize(
    ("mode", "at", "checkpoint_before_resume"),
    [
        ("forward", calls_before(6) + 2, 4),  # inside step 6's accumulation window: steps 5-6 are redone
        ("save", 2, 2),  # while writing the step-4 checkpoint: it must not exist, half-written or otherwise
    ],
)
def test_sigkill_then_resume_equals_uninterrupted_run(
    mode: str,
    at: int,
    checkpoint_before_resume: int,
    resume_config: Path,
    data_csv: Path,
    straight_run: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "killed"
    killed = run_killed(tmp_path, mode, at, train_args(resume_config, data_csv, out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert read_status(out)["status"] == "running"  # nothing could mark it: the process just vanished
    steps = [step for step, _ in list_checkpoints(out / CHECKPOINT_DIR)]
    assert steps[-1] == checkpoint_before_resume
    if mode == "save":
        assert [path.name for path in (out / CHECKPOINT_DIR).glob(".tmp-*")]  # the half-written one, hidden

    result = CliRunner().invoke(app, train_args(resume_config, data_csv, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert not list((out / CHECKPOINT_DIR).glob(".tmp-*"))
    assert_same_run(out, straight_run)


@pytest.mark.parametrize(("signal_number", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_checkpoint_marks_interrupted_and_resumes_exactly(
    signal_number: int,
    exit_code: int,
    resume_config: Path,
    data_csv: Path,
    straight_run: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "interrupted"
    runner = CliRunner()
    # Just before step 4's first micro-batch: that micro-batch finishes, the window is dropped.
    with signal_at_forward(calls_before(4) + 1, signal_number):
        result = runner.invoke(app, train_args(resume_config, data_csv, out))
    assert result.exit_code == exit_code, result.output
    assert "interrupted by" in result.output and "after optimizer step 3" in result.output
    assert "Traceback" not in result.output
    status = read_status(out)
    assert status["status"] == "interrupted"
    assert read_trainer_state(out / CHECKPOINT_DIR / "step-000003").step == 3
    assert [step for step, _ in list_checkpoints(out / CHECKPOINT_DIR)] == [2, 3]
    assert len(log_records(out)) == 3

    for command in (
        ["predict", "-d", str(data_csv), "-o", str(tmp_path / "p.csv"), "-m", str(out)],
        ["evaluate", "-d", str(data_csv), "-m", str(out)],
        ["export", "-m", str(out), "-o", str(tmp_path / "exported")],
    ):
        refused = runner.invoke(app, command)
        assert refused.exit_code == 5, (command, refused.output)
        assert "the run is interrupted, not complete; resume it with" in " ".join(refused.output.split())

    result = runner.invoke(app, train_args(resume_config, data_csv, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert_same_run(out, straight_run)


def test_early_stopping_state_survives_a_resume(resume_config: Path, data_csv: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(resume_config.read_text(encoding="utf-8"))
    config["trainer"].update(
        learning_rate=0.3, eval_every=1, early_stopping_patience=2, max_steps=20, checkpoint_steps=1
    )
    resume_config.write_text(yaml.safe_dump(config), encoding="utf-8")
    straight = api.train(resume_config, data_csv, tmp_path / "straight", show_progress=False)
    assert straight.metrics["training"]["stopped_early"]
    stopped_at = straight.metrics["training"]["steps"]
    best_step = min(log_records(tmp_path / "straight"), key=lambda record: record["val_loss"])["step"]
    # Interrupt in the last step, after the best one, while the patience counter runs: the resumed
    # run must know the best loss, the best weights and the count, or it would stop elsewhere.
    assert best_step < stopped_at - 1
    out = tmp_path / "interrupted"
    with signal_at_forward(calls_before(stopped_at) + 1, signal.SIGTERM):
        with pytest.raises(Exception, match="interrupted by SIGTERM"):
            api.train(resume_config, data_csv, out, show_progress=False)
    state = read_trainer_state(sorted((out / CHECKPOINT_DIR).iterdir())[-1])
    assert state.evals_without_improvement == 1 and state.best_val_loss is not None
    resumed = api.train(resume_config, data_csv, out, show_progress=False, resume=True)
    assert resumed.metrics["training"]["steps"] == stopped_at
    assert resumed.metrics["training"]["best_val_loss"] == straight.metrics["training"]["best_val_loss"]
    assert_same_run(out, tmp_path / "straight")


def test_resume_refuses_a_different_dataset_or_adapter(
    resume_config: Path, data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with signal_at_forward(calls_before(3) + 1, signal.SIGTERM):
        assert CliRunner().invoke(app, train_args(resume_config, data_csv, out)).exit_code == 143
    rows = copy_rows(24)
    rows.loc[0, "echo"] = "changed"
    other_data = tmp_path / "other.csv"
    rows.to_csv(other_data, index=False)
    config = yaml.safe_load(resume_config.read_text(encoding="utf-8"))
    config["adapter"]["r"] = 8
    config["base_model"] = config["base_model"] + "/"
    other_config = tmp_path / "other.yaml"
    other_config.write_text(yaml.safe_dump(config), encoding="utf-8")
    before = (out / "config.yaml").read_text(encoding="utf-8")

    result = CliRunner().invoke(app, train_args(other_config, other_data, out, "--resume"))
    assert result.exit_code == 5
    message = " ".join(result.output.split())
    assert "cannot resume" in message
    for key in ("adapter", "base_model", "dataset.train"):
        assert key in message
    assert (out / "config.yaml").read_text(encoding="utf-8") == before  # refused before touching anything
    assert read_status(out)["status"] == "interrupted"


def test_resume_and_overwrite_rules(
    resume_config: Path, data_csv: Path, straight_run: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    again = runner.invoke(app, train_args(resume_config, data_csv, straight_run))
    assert again.exit_code == 5 and "--resume" in again.output
    complete = runner.invoke(app, train_args(resume_config, data_csv, straight_run, "--resume"))
    assert complete.exit_code == 5 and "already complete" in complete.output
    both = runner.invoke(app, train_args(resume_config, data_csv, straight_run, "--resume", "--overwrite"))
    assert both.exit_code == 5 and "not both" in both.output
    # --resume on a folder with no run yet simply starts one (handy for preemptible job scripts).
    fresh = runner.invoke(app, train_args(resume_config, data_csv, tmp_path / "new", "--resume"))
    assert fresh.exit_code == 0, fresh.output
    assert_same_run(tmp_path / "new", straight_run)


def test_checkpoints_are_whole_and_only_the_newest_are_kept(straight_run: Path) -> None:
    checkpoints = list_checkpoints(straight_run / CHECKPOINT_DIR)
    assert [step for step, _ in checkpoints] == [6, 8]  # every 2 steps, keep 2
    for _, path in checkpoints:
        assert sorted(p.name for p in path.iterdir()) == [
            "best_weights.safetensors",
            "trainer_state.json",
            "training_state.pt",
            "weights.safetensors",
        ]
    final = load_file(checkpoints[-1][1] / "weights.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in final.values())


def test_resume_refuses_a_run_that_is_still_training(
    resume_config: Path, data_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with signal_at_forward(calls_before(3) + 1, signal.SIGTERM):
        assert CliRunner().invoke(app, train_args(resume_config, data_csv, out)).exit_code == 143
    # As if another process on this machine (here: our parent, which is alive) were training it now.
    set_status(out, "running", pid=os.getppid(), host=socket.gethostname())
    result = CliRunner().invoke(app, train_args(resume_config, data_csv, out, "--resume"))
    assert result.exit_code == 5 and "still training in process" in result.output


SST2 = SHARED_DATA / "sst2"


@pytest.mark.integration
@pytest.mark.skipif(not SST2.is_dir(), reason="needs ../shared/data/sst2")
def test_real_model_interrupted_and_resumed_is_bit_exact(tmp_path: Path) -> None:
    """SmolLM2-135M + LoRA on SST-2: SIGTERM inside step 3, resume; same losses and adapter bit for bit."""
    rows = pd.read_csv(SST2 / "train.csv")
    rows = rows[rows["text"].str.len() < 60].head(16)  # short reviews: a few seconds per step on 2 cores
    config = {
        "base_model": "smollm2-135m",
        "input_features": [{"name": "text"}],
        "output_features": [{"name": "label", "type": "text"}],
        "prompt": {"template": "Review: {text}\nSentiment:"},
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.05},
        "trainer": {
            "max_steps": 4,
            "batch_size": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 2e-4,
            "checkpoint_steps": 2,
            "seed": 3,
        },
        "generation": {"max_new_tokens": 4},
        "preprocessing": {"split": [1.0, 0.0, 0.0]},
    }
    api.train(config, rows, tmp_path / "straight", show_progress=False)
    out = tmp_path / "interrupted"
    # Two micro-batches per step: step 3 starts after 4 forward calls; the signal lands in its window.
    with signal_at_forward(5, signal.SIGTERM):
        with pytest.raises(TrainingInterrupted, match="after optimizer step 2"):
            api.train(config, rows, out, show_progress=False)
    api.train(config, rows, out, show_progress=False, resume=True)
    assert_same_run(out, tmp_path / "straight")


def test_a_second_ctrl_c_stops_at_once(resume_config: Path, data_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    calls = 0

    def hook(module: torch.nn.Module, _args: object) -> None:
        nonlocal calls
        if isinstance(module, LanguageModelObjective) and module.training:
            calls += 1
            if calls == calls_before(4) + 1:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)  # impatient user: no checkpoint wait

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        result = CliRunner().invoke(app, train_args(resume_config, data_csv, out))
    finally:
        handle.remove()
    assert result.exit_code == 130 and "interrupted" in result.output
    assert read_status(out)["status"] == "interrupted"
    assert [step for step, _ in list_checkpoints(out / CHECKPOINT_DIR)] == [2]  # only the periodic one
