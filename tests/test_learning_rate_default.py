"""trainer.learning_rate left out: resolved by what trains (1e-3 for adapters, 2e-5 for full fine-tuning),
in the schema, so the saved config of a run records the rate it used."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import train_tiny_run

from tunewright.config import AdapterConfig, TrainerConfig, TunewrightConfig, config_to_dict, load_config

FEATURES = {"input_features": [{"name": "q"}], "output_features": [{"name": "a"}]}


@pytest.mark.parametrize(("adapter", "expected"), [
    ({"type": "lora"}, 1e-3),
    ({"type": "lora", "target_modules": "all-linear"}, 1e-3),
    ({"type": "ia3"}, 1e-3),
    ({"type": "prompt_tuning"}, 1e-3),
    ({"type": "full"}, 2e-5),
    ({"type": "full", "trainable_layers": [-1]}, 2e-5),
    (None, 2e-5),  # no adapter section: full fine-tuning
])
def test_the_default_learning_rate_follows_what_trains(adapter: dict | None, expected: float) -> None:
    config = load_config({**FEATURES, "adapter": adapter})
    assert config.trainer.learning_rate == expected


def test_a_given_learning_rate_is_kept() -> None:
    config = load_config({**FEATURES, "adapter": {"type": "full"}, "trainer": {"learning_rate": 1e-4}})
    assert config.trainer.learning_rate == 1e-4


def test_the_resolved_rate_survives_a_round_trip_and_leaves_the_given_section_alone() -> None:
    trainer = TrainerConfig()
    config = TunewrightConfig(**FEATURES, adapter=AdapterConfig(), trainer=trainer)
    assert config.trainer.learning_rate == 1e-3 and trainer.learning_rate is None
    assert load_config(config_to_dict(config)).trainer.learning_rate == 1e-3


def test_a_trainer_section_on_its_own_trains_an_adapter() -> None:
    assert TrainerConfig().peak_learning_rate == 1e-3
    assert TrainerConfig(learning_rate=0.05).peak_learning_rate == 0.05


def test_the_run_folder_records_the_rate_used(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = train_tiny_run(tiny_model_dir, tmp_path / "run", {"max_steps": 1})
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert saved["trainer"]["learning_rate"] == 1e-3
