"""The one consumer loop: assign (or join a group), position by time or offset, then ``getmany``.

The stream hub, the request index, the settler, the quota ledger, the request reader
(``pipeline/kafka/tail.py``) and history scans all read through ``PartitionTail``, so they share
one positioning rule (``seek_to_time``: ends first), one back-off on ``KafkaError`` and one
``fetch_max_wait_ms`` (``SUMSTREAM_FETCH_MAX_WAIT_MS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError

from pipeline.core.errors import TopicMissingError
from pipeline.kafka.connection import ConnectionConfig

log = logging.getLogger("sumstream.kafka.tail")

Batch = dict[TopicPartition, list[Any]]
BatchHandler = Callable[[TopicPartition, list[Any]], Awaitable[None]]


async def seek_to_time(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition], since_ms: int
) -> dict[TopicPartition, int]:
    """Seek each partition to its first record at or after ``since_ms``, or else to its end.

    The ends are read BEFORE the time lookup: a record written between the two calls is then
    either found by time or lies at or after the end we fall back to, never skipped. Returns
    those ends.
    """
    ends: dict[TopicPartition, int] = await consumer.end_offsets(list(tps))
    found = await consumer.offsets_for_times(dict.fromkeys(tps, max(0, since_ms)))
    for tp in tps:
        hit = found.get(tp)
        consumer.seek(tp, hit.offset if hit is not None else ends[tp])
    return ends


async def partition_ids(consumer: AIOKafkaConsumer, topic: str, attempts: int = 50) -> set[int]:
    """The partitions of ``topic``, waiting a moment for metadata of a topic just created.

    ``consumer.topics()`` fetches metadata without updating the view ``partitions_for_topic``
    reads; assigning partition 0 (every topic has one) makes the client track the topic.
    Callers assign their real partitions afterwards.
    """
    partitions = consumer.partitions_for_topic(topic)
    if partitions:
        return set(partitions)
    consumer.assign([TopicPartition(topic, 0)])
    for _ in range(attempts):
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return set(partitions)
        await asyncio.sleep(0.1)
    raise TopicMissingError(f"topic {topic} has no partitions")


async def table_partitions(
    consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 10
) -> list[int]:
    """The partitions of a table's topic (one read whole and followed), asking the broker for
    metadata until it has them; TopicMissingError names the command that creates it."""
    try:
        async with asyncio.timeout(timeout_s):
            while not (found := consumer.partitions_for_topic(topic)):
                await consumer.topics()
                consumer.assign([TopicPartition(topic, 0)])
                await asyncio.sleep(0.1)
            return sorted(found)
    except (UnknownTopicOrPartitionError, TimeoutError) as exc:
        raise TopicMissingError(f"topic {topic} missing: run `sumstream topics create`") from exc


class _SeekUncommitted(ConsumerRebalanceListener):  # type: ignore[misc]
    """A partition its group never committed starts at ``since_ms()`` (by ``seek_to_time``)."""

    def __init__(self, consumer: AIOKafkaConsumer, since_ms: Callable[[], int]) -> None:
        self.consumer = consumer
        self.since_ms = since_ms

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        fresh = [tp for tp in assigned if await self.consumer.committed(tp) is None]
        if fresh:
            await seek_to_time(self.consumer, fresh, self.since_ms())


class PartitionTail:
    """One consumer reading its partitions in a loop that survives broker errors.

    Use ``assign`` (partitions chosen here) or ``subscribe`` (a consumer group), then either
    iterate ``rounds()`` or hand ``run()`` a handler for a background task; ``stop()`` ends both.
    """

    def __init__(
        self,
        connection: ConnectionConfig,
        *,
        name: str,
        group_id: str | None = None,
        auto_offset_reset: str = "earliest",
        poll_timeout_ms: int = 1_000,
        max_records: int = 1_000,
        retry_s: float = 0.5,
    ) -> None:
        self.connection = connection
        self.name = name
        self.group_id = group_id
        self.auto_offset_reset = auto_offset_reset
        self.poll_timeout_ms = poll_timeout_ms
        self.max_records = max_records
        self.retry_s = retry_s
        # Set once every assigned partition has been read up to the end it had at ``assign``.
        self.caught_up = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._pending: dict[TopicPartition, int] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def consumer(self) -> AIOKafkaConsumer:
        """The started consumer (for commits, pauses and extra offset lookups)."""
        if self._consumer is None:
            raise RuntimeError(f"{self.name}: not started")
        return self._consumer

    async def open(self) -> AIOKafkaConsumer:
        """Start the consumer without assigning anything yet (to look topics up first)."""
        if self._consumer is None:
            consumer = self.connection.consumer(
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset=self.auto_offset_reset,
                fetch_max_wait_ms=self.connection.fetch_max_wait_ms,
            )
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def assign(
        self,
        tps: Sequence[TopicPartition],
        *,
        since_ms: int | None = None,
        offsets: Mapping[TopicPartition, int] | None = None,
    ) -> dict[TopicPartition, int]:
        """Assign ``tps`` at ``offsets``, else at ``since_ms`` (``seek_to_time``), else at the end.

        Returns each partition's end offset read before positioning: ``caught_up`` is set once
        the tail has read that far.
        """
        consumer = await self.open()
        try:
            consumer.assign(list(tps))
            if offsets is not None:
                ends: dict[TopicPartition, int] = await consumer.end_offsets(list(tps))
                for tp in tps:
                    consumer.seek(tp, offsets[tp])
            elif since_ms is not None:
                ends = await seek_to_time(consumer, tps, since_ms)
            else:
                await consumer.seek_to_end(*tps)
                # Resolve now, so records written after this call returns are all read.
                ends = {tp: await consumer.position(tp) for tp in tps}
        except BaseException:
            await self.stop()
            raise
        self._pending = dict(ends)
        await self._check_caught_up()
        return ends

    async def subscribe(self, topics: Sequence[str], *, since_ms: Callable[[], int]) -> None:
        """Join ``group_id`` on ``topics``; a partition never committed starts at ``since_ms()``."""
        if self.group_id is None:
            raise ValueError(f"{self.name}: subscribe needs a group_id")
        consumer = await self.open()
        try:
            consumer.subscribe(list(topics), listener=_SeekUncommitted(consumer, since_ms))
        except BaseException:
            await self.stop()
            raise
        self.caught_up.set()

    async def rounds(self) -> AsyncIterator[Batch]:
        """One ``getmany`` per round, forever; a failed fetch waits ``retry_s`` and yields {}."""
        consumer = self.consumer
        while True:
            try:
                batch: Batch = await consumer.getmany(
                    timeout_ms=self.poll_timeout_ms, max_records=self.max_records
                )
            except KafkaError as exc:
                # The client reconnects by itself: a broker restart is a delay, not an end.
                log.warning("%s: fetch failed: %r", self.name, exc)
                await asyncio.sleep(self.retry_s)
                yield {}
                continue
            yield batch
            await self._check_caught_up()

    def run(
        self, handler: BatchHandler, *, on_crash: Callable[[Exception], None] | None = None
    ) -> None:
        """Feed every batch to ``handler`` in a background task until ``stop()``.

        An exception from ``handler`` ends the task: it is logged and passed to ``on_crash``.
        """
        self._task = asyncio.create_task(self._feed(handler, on_crash), name=self.name)

    async def _feed(
        self, handler: BatchHandler, on_crash: Callable[[Exception], None] | None
    ) -> None:
        try:
            async for batch in self.rounds():
                for tp, messages in batch.items():
                    await handler(tp, messages)
        except Exception as exc:
            log.exception("%s: reader crashed", self.name)
            if on_crash is not None:
                on_crash(exc)
            raise

    async def _check_caught_up(self) -> None:
        if self.caught_up.is_set():
            return
        for tp, end in list(self._pending.items()):
            if await self.consumer.position(tp) >= end:
                del self._pending[tp]
        if not self._pending:
            self.caught_up.set()

    async def stop(self) -> None:
        """Stop the background task (if any) and close the consumer."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # A crashed task was logged already: collect it, do not raise it again.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(KafkaError):
                await consumer.stop()
