"""The OpenAI request bodies we accept, how they become token ids and settings, and the responses we send.

Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working; fields
we cannot honour (logprobs, tools, penalties, ...) are refused with a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunewright.config import GenerationSettings
from tunewright.data import encode_prompts
from tunewright.model import CONTEXT_SAFETY_MARGIN
from tunewright.serving.errors import APIError
from tunewright.serving.pool import ServedModel

# One request may ask for at most this many prompts x choices (each is a batch row).
MAX_ROWS_PER_REQUEST = 128
MAX_STOP_STRINGS = 4

Scalar = str | int | float | bool | None


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


class SamplingRequest(Body):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_ROWS_PER_REQUEST)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

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
    prompt: str | list[str] | list[int] | list[list[int]]
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
    text: str


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

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
    model: str
    rows: list[dict[str, Scalar]] = Field(min_length=1)
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


def completion_prompt_ids(served: ServedModel, prompt: Any) -> list[list[int]]:
    """Text prompts are tokenized as `tunewright predict` tokenizes them; token-id prompts pass through."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: no prompt given", param="prompt")
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    if all(isinstance(item, str) for item in prompt):
        return encode_prompts(prompt, served.request_tokenizer)
    return [list(item) for item in prompt]


def chat_prompt_ids(served: ServedModel, body: ChatRequest) -> list[int]:
    """The conversation through the tokenizer's chat template, ending with the assistant's turn."""
    tokenizer = served.request_tokenizer
    if tokenizer.chat_template is None:
        raise APIError(
            400, f"the model '{served.name}' has no chat template; use /v1/completions", param="model"
        )
    messages = [message.as_template_message() for message in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # jinja raises TemplateError (or anything the template raises itself)
        raise APIError(400, f"messages: the chat template refused them ({error})", param="messages") from None
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids
