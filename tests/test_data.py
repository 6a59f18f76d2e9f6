from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from tunewright.config import PreprocessingConfig, load_config
from tunewright.data import (
    IGNORE_INDEX,
    build_examples,
    collate_prompts,
    collate_training,
    encode_prompts,
    fit_prompts,
    read_table,
    render_prompts,
    split_frame,
)
from tunewright.errors import DataError

# Byte-level test tokenizer: 'h'=74 'i'=75 ':'=28 'y'=91 'o'=81 'a'..'d'=67..70, EOS=2, pad=0.
H, I, COLON, Y, O, EOS, PAD = 74, 75, 28, 91, 81, 2, 0  # noqa: E741 (letters are the tokens)


def test_labels_mask_the_prompt_and_end_with_eos(tokenizer) -> None:
    prompt_ids = encode_prompts(["hi:"], tokenizer)
    assert prompt_ids == [[H, I, COLON]]
    [example] = build_examples(prompt_ids, ["yo"], tokenizer)
    assert example.input_ids == [H, I, COLON, Y, O, EOS]
    assert example.labels == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, Y, O, EOS]
    assert example.prompt_len == 3


def test_target_truncation_keeps_eos(tokenizer) -> None:
    [example] = build_examples([[H]], ["yoyo"], tokenizer, max_target_len=1)
    assert example.input_ids == [H, Y, EOS]
    assert example.labels == [IGNORE_INDEX, Y, EOS]


def test_collate_training_right_pads_with_masked_labels(tokenizer) -> None:
    examples = build_examples([[H, I, COLON], [H]], ["yo", "y"], tokenizer)
    batch = collate_training(examples, PAD)
    m = IGNORE_INDEX
    assert torch.equal(batch["input_ids"], torch.tensor([[H, I, COLON, Y, O, EOS], [H, Y, EOS, PAD, PAD, PAD]]))
    assert torch.equal(batch["labels"], torch.tensor([[m, m, m, Y, O, EOS], [m, Y, EOS, m, m, m]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]))


def test_collate_prompts_left_pads() -> None:
    batch = collate_prompts([[H, I, COLON], [Y]], PAD)
    assert torch.equal(batch["input_ids"], torch.tensor([[H, I, COLON], [PAD, PAD, Y]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [0, 0, 1]]))


def test_chat_template_wraps_the_prompt(tokenizer) -> None:
    [ids] = encode_prompts(["hi"], tokenizer, use_chat_template=True)
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_overlong_prompts_truncate_from_the_left_with_a_warning(caplog) -> None:
    kept, rows = fit_prompts([[1, 2, 3, 4, 5], [6, 7]], max_input_len=3)
    assert kept == [[3, 4, 5], [6, 7]] and rows == [0, 1]
    assert "1 of 2 prompt(s) exceed the maximum input length of 3 tokens" in caplog.text


def test_overlong_prompts_can_be_dropped_or_refused() -> None:
    kept, rows = fit_prompts([[1, 2, 3, 4, 5], [6, 7]], max_input_len=3, overlong="drop")
    assert kept == [[6, 7]] and rows == [1]
    with pytest.raises(DataError, match="1 prompt\\(s\\) exceed the maximum input length of 3 tokens"):
        fit_prompts([[1, 2, 3, 4, 5]], max_input_len=3, overlong="error")


def test_render_prompts_names_a_missing_column() -> None:
    config = load_config({"input_features": [{"name": "q"}], "output_features": [{"name": "a"}],
                          "prompt": {"template": "Q: {q}"}})
    assert render_prompts(pd.DataFrame({"q": ["x"], "a": ["y"]}), config) == ["Q: x"]
    with pytest.raises(DataError, match="column 'q' not found \\(columns: text, a\\)"):
        render_prompts(pd.DataFrame({"text": ["x"], "a": ["y"]}), config)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", ".json"])
def test_read_table_formats(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame({"q": ["a, b", "c"], "a": ["1", "2"]})
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(row) for row in frame.to_dict("records")) + "\n")
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records")
    read = read_table(path)
    assert read["q"].tolist() == ["a, b", "c"]
    assert [str(value) for value in read["a"]] == ["1", "2"]


def test_read_table_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset file not found"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown dataset type '.xlsx'"):
        read_table(tmp_path / "data.xlsx")
    (tmp_path / "header.csv").write_text("q,a\n")
    with pytest.raises(DataError, match="no data rows"):
        read_table(tmp_path / "header.csv")


def test_split_by_fractions_is_seeded_and_complete() -> None:
    frame = pd.DataFrame({"x": range(100)})
    splits = split_frame(frame, PreprocessingConfig(split=(0.8, 0.1, 0.1)), seed=3)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (80, 10, 10)
    all_rows = sorted([*splits.train["x"], *splits.validation["x"], *splits.test["x"]])
    assert all_rows == list(range(100))
    again = split_frame(frame, PreprocessingConfig(split=(0.8, 0.1, 0.1)), seed=3)
    assert splits.train["x"].tolist() == again.train["x"].tolist()


def test_split_by_column() -> None:
    frame = pd.DataFrame({"x": range(4), "split": ["train", "validation", "test", "train"]})
    splits = split_frame(frame, PreprocessingConfig(split_column="split"), seed=0)
    assert splits.train["x"].tolist() == [0, 3]
    assert splits.validation["x"].tolist() == [1] and splits.test["x"].tolist() == [2]
    frame.loc[0, "split"] = "holdout"
    with pytest.raises(DataError, match="column 'split' must hold train/validation/test"):
        split_frame(frame, PreprocessingConfig(split_column="split"), seed=0)
