"""The CLI in scripts: stdout carries only machine-readable output, flags work where habits put them,
exit codes tell usage from config errors, and the commands that load no model import no torch."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_rows
from typer.testing import CliRunner

import tunewright
from tunewright.cli import app, state
from tunewright.errors import ConfigError
from tunewright.progress import quiet_libraries

runner = CliRunner()
TUNEWRIGHT = Path(sys.executable).with_name("tunewright")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    config = {
        "base_model": str(tiny_model_dir),
        "input_features": [{"name": "word"}],
        "output_features": [{"name": "echo"}],
        "prompt": {"template": "say {word}:"},
        "adapter": {"type": "lora", "r": 4, "alpha": 8},
        "trainer": {"max_steps": 2, "batch_size": 4, "precision": "fp32"},
        "generation": {"max_new_tokens": 3},
    }
    folder = tmp_path_factory.mktemp("streams")
    return tunewright.train(config, copy_rows(), folder / "run", show_progress=False).run_dir


@pytest.fixture
def data_csv(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    copy_rows(6).to_csv(path, index=False)
    return path


def test_evaluate_prints_only_json_on_stdout(trained_run: Path, data_csv: Path) -> None:
    result = runner.invoke(app, ["evaluate", "-m", str(trained_run), "-d", str(data_csv)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["rows"] == 6 and isinstance(metrics["rows"], int)
    assert "metrics" in result.stderr and "exact_match" in result.stderr  # the table, for people


def test_evaluate_pipes_into_a_json_parser_and_quiet_silences_the_libraries(
    trained_run: Path, data_csv: Path
) -> None:
    """As `tunewright evaluate ... | jq .`: a real process, stdout a pipe, Python's default warning filters."""
    command = [str(TUNEWRIGHT), "evaluate", "-m", str(trained_run), "-d", str(data_csv)]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    loud = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == 0, loud.stderr
    assert json.loads(loud.stdout)["rows"] == 6
    assert "Loading weights" in loud.stderr  # transformers' own bar: what --quiet must hide
    quiet = subprocess.run([*command, "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert json.loads(quiet.stdout)["rows"] == 6
    assert quiet.stderr.strip() == ""


def test_progress_bars_write_to_stderr(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tunewright.predict(trained_run, copy_rows(4), show_progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "generating" in captured.err


def test_progress_is_off_by_default_when_stderr_is_not_a_terminal(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tunewright.predict(trained_run, copy_rows(4))
    assert "generating" not in capsys.readouterr().err


def test_quiet_libraries_is_scoped() -> None:
    from transformers.utils import logging as transformers_logging

    before = transformers_logging.is_progress_bar_enabled(), logging.getLogger("transformers").level
    with quiet_libraries():
        assert not transformers_logging.is_progress_bar_enabled()
        assert logging.getLogger("transformers").level == logging.ERROR
    assert (transformers_logging.is_progress_bar_enabled(), logging.getLogger("transformers").level) == before


@pytest.mark.parametrize(("args", "flag"), [
    (["predict", "-d", "data.csv", "-o", "out.txt"], "'--output' / '-o'"),
    (["evaluate", "-d", "data.csv", "--predictions", "predictions.xlsx"], "'--predictions'"),
    (["evaluate", "-d", "data.csv", "--output", "metrics.csv"], "'--output' / '-o'"),
])
def test_file_types_are_checked_before_any_model_loads(tmp_path: Path, args: list[str], flag: str) -> None:
    # The run folder does not exist: a check made after loading would report that instead.
    result = runner.invoke(app, [*args, "-m", str(tmp_path / "no-run")])
    assert result.exit_code == 2, result.output
    assert flag in result.stderr and "run folder" not in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"tunewright {tunewright.__version__}"


def test_global_flags_work_after_the_verb(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    for args in (["--debug", "validate", missing], ["validate", missing, "--debug"]):
        result = runner.invoke(app, args)
        assert isinstance(result.exception, ConfigError), args  # --debug re-raises: the traceback shows
    runner.invoke(app, ["validate", missing, "--quiet"])
    assert state["quiet"]
    runner.invoke(app, ["validate", missing])
    assert not state["quiet"]  # each invocation starts from its own flags


def test_usage_and_config_errors_have_distinct_exit_codes(tmp_path: Path) -> None:
    assert runner.invoke(app, ["validate", "--no-such-flag", "x.yaml"]).exit_code == 2
    assert runner.invoke(app, ["train", "-c", "x.yaml"]).exit_code == 2  # missing options
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"epochz": 1}}))
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == ConfigError.exit_code == 7, result.output


def test_shell_completion_is_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "--install-completion" in runner.invoke(app, ["--help"]).stdout
    # typer detects the calling shell from the process tree, which a CI job may not have: name it instead
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    result = runner.invoke(app, ["--show-completion", "bash"])
    assert result.exit_code == 0 and "_TUNEWRIGHT_COMPLETE" in result.stdout


LIGHT_COMMANDS = """
import sys
from typer.testing import CliRunner
import tunewright
from tunewright.cli import app
names = [tunewright.TunewrightError, tunewright.load_config, tunewright.__version__]
for args in (["--help"], ["--version"], ["train", "--help"], ["validate", sys.argv[1]]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
print([name for name in ("torch", "transformers", "peft", "accelerate", "pandas") if name in sys.modules])
"""


def test_help_version_and_validate_import_no_heavy_library(tmp_path: Path, tiny_config: dict) -> None:
    """Deterministic stand-in for "--help takes under a second": torch and transformers alone take seconds."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = subprocess.run([sys.executable, "-c", LIGHT_COMMANDS, str(config)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
