"""A local 3-node cluster (its own ports and data dir; the shared broker is not touched): it
starts as one cluster, replicates topics 3 times, and keeps taking acks=all writes with a node
killed, and every node serves a topic a worker created the moment the creation returns."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import faust
import pytest
from aiokafka import AIOKafkaClient
from confluent_kafka import KafkaError, Message
from mode import Service

from pipeline.core.settings import REPO_ROOT, BrokerSettings, KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.admin import admin_client, create_topics, describe_topics
from pipeline.kafka.compat import topic_served_by_every_broker
from pipeline.kafka.connection import ConnectionConfig
from pipeline.ops import broker
from pipeline.ops.cli import main
from pipeline.ops.cluster import cluster_status
from pipeline.worker.transport import Transport
from tests.harness import free_port_block

pytestmark = pytest.mark.integration

# Three JVMs on two shared cores: C1 only and a small heap start ~2-3x faster.
CLUSTER_ENV = {
    "SUMSTREAM_BROKER_HEAP": "256m",
    "SUMSTREAM_BROKER_JVM_OPTS": "-XX:TieredStopAtLevel=1",
    # The jars cache is shared with the main broker: fetched once per checkout.
    "SUMSTREAM_JARS_DIR": str(REPO_ROOT / ".data" / "kafka" / "jars"),
}


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerSettings]:
    base = free_port_block(6)
    env = {
        **CLUSTER_ENV,
        "SUMSTREAM_DATA_DIR": str(tmp_path),
        "SUMSTREAM_BROKER_PORT": str(base),
        "SUMSTREAM_CONTROLLER_PORT": str(base + 1),
        "SUMSTREAM_BOOTSTRAP_SERVERS": f"127.0.0.1:{base}",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # for the CLI, which reads its settings itself
    settings = BrokerSettings(broker_nodes=3)
    try:
        yield settings
    finally:
        broker.stop(settings)  # never leave a broker behind, whatever failed


class _Owner(Service):
    """The service Faust's topic creation logs for."""


async def _topics_a_worker_creates_are_served_by_every_broker(bootstrap: str) -> list[str]:
    """Create topics the way a worker creates its changelogs; the ones some broker did not
    serve the moment creation returned."""
    app = faust.App("probe", broker=f"kafka://{bootstrap}")
    transport = Transport(app.conf.broker, app)
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    unserved: list[str] = []
    try:
        for i in range(5):
            topic = f"probe-changelog-{i}"
            await transport._create_topic(_Owner(), client, topic, 6, 3)
            if not await topic_served_by_every_broker(client, topic, 6):
                unserved.append(topic)
    finally:
        await client.close()
    return unserved


def test_three_nodes_serve_new_changelogs_from_each_node_replicate_and_take_acks_all_one_killed(
    cluster: BrokerSettings,
) -> None:
    assert main(["broker", "start", "--nodes", "3", "--timeout", "240"]) == 0
    status = cluster_status(cluster)
    assert [n.state for n in status.nodes] == ["running"] * 3
    assert status.controller in (1, 2, 3)
    assert status.under_replicated == []

    # Faust's own creation returns once the controller has the topic, before every broker
    # does (19 of 20 topics in a probe): a consumer asking such a broker leaves the changelog
    # out of its group's assignment for minutes. The worker's transport waits for every one.
    bootstrap = broker.local_bootstrap(cluster)
    assert asyncio.run(_topics_a_worker_creates_are_served_by_every_broker(bootstrap)) == []

    kafka = KafkaSettings(
        bootstrap_servers=broker.local_bootstrap(cluster),
        topic_prefix="probe.",
        replication_factor=3,
        min_insync_replicas=2,
    )
    create_topics(kafka)
    assert all(row["matches"] for row in describe_topics(kafka))
    topic = TopicNames.from_settings(kafka).requests
    metadata = admin_client(kafka).list_topics(topic, timeout=10).topics[topic]
    assert all(len(p.replicas) == 3 and len(p.isrs) == 3 for p in metadata.partitions.values())

    # Kill the node that leads partition 0: a write with acks=all still reaches 2 in-sync
    # replicas (min.insync.replicas) once leadership has moved.
    leader = metadata.partitions[0].leader
    assert broker.kill_node(cluster, leader)
    producer = ConnectionConfig.from_settings(kafka).confluent_producer(
        {"acks": "all", "enable.idempotence": True, "message.timeout.ms": 60_000}
    )
    outcomes: list[KafkaError | None] = []

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        outcomes.append(err)

    for i in range(20):
        producer.produce(topic, key=f"k{i}", value=b"v", partition=0, on_delivery=delivered)
    assert producer.flush(90) == 0
    assert outcomes == [None] * 20

    after = cluster_status(cluster)
    assert [n.state for n in after.nodes].count("stopped") == 1
    assert after.under_replicated, "the killed node's replicas are out of sync"
    assert all(leader not in p.isr for p in after.under_replicated)

    assert main(["broker", "stop"]) == 0  # the node count is remembered: all nodes stop
    assert not any(n.reachable or n.pid for n in cluster_status(cluster).nodes)
