"""Read one request's records back from its partition, positioned by the time inside its id.

Last-Event-ID resume, serving a stream owned by another gateway, postprocess recovery,
inference resume after a crash and replay all use this one reader.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from ulid import ULID

from pipeline.core.codec import codec
from pipeline.core.errors import CodecError, TopicMissingError
from pipeline.core.partitioning import partition_for

TERMINAL_KINDS = frozenset({"DONE", "ERROR", "CANCELLED"})
# Producer clocks may lag the clock that minted the id; start a little earlier.
CLOCK_SKEW_MS = 10_000


def id_time_ms(request_id: str) -> int | None:
    """Epoch ms encoded in a ULID request id, or None for ids minted by other systems."""
    try:
        return int(ULID.from_str(request_id).milliseconds)
    except (ValueError, TypeError):
        return None


async def read_request_records(
    bootstrap_servers: str,
    topic: str,
    request_id: str,
    *,
    schema: str,
    follow: bool = False,
    since_ms: int | None = None,
    idle_timeout_s: float = 30.0,
    stop_at_terminal: bool = True,
) -> AsyncIterator[dict[str, Any]]:
    """Yield the decoded records keyed ``request_id`` in ``topic``, in log order.

    Without ``follow`` it stops at the partition's end as of the call; with it, it keeps
    reading until a terminal TokenEvent (when ``stop_at_terminal``) or ``idle_timeout_s``
    passes without any record of this request. Undecodable records are skipped: their stage
    has already sent them to the dead-letter topic.
    """
    key = request_id.encode()
    start_ms = since_ms if since_ms is not None else id_time_ms(request_id)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            partitions = await _wait_partitions(consumer, topic)
        tp = TopicPartition(topic, partition_for(key, len(partitions)))
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        if start_ms is not None:
            found = await consumer.offsets_for_times({tp: max(0, start_ms - CLOCK_SKEW_MS)})
            if found.get(tp) is None:
                if not follow:
                    return
                consumer.seek(tp, end)
            else:
                consumer.seek(tp, found[tp].offset)
        else:
            await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + idle_timeout_s
        while True:
            if not follow and await consumer.position(tp) >= end:
                return
            batch = await consumer.getmany(tp, timeout_ms=200, max_records=500)
            for msg in batch.get(tp, []):
                if not follow and msg.offset >= end:
                    return
                if msg.key != key:
                    continue
                try:
                    record = codec().decode_as(msg.value, schema)
                except CodecError:
                    continue
                deadline = time.monotonic() + idle_timeout_s
                yield record
                if stop_at_terminal and record.get("kind") in TERMINAL_KINDS:
                    return
            if follow and time.monotonic() > deadline:
                return
    finally:
        await consumer.stop()


async def _wait_partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    for _ in range(50):
        # consumer.topics() fetches metadata without updating the client's cluster view,
        # which partitions_for_topic reads; tracking the topic does.
        await consumer._client.add_topic(topic)
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return set(partitions)
        await asyncio.sleep(0.1)
    raise TopicMissingError(f"topic {topic} has no partitions")
