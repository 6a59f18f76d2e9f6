"""The server's limits as one ASGI middleware: API key, body size and concurrent requests.

They are checked before a request reaches its endpoint, so a refusal is fast and costs no model
work; each refusal is a JSON body in OpenAI's error shape.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunewright.config import ServeSettings
from tunewright.serving.errors import APIError, error_body

# Endpoints that run the model; only these count against max_concurrent_requests.
MODEL_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/predict"})
OPEN_PATHS = frozenset({"/health"})


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status)


class RequestGate:
    """ASGI middleware: API key, body size and concurrency limits, checked before any endpoint runs.

    The body is read here (up to the limit) and replayed to the app, so a chunked upload that
    grows past the limit is refused as surely as one with a large Content-Length.
    """

    def __init__(self, app: ASGIApp, settings: ServeSettings, counter: dict[str, int]) -> None:
        self.app, self.settings, self.counter = app, settings, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._refusal(scope)
        limited = scope["path"] in MODEL_PATHS
        if error is None and limited and self.counter["in_flight"] >= self.settings.max_concurrent_requests:
            error = APIError(
                429,
                f"too many concurrent requests (limit {self.settings.max_concurrent_requests}); "
                "retry shortly",
                code="rate_limit_exceeded",
            )
        messages: list[Message] = []
        if error is None:
            messages, error = await self._read_body(receive)
        if error is not None:
            await error_response(error)(scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        self.counter["in_flight"] += int(limited)
        try:
            await self.app(scope, replay, send)
        finally:
            self.counter["in_flight"] -= int(limited)

    def _refusal(self, scope: Scope) -> APIError | None:
        headers = Headers(scope=scope)
        key = self.settings.api_key
        if key and scope["path"] not in OPEN_PATHS:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
                return APIError(
                    401,
                    "missing or wrong API key; send it as 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
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
