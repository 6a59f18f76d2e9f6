"""End to end: `tunewright serve` as a real uvicorn process on a free loopback port, driven by the
official `openai` client. Tiny models, so the whole file takes seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from test_serve import make_adapter_run

import tunewright

API_KEY = "e2e-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(runs: dict[str, Path], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "tunewright.cli", "--quiet", "serve", "--port", str(port)]
    for name, path in runs.items():
        command += ["--model", f"{name}={path}"]
    env = {**os.environ, "TUNEWRIGHT_API_KEY": API_KEY}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited early:\n{log_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not come up")


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-e2e")
    return {
        "alpha": make_adapter_run(tiny_model_dir, root / "alpha", 1),
        "beta": make_adapter_run(tiny_model_dir, root / "beta", 2),
    }


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str


@pytest.fixture(scope="module")
def server(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server process for the whole file; the last test stops it with SIGTERM."""
    process, url = start_server(runs, tmp_path_factory.mktemp("serve-log") / "server.log")
    yield Server(process, url)
    assert stop(process) == 0


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models_and_the_api_key(client: openai.OpenAI, server: Server) -> None:
    ids = {model.id for model in client.models.list()}
    assert {"alpha", "beta"} <= ids and len(ids) == 3  # the two adapters and their shared base
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # open without a key


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_adapter_by_name_equals_tunewright_predict(
    client: openai.OpenAI, runs: dict[str, Path], name: str
) -> None:
    words = ["cat", "dog", "sun"]
    expected = tunewright.predict(tunewright.load(runs[name]), [{"word": word} for word in words])
    for word, prediction in zip(words, expected["prediction"], strict=True):
        # The prompt is the value of the run's input column; the server renders "say {word}:" as predict does.
        completion = client.completions.create(model=name, prompt=word, max_tokens=8, temperature=0)
        assert completion.choices[0].text.strip() == prediction
        assert completion.usage is not None and completion.usage.prompt_tokens == len(f"say {word}:")


def test_chat_completion(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="beta",
        messages=[{"role": "user", "content": "say cat:"}],
        max_tokens=8,
        temperature=0,
        extra_body={"raw_prompt": True},  # beta trained without a chat template
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens > 0


def test_streamed_equals_non_streamed_greedy(client: openai.OpenAI) -> None:
    for model in ("alpha", "beta"):
        whole = client.completions.create(model=model, prompt="say sea:", max_tokens=12, temperature=0)
        stream = client.completions.create(
            model=model, prompt="say sea:", max_tokens=12, temperature=0, stream=True
        )
        assert "".join(chunk.choices[0].text for chunk in stream) == whole.choices[0].text
        messages = [{"role": "user", "content": "say sea:"}]
        raw = {"raw_prompt": True}  # the runs trained without a chat template
        chat = client.chat.completions.create(
            model=model, messages=messages, max_tokens=12, temperature=0, extra_body=raw  # type: ignore[arg-type]
        )
        chat_stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=12,  # type: ignore[arg-type]
            temperature=0,
            stream=True,
            extra_body=raw,
        )
        joined = "".join(chunk.choices[0].delta.content or "" for chunk in chat_stream if chunk.choices)
        assert joined == chat.choices[0].message.content


def test_errors_reach_the_client_as_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="alpha", prompt="x", max_tokens=100000)
    assert "max_tokens" in str(caught.value)


def test_sigterm_finishes_the_request_in_flight_and_exits_cleanly(
    server: Server, client: openai.OpenAI
) -> None:
    fields = {"model": "beta", "prompt": "say dog:", "max_tokens": 200, "temperature": 0}
    expected = client.completions.create(**fields).choices[0].text  # type: ignore[call-overload]
    pieces: list[str] = []
    first_piece = threading.Event()

    def read_stream() -> None:
        for chunk in client.completions.create(**fields, stream=True):  # type: ignore[call-overload]
            pieces.append(chunk.choices[0].text)
            first_piece.set()

    reader = threading.Thread(target=read_stream)
    reader.start()
    assert first_piece.wait(60)
    server.process.send_signal(signal.SIGTERM)
    reader.join(60)
    assert "".join(pieces) == expected  # the stream in flight ran to its end
    assert server.process.wait(60) == 0
