"""The chaos run's Kafka side: the 3-node cluster's settings, the leader to kill, records
produced straight onto `requests` (valid ones and poison), and whole topics read back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message, TopicPartition

from pipeline.core.codec import codec
from pipeline.core.producers import ProducerTable
from pipeline.core.settings import REPO_ROOT, BrokerSettings, KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.admin import admin_client
from pipeline.kafka.connection import ConnectionConfig
from pipeline.ops.broker import local_bootstrap
from pipeline.ops.submit import (
    SUBMIT_PRODUCER,
    build_request,
    produce_request,
    request_producer,
)


def cluster_settings(data_dir: Path, base_port: int) -> BrokerSettings:
    """Three nodes on ``base_port``.. (6 ports), C1 JIT and small heaps: 3 JVMs share 2 cores."""
    return BrokerSettings(
        data_dir=data_dir,
        broker_nodes=3,
        broker_port=base_port,
        controller_port=base_port + 1,
        jars_dir=REPO_ROOT / ".data" / "kafka" / "jars",
        broker_heap="256m",
        broker_jvm_opts="-XX:TieredStopAtLevel=1",
        bootstrap_servers=f"127.0.0.1:{base_port}",
    )


def run_settings(cluster: BrokerSettings, prefix: str) -> KafkaSettings:
    """The pipeline's settings on the cluster: every topic replicated 3 times, 2 in sync."""
    return KafkaSettings(
        bootstrap_servers=local_bootstrap(cluster),
        topic_prefix=prefix,
        replication_factor=3,
        min_insync_replicas=2,
    )


def leader_of(settings: KafkaSettings, topic: str, partition: int) -> int:
    """The node that leads ``topic``'s ``partition`` now."""
    metadata = admin_client(settings).list_topics(topic, timeout=10).topics[topic]
    return int(metadata.partitions[partition].leader)


class InDoubt(RuntimeError):
    """A record whose write was not acknowledged: it may or may not be in the topic."""

    def __init__(self, request_id: str, cause: Exception) -> None:
        super().__init__(f"{request_id}: {cause}")
        self.request_id = request_id


def produce_straight(settings: KafkaSettings, user: str, tier: str, document: str) -> str:
    """A signed request written onto `requests` by "another system"; its id."""
    request = build_request(document, user=user, tier=tier, max_output_tokens=40)
    try:
        produce_request(settings, request, producer_name=SUBMIT_PRODUCER)
    except RuntimeError as exc:
        raise InDoubt(str(request["request_id"]), exc) from exc
    return str(request["request_id"])


def produce_poison(settings: KafkaSettings) -> tuple[int, int]:
    """A correctly signed record that is not Avro: preprocess must dead-letter exactly it."""
    identity = ProducerTable.load(settings.producers_file).get(SUBMIT_PRODUCER)
    value = b"\x00poison " + os.urandom(8)
    producer = request_producer(settings)
    where: list[tuple[int, int]] = []
    errors: list[KafkaError] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
        else:
            where.append((int(msg.partition() or 0), int(msg.offset() or 0)))

    producer.produce(
        TopicNames.from_settings(settings).requests,
        key=b"poison",
        value=value,
        headers=identity.headers(value),
        on_delivery=delivered,
    )
    producer.flush(60)
    if not where:
        raise RuntimeError(f"poison not delivered: {errors}")
    return where[0]


def read_all(settings: KafkaSettings, topic: str, schema: str) -> list[dict[str, Any]]:
    """Every record of ``topic`` up to its end now, decoded as ``schema``."""
    consumer = ConnectionConfig.from_settings(settings).confluent_consumer(
        {"group.id": "chaos-reader", "enable.auto.commit": False}
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends: dict[int, int] = {}
        assignment = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, low))
        consumer.assign(assignment)
        out: list[dict[str, Any]] = []
        positions = {tp.partition: tp.offset for tp in assignment}
        idle = 0
        # A compacted or deleted tail leaves the high watermark above the last record.
        while any(positions[p] < ends[p] for p in ends) and idle < 3:
            msg = consumer.poll(2.0)
            if msg is None or msg.error() is not None:
                idle += 1
                continue
            idle = 0
            positions[int(msg.partition() or 0)] = int(msg.offset() or 0) + 1
            if msg.value() is not None:
                out.append(codec().decode_as(msg.value(), schema))
        return out
    finally:
        consumer.close()
