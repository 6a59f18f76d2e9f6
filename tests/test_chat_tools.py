"""Tool calls and tool results through the named chat templates: rendering, masks token by token, a run."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from transformers import AutoTokenizer

from tunewright import api
from tunewright.chat_data import frame_conversations
from tunewright.chat_masks import build_chat_example
from tunewright.chat_templates import NAMED_TEMPLATES
from tunewright.config import validate_config
from tunewright.errors import ConfigError
from tunewright.model import resolve_model_source

CALL = {"id": "call1", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call1", "name": "get_weather", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
]
CALL_JSON = '"name": "get_weather", "{key}": {{"city": "Paris"}}'
RENDERED = {
    "chatml": (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"
        + CALL_JSON.format(key="arguments") + "}\n</tool_call><|im_end|>\n"
        '<|im_start|>tool\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\nIt is 21 degrees.<|im_end|>\n"
    ),
    "llama3": (
        "<BOS><|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{" + CALL_JSON.format(key="parameters") + "}<|eot_id|>"
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 21}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 21 degrees.<|eot_id|>"
    ),
    "mistral": (
        "<BOS>[INST] Weather in Paris? [/INST][TOOL_CALLS] [{" + CALL_JSON.format(key="arguments")
        + ', "id": "call1"}]<EOS>[TOOL_RESULTS] {"content": "{\\"temp\\": 21}", "call_id": "call1"}[/TOOL_RESULTS]'
        " It is 21 degrees.<EOS>"
    ),
}
# What trains, token by token, without and with the end of turn: the assistant's call and its reply, never the
# tool's result. A token that straddles a turn boundary ("][" after [/INST], ".<" before a <|eot_id|> that is
# not one token of this vocabulary) holds a trained character, so it trains.
CALLS = {key: "{" + CALL_JSON.format(key=key) for key in ("arguments", "parameters")}
TRAINED = {
    "chatml": (["<tool_call>\n" + CALLS["arguments"] + "}\n</tool_call>", "It is 21 degrees."],
               ["<tool_call>\n" + CALLS["arguments"] + "}\n</tool_call><|im_end|>", "It is 21 degrees.<|im_end|>"]),
    "llama3": ([CALLS["parameters"] + "}", "It is 21 degrees.<"],
               [CALLS["parameters"] + "}<|eot_id|><", "It is 21 degrees.<|eot_id|>"]),
    "mistral": (["][TOOL_CALLS] [" + CALLS["arguments"] + ', "id": "call1"}]', " It is 21 degrees."],
                ["][TOOL_CALLS] [" + CALLS["arguments"] + ', "id": "call1"}]<EOS>', " It is 21 degrees.<EOS>"]),
}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_source("smollm2-135m"))


def trained_runs(tok, example) -> list[str]:
    """Decoded text of each run of consecutive trained tokens."""
    runs, current = [], []
    for token_id, train in [*zip(example["input_ids"], example["train"], strict=True), (None, False)]:
        if train:
            current.append(token_id)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


def with_specials(tok, text: str) -> str:
    """`text` with this tokenizer's BOS and EOS in place of <BOS> and <EOS>."""
    return text.replace("<BOS>", tok.bos_token).replace("<EOS>", tok.eos_token)


@pytest.mark.parametrize("name", list(RENDERED))
def test_named_templates_render_tool_calls_and_results(tok, name):
    text = tok.apply_chat_template(TOOL_CHAT, chat_template=NAMED_TEMPLATES[name], tokenize=False)
    assert text == with_specials(tok, RENDERED[name])


@pytest.mark.parametrize("name", list(RENDERED))
@pytest.mark.parametrize("train_eos", [False, True])
def test_masks_train_the_call_and_never_the_tool_result(tok, name, train_eos):
    example = build_chat_example(tok, TOOL_CHAT, chat_template=NAMED_TEMPLATES[name], train_eos=train_eos)
    assert trained_runs(tok, example) == [with_specials(tok, run) for run in TRAINED[name][train_eos]]


def test_call_arguments_given_as_objects_are_written_as_json(tok):
    as_object = [TOOL_CHAT[0], {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]
    text = tok.apply_chat_template(as_object, chat_template=NAMED_TEMPLATES["chatml"], tokenize=False)
    assert "Let me look.\n<tool_call>\n{" + CALL_JSON.format(key="arguments") + "}\n</tool_call>" in text


def test_a_template_that_drops_tool_calls_is_refused(tok):
    with pytest.raises(ConfigError, match="turn 2 has tool calls .*get_weather.* drops; set prompt.chat_template"):
        build_chat_example(tok, TOOL_CHAT, template_name="of the tokenizer")  # SmolLM2's own renders content only


def test_tool_turn_fields_are_kept_from_the_data(tiny_model_dir):
    config = validate_config({"base_model": str(tiny_model_dir), "conversation": {}})
    [messages] = frame_conversations(pd.DataFrame({"messages": [json.dumps(TOOL_CHAT)]}), config.conversation)
    assert messages == TOOL_CHAT


def test_tool_calls_round_trip_through_training_and_predict(tiny_model_dir, tmp_path):
    rows = [{"messages": TOOL_CHAT}] * 4
    config = {
        "base_model": str(tiny_model_dir), "conversation": {}, "prompt": {"chat_template": "chatml"},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "trainer": {"max_steps": 1, "batch_size": 4, "learning_rate": 0.01, "precision": "fp32"},
        "generation": {"max_new_tokens": 2}, "preprocessing": {"split": [1.0, 0.0, 0.0]},
    }
    api.train(config, rows, tmp_path / "run", show_progress=False)
    tuned = api.load(tmp_path / "run")
    history = TOOL_CHAT[:-1]
    [prompt] = tuned.encode_conversations([TOOL_CHAT])
    assert tuned.tokenizer.decode(prompt) == RENDERED["chatml"].split("<|im_start|>assistant\nIt is")[0] + (
        "<|im_start|>assistant\n")
    assert prompt == tuned.tokenizer(tuned.tokenizer.apply_chat_template(
        history, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    assert len(api.predict(tuned, rows[:1])["prediction"]) == 1
