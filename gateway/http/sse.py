"""One request's SSE stream: ``accepted``, ``token`` (id: the last seq it covers), then
``error``? + ``done``.

Lean by design (docs/architecture.md, "The lean SSE path"): events are encoded straight to
bytes with orjson, and every event queued for a client when its stream wakes goes out in one
write, so a busy stream pays one send, one timer and one task switch per batch, not per token.

A stream never just stops: it ends with ``done`` (after ``error`` for a result that is not
COMPLETED), or, when the gateway itself must close it (slow client, shutdown, nothing heard
for too long), with an ``error`` carrying ``last_seq`` so the client resumes with
Last-Event-ID. A client too slow to take a send within ``send_timeout_s`` is let go as a
normal close (reason ``send_timeout``): one INFO line, no traceback. A stream older than
``max_stream_lifetime_s`` ends with ``error`` ``stream_timeout`` and a ``done`` that says the
request is still running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TypedDict, cast

import anyio
import orjson
from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

from gateway.http.models import AcceptedOut, ResultBody, result_json
from gateway.metrics import SSE_CLIENTS, STREAM_ENDS, STREAMS
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from gateway.streams.clients import StreamSource
from gateway.streams.hub import Item
from pipeline.core import events as token_events
from pipeline.core.clock import now_ms
from pipeline.core.pricing import price_table
from pipeline.core.records import TERMINAL_KINDS, SummaryResult, TokenEvent
from pipeline.core.results import build_result

log = logging.getLogger("sumstream.gateway.sse")

# At most this many events in one write: a client that stops reading is found out by the
# transport's flow control after a bounded write (each event is ~100 bytes or a few tokens).
EVENTS_PER_WRITE = 8


class ErrorData(TypedDict):
    """The ``error`` event's data: what went wrong and where to resume."""

    code: str
    message: str
    partial: bool
    retriable: bool
    last_seq: int


class TokenData(TypedDict):
    """The ``token`` event's data: the text of seqs ``first_seq``..``seq`` (its SSE id is
    ``seq``, the last seq it covers; docs/architecture.md, "Coalesced token records")."""

    text: str
    seq: int
    first_seq: int


def encode_event(name: str, data: Mapping[str, object], event_id: int | None = None) -> bytes:
    """One SSE event as the bytes written to the client (its JSON data is one line)."""
    head = b"event: %b\r\ndata: " % name.encode()
    if event_id is not None:
        head = b"id: %d\r\n%b" % (event_id, head)
    return head + orjson.dumps(data) + b"\r\n\r\n"


def closing_error(code: str, message: str, last_seq: int) -> bytes:
    """The gateway closes a stream that has not finished: resume from ``last_seq``."""
    data: ErrorData = {
        "code": code,
        "message": message,
        "partial": True,
        "retriable": True,
        "last_seq": last_seq,
    }
    return encode_event("error", data)


def lifetime_events(request_id: str, last_seq: int) -> bytes:
    """``error`` stream_timeout + ``done`` (status running): the stream has lived its longest."""
    error = closing_error(
        "stream_timeout",
        "the stream reached its maximum lifetime; reconnect with Last-Event-ID",
        last_seq,
    )
    return error + encode_event(
        "done", {"id": request_id, "status": "running", "last_seq": last_seq}
    )


def _result_error(body: ResultBody) -> ErrorData:
    error = body["error"]
    return {
        "code": (error.get("code") if error else None) or body["status"].lower(),
        "message": (error.get("message") if error else None) or f"request ended {body['status']}",
        "partial": bool(error and error.get("partial")) or body["status"] == "PARTIAL",
        "retriable": bool(error and error.get("retriable")),
        "last_seq": body["last_seq"],
    }


def final_events(result: SummaryResult, phases: Phases | None = None) -> bytes:
    """``error`` (unless COMPLETED) then ``done`` for a SummaryResult, as one write.

    ``phases``: a long document's usage of its map and collapse calls (its last ``progress``
    event); ``done`` then breaks its usage down into map, collapse and the final reduce.
    """
    body = result_json(result)
    data: dict[str, object] = dict(body)
    if phases:
        data["usage_by_phase"] = usage_by_phase(body, phases)
    done = encode_event("done", data)
    if body["status"] == "COMPLETED":
        return done
    return encode_event("error", _result_error(body)) + done


# phase -> input_tokens, output_tokens, cost_micro_usd
Phases = dict[str, dict[str, int]]


def usage_by_phase(body: ResultBody, phases: Phases) -> Phases:
    """The map and collapse phases as reported, and the final reduce: the rest of the total
    (docs/architecture.md, "Long documents")."""
    total = {
        "input_tokens": body["usage"]["input_tokens"],
        "output_tokens": body["usage"]["output_tokens"],
        "cost_micro_usd": body["cost"]["micro_usd"],
    }
    out: Phases = {name: dict(figures) for name, figures in phases.items()}
    out["reduce"] = {
        key: max(0, value - sum(p.get(key, 0) for p in phases.values()))
        for key, value in total.items()
    }
    return out


def result_from_terminal(event: TokenEvent) -> SummaryResult:
    """A stand-in result when the real one does not come, built from the terminal event by
    the builder postprocess uses (without the text, which only the log holds)."""
    return build_result(event, "", price_table(), result_ms=now_ms())


class ClientTooSlow(TimeoutError):
    """A send to an SSE client did not complete within the send timeout.

    It ends the response, so the server closes the connection; it is a normal close, which
    the stream logs once (the gateway's app keeps it out of the error logs).
    """


@dataclass
class ClientLink:
    """What the response learnt of its client, read by the stream as it ends."""

    too_slow: bool = False


class SummaryStreamResponse(EventSourceResponse):
    """An SSE response that times its sends itself, so a timed-out send is known as one.

    sse_starlette's own ``send_timeout`` raises an error that looks like any other failure.
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        link: ClientLink,
        send_timeout_s: float,
        ping_interval_s: float,
        headers: Mapping[str, str],
    ) -> None:
        super().__init__(content, headers=headers, ping=ping_interval_s)
        self.link = link
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def timed_send(message: Message) -> None:
            with anyio.move_on_after(self.send_timeout_s) as deadline:
                await send(message)
            # Only this deadline counts: a cancel from outside (disconnect, shutdown) propagates.
            if deadline.cancelled_caught:
                self.link.too_slow = True
                raise ClientTooSlow(f"a send took longer than {self.send_timeout_s} s")

        try:
            await super().__call__(scope, receive, timed_send)
        except BaseExceptionGroup as group:
            # The data and ping sends can both time out; one ClientTooSlow stands for them.
            too_slow, rest = group.split(ClientTooSlow)
            if too_slow is None or rest is not None:
                raise
            raise ClientTooSlow(str(too_slow.exceptions[0])) from None


def stream_response(
    gateway: Gateway,
    request_id: str,
    user_id: str,
    *,
    after_seq: int,
    accepted: AcceptedOut | None,
    headers: Mapping[str, str],
    announce: bool = False,
) -> SummaryStreamResponse:
    """The SSE response of ``request_id`` for ``user_id``, from ``after_seq`` on."""
    link = ClientLink()
    events = summary_events(
        gateway,
        request_id,
        user_id,
        after_seq=after_seq,
        accepted=accepted,
        link=link,
        announce=announce,
    )
    return SummaryStreamResponse(
        events,
        link=link,
        send_timeout_s=gateway.settings.send_timeout_s,
        ping_interval_s=gateway.settings.ping_interval_s,
        headers=headers,
    )


@dataclass
class StreamProgress:
    """How far one SSE stream has got, and what it knows of its request's end."""

    last_sent: int
    terminal: TokenEvent | None = None
    # The stream has ended: its terminal event came, or the result says so without it.
    ended: bool = False
    result: SummaryResult | None = None
    finished: bool = False
    end: str = "disconnect"
    # A long document's usage by phase so far, from its latest ``progress`` event.
    phases: Phases | None = None

    def can_finish(self) -> bool:
        """The result is known and every token before it was sent (or the stream ended)."""
        result = self.result
        return result is not None and (self.ended or self.last_sent >= result["last_seq"])

    def wait_s(self, settings: GatewaySettings) -> float | None:
        """How long to wait for the next item before acting on the silence."""
        if self.result is not None:
            # The result came before the last tokens: give them a moment, then read the
            # ones still missing from the log so the client sees no gap.
            return settings.result_grace_s
        if self.terminal is not None:
            return settings.result_timeout_s
        return None

    def take(self, item: Item) -> bytes | None:
        """Note a result or terminal event; a new DELTA becomes a ``token`` event."""
        # The hub carries plain dicts; a "result" item holds a SummaryResult, else a TokenEvent.
        kind, record = item
        if kind == "result":
            self.result = cast(SummaryResult, record)
            return None
        event = cast(TokenEvent, record)
        if event["kind"] == "PROGRESS":
            # A long document's plan or progress (docs/architecture.md, "Long documents").
            payload = orjson.loads(event.get("text") or "{}")
            if isinstance(payload, dict) and isinstance(payload.get("usage_by_phase"), dict):
                self.phases = payload["usage_by_phase"]
            return encode_event("progress", payload)
        if event["kind"] in TERMINAL_KINDS:
            self.terminal, self.ended = event, True
        elif event["kind"] == "DELTA" and event["seq"] > self.last_sent:
            # A range that starts at or before what the client has: only the rest of it.
            first = max(token_events.first_seq(event), self.last_sent + 1)
            text = token_events.text_after(event, self.last_sent)
            self.last_sent = int(event["seq"])
            data: TokenData = {"text": text, "seq": self.last_sent, "first_seq": first}
            return encode_event("token", data, self.last_sent)
        return None

    def silence(self, gateway: Gateway, source: StreamSource) -> StreamSource:
        """Nothing came in time: read the missing tokens from the log, or end without them."""
        if self.result is not None and source.kind == "memory":
            source.close(gateway.hub)
            return gateway.streams.read_from_log(
                source.subscriber.request_id, self.last_sent, result=self.result
            )
        if self.result is None and self.terminal is not None:
            self.result = result_from_terminal(self.terminal)
        self.ended = True
        return source

    def source_closed(self, source: StreamSource) -> bytes | None:
        """The feed ended: finish from what is known, or close with a resumable ``error``."""
        sub = source.subscriber
        if sub.overflowed:
            self.end = "slow_consumer"
            return closing_error(
                "slow_consumer",
                "the client fell too far behind; reconnect with Last-Event-ID",
                self.last_sent,
            )
        if self.result is not None:
            self.ended = True
            return None
        if self.terminal is not None:
            self.result = result_from_terminal(self.terminal)
            return None
        self.end = sub.closed_reason or "closed"
        return closing_error(
            self.end, "the stream was closed early; reconnect with Last-Event-ID", self.last_sent
        )

    @property
    def request_ended(self) -> bool:
        """A request known to have ended needs no cancel, whether or not the client saw it."""
        return self.finished or self.result is not None or self.ended


async def summary_events(
    gateway: Gateway,
    request_id: str,
    user_id: str,
    *,
    after_seq: int = 0,
    accepted: AcceptedOut | None = None,
    link: ClientLink | None = None,
    announce: bool = False,
) -> AsyncIterator[bytes]:
    """The SSE events of one request, from ``after_seq`` on, to its terminal event, as the
    chunks written to the client (one chunk holds every event that was ready).

    ``announce``: the client attaches to a request that already had a stream (a resume, a
    replayed POST), so every gateway learns that this one now owns its disconnect cancel.
    """
    # One loop past ~60 lines: the source, the progress and the lifetime are the state of one
    # stream, and the ``finally`` that closes it must see all three.
    progress = StreamProgress(after_seq)
    source: StreamSource | None = None
    loop = asyncio.get_running_loop()
    ends_at = loop.time() + gateway.settings.max_stream_lifetime_s
    SSE_CLIENTS.inc()
    try:
        if accepted is not None:
            yield encode_event("accepted", accepted.model_dump())
        source = gateway.streams.open(
            request_id, after_seq, announce_for=user_id if announce else ""
        )
        STREAMS.labels(source.kind).inc()
        while True:
            if progress.result is not None and progress.can_finish():
                yield final_events(progress.result, progress.phases)
                progress.finished, progress.end = True, "done"
                return
            left_s = ends_at - loop.time()
            if left_s <= 0:
                yield lifetime_events(request_id, progress.last_sent)
                progress.end = "stream_timeout"
                return
            # Whatever is queued already goes without a wait (no timer, no task switch);
            # the tail dispatches a fetch at once, so a busy stream rarely waits.
            items = source.subscriber.ready(EVENTS_PER_WRITE)
            if not items:
                wait_s = progress.wait_s(gateway.settings)
                try:
                    item = await asyncio.wait_for(
                        source.subscriber.get(), left_s if wait_s is None else min(wait_s, left_s)
                    )
                except TimeoutError:
                    if loop.time() < ends_at:
                        source = progress.silence(gateway, source)
                    continue
                if item is None:
                    closing = progress.source_closed(source)
                    if closing is None:
                        continue
                    yield closing
                    return
                items = [item, *source.subscriber.ready(EVENTS_PER_WRITE - 1)]
            # Every event queued for the client goes in one write.
            chunk = b"".join(token for token in map(progress.take, items) if token is not None)
            if chunk:
                yield chunk
    finally:
        if link is not None and link.too_slow:
            progress.end = "send_timeout"
        if source is not None:
            source.close(gateway.hub)
        SSE_CLIENTS.dec()
        STREAM_ENDS.labels(progress.end).inc()
        log.info(
            "stream closed",
            extra={
                "request_id": request_id,
                "reason": progress.end,
                "last_seq": progress.last_sent,
            },
        )
        gateway.streams.closed(request_id, user_id, finished=progress.request_ended)
