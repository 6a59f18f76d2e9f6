"""A real server on loopback under a fixed-time mix of hostile clients and well-formed ones.

The mix: half-sent headers and bodies, streams nobody reads, /predict far too large (waited for,
abandoned, or over the row limit), bodies over the size limit, bad JSON, text with a lone
surrogate, a temperature of 1e-45, a seed of 2**64, and alongside them well-formed completions,
chats, streams, predictions and model lists, while /health is polled. Afterwards: no 500, no slot
left taken, every well-formed request answered, /health quick throughout.

`HostileMix` is also what `bench/serve_load.py --hostile SECONDS` runs, for longer, against
`tunewright serve` on smollm2-135m.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

# Statuses each hostile kind may get; a well-formed request must get 200.
EXPECTED = {
    "half_headers": {"closed"},
    "half_body": {408},
    "never_read_stream": {"left"},
    "huge_predict_waited": {200, 504},  # answered if the machine is quick enough, else cut at the timeout
    "huge_predict_abandoned": {"abandoned"},
    "predict_over_limit": {400},
    "oversize_body": {413},
    "bad_json": {400},
    "lone_surrogate": {400},
    "tiny_temperature": {400},
    "huge_seed": {400},
}


@dataclass
class HostileMix:
    """Hostile and well-formed clients against `url` for `seconds`; `outcomes` holds (kind, status)."""

    url: str
    model: str
    column: str
    seconds: float
    huge_rows: int = 400
    over_limit_rows: int = 250
    oversize_bytes: int = 80_000
    client_timeout_s: float = 60.0
    outcomes: list[tuple[str, Any]] = field(default_factory=list)
    health_latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        self.stop_at = time.monotonic() + self.seconds
        actors: list[Callable[[], None]] = [
            self.health, self.well_formed, self.well_formed, self.half_headers, self.half_body,
            self.half_body, self.never_read_stream, self.huge_predict_waited, self.huge_predict_abandoned,
            self.junk,
        ]
        threads = [threading.Thread(target=self.repeat, args=(actor,), daemon=True) for actor in actors]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def repeat(self, actor: Callable[[], None]) -> None:
        while time.monotonic() < self.stop_at:
            try:
                actor()
            except httpx.TransportError as error:  # a client gave up waiting: no answer in time
                self.record(actor.__name__, type(error).__name__)

    def record(self, kind: str, status: Any) -> None:
        with self.lock:
            self.outcomes.append((kind, status))

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    # ---- well-formed -----------------------------------------------------------------------------

    def health(self) -> None:
        sent = time.monotonic()
        status = httpx.get(f"{self.url}/health", timeout=self.client_timeout_s).status_code
        with self.lock:
            self.health_latencies.append(time.monotonic() - sent)
        self.record("health", status)
        time.sleep(0.05)

    def well_formed(self) -> None:
        prompt = {"model": self.model, "prompt": "Say hello:", "max_tokens": 4, "temperature": 0}
        # raw_prompt: a run trained without a chat template takes a chat only as it is
        chat = {"model": self.model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 4,
                "raw_prompt": True}
        predict = {"model": self.model, "rows": [{self.column: f"word {index}"} for index in range(3)]}
        with httpx.Client(base_url=self.url, timeout=self.client_timeout_s) as client:
            self.record("completion", client.post("/v1/completions", json=prompt).status_code)
            self.record("chat", client.post("/v1/chat/completions", json=chat).status_code)
            self.record("predict", client.post("/predict", json=predict).status_code)
            self.record("models", client.get("/v1/models").status_code)
            with client.stream("POST", "/v1/completions", json={**prompt, "stream": True}) as response:
                lines = [line for line in response.iter_lines() if line]
            done = response.status_code == 200 and lines[-1:] == ["data: [DONE]"]
            self.record("stream", 200 if done else response.status_code)

    # ---- hostile ---------------------------------------------------------------------------------

    def raw(self, data: bytes, receive_buffer: int | None = None) -> socket.socket:
        connection = socket.socket()
        if receive_buffer:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        connection.connect(("127.0.0.1", self.port))
        connection.sendall(data)
        return connection

    def answer(self, connection: socket.socket) -> Any:
        """The status the server sent before closing ("closed" when it closed without one)."""
        connection.settimeout(self.client_timeout_s)
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except OSError:
            pass
        connection.close()
        return int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1 ") else "closed"

    def half_headers(self) -> None:
        self.record("half_headers", self.answer(self.raw(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConte")))

    def half_body(self) -> None:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        self.record("half_body", self.answer(self.raw(head + b'Content-Length: 500\r\n\r\n{"model": ')))

    def never_read_stream(self) -> None:
        body = json.dumps({"model": self.model, "prompt": "Count:", "max_tokens": 200, "n": 4, "stream": True})
        request = (
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
        connection = self.raw(request, receive_buffer=4096)
        time.sleep(2.0)  # never reads a byte, then leaves
        connection.close()
        self.record("never_read_stream", "left")

    def huge_predict_waited(self) -> None:
        rows = [{self.column: f"row {index}"} for index in range(self.huge_rows)]
        self.record("huge_predict_waited", self.post("/predict", {"model": self.model, "rows": rows}))

    def huge_predict_abandoned(self) -> None:
        rows = [{self.column: f"row {index}"} for index in range(self.huge_rows)]
        try:
            httpx.post(f"{self.url}/predict", json={"model": self.model, "rows": rows}, timeout=1.0)
            self.record("huge_predict_abandoned", "answered in time")
        except httpx.TimeoutException:
            self.record("huge_predict_abandoned", "abandoned")

    def post(self, path: str, body: Any = None, content: bytes | None = None) -> int:
        headers = {"content-type": "application/json"}
        response = httpx.post(
            f"{self.url}{path}", json=body, content=content, headers=headers, timeout=self.client_timeout_s
        )
        return response.status_code

    def junk(self) -> None:
        rows = [{self.column: "x"}] * self.over_limit_rows
        self.record("predict_over_limit", self.post("/predict", {"model": self.model, "rows": rows}))
        oversize = {"model": self.model, "prompt": "x" * self.oversize_bytes}
        self.record("oversize_body", self.post("/v1/completions", oversize))
        self.record("bad_json", self.post("/v1/completions", content=b'{"model": "x", "prompt": '))
        surrogate = b'{"model": "%s", "prompt": "say \\ud800:"}' % self.model.encode()
        self.record("lone_surrogate", self.post("/v1/completions", content=surrogate))
        tiny = {"model": self.model, "prompt": "x", "temperature": 1e-45}
        self.record("tiny_temperature", self.post("/v1/completions", tiny))
        self.record("huge_seed", self.post("/v1/completions", {"model": self.model, "prompt": "x", "seed": 2**64}))
        time.sleep(0.2)

    # ---- the verdict -----------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        latencies = sorted(self.health_latencies)
        outcomes = self.outcomes
        return {
            "seconds": self.seconds,
            "requests": len(outcomes),
            "status_500": sum(status == 500 for _, status in outcomes),
            "well_formed": sum(kind not in EXPECTED for kind, _ in outcomes),
            "well_formed_not_200": sorted({f"{k}:{s}" for k, s in outcomes if k not in EXPECTED and s != 200}),
            "unexpected": sorted({f"{k}:{s}" for k, s in outcomes if k in EXPECTED and s not in EXPECTED[k]}),
            "by_kind": {kind: sum(k == kind for k, _ in outcomes) for kind in sorted({k for k, _ in outcomes})},
            "health_max_s": latencies[-1] if latencies else None,
            "health_p99_s": latencies[round(0.99 * (len(latencies) - 1))] if latencies else None,
        }


def settle(url: str, timeout_s: float) -> dict[str, Any]:
    """/health once no request is in flight any more (every slot given back)."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(f"{url}/health", timeout=30).json()
        if health["in_flight"] == 0 or time.monotonic() > deadline:
            return dict(health)
        time.sleep(0.2)


