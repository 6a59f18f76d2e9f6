"""The HTTP server in process (TestClient) on tiny models: every endpoint and every error case.

Two adapter runs of one tiny base are built with random (non-identity) LoRA weights, so each
adapter, the base and a zero-shot config all answer differently; every answer is checked against
what `tunewright predict` or plain generation gives for the same model loaded on its own.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import copy_rows
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from typer.testing import CliRunner

import tunewright
from tunewright.cli import app as cli_app
from tunewright.config import GenerationSettings, ServeSettings, load_config
from tunewright.data import encode_prompts
from tunewright.generate import generate_texts
from tunewright.model import load_base_model
from tunewright.run import set_status, start_run
from tunewright.serving.app import create_app
from tunewright.serving.batching import DynamicBatcher, ShuttingDown
from tunewright.serving.engine import Delta, Finished, GenerationJob, _held_back, run_generation
from tunewright.serving.errors import APIError
from tunewright.serving.openai_schema import CompletionRequest, sampling_settings
from tunewright.serving.pool import ServedModel, load_models

WORDS = ["cat", "dog", "sun", "sea"]
MAX_NEW_TOKENS = 8


def run_config(base_dir: Path, **changes: Any) -> dict[str, Any]:
    config = {
        "base_model": str(base_dir),
        "input_features": [{"name": "word"}],
        "output_features": [{"name": "echo", "type": "text"}],
        "prompt": {"template": "say {word}:"},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "generation": {"max_new_tokens": MAX_NEW_TOKENS, "batch_size": 8},
    }
    config.update(changes)
    return config


def make_adapter_run(base_dir: Path, run_dir: Path, seed: int, **changes: Any) -> Path:
    """A complete run folder holding a random LoRA adapter (what training would leave, minus training)."""
    config = load_config(run_config(base_dir, **changes))
    start_run(run_dir, config)
    loaded = load_base_model(str(base_dir), config.backend)
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(loaded.model, lora).save_pretrained(run_dir)
    loaded.tokenizer.save_pretrained(run_dir)
    set_status(run_dir, "complete", weights="adapter")
    return run_dir


def make_category_run(base_dir: Path, run_dir: Path) -> Path:
    """A trained category run (classifier head over a LoRA adapter): labels come from the data."""
    config = run_config(
        base_dir,
        output_features=[{"name": "echo", "type": "category", "decoder": "classifier"}],
        trainer={"epochs": 1, "batch_size": 8, "learning_rate": 0.01},
        preprocessing={"split": [1.0, 0.0, 0.0]},
    )
    return tunewright.train(config, copy_rows(16), run_dir, show_progress=False).run_dir


@dataclass
class Fixture:
    base_dir: Path
    runs: dict[str, Path]
    zero_config: Path
    models: dict[str, ServedModel]


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    root = tmp_path_factory.mktemp("serve")
    runs = {
        "alpha": make_adapter_run(tiny_model_dir, root / "alpha", 1),
        "beta": make_adapter_run(tiny_model_dir, root / "beta", 2),
        "labels": make_category_run(tiny_model_dir, root / "labels"),
    }
    zero_config = root / "zero.yaml"
    zero = run_config(tiny_model_dir, trainer={"type": "none"}, prompt={"template": "repeat {word}:"})
    zero_config.write_text(yaml.safe_dump(zero))
    models = load_models([f"{name}={path}" for name, path in runs.items()], [f"zero={zero_config}"])
    return Fixture(tiny_model_dir, runs, zero_config, models)


@pytest.fixture
def make_client(served: Fixture) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        # localhost: the server answers only to the names it is bound to (127.0.0.1 by default)
        client = TestClient(create_app(served.models, ServeSettings(**settings)), base_url="http://localhost")
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture(scope="module")
def references(served: Fixture) -> dict[str, list[str]]:
    """What `tunewright predict` gives for each model, loaded on its own (no sharing, no server)."""
    rows = [{"word": word} for word in WORDS]
    result = {
        name: tunewright.predict(tunewright.load(path), rows)["prediction"].tolist()
        for name, path in served.runs.items()
        if name != "labels"
    }
    result["zero"] = tunewright.predict(tunewright.from_config(served.zero_config), rows)[
        "prediction"
    ].tolist()
    plain = load_base_model(str(served.base_dir), load_config(run_config(served.base_dir)).backend)
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    ids = encode_prompts([f"say {word}:" for word in WORDS], plain.tokenizer)
    result["base"] = generate_texts(plain.model, plain.tokenizer, ids, settings)
    return result


def prompt_for(model: str, word: str) -> str:
    """A run's prompt is the value of its input column (the server renders it); the base takes text as it is."""
    return f"say {word}:" if model == "base" else word


def complete(client: TestClient, model: str, prompt: Any, **fields: Any) -> dict[str, Any]:
    response = client.post(
        "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_NEW_TOKENS, **fields}
    )
    assert response.status_code == 200, response.text
    return response.json()


def sse_events(client: TestClient, path: str, body: dict[str, Any]) -> list[Any]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def assert_openai_error(response: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    return error


@dataclass(eq=False)
class Gate:
    """A real work item that holds the worker until released, so requests line up deterministically."""

    release: threading.Event = field(default_factory=threading.Event)
    running: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    batch_key: None = None

    def fail(self, error: BaseException) -> None:
        self.release.set()

    def run_batch(self, batch: list[Gate]) -> None:
        self.running.set()
        assert self.release.wait(30)


def hold_worker(batcher: DynamicBatcher[Any]) -> Gate:
    """Occupy the batcher's worker until the returned gate is released."""
    gate = Gate()
    batcher.submit(gate)
    assert gate.running.wait(30)
    return gate


def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def in_background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()
    return thread, result


# ---- models and sharing --------------------------------------------------------------------------


def test_health_and_models_list_runs_adapters_and_base(client: TestClient, served: Fixture) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"] == 5
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    base = served.base_dir.name  # a local base model is named by its folder, never by its path
    assert set(cards) == {"alpha", "beta", "labels", "zero", base}
    assert cards["alpha"]["kind"] == cards["beta"]["kind"] == cards["labels"]["kind"] == "adapter"
    assert cards["alpha"]["parent"] == cards["beta"]["parent"] == base
    assert cards[base]["kind"] == "base" and cards["zero"]["kind"] == "model"
    assert client.get("/v1/models/alpha").json()["id"] == "alpha"
    assert_openai_error(client.get("/v1/models/nope"), 404, "model")


def test_adapters_share_one_copy_of_the_base_weights(served: Fixture) -> None:
    models = served.models
    shared = models["alpha"].tuned.model
    assert all(model.tuned.model is shared for model in models.values())
    embeddings = {id(model.tuned.model.get_input_embeddings().weight) for model in models.values()}
    assert len(embeddings) == 1
    assert models["alpha"].adapter != models["beta"].adapter
    base = served.base_dir.name
    assert models[base].adapter is None and not models[base].predictable


# ---- completions and chat ------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["alpha", "beta", "zero", "base"])
def test_completion_equals_predict_for_each_model(
    client: TestClient, served: Fixture, references: dict[str, list[str]], model: str
) -> None:
    name = served.base_dir.name if model == "base" else model
    for word, expected in zip(WORDS, references[model], strict=True):
        body = complete(client, name, prompt_for(model, word))
        assert body["object"] == "text_completion" and body["model"] == name
        assert body["choices"][0]["text"].strip() == expected
    assert len(set(references["alpha"]) & set(references["beta"])) < len(WORDS)  # adapters really differ


def test_completion_usage_and_finish_reason(client: TestClient) -> None:
    body = complete(client, "beta", "dog", max_tokens=3)
    choice = body["choices"][0]
    usage = body["usage"]
    assert usage["prompt_tokens"] == len("say dog:")  # rendered; one token per byte
    assert usage["completion_tokens"] <= 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] in ("length", "stop")
    assert choice["finish_reason"] == "length" or usage["completion_tokens"] < 3


