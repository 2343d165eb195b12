from __future__ import annotations

from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.core.errors import TopicMissingError
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.lag import LagReader, read_lag
from pipeline.ops.lag import format_table

pytestmark = pytest.mark.integration


def produce(settings: KafkaSettings, topic: str, count: int) -> None:
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for i in range(count):
        producer.produce(topic, key=f"k{i}".encode(), value=b"v")
    assert producer.flush(30) == 0


def commit(settings: KafkaSettings, group: str, offsets: list[TopicPartition]) -> None:
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": group})
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


async def test_lag_is_end_minus_committed_per_stage(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames], group_id: str
) -> None:
    settings = kafka_settings.model_copy(update={"work_partitions": 1, "stream_partitions": 2})
    names = make_topics(settings)
    groups = {"preprocess": group_id, "inference": group_id, "postprocess": group_id + "-pp"}
    reader = LagReader(settings, groups)
    assert await reader.read_async() == {"preprocess": 0, "inference": 0, "postprocess": 0}

    produce(settings, names.requests, 10)
    produce(settings, names.preprocessed, 4)
    produce(settings, names.tokens, 7)
    # Never committed: everything retained is waiting.
    assert reader.read() == {"preprocess": 10, "inference": 4, "postprocess": 7}

    commit(settings, group_id, [TopicPartition(names.requests, 0, 6)])
    commit(settings, group_id + "-pp", [TopicPartition(names.tokens, p, 100) for p in (0, 1)])
    lag = read_lag(settings, groups)
    # Offsets past the end (never happens in practice) count as no lag, not negative lag.
    assert lag == {"preprocess": 4, "inference": 4, "postprocess": 0}

    parts = reader.read_partitions()
    requests = [p for p in parts if p.stage == "preprocess"]
    assert [(p.partition, p.committed, p.end, p.lag) for p in requests] == [(0, 6, 10, 4)]
    assert {p.partition for p in parts if p.stage == "postprocess"} == {0, 1}
    assert "preprocess" in format_table(parts, per_partition=True)


def test_missing_topics_raise(kafka_settings: KafkaSettings) -> None:
    with pytest.raises(TopicMissingError):
        read_lag(kafka_settings, {"preprocess": "g"})


def test_unknown_stage_is_refused(kafka_settings: KafkaSettings) -> None:
    with pytest.raises(ValueError, match="unknown stages"):
        LagReader(kafka_settings, {"summarize": "g"})
