"""Property-based: random and mutated configs either load or raise ConfigError, never anything else."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunewright.config import TunewrightConfig, config_to_dict, load_config
from tunewright.errors import ConfigError

VALID: dict[str, Any] = {
    "base_model": "some/model",
    "input_features": [{"name": "question"}, {"name": "context"}],
    "output_features": [{"name": "answer", "type": "text"}],
    "prompt": {"template": "Q: {question}\nC: {context}\nA:"},
    "adapter": {"type": "lora", "r": 8},
    "trainer": {"epochs": 2, "batch_size": 4, "learning_rate": 1e-4, "checkpoint_steps": 10},
    "generation": {"max_new_tokens": 16},
    "preprocessing": {"split": [0.8, 0.1, 0.1]},
    "backend": {"device": "cpu"},
}
# Every key the schema knows, so mutations also hit real keys with wrong values, not only unknown ones.
RESOLVED = config_to_dict(load_config(VALID))
KNOWN_KEYS = sorted(
    {key for section in RESOLVED.values() if isinstance(section, dict) for key in section} | set(RESOLVED)
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["lora", "text", "category", "{question}", "{", "}", "{0}", "{a.b}", "auto", "cpu", "-1"]
    ),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8), st.integers()), children, max_size=4
        ),
    ),
    max_leaves=12,
)


def check(raw: Any) -> None:
    try:
        config = load_config(raw)
    except ConfigError as error:
        message = str(error)
        assert message and "\n" not in message  # one line, as the CLI prints it
        return
    assert isinstance(config, TunewrightConfig)
    assert load_config(config_to_dict(config)) == config  # what loads, round-trips


def paths_of(tree: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths_of(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += paths_of(value, (*prefix, index))
    return found


@st.composite
def mutated_configs(draw: st.DrawFn) -> Any:
    config = copy.deepcopy(RESOLVED if draw(st.booleans()) else VALID)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = paths_of(config)
        path = draw(st.sampled_from(paths))
        if not path:
            continue
        parent = config
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8)))] = draw(values)
        else:
            parent.append(draw(values))
    return config


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(mutated_configs())
def test_mutated_configs_load_or_raise_config_error(raw: Any) -> None:
    check(raw)


@FUZZ
@given(values)
def test_random_values_load_or_raise_config_error(raw: Any) -> None:
    check(raw)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_config_files_load_or_raise_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    check(path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated_configs())
def test_mutated_configs_as_yaml_files_load_or_raise_config_error(tmp_path: Path, raw: Any) -> None:
    path = tmp_path / "config.yaml"
    try:
        text = yaml.safe_dump(raw)
    except yaml.YAMLError:
        return
    path.write_text(text, encoding="utf-8")
    check(path)


def test_non_finite_numbers_are_config_errors() -> None:
    for key, value in [("learning_rate", float("nan")), ("learning_rate", float("inf"))]:
        raw = copy.deepcopy(VALID)
        raw["trainer"][key] = value
        try:
            load_config(raw)
        except ConfigError as error:
            assert f"trainer.{key}" in str(error)
        else:
            raise AssertionError(f"trainer.{key}={value} was accepted")


yaml_lines = st.lists(
    st.tuples(
        st.sampled_from(["", "  ", "    ", "  - ", "\t"]),
        st.sampled_from([*KNOWN_KEYS[:40], "<<", "-", "name", "labels", "trainer", "generation", "output_features"]),
        st.sampled_from(["", " yes", " no", " 0", " [yes, no]", " [0, 1]", " &a {epochs: 1}", " *a", " *b",
                         " {x: 1, x: 2}", " !!str 3", " !!python/name:os.system", " '{x:{y}}'", " [", " ~"]),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(yaml_lines)
def test_yaml_shaped_files_with_repeats_anchors_and_tags_load_or_raise_config_error(
    tmp_path: Path, lines: list[tuple[str, str, str]]
) -> None:
    """Files built from config-like lines: duplicated keys, aliases, merge keys, YAML booleans, tags."""
    path = tmp_path / "config.yaml"
    path.write_text("".join(f"{indent}{key}:{value}\n" for indent, key, value in lines), encoding="utf-8")
    check(path)
