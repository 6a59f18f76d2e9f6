"""A served run renders requests exactly as training and `tunewright predict` render rows, or refuses them.

Runs of a tiny model: an adapter run without a chat template, an adapter run with one (and a task
line), a zero-shot config with two input columns, one whose prompts are capped short, and a
category config. Each greedy answer through /v1/completions and /v1/chat/completions is checked
against /predict and against `tunewright.predict` on the run loaded on its own. Also: malformed
values (lone surrogates, a temperature too small to sample with, a seed torch cannot take) are 400s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from test_serve import MAX_NEW_TOKENS, assert_openai_error, make_adapter_run, run_config

import tunewright
from tunewright.config import GenerationSettings, ServeSettings
from tunewright.serving.app import create_app
from tunewright.serving.openai_schema import CompletionRequest, sampling_settings
from tunewright.serving.pool import ServedModel, load_models

WORDS = ["cat", "dog", "sun"]
CHAT_PROMPT = {"template": "say {word}:", "task": "Repeat.", "use_chat_template": True}


def zero_shot(base_dir: Path, path: Path, **changes: Any) -> Path:
    path.write_text(yaml.safe_dump(run_config(base_dir, trainer={"type": "none"}, **changes)))
    return path


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rendering")
    return {
        "plain": make_adapter_run(tiny_model_dir, root / "plain", 1),
        "chat": make_adapter_run(tiny_model_dir, root / "chat", 5, prompt=CHAT_PROMPT),
    }


@pytest.fixture(scope="module")
def configs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rendering-configs")
    two_columns = {"input_features": [{"name": "word"}, {"name": "other"}], "prompt": {"template": "{word} {other}:"}}
    category = {"output_features": [{"name": "echo", "type": "category", "labels": ["cat", "dog"]}]}
    return {
        "columns": zero_shot(tiny_model_dir, root / "columns.yaml", **two_columns),
        "short": zero_shot(tiny_model_dir, root / "short.yaml", preprocessing={"max_input_length": 12}),
        "labels": zero_shot(tiny_model_dir, root / "labels.yaml", **category),
    }


@pytest.fixture(scope="module")
def models(runs: dict[str, Path], configs: dict[str, Path]) -> dict[str, ServedModel]:
    return load_models(
        [f"{name}={path}" for name, path in runs.items()], [f"{name}={path}" for name, path in configs.items()]
    )


@pytest.fixture
def client(models: dict[str, ServedModel]) -> Iterator[TestClient]:
    with TestClient(create_app(models, ServeSettings()), base_url="http://localhost") as client:
        yield client


def post(client: TestClient, path: str, body: dict[str, Any]) -> Any:
    return client.post(path, json={"max_tokens": MAX_NEW_TOKENS, **body})


def completion_text(client: TestClient, body: dict[str, Any]) -> str:
    response = post(client, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def chat_text(client: TestClient, body: dict[str, Any]) -> str:
    response = post(client, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


# ---- one run, one answer -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["plain", "chat"])
def test_completion_and_chat_answer_as_predict(client: TestClient, runs: dict[str, Path], name: str) -> None:
    rows = [{"word": word} for word in WORDS]
    expected = tunewright.predict(tunewright.load(runs[name]), rows)["prediction"].tolist()
    response = client.post("/predict", json={"model": name, "rows": rows})
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    assert [row["prediction"] for row in served] == expected
    for word, prediction in zip(WORDS, expected, strict=True):
        # The prompt is the value of the run's one input column, rendered through its template.
        assert completion_text(client, {"model": name, "prompt": word}).strip() == prediction
        if name == "chat":  # the one user message is rendered the same way, then wrapped as training did
            assert chat_text(client, {"model": name, "messages": user(word)}).strip() == prediction
    assert len(set(expected)) > 1  # the answers depend on the prompt


def test_several_prompts_are_each_rendered(client: TestClient, runs: dict[str, Path]) -> None:
    expected = [completion_text(client, {"model": "plain", "prompt": word}) for word in WORDS]
    response = post(client, "/v1/completions", {"model": "plain", "prompt": WORDS})
    assert [choice["text"] for choice in response.json()["choices"]] == expected


def test_raw_prompt_and_token_ids_are_taken_as_they_are(client: TestClient, models: dict[str, ServedModel]) -> None:
    rendered = completion_text(client, {"model": "plain", "prompt": "dog"})
    assert completion_text(client, {"model": "plain", "prompt": "say dog:", "raw_prompt": True}) == rendered
    ids = models["plain"].tuned.tokenizer("say dog:")["input_ids"]
    assert completion_text(client, {"model": "plain", "prompt": ids}) == rendered
    # Without raw_prompt the template applies to the same text: "say say dog::".
    response = post(client, "/v1/completions", {"model": "plain", "prompt": "say dog:"})
    assert response.json()["usage"]["prompt_tokens"] == len("say say dog::")  # one token per byte


def test_the_base_model_takes_prompts_as_they_are(client: TestClient, models: dict[str, ServedModel]) -> None:
    base = next(name for name, served in models.items() if not served.predictable)
    ids = models[base].tuned.tokenizer("say dog:")["input_ids"]
    assert completion_text(client, {"model": base, "prompt": "say dog:"}) == completion_text(
        client, {"model": base, "prompt": ids}
    )
    assert chat_text(client, {"model": base, "messages": user("say dog:")})


# ---- what cannot be rendered as in training is refused -------------------------------------------


def test_chat_is_refused_for_a_run_trained_without_a_chat_template(
    client: TestClient, models: dict[str, ServedModel]
) -> None:
    error = assert_openai_error(
        post(client, "/v1/chat/completions", {"model": "plain", "messages": user("cat")}), 400, "model"
    )
    assert "use_chat_template" in error["message"] and "raw_prompt" in error["message"]
    # raw_prompt asks for the tokenizer's chat template over the messages as they are.
    tokenizer = models["plain"].tuned.tokenizer
    text = tokenizer.apply_chat_template(user("say cat:"), add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    raw = chat_text(client, {"model": "plain", "messages": user("say cat:"), "raw_prompt": True})
    assert raw == completion_text(client, {"model": "plain", "prompt": ids})


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "cat"}],
        [
            {"role": "user", "content": "cat"},
            {"role": "assistant", "content": "cat"},
            {"role": "user", "content": "dog"},
        ],
        [{"role": "assistant", "content": "cat"}],
    ],
)
def test_chat_other_than_one_user_message_is_refused(client: TestClient, messages: list[dict[str, str]]) -> None:
    error = assert_openai_error(
        post(client, "/v1/chat/completions", {"model": "chat", "messages": messages}), 400, "messages"
    )
    assert "one user message" in error["message"] and "raw_prompt" in error["message"]
    assert chat_text(client, {"model": "chat", "messages": messages, "raw_prompt": True})


def test_a_run_with_several_input_columns_takes_rows_not_prompts(client: TestClient) -> None:
    for path, body in [("/v1/completions", {"prompt": "cat"}), ("/v1/chat/completions", {"messages": user("cat")})]:
        error = assert_openai_error(post(client, path, {"model": "columns", **body}), 400, "model")
        assert "word, other" in error["message"] and "/predict" in error["message"]
    assert completion_text(client, {"model": "columns", "prompt": "cat dog:", "raw_prompt": True})
    response = client.post("/predict", json={"model": "columns", "rows": [{"word": "cat", "other": "dog"}]})
    assert response.status_code == 200, response.text


def test_a_category_run_answers_labels_only_through_predict(client: TestClient) -> None:
    for path, body in [("/v1/completions", {"prompt": "cat"}), ("/v1/chat/completions", {"messages": user("cat")})]:
        error = assert_openai_error(post(client, path, {"model": "labels", **body}), 400, "model")
        assert "category" in error["message"] and "/predict" in error["message"]
    prediction = client.post("/predict", json={"model": "labels", "rows": [{"word": "cat"}]}).json()
    assert prediction["predictions"][0]["prediction"] in ("cat", "dog")


def test_a_rendered_prompt_longer_than_the_run_reads_is_refused(client: TestClient) -> None:
    assert completion_text(client, {"model": "short", "prompt": "cat"})  # "say cat:" is 8 tokens of 12
    error = assert_openai_error(
        post(client, "/v1/completions", {"model": "short", "prompt": "a long word"}), 400, "prompt"
    )
    assert "12" in error["message"] and error["code"] == "context_length_exceeded"


# ---- malformed values are 400s, never 500s -------------------------------------------------------


LONE_SURROGATE_BODIES = [
    ("/v1/completions", {"model": "plain", "prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"model": "plain", "prompt": ["cat", "a\udfffb"]}, "prompt"),
    ("/v1/completions", {"model": "\ud800", "prompt": "cat"}, "model"),
    ("/v1/completions", {"model": "plain", "prompt": "cat", "stop": ["\ud800"]}, "stop"),
    ("/v1/completions", {"model": "plain", "prompt": "cat", "logit_bias": {"\ud800": "x"}}, "logit_bias"),
    (
        "/v1/chat/completions",
        {"model": "chat", "messages": [{"role": "user", "content": "\ud800"}]},
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        {"model": "chat", "messages": [{"role": "user", "content": [{"type": "text", "text": "x\ud800"}]}]},
        "messages.0.content",
    ),
    ("/v1/chat/completions", {"model": "\ud800", "messages": [{"role": "user", "content": "cat"}]}, "model"),
    ("/predict", {"model": "plain", "rows": [{"word": "\ud800"}]}, "rows"),
    ("/predict", {"model": "plain", "rows": [{"\ud800": "cat"}]}, "rows"),
    ("/predict", {"model": "\ud800", "rows": [{"word": "cat"}]}, "model"),
]


@pytest.mark.parametrize(("path", "body", "param"), LONE_SURROGATE_BODIES)
def test_a_lone_surrogate_is_a_400(client: TestClient, path: str, body: dict[str, Any], param: str) -> None:
    sent = json.dumps(body)  # ASCII JSON: the surrogate travels as the escape \ud800, as a hostile client sends it
    assert "\\ud" in sent
    response = client.post(path, content=sent, headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400, param)
    assert "surrogate" in error["message"]
    assert completion_text(client, {"model": "plain", "prompt": "cat"})  # the server carries on


def test_surrogate_bytes_in_the_body_are_a_400(client: TestClient) -> None:
    # CESU-8 bytes for U+D800, which Python's JSON reader turns into a lone surrogate.
    sent = b'{"model": "plain", "prompt": "a\xed\xa0\x80"}'
    response = client.post("/v1/completions", content=sent, headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "prompt")


@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 0.0099])
def test_a_temperature_too_small_to_sample_with_is_a_400(client: TestClient, temperature: float) -> None:
    body = {"model": "plain", "prompt": "cat", "temperature": temperature}
    error = assert_openai_error(post(client, "/v1/completions", body), 400, "temperature")
    assert "0.01" in error["message"]
    assert completion_text(client, {**body, "temperature": 0.01, "seed": 3})
    assert completion_text(client, {**body, "temperature": 0})


def test_sampling_settings_never_see_a_tiny_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        CompletionRequest(model="m", prompt="p", temperature=1e-45)
    settings = sampling_settings(GenerationSettings(), CompletionRequest(model="m", prompt="p", temperature=0.01))
    assert settings.do_sample and settings.temperature == 0.01


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_a_seed_torch_cannot_take_is_a_400(client: TestClient, seed: int) -> None:
    body = {"model": "plain", "prompt": "cat", "temperature": 1.0, "seed": seed}
    assert_openai_error(post(client, "/v1/completions", body), 400, "seed")


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_every_seed_torch_takes_is_accepted(client: TestClient, seed: int) -> None:
    body = {"model": "plain", "prompt": "cat", "temperature": 1.0, "seed": seed}
    assert completion_text(client, body) == completion_text(client, body)
