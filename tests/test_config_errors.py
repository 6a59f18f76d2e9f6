"""Config errors that help: settings that would do nothing are refused, names from other tools are
translated, YAML problems keep their line and column, and bad values are repeated as written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunewright.cli import app
from tunewright.config import load_config
from tunewright.errors import ConfigError

MINIMAL = {"input_features": [{"name": "question"}], "output_features": [{"name": "answer"}]}
YAML_MINIMAL = "input_features:\n  - name: question\noutput_features:\n  - name: answer\n"


def config_error(raw: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(raw)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message
    return message


def yaml_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return config_error(path)


# Settings that do nothing are refused.

@pytest.mark.parametrize(("key", "value"), [("temperature", 0.7), ("top_p", 0.9), ("top_k", 5)])
def test_sampling_settings_without_do_sample_are_refused(key: str, value: float) -> None:
    message = config_error({**MINIMAL, "generation": {key: value}})
    assert f"generation.{key}: takes effect only when sampling; set generation.do_sample: true" in message
    load_config({**MINIMAL, "generation": {key: value, "do_sample": True}})


def test_a_temperature_too_small_to_sample_with_is_refused() -> None:
    message = config_error({**MINIMAL, "generation": {"do_sample": True, "temperature": 1e-45}})
    assert "generation.temperature:" in message and "0.01" in message


def test_every_sampling_setting_is_named_at_once() -> None:
    message = config_error({**MINIMAL, "generation": {"temperature": 0.7, "top_p": 0.9, "top_k": 5}})
    assert message.startswith("config: 3 errors: ")
    assert all(f"generation.{key}:" in message for key in ("temperature", "top_p", "top_k"))


@pytest.mark.parametrize(("key", "value"), [("labels", ["a", "b"]), ("decoder", "classifier"),
                                            ("score_normalization", "mean")])
def test_category_keys_on_a_text_output_are_refused(key: str, value: object) -> None:
    message = config_error({**MINIMAL, "output_features": [{"name": "answer", "type": "text", key: value}]})
    assert f"output_features[0].{key}: applies to type: category only" in message


def test_score_normalization_with_the_classifier_head_is_refused() -> None:
    output = {"name": "answer", "type": "category", "decoder": "classifier", "score_normalization": "mean"}
    message = config_error({**MINIMAL, "output_features": [output]})
    assert "output_features[0].score_normalization: applies to decoder: label_scoring only" in message


@pytest.mark.parametrize(("section", "keys", "fragment"), [
    ("trainer", {"regularization_lambda": 0.5}, "trainer.regularization_lambda: takes effect only with "
                                                "trainer.regularization"),
    ("trainer", {"max_skipped_steps": 3}, "trainer.max_skipped_steps: takes effect only with "
                                          "trainer.on_nonfinite: skip_batch"),
    ("trainer", {"group_by_length": True}, "trainer.group_by_length: takes effect only without packing"),
    ("preprocessing", {"split_column": "s", "split": [0.5, 0.5, 0.0]}, "preprocessing.split: is not used when "
                                                                       "preprocessing.split_column"),
])
def test_settings_other_settings_make_idle_are_refused(section: str, keys: dict, fragment: str) -> None:
    assert fragment in config_error({**MINIMAL, section: keys})


def test_resolved_configs_with_every_key_still_load() -> None:
    """Keys at their defaults are fine: saved run configs hold every key."""
    raw = {**MINIMAL, "generation": {"do_sample": False, "temperature": None, "top_k": None, "top_p": None},
           "output_features": [{"name": "answer", "type": "text", "labels": None, "decoder": "label_scoring",
                                "score_normalization": "sum"}]}
    load_config(raw)


def test_duplicated_key_names_both_lines(tmp_path: Path) -> None:
    text = YAML_MINIMAL + "trainer:\n  epochs: 2\n  batch_size: 4\n  epochs: 5\n"
    assert "trainer.epochs: key appears twice (lines 6 and 8); keep one" in yaml_error(tmp_path, text)


def test_duplicated_keys_are_reported_with_the_other_errors(tmp_path: Path) -> None:
    text = YAML_MINIMAL + "base_model: a\nbase_model: b\ntrainer:\n  epochs: 0\n"
    message = yaml_error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'config.yaml'}: 2 errors: ")
    assert "base_model: key appears twice (lines 5 and 6)" in message and "trainer.epochs:" in message


def test_merge_keys_may_override_and_aliases_are_walked_once(tmp_path: Path) -> None:
    text = YAML_MINIMAL + "trainer: &t\n  <<: {epochs: 2}\n  epochs: 3\ngeneration:\n  max_new_tokens: 4\n"
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_config(path).trainer.epochs == 3
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
    )
    assert "unknown key" in yaml_error(tmp_path, YAML_MINIMAL + bomb)


def test_yaml_tags_are_still_refused(tmp_path: Path) -> None:
    message = yaml_error(tmp_path, YAML_MINIMAL + "base_model: !!python/object/apply:os.system ['true']\n")
    assert "line 5, column 13: not valid YAML: could not determine a constructor" in message
    assert "YAML tags are not allowed" in message


# The did-you-mean is right, or absent; names from other tools are translated.

@pytest.mark.parametrize(("section", "key", "hint"), [
    ("trainer", "per_device_train_batch_size", "per_device_train_batch_size is called trainer.batch_size here"),
    ("adapter", "lora_dropout", "lora_dropout is called adapter.dropout here"),
    ("trainer", "num_train_epochs", "num_train_epochs is called trainer.epochs here"),
    ("trainer", "bf16", "write trainer.precision: bf16"),
    ("trainer", "fp16", "write trainer.precision: auto, fp32 or bf16"),
    ("trainer", "lr", "lr is called trainer.learning_rate here"),
    ("adapter", "lora_r", "lora_r is called adapter.r here"),
    ("adapter", "rank", "rank is called adapter.r here"),
    ("adapter", "lora_alpha", "lora_alpha is called adapter.alpha here"),
    ("trainer", "max_seq_length", "prompt and target are capped apart here: preprocessing.max_input_length"),
    ("trainer", "Learning-Rate", "did you mean 'learning_rate'?"),
    ("trainer", "temperature", "it belongs under generation"),
    ("trainer", "base_model", "it is a top-level key"),
])
def test_names_from_other_tools_get_our_name(section: str, key: str, hint: str) -> None:
    message = config_error({**MINIMAL, section: {key: 1}})
    assert f"{section}.{key}: unknown key ({hint}" in message


def test_unknown_keys_never_list_a_whole_large_section() -> None:
    message = config_error({**MINIMAL, "trainer": {"zzzzzz": 1}})
    assert message == "config: trainer.zzzzzz: unknown key"
    assert "known keys: name, type" in config_error({**MINIMAL, "input_features": [{"zzzzzz": 1}]})


def test_a_top_level_key_that_belongs_in_two_sections_names_both() -> None:
    assert "batch_size: unknown key (it belongs under trainer or generation)" in config_error(
        {**MINIMAL, "batch_size": 8}
    )


# YAML syntax, quoting, bad values, empty files.

def test_yaml_syntax_errors_keep_line_and_column(tmp_path: Path) -> None:
    message = yaml_error(tmp_path, YAML_MINIMAL + "trainer: {epochs: 2\n")
    assert "line 6, column 1: not valid YAML: expected ',' or '}'" in message
    assert "at line 5, column 10" in message  # where the unclosed mapping started


def test_tabs_get_a_hint(tmp_path: Path) -> None:
    assert "indent with spaces, not tabs" in yaml_error(tmp_path, "trainer:\n\tepochs: 2\n")


@pytest.mark.parametrize(("written", "quoted"), [("[yes, no]", '["yes", "no"]'), ("[0, 1]", '["0", "1"]'),
                                                 ("[On, 'off']", '["On", "off"]')])
def test_labels_read_as_booleans_or_numbers_suggest_quoting(tmp_path: Path, written: str, quoted: str) -> None:
    text = f"input_features:\n  - name: q\noutput_features:\n  - name: a\n    type: category\n    labels: {written}\n"
    message = yaml_error(tmp_path, text)
    assert message.endswith(f"output_features[0].labels: labels must be strings; quote them: {quoted}")


def test_a_column_name_read_as_a_boolean_suggests_quoting(tmp_path: Path) -> None:
    message = yaml_error(tmp_path, "input_features:\n  - name: no\noutput_features:\n  - name: a\n")
    assert message.endswith('input_features[0].name: must be a string; quote it: "no"')


def test_type_errors_repeat_the_bad_value() -> None:
    message = config_error({**MINIMAL, "trainer": {"batch_size": "eight", "epochs": 0},
                            "adapter": {"type": "loraa"}})
    assert "trainer.batch_size: Input should be a valid integer, unable to parse string as an integer " \
           "(got 'eight')" in message
    assert "trainer.epochs: Input should be greater than or equal to 1 (got 0)" in message
    assert "(got 'loraa')" in message


def test_a_long_bad_value_is_cut_and_stays_on_one_line() -> None:
    message = config_error({**MINIMAL, "trainer": {"batch_size": "x\n" * 500}})
    assert "(got 'x\\nx\\n" in message and len(message) < 300


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_config_file_says_it_is_empty(tmp_path: Path, text: str) -> None:
    assert yaml_error(tmp_path, text).endswith(
        "config.yaml: the file is empty; a config needs at least input_features and output_features"
    )


def test_a_file_that_is_not_utf8_says_so(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"base_model: caf\xe9\n")
    assert "not UTF-8 text (byte 0xe9 at offset 15); save it as UTF-8" in config_error(path)


def test_control_characters_are_named_with_their_position(tmp_path: Path) -> None:
    message = yaml_error(tmp_path, "base_model: a\x07b\n")
    assert message.endswith("config.yaml: character 14: not valid YAML: special characters are not allowed "
                            "(#x0007); remove it or save the file as UTF-8 text")
    assert "character 1: not valid YAML" in yaml_error(tmp_path, "\x00")


def test_validate_prints_every_problem_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(YAML_MINIMAL + "generation:\n  temperature: 0.7\n  temperature: 0.9\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == ConfigError.exit_code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: 2 errors: ")
    assert "generation.temperature: key appears twice (lines 6 and 7)" in lines[0]
    assert "generation.temperature: takes effect only when sampling" in lines[0]


def test_a_date_read_by_yaml_suggests_quoting(tmp_path: Path) -> None:
    assert yaml_error(tmp_path, YAML_MINIMAL + "base_model: 2024-01-01\n").endswith(
        'base_model: must be a string; quote it: "2024-01-01"'
    )
