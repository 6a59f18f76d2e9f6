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
