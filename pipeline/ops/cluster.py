"""What `sumstream broker status` reports about the local cluster: each node, the active
controller, and the partitions whose replicas are not all in sync."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from confluent_kafka import KafkaException

from pipeline.core.settings import BrokerSettings
from pipeline.kafka.connection import ConnectionConfig
from pipeline.ops import broker
from pipeline.ops.broker_install import cluster_nodes

NODES_FILE = "nodes"


@dataclass(frozen=True)
class ReplicaState:
    """One partition whose in-sync replicas are fewer than its replicas (or that has no leader)."""

    topic: str
    partition: int
    leader: int | None
    replicas: tuple[int, ...]
    isr: tuple[int, ...]

    def describe(self) -> str:
        leader = "none" if self.leader is None else str(self.leader)
        return (
            f"{self.topic}[{self.partition}] leader {leader} "
            f"isr {list(self.isr)} of replicas {list(self.replicas)}"
        )


@dataclass(frozen=True)
class ClusterStatus:
    """Every node's state, the controller, and the under-replicated partitions."""

    nodes: list[broker.BrokerStatus]
    controller: int | None
    under_replicated: list[ReplicaState]

    @property
    def reachable(self) -> bool:
        return any(node.reachable for node in self.nodes)

    def describe(self) -> str:
        lines = [f"node {i}: {node.describe()}" for i, node in enumerate(self.nodes, start=1)]
        if not self.reachable:
            return "\n".join(lines)
        lines.append(f"controller: node {self.controller}")
        lines.append(f"under-replicated partitions: {len(self.under_replicated)}")
        lines += [f"  {state.describe()}" for state in self.under_replicated]
        return "\n".join(lines)


def cluster_status(settings: BrokerSettings, timeout_s: float = 5.0) -> ClusterStatus:
    """Ask every node and, through the ones that answer, the cluster's metadata."""
    nodes = [broker.status(settings, node.node_id) for node in cluster_nodes(settings)]
    answering = [node.bootstrap for node in nodes if node.reachable]
    if not answering:
        return ClusterStatus(nodes, None, [])
    connection = dataclasses.replace(
        ConnectionConfig.from_settings(settings), bootstrap_servers=",".join(answering)
    )
    client = connection.admin_client({"log_level": 0})
    try:
        metadata = client.list_topics(timeout=timeout_s)
    except KafkaException:
        return ClusterStatus(nodes, None, [])
    controller = active_controller(nodes)
    lagging = [
        ReplicaState(
            topic=name,
            partition=p.id,
            leader=p.leader if p.leader >= 0 else None,
            replicas=tuple(p.replicas),
            isr=tuple(p.isrs),
        )
        for name, topic in sorted(metadata.topics.items())
        for p in sorted(topic.partitions.values(), key=lambda p: p.id)
        if len(p.isrs) < len(p.replicas) or p.leader < 0
    ]
    return ClusterStatus(nodes, controller, lagging)


def active_controller(nodes: list[broker.BrokerStatus]) -> int | None:
    """The quorum leader, from the running nodes' own quorum state files (the newest epoch).

    Not DescribeCluster: under KRaft a broker answers it with a random live broker's id.
    """
    best: tuple[int, int] | None = None
    for node in nodes:
        if node.pid is None:
            continue
        state_file = node.data_dir / "data" / "__cluster_metadata-0" / "quorum-state"
        try:
            state = json.loads(state_file.read_text())
        except (FileNotFoundError, ValueError):
            continue
        leader, epoch = int(state.get("leaderId", -1)), int(state.get("leaderEpoch", -1))
        if leader >= 0 and (best is None or epoch > best[1]):
            best = (leader, epoch)
    return best[0] if best is not None else None


def recorded_nodes(settings: BrokerSettings) -> int:
    """The node count the last `broker start` used in this data dir (1 when none did)."""
    try:
        return int((settings.data_dir / "kafka" / NODES_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return 1


def record_nodes(settings: BrokerSettings) -> None:
    path = settings.data_dir / "kafka" / NODES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{settings.broker_nodes}\n")


def chosen_settings(nodes: int | None) -> BrokerSettings:
    """The settings of a `broker` command: ``--nodes``, else SUMSTREAM_BROKER_NODES, else the
    count the cluster in the data dir was started with."""
    settings = BrokerSettings()
    if nodes is None and "broker_nodes" not in settings.model_fields_set:
        nodes = recorded_nodes(settings)
    if nodes is None:
        return settings
    return settings.model_copy(update={"broker_nodes": nodes})
