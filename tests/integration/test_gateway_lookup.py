"""Looking up an id the gateway does not hold (gateway/streams/lookup.py) on the real broker:
the log is read from the time in the id, and no further than the window after it in which the
id's records can have been written. Before this bound, a GET for a forged old id read its
partitions from that time to their end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from ulid import ULID

from gateway.admission.idempotency import RequestIndex
from gateway.settings import GatewaySettings
from gateway.streams.hub import StreamHub
from gateway.streams.lookup import RequestLookup
from pipeline.core.clock import now_ms
from pipeline.core.codec import codec
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from tests.avro_data import sample

pytestmark = pytest.mark.integration

MINUTE_MS = 60_000
DAY_MS = 24 * 60 * MINUTE_MS


def lookup_for(settings: KafkaSettings, topics: TopicNames) -> RequestLookup:
    gateway = GatewaySettings(
        bootstrap_servers=settings.bootstrap_servers,
        topic_prefix=settings.topic_prefix,
        keys_file=None,
        lookup_request_window_s=300.0,
        lookup_result_window_s=3600.0,
    )
    connection = ConnectionConfig.from_settings(gateway)
    return RequestLookup(gateway, connection, topics, RequestIndex(), StreamHub())


def id_at(ms: int) -> str:
    return str(ULID.from_timestamp(ms / 1000))


async def produce_at(
    settings: KafkaSettings, topic: str, request_id: str, name: str, at_ms: int, **fields: Any
) -> None:
    """A record of ``request_id`` stamped ``at_ms`` (its Kafka CreateTime)."""
    record = {**sample(name), "request_id": request_id, **fields}
    producer = ConnectionConfig.from_settings(settings).producer(acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, key=request_id.encode(), value=codec().encode(name, record), timestamp_ms=at_ms
        )
    finally:
        await producer.stop()


async def test_a_request_record_within_the_window_after_its_id_is_found(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames]
) -> None:
    topics = make_topics(stream_partitions=2, work_partitions=2)
    born = now_ms() - 10 * MINUTE_MS
    request_id = id_at(born)
    await produce_at(
        kafka_settings,
        topics.requests,
        request_id,
        "SummarizeRequest",
        born + MINUTE_MS,
        user_id="ann",
    )
    owner = await lookup_for(kafka_settings, topics).owner_of(request_id)
    assert owner is not None and owner.user_id == "ann"


async def test_records_stamped_beyond_the_window_after_the_id_are_not_read(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames]
) -> None:
    topics = make_topics(stream_partitions=2, work_partitions=2)
    born = now_ms() - 2 * DAY_MS
    request_id = id_at(born)
    # Records of this id written long after its time: the scan stops before reaching them.
    await produce_at(
        kafka_settings, topics.requests, request_id, "SummarizeRequest", now_ms(), user_id="eve"
    )
    await produce_at(
        kafka_settings, topics.results, request_id, "SummaryResult", now_ms(), user_id="eve"
    )
    lookup = lookup_for(kafka_settings, topics)
    assert await lookup.owner_of(request_id) is None
    assert await lookup.result_of(request_id) is None


@pytest.mark.parametrize("age_ms", [-DAY_MS, 40 * DAY_MS], ids=["future", "beyond_retention"])
async def test_an_id_from_the_future_or_beyond_retention_is_unknown_without_reading(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames], age_ms: int
) -> None:
    topics = make_topics(stream_partitions=2, work_partitions=2)
    request_id = id_at(now_ms() - age_ms)
    # Even a record that names it, stamped at the id's own time, is not looked for.
    await produce_at(
        kafka_settings, topics.results, request_id, "SummaryResult", now_ms(), user_id="eve"
    )
    lookup = lookup_for(kafka_settings, topics)
    assert await lookup.owner_of(request_id) is None
    assert await lookup.result_of(request_id) is None
