"""How uvicorn runs the app: a connection cap, keep-alive, and a deadline for each request's headers.

uvicorn's `limit_concurrency` caps open connections (503 beyond). It answers in plain text and
counts every connection, /health and idle keep-alive ones included, so the server's own 429 limit
on model requests (limits.py) stays: it answers in OpenAI's error shape and leaves /health free.

uvicorn has no timeout for a request's headers: a client that sends half a header block holds its
connection for good. `HeaderDeadline` (a subclass of uvicorn's h11 protocol, passed through
uvicorn's `http` setting) closes a connection whose headers are not complete within
`read_timeout_s`; the body has its own deadline in limits.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from tunewright.config import ServeSettings

log = logging.getLogger(__name__)


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are late."""

    header_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout_s, self._headers_late
        )

    def _cancel_header_deadline(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a whole header block has arrived
            self._cancel_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_deadline()  # the next request on this keep-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.warning("closing a connection whose request headers took over %g s", self.header_timeout_s)
            self.transport.close()


def _protocol(read_timeout_s: float) -> type[H11Protocol] | str:
    """`HeaderDeadline` with this timeout, or uvicorn's plain h11 where its protocol looks different."""
    expected = ("connection_made", "connection_lost", "handle_events", "on_response_complete")
    if not all(callable(getattr(H11Protocol, name, None)) for name in expected):
        log.warning("this uvicorn's h11 protocol is not the one tunewright knows; request headers have no deadline")
        return "h11"
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": read_timeout_s})


def uvicorn_config(app: FastAPI, settings: ServeSettings, log_level: str = "info", **extra: Any) -> uvicorn.Config:
    """The uvicorn settings `tunewright serve` runs `app` under."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        http=_protocol(settings.read_timeout_s),
        limit_concurrency=settings.max_connections,
        # uvicorn lets in-flight requests finish on SIGTERM, for at most this long.
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 1,
        **extra,
    )
