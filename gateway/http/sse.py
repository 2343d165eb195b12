"""One request's SSE stream: ``accepted``, ``token`` (id: seq), then ``error``? + ``done``.

A stream never just stops: it ends with ``done`` (after ``error`` for a result that is not
COMPLETED), or, when the gateway itself must close it (slow client, shutdown, nothing heard
for too long), with an ``error`` carrying ``last_seq`` so the client resumes with
Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import ServerSentEvent

from gateway.http.models import AcceptedOut, result_json
from gateway.metrics import SSE_CLIENTS, STREAM_ENDS, STREAMS
from gateway.runtime import Gateway, StreamSource
from gateway.streams.hub import TERMINAL_KINDS

log = logging.getLogger("sumstream.gateway.sse")

# TokenEvent kind of a terminal event -> the status its result will have.
TERMINAL_STATUS = {"DONE": "COMPLETED", "CANCELLED": "CANCELLED", "ERROR": "FAILED"}


def _event(name: str, data: dict[str, Any], event_id: str | None = None) -> ServerSentEvent:
    return ServerSentEvent(
        json.dumps(data, ensure_ascii=False, separators=(",", ":")), event=name, id=event_id
    )


def closing_error(code: str, message: str, last_seq: int) -> ServerSentEvent:
    """The gateway closes a stream that has not finished: resume from ``last_seq``."""
    return _event(
        "error",
        {
            "code": code,
            "message": message,
            "partial": True,
            "retriable": True,
            "last_seq": last_seq,
        },
    )


def final_events(result: dict[str, Any]) -> list[ServerSentEvent]:
    """``error`` (unless COMPLETED) then ``done`` for a SummaryResult."""
    body = result_json(result)
    events = []
    if body["status"] != "COMPLETED":
        error = body["error"] or {}
        events.append(
            _event(
                "error",
                {
                    "code": error.get("code") or body["status"].lower(),
                    "message": error.get("message") or f"request ended {body['status']}",
                    "partial": bool(error.get("partial")) or body["status"] == "PARTIAL",
                    "retriable": bool(error.get("retriable")),
                    "last_seq": body["last_seq"],
                },
            )
        )
    events.append(_event("done", body))
    return events


def result_from_terminal(event: dict[str, Any]) -> dict[str, Any]:
    """A stand-in result when the real one does not come: built from the terminal event."""
    error = event.get("error")
    status = TERMINAL_STATUS[event["kind"]]
    if status == "FAILED" and error and error.get("partial"):
        status = "PARTIAL"
    return {
        "request_id": event["request_id"],
        "status": status,
        "summary": "",
        "model": event.get("model", ""),
        "tier": event.get("tier", ""),
        "usage": event.get("usage") or {},
        "error": error,
        "stop_reason": event.get("stop_reason"),
        "last_seq": event["seq"],
        "latency_ms": {},
        "created_at": event.get("created_at"),
        "completed_at": None,
    }


async def summary_events(
    gateway: Gateway,
    request_id: str,
    user_id: str,
    *,
    after_seq: int = 0,
    accepted: AcceptedOut | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """The SSE events of one request, from ``after_seq`` on, to its terminal event."""
    settings = gateway.settings
    finished = False
    last_sent = after_seq
    source: StreamSource | None = None
    terminal: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    end = "disconnect"
    SSE_CLIENTS.inc()
    try:
        if accepted is not None:
            yield _event("accepted", accepted.model_dump())
        source = gateway.open_stream(request_id, after_seq)
        STREAMS.labels(source.kind).inc()
        while True:
            if result is not None and (terminal is not None or last_sent >= result["last_seq"]):
                for event in final_events(result):
                    yield event
                finished, end = True, "done"
                return
            if result is not None:
                # The result came before the last tokens: give them a moment, then read the
                # ones still missing from the log so the client sees no gap.
                timeout: float | None = settings.result_grace_s
            elif terminal is not None:
                timeout = settings.result_timeout_s
            else:
                timeout = None
            try:
                item = await asyncio.wait_for(source.subscriber.get(), timeout)
            except TimeoutError:
                if result is not None and source.kind == "memory":
                    source.close(gateway.hub)
                    source = gateway.read_from_log(request_id, last_sent, result=result)
                    continue
                if result is None and terminal is not None:
                    result = result_from_terminal(terminal)
                terminal = terminal or {"kind": "DONE"}
                continue
            if item is None:
                sub = source.subscriber
                if sub.overflowed:
                    end = "slow_consumer"
                    yield closing_error(
                        "slow_consumer",
                        "the client fell too far behind; reconnect with Last-Event-ID",
                        last_sent,
                    )
                    return
                if result is not None:
                    terminal = terminal or {"kind": "DONE"}
                    continue
                if terminal is not None:
                    result = result_from_terminal(terminal)
                    continue
                end = sub.closed_reason or "closed"
                yield closing_error(
                    end, "the stream was closed early; reconnect with Last-Event-ID", last_sent
                )
                return
            kind, record = item
            if kind == "result":
                result = record
            elif record["kind"] in TERMINAL_KINDS:
                terminal = record
            elif record["kind"] == "DELTA" and record["seq"] > last_sent:
                last_sent = int(record["seq"])
                yield _event("token", {"text": record["text"], "seq": last_sent}, str(last_sent))
    finally:
        if source is not None:
            source.close(gateway.hub)
        SSE_CLIENTS.dec()
        STREAM_ENDS.labels(end).inc()
        log.info(
            "stream closed",
            extra={"request_id": request_id, "reason": end, "last_seq": last_sent},
        )
        # A request known to have ended needs no cancel, whether or not the client saw it.
        ended = finished or result is not None or terminal is not None
        gateway.stream_closed(request_id, user_id, finished=ended)
