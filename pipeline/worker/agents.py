"""How a stage's agent takes its records: raw bytes in and out, one record at a time, retried
on unexpected failures and then dead-lettered rather than stalling the partition."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import faust
from faust.types import EventT, StreamT, TopicT

from pipeline.core.jsonlog import record_context
from pipeline.core.metrics import RECORDS_PROCESSED
from pipeline.worker.dlq import DeadLetterQueue, Origin, SendRaw

log = logging.getLogger("sumstream.worker")

# A record whose handler keeps failing is retried this often (backoff doubling from
# PROCESS_BACKOFF_S, ~6 s in all), then dead-lettered.
PROCESS_ATTEMPTS = 5
PROCESS_BACKOFF_S = 0.2

OnEvent = Callable[[EventT[Any]], Awaitable[None]]
OnRecord = Callable[[bytes | None, bytes | None, Origin, int | None], Awaitable[None]]
# Ends the request of a record the stage gave up on: (value, error).
Abandon = Callable[[bytes | None, BaseException], Awaitable[None]]


def raw_topic(app: faust.App, name: str) -> TopicT:
    """``name`` read and written as bytes: the agents decode with pipeline/core/codec.py."""
    return app.topic(name, key_serializer="raw", value_serializer="raw")


def sender(topic: TopicT) -> SendRaw:
    """A stage's ``send(key, value)`` onto ``topic``."""

    async def send(key: bytes | None, value: bytes) -> None:
        await topic.send(key=key, value=value)

    return send


async def events(stream: StreamT[Any]) -> AsyncIterator[EventT[Any]]:
    """The stream's events (message and all), not just the values."""
    async for event in stream.events():
        yield event


def origin(event: EventT[Any]) -> Origin:
    """Where the event's record came from (for a dead letter)."""
    message = event.message
    return Origin(message.topic, message.partition, message.offset)


def timestamp_ms(event: EventT[Any]) -> int | None:
    """The record's Kafka timestamp in ms, if it has one."""
    ts = event.message.timestamp
    return int(ts * 1000) if ts else None


def on_record(handle: OnRecord) -> OnEvent:
    """Adapt a stage's ``handle(key, value, origin, timestamp_ms)`` to a Faust event."""

    async def on_event(event: EventT[Any]) -> None:
        message = event.message
        await handle(message.key, message.value, origin(event), timestamp_ms(event))

    return on_event


async def process(
    stage: str,
    handle: OnEvent,
    event: EventT[Any],
    dlq: DeadLetterQueue,
    abandon: Abandon | None = None,
) -> None:
    """Run one record's work, retrying failures; then dead-letter it rather than stall.

    Stage handlers dead-letter bad records themselves; what reaches here is unexpected (a
    broker hiccup, a bug). Handlers are idempotent, so a retry is safe. ``abandon`` ends the
    record's request for its client once it is dead-lettered (a stage where nothing of the
    request was streamed yet).
    """
    with record_context(stage, event.message.key):
        await _process_record(stage, handle, event, dlq, abandon)


async def _process_record(
    stage: str,
    handle: OnEvent,
    event: EventT[Any],
    dlq: DeadLetterQueue,
    abandon: Abandon | None,
) -> None:
    error: Exception | None = None
    for attempt in range(PROCESS_ATTEMPTS):
        try:
            await handle(event)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
            log.warning(
                "record failed, retrying",
                exc_info=True,
                extra={"stage": stage, "attempt": attempt + 1, "offset": event.message.offset},
            )
            await asyncio.sleep(min(PROCESS_BACKOFF_S * 2**attempt, 5.0))
    assert error is not None
    RECORDS_PROCESSED.labels(stage=stage, outcome="error").inc()
    message = event.message
    try:
        await dlq.publish(
            key=message.key, value=message.value, exc=error, stage=stage, origin=origin(event)
        )
    except Exception:
        log.exception("record dropped: even the dead-letter topic failed", extra={"stage": stage})
    if abandon is None:
        return
    try:
        await abandon(message.value, error)
    except Exception:
        log.exception("could not end the abandoned request", extra={"stage": stage})
