"""The server's limits as one ASGI middleware: Host header, API key, body size, concurrency and timeouts.

They are checked before a request reaches its endpoint, so a refusal is fast and costs no model
work; each refusal is a JSON body in OpenAI's error shape. Connection-level limits (how many
connections, how long a client may take over its headers) are uvicorn's, set in connections.py.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunewright.config import ServeSettings
from tunewright.serving.errors import APIError, error_body

log = logging.getLogger(__name__)

# Endpoints that run the model; only these count against max_concurrent_requests.
MODEL_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/predict"})
OPEN_PATHS = frozenset({"/health"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
# Refusals sent before the whole body has arrived close the connection: the rest of it is never read.
CLOSE = {"connection": "close"}
SEND_GRACE_S = 1.0

# FastAPI's bearer parser, used here rather than as a route dependency: a dependency runs after the
# body is read and does not cover /docs and /openapi.json, and its 403 is not OpenAI's error shape.
_bearer = HTTPBearer(auto_error=False)


class ClientTooSlow(Exception):
    """The client took no response data for send_timeout_s (or past the request's deadline)."""


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status, headers=headers)


def allowed_host_names(settings: ServeSettings) -> frozenset[str] | None:
    """The Host header names the server answers to; None accepts any (see ServeSettings.allowed_hosts)."""
    if settings.allowed_hosts is not None:
        names = {_strip_brackets(name).lower() for name in settings.allowed_hosts}
        return None if "*" in names else frozenset(names)
    bound = _strip_brackets(settings.host).lower()
    if bound in WILDCARD_BINDS:
        return None
    return frozenset({bound} | LOOPBACK_NAMES) if _is_loopback(bound) else frozenset({bound})


def _strip_brackets(name: str) -> str:
    return name[1:-1] if name.startswith("[") and name.endswith("]") else name


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """'[::1]:8000' -> '::1', 'Localhost:8000' -> 'localhost'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    name, colon, port = header.rpartition(":")
    return name if colon and port.isdigit() else header


class RequestGate:
    """ASGI middleware: Host, API key, body size and concurrency limits, then timeouts on the exchange.

    A model request is counted from admission, before its body is read, so clients that hold back
    their last byte cannot all slip under the limit. The body is read here (up to the size limit,
    within read_timeout_s) and replayed to the app, so a chunked upload that grows past the limit is
    refused as surely as one with a large Content-Length. Every send waits at most send_timeout_s
    for the client, and not past the request's deadline, so a client that never reads its stream
    does not hold a slot.
    """

    def __init__(self, app: ASGIApp, settings: ServeSettings, counter: dict[str, int]) -> None:
        self.app, self.settings, self.counter = app, settings, counter
        self.hosts = allowed_host_names(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        send = self._timed(send, deadline)
        try:
            error = await self._refusal(scope)
            with self._admitted(scope, error) as error:
                await self._read_and_run(scope, receive, send, error)
        except ClientTooSlow as slow:
            log.warning("%s %s: %s", scope["method"], scope["path"], slow)

    async def _read_and_run(self, scope: Scope, receive: Receive, send: Send, error: APIError | None) -> None:
        if error is not None:
            await error_response(error, CLOSE)(scope, receive, send)
            return
        messages, error = await self._read_body(receive)
        if error is not None:
            await error_response(error, CLOSE)(scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @contextmanager
    def _admitted(self, scope: Scope, error: APIError | None) -> Iterator[APIError | None]:
        """Count a model request in flight from here (check and count in one step, no await between)."""
        limited = error is None and scope["path"] in MODEL_PATHS
        if limited and self.counter["in_flight"] >= self.settings.max_concurrent_requests:
            limited, error = False, APIError(
                429,
                f"too many concurrent requests (limit {self.settings.max_concurrent_requests}); retry shortly",
                code="rate_limit_exceeded",
            )
        self.counter["in_flight"] += int(limited)
        try:
            yield error
        finally:
            self.counter["in_flight"] -= int(limited)

    def _timed(self, send: Send, deadline: float) -> Send:
        loop = asyncio.get_running_loop()
        limit_s = self.settings.send_timeout_s

        async def send_in_time(message: Message) -> None:
            # Past the deadline a send still gets a moment: the 504 (or the stream's last chunks) must go out.
            budget = min(limit_s, max(SEND_GRACE_S, deadline - loop.time()))
            try:
                async with asyncio.timeout(budget):
                    await send(message)
            except TimeoutError:
                raise ClientTooSlow(f"the client took no data for {budget:.3g} s; response abandoned") from None

        return send_in_time

    async def _refusal(self, scope: Scope) -> APIError | None:
        headers = Headers(scope=scope)
        if self.hosts is not None:
            host = host_name(headers.get("host", ""))
            if host not in self.hosts:
                return APIError(
                    400,
                    f"the Host header '{host}' is not one this server answers to; start it with "
                    f"--allowed-host {host or 'NAME'} to allow it",
                    code="invalid_host",
                )
        key = self.settings.api_key
        if key is not None and scope["path"] not in OPEN_PATHS:
            credentials = await _bearer(HTTPConnection(scope))
            given = credentials.credentials if credentials else ""
            if not hmac.compare_digest(given.encode(), key.encode()):  # constant time: no timing oracle
                return APIError(
                    401, "missing or wrong API key; send it as 'Authorization: Bearer KEY'", code="invalid_api_key"
                )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.settings.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(
            413, f"request body larger than {self.settings.max_body_bytes} bytes", code="request_too_large"
        )

    async def _read_body(self, receive: Receive) -> tuple[list[Message], APIError | None]:
        """The whole body within read_timeout_s (uvicorn has no body-read timeout of its own)."""
        try:
            async with asyncio.timeout(self.settings.read_timeout_s):
                return await self._read_up_to_limit(receive)
        except TimeoutError:
            return [], APIError(
                408,
                f"the request body did not arrive within {self.settings.read_timeout_s:g} s",
                code="request_timeout",
            )

    async def _read_up_to_limit(self, receive: Receive) -> tuple[list[Message], APIError | None]:
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, None
            size += len(message.get("body", b""))
            if size > self.settings.max_body_bytes:
                return [], self._too_large()
            if not message.get("more_body", False):
                return messages, None
