"""Per-token loss masks for chat data, derived by rendering the conversation prefix by prefix.

Rendering messages[:i] and messages[:i+1] shows which characters message i adds, so masks hold for any chat
template, including ones without `{% generation %}` markers. Work happens on rendered text offsets and is mapped
to tokens with the fast tokenizer's offset mapping, because BPE may merge tokens across a turn boundary.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

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
                    train_eos: bool = True, template_name: str = "tokenizer's") -> tuple[str, list[Span]]:
    """Return (full text, [(start, end) char span of each assistant turn's trained text])."""
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
            spans.append(_turn_span(tokenizer, messages[:i], message, previous, current, chat_template, train_eos))
        previous = current
    return full, spans


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
    content_end = content_at + len(content) if content_at >= 0 else len(current.rstrip())
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
    """Tokenise one conversation: {"input_ids": [...], "train": [bool per token]}."""
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on: {train_on!r} is not one of {', '.join(TRAIN_ON)}")
    if reasoning not in ("keep", "strip"):
        raise ConfigError(f"reasoning: {reasoning!r} is not one of keep, strip")
    if reasoning == "strip":
        messages = strip_reasoning(messages)
    text, spans = assistant_spans(tokenizer, messages, chat_template, train_eos, template_name)
    if train_on == "last_assistant":
        spans = spans[-1:]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if train_on == "everything":
        train = [True] * len(encoded["input_ids"])
    else:
        train = [any(s < end and e > start for s, e in spans) for start, end in encoded["offset_mapping"]]
    return {"input_ids": list(encoded["input_ids"]), "train": train}
