"""The Go TEMPLATE of a conversation run: each Go twin (run by Go's text/template, as Ollama runs it) renders
conversations, tool calls included, as its Jinja template does; a run's template is matched to its twin."""

from __future__ import annotations

import copy
import json
import re

import pytest
from test_gguf_export import go_render
from transformers import AutoTokenizer

from tunewright.chat_templates import run_template, with_system_prompt
from tunewright.config import validate_config
from tunewright.errors import ConfigError
from tunewright.model import resolve_model_source
from tunewright.ollama_templates import FAMILIES, PROBES, conversation_ollama_template

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo","days":2}'}}
CONVERSATIONS = [
    *PROBES,
    [{"role": "system", "content": 'Say "{{ x }}".'}, {"role": "user", "content": "naïve\nline"},
     {"role": "assistant", "content": "ok", "tool_calls": [CALL]},
     {"role": "tool", "content": '{"temp": 3}'}, {"role": "assistant", "content": "Cold."},
     {"role": "user", "content": "thanks"}],
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_source("smollm2-135m"))


def for_ollama(messages: list[dict]) -> list[dict]:
    """The messages as Ollama's API holds them: tool-call arguments are objects."""
    messages = copy.deepcopy(messages)
    for message in messages:
        for call in message.get("tool_calls", []):
            arguments = call["function"]["arguments"]
            call["function"]["arguments"] = json.loads(arguments) if isinstance(arguments, str) else arguments
    return messages


@pytest.mark.parametrize("system", [None, "Be brief."])
@pytest.mark.parametrize(("family", "twin", "go_template"), FAMILIES, ids=[family for family, *_ in FAMILIES])
def test_go_twin_renders_as_its_jinja_template(tok, family, twin, go_template, system):
    jinja = twin if system is None else with_system_prompt(twin, system)
    go = go_template(system, tok.eos_token)
    for messages in CONVERSATIONS:
        expected = tok.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=True)
        expected = expected.removeprefix(tok.bos_token) if family in ("llama3", "mistral") else expected
        assert go_render(go, for_ollama(messages)) == expected, messages


@pytest.mark.parametrize(("prompt", "family", "system"), [
    ({}, "chatml (content only)", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    ({"chat_template": "chatml"}, "chatml", None),
    ({"chat_template": "llama3", "system_prompt": 'Be "brief".'}, "llama3", 'Be "brief".'),
    ({"chat_template": "mistral", "system_prompt": "Be brief."}, "mistral", "Be brief."),
])
def test_a_run_template_is_matched_to_its_twin(tok, tmp_path, prompt, family, system):
    config = validate_config({"base_model": "smollm2-135m", "conversation": {}, "prompt": prompt})
    tokenizer = copy.deepcopy(tok)
    tokenizer.chat_template = run_template(config, tokenizer)
    go, matched = conversation_ollama_template(config, tokenizer)
    assert matched == family
    assert (json.dumps(system, ensure_ascii=False)[1:-1] if family == "mistral" else system or "") in go


def test_templates_without_a_twin_are_refused_in_one_line(tok, tmp_path):
    other = tmp_path / "vicuna.jinja"
    other.write_text("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}ASSISTANT:")
    prompt = {"chat_template": str(other)}
    config = validate_config({"base_model": "smollm2-135m", "conversation": {}, "prompt": prompt})
    tokenizer = copy.deepcopy(tok)
    tokenizer.chat_template = run_template(config, tokenizer)
    with pytest.raises(ConfigError, match=re.escape(f"export --format ollama: the run's chat template ({other}) has "
                                                    "no Go TEMPLATE equivalent here; train with prompt.chat_template")):
        conversation_ollama_template(config, tokenizer)
    config = validate_config({"base_model": "smollm2-135m", "conversation": {}, "prompt": {"reasoning": "strip"}})
    with pytest.raises(ConfigError, match="prompt.reasoning strip removes <think> blocks from history"):
        conversation_ollama_template(config, tok)
