"""Create the declared topics idempotently and show what the broker holds.

The topics themselves are declared in ``pipeline/core/topics.py``; this module only talks to the
broker (confluent-kafka's AdminClient, which is synchronous: the async API runs it in a thread).
The `sumstream topics` command is pipeline/ops/topics.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    OffsetSpec,
    ResourceType,
)

from pipeline.core.errors import BrokerUnavailableError, SumstreamError, TopicConfigError
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicSpec, declared_topics
from pipeline.kafka.connection import ConnectionConfig

TIMEOUT_S = 30.0
# Answers from a partition whose leadership is still being set up.
# Leadership still settling (a new topic, a broker that just started or restarted).
LEADER_MOVING = {
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.UNKNOWN_LEADER_EPOCH,
    KafkaError.FENCED_LEADER_EPOCH,
}
_NOT_YET = {*LEADER_MOVING, KafkaError.UNKNOWN_TOPIC_OR_PART}
_UNAVAILABLE = {
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
}


def admin_client(settings: KafkaSettings) -> AdminClient:
    """An AdminClient for the settings' cluster (no close needed: librdkafka frees it on GC)."""
    return ConnectionConfig.from_settings(settings).admin_client({"log.connection.close": False})


def kafka_error(what: str, exc: KafkaException) -> SumstreamError:
    """Map a confluent-kafka failure to our errors: unreachable broker is retriable."""
    err: KafkaError = exc.args[0]
    if err.code() in _UNAVAILABLE or err.retriable():
        return BrokerUnavailableError(f"{what}: {err.str()}")
    return TopicConfigError(f"{what}: {err.str()}")


def create_topics(settings: KafkaSettings, timeout_s: float = TIMEOUT_S) -> list[str]:
    """Create every declared topic that is missing; return the names created.

    Topics that already exist get the declared configuration applied (retention, compaction)
    and must have the declared partition count, or TopicConfigError says how to fix it.
    """
    specs = declared_topics(settings)
    by_name = {spec.name(settings.topic_prefix): spec for spec in specs}
    client = admin_client(settings)
    new = [
        NewTopic(
            name,
            num_partitions=spec.partitions,
            replication_factor=settings.replication_factor,
            config=spec.config,
        )
        for name, spec in by_name.items()
    ]
    futures = client.create_topics(new, request_timeout=timeout_s, operation_timeout=timeout_s)
    created: list[str] = []
    existing: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s + 5)
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                existing.append(name)
                continue
            raise kafka_error(f"creating {name}", exc) from exc
        created.append(name)
    # The controller knows a new topic before the broker's metadata does: wait for every
    # partition's leader, so callers can produce at once and the checks below see every topic.
    counts = _wait_visible(client, by_name, timeout_s)
    if existing:
        _reconcile(client, {name: by_name[name] for name in existing}, counts, timeout_s)
    return sorted(created)


def _wait_visible(
    client: AdminClient, names: Iterable[str], timeout_s: float
) -> dict[str, int | None]:
    names = list(names)
    deadline = time.monotonic() + timeout_s
    while True:
        counts = partition_counts(client, names, timeout_s, with_leaders=True)
        missing = sorted(name for name, count in counts.items() if count is None)
        if not missing and _leaders_serve(client, counts, timeout_s):
            return counts
        if time.monotonic() > deadline:
            raise BrokerUnavailableError(f"topics {missing or names} not ready after {timeout_s} s")
        time.sleep(0.05)


def _leaders_serve(client: AdminClient, counts: dict[str, int | None], timeout_s: float) -> bool:
    """True when every partition's leader answers ListOffsets: the metadata can name a
    leader a moment before that broker has taken the partition over."""
    request = {
        TopicPartition(name, p): OffsetSpec.latest()  # type: ignore[no-untyped-call]
        for name, count in counts.items()
        for p in range(count or 0)
    }
    if not request:
        return True
    for future in client.list_offsets(request, request_timeout=timeout_s).values():
        try:
            future.result(timeout=timeout_s + 5)
        except KafkaException as exc:
            if exc.args[0].code() not in _NOT_YET:
                raise kafka_error("reading offsets", exc) from exc
            return False
    return True


async def ensure_topics(settings: KafkaSettings, timeout_s: float = TIMEOUT_S) -> list[str]:
    """Async :func:`create_topics`, for workers and the gateway at start."""
    return await asyncio.to_thread(create_topics, settings, timeout_s)


