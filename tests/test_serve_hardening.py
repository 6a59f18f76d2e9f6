"""The server against clients that misbehave: slow, silent, greedy or from the wrong origin.

In process (TestClient, or the ASGI app called directly where a client must hold back bytes or
never read) and, for what only a socket shows (half-sent headers, the connection cap), a real
uvicorn server on a loopback port, run in a thread with the settings `tunewright serve` uses.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from test_serve import make_adapter_run
from typer.testing import CliRunner

from tunewright.cli import app as cli_app
from tunewright.config import ServeSettings
from tunewright.serving.app import create_app
from tunewright.serving.connections import HeaderDeadline, uvicorn_config
from tunewright.serving.limits import allowed_host_names, host_name
from tunewright.serving.pool import ServedModel, load_models

COMPLETION = {"model": "alpha", "prompt": "say a:", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter_run(tiny_model_dir, tmp_path_factory.mktemp("hardening") / "alpha", 1)


@pytest.fixture(scope="module")
def models(run_dir: Path) -> dict[str, ServedModel]:
    return load_models([f"alpha={run_dir}"])


@pytest.fixture
def make_client(models: dict[str, ServedModel]) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        client = TestClient(create_app(models, ServeSettings(**settings)), base_url="http://localhost")
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@contextmanager
def real_server(models: dict[str, ServedModel], **settings: Any) -> Iterator[str]:
    """`tunewright serve`'s uvicorn setup (connections.uvicorn_config) on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    serve_settings = ServeSettings(port=port, **settings)
    # log_config None: uvicorn leaves this process's logging alone, so its records reach caplog
    config = uvicorn_config(create_app(models, serve_settings), serve_settings, "warning", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not come up"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(60)


def asgi_scope(path: str, body: bytes, host: bytes = b"localhost") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 1),
        "headers": [(b"host", host), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }


def status_of(sent: list[dict[str, Any]]) -> int:
    return int(next(message["status"] for message in sent if message["type"] == "http.response.start"))


# ---- a timed-out /predict frees the worker; rows per request are capped ----------------------------


