"""seek_to_time and the partition tail on the real broker: a record written between the two
offset lookups of a start-up is read, not skipped (the quota ledger's billing bug)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from confluent_kafka.admin import AdminClient, NewTopic

from gateway.admission.quota import QuotaLedger
from pipeline.core.clock import now_ms
from pipeline.core.codec import codec
from pipeline.core.settings import KafkaSettings
from pipeline.core.tiers import Tier
from pipeline.core.topics import declared_topics
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.partition_tail import PartitionTail, seek_to_time
from pipeline.quota.state import QuotaEvent

pytestmark = pytest.mark.integration

TIERS = {
    "pro": Tier(
        name="pro",
        rpm=100,
        tpm=100_000,
        max_input_tokens=1_000,
        max_output_tokens=100,
        weight=1,
        monthly_budget_usd=100.0,
        max_queue_wait_s=30.0,
        on_input_too_large="reject",
    )
}


@pytest.fixture
def settings(bootstrap: str) -> Iterator[KafkaSettings]:
    """A prefix of this test's own with only its `quota` topic, created as declared."""
    s = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"t-{uuid.uuid4().hex[:8]}.")
    spec = next(t for t in declared_topics(s) if t.short == "quota")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    name = spec.name(s.topic_prefix)
    for future in admin.create_topics(
        [NewTopic(name, spec.partitions, 1, config=spec.config)], operation_timeout=10
    ).values():
        future.result(timeout=30)
    yield s
    for future in admin.delete_topics([name], operation_timeout=10).values():
        future.result(timeout=30)


@pytest.fixture
async def producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


class WriteBetweenLookups:
    """A consumer that writes one record right after its first offset lookup returns,
    whichever lookup comes first: the race a start-up loses if it asks by time first."""

    def __init__(self, consumer: AIOKafkaConsumer, write: Any) -> None:
        self._consumer = consumer
        self._write = write
        self.written = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    async def _after(self, result: Any) -> Any:
        if not self.written:
            self.written = True
            await self._write()
        return result

    async def end_offsets(self, tps: Any) -> Any:
        return await self._after(await self._consumer.end_offsets(tps))

    async def offsets_for_times(self, query: Any) -> Any:
        return await self._after(await self._consumer.offsets_for_times(query))


async def test_seek_to_time_reads_a_record_written_between_its_two_offset_lookups(
    settings: KafkaSettings, producer: AIOKafkaProducer
) -> None:
    topic = f"{settings.topic_prefix}quota"
    tp = TopicPartition(topic, 0)
    value = f"between-{uuid.uuid4().hex}".encode()

    async def write() -> None:
        await producer.send_and_wait(topic, value, partition=0)

    tail = PartitionTail(ConnectionConfig.from_settings(settings), name="test")
    try:
        consumer = await tail.open()
        consumer.assign([tp])
        racing = WriteBetweenLookups(consumer, write)
        # Nothing in the partition is at or after the time: the seek falls back to an end.
        await seek_to_time(racing, [tp], now_ms() - 60_000)  # type: ignore[arg-type]
        assert racing.written
        assert await consumer.position(tp) == 0
        batch = await consumer.getmany(tp, timeout_ms=10_000)
        assert [m.value for m in batch.get(tp, [])] == [value]
    finally:
        await tail.stop()


async def test_quota_ledger_start_applies_a_record_written_between_the_offset_lookups(
    settings: KafkaSettings, producer: AIOKafkaProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = f"{settings.topic_prefix}quota"
    user = f"user-{uuid.uuid4().hex[:8]}"
    spent = QuotaEvent(
        event_id=uuid.uuid4().hex,
        user_id=user,
        kind="SETTLE",
        request_id="written-during-start",
        at=now_ms(),
        tier="pro",
        tokens=50,
        cost_micro_usd=7_000,
        gateway="another",
    )
    injected: list[WriteBetweenLookups] = []

    async def write() -> None:
        value = codec().encode("QuotaEvent", spent.to_record())
        await producer.send_and_wait(topic, value, key=user.encode())

    build = ConnectionConfig.consumer

    def racing_consumer(self: ConnectionConfig, **options: Any) -> Any:
        racing = WriteBetweenLookups(build(self, **options), write)
        injected.append(racing)
        return racing

    monkeypatch.setattr(ConnectionConfig, "consumer", racing_consumer)
    async with QuotaLedger(settings, TIERS, gateway_id="g0") as ledger:
        assert [r.written for r in injected] == [True]
        # A SETTLE of the same user lands after the injected record in the same partition;
        # once the ledger has applied it, it has read everything before it.
        await ledger.settle(user, "pro", "marker", 10, 1)
        usage = ledger.usage(user)
    assert (usage.cost_micro_usd, usage.tokens) == (7_001, 60)


class FailingFetches:
    """A consumer whose first ``failures`` fetches fail as a broker restart makes them fail."""

    def __init__(self, consumer: AIOKafkaConsumer, failures: int) -> None:
        self._consumer = consumer
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    async def getmany(self, *tps: TopicPartition, **options: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise KafkaConnectionError("broker gone")
        return await self._consumer.getmany(*tps, **options)


async def test_tail_rides_out_failed_fetches_and_hands_on_every_record_in_order(
    settings: KafkaSettings, producer: AIOKafkaProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = f"{settings.topic_prefix}quota"
    tp = TopicPartition(topic, 0)
    build = ConnectionConfig.consumer
    wrapped: list[FailingFetches] = []

    def failing_consumer(self: ConnectionConfig, **options: Any) -> Any:
        wrapped.append(FailingFetches(build(self, **options), failures=2))
        return wrapped[0]

    monkeypatch.setattr(ConnectionConfig, "consumer", failing_consumer)
    before = [f"old-{i}".encode() for i in range(3)]
    after = [f"new-{i}".encode() for i in range(3)]
    for value in before:
        await producer.send_and_wait(topic, value, partition=0)
    seen: list[bytes] = []
    all_seen = asyncio.Event()

    async def handle(batch_tp: TopicPartition, messages: list[Any]) -> None:
        assert batch_tp == tp
        seen.extend(m.value for m in messages)
        if len(seen) == len(before) + len(after):
            all_seen.set()

    tail = PartitionTail(ConnectionConfig.from_settings(settings), name="test", retry_s=0.01)
    try:
        ends = await tail.assign([tp], since_ms=0)
        assert ends == {tp: len(before)}
        assert not tail.caught_up.is_set()
        tail.run(handle)
        for value in after:
            await producer.send_and_wait(topic, value, partition=0)
        async with asyncio.timeout(30):
            await all_seen.wait()
            await tail.caught_up.wait()
    finally:
        await tail.stop()
    assert wrapped[0].failures == 0
    assert seen == before + after
