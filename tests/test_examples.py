"""Every shipped example validates, and its data has the columns its config names."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunewright.config import load_config
from tunewright.data import read_table

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*/config.yaml"))


def test_there_is_a_generation_and_a_classification_example() -> None:
    types = {load_config(path).output_feature.type for path in EXAMPLES}
    assert types == {"text", "category"}


@pytest.mark.parametrize("config_path", EXAMPLES, ids=lambda path: path.parent.name)
def test_example_data_fits_its_config(config_path: Path) -> None:
    config = load_config(config_path)
    for data in sorted(config_path.parent.glob("*.csv")):
        frame = read_table(data)
        assert set(config.input_columns) | {config.output_feature.name} <= set(frame.columns), data
        if config.output_feature.labels:
            assert set(frame[config.output_feature.name]) <= set(config.output_feature.labels), data


def test_dpo_example_trains_and_reports_reward_accuracy(tiny_model_dir: Path, tmp_path: Path) -> None:
    """examples/dpo as the README runs it (the tiny model stands in for smollm2-135m)."""
    import json

    import yaml
    from typer.testing import CliRunner

    from tunewright.cli import app

    example = EXAMPLES[0].parents[1] / "dpo"
    config = yaml.safe_load((example / "config.yaml").read_text(encoding="utf-8"))
    config["base_model"] = str(tiny_model_dir)
    config["trainer"] = {**config["trainer"], "epochs": 1, "precision": "fp32"}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    run = tmp_path / "RUN"
    result = CliRunner().invoke(app, ["--quiet", "train", "--config", str(config_path), "--dataset",
                                      str(example / "train.jsonl"), "--output-dir", str(run)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    keys = [f"{section}.{key}" for section, values in metrics.items() for key in values]
    assert any("reward_accuracy" in key for key in keys)
    assert 0 <= metrics["validation"]["reward_accuracy"] <= 1 and metrics["validation"]["rows"] == 8


def test_chat_example_previews_its_masks_and_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    """examples/chat as the README runs it: inspect, then train (the tiny model stands in for smollm2-135m)."""
    import json

    import yaml
    from typer.testing import CliRunner

    from tunewright.cli import app

    example = EXAMPLES[0].parents[1] / "chat"
    config = yaml.safe_load((example / "config.yaml").read_text(encoding="utf-8"))
    config["base_model"] = str(tiny_model_dir)
    config["trainer"] = {**config["trainer"], "epochs": 1, "precision": "fp32"}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    data = str(example / "train.jsonl")
    inspected = CliRunner().invoke(app, ["inspect", "--config", str(config_path), "--dataset", data, "--rows", "1"])
    assert inspected.exit_code == 0, inspected.output
    assert "⟦Hello! What can I do for you?<|im_end|>⟧" in inspected.output
    assert "rows with no trained token" in inspected.output
    run = tmp_path / "RUN"
    result = CliRunner().invoke(app, ["--quiet", "train", "--config", str(config_path), "--dataset", data,
                                      "--output-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "chat_template.jinja").read_text(encoding="utf-8").endswith(
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    assert json.loads((run / "metrics.json").read_text(encoding="utf-8"))["validation"]["rows"] == 5
