"""Loss masks derived prefix by prefix, checked token by token for ChatML, Llama-3 and Mistral templates."""

import pytest
from transformers import AutoTokenizer

from tunewright.chat_masks import build_chat_example
from tunewright.errors import ConfigError
from tunewright.model import resolve_model_source

# Llama-3 instruct template logic (bos once, header, trimmed content, <|eot_id|>)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral instruct v0.1 template logic ([INST] user [/INST] answer</s>)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# a template that drops <think> from earlier assistant turns, as reasoning models' templates do
DROPS_THINK = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
    "{{ 'A: ' + m['content'].split('</think>')[-1] + '\n' }}{% else %}{{ m['role'][0] | upper + ': ' + m['content']"
    " + '\n' }}{% endif %}{% endfor %}"
)
TWO_TURN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo there"}]
THREE_TURN = TWO_TURN + [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "bye"}]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_source("smollm2-135m"))


def trained_runs(tok, example):
    """Decoded text of each run of consecutive trained tokens."""
    runs, current = [], []
    for token_id, train in zip(example["input_ids"], example["train"], strict=True):
        if train:
            current.append(token_id)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def trained_tokens(tok, example):
    return [tok.decode([i]) for i, t in zip(example["input_ids"], example["train"], strict=True) if t]


def test_chatml_tokens_match_full_rendering(tok):
    example = build_chat_example(tok, THREE_TURN)
    rendered = tok.apply_chat_template(THREE_TURN, tokenize=False)
    assert example["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]


def test_chatml_all_assistant_with_eos(tok):
    example = build_chat_example(tok, THREE_TURN)
    assert trained_tokens(tok, example) == ["yo", " there", "<|im_end|>", "bye", "<|im_end|>"]


def test_chatml_without_eos(tok):
    example = build_chat_example(tok, THREE_TURN, train_eos=False)
    assert trained_tokens(tok, example) == ["yo", " there", "bye"]


def test_chatml_last_assistant_only(tok):
    example = build_chat_example(tok, THREE_TURN, train_on="last_assistant")
    assert trained_tokens(tok, example) == ["bye", "<|im_end|>"]


def test_chatml_everything_trains_every_token(tok):
    example = build_chat_example(tok, TWO_TURN, train_on="everything")
    assert all(example["train"]) and len(example["train"]) == len(example["input_ids"])


def test_chatml_system_prompt_and_tool_turn_never_train(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "calling"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    example = build_chat_example(tok, messages)
    assert trained_runs(tok, example) == ["calling<|im_end|>", "It is sunny.<|im_end|>"]


def test_llama3_template(tok):
    example = build_chat_example(tok, THREE_TURN, chat_template=LLAMA3)
    # this vocabulary merges "><" across the turn boundary into one token; it carries the last trained
    # character, so it trains (a token trains when any of its characters does)
    assert trained_runs(tok, example) == ["yo there<|eot_id|><", "bye<|eot_id|>"]
    example = build_chat_example(tok, THREE_TURN, chat_template=LLAMA3, train_eos=False)
    assert trained_runs(tok, example) == ["yo there", "bye"]
    example = build_chat_example(tok, THREE_TURN, chat_template=LLAMA3, train_on="last_assistant")
    assert trained_runs(tok, example) == ["bye<|eot_id|>"]


def test_llama3_system_prompt(tok):
    messages = [{"role": "system", "content": "Be brief."}] + TWO_TURN
    example = build_chat_example(tok, messages, chat_template=LLAMA3)
    assert trained_runs(tok, example) == ["yo there<|eot_id|>"]


def test_mistral_template(tok):
    eos = tok.eos_token
    example = build_chat_example(tok, THREE_TURN, chat_template=MISTRAL)
    assert trained_runs(tok, example) == [f"yo there{eos}", f"bye{eos}"]
    example = build_chat_example(tok, THREE_TURN, chat_template=MISTRAL, train_eos=False)
    assert trained_runs(tok, example) == ["yo there", "bye"]


def test_template_that_drops_history_is_refused(tok):
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>hmm</think>a"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "b"},
    ]
    with pytest.raises(ConfigError, match="chat template drops-think: rendering turn 2 changes earlier turns"):
        build_chat_example(tok, messages, chat_template=DROPS_THINK, template_name="drops-think")
    example = build_chat_example(tok, messages, chat_template=DROPS_THINK, reasoning="strip")
    assert trained_runs(tok, example) == [" a", " b"]  # " a" is one token: it holds a trained character


def test_bad_settings_are_refused(tok):
    with pytest.raises(ConfigError, match="train_on"):
        build_chat_example(tok, TWO_TURN, train_on="assistant")
    with pytest.raises(ConfigError, match="reasoning"):
        build_chat_example(tok, TWO_TURN, reasoning="hide")


def test_empty_reply_without_eos_trains_nothing(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    assert not any(build_chat_example(tok, messages, train_eos=False)["train"])
    assert trained_tokens(tok, build_chat_example(tok, messages)) == ["<|im_end|>"]
