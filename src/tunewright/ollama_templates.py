"""The Ollama TEMPLATE (a Go text/template) of a conversation run's chat template.

Ollama cannot run Jinja, so each template family tunewright knows has a Go twin written for it: ChatML (with
tool calls, as tunewright's `chatml`, or content only, as SmolLM2's own template), Llama 3 and Mistral. A run's
saved template is matched to a family by rendering probe conversations through it and through the family's
Jinja template with the run's default system prompt (from `prompt.system_prompt` or the tokenizer's template,
found by rendering): the Go twin is used only when every probe renders alike.

What the Go twins cannot do as the Jinja does: Ollama's tokenizer adds BOS itself (the twins leave it out),
Ollama hands tool-call arguments over as an object and writes them as compact JSON, Go has no `trim` (Llama 3
trims each message), and tool-call ids are not written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunewright.chat_templates import with_system_prompt
from tunewright.config import TunewrightConfig
from tunewright.errors import ConfigError
from tunewright.named_templates import CHATML, LLAMA3, MISTRAL

WHERE = "export --format ollama"
MARK = "\u2063TUNEWRIGHT-SYSTEM\u2063"
# ChatML rendering content only (SmolLM2's own template, less its default system prompt).
CHATML_CONTENT_ONLY = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_CALL = {"type": "function", "function": {"name": "probe_tool", "arguments": '{"a":1}'}}
Messages = list[dict[str, Any]]
PROBES: list[Messages] = [
    [{"role": "user", "content": "u1"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}],
    [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2"}],
    [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "", "tool_calls": [_CALL, _CALL]},
     {"role": "tool", "content": "r"}],
    [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1", "tool_calls": [_CALL]},
     {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a2"}, {"role": "user", "content": "u2"}],
]


def _go_string(text: str) -> str:
    """A Go string literal: JSON's escapes are Go's."""
    return json.dumps(text, ensure_ascii=False)


def _go_literal(text: str) -> str:
    """Text placed in a Go template as it is: only `{{` starts an action there."""
    return text.replace("{{", '{{ "{{" }}')


def _default_system_block(system: str | None, block: str) -> str:
    """`block` (holding {system}) written first when the conversation does not start with a system message."""
    if system is None:
        return ""
    return ('{{ if not (and .Messages (eq (index .Messages 0).Role "system")) }}'
            + block.replace("{system}", _go_literal(system)) + "{{ end }}")


def _calls(arguments_key: str, separator: str, before: str = "", after: str = "", after_text: bool = True) -> str:
    """Go writing an assistant message's tool calls as JSON objects, each between `before` and `after`.

    `separator` goes before every call but the first, and (`after_text`) before a first one that follows text.
    """
    condition = "or $content $i" if after_text else "$i"
    return ("{{ $content := .Content }}{{ range $i, $call := .ToolCalls }}{{ if " + condition + " }}" + separator
            + "{{ end }}" + before + '{"name": {{ json $call.Function.Name }}, "' + arguments_key
            + '": {{ json $call.Function.Arguments }}}' + after + "{{ end }}")


def go_chatml(system: str | None, eos: str) -> str:
    return (
        _default_system_block(system, "<|im_start|>system\n{system}<|im_end|>\n")
        + "{{ range .Messages }}<|im_start|>{{ .Role }}\n"
        + '{{ if eq .Role "tool" }}<tool_response>\n{{ .Content }}\n</tool_response>{{ else }}{{ .Content }}{{ end }}'
        + '{{ if and (eq .Role "assistant") .ToolCalls }}'
        + _calls("arguments", "\n", "<tool_call>\n", "\n</tool_call>")
        + "{{ end }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )


def go_chatml_content_only(system: str | None, eos: str) -> str:
    return (_default_system_block(system, "<|im_start|>system\n{system}<|im_end|>\n")
            + "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            + "<|im_start|>assistant\n")


def go_llama3(system: str | None, eos: str) -> str:
    return (
        _default_system_block(system, "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>")
        + '{{ range .Messages }}<|start_header_id|>{{ if eq .Role "tool" }}ipython{{ else }}{{ .Role }}{{ end }}'
        + "<|end_header_id|>\n\n{{ .Content }}"
        + '{{ if and (eq .Role "assistant") .ToolCalls }}' + _calls("parameters", "\n") + "{{ end }}"
        + "<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def go_mistral(system: str | None, eos: str) -> str:
    # the system message (the conversation's first, else the default) goes into the first user turn
    default = _go_string(system + "\n\n") if system is not None else '""'
    eos = _go_literal(eos)
    return (
        "{{ $system := " + default + " }}{{ $first := true }}{{ range $index, $message := .Messages }}"
        + '{{ if and (eq $index 0) (eq .Role "system") }}{{ $system = printf "%s\\n\\n" .Content }}{{ else }}'
        + '{{ if eq .Role "user" }}[INST] {{ if $first }}{{ $system }}{{ end }}{{ .Content }} [/INST]'
        + '{{ else if and (eq .Role "assistant") .ToolCalls }}{{ if .Content }} {{ .Content }}{{ end }}[TOOL_CALLS] ['
        + _calls("arguments", ", ", after_text=False) + "]" + eos
        + '{{ else if eq .Role "assistant" }} {{ .Content }}' + eos
        + '{{ else if eq .Role "tool" }}[TOOL_RESULTS] {"content": {{ json .Content }}}[/TOOL_RESULTS]{{ end }}'
        + "{{ $first = false }}{{ end }}{{ end }}"
    )


GoTemplate = Callable[[str | None, str], str]
FAMILIES: list[tuple[str, str, GoTemplate]] = [
    ("chatml", CHATML, go_chatml),
    ("llama3", LLAMA3, go_llama3),
    ("mistral", MISTRAL, go_mistral),
    ("chatml (content only)", CHATML_CONTENT_ONLY, go_chatml_content_only),
]


def _render(tokenizer: PreTrainedTokenizerBase, template: str, messages: Messages) -> str | None:
    try:
        return str(tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True))
    except Exception:  # a template that refuses a probe is not this family
        return None


def default_system(tokenizer: PreTrainedTokenizerBase, template: str, twin: str) -> str | None:
    """The system prompt `template` places before a conversation with none, if it is `twin` with one placed."""
    alone = [{"role": "user", "content": "u1"}]
    rendered = _render(tokenizer, template, alone)
    with_mark = _render(tokenizer, twin, [{"role": "system", "content": MARK}, *alone])
    if rendered is None or with_mark is None or MARK not in with_mark:
        return None
    before, after = with_mark.split(MARK, 1)
    if len(rendered) >= len(before) + len(after) and rendered.startswith(before) and rendered.endswith(after):
        return rendered[len(before):len(rendered) - len(after)]
    return None


def conversation_ollama_template(config: TunewrightConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(Go TEMPLATE, family name) rendering the run's chat template, for a conversation run.

    Raises:
        ConfigError: the template strips reasoning from history, or no Go twin renders it alike.
    """
    name = config.prompt.chat_template or "the tokenizer's own"
    if config.prompt.reasoning == "strip":
        raise ConfigError(f"{WHERE}: prompt.reasoning strip removes <think> blocks from history, which a Go "
                          "TEMPLATE cannot do; export --format gguf (the file carries the chat template) or hf")
    template = str(tokenizer.chat_template)
    expected = [_render(tokenizer, template, probe) for probe in PROBES]
    for family, twin, go_template in FAMILIES:
        system = default_system(tokenizer, template, twin)
        candidate = twin if system is None else with_system_prompt(twin, system)
        if [_render(tokenizer, candidate, probe) for probe in PROBES] == expected:
            go = go_template(system, str(tokenizer.eos_token))
            if '"""' in go:
                raise ConfigError(f'{WHERE}: the system prompt holds """, which a Modelfile TEMPLATE cannot hold')
            return go, family
    raise ConfigError(f"{WHERE}: the run's chat template ({name}) has no Go TEMPLATE equivalent here; train with "
                      "prompt.chat_template chatml, llama3 or mistral, or export --format gguf or hf")
