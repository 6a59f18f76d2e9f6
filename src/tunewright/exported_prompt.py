"""The run's prompt rendering, carried by an export: a Jinja chat template and an Ollama TEMPLATE.

A tunewright run trains on one rendered prompt: `prompt.task`, then `prompt.template` filled from
the input columns, wrapped as one user turn of the tokenizer's chat template when
`prompt.use_chat_template` is set. A chat client that sends the input itself, as the last user
message, gets exactly the training prompt from these templates: the message stands for the input
column. With several input columns, the message stands for the whole rendered template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunewright.chat_templates import end_of_turn_id
from tunewright.config import GenerationSettings, TunewrightConfig
from tunewright.errors import ConfigError
from tunewright.prompt import template_fields, template_parts

# Stands for the user's message while a template is rendered to find the text around it.
SENTINEL = "\u2063TUNEWRIGHT-INPUT\u2063"
# The last user message, found with a loop (not a filter) so that minimal Jinja engines (llama.cpp's) run it.
LAST_USER_MESSAGE = (
    "{%- set tw = namespace(input='') -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
    "{%- set tw.input = message['content'] -%}{%- endif -%}{%- endfor -%}"
)


def message_column(config: TunewrightConfig) -> str | None:
    """The input column a chat message stands for; None when the template has several."""
    fields = template_fields(config.prompt_template)
    return fields[0] if len(fields) == 1 else None


def _jinja_string(text: str) -> str:
    # Jinja string literals take Python's backslash escapes; json.dumps writes exactly those for text.
    return json.dumps(text, ensure_ascii=False)


def prompt_expression(config: TunewrightConfig) -> str:
    """A Jinja expression of the rendered prompt, with `tw.input` standing for the message."""
    column = message_column(config)
    pieces: list[str] = []
    if config.prompt.task:
        pieces.append(_jinja_string(config.prompt.task + "\n"))
    if column is None:
        pieces.append("tw.input")
    else:
        for literal, field_name in template_parts(config.prompt_template):
            if literal:
                pieces.append(_jinja_string(literal))
            if field_name is not None:
                pieces.append("tw.input")
    return " ~ ".join(pieces) or '""'


def run_chat_template(config: TunewrightConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """A Jinja chat template that renders the last user message as the run renders a prompt.

    Raises:
        ConfigError: the run wraps prompts in a chat template, and the tokenizer has none.
    """
    if config.conversation is not None:  # the run's own template renders whole conversations as in training
        if not isinstance(tokenizer.chat_template, str):
            raise ConfigError("prompt.chat_template: the run's tokenizer has no chat template to export")
        return tokenizer.chat_template
    prompt = prompt_expression(config)
    if not config.prompt.use_chat_template:
        return LAST_USER_MESSAGE + "{{ " + prompt + " }}"
    base = tokenizer.chat_template
    if not isinstance(base, str):
        raise ConfigError("prompt.use_chat_template: the tokenizer has no chat template to export")
    # A top-level `set` shadows the caller's `messages` for the rest of the template.
    return (
        LAST_USER_MESSAGE
        + "{%- set messages = [{'role': 'user', 'content': " + prompt + "}] -%}"
        + base
    )


def render_chat(template: str, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """Render a conversation through a chat template, ready for the assistant's reply."""
    text: Any = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False
    )
    return str(text)


def _go_literal(text: str) -> str:
    """Text placed in a Go template as it is: only `{{` starts an action there."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(chat_template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Go TEMPLATE that renders what `chat_template` renders, for any conversation.

    The chat template uses the last user message only, so rendering one sentinel message shows the
    text around it; the Go template finds the last user message the same way.

    Raises:
        ConfigError: the rendered text cannot go inside a Modelfile's triple quotes.
    """
    rendered = render_chat(chat_template, tokenizer, [{"role": "user", "content": SENTINEL}])
    pieces = rendered.split(SENTINEL)
    if '"""' in rendered:
        raise ConfigError('export --format ollama: the prompt holds """, which a Modelfile TEMPLATE cannot hold')
    last_user = (
        '{{- $input := "" }}{{- range .Messages }}{{- if eq .Role "user" }}{{- $input = .Content }}{{- end }}'
        "{{- end }}"
    )
    return last_user + "{{ $input }}".join(_go_literal(piece) for piece in pieces)


def stop_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """What ends a reply: the tokenizer's end-of-sequence token and the chat template's end of turn (such as
    Llama 3's <|eot_id|>) when that is one special token: generation stops on both."""
    eos = tokenizer.eos_token
    stops = [eos] if isinstance(eos, str) and eos else []
    turn_end = end_of_turn_id(tokenizer)
    if turn_end is not None and tokenizer.convert_ids_to_tokens(turn_end) not in stops:
        stops.append(str(tokenizer.convert_ids_to_tokens(turn_end)))
    return stops


def ollama_parameters(settings: GenerationSettings, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, Any]]:
    """The run's generation settings as Modelfile PARAMETER lines (greedy is temperature 0)."""
    parameters: list[tuple[str, Any]] = [("num_predict", settings.max_new_tokens)]
    if settings.do_sample:
        optional: Mapping[str, Any] = {
            "temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p,
        }
        parameters += [(name, value) for name, value in optional.items() if value is not None]
    else:
        parameters.append(("temperature", 0))
    if settings.repetition_penalty is not None:
        parameters.append(("repeat_penalty", settings.repetition_penalty))
    parameters += [("stop", stop) for stop in stop_strings(tokenizer)]
    return parameters


def modelfile_text(gguf_name: str, template: str, parameters: list[tuple[str, Any]], notes: list[str]) -> str:
    """An Ollama Modelfile that points at the GGUF file beside it."""
    lines = [f"# {note}" for note in notes]
    lines += [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    for name, value in parameters:
        shown = json.dumps(value) if isinstance(value, str) else value
        lines.append(f"PARAMETER {name} {shown}")
    return "\n".join(lines) + "\n"
