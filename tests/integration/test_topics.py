from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource
from confluent_kafka.admin._resource import ResourceType

from pipeline.core.errors import TopicConfigError
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import DAY_MS, TopicNames, declared_topics
from pipeline.kafka.admin import (
    admin_client,
    create_topics,
    delete_topics,
    describe_topics,
    ensure_topics,
)
from pipeline.ops.topics import format_table

pytestmark = pytest.mark.integration


def test_describe_before_create_reports_missing_topics(kafka_settings: KafkaSettings) -> None:
    rows = describe_topics(kafka_settings)
    assert [row["exists"] for row in rows] == [False] * len(declared_topics(kafka_settings))
    assert all(not row["matches"] for row in rows)
    assert "MISSING" in format_table(rows)


async def test_ensure_topics_creates_every_declared_topic_once(
    kafka_settings: KafkaSettings,
) -> None:
    settings = kafka_settings.model_copy(update={"stream_partitions": 3, "work_partitions": 2})
    declared = {spec.name(settings.topic_prefix): spec for spec in declared_topics(settings)}
    try:
        assert await ensure_topics(settings) == sorted(declared)
        assert await ensure_topics(settings) == []  # idempotent: nothing new, no error
        rows = {row["name"]: row for row in describe_topics(settings)}
    finally:
        delete_topics(settings)
    assert set(rows) == set(declared)
    for name, spec in declared.items():
        row = rows[name]
        assert row["exists"] and row["matches"], row
        assert row["partitions"] == spec.partitions
        assert row["config"] == spec.config
    names = TopicNames.from_settings(settings)
    assert rows[names.tokens]["partitions"] == rows[names.results]["partitions"] == 3
    assert rows[names.requests]["partitions"] == 2
    assert rows[names.requests]["config"]["retention.ms"] == str(7 * DAY_MS)
    assert rows[names.results]["config"]["cleanup.policy"] == "compact,delete"
    assert rows[names.results]["config"]["retention.ms"] == str(30 * DAY_MS)
    assert rows[names.dlq]["partitions"] == 1


def test_create_restores_drifted_configuration(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames]
) -> None:
    names = make_topics(stream_partitions=2, work_partitions=2)
    settings = kafka_settings.model_copy(update={"stream_partitions": 2, "work_partitions": 2})
    entry = ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.TOPIC, names.requests, incremental_configs=[entry])
    client = admin_client(settings)  # kept alive until the futures resolve
    for future in client.incremental_alter_configs([resource]).values():
        future.result(timeout=30)
    assert _retention_becomes(settings, names.requests, "1000")

    assert create_topics(settings) == []
    assert _retention_becomes(settings, names.requests, str(7 * DAY_MS))


def _retention_becomes(settings: KafkaSettings, topic: str, value: str) -> bool:
    # A config change reaches the broker's metadata a moment after the controller accepts it.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        row = {row["name"]: row for row in describe_topics(settings)}[topic]
        if row["config"]["retention.ms"] == value:
            return True
        time.sleep(0.1)
    return False


def test_partition_count_mismatch_is_refused(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames]
) -> None:
    make_topics(stream_partitions=2, work_partitions=2)
    wider = kafka_settings.model_copy(update={"stream_partitions": 4, "work_partitions": 2})
    with pytest.raises(TopicConfigError, match="partitions"):
        create_topics(wider)
