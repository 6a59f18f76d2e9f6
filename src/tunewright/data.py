"""Data: read tables, render prompts, tokenize once into input_ids + labels, and collate batches."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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


def _unique_keys(where: str) -> Any:
    """A json object_pairs_hook that refuses duplicate keys (json.loads would keep the last silently)."""

    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for key, value in pairs:
            if key in row:
                raise DataError(f"{where}: key '{key}' appears more than once; keep one")
            row[key] = value
        return row

    return build


class _JsonNumber(str):
    """A JSON number kept as the text it was written as (`1e5`, `0.10`, `007` never become floats)."""


def _load_json(text: str, where: str) -> Any:
    return json.loads(text, object_pairs_hook=_unique_keys(where), parse_int=_JsonNumber, parse_float=_JsonNumber,
                      parse_constant=_JsonNumber)


def _json_text(value: Any) -> str:
    """A nested JSON value back as JSON text, numbers as written."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(key, ensure_ascii=False)}: {_json_text(item)}"
                               for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_json_text(item) for item in value) + "]"
    if isinstance(value, _JsonNumber):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _json_cell(value: Any) -> Any:
    """A JSON cell as text: numbers as written, true/false as written, nested values as JSON; null stays missing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return _json_text(value)
    return str(value)


def _json_rows(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{key: _json_cell(value) for key, value in row.items()} for row in rows], dtype=object)


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
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8").strip()
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_number}: not valid UTF-8; re-encode the file as UTF-8") from None
            if not text:
                continue
            try:
                row = _load_json(text, f"{path}:{line_number}")
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: malformed JSON line ({error.msg}); fix or remove it") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: each JSONL line must be an object of column values")
            rows.append(row)
    return _json_rows(rows)


def _read_json(path: Path) -> pd.DataFrame:
    """A JSON array of row objects, or an object of columns; JSON Lines in a `.json` file is read as such."""
    text = path.read_bytes().decode("utf-8-sig")
    try:
        data = _load_json(text, str(path))
    except json.JSONDecodeError as error:
        if error.msg != "Extra data":
            raise DataError(f"{path}: could not read the JSON file ({error.msg} at line {error.lineno}, "
                            f"column {error.colno}); fix it") from None
        data = None  # several top-level values: JSON Lines
    values = data.values() if isinstance(data, dict) else []
    if data is None or (isinstance(data, dict) and not any(isinstance(value, (dict, list)) for value in values)):
        # `datasets`' to_json writes JSON Lines by default, whatever the extension says.
        log.info("%s: the file holds JSON Lines (one object per line); read it as JSON Lines", path)
        return _read_jsonl(path)
    if isinstance(data, list):
        for position, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: item {position} of the JSON array is not an object of column values; "
                                "use a list of row objects")
        return _json_rows(data)
    if isinstance(data, dict):
        columns = {}
        for name, cells in data.items():
            if isinstance(cells, dict):
                cells = list(cells.values())
            if not isinstance(cells, list):
                raise DataError(f"{path}: column '{name}' is not a list or an object of cells; use a list of rows")
            columns[name] = [_json_cell(cell) for cell in cells]
        lengths = {len(cells) for cells in columns.values()}
        if len(lengths) > 1:
            raise DataError(f"{path}: the columns have different lengths ({', '.join(map(str, sorted(lengths)))}); "
                            "give every column one cell per row")
        return pd.DataFrame(columns, dtype=object)
    raise DataError(f"{path}: the JSON file must hold a list of row objects (or JSON Lines)")


def _read_parquet(path: Path) -> pd.DataFrame:
    """Parquet's own column types, with no further conversion: integers with nulls stay integers."""
    import pyarrow.parquet as parquet

    return parquet.read_table(path).to_pandas(integer_object_nulls=True)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV, TSV, JSON, JSONL or Parquet file into a DataFrame, every cell as written.

    CSV, TSV, JSON and JSONL cells are text: `007`, `1e5`, `NA`, `true` and dates stay exactly what
    the file says, and an empty CSV/TSV cell is an empty string. JSON `null` is a missing cell.
    Parquet keeps its own column types. A `.json` file holding JSON Lines is read as JSON Lines.

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
            # na_filter off: no cell is read as missing (`NA`, `None`, and an empty cell is "").
            frame = pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, na_filter=False,
                                encoding="utf-8-sig")
        elif kind == "json":
            frame = _read_json(path)
        else:
            frame = _read_parquet(path)
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
    """Every needed column exists; the message lists the columns found.

    Empty cells are not checked here: an empty input is an empty string (see `render_prompts`)
    and only an empty target drops a row (see `drop_missing_targets`).
    """
    for column in columns:
        if column not in frame.columns:
            found = ", ".join(map(str, frame.columns))
            raise DataError(f"{source}: column '{column}' not found (columns: {found}); fix the config or the data")


