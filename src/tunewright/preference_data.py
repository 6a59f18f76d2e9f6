"""Preference data: rows -> (prompt, chosen, rejected) or KTO (prompt, completion, label) -> token ids.

Formats (preference.format):
- `columns`: the input features render the prompt (template or chat template, as for fine-tuning),
  the output feature holds the chosen response (KTO: the completion), preference.rejected_column
  the rejected one (KTO: preference.label_column a desirable/undesirable boolean);
- `hh_rlhf`: the chosen and rejected columns hold whole transcripts; each pair is split into its
  shared conversation prefix (the prompt) and the two final assistant replies. A pair whose
  prefixes differ is dropped and counted.

Length rule: a pair never has a response cut. The prompt loses its start first; a pair whose
longest response does not fit preference.max_length is dropped. Every drop and cut is counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
from transformers import PreTrainedTokenizerBase

from tunewright.config import TunewrightConfig
from tunewright.conversations import detect_cell_format, from_transcript, parse_conversation
from tunewright.data import IGNORE_INDEX, _is_missing, check_columns, encode_prompts, render_prompts
from tunewright.errors import DataError

log = logging.getLogger(__name__)

SPEAKER_MARKERS = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: "}
TRUE_LABELS = {"true", "1", "yes", "desirable"}
FALSE_LABELS = {"false", "0", "no", "undesirable"}


@dataclass
class PreferenceExample:
    """One tokenized pair (KTO: one row, `rejected_ids` empty); responses end with EOS."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    desirable: bool | None = None  # KTO only
    row: int = 0  # position in the split (the reference cache is kept in this order)
    reference_logps: tuple[float, float] | None = None  # (chosen, rejected), filled from the cache

    @property
    def input_ids(self) -> list[int]:
        """Every token the pair puts through the model (fit() counts these for tokens/s)."""
        return [*self.prompt_ids, *self.chosen_ids, *self.prompt_ids, *self.rejected_ids]


@dataclass
class DataCounts:
    """What the length and format rules did, reported in a warning and in metrics.json."""

    rows: int = 0
    dropped_mismatched_prefix: int = 0
    dropped_response_too_long: int = 0
    prompts_truncated: int = 0
    dropped_empty: int = 0
    kept: int = 0

    def as_dict(self) -> dict[str, int]:
        return {key: value for key, value in vars(self).items()}


@dataclass
class PreferenceSplit:
    examples: list[PreferenceExample] = field(default_factory=list)
    counts: DataCounts = field(default_factory=DataCounts)


def transcript_text(messages: Sequence[dict[str, str]]) -> str:
    """Messages back to hh-rlhf transcript text, ending where the assistant's reply begins."""
    turns = "".join(f"{SPEAKER_MARKERS[m['role']]}{m['content']}" for m in messages if m["role"] in SPEAKER_MARKERS)
    return turns + SPEAKER_MARKERS["assistant"].rstrip()


def split_hh_rlhf(frame: pd.DataFrame, prompt_column: str, chosen_column: str, rejected_column: str,
                  source: str, counts: DataCounts) -> pd.DataFrame:
    """Transcript pairs -> shared prompt + final replies; pairs whose prefixes differ are dropped (counted)."""
    rows = []
    for index, (chosen, rejected) in enumerate(zip(frame[chosen_column], frame[rejected_column], strict=True)):
        if _is_missing(chosen) or _is_missing(rejected):
            counts.dropped_empty += 1
            continue
        chosen_turns = from_transcript(str(chosen), index, chosen_column)
        rejected_turns = from_transcript(str(rejected), index, rejected_column)
        if chosen_turns[:-1] != rejected_turns[:-1]:
            counts.dropped_mismatched_prefix += 1
            continue
        rows.append({prompt_column: transcript_text(chosen_turns[:-1]),
                     chosen_column: " " + chosen_turns[-1]["content"],
                     rejected_column: " " + rejected_turns[-1]["content"]})
    if not rows:
        raise DataError(f"{source}: no pair of '{chosen_column}'/'{rejected_column}' transcripts shares its prefix; "
                        "check preference.format")
    return pd.DataFrame(rows, columns=[prompt_column, chosen_column, rejected_column])


def desirable_label(value: object, row: int, column: str) -> bool:
    text = str(value).strip().lower()
    if isinstance(value, bool) or text in TRUE_LABELS | FALSE_LABELS:
        return bool(value) if isinstance(value, bool) else text in TRUE_LABELS
    raise DataError(f"row {row}, column '{column}': {value!r} is not a desirable/undesirable label; "
                    "use true or false")


def preference_frame(frame: pd.DataFrame, config: TunewrightConfig, source: str) -> tuple[pd.DataFrame, DataCounts]:
    """Check the columns and normalise the rows; returns the rows kept and what was dropped."""
    settings, kto = config.preference, config.trainer.type == "kto"
    chosen = config.output_feature.name
    second = settings.label_column if kto else settings.rejected_column
    counts = DataCounts(rows=len(frame))
    if settings.format == "hh_rlhf":
        check_columns(frame, [chosen, second], source)
        frame = split_hh_rlhf(frame, config.input_columns[0], chosen, second, source, counts)
    else:
        check_columns(frame, [*config.input_columns, chosen, second], source)
        empty = frame[chosen].map(_is_missing).astype(bool) | frame[second].map(_is_missing).astype(bool)
        counts.dropped_empty = int(empty.sum())
        frame = frame[~empty].reset_index(drop=True)
    if kto:
        frame = frame.assign(**{second: [desirable_label(value, row, second)
                                         for row, value in enumerate(frame[second])]})
    if len(frame) == 0 and counts.rows:
        raise DataError(f"{source}: every row has an empty '{chosen}' or '{second}'; fill them in")
    return frame, counts


