"""Read one request's records back from its partition, positioned by the time inside its id.

Last-Event-ID resume, serving a stream owned by another gateway, postprocess recovery,
inference resume after a crash and replay all use this one reader.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiokafka import TopicPartition
from ulid import ULID

from pipeline.core.codec import codec
from pipeline.core.errors import CodecError
from pipeline.core.partitioning import partition_for
from pipeline.core.records import TERMINAL_KINDS
from pipeline.core.sealing import KeyUnknownError
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.partition_tail import PartitionTail, partition_ids

# Producer clocks may lag the clock that minted the id; start a little earlier.
CLOCK_SKEW_MS = 10_000


def id_time_ms(request_id: str) -> int | None:
    """Epoch ms encoded in a ULID request id, or None for ids minted by other systems."""
    try:
        # A long document's chunk call (``<parent>~<level>.<index>``) has its parent's time.
        return int(ULID.from_str(request_id.partition("~")[0]).milliseconds)
    except (ValueError, TypeError):
        return None


async def read_request_records(
    connection: ConnectionConfig,
    topic: str,
    request_id: str,
    *,
    schema: str,
    follow: bool = False,
    since_ms: int | None = None,
    until_ms: int | None = None,
    idle_timeout_s: float = 30.0,
    stop_at_terminal: bool = True,
    wait_for_key: Callable[[str], Awaitable[bool]] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Yield the decoded records keyed ``request_id`` in ``topic``, in log order.

    Without ``follow`` it stops at the partition's end as of the call, or at the first record
    stamped after ``until_ms`` (allowing for clock skew): a look-up of an id can be bounded to
    the time its records can have been written. With ``follow`` it keeps reading until a
    terminal TokenEvent (when ``stop_at_terminal``) or ``idle_timeout_s`` passes without any
    record of this request. Undecodable records are skipped: their stage has already sent
    them to the dead-letter topic. A record sealed with a data key not read yet is skipped
    too, unless ``wait_for_key`` waits for the key (docs/architecture.md, "Forgetting").
    """
    stop_after_ms = None if follow or until_ms is None else until_ms + CLOCK_SKEW_MS
    key = request_id.encode()
    start_ms = since_ms if since_ms is not None else id_time_ms(request_id)
    tail = PartitionTail(
        connection, name=f"read {topic}", poll_timeout_ms=200, max_records=500, retry_s=0.2
    )
    try:
        consumer = await tail.open()
        partitions = await partition_ids(consumer, topic)
        tp = TopicPartition(topic, partition_for(key, len(partitions)))
        if start_ms is not None:
            # No record at or after the time: the tail starts at the end read before the lookup.
            ends = await tail.assign([tp], since_ms=max(0, start_ms - CLOCK_SKEW_MS))
        else:
            ends = await tail.assign([tp], offsets=await consumer.beginning_offsets([tp]))
        end = ends[tp]
        deadline = time.monotonic() + idle_timeout_s
        if not follow and await consumer.position(tp) >= end:
            return
        async for batch in tail.rounds():
            for msg in batch.get(tp, []):
                if not follow and msg.offset >= end:
                    return
                if stop_after_ms is not None and msg.timestamp > stop_after_ms:
                    return
                if msg.key != key:
                    continue
                try:
                    record = codec().decode_as(msg.value, schema)
                except KeyUnknownError as exc:
                    if wait_for_key is None:
                        continue
                    # After the wait the key is read, or reads as shredded: no second miss.
                    await wait_for_key(exc.key_id)
                    try:
                        record = codec().decode_as(msg.value, schema)
                    except CodecError:
                        continue
                except CodecError:
                    continue
                deadline = time.monotonic() + idle_timeout_s
                yield record
                if stop_at_terminal and record.get("kind") in TERMINAL_KINDS:
                    return
            if not follow and await consumer.position(tp) >= end:
                return
            if follow and time.monotonic() > deadline:
                return
    finally:
        await tail.stop()