def _is_missing(value: Any) -> bool:
    """An empty cell: null/NaN in any format, or the empty string (all an empty CSV cell can be)."""
    if value is None:
        return True
    if isinstance(value, str):
        return value == ""
    return bool(pd.api.types.is_scalar(value) and pd.isna(value))


def drop_missing_targets(frame: pd.DataFrame, target: str, source: str) -> pd.DataFrame:
    """Rows whose target cell is empty are dropped, counted and reported, never silently.

    The same in every format and every command that reads targets (train, evaluate); empty
    inputs never drop a row. A target column with no value at all is an error.
    """
    missing = frame[target].map(_is_missing).astype(bool)
    if missing.all():
        raise DataError(f"{source}: column '{target}' has no values (every cell is empty); fill in the targets")
    if missing.any():
        first = [str(position + 1) for position in missing.to_numpy().nonzero()[0][:5]]
        log.warning("%s: dropped %d row(s) whose target '%s' is empty (data rows %s%s)", source, int(missing.sum()),
                    target, ", ".join(first), ", ..." if missing.sum() > len(first) else "")
        frame = frame[~missing].reset_index(drop=True)
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
    fields = template_fields(template)
    check_columns(frame, fields, "dataset")
    # An empty input (null, NaN, or an empty CSV cell) is the empty string in every format, never "nan".
    rows = ({name: "" if _is_missing(row[name]) else row[name] for name in fields} for row in frame.to_dict("records"))
    return [render_prompt(template, row, config.prompt.task) for row in rows]


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


class TableLike(Protocol):
    """Anything with `to_pandas()`: a `datasets.Dataset`, a pyarrow Table."""

    def to_pandas(self) -> Any: ...


Dataset = str | Path | pd.DataFrame | list[dict[str, Any]] | TableLike


def as_frame(dataset: Dataset, name: str = "dataset") -> tuple[pd.DataFrame, str]:
    """A DataFrame and a name for messages, from a file path, a DataFrame, a list of row dicts or a
    `datasets.Dataset` (anything with `to_pandas()`; `datasets` is never imported here).

    Raises:
        DataError: the object is none of these, or has no rows.
    """
    if isinstance(dataset, (str, Path)):
        return read_table(dataset), str(dataset)
    if isinstance(dataset, pd.DataFrame):
        frame = dataset
    elif isinstance(dataset, list):
        for position, row in enumerate(dataset, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{name}: row {position} is not a dict of column values; pass a list of dicts")
        frame = pd.DataFrame(dataset)
    elif callable(getattr(dataset, "to_pandas", None)):
        frame = dataset.to_pandas()
        if not isinstance(frame, pd.DataFrame):  # an iterable Dataset gives batches
            raise DataError(f"{name}: {type(dataset).__name__}.to_pandas() gave no DataFrame; pass a datasets.Dataset")
    elif isinstance(dataset, dict) and all(callable(getattr(part, "to_pandas", None)) for part in dataset.values()):
        splits = ", ".join(map(str, dataset))
        raise DataError(f"{name}: a {type(dataset).__name__} of splits ({splits}); pass one split, for example "
                        "dataset['train']")
    else:
        raise DataError(f"{name}: expected a file path, a pandas DataFrame, a list of row dicts or a datasets.Dataset, "
                        f"got {type(dataset).__name__}")
    if len(frame) == 0:
        raise DataError(f"{name}: no data rows")
    return frame, name


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
