"""Dead letters: a record a stage cannot process is kept byte for byte in `dlq` with its origin.

The stage then goes on with the next record (docs/architecture.md, "The stages"): nothing is dropped
silently and one poison record never stops a partition. A record too large for `dlq` beside its
metadata is kept truncated, its original size in the error text ("Record sizes").
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
from pipeline.core.sizes import DEFAULT_MAX_RECORD_BYTES

log = logging.getLogger("sumstream.dlq")

# Publishes one encoded DeadLetter: (key, value) -> awaited until queued in the producer.
SendRaw = Callable[[bytes | None, bytes], Awaitable[None]]
# Keep a dead letter's error text short: it is for an operator, not a dump of the record.
MAX_ERROR_CHARS = 2_000
# Dead letters' Kafka keys are cut to this, and so is the key inside one that must shrink:
# the producer's request size leaves 1 KiB beside the value (request ids are far shorter).
MAX_KEY_BYTES = 512
# Varint lengths and rounding: what a re-encoded, shorter dead letter may still differ by.
_SLACK_BYTES = 16


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


def encode_within(record: DeadLetter, max_bytes: int) -> bytes:
    """The encoded dead letter, its value (and an outsized key) cut so that it fits ``max_bytes``;
    the error text then gives the original sizes."""
    encoded = codec().encode("DeadLetter", record)
    if len(encoded) <= max_bytes:
        return encoded
    key, value = record["key"] or b"", record["value"] or b""
    note = (
        f" [stored truncated: the original key and value were {len(key)} and {len(value)} bytes"
        f", over the {max_bytes}-byte record limit]"
    )
    cut_key = key[:MAX_KEY_BYTES] if record["key"] is not None else None
    shorter: DeadLetter = {**record, "key": cut_key, "value": b"", "error": record["error"] + note}
    room = max_bytes - len(codec().encode("DeadLetter", shorter)) - _SLACK_BYTES
    if record["value"] is not None:
        shorter["value"] = value[: max(room, 0)]
    return codec().encode("DeadLetter", shorter)


class DeadLetterQueue:
    """Sends dead letters to the `dlq` topic through ``send`` and counts them.

    ``max_record_bytes`` is the deployment's record limit (pipeline/core/sizes.py): a dead
    letter never exceeds it, so the one copy of a bad record is never refused by the producer.
    """

    def __init__(
        self,
        send: SendRaw,
        *,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._send = send
        self._max_bytes = max_record_bytes
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
        out_key = key[:MAX_KEY_BYTES] if key is not None else None
        await self._send(out_key, encode_within(record, self._max_bytes))
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
                "request_id": out_key.decode("utf-8", "replace") if out_key else None,
            },
        )
