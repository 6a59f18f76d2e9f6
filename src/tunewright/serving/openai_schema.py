"""The OpenAI request bodies we accept, how they become token ids and settings, and the responses we send.

Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working; fields
we cannot honour (logprobs, tools, penalties, ...) are refused with a 400 naming the field, and so
are values that would fail later: text with a lone surrogate, a temperature too small to sample
with, a seed torch cannot take. How text becomes a run's prompt is in rendering.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from tunewright.config import MIN_TEMPERATURE, GenerationSettings
from tunewright.data import encode_prompts
from tunewright.model import CONTEXT_SAFETY_MARGIN
from tunewright.serving.errors import APIError
from tunewright.serving.pool import ServedModel
from tunewright.serving.rendering import (
    chat_input_value,
    conversation_prompt_ids,
    refuse_category,
    rendered_prompt_ids,
    renders_prompts,
)

# One request may ask for at most this many prompts x choices (each is a batch row).
MAX_ROWS_PER_REQUEST = 128
MAX_STOP_STRINGS = 4

Scalar = str | int | float | bool | None

# The seeds torch.manual_seed accepts.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value, dict keys included (iterative: nesting depth costs no stack)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _valid_unicode(value: Any) -> Any:
    """Refuse a lone surrogate: JSON's `\\ud800` escape allows one, but UTF-8, tokenizers and replies do not."""
    for text in _strings(value):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            code = f"{ord(text[error.start]):04x}"
            raise PydanticCustomError(
                "lone_surrogate",
                "holds a lone surrogate (\\u{code}), which is not text; send valid Unicode",
                {"code": code},
            ) from None
    return value


# Every field whose text reaches a tokenizer, a template or a reply (dict keys too: they can end up
# in an error's location).
ValidText = BeforeValidator(_valid_unicode)


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


class SamplingRequest(Body):
    """Fields shared by completions and chat completions."""

    model: Annotated[str, ValidText]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_ROWS_PER_REQUEST)
    stop: Annotated[str | list[str] | None, ValidText] = None
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Annotated[dict[str, float] | None, ValidText] = None
    # Not OpenAI's: skip the run's prompt rendering (see rendering.py); OpenAI clients pass it in extra_body.
    raw_prompt: bool = False

    @field_validator("temperature")
    @classmethod
    def _can_sample(cls, value: float | None) -> float | None:
        # Refused rather than clamped, so a request never decodes with a setting other than the one it sent.
        if value and value < MIN_TEMPERATURE:
            raise PydanticCustomError(
                "temperature_too_small",
                "{value} is too small to sample with (the probabilities overflow); use 0 for greedy "
                "decoding or at least {minimum}",
                {"value": f"{value:g}", "minimum": MIN_TEMPERATURE},
            )
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings are allowed", param="stop")
        return tuple(stop for stop in stops if stop)

    def refuse_unsupported(self, extra: dict[str, bool]) -> None:
        """A 400 for the first field set to something this server does not do."""
        unsupported = {
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
            "logit_bias": bool(self.logit_bias),
            **extra,
        }
        for name, is_set in unsupported.items():
            if is_set:
                raise APIError(400, f"{name}: not supported by this server; leave it out", param=name)


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], ValidText]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None
    user: str | None = None

    def check(self) -> None:
        self.refuse_unsupported(
            {
                "echo": self.echo,
                "suffix": bool(self.suffix),
                "logprobs": self.logprobs is not None,
                "best_of": self.best_of is not None and self.best_of != self.n,
            }
        )


class ContentPart(Body):
    type: Literal["text"]
    text: Annotated[str, ValidText]


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[ContentPart] | None, ValidText] = None

    def as_template_message(self) -> dict[str, str]:
        """The plain {role, content} form chat templates expect."""
        if isinstance(self.content, list):
            content = "".join(part.text for part in self.content)
        else:
            content = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None

    def check(self) -> None:
        response_type = (self.response_format or {}).get("type", "text")
        self.refuse_unsupported(
            {
                "logprobs": bool(self.logprobs),
                "top_logprobs": self.top_logprobs is not None,
                "tools": bool(self.tools),
                "functions": bool(self.functions),
                "response_format": response_type != "text",
            }
        )

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class PredictRequest(Body):
    model: Annotated[str, ValidText]
    rows: Annotated[list[dict[str, Scalar]], ValidText] = Field(min_length=1)
    all_probabilities: bool = False


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish_reason,
    }


def chat_chunk_choice(index: int, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def sampling_settings(defaults: GenerationSettings, body: SamplingRequest) -> GenerationSettings:
    """The run's generation settings, overridden by the request: temperature 0 is greedy, > 0 samples."""
    values = defaults.model_dump()
    if body.temperature is not None:
        values.update(do_sample=body.temperature > 0, temperature=body.temperature or None)
    if body.top_p is not None:
        if not values["do_sample"]:
            raise APIError(400, "top_p takes effect only when sampling; send a temperature above 0 with it",
                           param="top_p")
        values.update(top_p=body.top_p)
    return GenerationSettings.model_validate(values)


def check_prompt(served: ServedModel, ids: list[int], max_tokens: int, param: str) -> None:
    if not ids:
        raise APIError(400, f"{param}: the prompt is empty", param=param)
    vocab = len(served.request_tokenizer)
    if any(not isinstance(token, int) or token < 0 or token >= vocab for token in ids):
        raise APIError(400, f"{param}: token ids must lie in 0..{vocab - 1}", param=param)
    room = served.context_len - CONTEXT_SAFETY_MARGIN
    if len(ids) + max_tokens > room:
        raise APIError(
            400,
            f"this model's context is {served.context_len} tokens; the prompt has {len(ids)} and "
            f"max_tokens is {max_tokens}; shorten the prompt or lower max_tokens",
            param=param,
            code="context_length_exceeded",
        )


def completion_prompt_ids(served: ServedModel, prompt: Any, raw_prompt: bool = False) -> list[list[int]]:
    """Text prompts are rendered as the run's input column, as predict renders rows (or, raw, tokenized
    as they are); token-id prompts are the model's input already and pass through."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: no prompt given", param="prompt")
    if renders_prompts(served, raw_prompt):
        refuse_category(served)
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    if not all(isinstance(item, str) for item in prompt):
        return [list(item) for item in prompt]
    if renders_prompts(served, raw_prompt):
        return rendered_prompt_ids(served, list(prompt), "prompt")
    return encode_prompts(prompt, served.request_tokenizer)


def chat_prompt_ids(served: ServedModel, body: ChatRequest) -> list[int]:
    """A run trained on chat turns: its one user message rendered as predict renders a row. Raw (or
    the base model): the conversation through the tokenizer's chat template as it is."""
    messages = [message.as_template_message() for message in body.messages]
    if renders_prompts(served, body.raw_prompt):
        if served.tuned.config.conversation is not None:
            return conversation_prompt_ids(served, messages)
        return rendered_prompt_ids(served, [chat_input_value(served, messages)], "messages")[0]
    tokenizer = served.request_tokenizer
    if tokenizer.chat_template is None:
        raise APIError(
            400, f"the model '{served.name}' has no chat template; use /v1/completions", param="model"
        )
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # jinja raises TemplateError (or anything the template raises itself)
        raise APIError(400, f"messages: the chat template refused them ({error})", param="messages") from None
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids
