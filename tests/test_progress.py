"""Long work says what it did and how long it took, one line per phase on stderr; --quiet says nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import copy_rows
from typer.testing import CliRunner

from tunewright.cli import app

runner = CliRunner()
PHASE_LINE = re.compile(r"(read|tokenised|loss over|generated|scored|evaluated) .*? in \d+\.\d s")


def phases(stderr: str) -> list[str]:
    """The phase lines, with rich's wrapping of long lines undone."""
    return [match.group(0) for match in PHASE_LINE.finditer(" ".join(stderr.split()))]


@pytest.fixture
def files(tmp_path: Path, tiny_config: dict) -> tuple[Path, Path]:
    config = {**tiny_config, "trainer": {**tiny_config["trainer"], "max_steps": 1}}
    config_path, data_path = tmp_path / "config.yaml", tmp_path / "copy.csv"
    config_path.write_text(yaml.safe_dump(config))
    copy_rows(8).to_csv(data_path, index=False)
    return config_path, data_path


def test_a_run_shows_each_phase_with_its_time_on_stderr_only(files: tuple[Path, Path], tmp_path: Path) -> None:
    config, data = files
    result = runner.invoke(app, ["train", "-c", str(config), "-d", str(data), "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    lines = phases(result.stderr)
    expected = [f"read 8 rows from {data}", "tokenised 6 training rows", "tokenised 2 validation rows",
                "loss over 2 rows", "generated 2 completions", "evaluated 2 rows of validation"]
    for start in expected:
        assert any(line.startswith(start) for line in lines), (start, lines)


def test_label_scoring_shows_its_phase(files: tuple[Path, Path], tiny_config: dict, tmp_path: Path) -> None:
    config_path, data = files
    labels = sorted(set(copy_rows(8)["echo"]))
    category = {**tiny_config, "trainer": {"type": "none"},
                "output_features": [{"name": "echo", "type": "category", "labels": labels}]}
    config_path.write_text(yaml.safe_dump(category))
    result = runner.invoke(app, ["evaluate", "-c", str(config_path), "-d", str(data)])
    assert result.exit_code == 0, result.output
    assert any(line.startswith("scored 8 labels for 8 rows") for line in phases(result.stderr)), result.stderr


def test_quiet_shows_no_phase_lines(files: tuple[Path, Path], tmp_path: Path) -> None:
    config, data = files
    result = runner.invoke(app, ["train", "-c", str(config), "-d", str(data), "-o", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert phases(result.stderr) == []
    assert result.stderr.strip() == f"run folder: {tmp_path / 'run'}"
