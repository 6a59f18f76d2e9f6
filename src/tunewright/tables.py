"""Tables in and out: read CSV/TSV/JSON/JSONL/Parquet files (every cell as written), accept the
in-memory forms a dataset can take, and write predictions."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import pandas as pd

from tunewright.errors import DataError
from tunewright.progress import log_phase

log = logging.getLogger(__name__)

READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
# json.loads (and the conversion of nested values to text) stop at Python's recursion limit.
TOO_DEEP = "a JSON value is nested too deeply to read (Python's recursion limit); flatten it or remove it"
LONE_SURROGATE = "a string holds a lone surrogate escape (such as \\ud800), which is not text; fix or remove it"


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
            if _text(key) in row:
                raise DataError(f"{where}: key '{key}' appears more than once; keep one")
            row[key] = value
        return row

    return build


def _text(value: str) -> str:
    """`value`, if it is text: a JSON escape such as `\\ud800` decodes to a lone surrogate, which no
    tokenizer or writer accepts (UnicodeEncodeError, turned into a DataError by the readers)."""
    value.encode("utf-8")
    return value


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
        return _text(_json_text(value))
    return _text(str(value))


def _json_rows(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{key: _json_cell(value) for key, value in row.items()} for row in rows], dtype=object)


def _check_csv_header(path: Path, separator: str) -> None:
    """Duplicate column names: pandas would silently rename the second 'x' to 'x.1'."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        try:
            header = next(csv.reader(handle, delimiter=separator), [])
        except csv.Error as error:  # a field over csv's limit (128 KiB): an unclosed quote, or a giant header
            raise DataError(f"{path}:1: could not read the header ({error}); check the first line's quotes and "
                            "column names") from None
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
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{line_number}: each JSONL line must be an object of column values")
                rows.append({key: _json_cell(value) for key, value in row.items()})
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: malformed JSON line ({error.msg}); fix or remove it") from None
            except RecursionError:
                raise DataError(f"{path}:{line_number}: {TOO_DEEP}") from None
            except UnicodeEncodeError:
                raise DataError(f"{path}:{line_number}: {LONE_SURROGATE}") from None
    return pd.DataFrame(rows, dtype=object)


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
    except RecursionError:
        raise DataError(f"{path}: {TOO_DEEP}") from None
    except UnicodeEncodeError:
        raise DataError(f"{path}: {LONE_SURROGATE}") from None
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


class TableLike(Protocol):
    """Anything with `to_pandas()`: a `datasets.Dataset`, a pyarrow Table."""

    def to_pandas(self) -> Any: ...


Dataset: TypeAlias = str | Path | pd.DataFrame | list[dict[str, Any]] | TableLike


def as_frame(dataset: Dataset, name: str = "dataset") -> tuple[pd.DataFrame, str]:
    """A DataFrame and a name for messages, from a file path, a DataFrame, a list of row dicts or a
    `datasets.Dataset` (anything with `to_pandas()`; `datasets` is never imported here).

    Raises:
        DataError: the object is none of these, or has no rows.
    """
    if isinstance(dataset, (str, Path)):
        started = time.perf_counter()
        frame = read_table(dataset)
        log_phase(f"read {len(frame):,} rows from {dataset}", started)
        return frame, str(dataset)
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
    """Write predictions as CSV, JSONL or Parquet, chosen by the file extension, every cell as it is.

    CSV cells that start with `=`, `+`, `-` or `@` are written unchanged, not escaped against
    spreadsheet formula injection: escaping would change the predictions (a `-5` would read back as
    `'-5`). Open such a file in a spreadsheet through its import dialog with the columns set to
    text, or write .jsonl/.parquet.
    The file is written under a temporary name and renamed, so a failed write leaves no half file.

    Raises:
        DataError: an unknown extension, a path that cannot be written, or (Parquet) a column that
            mixes types.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".parquet"):
        raise DataError(f"{path}: unknown output type '{suffix}'; use .csv, .jsonl or .parquet")
    # Not mkstemp: its file is private (0600), and the predictions file should get the usual permissions.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".csv":
            frame.to_csv(temporary, index=False)
        elif suffix == ".jsonl":
            frame.to_json(temporary, orient="records", lines=True, force_ascii=False)
        else:
            frame.to_parquet(temporary, index=False)
        os.replace(temporary, path)
    except OSError as error:
        raise DataError(f"{path}: cannot write here ({error.strerror or error}); choose another path") from None
    except (TypeError, ValueError) as error:  # pyarrow: a column that mixes types (ArrowInvalid, ArrowTypeError)
        if suffix != ".parquet":
            raise
        detail = " ".join(str(error).split())
        raise DataError(f"{path}: cannot write Parquet ({detail}); give each column one type, or write "
                        ".csv or .jsonl") from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
