"""Raw ASGI plumbing of the simulator: reading bodies, sending responses, noticing hang-ups.

uvicorn's ``send`` silently ignores a closed socket, so noticing a client that hangs up
mid-stream needs a task waiting on ``receive``; both are plainer without a framework in between.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Mapping, MutableMapping
from typing import Any

from pipeline.llm.simulator.protocol import Rejection, error_body, json_bytes

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY_BYTES = 32 * 1024 * 1024  # the real API's request size limit


class ClientGone(Exception):
    """The client hung up before it finished sending the request."""


async def unless_disconnected(receive: Receive, work: Coroutine[Any, Any, str]) -> str | None:
    """Run ``work`` unless the client hangs up first; then cancel it and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    return None if task.cancelled() else task.result()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Rejection(413, "Request exceeds the maximum allowed number of bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def headers(values: Mapping[str, str], length: int | None = None) -> list[tuple[bytes, bytes]]:
    pairs = [(k.encode(), v.encode()) for k, v in values.items()]
    pairs.append((b"request-id", f"req_sim{secrets.token_hex(10)}".encode()))
    if length is not None:
        pairs.append((b"content-length", str(length).encode()))
    return pairs


async def send_body(send: Send, body: bytes, *, more: bool) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": more})


async def send_json(
    send: Send, status: int, value: object, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json_bytes(value)
    pairs = headers({"content-type": "application/json"}, len(body)) + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": pairs})
    await send_body(send, body, more=False)


async def send_error(
    send: Send, status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send_json(send, status, error_body(status, message), extra)
