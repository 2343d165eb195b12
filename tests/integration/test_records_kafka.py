"""Every record type through the real broker: written by one client library, read by the other.

aiokafka is what sumstream's own processes use; confluent-kafka (librdkafka) stands for another
system producing to or consuming from sumstream's topics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Consumer, KafkaError, Producer
from ulid import ULID

from pipeline.core.codec import codec
from pipeline.core.partitioning import partition_for
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames, declared_topics
from tests.avro_data import record_names, sample, sparse

pytestmark = pytest.mark.integration

PARTITIONS = 3
# (topic, key, record name, record)
Message = tuple[str, bytes, str, dict[str, Any]]


def messages(settings: KafkaSettings) -> list[Message]:
    """Two records of every type (every union branch taken once), each on its declared topic."""
    topic_of = {spec.schema: spec.name(settings.topic_prefix) for spec in declared_topics(settings)}
    out: list[Message] = []
    for name in record_names():
        assert name in topic_of, f"{name} has no declared topic"
        for record in (sample(name), sparse(name)):
            key = str(ULID())
            for field in ("request_id", "user_id"):
                if field in record:
                    record[field] = key
            out.append((topic_of[name], key.encode(), name, record))
    return out


def _settings(kafka_settings: KafkaSettings) -> KafkaSettings:
    return kafka_settings.model_copy(
        update={"stream_partitions": PARTITIONS, "work_partitions": PARTITIONS}
    )


def _check(
    sent: list[Message], received: list[tuple[str, int, bytes, bytes]], counts: dict[str, int]
) -> None:
    by_key = {(topic, key): (name, record) for topic, key, name, record in sent}
    assert len(received) == len(sent)
    for topic, partition, key, value in received:
        name, record = by_key.pop((topic, key))
        assert codec().decode(value) == (name, record)
        # The default partitioner of both libraries: a stream's partition follows from its id.
        assert partition == partition_for(key, counts[topic])
    assert not by_key


def _counts(settings: KafkaSettings) -> dict[str, int]:
    return {spec.name(settings.topic_prefix): spec.partitions for spec in declared_topics(settings)}


async def test_aiokafka_producer_to_confluent_consumer(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames], group_id: str
) -> None:
    settings = _settings(kafka_settings)
    make_topics(settings)
    sent = messages(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, enable_idempotence=True, acks="all"
    )
    await producer.start()
    try:
        for topic, key, name, record in sent:
            await producer.send_and_wait(topic, codec().encode(name, record), key=key)
    finally:
        await producer.stop()

    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: list[tuple[str, int, bytes, bytes]] = []
    try:
        consumer.subscribe(sorted({topic for topic, *_ in sent}))
        deadline = time.monotonic() + 60
        while len(received) < len(sent) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                continue
            received.append((msg.topic(), msg.partition(), msg.key(), msg.value()))
    finally:
        consumer.close()
    _check(sent, received, _counts(settings))


async def test_confluent_producer_to_aiokafka_consumer(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames], group_id: str
) -> None:
    settings = _settings(kafka_settings)
    make_topics(settings)
    sent = messages(settings)
    # How another system should produce: idempotent, acks=all, Java-compatible partitioner.
    producer = Producer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
        }
    )
    errors: list[Any] = []
    for topic, key, name, record in sent:
        producer.produce(
            topic,
            value=codec().encode(name, record),
            key=key,
            on_delivery=lambda err, _msg: errors.append(err) if err is not None else None,
        )
    assert producer.flush(30) == 0
    assert errors == []

    consumer = AIOKafkaConsumer(
        *sorted({topic for topic, *_ in sent}),
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    received: list[tuple[str, int, bytes, bytes]] = []
    await consumer.start()
    try:
        deadline = time.monotonic() + 60
        while len(received) < len(sent) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for messages_ in batches.values():
                for msg in messages_:
                    assert msg.key is not None and msg.value is not None
                    received.append((msg.topic, msg.partition, msg.key, msg.value))
    finally:
        await consumer.stop()
    _check(sent, received, _counts(settings))
