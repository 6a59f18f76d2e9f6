"""Normalise one dataset row into a list of chat messages `{"role", "content"[, "tool_calls"]}`; a `tool`
turn keeps its `tool_call_id` and `name`.

Formats: an OpenAI `messages` column, ShareGPT `conversations` (`from`/`value`), raw transcripts with speaker
markers (hh-rlhf style), and Alpaca-style columns (handled by data.py as today).
"""

from __future__ import annotations

import json
import re

from tunewright.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
TOOL_RESULT_KEYS = ("tool_call_id", "name")
HH_RLHF_SPEAKERS = {"\n\nHuman: ": "user", "\n\nAssistant: ": "assistant"}


def detect_format(columns, first_row: dict) -> str:
    """Pick the format from the column names; the first rule that matches wins.

    1. a `messages` column -> "messages"; 2. a `conversations` column -> "sharegpt";
    3. a text cell holding a default speaker marker -> "transcript"; 4. otherwise "columns" (Alpaca-style).
    """
    columns = list(columns)
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    for column in columns:
        cell = first_row.get(column)
        if isinstance(cell, str) and any(marker.strip() in cell for marker in HH_RLHF_SPEAKERS):
            return "transcript"
    return "columns"


def _cell_as_list(cell, row_index: int, column: str) -> list:
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError:
            raise DataError(f"row {row_index}, column '{column}': not valid JSON; store a list of messages") from None
    if not isinstance(cell, list) or not cell:
        raise DataError(f"row {row_index}, column '{column}': empty or not a list; give at least one message")
    return cell


def _check(messages: list, row_index: int, column: str, require_assistant_last: bool) -> list:
    if not messages:
        raise DataError(f"row {row_index}, column '{column}': empty conversation; give at least one message")
    if require_assistant_last and messages[-1]["role"] != "assistant":
        raise DataError(
            f"row {row_index}, column '{column}': conversation ends with a '{messages[-1]['role']}' turn; "
            "end it with an assistant turn or drop the row"
        )
    return messages


def from_messages(cell, row_index: int = 0, column: str = "messages", require_assistant_last: bool = True) -> list:
    """OpenAI-style list of {role, content[, tool_calls]}; a JSON string cell is parsed."""
    messages = []
    for turn in _cell_as_list(cell, row_index, column):
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ROLES:
            raise DataError(f"row {row_index}, column '{column}': unknown role {role!r}; use one of {', '.join(ROLES)}")
        message = {"role": role, "content": turn.get("content") or ""}
        calls = turn.get("tool_calls")
        if calls is not None and len(calls):  # parquet gives a numpy array: its truth value is ambiguous
            message["tool_calls"] = list(calls)
        for key in TOOL_RESULT_KEYS:  # a tool turn names the call it answers; templates write them
            if role == "tool" and turn.get(key):
                message[key] = turn[key]
        messages.append(message)
    return _check(messages, row_index, column, require_assistant_last)


def from_sharegpt(cell, row_index: int = 0, column: str = "conversations", require_assistant_last: bool = True) -> list:
    """ShareGPT list of {from, value}; speaker names are mapped to OpenAI roles."""
    messages = []
    for turn in _cell_as_list(cell, row_index, column):
        speaker = str(turn.get("from", "")).lower() if isinstance(turn, dict) else ""
        if speaker not in SHAREGPT_ROLES:
            raise DataError(
                f"row {row_index}, column '{column}': unknown speaker {speaker!r}; "
                f"use one of {', '.join(SHAREGPT_ROLES)}"
            )
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value") or ""})
    return _check(messages, row_index, column, require_assistant_last)


def from_transcript(
    text: str,
    row_index: int = 0,
    column: str = "text",
    speakers: dict | None = None,
    require_assistant_last: bool = True,
) -> list:
    """Split a raw transcript on speaker markers (default: hh-rlhf's `\\n\\nHuman: ` / `\\n\\nAssistant: `)."""
    speakers = speakers or HH_RLHF_SPEAKERS
    for role in speakers.values():
        if role not in ROLES:
            raise DataError(f"speaker mapping: unknown role {role!r}; use one of {', '.join(ROLES)}")
    # hh-rlhf sometimes writes "Assistant:" with no space before an empty answer, so match markers loosely at the end
    pattern = "|".join(re.escape(marker.rstrip()) + r"(?: |$)" for marker in speakers)
    by_marker = {marker.rstrip(): role for marker, role in speakers.items()}
    found = list(re.finditer(pattern, text or ""))
    if not found:
        raise DataError(
            f"row {row_index}, column '{column}': no speaker markers ({', '.join(map(repr, speakers))}) found; "
            "set the speaker mapping to this dataset's markers"
        )
    messages = []
    for match, following in zip(found, found[1:] + [None], strict=True):
        end = following.start() if following else len(text)
        role = by_marker[match.group(0).rstrip()]
        messages.append({"role": role, "content": text[match.end() : end].strip()})
    return _check(messages, row_index, column, require_assistant_last)


def strip_reasoning(messages: list) -> list:
    """Drop `<think>…</think>` blocks from every assistant turn except the last (reasoning: strip)."""
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    stripped = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and i != last_assistant:
            content = re.sub(r"<think>.*?</think>\s*", "", message["content"], flags=re.DOTALL)
            message = {**message, "content": content}
        stripped.append(message)
    return stripped


def detect_cell_format(cell, column: str) -> str:
    """The format of one conversation cell: a list of {role} or {from} turns, or a transcript string.

    Raises:
        DataError: the cell is none of these.
    """
    if isinstance(cell, str):
        try:
            parsed = json.loads(cell)
        except json.JSONDecodeError:
            return "transcript"
        cell = parsed
    turns = list(cell) if isinstance(cell, list | tuple) or hasattr(cell, "tolist") else None
    first = turns[0] if turns else None
    if isinstance(first, dict) and "role" in first:
        return "messages"
    if isinstance(first, dict) and "from" in first:
        return "sharegpt"
    raise DataError(f"column '{column}': cannot tell the conversation format (neither {{role, content}} nor "
                    "{from, value} turns, nor text); set conversation.format")


def parse_conversation(cell, conversation_format: str, row_index: int, column: str,
                       speakers: dict | None = None, require_assistant_last: bool = True) -> list:
    """One cell as messages, in the given format (`messages`, `sharegpt` or `transcript`)."""
    if hasattr(cell, "tolist"):  # parquet lists arrive as numpy arrays
        cell = cell.tolist()
    if conversation_format == "messages":
        return from_messages(cell, row_index, column, require_assistant_last)
    if conversation_format == "sharegpt":
        return from_sharegpt(cell, row_index, column, require_assistant_last)
    if not isinstance(cell, str):
        raise DataError(f"row {row_index}, column '{column}': a transcript must be text; set conversation.format")
    return from_transcript(cell, row_index, column, speakers, require_assistant_last)
