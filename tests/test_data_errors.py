"""Bad data through the CLI: each gives exit code 3 and one line naming the file (and line or column).

None of them may print a traceback. Overlong prompts are counted and handled as the config says.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import copy_rows
from typer.testing import CliRunner

from tunewright.cli import app
from tunewright.data import read_table


@pytest.fixture
def config_file(tiny_config: dict, tmp_path: Path) -> Path:
    config = {**tiny_config, "trainer": {"max_steps": 1, "batch_size": 4, "checkpoint_steps": None}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_train(config: Path, data: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["--quiet", "train", "-c", str(config), "-d", str(data), "-o", str(tmp_path / "out"), *extra]
    )
    return result.exit_code, result.output


def assert_data_error(config: Path, data: Path, tmp_path: Path, *expected: str) -> None:
    exit_code, output = run_train(config, data, tmp_path)
    assert exit_code == 3, output
    assert "Traceback" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    flat = lines[0]
    for part in expected:
        assert part in flat, flat


def write_bytes(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


GOOD_CSV = b"word,echo\ncat,cat\ndog,dog\n"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.csv", b"", ["empty.csv: the file is empty"]),
        ("empty.jsonl", b"", ["empty.jsonl: no data rows"]),
        ("blank.jsonl", b"\n\n  \n", ["blank.jsonl: no data rows"]),
        ("header.csv", b"word,echo\n", ["header.csv: no data rows"]),
        ("missing.csv", b"word,other\ncat,x\n", ["column 'echo' not found (columns: word, other)"]),
        ("allnull.csv", b"word,echo\ncat,\ndog,\n", ["allnull.csv: column 'echo' has no values"]),
        ("latin1.csv", b"word,echo\ncat,cat\ncaf\xe9,caf\xe9\n", ["latin1.csv:3: not valid UTF-8"]),
        (
            "latin1.jsonl",
            b'{"word": "a", "echo": "a"}\n{"word": "caf\xe9", "echo": "x"}\n',
            ["latin1.jsonl:2: not valid UTF-8"],
        ),
        (
            "broken.jsonl",
            b'{"word": "a", "echo": "a"}\n\n{"word": "b", "echo": \n',
            ["broken.jsonl:3: malformed JSON line"],
        ),
        (
            "list.jsonl",
            b'{"word": "a", "echo": "a"}\n["b", "b"]\n',
            ["list.jsonl:2: each JSONL line must be an object"],
        ),
        (
            "dupkey.jsonl",
            b'{"word": "a", "echo": "a"}\n{"word": "b", "echo": "b", "word": "c"}\n',
            ["dupkey.jsonl:2: key 'word' appears more than once"],
        ),
        (
            "dupcol.csv",
            b"word,echo,word\ncat,cat,dog\n",
            ["dupcol.csv:1: column 'word' appears more than once"],
        ),
        ("ragged.csv", b"word,echo\ncat,cat\ndog,dog,extra\n", ["ragged.csv", "line 3"]),
        ("data.xlsx", b"PK", ["data.xlsx: unknown dataset type '.xlsx'"]),
        ("bad.parquet", b"not a parquet file", ["bad.parquet: could not read the PARQUET file"]),
        ("bad.json", b"{not json", ["bad.json: could not read the JSON file"]),
    ],
)
def test_bad_dataset_file_is_one_clear_line(
    name: str, content: bytes, expected: list[str], config_file: Path, tmp_path: Path
) -> None:
    assert_data_error(config_file, write_bytes(tmp_path, name, content), tmp_path, *expected)


def test_missing_dataset_file(config_file: Path, tmp_path: Path) -> None:
    assert_data_error(config_file, tmp_path / "nope.csv", tmp_path, "nope.csv: dataset file not found")


def test_bad_validation_file_is_named(config_file: Path, tmp_path: Path) -> None:
    good = write_bytes(tmp_path, "good.csv", GOOD_CSV)
    bad = write_bytes(tmp_path, "val.csv", b"word\ncat\n")
    exit_code, output = run_train(config_file, good, tmp_path, "--validation", str(bad))
    assert exit_code == 3 and "val.csv: column 'echo' not found (columns: word)" in output


def test_null_cells_are_dropped_counted_and_named(config_file: Path, tmp_path: Path) -> None:
    rows = copy_rows(24)
    rows.loc[[2, 5], "echo"] = None
    data = tmp_path / "nulls.csv"
    rows.to_csv(data, index=False)
    exit_code, output = run_train(config_file, data, tmp_path)
    assert exit_code == 0, output
    flat = " ".join(output.split())
    assert "dropped 2 row(s) whose target 'echo' is empty (data rows 3, 6)" in flat


def test_a_byte_order_mark_does_not_hide_the_first_column(config_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "bom.csv"
    data.write_bytes(b"\xef\xbb\xbf" + copy_rows(24).to_csv(index=False).encode())
    exit_code, output = run_train(config_file, data, tmp_path)
    assert exit_code == 0, output


@pytest.mark.parametrize(
    ("mode", "exit_code", "expected"),
    [
        ("error", 3, "dataset: 4 prompt(s) exceed the maximum input length of 243 tokens"),
        ("drop", 0, "4 of 24 prompt(s) exceed the maximum input length of 243 tokens and were dropped"),
        ("truncate", 0, "4 of 24 prompt(s) exceed the maximum input length of 243 tokens and were truncated"),
    ],
)
def test_prompts_longer_than_the_context_are_counted_and_handled_as_configured(
    mode: str, exit_code: int, expected: str, tiny_config: dict, tmp_path: Path
) -> None:
    # Tiny model: 256 positions - 5 new tokens - 8 margin = 243 prompt tokens (one per byte).
    config = {
        **tiny_config,
        "trainer": {"max_steps": 1, "batch_size": 4, "checkpoint_steps": None},
        "preprocessing": {"split": [1.0, 0.0, 0.0], "overlong_prompts": mode},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    rows = copy_rows(24)
    rows.loc[[1, 7, 11, 20], "word"] = "w" * 300
    data = tmp_path / "long.csv"
    rows.to_csv(data, index=False)
    code, output = run_train(config_path, data, tmp_path)
    assert code == exit_code, output
    assert expected in " ".join(output.split())
    assert "Traceback" not in output


def test_numbers_and_mixed_types_in_jsonl_are_read_as_text(config_file: Path, tmp_path: Path) -> None:
    frame = pd.DataFrame({"word": [1, 2.5, "three", True] * 6, "echo": ["a", 1, 2, None] * 6})
    data = tmp_path / "mixed.jsonl"
    frame.to_json(data, orient="records", lines=True)
    exit_code, output = run_train(config_file, data, tmp_path)
    assert exit_code == 0, output


DEEP = 100_000


HOSTILE = [
    (
        "deep.jsonl",
        b'{"word": "a", "echo": "a"}\n{"word": ' + b"[" * DEEP + b"]" * DEEP + b', "echo": "b"}\n',
        ["deep.jsonl:2: a JSON value is nested too deeply to read"],
    ),
    (
        "deeper.jsonl",  # parses, but too deep to turn into text
        b'{"word": "a", "echo": "a"}\n{"word": ' + b"[" * 990 + b"]" * 990 + b', "echo": "b"}\n',
        ["deeper.jsonl:2: a JSON value is nested too deeply to read"],
    ),
    (
        "deep.json",
        b'[{"word": ' + b"[" * DEEP + b"]" * DEEP + b', "echo": "b"}]',
        ["deep.json: a JSON value is nested too deeply to read"],
    ),
    (
        "surrogate.jsonl",  # valid JSON, but "\ud800" is no text: the tokenizer and writers would fail on it
        b'{"word": "a", "echo": "a"}\n{"word": "\\ud800", "echo": "b"}\n',
        ["surrogate.jsonl:2: a string holds a lone surrogate escape"],
    ),
    (
        "surrogate.json",
        b'[{"word": "a", "echo": "a"}, {"word": ["x", "\\udfff"], "echo": "b"}]',
        ["surrogate.json: a string holds a lone surrogate escape"],
    ),
    (
        "wide.csv",
        b"word,echo," + b"x" * (128 * 1024 + 1) + b"\ncat,cat,1\n",
        ["wide.csv:1: could not read the header (field larger than field limit (131072))"],
    ),
    (
        "unclosed.csv",
        b'"word,echo\n' + b"cat,cat\n" * 20_000,
        ["unclosed.csv:1: could not read the header", "quotes"],
    ),
]


@pytest.mark.parametrize(("name", "content", "expected"), [pytest.param(*case, id=case[0]) for case in HOSTILE])
def test_hostile_json_and_csv_are_one_clear_line(
    name: str, content: bytes, expected: list[str], config_file: Path, tmp_path: Path
) -> None:
    assert_data_error(config_file, write_bytes(tmp_path, name, content), tmp_path, *expected)


def test_a_long_csv_cell_is_data_not_an_error(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, "long.csv", b"word,echo\n" + b"y" * (256 * 1024) + b",cat\n")
    assert len(read_table(path)["word"][0]) == 256 * 1024
