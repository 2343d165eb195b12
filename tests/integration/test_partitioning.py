"""partition_for agrees with the partition the real producers pick on a real broker."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from confluent_kafka import Producer
from ulid import ULID

from pipeline.core.partitioning import partition_for
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames

pytestmark = pytest.mark.integration

# Unequal counts, so a wrong modulus or a different hash cannot agree by chance.
STREAM, WORK = 7, 6


def keys() -> list[bytes]:
    rng = random.Random(20260101)
    ulids = [str(ULID()).encode() for _ in range(150)]
    blobs = [rng.randbytes(rng.randint(0, 40)) for _ in range(100)]
    return [*ulids, *blobs, "req-été-✓".encode()]


def test_confluent_murmur2_random_matches(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames]
) -> None:
    names = make_topics(stream_partitions=STREAM, work_partitions=WORK)
    producer = Producer(
        {"bootstrap.servers": kafka_settings.bootstrap_servers, "partitioner": "murmur2_random"}
    )
    placed: list[tuple[str, bytes, int]] = []

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        placed.append((msg.topic(), msg.key(), msg.partition()))

    sent = keys()
    for key in sent:
        producer.produce(names.tokens, key=key, value=b"x", on_delivery=delivered)
        producer.produce(names.requests, key=key, value=b"x", on_delivery=delivered)
    assert producer.flush(30) == 0
    assert len(placed) == 2 * len(sent)
    counts = {names.tokens: STREAM, names.requests: WORK}
    for topic, key, partition in placed:
        assert partition == partition_for(key, counts[topic]), (topic, key)


async def test_aiokafka_default_partitioner_matches(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames]
) -> None:
    names = make_topics(stream_partitions=STREAM, work_partitions=WORK)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers)
    await producer.start()
    try:
        pending = [
            (key, count, await producer.send(topic, b"x", key=key))
            for key in keys()
            for topic, count in ((names.tokens, STREAM), (names.requests, WORK))
        ]
        for key, count, delivery in pending:
            assert (await delivery).partition == partition_for(key, count), key
    finally:
        await producer.stop()
