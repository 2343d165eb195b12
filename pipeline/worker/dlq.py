"""Dead letters: a record a stage cannot process is kept byte for byte in `dlq` with its origin.

The stage then goes on with the next record (docs/architecture.md, "The stages"): nothing is dropped
silently and one poison record never stops a partition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pipeline.core.codec import codec
from pipeline.core.errors import SumstreamError
from pipeline.core.metrics import DEAD_LETTERS
from pipeline.core.records import DeadLetter

log = logging.getLogger("sumstream.dlq")

# Publishes one encoded DeadLetter: (key, value) -> awaited until queued in the producer.
SendRaw = Callable[[bytes | None, bytes], Awaitable[None]]
# Keep a dead letter's error text short: it is for an operator, not a dump of the record.
MAX_ERROR_CHARS = 2_000


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record came from."""

    topic: str
    partition: int
    offset: int


def error_type(exc: BaseException) -> str:
    """A stable machine name for the failure: our error code, else the exception class."""
    if isinstance(exc, SumstreamError):
        return exc.code
    return type(exc).__name__


def dead_letter(
    *,
    key: bytes | None,
    value: bytes | None,
    exc: BaseException,
    stage: str,
    origin: Origin,
    now_ms: int,
) -> DeadLetter:
    """The DeadLetter record (schemas/DeadLetter.avsc) for a record ``stage`` could not process."""
    return {
        "key": key,
        "value": value,
        "error_type": error_type(exc),
        "error": (str(exc) or type(exc).__name__)[:MAX_ERROR_CHARS],
        "stage": stage,
        "origin_topic": origin.topic,
        "origin_partition": origin.partition,
        "origin_offset": origin.offset,
        "created_at": now_ms,
        "trace": {},
    }


class DeadLetterQueue:
    """Sends dead letters to the `dlq` topic through ``send`` and counts them."""

    def __init__(self, send: SendRaw, *, clock: Callable[[], float] = time.time) -> None:
        self._send = send
        self._clock = clock

    async def publish(
        self,
        *,
        key: bytes | None,
        value: bytes | None,
        exc: BaseException,
        stage: str,
        origin: Origin,
    ) -> None:
        """Record that ``stage`` gave up on the record at ``origin``."""
        record = dead_letter(
            key=key,
            value=value,
            exc=exc,
            stage=stage,
            origin=origin,
            now_ms=int(self._clock() * 1000),
        )
        await self._send(key, codec().encode("DeadLetter", record))
        DEAD_LETTERS.labels(stage=stage, error_type=record["error_type"]).inc()
        log.warning(
            "dead letter",
            extra={
                "stage": stage,
                "error_type": record["error_type"],
                "error": record["error"],
                "origin_topic": origin.topic,
                "origin_partition": origin.partition,
                "origin_offset": origin.offset,
                "request_id": key.decode("utf-8", "replace") if key else None,
            },
        )