# ---- the test --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from test_serve import make_adapter_run

    from tunewright.serving.pool import load_models

    return load_models([f"alpha={make_adapter_run(tiny_model_dir, tmp_path_factory.mktemp('hostile') / 'alpha', 1)}"])


def test_hostile_mix_leaves_no_500_no_stuck_slot_and_answers_every_well_formed_request(
    models: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from test_serve_hardening import real_server

    limits = {
        "request_timeout_s": 8.0, "read_timeout_s": 1.0, "send_timeout_s": 1.0, "max_predict_rows": 200,
        "max_body_bytes": 64 * 1024, "max_concurrent_requests": 16, "max_connections": 64,
    }
    caplog.set_level(logging.ERROR)
    with real_server(models, **limits) as url:
        mix = HostileMix(url, "alpha", "word", seconds=5.0, huge_rows=200, over_limit_rows=201)
        mix.run()
        health = settle(url, timeout_s=15)
        after = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": "say a:", "max_tokens": 2})
    figures = mix.figures()
    assert figures["status_500"] == 0, figures
    assert figures["unexpected"] == [] and figures["well_formed_not_200"] == [], figures
    assert set(EXPECTED) <= set(figures["by_kind"]), figures  # every hostile kind ran
    assert health["in_flight"] == 0 and after.status_code == 200, (health, after.text)
    assert figures["health_max_s"] < 2.0, figures
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []
