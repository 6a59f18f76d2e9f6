"""Data: read tables, render prompts, tokenize once into input_ids + labels, and collate batches."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from tunewright.config import PreprocessingConfig, TunewrightConfig
from tunewright.errors import DataError
from tunewright.prompt import render_prompt, template_fields

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt and padding positions)
SPLIT_NAMES = {"train": 0, "training": 0, "validation": 1, "valid": 1, "val": 1, "test": 2}
READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


@dataclass
class Example:
    """One tokenized training sample; `labels` is −100 over the prompt."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    label_index: int | None = None  # category outputs: index into the label vocabulary


@dataclass
class Splits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame


def _first_bad_utf8_line(path: Path) -> int:
    """1-based number of the first line that is not valid UTF-8 (0 if none is)."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return line_number
    return 0


def _unique_keys(path: Path, line_number: int) -> Any:
    """A json object_pairs_hook that refuses duplicate keys (json.loads would keep the last silently)."""

    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for key, value in pairs:
            if key in row:
                raise DataError(f"{path}:{line_number}: key '{key}' appears more than once; keep one")
            row[key] = value
        return row

    return build


def _check_csv_header(path: Path, separator: str) -> None:
    """Duplicate column names: pandas would silently rename the second 'x' to 'x.1'."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle, delimiter=separator), [])
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}:1: column '{name}' appears more than once in the header; rename one")
        seen.add(name)


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_number}: not valid UTF-8; re-encode the file as UTF-8") from None
            if not text:
                continue
            try:
                row = json.loads(text, object_pairs_hook=_unique_keys(path, line_number))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: malformed JSON line ({error.msg}); fix or remove it") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: each JSONL line must be an object of column values")
            rows.append(row)
    return pd.DataFrame(rows)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV, TSV, JSON, JSONL or Parquet file into a DataFrame of strings and numbers.

    Raises:
        DataError: the file is missing, of an unknown type, unreadable or has no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown dataset type '{path.suffix}'; use one of {', '.join(READERS)}")
    try:
        if kind == "jsonl":
            frame = _read_jsonl(path)
        elif kind in ("csv", "tsv"):
            separator = "," if kind == "csv" else "\t"
            _check_csv_header(path, separator)
            # utf-8-sig: a byte-order mark (Excel writes one) would otherwise stick to the first column name.
            frame = pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, na_values=[""],
                                encoding="utf-8-sig")
        elif kind == "json":
            frame = pd.read_json(path)
        else:
            frame = pd.read_parquet(path)
    except DataError:
        raise
    except UnicodeDecodeError:
        line = _first_bad_utf8_line(path)
        where = f"{path}:{line}" if line else str(path)
        raise DataError(f"{where}: not valid UTF-8; re-encode the file as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; it needs a header and at least one row") from None
    except (ValueError, OSError, pd.errors.ParserError) as error:
        first_line = str(error).splitlines()[0]
        raise DataError(f"{path}: could not read the {kind.upper()} file ({first_line})") from None
    if len(frame) == 0:
        raise DataError(f"{path}: no data rows (only a header or nothing); add rows")
    duplicated = frame.columns[frame.columns.duplicated()]
    if len(duplicated):
        raise DataError(f"{path}: column '{duplicated[0]}' appears more than once; rename one")
    return frame


def check_columns(frame: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    """Every needed column exists and is not entirely empty; the message lists the columns found."""
    for column in columns:
        if column not in frame.columns:
            found = ", ".join(map(str, frame.columns))
            raise DataError(f"{source}: column '{column}' not found (columns: {found}); fix the config or the data")
        if frame[column].isna().all():
            raise DataError(f"{source}: column '{column}' has no values (every cell is empty)")


def drop_null_rows(frame: pd.DataFrame, columns: Sequence[str], source: str) -> pd.DataFrame:
    """Rows with an empty needed cell are dropped, counted and reported, never silently."""
    null_rows = frame[list(columns)].isna().any(axis=1)
    if null_rows.any():
        first = [str(position + 1) for position in null_rows.to_numpy().nonzero()[0][:5]]
        log.warning("%s: dropped %d row(s) with empty cells in %s (data rows %s%s)", source, int(null_rows.sum()),
                    ", ".join(columns), ", ".join(first), ", ..." if null_rows.sum() > len(first) else "")
        frame = frame[~null_rows].reset_index(drop=True)
    if len(frame) == 0:
        raise DataError(f"{source}: no rows left after dropping rows with empty cells in {', '.join(columns)}")
    return frame


def split_frame(frame: pd.DataFrame, preprocessing: PreprocessingConfig, seed: int) -> Splits:
    """Split by the split column when configured, else at random by the configured fractions."""
    if preprocessing.split_column:
        column = preprocessing.split_column
        check_columns(frame, [column], "dataset")
        codes = frame[column].map(lambda value: SPLIT_NAMES.get(str(value).strip().lower(), value))
        codes = pd.to_numeric(codes, errors="coerce")
        if codes.isna().any() or not codes.isin([0, 1, 2]).all():
            raise DataError(f"dataset: column '{column}' must hold train/validation/test (or 0/1/2) in every row")
        parts = [frame[codes == code].reset_index(drop=True) for code in (0, 1, 2)]
        return Splits(*parts)
    shuffled = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    n_train = round(len(shuffled) * preprocessing.split[0])
    n_validation = round(len(shuffled) * preprocessing.split[1])
    return Splits(
        shuffled.iloc[:n_train].reset_index(drop=True),
        shuffled.iloc[n_train : n_train + n_validation].reset_index(drop=True),
        shuffled.iloc[n_train + n_validation :].reset_index(drop=True),
    )


def render_prompts(frame: pd.DataFrame, config: TunewrightConfig) -> list[str]:
    template = config.prompt_template
    check_columns(frame, template_fields(template), "dataset")
    return [render_prompt(template, row, config.prompt.task) for row in frame.to_dict("records")]


def encode_prompts(
    prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase, use_chat_template: bool = False
) -> list[list[int]]:
    """Token ids of each prompt, as a user turn of the chat template when asked."""
    if not use_chat_template:
        return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    if tokenizer.chat_template is None:
        raise DataError("prompt.use_chat_template: this tokenizer has no chat template; set it to false")
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def fit_prompts(
    prompt_ids: Sequence[list[int]], max_input_len: int, overlong: str = "truncate"
) -> tuple[list[list[int]], list[int]]:
    """Apply the length rule: returns the kept prompts and their row indices.

    Overlong prompts are truncated from the left (the end holds the question), dropped, or
    refused, as `preprocessing.overlong_prompts` says; they are always counted in a warning.
    """
    overlong_rows = [row for row, ids in enumerate(prompt_ids) if len(ids) > max_input_len]
    if overlong_rows and overlong == "error":
        raise DataError(
            f"dataset: {len(overlong_rows)} prompt(s) exceed the maximum input length of {max_input_len} tokens "
            f"(first: row {overlong_rows[0]}); shorten them or set preprocessing.overlong_prompts to truncate or drop"
        )
    if overlong_rows:
        action = "dropped" if overlong == "drop" else "truncated, keeping the end"
        log.warning(
            "%d of %d prompt(s) exceed the maximum input length of %d tokens and were %s",
            len(overlong_rows), len(prompt_ids), max_input_len, action,
        )
    if overlong == "drop":
        kept = [row for row, ids in enumerate(prompt_ids) if len(ids) <= max_input_len]
        return [list(prompt_ids[row]) for row in kept], kept
    return [list(ids[-max_input_len:]) for ids in prompt_ids], list(range(len(prompt_ids)))


def build_examples(
    prompt_ids: Sequence[list[int]],
    targets: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_target_len: int | None = None,
    label_indices: Sequence[int] | None = None,
) -> list[Example]:
    """Merge each prompt with its target + EOS; the labels are −100 over the prompt."""
    target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    examples = []
    for index, (prompt, target) in enumerate(zip(prompt_ids, target_ids, strict=True)):
        if max_target_len is not None:
            target = target[:max_target_len]
        target = [*target, end_id]
        examples.append(
            Example(
                input_ids=[*prompt, *target],
                labels=[IGNORE_INDEX] * len(prompt) + target,
                prompt_len=len(prompt),
                label_index=None if label_indices is None else label_indices[index],
            )
        )
    return examples


def collate_training(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a training batch; padded labels are −100 and masked out of attention."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if examples[0].label_index is not None:
        batch["label_index"] = torch.tensor([example.label_index for example in examples], dtype=torch.long)  # (B,)
    return batch


def collate_prompts(prompt_ids: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for generation, so every row's next token goes in the same column."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(prompt_ids):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


Dataset = str | Path | pd.DataFrame | list[dict[str, Any]]


def as_frame(dataset: Dataset, name: str = "dataset") -> tuple[pd.DataFrame, str]:
    """A DataFrame and a name for messages, from a file path, a DataFrame or a list of row dicts."""
    if isinstance(dataset, pd.DataFrame):
        frame, source = dataset, name
    elif isinstance(dataset, list):
        frame, source = pd.DataFrame(dataset), name
    else:
        return read_table(dataset), str(dataset)
    if len(frame) == 0:
        raise DataError(f"{source}: no data rows")
    return frame, source


def write_table(frame: pd.DataFrame, path: str | Path) -> None:
    """Write predictions as CSV, JSONL or Parquet, chosen by the file extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        raise DataError(f"{path}: unknown output type '{suffix}'; use .csv, .jsonl or .parquet")
