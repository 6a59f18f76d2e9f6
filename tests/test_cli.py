"""CLI: exit codes and one-line messages for bad input; the happy path train -> predict -> evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from tunewright.cli import app

runner = CliRunner()


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def invoke(*args: str):
    return runner.invoke(app, ["--quiet", *args])


def assert_one_line_error(result, exit_code: int, *fragments: str) -> None:
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_train_predict_evaluate(tmp_path: Path, tiny_config: dict, copy_csv: Path) -> None:
    config = write_config(tmp_path, tiny_config)
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", "-c", str(config), "-d", str(copy_csv), "--output-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "validation metrics" in result.stderr and result.stdout == ""  # tables are for people: stderr

    predictions = tmp_path / "out.jsonl"
    result = invoke("predict", "--model", str(run_dir), "--dataset", str(copy_csv), "--output", str(predictions))
    assert result.exit_code == 0, result.output
    assert len(pd.read_json(predictions, lines=True)) == 24

    metrics_file = tmp_path / "metrics.json"
    result = invoke("evaluate", "--model", str(run_dir), "--dataset", str(copy_csv), "--output", str(metrics_file))
    assert result.exit_code == 0, result.output
    assert json.loads(metrics_file.read_text())["rows"] == 24
    assert json.loads(result.stdout) == json.loads(metrics_file.read_text())  # stdout: the JSON alone


def test_zero_shot_predict_from_config(tmp_path: Path, tiny_config: dict, copy_csv: Path) -> None:
    config = write_config(tmp_path, {**tiny_config, "trainer": {"type": "none"}})
    out = tmp_path / "out.csv"
    result = invoke("predict", "--config", str(config), "--dataset", str(copy_csv), "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "prediction" in pd.read_csv(out).columns


def test_validate(tmp_path: Path, tiny_config: dict) -> None:
    result = invoke("validate", str(write_config(tmp_path, tiny_config)))
    assert result.exit_code == 0 and "valid" in result.stdout


@pytest.mark.parametrize(("change", "exit_code", "fragments"), [
    ({"trainer": {"epochz": 1}}, 7, ["trainer.epochz: unknown key (did you mean 'epochs'?)"]),
    ({"trainer": {"batch_size": "big"}}, 7, ["trainer.batch_size:"]),
    ({"prompt": {"template": "say {wrd}:"}}, 7, ["prompt.template: placeholder {wrd} is not an input feature"]),
    ({"output_features": [{"name": "echo"}, {"name": "word"}]}, 7, ["only a single output feature is supported"]),
    ({"output_features": [{"name": "missing"}]}, 3, ["column 'missing' not found (columns: word, echo)"]),
    ({"base_model": "./no/such/model"}, 4, ["base_model: folder no/such/model not found"]),
])
def test_bad_config_is_one_clear_line(tmp_path: Path, tiny_config: dict, copy_csv: Path, change: dict,
                                      exit_code: int, fragments: list[str]) -> None:
    config = write_config(tmp_path, {**tiny_config, **change})
    result = invoke("train", "-c", str(config), "-d", str(copy_csv), "-o", str(tmp_path / "run"))
    assert_one_line_error(result, exit_code, *fragments)


def test_missing_files_are_named(tmp_path: Path, tiny_config: dict, copy_csv: Path) -> None:
    result = invoke("train", "-c", str(tmp_path / "nope.yaml"), "-d", str(copy_csv), "-o", str(tmp_path / "r"))
    assert_one_line_error(result, 7, "nope.yaml: config file not found")
    config = write_config(tmp_path, tiny_config)
    result = invoke("train", "-c", str(config), "-d", str(tmp_path / "gone.csv"), "-o", str(tmp_path / "r"))
    assert_one_line_error(result, 3, "gone.csv: dataset file not found")


def test_empty_dataset(tmp_path: Path, tiny_config: dict) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("word,echo\n")
    config = write_config(tmp_path, tiny_config)
    result = invoke("train", "-c", str(config), "-d", str(empty), "-o", str(tmp_path / "run"))
    assert_one_line_error(result, 3, "empty.csv: no data rows")
    assert not (tmp_path / "run").exists()


def test_unreadable_run_folder(tmp_path: Path, copy_csv: Path) -> None:
    result = invoke("predict", "-m", str(tmp_path / "nothing"), "-d", str(copy_csv), "-o", str(tmp_path / "p.csv"))
    assert_one_line_error(result, 5, "run folder not found")


def test_predict_needs_exactly_one_model_source(tmp_path: Path, copy_csv: Path) -> None:
    result = invoke("predict", "-d", str(copy_csv), "-o", str(tmp_path / "p.csv"))
    assert result.exit_code == 2, result.output  # a usage error, as click reports a missing option
    assert "'--model' / '--config'" in result.stderr and "pass exactly one" in result.stderr


def test_debug_shows_the_traceback(tmp_path: Path, copy_csv: Path) -> None:
    result = runner.invoke(app, ["--debug", "validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code != 0 and result.exception is not None
    assert type(result.exception).__name__ == "ConfigError"
