"""Per-token loss masks for chat data, derived by rendering the conversation prefix by prefix.

Rendering messages[:i] and messages[:i+1] shows which characters message i adds, so masks hold for any chat
template, including ones without `{% generation %}` markers. Work happens on rendered text offsets and is mapped
to tokens with the fast tokenizer's offset mapping, because BPE may merge tokens across a turn boundary.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from tunewright.chat_templates import turn_closing
from tunewright.conversations import strip_reasoning
from tunewright.errors import ConfigError

TRAIN_ON = ("all_assistant", "last_assistant", "everything")


Messages = list[dict[str, Any]]
Span = tuple[int, int]


def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages, chat_template: str | None,
            add_generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return str(tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
    ))


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Messages, chat_template: str | None = None,
                    train_eos: bool = True, template_name: str = "tokenizer's",
                    turn_ends: list[int] | None = None) -> tuple[str, list[Span]]:
    """Return (full text, [(start, end) char span of each assistant turn's trained text]).

    `turn_ends`, when given, receives the character offset where each message's rendering ends.
    """
    full = _render(tokenizer, messages, chat_template)
    spans: list[Span] = []
    previous = ""
    for i, message in enumerate(messages):
        current = _render(tokenizer, messages[: i + 1], chat_template)
        if not current.startswith(previous) or not full.startswith(current):
            raise ConfigError(
                f"chat template {template_name}: rendering turn {i + 1} changes earlier turns (it reorders or "
                "drops history, e.g. strips <think>); set reasoning: strip or pick another template"
            )
        if message["role"] == "assistant":
            _check_calls_rendered(message, current[len(previous):], i, template_name)
            spans.append(_turn_span(tokenizer, messages[:i], message, previous, current, chat_template, train_eos))
        if turn_ends is not None:
            turn_ends.append(len(current))
        previous = current
    return full, spans


def _call_names(message: dict[str, Any]) -> list[str]:
    """The function names of an assistant turn's tool calls (OpenAI's {"function": {...}} or the bare function)."""
    calls = message.get("tool_calls") or []
    return [str((call.get("function") or call).get("name", "")) for call in calls if isinstance(call, dict)]


def _check_calls_rendered(message: dict[str, Any], turn_text: str, index: int, template_name: str) -> None:
    """Refuse a template that drops a turn's tool calls: the model would learn to answer without them."""
    missing = [name for name in _call_names(message) if name not in turn_text]
    if missing:
        raise ConfigError(
            f"chat template {template_name}: turn {index + 1} has tool calls ({', '.join(missing)}) that the "
            "template drops; set prompt.chat_template to chatml, llama3 or mistral, or a Jinja file that renders "
            "tool_calls"
        )


def _turn_span(tokenizer: PreTrainedTokenizerBase, history: Messages, message: dict[str, Any], previous: str,
               current: str, chat_template: str | None, train_eos: bool) -> Span:
    # the generation prompt (e.g. "<|im_start|>assistant\n") is what inference supplies, so it never trains
    prompt = _render(tokenizer, history, chat_template, add_generation_prompt=True) if history else previous
    start = len(prompt) if current.startswith(prompt) else len(previous)
    content = message["content"].strip()  # templates such as Llama-3 trim the content
    content_at = current.find(content, start) if content else -1
    if content_at >= 0:
        # a template without a generation prompt leaves the role header in the turn: skip it too
        start = content_at
    if message.get("tool_calls"):  # the calls follow the reply's text: everything up to the turn's closing trains
        turn = current.rstrip()
        if content_at < 0:
            start += len(turn[start:]) - len(turn[start:].lstrip())
        closing = turn_closing(tokenizer, chat_template or str(tokenizer.chat_template))
        content_end = len(turn) - len(closing) if closing and turn.endswith(closing) else len(turn)
    elif content_at >= 0:
        content_end = content_at + len(content)
    else:  # an empty reply has no text to train; a reply the template rewrote trains its whole turn
        content_end = start if not content else len(current.rstrip())
    if train_eos:
        # end-of-turn token(s) close the answer; trailing whitespace after them belongs to the next turn
        return start, len(current.rstrip())
    return start, content_end


def build_chat_example(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    chat_template: str | None = None,
    train_on: str = "all_assistant",
    train_eos: bool = True,
    reasoning: str = "keep",
    template_name: str = "tokenizer's",
) -> dict[str, list[Any]]:
    """Tokenise one conversation: {"input_ids": [...], "train": [bool per token], "turn_ends": [...]}.

    `turn_ends[i]` is the number of tokens up to the end of message i (a token that straddles the end counts).
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on: {train_on!r} is not one of {', '.join(TRAIN_ON)}")
    if reasoning not in ("keep", "strip"):
        raise ConfigError(f"reasoning: {reasoning!r} is not one of keep, strip")
    if reasoning == "strip":
        messages = strip_reasoning(messages)
    char_ends: list[int] = []
    text, spans = assistant_spans(tokenizer, messages, chat_template, train_eos, template_name, char_ends)
    if train_on == "last_assistant":
        spans = spans[-1:]
    input_ids, offsets = _encode_split(tokenizer, text, _last_reply_start(tokenizer, messages, text, chat_template))
    if train_on == "everything":
        train = [True] * len(input_ids)
    else:
        train = [any(s < end and e > start for s, e in spans) for start, end in offsets]
    starts = [start for start, _ in offsets]
    turn_ends = [sum(1 for start in starts if start < end) for end in char_ends]
    return {"input_ids": input_ids, "train": train, "turn_ends": turn_ends}


def _last_reply_start(tokenizer: PreTrainedTokenizerBase, messages: Messages, text: str,
                      chat_template: str | None) -> int | None:
    """Where the last assistant turn's reply starts: the end of its history rendered for generation."""
    if not messages or messages[-1]["role"] != "assistant" or len(messages) < 2:
        return None
    prompt = _render(tokenizer, messages[:-1], chat_template, add_generation_prompt=True)
    return len(prompt) if prompt and text.startswith(prompt) else None


def _encode_split(tokenizer: PreTrainedTokenizerBase, text: str, cut: int | None) -> tuple[list[int], list[Span]]:
    """Token ids and char offsets of `text`, the part before `cut` tokenised on its own.

    Inference tokenises the history rendered for generation on its own, so its last tokens may differ from
    the same text inside the whole conversation (GPT-2 style pre-tokenizers split "\n\nHi" as "\n" "\nHi" but
    "\n\n" alone as one piece). Cutting there makes training's context for the last reply the exact ids
    that predict, the server and `apply_chat_template` produce.
    """
    pieces = [(0, text)] if cut is None else [(0, text[:cut]), (cut, text[cut:])]
    input_ids: list[int] = []
    offsets: list[Span] = []
    for shift, piece in pieces:
        if piece:
            encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            input_ids += list(encoded["input_ids"])
            offsets += [(start + shift, end + shift) for start, end in encoded["offset_mapping"]]
    return input_ids, offsets