def partition_counts(
    client: AdminClient, names: Iterable[str], timeout_s: float, *, with_leaders: bool = False
) -> dict[str, int | None]:
    """Partition count per topic; None for a topic that does not exist (``with_leaders``:
    or that has a partition without a leader yet)."""
    names = list(names)
    if not names:
        return {}
    futures = client.describe_topics(TopicCollection(names), request_timeout=timeout_s)
    counts: dict[str, int | None] = {}
    for name, future in futures.items():
        try:
            partitions = future.result(timeout=timeout_s + 5).partitions
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise kafka_error(f"describing {name}", exc) from exc
            counts[name] = None
            continue
        leaderless = with_leaders and any(p.leader is None for p in partitions)
        counts[name] = None if leaderless else len(partitions)
    return counts


def _configs(
    client: AdminClient, names: Iterable[str], timeout_s: float
) -> dict[str, dict[str, str]]:
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
    if not resources:
        return {}
    futures = client.describe_configs(resources, request_timeout=timeout_s)
    out: dict[str, dict[str, str]] = {}
    for resource, future in futures.items():
        try:
            entries: dict[str, ConfigEntry] = future.result(timeout=timeout_s + 5)
        except KafkaException as exc:
            raise kafka_error(f"reading the configuration of {resource.name}", exc) from exc
        out[resource.name] = {key: str(entry.value) for key, entry in entries.items()}
    return out


def _reconcile(
    client: AdminClient,
    specs: dict[str, TopicSpec],
    counts: dict[str, int | None],
    timeout_s: float,
) -> None:
    for name, spec in specs.items():
        if counts.get(name) != spec.partitions:
            # Keys map to partitions by count: changing it silently would misroute streams.
            raise TopicConfigError(
                f"topic {name} has {counts[name]} partitions, the settings declare "
                f"{spec.partitions}: delete the topic or set the partition settings to match"
            )
    actual = _configs(client, specs, timeout_s)
    changes: list[ConfigResource] = []
    for name, spec in specs.items():
        differing = {k: v for k, v in spec.config.items() if actual.get(name, {}).get(k) != v}
        if differing:
            entries = [
                ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                for k, v in differing.items()
            ]
            changes.append(ConfigResource(ResourceType.TOPIC, name, incremental_configs=entries))
    if not changes:
        return
    futures = client.incremental_alter_configs(changes, request_timeout=timeout_s)
    for resource, future in futures.items():
        try:
            future.result(timeout=timeout_s + 5)
        except KafkaException as exc:
            raise kafka_error(f"configuring {resource.name}", exc) from exc


def describe_topics(settings: KafkaSettings, timeout_s: float = TIMEOUT_S) -> list[dict[str, Any]]:
    """What the broker holds for each declared topic, beside what is declared.

    Each item: name, exists, partitions, declared_partitions, config (the broker's values of the
    declared keys), declared_config, and matches (True when both agree).
    """
    specs = {spec.name(settings.topic_prefix): spec for spec in declared_topics(settings)}
    client = admin_client(settings)
    counts = partition_counts(client, specs, timeout_s)
    present = [name for name, count in counts.items() if count is not None]
    configs = _configs(client, present, timeout_s)
    out: list[dict[str, Any]] = []
    for name, spec in specs.items():
        config = {k: configs[name].get(k) for k in spec.config} if name in configs else {}
        out.append(
            {
                "name": name,
                "exists": counts[name] is not None,
                "partitions": counts[name],
                "declared_partitions": spec.partitions,
                "config": config,
                "declared_config": dict(spec.config),
                "matches": counts[name] == spec.partitions and config == spec.config,
            }
        )
    return out


def delete_topics(settings: KafkaSettings, timeout_s: float = TIMEOUT_S) -> list[str]:
    """Delete the declared topics of the settings' prefix; return the names deleted."""
    names = [spec.name(settings.topic_prefix) for spec in declared_topics(settings)]
    client = admin_client(settings)
    futures = client.delete_topics(names, request_timeout=timeout_s, operation_timeout=timeout_s)
    deleted: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s + 5)
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue
            raise kafka_error(f"deleting {name}", exc) from exc
        deleted.append(name)
    return sorted(deleted)
