from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunewright.config import config_to_dict, load_config, save_config
from tunewright.errors import ConfigError

MINIMAL = {"input_features": [{"name": "question"}], "output_features": [{"name": "answer"}]}


def with_changes(**sections: object) -> dict:
    return {**MINIMAL, **sections}


def config_error(raw: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(raw)  # type: ignore[arg-type]
    return str(caught.value)


def test_minimal_config_fills_every_default() -> None:
    config = load_config(MINIMAL)
    assert config.base_model == "smollm2-135m"
    assert config.trainer.type == "finetune"
    assert config.adapter is None  # no adapter section: full fine-tuning
    assert config.prompt_template == "{question}"
    assert config.output_feature.type == "text"


def test_unknown_key_suggests_the_close_name() -> None:
    message = config_error(with_changes(trainer={"learning_rat": 0.1}))
    assert "trainer.learning_rat: unknown key (did you mean 'learning_rate'?)" in message


def test_unknown_top_level_section_suggests_the_close_name() -> None:
    assert "adaptr: unknown key (did you mean 'adapter'?)" in config_error(with_changes(adaptr={}))


def test_wrong_type_names_the_key_path() -> None:
    message = config_error(with_changes(trainer={"batch_size": "eight"}))
    assert message.startswith("config: trainer.batch_size: ")


def test_missing_required_field() -> None:
    assert "input_features: required key is missing" in config_error({"output_features": [{"name": "a"}]})


def test_nested_list_key_path() -> None:
    message = config_error({"input_features": [{"nmae": "q"}], "output_features": [{"name": "a"}]})
    assert "input_features[0].nmae: unknown key (did you mean 'name'?)" in message


def test_all_errors_are_reported_in_one_pass() -> None:
    message = config_error(with_changes(trainer={"epochs": 0, "batch_size": "x"}, generation={"max_new_token": 3}))
    assert message.startswith("config: 3 errors: ")
    assert "trainer.epochs" in message and "trainer.batch_size" in message
    assert "generation.max_new_token: unknown key (did you mean 'max_new_tokens'?)" in message


def test_two_output_features_are_refused_plainly() -> None:
    message = config_error(with_changes(output_features=[{"name": "a"}, {"name": "b"}]))
    assert "only a single output feature is supported, got 2" in message


def test_template_naming_a_missing_column_is_a_config_error() -> None:
    message = config_error(with_changes(prompt={"template": "Q: {question} C: {context}"}))
    assert "prompt.template: placeholder {context} is not an input feature (input features: question)" in message


def test_template_must_not_leak_the_output_column() -> None:
    raw = {"input_features": [{"name": "q"}, {"name": "a"}], "output_features": [{"name": "a"}]}
    assert "must not appear in the prompt" in config_error({**raw, "prompt": {"template": "{q} {a}"}})


def test_split_fractions_must_sum_to_one() -> None:
    assert "preprocessing.split" in config_error(with_changes(preprocessing={"split": [0.5, 0.2, 0.2]}))


def test_not_a_mapping() -> None:
    assert "must be a mapping" in config_error(["a", "b"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    assert "config file not found" in config_error(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: [unclosed\n")
    assert "not valid YAML" in config_error(broken)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(with_changes(adapter={"type": "lora", "r": 4}, trainer={"epochs": 1}))
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["adapter"]["alpha"] == 16  # defaults are written out, not left implicit
    assert load_config(tmp_path / "config.yaml") == config
    assert config_to_dict(load_config(saved)) == saved


def test_shipped_example_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[1] / "examples"
    # examples/accelerate/ holds `accelerate launch` configs, not tunewright ones (tests/test_fsdp.py reads them)
    examples = sorted(path for path in root.glob("**/*.yaml") if path.parent.name != "accelerate")
    assert examples
    for path in examples:
        load_config(path)


@pytest.mark.parametrize(("template", "fragment"), [
    ("say {question:{x}}", "prompt.template: placeholder {question:{x}} nests a field in a format spec"),
    ("{question:>99999999}", "prompt.template: placeholder {question:>99999999} has a format spec"),
    ("{question!r}", "prompt.template: placeholder {question!r} has a format spec or conversion"),
])
def test_templates_are_checked_fully_when_validated(template: str, fragment: str) -> None:
    assert fragment in config_error(with_changes(prompt={"template": template}))


def test_every_template_problem_is_reported() -> None:
    raw = {"input_features": [{"name": "q"}, {"name": "a"}], "output_features": [{"name": "a"}]}
    message = config_error({**raw, "prompt": {"template": "{q} {x} {a}"}})
    assert message.startswith("config: 2 errors: ")
    assert "placeholder {x} is not an input feature" in message and "must not appear in the prompt" in message
