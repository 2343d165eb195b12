"""Raw access to a stack's topics, as another system would have it: produce one record as it
is, read a topic from the start until a condition holds, count what was ever written."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from tests.harness.waiting import eventually

Headers = list[tuple[str, bytes]]
# The demo producer of pipeline/core/defaults/producers.toml, as `sumstream submit` signs.
DEMO_PRODUCER = "demo"
DEMO_SECRET = "demo-producer-7b41b5db455334e41581366d01c448af033af32e0fa571ee"


@dataclass(frozen=True)
class Record:
    """One record as it is on the topic."""

    key: bytes | None
    value: bytes
    partition: int
    offset: int
    timestamp_ms: int


def signed(value: bytes, producer: str = DEMO_PRODUCER, secret: str = DEMO_SECRET) -> Headers:
    """The headers that sign ``value`` as ``producer`` (pipeline/core/producers.py), computed
    here by hand so that a test states the wire format, not the code under test."""
    digest = hmac.new(secret.encode(), value, hashlib.sha256).hexdigest()
    return [("sumstream-producer", producer.encode()), ("sumstream-signature", digest.encode())]


def produce_raw(
    bootstrap: str,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    *,
    headers: Headers | None = None,
    partition: int | None = None,
) -> tuple[int, int]:
    """Produce one record as it is (no codec, no signature unless ``headers``); return its
    partition and offset. ``partition`` overrides the key's."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
        }
    )
    delivered: list[Any] = []
    extra: dict[str, Any] = {} if partition is None else {"partition": partition}
    producer.produce(
        topic,
        key=key,
        value=value,
        headers=list(headers or []),
        on_delivery=lambda err, msg: delivered.append((err, msg)),
        **extra,
    )
    producer.flush(30)
    [(err, msg)] = delivered
    assert err is None, err
    return int(msg.partition()), int(msg.offset())


def read_topic(
    bootstrap: str, topic: str, until: Callable[[list[Record]], bool], timeout: float = 60.0
) -> list[Record]:
    """Read ``topic`` from the start until ``until(records so far)`` holds; return them all."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    records: list[Record] = []

    def read_more() -> bool:
        # consume() blocks up to 0.2 s for records: it is the wait between checks.
        for msg in consumer.consume(num_messages=500, timeout=0.2):
            partition, offset = msg.partition(), msg.offset()
            if not msg.error() and partition is not None and offset is not None:
                value = msg.value() or b""
                ts = msg.timestamp()[1]
                records.append(Record(msg.key(), value, partition, offset, ts))
        return until(records)

    try:
        meta = consumer.list_topics(topic, timeout=10)
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions])
        if not until(records):
            eventually(
                read_more, timeout=timeout, interval=0, message=f"{topic}: the records looked for"
            )
        return records
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topic: str) -> int:
    """Records ever written to ``topic`` (the sum of its partitions' end offsets)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused"})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        total = 0
        for p in meta.topics[topic].partitions:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high
        return total
    finally:
        consumer.close()
