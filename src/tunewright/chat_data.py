"""Conversation data: rows -> messages -> training Examples whose labels are the chat masks, and chat prompts.

Each conversation is rendered through the run's chat template (set on the tokenizer, see chat_templates.py)
and masked prefix by prefix (chat_masks.py): labels are −100 outside the trained tokens. The same rendering
with `add_generation_prompt` gives the prompt that predict, evaluate and the server feed the model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2
import pandas as pd
from transformers import PreTrainedTokenizerBase

from tunewright.chat_masks import build_chat_example
from tunewright.config import ConversationConfig, TunewrightConfig
from tunewright.conversations import detect_cell_format, parse_conversation, strip_reasoning
from tunewright.data import IGNORE_INDEX, Example, check_columns
from tunewright.errors import ConfigError, DataError
from tunewright.generate import end_token_ids

log = logging.getLogger(__name__)

Messages = list[dict[str, Any]]
# Above this share of rows losing their targets, training goes on with a warning (none at all: an error).
WARN_SHARE = 0.05


@dataclass
class MaskStats:
    """What the loss masks of a dataset look like: the counts `tunewright inspect` shows and train checks."""

    rows: int = 0
    no_trained_token: int = 0  # nothing to train even before the length limit (e.g. no assistant turn)
    target_truncated_away: int = 0  # trained tokens existed, but all lay beyond the length limit
    turns_cut: int = 0  # messages not wholly inside the length limit
    eos_trained: bool = False  # some trained token is EOS or the template's end of turn
    trained_tokens: int = 0
    tokens: int = 0
    problem_rows: list[int] = field(default_factory=list)  # first data rows (1-based) left with nothing to train

    @property
    def kept(self) -> int:
        return self.rows - self.no_trained_token - self.target_truncated_away


@dataclass
class MaskedRow:
    """One conversation after masking and truncation."""

    input_ids: list[int]
    train: list[bool]
    had_trained_token: bool
    turns_cut: int


def conversation_format(conversation: ConversationConfig, frame: pd.DataFrame, source: str) -> str:
    """The configured format, or the one detected from the first row (logged)."""
    if conversation.format != "auto":
        return conversation.format
    if not len(frame):
        return "messages"
    detected = detect_cell_format(frame[conversation.column].iloc[0], conversation.column)
    log.info("%s: column '%s' holds %s conversations (detected; set conversation.format to fix it)",
             source, conversation.column, detected)
    return detected


def frame_conversations(frame: pd.DataFrame, conversation: ConversationConfig, source: str = "dataset",
                        require_assistant_last: bool = True) -> list[Messages]:
    """Every row's conversation as messages; errors name the data row and the column."""
    check_columns(frame, [conversation.column], source)
    kind = conversation_format(conversation, frame, source)
    return [parse_conversation(cell, kind, row + 1, conversation.column, conversation.speakers,
                               require_assistant_last)
            for row, cell in enumerate(frame[conversation.column])]


def mask_row(tokenizer: PreTrainedTokenizerBase, messages: Messages, config: TunewrightConfig,
             max_len: int, row: int = 1) -> MaskedRow:
    """Mask one conversation and cut it to `max_len` tokens (the end goes: the history is what the answers need)."""
    assert config.conversation is not None
    try:
        example = build_chat_example(tokenizer, messages, None, config.conversation.train_on,
                                     config.conversation.train_eos, config.prompt.reasoning,
                                     config.prompt.chat_template or "of the tokenizer")
    except jinja2.TemplateError as error:
        raise DataError(f"data row {row}: the chat template refused the conversation ({error}); fix the row or "
                        "set prompt.chat_template") from None
    except ConfigError as error:  # the template drops or rewrites this row's turns: name the row
        raise ConfigError(f"data row {row}: {error}") from None
    turns_cut = sum(1 for end in example["turn_ends"] if end > max_len)
    return MaskedRow(example["input_ids"][:max_len], example["train"][:max_len], any(example["train"]), turns_cut)


def masked_rows(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Messages], config: TunewrightConfig,
                max_len: int) -> tuple[list[MaskedRow], MaskStats]:
    """Mask every conversation and count what the masks and the length limit did."""
    stop_ids = set(end_token_ids(tokenizer))
    stats = MaskStats(rows=len(conversations))
    rows = []
    for index, messages in enumerate(conversations):
        masked = mask_row(tokenizer, messages, config, max_len, index + 1)
        rows.append(masked)
        trained = sum(masked.train)
        stats.tokens += len(masked.input_ids)
        stats.trained_tokens += trained
        stats.turns_cut += masked.turns_cut
        if not masked.had_trained_token:
            stats.no_trained_token += 1
        elif not trained:
            stats.target_truncated_away += 1
        if not trained and len(stats.problem_rows) < 5:
            stats.problem_rows.append(index + 1)
        stats.eos_trained |= any(t and i in stop_ids for i, t in zip(masked.input_ids, masked.train, strict=True))
    return rows, stats


def conversation_examples(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Messages],
                          config: TunewrightConfig, max_len: int) -> tuple[list[Example], MaskStats]:
    """Training Examples of every conversation that has a trained token; labels are −100 elsewhere."""
    rows, stats = masked_rows(tokenizer, conversations, config, max_len)
    examples = []
    for masked in rows:
        if any(masked.train):
            labels = [token if train else IGNORE_INDEX for token, train in zip(masked.input_ids, masked.train,
                                                                                  strict=True)]
            examples.append(Example(masked.input_ids, labels, prompt_len=masked.train.index(True)))
    return examples, stats


def check_mask_stats(stats: MaskStats, source: str) -> None:
    """Refuse data with nothing to train; warn when many rows lose their targets.

    Raises:
        DataError: no row has a trained token.
    """
    if stats.rows and not stats.kept:
        raise DataError(
            f"{source}: no row has a trained token ({stats.no_trained_token} with no assistant text, "
            f"{stats.target_truncated_away} cut by the length limit); check conversation.train_on and "
            "conversation.column, or raise preprocessing.max_input_length"
        )
    lost = stats.no_trained_token + stats.target_truncated_away
    if stats.rows and lost / stats.rows > WARN_SHARE:
        log.warning("%s: %d of %d row(s) train nothing and are skipped (%d with no assistant text, %d cut by the "
                    "length limit; data rows %s); run `tunewright inspect` to see them", source, lost, stats.rows,
                    stats.no_trained_token, stats.target_truncated_away, ", ".join(map(str, stats.problem_rows)))
    if stats.turns_cut:
        log.warning("%s: %d turn(s) cut by the length limit of the conversation", source, stats.turns_cut)


def history_of(messages: Messages, reasoning: str = "keep") -> Messages:
    """The conversation before its final assistant turn: what the model sees when it writes that turn."""
    history = messages[:-1] if messages and messages[-1]["role"] == "assistant" else list(messages)
    if reasoning == "strip":  # at inference every assistant turn is history: none keeps its reasoning
        history = strip_reasoning([*history, {"role": "assistant", "content": ""}])[:-1]
    return history


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, histories: Sequence[Messages]) -> list[list[int]]:
    """Token ids of each history rendered through the tokenizer's (the run's) template, ready for the reply."""
    texts = [str(tokenizer.apply_chat_template(list(history), add_generation_prompt=True, tokenize=False))
             for history in histories]
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else []


def last_replies(conversations: Sequence[Messages]) -> list[str]:
    """The final assistant turn of each conversation: the evaluated target."""
    return [messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
            for messages in conversations]
