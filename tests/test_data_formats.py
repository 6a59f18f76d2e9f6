"""Data never changes silently: every reader keeps cells as written, and empty cells mean one thing.

Issue 25, items 1-3: no date, number or bool coercion in any reader; an empty optional input is an
empty string in every format and only a missing target drops a row, the same way in every command;
JSON Lines saved as `.json` is read as JSON Lines; a `datasets.Dataset` is taken wherever a dataset is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from conftest import copy_rows

import tunewright
from tunewright.config import load_config
from tunewright.data import as_frame, drop_missing_targets, read_table, render_prompts, write_table
from tunewright.errors import DataError

TRICKY = ["007", "1e5", "NA", "None", "true", "8 February 2008", "null", "nan", "1,5", " padded "]


@pytest.mark.parametrize("separator", [",", "\t"])
def test_csv_and_tsv_cells_stay_exactly_as_written(tmp_path: Path, separator: str) -> None:
    path = tmp_path / ("data.csv" if separator == "," else "data.tsv")
    pd.DataFrame({"q": TRICKY, "a": ["x"] * len(TRICKY)}).to_csv(path, sep=separator, index=False)
    assert read_table(path)["q"].tolist() == TRICKY


def test_json_dates_numbers_and_bools_are_not_converted(tmp_path: Path) -> None:
    path = tmp_path / "dates.json"
    # pandas' read_json turned a `date` column's "8 February 2008" into 2008-02-08 (the answer).
    path.write_text('[{"date": "8 February 2008", "a": "2008-02-08", "n": 1e5, "f": 1.50, "b": true, "i": 7},\n'
                    ' {"date": "1999-05-03", "a": "0.5", "n": 12, "f": 2, "b": false, "i": null}]\n')
    frame = read_table(path)
    assert frame["date"].tolist() == ["8 February 2008", "1999-05-03"]
    assert frame["a"].tolist() == ["2008-02-08", "0.5"]
    assert frame["n"].tolist() == ["1e5", "12"]
    assert frame["f"].tolist() == ["1.50", "2"]
    assert frame["b"].tolist() == ["true", "false"]
    assert frame["i"].tolist()[0] == "7" and pd.isna(frame["i"].tolist()[1])


def test_json_columns_layout_and_nested_values_stay_text(tmp_path: Path) -> None:
    path = tmp_path / "columns.json"
    path.write_text('{"q": {"0": "8 February 2008", "1": "x"}, "a": {"0": 1e5, "1": [1.0, true, {"k": null}]}}')
    frame = read_table(path)
    assert frame["q"].tolist() == ["8 February 2008", "x"]
    assert frame["a"].tolist() == ["1e5", '[1.0, true, {"k": null}]']


def test_jsonl_numbers_and_bools_keep_their_text(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"q": 1e5, "a": true}\n{"q": "007", "a": 0.10}\n')
    frame = read_table(path)
    assert frame["q"].tolist() == ["1e5", "007"] and frame["a"].tolist() == ["true", "0.10"]


def test_parquet_keeps_its_types_and_integers_with_nulls_stay_integers(tmp_path: Path) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "data.parquet"  # written by another tool: no pandas metadata to restore Int64
    parquet.write_table(pyarrow.table({"q": ["007", None, "x"], "n": [7, None, 9], "f": [0.5, 1.0, None]}), path)
    frame = read_table(path)
    assert frame["q"].tolist()[0] == "007" and pd.isna(frame["q"].tolist()[1])
    n = frame["n"].tolist()
    assert (str(n[0]), str(n[2])) == ("7", "9") and pd.isna(n[1])  # not 7.0 and 9.0
    assert frame["f"].tolist()[:2] == [0.5, 1.0]


def write_format(frame: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif path.suffix == ".json":
        frame.to_json(path, orient="records")
    else:
        frame.to_parquet(path)


SUFFIXES = [".csv", ".tsv", ".json", ".jsonl", ".parquet"]
CONFIG = {"input_features": [{"name": "word"}, {"name": "input"}], "output_features": [{"name": "echo"}],
          "prompt": {"template": "say {word}|{input}:"}}


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_an_empty_input_is_an_empty_string_and_only_a_missing_target_drops(
    tmp_path: Path, suffix: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An Alpaca-style optional `input`: empty in rows 0 and 2; the target is empty in row 3.
    rows = pd.DataFrame({"word": ["cat", "dog", "sun", "sea"], "input": ["", "x", "", "y"],
                         "echo": ["cat", "dog", "sun", ""]})
    path = tmp_path / f"data{suffix}"
    write_format(rows, path)
    frame = read_table(path)
    config = load_config(CONFIG)
    assert render_prompts(frame, config) == ["say cat|:", "say dog|x:", "say sun|:", "say sea|y:"]
    with caplog.at_level(logging.WARNING):
        kept = drop_missing_targets(frame, "echo", str(path))
    assert kept["word"].tolist() == ["cat", "dog", "sun"]
    assert "dropped 1 row(s) whose target 'echo' is empty (data rows 4)" in caplog.text


def test_missing_cells_in_a_dataframe_render_as_empty_strings() -> None:
    frame = pd.DataFrame({"word": ["cat", "dog"], "input": [None, float("nan")], "echo": ["cat", None]})
    assert render_prompts(frame, load_config(CONFIG)) == ["say cat|:", "say dog|:"]
    assert drop_missing_targets(frame, "echo", "rows")["word"].tolist() == ["cat"]


def test_a_target_column_with_no_values_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("word,echo\ncat,\ndog,\n")
    with pytest.raises(DataError, match="data.csv: column 'echo' has no values"):
        drop_missing_targets(read_table(path), "echo", str(path))


def test_train_evaluate_and_predict_keep_the_same_rows(tmp_path: Path, tiny_config: dict) -> None:
    rows = copy_rows(24)
    rows.insert(1, "input", ["", "a"] * 12)
    rows.loc[5, "echo"] = ""
    data = tmp_path / "alpaca.csv"
    rows.to_csv(data, index=False)
    config = {**tiny_config, "input_features": [{"name": "word"}, {"name": "input"}],
              "prompt": {"template": "say {word}{input}:"},
              "trainer": {"max_steps": 1, "batch_size": 4, "checkpoint_steps": None},
              "preprocessing": {"split": [1.0, 0.0, 0.0]}}
    result = tunewright.train(config, data, tmp_path / "run", show_progress=False)
    tunewright.evaluate(result.model, data, predictions_output=tmp_path / "evaluated.csv")
    evaluated = read_table(tmp_path / "evaluated.csv")
    predicted = tunewright.predict(result.model, data)
    assert len(evaluated) == 23 and len(predicted) == 24  # only the row without a target is left out
    assert evaluated["input"].tolist()[:2] == ["", "a"]


def test_json_lines_saved_as_json_is_read_as_json_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "train.json"
    datasets.Dataset.from_pandas(copy_rows(4)).to_json(path)  # datasets writes JSON Lines by default
    with caplog.at_level(logging.INFO):
        frame = read_table(path)
    assert frame["word"].tolist() == ["cat", "dog", "sun", "sea"]
    assert "JSON Lines" in caplog.text
    single = tmp_path / "one.json"
    single.write_text('{"word": "cat", "echo": "8 February 2008"}\n')
    assert read_table(single)["echo"].tolist() == ["8 February 2008"]


def test_malformed_json_lines_in_a_json_file_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"word": "a", "echo": "a"}\n{"word": "b", "echo": \n')
    with pytest.raises(DataError, match="broken.json:2: malformed JSON line"):
        read_table(path)


def test_as_frame_takes_a_dataset_a_dataframe_and_a_list_of_dicts() -> None:
    datasets = pytest.importorskip("datasets")
    rows = copy_rows(3)
    for given in (rows, rows.to_dict("records"), datasets.Dataset.from_pandas(rows)):
        frame, source = as_frame(given)
        assert frame["word"].tolist() == ["cat", "dog", "sun"] and source == "dataset"
    with pytest.raises(DataError, match="pass one split, for example dataset\\['train'\\]"):
        as_frame(datasets.DatasetDict({"train": datasets.Dataset.from_pandas(rows)}))
    with pytest.raises(DataError, match="dataset: expected a file path, a pandas DataFrame"):
        as_frame(42)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="dataset: row 2 is not a dict"):
        as_frame([{"word": "cat"}, ["dog"]])  # type: ignore[list-item]


def test_the_python_api_takes_a_datasets_dataset(tmp_path: Path, tiny_config: dict) -> None:
    datasets = pytest.importorskip("datasets")
    config = {**tiny_config, "trainer": {"max_steps": 1, "batch_size": 4, "checkpoint_steps": None}}
    train_rows = datasets.Dataset.from_pandas(copy_rows(16))
    result = tunewright.train(config, train_rows, tmp_path / "run", validation=datasets.Dataset.from_pandas(
        copy_rows(4)), show_progress=False)
    assert len(tunewright.predict(result.model, datasets.Dataset.from_pandas(copy_rows(3)))) == 3
    assert "exact_match" in json.dumps(tunewright.evaluate(result.model, datasets.Dataset.from_pandas(copy_rows(4))))


FORMULA_LIKE = ["=1+1", "+41", "-5", "@SUM(A1)", "=HYPERLINK(\"http://x\")", "\t=x", "plain"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_predictions_are_written_as_they_are_formula_like_cells_included(tmp_path: Path, suffix: str) -> None:
    """No formula escaping: a `-5` prediction stays `-5` (see write_table and docs/reliability.md)."""
    frame = pd.DataFrame({"word": FORMULA_LIKE, "prediction": FORMULA_LIKE})
    path = tmp_path / f"predictions{suffix}"
    write_table(frame, path)
    assert read_table(path)["prediction"].tolist() == FORMULA_LIKE
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_predictions_that_cannot_be_written_are_one_clear_line(tmp_path: Path) -> None:
    frame = pd.DataFrame({"word": ["a"], "prediction": ["b"]})
    (tmp_path / "taken.csv").mkdir()
    with pytest.raises(DataError, match=r"taken.csv: cannot write here \(.+\); choose another path"):
        write_table(frame, tmp_path / "taken.csv")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"out.csv: cannot write here \(.+\); choose another path"):
        write_table(frame, tmp_path / "file" / "out.csv")
    mixed = pd.DataFrame({"word": [1, "two"], "prediction": ["a", "b"]})  # a list of dicts with mixed types
    with pytest.raises(DataError, match=r"out.parquet: cannot write Parquet \(.*column word.*\); give each column"):
        write_table(mixed, tmp_path / "out.parquet")
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["file", "taken.csv"]
