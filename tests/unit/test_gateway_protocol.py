"""The uvicorn internals gateway/http/protocol.py builds on: this fails loudly when an upgrade
renames or removes one, instead of the bounds silently no longer applying."""

from __future__ import annotations

import asyncio

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.http.protocol import ConnectionLimits, bounded_protocol

OVERRIDDEN = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "on_response_complete",
)


async def noop_app(scope: object, receive: object, send: object) -> None:
    return None


def test_uvicorn_protocol_still_has_the_callbacks_the_bounds_override() -> None:
    for name in OVERRIDDEN:
        assert callable(getattr(HttpToolsProtocol, name, None)), name


async def test_bounded_protocol_instance_has_the_state_it_reads() -> None:
    config = Config(noop_app, http="httptools")
    config.load()
    limits = ConnectionLimits(
        max_header_bytes=1024, max_headers=10, header_timeout_s=1.0, max_connections=1
    )
    protocol = bounded_protocol(limits)(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    for attribute in ("connections", "cycle", "loop", "parser"):
        assert hasattr(protocol, attribute), attribute
    assert isinstance(protocol.connections, set)


async def answer_413_unread(scope: dict[str, object], receive: object, send: object) -> None:
    """Like the gateway's body limit: 413 from Content-Length, the body left unread."""
    if scope["type"] != "http":
        return
    headers = [(b"content-length", b"9")]
    await send({"type": "http.response.start", "status": 413, "headers": headers})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"too large"})  # type: ignore[operator]


async def test_a_body_arriving_after_an_early_answer_is_not_counted_as_the_next_head() -> None:
    config = Config(answer_413_unread, http="httptools")
    config.load()
    limits = ConnectionLimits(
        max_header_bytes=1024, max_headers=10, header_timeout_s=5.0, max_connections=10
    )
    cls = bounded_protocol(limits)
    loop = asyncio.get_running_loop()
    state = ServerState()
    server = await loop.create_server(
        lambda: cls(config=config, server_state=state, app_state={}, _loop=loop), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = b"x" * 64 * 1024  # far more than the 1 KiB head limit
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
        await writer.drain()
        assert (await reader.readuntil(b"too large")).startswith(b"HTTP/1.1 413")
        # The body comes only after the answer, then the next request on the same connection.
        writer.write(body)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 413")
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
