"""One chat template from training to every way of prompting the run: identical token ids and stop tokens.

Held-out conversations are rendered through the training path (the masked Examples), `predict`
(TunedModel.encode_conversations), the server's /v1/chat/completions (its prompt ids, and its answer
against predict's) and the exported folder's chat_template through plain transformers. Three real
templates: the SmolLM2 tokenizer's own (ChatML with a default system prompt), and tunewright's named
llama3 and mistral ones. The tokenizer is SmolLM2's, given Llama 3's header and end-of-turn tokens
as special tokens (as a Llama 3 vocabulary has them); the model is a tiny random Llama of that vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_model
from fastapi.testclient import TestClient
from transformers import AutoTokenizer, GenerationConfig

from tunewright import api
from tunewright.chat_data import conversation_examples
from tunewright.config import ServeSettings
from tunewright.data import IGNORE_INDEX
from tunewright.errors import ConfigError
from tunewright.generate import stop_token_ids
from tunewright.model import resolve_model_source
from tunewright.serving.app import create_app
from tunewright.serving.openai_schema import ChatRequest, chat_prompt_ids
from tunewright.serving.pool import load_models

LLAMA3_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEMPLATES = {"own": None, "llama3": "llama3", "mistral": "mistral"}
TRAIN = [
    [{"role": "user", "content": f"Say {word}."}, {"role": "assistant", "content": f"{word}!"},
     {"role": "user", "content": "Again?"}, {"role": "assistant", "content": f"Yes: {word}."}]
    for word in ["cat", "dog", "sun", "sea"] * 2
]
HELD_OUT = [
    [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\n"}, {"role": "assistant", "content": "Why did the owl sit?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": " 4 "}],
    [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Red."},
     {"role": "user", "content": "Another"}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "One more, please"}, {"role": "assistant", "content": "Green."}],
    # reasoning: strip drops the <think> blocks of history turns, in training and in every template alike
    [{"role": "user", "content": "3 * 3?"}, {"role": "assistant", "content": "<think>3 threes</think>\n9."},
     {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "<think>add</think> 6."}],
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "name": "weather", "content": "drizzle"},
    {"role": "assistant", "content": "It rains."},
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("smol-vocab-tiny")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source("smollm2-135m"))
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    model = build_model(len(tokenizer))
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(TEMPLATES))
def run(request: pytest.FixtureRequest, base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A trained conversation run with one template, its export and its server."""
    root = tmp_path_factory.mktemp(f"parity-{request.param}")
    config = {
        "base_model": str(base_dir),
        "conversation": {},
        "prompt": {"chat_template": TEMPLATES[request.param], "reasoning": "strip"},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "trainer": {"max_steps": 1, "batch_size": 4, "learning_rate": 0.01, "precision": "fp32"},
        "generation": {"max_new_tokens": 4},
        "preprocessing": {"split": [1.0, 0.0, 0.0]},
    }
    config["prompt"] = {key: value for key, value in config["prompt"].items() if value is not None}
    api.train(config, [{"messages": messages} for messages in TRAIN], root / "run", show_progress=False)
    tuned = api.load(root / "run")
    export_dir = api.export(root / "run", root / "export", merge=True)
    served = load_models([f"chat={root / 'run'}"])
    return {"name": request.param, "tuned": tuned, "export": export_dir, "served": served}


def last_reply_start(labels: list[int]) -> int:
    """Where the final assistant turn's trained tokens start."""
    position = len(labels)
    while position > 0 and labels[position - 1] == IGNORE_INDEX:
        position -= 1  # text after the last trained token (a trailing newline)
    while position > 0 and labels[position - 1] != IGNORE_INDEX:
        position -= 1
    return position