def test_several_prompts_and_n_choices(client: TestClient, references: dict[str, list[str]]) -> None:
    body = complete(client, "alpha", ["cat", "dog"], n=2)
    choices = body["choices"]
    assert [choice["index"] for choice in choices] == [0, 1, 2, 3]
    texts = [choice["text"].strip() for choice in choices]
    assert texts == [references["alpha"][0]] * 2 + [references["alpha"][1]] * 2  # greedy: choices agree
    assert body["usage"]["prompt_tokens"] == 2 * len("say cat:")


def test_token_id_prompts_equal_text_prompts(client: TestClient, served: Fixture) -> None:
    ids = encode_prompts(["say sun:"], served.models["alpha"].tuned.tokenizer)[0]
    assert (
        complete(client, "alpha", ids)["choices"][0]["text"]
        == complete(client, "alpha", "sun")["choices"][0]["text"]
    )


def test_chat_completion_uses_the_chat_template(client: TestClient, served: Fixture) -> None:
    ids = encode_prompts(["say cat:"], served.models["beta"].tuned.tokenizer, use_chat_template=True)[0]
    expected = complete(client, "beta", ids)["choices"][0]["text"]
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": "beta",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "say cat:"}]}],
            "max_completion_tokens": MAX_NEW_TOKENS,
            "raw_prompt": True,  # beta trained without a chat template (see test_serve_rendering.py)
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_stop_string_cuts_the_text(client: TestClient) -> None:
    full = complete(client, "beta", "say dog:")["choices"][0]["text"]
    stop = full[2:4]
    cut = complete(client, "beta", "say dog:", stop=[stop])["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    streamed = sse_events(
        client,
        "/v1/completions",
        {"model": "beta", "prompt": "say dog:", "stop": stop, "max_tokens": MAX_NEW_TOKENS, "stream": True},
    )
    assert "".join(event["choices"][0]["text"] for event in streamed) == cut["text"]


def test_seed_makes_sampling_reproducible(client: TestClient) -> None:
    fields = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 6}
    first = complete(client, "alpha", "say sea:", **fields)["choices"][0]["text"]
    assert complete(client, "alpha", "say sea:", **fields)["choices"][0]["text"] == first


def test_sampling_settings_follow_temperature() -> None:
    defaults = GenerationSettings()
    greedy = sampling_settings(defaults, CompletionRequest(model="m", prompt="p", temperature=0))
    assert not greedy.do_sample
    sampled = sampling_settings(
        defaults, CompletionRequest(model="m", prompt="p", temperature=0.7, top_p=0.5)
    )
    assert sampled.do_sample and sampled.temperature == 0.7 and sampled.top_p == 0.5
    assert sampling_settings(defaults, CompletionRequest(model="m", prompt="p")) == defaults


def test_top_p_on_a_greedy_request_is_refused_not_ignored() -> None:
    with pytest.raises(APIError, match="top_p takes effect only when sampling"):
        sampling_settings(GenerationSettings(), CompletionRequest(model="m", prompt="p", top_p=0.5))
    sampling = GenerationSettings(do_sample=True, temperature=0.8)
    assert sampling_settings(sampling, CompletionRequest(model="m", prompt="p", top_p=0.5)).top_p == 0.5


