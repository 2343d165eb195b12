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