@pytest.mark.parametrize("conversation", HELD_OUT, ids=["two-turns", "system", "three-turns", "reasoning"])
def test_prompt_ids_are_identical_everywhere(run: dict, conversation: list[dict]) -> None:
    tuned = run["tuned"]
    history = conversation[:-1]
    [example], _ = conversation_examples(tuned.tokenizer, [conversation], tuned.config, 10_000)
    predicted = tuned.encode_conversations([conversation])[0]
    served = run["served"]["chat"]
    server = chat_prompt_ids(served, ChatRequest.model_validate({"model": "chat", "messages": history}))
    exported = AutoTokenizer.from_pretrained(run["export"])
    plain = exported.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert example.input_ids[: len(predicted)] == predicted  # training's context for the last reply
    # then the reply: its first trained token, after at most the untrained blank a reply may start with
    reply_start = last_reply_start(example.labels)
    assert reply_start >= len(predicted)
    assert tuned.tokenizer.decode(example.input_ids[len(predicted) : reply_start]).strip() == ""
    assert server == predicted
    assert list(plain) == predicted
    assert exported.chat_template == tuned.tokenizer.chat_template


def test_history_reasoning_is_stripped_everywhere(run: dict) -> None:
    """The exported template alone strips history's <think> blocks, as training and predict do."""
    history = HELD_OUT[3][:-1]
    exported = AutoTokenizer.from_pretrained(run["export"])
    text = exported.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    assert "<think>" not in text and "9." in text
    assert exported(text, add_special_tokens=False)["input_ids"] == run["tuned"].encode_conversations([history])[0]


def test_tool_calls_render_alike_in_training_predict_and_export(run: dict) -> None:
    """Named templates write tool calls and results; the tokenizer's own (SmolLM2's) drops the calls: refused."""
    tuned = run["tuned"]
    if run["name"] == "own":
        with pytest.raises(ConfigError, match="turn 2 has tool calls \\(weather\\) that the template drops"):
            conversation_examples(tuned.tokenizer, [TOOL_CHAT], tuned.config, 10_000)
        return
    [example], _ = conversation_examples(tuned.tokenizer, [TOOL_CHAT], tuned.config, 10_000)
    predicted = tuned.encode_conversations([TOOL_CHAT])[0]
    exported = AutoTokenizer.from_pretrained(run["export"])
    plain = exported.apply_chat_template(TOOL_CHAT[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert example.input_ids[: len(predicted)] == predicted == list(plain)
    trained = tuned.tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])
    assert '"weather"' in trained and "Oslo" in trained and "drizzle" not in trained
    assert '"weather"' in tuned.tokenizer.decode(predicted) and "drizzle" in tuned.tokenizer.decode(predicted)


def test_stop_tokens_are_the_trained_end_of_turn(run: dict) -> None:
    tuned = run["tuned"]
    [example], stats = conversation_examples(tuned.tokenizer, [HELD_OUT[0]], tuned.config, 10_000)
    closing = [label for label in example.labels if label != IGNORE_INDEX][-1]
    assert stats.eos_trained
    expected = {"own": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": tuned.tokenizer.eos_token}[run["name"]]
    assert tuned.tokenizer.convert_ids_to_tokens(closing) == expected
    assert closing in stop_token_ids(tuned.tokenizer)
    assert closing in stop_token_ids(run["served"]["chat"].request_tokenizer)
    exported_eos = GenerationConfig.from_pretrained(run["export"]).eos_token_id
    assert closing in (exported_eos if isinstance(exported_eos, list) else [exported_eos])


def test_chat_endpoint_answers_as_predict(run: dict) -> None:
    tuned = run["tuned"]
    conversation = HELD_OUT[2]
    expected = api.predict(tuned, [{"messages": conversation}])["prediction"][0]
    with TestClient(create_app(run["served"], ServeSettings()), base_url="http://localhost") as client:
        response = client.post("/v1/chat/completions", json={
            "model": "chat", "messages": conversation[:-1], "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"].strip() == expected
        refused = client.post("/v1/completions", json={"model": "chat", "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 400 and "/v1/chat/completions" in refused.text


def test_plain_transformers_generation_matches_predict(run: dict) -> None:
    """The exported folder alone (weights, template, generation config) answers as tunewright does."""
    from transformers import AutoModelForCausalLM

    tuned = run["tuned"]
    conversation = HELD_OUT[0]
    expected = api.predict(tuned, [{"messages": conversation}])["prediction"][0]
    tokenizer = AutoTokenizer.from_pretrained(run["export"])
    model = AutoModelForCausalLM.from_pretrained(run["export"]).eval()
    ids = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        output = model.generate(**ids, max_new_tokens=4)
    text = tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert text == expected
