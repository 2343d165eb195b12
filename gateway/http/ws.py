"""The WebSocket API at ``/v1/ws``: submit, resume and cancel summaries on one socket.

The socket carries JSON text frames. The first frame authenticates (``auth`` with an API key,
or with a stream token, which then allows only ``resume`` of its request). Every stream is the
SSE stream of the same request (``summary_events``): the same events, seqs and ends, each as a
frame ``{"type": <event>, "id": <request id>, "data": <the SSE data>}``. A command that fails
answers a ``problem`` frame (the problem+json body, with the command's ``ref``) and the socket
stays open: nothing already streaming is touched (docs/architecture.md, "The web app and
WebSocket API").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any, cast

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from gateway.http.auth import Principal
from gateway.http.errors import (
    GatewayError,
    InvalidRequest,
    MalformedRequest,
    NotFound,
    RateLimited,
    Unauthorized,
)
from gateway.http.models import AcceptedOut, SummaryIn
from gateway.http.routes import MAX_ID_CHARS, accepted_out, owned_by
from gateway.http.sse import summary_events
from gateway.http.streamtoken import StreamTokens
from gateway.metrics import REQUESTS
from gateway.service import Gateway
from pipeline.core.clock import now_ms

log = logging.getLogger("sumstream.gateway.ws")

router = APIRouter()

# Streams one socket may follow at once; more answer a problem (a client opens more sockets).
MAX_STREAMS_PER_SOCKET = 16
MAX_REF_CHARS = 128
MAX_IDEMPOTENCY_KEY_CHARS = 256
SUMMARY_FIELDS = ("document", "instructions", "max_output_tokens", "model")


def problem_frame(exc: GatewayError, ref: object = None) -> str:
    """A command's failure as a frame: the problem+json body of the same error over HTTP."""
    body: dict[str, Any] = {
        "type": "problem",
        "ref": ref,
        "status": exc.status,
        "code": exc.code,
        "title": exc.title,
        "detail": str(exc),
        "retriable": exc.retriable,
        **exc.extra,
    }
    if exc.retry_after_s is not None:
        body["retry_after_s"] = max(1, int(-(-exc.retry_after_s // 1)))
    return json.dumps(body, ensure_ascii=False)


def event_frames(request_id: str, chunk: bytes) -> list[tuple[str, str]]:
    """The SSE events in one chunk of ``summary_events`` as (event name, frame); each event's
    data is already JSON, kept as is; comments (keep-alives) are dropped."""
    frames: list[tuple[str, str]] = []
    for block in chunk.split(b"\r\n\r\n"):
        name, data = "", b""
        for line in block.split(b"\r\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        if name:
            head = f'{{"type":{json.dumps(name)},"id":{json.dumps(request_id)},"data":'
            frames.append((name, head + data.decode() + "}"))
    return frames


def _request_id(frame: Mapping[str, Any]) -> str:
    request_id = frame.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise InvalidRequest('"id" must be a request id (a string)')
    if len(request_id) > MAX_ID_CHARS:
        raise NotFound(f"no summary {request_id[:MAX_ID_CHARS]}...")
    return request_id


class Session:
    """One socket: who it is, and the streams it follows (one task each)."""

    def __init__(self, websocket: WebSocket, gateway: Gateway, tokens: StreamTokens) -> None:
        self.websocket = websocket
        self.gateway = gateway
        self.tokens = tokens
        self.principal: Principal | None = None
        # Authenticated by a stream token: the one request it may follow.
        self.only_request: str | None = None
        self.follows: dict[str, asyncio.Task[None]] = {}
        self._send_lock = asyncio.Lock()
        self.closing = False

    async def send(self, text: str) -> None:
        """Send one frame; a client that does not take it within ``send_timeout_s`` is closed."""
        async with self._send_lock:
            if self.closing:
                return
            try:
                await asyncio.wait_for(
                    self.websocket.send_text(text), self.gateway.settings.send_timeout_s
                )
            except TimeoutError:
                self.closing = True
                log.info("websocket client too slow; closing", extra={"reason": "send_timeout"})
                with contextlib.suppress(Exception):
                    await self.websocket.close(1008, "send timeout")

    async def run(self) -> None:
        """Read commands until the client goes; each answers at once, streams run beside."""
        while not self.closing:
            try:
                message = await asyncio.wait_for(self.websocket.receive(), self._idle_limit_s())
            except TimeoutError:
                # Like a connection that never sends a complete head (header_timeout_s).
                await self.websocket.close(1008, "no auth frame in time")
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            ref: object = None
            try:
                if text is None:
                    raise MalformedRequest("frames are JSON text (an object with a type)")
                try:
                    frame = json.loads(text)
                except (json.JSONDecodeError, RecursionError):
                    raise MalformedRequest("the frame is not valid JSON") from None
                if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
                    raise MalformedRequest('a frame is a JSON object with a "type"')
                ref = frame.get("ref")
                if ref is not None and (
                    not isinstance(ref, str | int) or len(str(ref)) > MAX_REF_CHARS
                ):
                    ref = None
                    raise InvalidRequest(f'"ref" must be a string or integer of <= {MAX_REF_CHARS}')
                await self.command(frame)
            except GatewayError as exc:
                await self.send(problem_frame(exc, ref))

    def _idle_limit_s(self) -> float | None:
        """An unauthenticated socket must authenticate within the head timeout."""
        return self.gateway.settings.header_timeout_s if self.principal is None else None

    async def command(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "auth":
            self.authenticate(frame)
            assert self.principal is not None
            reply = {
                "type": "authenticated",
                "user": self.principal.user_id,
                "ref": frame.get("ref"),
            }
            await self.send(json.dumps(reply))
            return
        if self.principal is None:
            raise Unauthorized('authenticate first: {"type": "auth", "key": "<API key>"}')
        if kind == "submit":
            await self.submit(frame)
        elif kind == "resume":
            await self.resume(frame)
        elif kind == "cancel":
            await self.cancel(frame)
        else:
            raise InvalidRequest(
                f"unknown frame type {kind[:32]!r}: auth, submit, resume or cancel"
            )

    def authenticate(self, frame: Mapping[str, Any]) -> None:
        key, token = frame.get("key"), frame.get("token")
        if isinstance(key, str) and key:
            principal = self.gateway.keys.authenticate(key)
            if principal is None:
                raise Unauthorized("unknown API key")
            self.principal, self.only_request = principal, None
        elif isinstance(token, str) and token:
            request_id = _request_id(frame)
            self.principal = self.tokens.verify(token, request_id)
            self.only_request = request_id
        else:
            raise Unauthorized('"auth" needs "key" (an API key) or "token" and "id"')

    def _key_principal(self, what: str) -> Principal:
        if self.principal is None or self.only_request is not None:
            raise Unauthorized(f"{what} needs an API key; a stream token only resumes its request")
        return self.principal

    async def submit(self, frame: Mapping[str, Any]) -> None:
        principal = self._key_principal("submit")
        key = frame.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or len(key) > MAX_IDEMPOTENCY_KEY_CHARS):
            raise InvalidRequest(
                f'"idempotency_key" must be a string of <= {MAX_IDEMPOTENCY_KEY_CHARS}'
            )
        self._check_room()
        try:
            body = SummaryIn.model_validate({k: frame[k] for k in SUMMARY_FIELDS if k in frame})
        except ValidationError as exc:
            # Never echo the input back: it may be a whole document.
            details = [
                {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                for e in exc.errors()
            ]
            raise InvalidRequest(
                "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details),
                extra={"errors": details},
            ) from None
        try:
            accepted = await self.gateway.intake.submit(
                principal, body, idempotency_key=key, received_ms=now_ms()
            )
        except GatewayError as exc:
            REQUESTS.labels(exc.code).inc()
            raise
        REQUESTS.labels("idempotent_replay" if accepted.replay else "accepted").inc()
        self.follow(
            accepted.request_id,
            0,
            accepted_out(accepted),
            frame.get("ref"),
            announce=accepted.replay,
        )

    async def resume(self, frame: Mapping[str, Any]) -> None:
        request_id = _request_id(frame)
        last_seq = frame.get("last_seq", 0)
        if isinstance(last_seq, bool) or not isinstance(last_seq, int) or last_seq < 0:
            raise InvalidRequest('"last_seq" must be a token seq (an integer >= 0)')
        await self._check_owned(request_id)
        if request_id in self.follows:
            raise InvalidRequest(f"this socket already follows {request_id}")
        self._check_room()
        self.follow(request_id, last_seq, None, frame.get("ref"), announce=True)

    async def cancel(self, frame: Mapping[str, Any]) -> None:
        principal = self._key_principal("cancel")
        request_id = _request_id(frame)
        await self._check_owned(request_id)
        await self.gateway.intake.cancel(request_id, principal.user_id, "client")
        reply = {"type": "cancelling", "id": request_id, "ref": frame.get("ref")}
        await self.send(json.dumps(reply))

    async def _check_owned(self, request_id: str) -> None:
        assert self.principal is not None
        if self.only_request is not None and request_id != self.only_request:
            raise NotFound(f"no summary {request_id}")
        await owned_by(self.gateway, request_id, self.principal)

    def _check_room(self) -> None:
        if len(self.follows) >= MAX_STREAMS_PER_SOCKET:
            raise RateLimited(
                f"a socket follows at most {MAX_STREAMS_PER_SOCKET} streams at once",
                extra={"limit": "streams_per_socket"},
            )

    def follow(
        self,
        request_id: str,
        after_seq: int,
        accepted: AcceptedOut | None,
        ref: object,
        *,
        announce: bool = False,
    ) -> None:
        """Stream ``request_id``'s events after ``after_seq`` to the socket, beside the others."""
        assert self.principal is not None
        user_id = self.principal.user_id
        self.follows[request_id] = asyncio.create_task(
            self._follow(request_id, user_id, after_seq, accepted, ref, announce),
            name=f"ws-follow-{request_id}",
        )

    async def _follow(
        self,
        request_id: str,
        user_id: str,
        after_seq: int,
        accepted: AcceptedOut | None,
        ref: object,
        announce: bool,
    ) -> None:
        # An async generator (typed as an iterator): closed here, so its ``finally`` (the
        # disconnect cancel, the metrics) runs when this task is cancelled.
        chunks = cast(
            AsyncGenerator[bytes, None],
            summary_events(
                self.gateway,
                request_id,
                user_id,
                after_seq=after_seq,
                accepted=accepted,
                announce=announce,
            ),
        )
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    for name, frame in event_frames(request_id, chunk):
                        if name == "accepted" and ref is not None:
                            # The client learns which submit this id answers.
                            frame = frame[:-1] + f',"ref":{json.dumps(ref)}}}'
                        await self.send(frame)
                    if self.closing:
                        return
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.closing = True  # the socket is gone; the stream's close runs the cancel grace
        finally:
            self.follows.pop(request_id, None)

    async def close(self) -> None:
        """Stop every stream: each ends as an SSE client's does when it disconnects."""
        self.closing = True
        tasks = list(self.follows.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@router.websocket("/v1/ws")
async def websocket_api(websocket: WebSocket) -> None:
    """Submit, resume and cancel summaries over one WebSocket (JSON text frames)."""
    gateway: Gateway = websocket.app.state.gateway
    tokens: StreamTokens = websocket.app.state.stream_tokens
    await websocket.accept()
    session = Session(websocket, gateway, tokens)
    try:
        await session.run()
    except WebSocketDisconnect:
        pass
    finally:
        await session.close()
        if websocket.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await websocket.close()