def encode_preference_prompts(frame: pd.DataFrame, config: TunewrightConfig,
                              tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Prompt ids: the template (or a single user turn of the chat template); an hh-rlhf prefix with the
    chat template becomes the whole conversation in the tokenizer's chat format."""
    if config.preference.format == "hh_rlhf" and config.prompt.use_chat_template:
        column = config.input_columns[0]
        texts = [tokenizer.apply_chat_template(from_transcript(text, row, column, require_assistant_last=False)[:-1],
                                               add_generation_prompt=True, tokenize=False)
                 for row, text in enumerate(frame[column])]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    if config.prompt.use_chat_template and len(config.input_columns) == 1 and len(frame):
        column = config.input_columns[0]
        cell_format = detect_cell_format(frame[column].iloc[0], column)
        if cell_format in ("messages", "sharegpt"):  # the prompt is a conversation: render it whole
            texts = [tokenizer.apply_chat_template(parse_conversation(cell, cell_format, row, column,
                                                                      require_assistant_last=False),
                                                   add_generation_prompt=True, tokenize=False)
                     for row, cell in enumerate(frame[column])]
            return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return encode_prompts(render_prompts(frame, config), tokenizer, config.prompt.use_chat_template)


def response_ids(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, strip: bool) -> list[list[int]]:
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    texts = [text.strip() if strip else text for text in texts]
    return [[*ids, end_id] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def fit_pair(prompt: list[int], responses: Sequence[list[int]], max_length: int,
             counts: DataCounts) -> list[int] | None:
    """The prompt cut from the left to fit the longest response; None (counted) if a response cannot fit."""
    room = max_length - max(len(ids) for ids in responses)
    if room < 1:
        counts.dropped_response_too_long += 1
        return None
    if len(prompt) > room:
        counts.prompts_truncated += 1
        return prompt[-room:]
    return prompt


def build_preference_examples(frame: pd.DataFrame, config: TunewrightConfig, tokenizer: PreTrainedTokenizerBase,
                              counts: DataCounts, source: str) -> PreferenceSplit:
    """Tokenize every row; responses are never cut (see the module docstring)."""
    settings, kto = config.preference, config.trainer.type == "kto"
    prompts = encode_preference_prompts(frame, config, tokenizer)
    strip = settings.format == "hh_rlhf" and config.prompt.use_chat_template  # the chat format adds its own spacing
    chosen = response_ids([str(v) for v in frame[config.output_feature.name]], tokenizer, strip)
    rejected = [[] for _ in chosen] if kto else response_ids(
        [str(v) for v in frame[settings.rejected_column]], tokenizer, strip)
    labels = list(frame[settings.label_column]) if kto else [None] * len(chosen)
    split = PreferenceSplit(counts=counts)
    for prompt, good, bad, label in zip(prompts, chosen, rejected, labels, strict=True):
        kept = fit_pair(prompt, [good, bad] if bad else [good], settings.max_length, counts)
        if kept is not None:
            split.examples.append(PreferenceExample(kept, good, bad, label, row=len(split.examples)))
    counts.kept = len(split.examples)
    report_counts(counts, source, settings.max_length)
    if not split.examples and counts.rows:
        raise DataError(f"{source}: no pair fits preference.max_length ({settings.max_length} tokens); raise it")
    return split


def report_counts(counts: DataCounts, source: str, max_length: int) -> None:
    dropped = {"prefixes differ": counts.dropped_mismatched_prefix, "empty response or label": counts.dropped_empty,
               f"a response longer than {max_length - 1} tokens": counts.dropped_response_too_long}
    for why, count in dropped.items():
        if count:
            log.warning("%s: dropped %d of %d pair(s): %s", source, count, counts.rows, why)
    if counts.prompts_truncated:
        log.warning("%s: %d prompt(s) were cut from the start to fit preference.max_length (%d tokens); "
                    "no response was cut", source, counts.prompts_truncated, max_length)


def pair_rows(examples: Sequence[PreferenceExample], kto: bool) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each sequence the model reads: chosen rows then rejected rows (KTO: each
    completion, then the mismatched KL rows: prompt i with completion i−1 of the batch, as TRL builds them)."""
    if kto:
        shifted = [examples[-1], *examples[:-1]]
        seconds = [(e.prompt_ids, other.chosen_ids) for e, other in zip(examples, shifted, strict=True)]
    else:
        seconds = [(e.prompt_ids, e.rejected_ids) for e in examples]
    firsts = [(e.prompt_ids, e.chosen_ids) for e in examples]
    return [([*prompt, *response], [IGNORE_INDEX] * len(prompt) + response) for prompt, response in firsts + seconds]
