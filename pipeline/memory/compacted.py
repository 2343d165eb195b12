"""A compacted topic held whole in memory: every partition read from its start to its end at
start, then followed; a writer also produces to it (acks=all, idempotent) and applies its own
write once the broker acknowledged it. The preferences table and the data keys are two.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.core.errors import BrokerUnavailableError
from pipeline.core.settings import KafkaSettings
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.partition_tail import PartitionTail, table_partitions


class MemoryUnavailableError(BrokerUnavailableError):
    """A memory table's log could not be read or written in time."""

    code = "memory_unavailable"


class CompactedTable:
    """The reading, following and writing of one compacted topic; subclasses apply records."""

    # The tail's name in logs, and what the table holds, for errors.
    name = "table"
    what = "a compacted table"

    def __init__(
        self, settings: KafkaSettings, topic: str, *, writer: bool, start_timeout_s: float
    ) -> None:
        self.settings = settings
        self.topic = topic
        self._writer = writer
        self._start_timeout_s = start_timeout_s
        self._changed = asyncio.Condition()
        self._producer: AIOKafkaProducer | None = None
        self._tail: PartitionTail | None = None

    @property
    def ready(self) -> bool:
        """True once every partition was read to the end it had at start."""
        return self._tail is not None and self._tail.caught_up.is_set()

    async def start(self) -> None:
        """Read every partition from its start up to its end, then follow it."""
        connection = ConnectionConfig.from_settings(self.settings)
        self._tail = PartitionTail(connection, name=self.name, poll_timeout_ms=500)
        try:
            consumer = await self._tail.open()
            if self._writer:
                self._producer = connection.producer(
                    acks="all", enable_idempotence=True, linger_ms=0
                )
                await self._producer.start()
            partitions = await table_partitions(consumer, self.topic)
            tps = [TopicPartition(self.topic, p) for p in partitions]
            await self._tail.assign(tps, offsets=dict.fromkeys(tps, 0))
            self._tail.run(self._apply_batch)
            async with asyncio.timeout(self._start_timeout_s):
                await self._tail.caught_up.wait()
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, KafkaError | TimeoutError):
                raise MemoryUnavailableError(f"{self.what} cannot start: {exc!r}") from exc
            raise

    async def stop(self) -> None:
        tail, self._tail = self._tail, None
        if tail is not None:
            await tail.stop()
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(KafkaError):
                await producer.stop()

    async def _send(self, key: str, value: bytes | None) -> None:
        """Write one record (None: a tombstone) and wait for the broker's acknowledgement."""
        if self._producer is None:
            raise RuntimeError(f"this process does not write {self.what}")
        try:
            await self._producer.send_and_wait(self.topic, key=key.encode(), value=value)
        except KafkaError as exc:
            raise MemoryUnavailableError(f"could not write {self.what}: {exc!r}") from exc

    async def _apply_batch(self, tp: TopicPartition, messages: list[Any]) -> None:
        raise NotImplementedError
