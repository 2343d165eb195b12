"""The gateway's HTTP/1.1 connection protocol: uvicorn's httptools protocol with the bounds a
public endpoint needs before any request reaches the application (docs/architecture.md,
"Connection limits").

uvicorn bounds none of these with httptools: header bytes and count (a client could stream an
unterminated 50 MB header and the parser would buffer it), the time to send a request head (a
connection that sends nothing, or one byte a second, stays open for ever) and the number of
open connections (``limit_concurrency`` answers 503 only after reading a full request head).

This is the one module that subclasses uvicorn's protocol internals (``connections``,
``parser``, ``transport``); tests/unit/test_gateway_protocol.py fails loudly when they change.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.metrics import CONNECTIONS_REFUSED

# What a connection's transport holds before uvicorn's flow control stops writing to it
# (asyncio's default: 64 KB). A client that stopped reading holds this much (plus the kernel's
# send buffer) until the send timeout lets it go (docs/architecture.md, "The lean SSE path").
WRITE_BUFFER_HIGH_BYTES = 16 * 1024

_STATUS_TEXT = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one gateway process allows a connection before its request head is complete."""

    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    max_connections: int


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's protocol refusing connections and request heads beyond ``limits``."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # received while the head is incomplete
        self._head_count = 0
        self._parsed_bytes = 0  # of the head, as the parser hands it over
        self._reading_head = True
        # The request's body has arrived in full (a response may complete before it does).
        self._message_done = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_BYTES)
        if len(self.connections) > self.limits.max_connections:
            # Refused before reading anything: the cheapest answer to a connection flood.
            self._refuse(503, "too_many_connections")
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused: what the client still sends is dropped unread
        reading_head = self._reading_head
        super().data_received(data)
        # A head that completes within this chunk was measured by the parser callbacks; the
        # raw count is for a head still incomplete after it (a chunk that completes the head
        # may carry body bytes, which must not count). An unterminated head grows by at most
        # one socket read past the limit before it is refused.
        if reading_head and self._reading_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, "head_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_done = False
        self._reading_head = True
        self._head_bytes = 0
        self._head_count = 0
        self._parsed_bytes = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.transport.is_closing():
            return
        self._head_count += 1
        self._parsed_bytes += len(name) + len(value) + 4
        if self._head_count > self.limits.max_headers:
            self._refuse(431, "too_many_headers")
        elif self._parsed_bytes > self.limits.max_header_bytes:
            self._refuse(431, "head_too_large")
        else:
            super().on_header(name, value)

    def on_url(self, url: bytes) -> None:
        self._parsed_bytes += len(url)
        if self._parsed_bytes > self.limits.max_header_bytes:
            self._refuse(431, "head_too_large")
        else:
            super().on_url(url)

    def on_headers_complete(self) -> None:
        # Parser callbacks for the rest of a refused request's bytes start nothing.
        if self.transport.is_closing():
            return
        self._reading_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.transport.is_closing():
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._message_done = True
        if not self.transport.is_closing():
            super().on_message_complete()
            # No cycle for a WebSocket upgrade: that connection is no longer HTTP.
            if self.cycle is not None and self.cycle.response_complete:
                self._next_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # An answer given before the body was read (413 on Content-Length): the rest of the
        # body is still to come, and it is no head; the next head starts after it.
        if self._message_done:
            self._next_head()

    def _next_head(self) -> None:
        # uvicorn's keep-alive timer bounds the idle time before the next request; the head
        # timer starts again with that request's first byte.
        self._reading_head = True
        self._head_bytes = 0

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._reading_head:
            self._refuse(408, "head_timeout")

    def _refuse(self, status: int, reason: str) -> None:
        if self.transport.is_closing():
            return
        self._cancel_head_timer()
        self._reading_head = False
        body = reason.encode() + b"\n"
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _STATUS_TEXT[status], len(body))
        )
        self.transport.write(head + body)
        self.transport.close()
        # A counter, not a log line: a flood of refusals must not become a flood of logs.
        CONNECTIONS_REFUSED.labels(reason=reason).inc()


def bounded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """A protocol class enforcing ``limits``, for ``uvicorn.Config(http=...)`` (which wants a
    class, not an instance)."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"limits": limits})