def test_a_timed_out_predict_stops_and_the_next_request_is_answered(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(request_timeout_s=3.0)
    server = client.app.state.server  # type: ignore[attr-defined]
    rows = [{"word": f"w{index}"} for index in range(1000)]  # 125 batches: far more than 3 s of work
    started = time.monotonic()
    response = client.post("/predict", json={"model": "alpha", "rows": rows})
    assert response.status_code == 504, response.text
    assert time.monotonic() - started < 8
    answered = client.post("/v1/completions", json=COMPLETION)
    assert answered.status_code == 200, answered.text  # the predict stopped within one batch
    assert server.batcher.pending == 0


def test_predict_rows_over_the_limit_are_refused_naming_it(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_predict_rows=3)
    response = client.post("/predict", json={"model": "alpha", "rows": [{"word": "x"}] * 4})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "rows" and "at most 3" in error["message"] and "--max-predict-rows" in error["message"]
    rows = [{"word": word} for word in ("a", "b", "c")]
    assert client.post("/predict", json={"model": "alpha", "rows": rows}).status_code == 200


def test_predict_in_chunks_equals_one_call(make_client: Callable[..., TestClient], run_dir: Path) -> None:
    import tunewright

    rows = [{"word": f"w{index}"} for index in range(19)]  # 3 chunks of batch 8
    expected = tunewright.predict(tunewright.load(run_dir), rows)["prediction"].tolist()
    response = make_client().post("/predict", json={"model": "alpha", "rows": rows})
    assert [record["prediction"] for record in response.json()["predictions"]] == expected


# ---- the concurrency limit counts a request from admission -----------------------------------------


def test_clients_holding_back_their_last_byte_cannot_pass_the_limit(models: dict[str, ServedModel]) -> None:
    app = create_app(models, ServeSettings(max_concurrent_requests=2))
    body = json.dumps(COMPLETION).encode()

    async def main() -> list[int]:
        last_byte = asyncio.Event()

        async def one_client() -> int:
            parts = [{"type": "http.request", "body": body[:-1], "more_body": True}]
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                if parts:
                    return parts.pop(0)
                await last_byte.wait()
                return {"type": "http.request", "body": body[-1:], "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await app(asgi_scope("/v1/completions", body), receive, send)
            return status_of(sent)

        clients = [asyncio.create_task(one_client()) for _ in range(8)]
        await asyncio.sleep(0.5)  # all eight are in, six refused at once
        last_byte.set()
        return list(await asyncio.gather(*clients))

    statuses = asyncio.run(main())
    assert sorted(statuses) == [200, 200] + [429] * 6


# ---- a half-sent body, a client that never reads ---------------------------------------------------


def run_asgi(app: Any, scope: dict[str, Any], receive: Any, send_blocks_after: int | None) -> tuple[list[Any], float]:
    """Call the app; `send` never returns after `send_blocks_after` messages (a client that stops reading)."""

    async def main() -> tuple[list[Any], float]:
        sent: list[Any] = []

        async def send(message: dict[str, Any]) -> None:
            if send_blocks_after is not None and len(sent) >= send_blocks_after:
                await asyncio.sleep(3600)
            sent.append(message)

        started = time.monotonic()
        await asyncio.wait_for(app(scope, receive, send), 30)
        return sent, time.monotonic() - started

    return asyncio.run(main())


def test_a_half_sent_body_gets_408_and_frees_its_slot(models: dict[str, ServedModel]) -> None:
    app = create_app(models, ServeSettings(read_timeout_s=0.5))
    body = json.dumps(COMPLETION).encode()
    parts = [{"type": "http.request", "body": body[:10], "more_body": True}]

    async def receive() -> dict[str, Any]:
        if parts:
            return parts.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    sent, took_s = run_asgi(app, asgi_scope("/v1/completions", body), receive, None)
    assert status_of(sent) == 408 and took_s < 5
    assert (b"connection", b"close") in sent[0]["headers"]
    assert app.state.server.counter["in_flight"] == 0


@pytest.mark.parametrize("limits", [{"send_timeout_s": 0.5}, {"request_timeout_s": 0.5, "send_timeout_s": 30}])
def test_a_stream_nobody_reads_ends_and_frees_its_slot(
    models: dict[str, ServedModel], limits: dict[str, float]
) -> None:
    app = create_app(models, ServeSettings(**limits))
    body = json.dumps({**COMPLETION, "stream": True, "max_tokens": 200}).encode()
    parts = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if parts:
            return parts.pop(0)
        await asyncio.sleep(3600)  # the client never hangs up: it just stops reading
        raise AssertionError("unreachable")

    sent, took_s = run_asgi(app, asgi_scope("/v1/completions", body), receive, send_blocks_after=2)
    server = app.state.server
    assert took_s < 5 and server.counter["in_flight"] == 0
    deadline = time.monotonic() + 10
    while server.batcher.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.batcher.pending == 0


def test_half_sent_headers_and_bodies_are_closed_by_a_real_server(models: dict[str, ServedModel]) -> None:
    with real_server(models, read_timeout_s=0.5) as url:
        port = int(url.rsplit(":", 1)[1])
        half_headers = socket.create_connection(("127.0.0.1", port))
        half_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        half_body = socket.create_connection(("127.0.0.1", port))
        half_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
        for connection in (half_headers, half_body):
            connection.settimeout(10)
            received = b""
            while chunk := connection.recv(65536):  # b"" once the server closes the connection
                received += chunk
            connection.close()
            assert received == b"" if connection is half_headers else received.startswith(b"HTTP/1.1 408")
        assert httpx.get(f"{url}/health").status_code == 200


def test_uvicorn_runs_with_a_connection_cap_and_a_header_deadline(models: dict[str, ServedModel]) -> None:
    settings = ServeSettings(max_connections=7, read_timeout_s=2.5)
    config = uvicorn_config(create_app(models, settings), settings)
    assert config.limit_concurrency == 7
    assert isinstance(config.http, type) and issubclass(config.http, HeaderDeadline)
    assert config.http.header_timeout_s == 2.5


# ---- API key, Host header, model list, tokenizing off the event loop ------------------------------


def test_an_empty_api_key_is_refused(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="API key is empty"):
        ServeSettings(api_key="")
    runner = CliRunner()
    result = runner.invoke(cli_app, ["serve", "--model", str(run_dir), "--api-key", ""])
    assert result.exit_code != 0 and "--api-key: the API key is empty" in result.output
    result = runner.invoke(cli_app, ["serve", "--model", str(run_dir)], env={"TUNEWRIGHT_API_KEY": ""})
    assert result.exit_code != 0 and "TUNEWRIGHT_API_KEY is set but empty" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_api_key_still_guards_docs_and_openapi(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_key="s3cret")
    for path in ("/docs", "/openapi.json", "/v1/models"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401


@pytest.mark.parametrize(
    ("settings", "accepted", "refused"),
    [
        ({}, ["localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST"], ["evil.example", "evil.example:8000", ""]),
        ({"host": "10.1.2.3"}, ["10.1.2.3:8000"], ["localhost", "evil.example"]),
        ({"host": "0.0.0.0"}, ["anything.example", "10.1.2.3"], []),
        ({"allowed_hosts": ["api.example"]}, ["api.example:443"], ["localhost", "evil.example"]),
        ({"allowed_hosts": ["*"]}, ["evil.example"], []),
    ],
)
def test_only_the_bound_host_names_are_answered(
    settings: dict[str, Any], accepted: list[str], refused: list[str]
) -> None:
    names = allowed_host_names(ServeSettings(**settings))
    for header in accepted:
        assert names is None or host_name(header) in names, header
    for header in refused:
        assert names is not None and host_name(header) not in names, header


def test_a_rebound_host_gets_400_in_openai_shape(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    response = client.get("/v1/models", headers={"Host": "evil.example"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_host"
    assert "--allowed-host evil.example" in response.json()["error"]["message"]
    assert client.get("/v1/models", headers={"Host": "127.0.0.1:8000"}).status_code == 200


def test_the_model_list_reveals_no_local_paths(make_client: Callable[..., TestClient], tiny_model_dir: Path) -> None:
    client = make_client()
    listing = client.get("/v1/models").text
    assert str(tiny_model_dir) not in listing and str(tiny_model_dir.parent) not in listing
    ids = {card["id"] for card in client.get("/v1/models").json()["data"]}
    assert ids == {"alpha", tiny_model_dir.name}


def test_a_huge_prompt_does_not_stall_health(make_client: Callable[..., TestClient], tiny_model_dir: Path) -> None:
    client = make_client(max_body_bytes=8 * 1024 * 1024)
    # The base model takes text as it is; the byte-level test tokenizer needs a second or more for 1 MB.
    body = {"model": tiny_model_dir.name, "prompt": "hello world " * 90_000, "max_tokens": 1}
    thread_result: list[Any] = []
    big = threading.Thread(target=lambda: thread_result.append(client.post("/v1/completions", json=body)))
    started = time.monotonic()
    big.start()
    latencies = []
    while big.is_alive():
        sent = time.monotonic()
        assert client.get("/health").status_code == 200
        latencies.append(time.monotonic() - sent)
        time.sleep(0.02)
    took_s = time.monotonic() - started
    assert thread_result[0].status_code == 400  # far longer than the tiny model's context
    assert took_s > 0.3, "the prompt was tokenized too fast to tell"
    assert max(latencies) < max(0.25, took_s / 3), (max(latencies), took_s)


# ---- every kind of work can be cancelled -----------------------------------------------------------


def forward_calls(served: ServedModel, job: Any) -> int:
    from tunewright.model import base_model
    from tunewright.serving.engine import run_generation

    calls = []
    hook = base_model(served.tuned.model).register_forward_hook(lambda *_: calls.append(1))
    try:
        run_generation([job])
    finally:
        hook.remove()
    return len(calls)


def test_a_cancelled_beam_search_stops(models: dict[str, ServedModel]) -> None:
    from tunewright.serving.engine import GenerationJob

    served = models["alpha"]
    settings = served.defaults.model_copy(update={"num_beams": 2, "do_sample": False})
    prompt = served.request_tokenizer("say a:", add_special_tokens=False)["input_ids"]

    def job(cancelled: bool) -> GenerationJob:
        return GenerationJob(served, prompt, 60, settings, lambda event: None, cancelled=cancelled)

    full = forward_calls(served, job(False))
    assert full > 10, "the beam search ended by itself too early to tell"
    assert forward_calls(served, job(True)) < full / 2
