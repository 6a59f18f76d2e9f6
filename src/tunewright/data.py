"""Data: check columns and targets, split, render prompts, tokenize once into input_ids + labels, collate.

Reading and writing files (and the in-memory dataset forms) live in tables.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from tunewright.config import PreprocessingConfig, TunewrightConfig
from tunewright.errors import DataError
from tunewright.few_shot import FewShotIndex, build_index
from tunewright.prompt import render_prompt, template_fields, with_task

# The readers and writers live in tables.py; these names stay importable from here too.
from tunewright.tables import Dataset as Dataset
from tunewright.tables import as_frame as as_frame
from tunewright.tables import read_table as read_table
from tunewright.tables import write_table as write_table

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt and padding positions)
SPLIT_NAMES = {"train": 0, "training": 0, "validation": 1, "valid": 1, "val": 1, "test": 2}


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


def render_prompts(frame: pd.DataFrame, config: TunewrightConfig, shots: FewShotIndex | None = None,
                   in_pool: bool = False) -> list[str]:
    """Each row's prompt text: the task line, then (with `shots`) its few-shot examples, then the template.

    `in_pool`: the frame is the training split the few-shot pool was built from, so no row gets itself.
    """
    bodies = prompt_bodies(frame, config)
    if shots is not None:
        bodies = [examples + body for examples, body in zip(shots.demonstrations(bodies, in_pool), bodies,
                                                              strict=True)]
    return [with_task(body, config.prompt.task) for body in bodies]


def few_shot_pool(train: pd.DataFrame, config: TunewrightConfig) -> FewShotIndex | None:
    """The few-shot pool of `prompt.few_shot`: the training split's prompts and answers (None: not configured)."""
    settings = config.prompt.few_shot
    if settings is None:
        return None
    if len(train) <= settings.k:
        raise DataError(f"prompt.few_shot.k: the training split has {len(train)} row(s), too few to draw "
                        f"{settings.k} examples for each row but itself; lower k or add rows")
    feature = config.output_feature
    # Answers read as training reads targets: labels stripped, text as written.
    answers = [str(value).strip() if feature.type == "category" else str(value) for value in train[feature.name]]
    started = time.perf_counter()
    index = build_index(settings, config.trainer.seed, prompt_bodies(train, config), answers)
    log.info("few-shot pool: %d training rows (%s) in %.1fs", len(answers), settings.strategy,
             time.perf_counter() - started)
    return index


# Training inputs that calibration: rows averages the label distribution over: enough for a stable mean,
# few enough to cost seconds at each validation.
CALIBRATION_ROWS = 256


def resolve_calibration(config: TunewrightConfig, train: pd.DataFrame) -> TunewrightConfig:
    """`calibration: auto` made concrete for a run: rows for zero-shot label scoring with training rows (it
    raised zero-shot accuracy on 9 of 10 wordings, BENCHMARKS.md), none otherwise; the saved config records it."""
    feature = config.output_feature
    if feature.type != "category" or feature.decoder != "label_scoring" or feature.calibration != "auto":
        return config  # auto stays: nothing else scores labels
    zero_shot = config.trainer.type == "none" and len(train) > 0
    output = feature.model_copy(update={"calibration": "rows" if zero_shot else "none"})
    return config.model_copy(update={"output_features": [output, *config.output_features[1:]]})


def calibration_sample(train: pd.DataFrame, config: TunewrightConfig) -> pd.DataFrame | None:
    """The training inputs (labels dropped) that `calibration: rows` estimates the prior from; None if unused."""
    if config.output_feature.type != "category" or config.output_feature.calibration != "rows":
        return None
    if not len(train):
        raise DataError("output_features[0].calibration: rows needs training rows to estimate the labels' prior, "
                        "and the training split is empty; give training rows or use content_free")
    rows = train.sample(n=min(CALIBRATION_ROWS, len(train)), random_state=config.trainer.seed)
    return rows[list(config.input_columns)].reset_index(drop=True)


def prompt_bodies(frame: pd.DataFrame, config: TunewrightConfig) -> list[str]:
    """The template filled from each row, without the task line (what few-shot examples are made of)."""
    template = config.prompt_template
    fields = template_fields(template)
    check_columns(frame, fields, "dataset")
    # An empty input (null, NaN, or an empty CSV cell) is the empty string in every format, never "nan".
    rows = ({name: "" if _is_missing(row[name]) else row[name] for name in fields} for row in frame.to_dict("records"))
    return [render_prompt(template, row) for row in rows]


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