# ---- streaming -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["alpha", "beta"])
def test_streamed_completion_joins_to_the_greedy_answer(client: TestClient, model: str) -> None:
    for word in WORDS:
        expected = complete(client, model, word)["choices"][0]
        events = sse_events(
            client,
            "/v1/completions",
            {
                "model": model,
                "prompt": word,
                "max_tokens": MAX_NEW_TOKENS,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        texts = [event["choices"][0]["text"] for event in events if event["choices"]]
        assert "".join(texts) == expected["text"]
        finals = [event["choices"][0]["finish_reason"] for event in events if event["choices"]]
        assert finals[-1] == expected["finish_reason"] and all(reason is None for reason in finals[:-1])
        assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens"] == len(f"say {word}:")


def test_streamed_chat_joins_to_the_answer(client: TestClient) -> None:
    body = {
        "model": "beta",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say sun:"}],
        "max_tokens": MAX_NEW_TOKENS,
        "raw_prompt": True,
    }
    expected = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    events = sse_events(client, "/v1/chat/completions", {**body, "stream": True})
    assert all(event["object"] == "chat.completion.chunk" for event in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    joined = "".join(event["choices"][0]["delta"].get("content", "") for event in events)
    assert joined == expected and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_held_back_text_never_ends_inside_a_character_or_a_stop_string() -> None:
    assert _held_back("abc\ufffd", ()) == "abc"
    assert _held_back("hello wor", ("world",)) == "hello "
    assert _held_back("hello", ("xyz",)) == "hello"


# ---- /predict ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["alpha", "zero"])
def test_predict_endpoint_returns_what_tunewright_predict_returns(
    client: TestClient, model: str, references: dict[str, list[str]]
) -> None:
    response = client.post("/predict", json={"model": model, "rows": [{"word": word} for word in WORDS]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model
    assert body["predictions"] == [
        {"word": word, "prediction": text} for word, text in zip(WORDS, references[model], strict=True)
    ]


def test_predict_endpoint_gives_category_labels_with_probabilities(
    client: TestClient, served: Fixture
) -> None:
    rows = [{"word": word} for word in WORDS]
    expected = tunewright.predict(tunewright.load(served.runs["labels"]), rows, all_probabilities=True)
    response = client.post("/predict", json={"model": "labels", "rows": rows, "all_probabilities": True})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    expected_records = json.loads(expected.to_json(orient="records"))
    assert [row["prediction"] for row in predictions] == [row["prediction"] for row in expected_records]
    assert set(predictions[0]) == set(expected_records[0]) and "prediction_probability" in predictions[0]
    for got, want in zip(predictions, expected_records, strict=True):
        assert {key: value for key, value in got.items() if key.startswith("prob")} == pytest.approx(
            {key: value for key, value in want.items() if key.startswith("prob")}, rel=1e-5
        )


def test_predict_errors(client: TestClient, served: Fixture) -> None:
    assert_openai_error(
        client.post("/predict", json={"model": "alpha", "rows": [{"wrd": "cat"}]}), 400, "rows"
    )
    assert_openai_error(client.post("/predict", json={"model": "alpha", "rows": []}), 400, "rows")
    assert_openai_error(client.post("/predict", json={"model": "alpha", "rows": [{"word": {"a": 1}}]}), 400)
    assert_openai_error(
        client.post("/predict", json={"model": served.base_dir.name, "rows": [{"word": "x"}]}), 400, "model"
    )
    assert_openai_error(
        client.post("/predict", json={"model": "nope", "rows": [{"word": "x"}]}), 404, "model"
    )


# ---- adapters under concurrency and batching -----------------------------------------------------


def test_concurrent_requests_for_different_adapters_never_bleed(
    make_client: Callable[..., TestClient], served: Fixture, references: dict[str, list[str]]
) -> None:
    client = make_client(max_batch_size=8, batch_wait_ms=50)
    server = client.app.state.server  # type: ignore[attr-defined]
    gate = hold_worker(server.batcher)  # every request below is queued before any runs
    names = {"alpha": "alpha", "beta": "beta", "zero": "zero", "base": served.base_dir.name}
    calls = [(model, index) for _ in range(3) for model in names for index in range(len(WORDS))]
    threads = [
        in_background(lambda m=model, i=index: (m, i, complete(client, names[m], prompt_for(m, WORDS[i]))))
        for model, index in calls
    ]
    wait_until(lambda: server.batcher.pending == len(calls))
    gate.release.set()
    for thread, _ in threads:
        thread.join(60)
    for _, result in threads:
        model, index, body = result[0]
        assert body["choices"][0]["text"].strip() == references[model][index], (model, index)
    health = client.get("/health").json()
    assert 1 < health["largest_batch"] <= 8  # requests were batched, within the limit


def test_batching_off_runs_one_request_per_batch(
    make_client: Callable[..., TestClient], references: dict[str, list[str]]
) -> None:
    client = make_client(max_batch_size=1)
    server = client.app.state.server  # type: ignore[attr-defined]
    gate = hold_worker(server.batcher)
    threads = [in_background(lambda w=word: complete(client, "alpha", w)) for word in WORDS]
    wait_until(lambda: server.batcher.pending == len(WORDS))
    gate.release.set()
    for thread, _ in threads:
        thread.join(60)
    assert [result[0]["choices"][0]["text"].strip() for _, result in threads] == references["alpha"]
    assert server.batcher.largest_batch == 1


# ---- limits and errors ---------------------------------------------------------------------------


def test_api_key_is_required_except_for_health(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_key="s3cret")
    assert client.get("/health").status_code == 200
    assert_openai_error(client.get("/v1/models"), 401)
    assert_openai_error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    error = assert_openai_error(client.post("/v1/completions", json={"model": "alpha", "prompt": "x"}), 401)
    assert error["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_body_larger_than_the_limit_is_413(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=200)
    big = {"model": "alpha", "prompt": "x" * 500}
    assert_openai_error(client.post("/v1/completions", json=big), 413)
    chunks = iter([json.dumps(big).encode()[:150], json.dumps(big).encode()[150:]])
    response = client.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert_openai_error(response, 413)  # chunked, no Content-Length: counted as it arrives
    assert client.post("/v1/completions", json={"model": "alpha", "prompt": "say x:"}).status_code == 200


def test_too_many_concurrent_requests_is_429_and_the_first_still_finishes(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_concurrent_requests=1)
    server = client.app.state.server  # type: ignore[attr-defined]
    gate = hold_worker(server.batcher)
    thread, result = in_background(
        lambda: client.post("/v1/completions", json={"model": "alpha", "prompt": "say a:"})
    )
    wait_until(lambda: server.batcher.pending == 1)
    error = assert_openai_error(
        client.post("/v1/completions", json={"model": "alpha", "prompt": "say b:"}), 429
    )
    assert error["code"] == "rate_limit_exceeded"
    assert client.get("/health").status_code == 200  # not counted against the limit
    gate.release.set()
    thread.join(60)
    assert result[0].status_code == 200


def test_request_timeout_is_504_and_cancels_the_work(make_client: Callable[..., TestClient]) -> None:
    client = make_client(request_timeout_s=0.2)
    server = client.app.state.server  # type: ignore[attr-defined]
    gate = hold_worker(server.batcher)
    assert_openai_error(client.post("/v1/completions", json={"model": "alpha", "prompt": "say a:"}), 504)
    gate.release.set()
    wait_until(lambda: server.batcher.pending == 0)
    assert server.batcher.batches_run == 1  # only the gate ran: the timed-out job was skipped
    assert client.post("/v1/completions", json={"model": "alpha", "prompt": "say a:"}).status_code == 200


def test_client_disconnect_cancels_the_work(make_client: Callable[..., TestClient]) -> None:
    import asyncio

    client = make_client()
    app, server = client.app, client.app.state.server  # type: ignore[attr-defined]
    gate = hold_worker(server.batcher)
    body = json.dumps({"model": "alpha", "prompt": "say a:"}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "server": ("test", 80),
        "client": ("test", 1),
        "headers": [
            (b"host", b"localhost"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }

    async def call() -> list[dict[str, Any]]:
        incoming = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict[str, Any]] = []
        hung_up: list[float] = []

        async def receive() -> dict[str, Any]:
            if incoming:
                hung_up.append(time.monotonic() + 0.3)  # the client hangs up while its job waits
                return incoming.pop(0)
            if time.monotonic() < hung_up[0]:
                await asyncio.sleep(3600)  # nothing yet: the server's poll gives up at once
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return sent

    sent = asyncio.run(call())
    assert sent[0]["status"] == 499
    gate.release.set()
    wait_until(lambda: server.batcher.pending == 0)
    assert server.batcher.batches_run == 1  # the abandoned job never ran


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "alpha"}, "prompt"),
        ({"model": "alpha", "prompt": "x", "temperature": "hot"}, "temperature"),
        ({"model": "alpha", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "alpha", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "alpha", "prompt": "x", "n": 0}, "n"),
        ({"model": "alpha", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "alpha", "prompt": "x", "max_tokens": 100000}, "max_tokens"),
        ({"model": "alpha", "prompt": "x", "logprobs": 2}, "logprobs"),
        ({"model": "alpha", "prompt": "x", "echo": True}, "echo"),
        ({"model": "alpha", "prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"model": "alpha", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "alpha", "prompt": "", "raw_prompt": True}, "prompt"),
        ({"model": "alpha", "prompt": []}, "prompt"),
        ({"model": "alpha", "prompt": [1, 99999]}, "prompt"),
        ({"model": "alpha", "prompt": "x" * 300}, "prompt"),
        ({"model": "alpha", "prompt": ["x"] * 20, "n": 10}, "n"),
        ({"model": "nope", "prompt": "x"}, "model"),
    ],
)
def test_bad_completion_requests_get_a_4xx_in_openai_shape(
    client: TestClient, body: dict[str, Any], param: str
) -> None:
    response = client.post("/v1/completions", json=body)
    assert 400 <= response.status_code < 500
    assert_openai_error(response, response.status_code, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "alpha", "messages": []}, "messages"),
        ({"model": "alpha", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        (
            {
                "model": "alpha",
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function"}],
            },
            "tools",
        ),
        ({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
        (
            {
                "model": "alpha",
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
        ({"model": "alpha", "messages": [{"role": "user", "content": "x" * 300}], "raw_prompt": True}, "messages"),
    ],
)
def test_bad_chat_requests_get_a_4xx_in_openai_shape(
    client: TestClient, body: dict[str, Any], param: str
) -> None:
    assert_openai_error(client.post("/v1/chat/completions", json=body), 400, param)


def test_malformed_bodies_unknown_paths_and_methods(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    assert_openai_error(client.post("/v1/completions", content=b"{not json", headers=headers), 400)
    assert_openai_error(client.post("/v1/completions", content=b"[1, 2]", headers=headers), 400)
    assert_openai_error(client.post("/v1/completions", content=b"", headers=headers), 400)
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/completions"), 405)
    # Fields the server does not know are ignored, as OpenAI-compatible servers do.
    assert (
        client.post(
            "/v1/completions", json={"model": "alpha", "prompt": "say x:", "user": "u", "metadata": {"a": 1}}
        ).status_code
        == 200
    )


# ---- the engine and the batcher on their own -----------------------------------------------------


def test_cancelled_row_stops_generating(served: Fixture) -> None:
    events: list[Any] = []
    settings = GenerationSettings(max_new_tokens=40)
    ids = encode_prompts(["say dog:"], served.models["beta"].tuned.tokenizer)[0]

    def sink(event: Any) -> None:
        events.append(event)
        job.cancelled = True  # the client goes away after the first piece of text

    job = GenerationJob(served.models["beta"], ids, 40, settings, sink, stream=True)
    run_generation([job])
    assert len(events) == 1 and isinstance(events[0], Delta)
    assert not any(isinstance(event, Finished) for event in events)


def test_greedy_batches_run_our_loop_with_the_same_rows_as_generate(served: Fixture, monkeypatch) -> None:
    """Per-row limits, stop strings and streaming give the same events through the greedy loop
    (packed prefill, finished rows leave the batch) as through `generate`."""
    from tunewright import generate

    tokenizer = served.models["beta"].tuned.tokenizer
    settings = GenerationSettings(max_new_tokens=12)
    prompt_ids = encode_prompts(["say dog:", "say a cat and an owl:", "x", "say sun:"], tokenizer)

    def events_of_one_batch(stop: tuple[str, ...]) -> list[list[Any]]:
        events: list[list[Any]] = [[] for _ in prompt_ids]
        jobs = [GenerationJob(served.models["beta"], ids, limit, settings, events[index].append, index=index,
                              stop=stop if index == 0 else (), stream=index == 3)
                for index, (ids, limit) in enumerate(zip(prompt_ids, [12, 3, 12, 7], strict=True))]
        run_generation(jobs)
        return events

    calls: list[int] = []
    greedy_decode = generate.greedy_decode
    monkeypatch.setattr(generate, "greedy_decode", lambda *args, **kwargs: calls.append(1) or
                        greedy_decode(*args, **kwargs))
    first_text = events_of_one_batch(())[0][-1].text
    stop = (first_text[3:5],)  # row 0 stops inside its answer
    ours = events_of_one_batch(stop)
    monkeypatch.setattr(generate, "uses_greedy_loop", lambda model, settings: False)
    theirs = events_of_one_batch(stop)
    assert calls == [1, 1] and ours == theirs
    finished = [row[-1] for row in ours]
    assert all(isinstance(event, Finished) for event in finished)
    assert finished[0].finish_reason == "stop" and finished[0].text == first_text[: first_text.index(stop[0])]
    assert finished[1].completion_tokens <= 3 and finished[3].completion_tokens <= 7
    assert any(isinstance(event, Delta) for event in ours[3])


@dataclass(eq=False)
class Item:
    key: str | None
    batches: list[list[str]]
    name: str = ""
    cancelled: bool = False
    errors: list[BaseException] = field(default_factory=list)

    @property
    def batch_key(self) -> str | None:
        return self.key

    def fail(self, error: BaseException) -> None:
        self.errors.append(error)

    def run_batch(self, batch: list[Item]) -> None:
        self.batches.append([item.name for item in batch])


def test_batcher_groups_by_key_up_to_the_limit_in_arrival_order() -> None:
    batcher: DynamicBatcher[Any] = DynamicBatcher(max_batch_size=2, wait_s=0.0)
    batches: list[list[str]] = []
    gate = hold_worker(batcher)
    items = [
        Item("a", batches, "a1"),
        Item("b", batches, "b1"),
        Item("a", batches, "a2"),
        Item("a", batches, "a3", cancelled=True),
        Item("a", batches, "a4"),
        Item(None, batches, "solo"),
    ]
    for item in items:
        batcher.submit(item)
    gate.release.set()
    wait_until(lambda: batcher.pending == 0 and len(batches) == 4)
    batcher.stop(5)
    assert batches == [["a1", "a2"], ["b1"], ["a4"], ["solo"]]


def test_batcher_stop_fails_waiting_work() -> None:
    batcher: DynamicBatcher[Any] = DynamicBatcher(max_batch_size=4, wait_s=0.0)
    batches: list[list[str]] = []
    gate = hold_worker(batcher)
    waiting = Item("a", batches, "w")
    batcher.submit(waiting)
    threading.Timer(0.1, gate.release.set).start()
    batcher.stop(10)
    assert batches == [] and isinstance(waiting.errors[0], ShuttingDown)
    late = Item("a", batches, "late")
    batcher.submit(late)
    assert isinstance(late.errors[0], ShuttingDown)


def test_batcher_stop_outlasts_its_timeout_rather_than_leave_the_worker_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Exiting while the worker is inside torch aborts the process, so stop() waits for the batch to end."""
    batcher: DynamicBatcher[Any] = DynamicBatcher(max_batch_size=1, wait_s=0.0)
    gate = hold_worker(batcher)
    threading.Timer(0.5, gate.release.set).start()
    with caplog.at_level(logging.WARNING, logger="tunewright.serving.batching"):
        batcher.stop(0.05)
    assert gate.release.is_set() and not batcher._thread.is_alive()  # type: ignore[union-attr]
    assert "waiting for the batch in progress" in caplog.text


# ---- the CLI command -----------------------------------------------------------------------------


def test_serve_command_needs_a_model_and_valid_limits(served: Fixture) -> None:
    runner = CliRunner()
    result = runner.invoke(cli_app, ["serve"])
    assert result.exit_code == 1 and "nothing to serve" in result.output
    result = runner.invoke(cli_app, ["serve", "--model", str(served.runs["alpha"]), "--max-batch-size", "0"])
    assert result.exit_code == 1 and "--max-batch-size" in result.output
    result = runner.invoke(cli_app, ["serve", "--model", str(served.base_dir / "missing")])
    assert result.exit_code == 5 and "run folder not found" in result.output
