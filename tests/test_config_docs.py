from __future__ import annotations

from pathlib import Path

from tunewright.config import TunewrightConfig
from tunewright.config_docs import config_reference

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_config_reference_is_fresh() -> None:
    stale = "docs/config.md is stale: run `tunewright config --docs > docs/config.md`"
    assert DOCS.read_text() == config_reference(), stale


def test_config_reference_names_every_key_and_default() -> None:
    reference = config_reference()
    for name in TunewrightConfig.model_fields["trainer"].annotation.model_fields:
        assert f"| `{name}` |" in reference
    assert "| `learning_rate` | float or null | null |" in reference
    assert "| `input_features` | list of mapping (its section below) | required |" in reference


def test_the_cli_prints_the_reference_and_resolved_configs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tunewright.cli import app
    from tunewright.config import config_to_dict, load_config

    runner = CliRunner()
    docs = runner.invoke(app, ["config", "--docs"])
    assert docs.exit_code == 0 and docs.stdout == config_reference()
    source = tmp_path / "c.yaml"
    source.write_text("input_features: [{name: q}]\noutput_features: [{name: a}]\n", encoding="utf-8")
    resolved = runner.invoke(app, ["config", str(source)])
    assert resolved.exit_code == 0 and "learning_rate: 2.0e-05" in resolved.stdout  # no adapter: full fine-tuning
    printed = tmp_path / "resolved.yaml"
    printed.write_text(resolved.stdout, encoding="utf-8")
    assert config_to_dict(load_config(printed)) == config_to_dict(load_config(source))
    assert runner.invoke(app, ["config"]).exit_code == 2
