"""`tunewright inspect`: the trained tokens marked in the rendered rows, and the counts over the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from tunewright.cli import app
from tunewright.mask_lint import inspect_dataset


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_prompt_target_rows_train_the_target_and_eos(tiny_config: dict, copy_csv: Path, tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", tiny_config)
    result = CliRunner().invoke(app, ["inspect", "--config", str(config), "--dataset", str(copy_csv), "-n", "1"])
    assert result.exit_code == 0, result.output
    assert "say cat:⟦cat<|im_end|>⟧" in result.output
    assert "EOS / end of turn trained" in result.output and "yes" in result.output


def test_conversation_counts_rows_cut_by_the_length_limit(tiny_model_dir: Path, tmp_path: Path) -> None:
    long_answer = [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y"}]
    short = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    empty = [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": m}) for m in [short, long_answer, empty]), encoding="utf-8")
    config = {"base_model": str(tiny_model_dir), "conversation": {"train_eos": False},
              "prompt": {"chat_template": "chatml"}, "preprocessing": {"max_input_length": 40}}
    inspection = inspect_dataset(write(tmp_path / "c.yaml", config), data)
    stats = inspection.stats
    assert (stats.rows, stats.target_truncated_away, stats.no_trained_token) == (3, 1, 1)
    assert stats.turns_cut == 2 and not stats.eos_trained and stats.problem_rows == [2, 3]
    result = CliRunner().invoke(app, ["inspect", "-c", str(tmp_path / "c.yaml"), "-d", str(data)])
    assert result.exit_code == 0, result.output
    assert "NO: the model will not learn to stop" in result.output
    assert "⟦b⟧" in result.output


def test_inspect_reports_bad_data_as_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n", encoding="utf-8")
    config = write(tmp_path / "c.yaml", {"base_model": str(tiny_model_dir), "conversation": {}})
    result = CliRunner().invoke(app, ["inspect", "-c", str(config), "-d", str(data)])
    assert result.exit_code == 3
    assert "column 'messages' not found (columns: text)" in result.output
