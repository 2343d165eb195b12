"""Consumer lag per stage: records in a stage's input topic that its group has not committed.

The queue is the log, so its length is lag (docs/architecture.md, "Lag-driven admission"). The
gateway reads it every second for admission; `sumstream lag` (pipeline/ops/lag.py) shows it to
operators.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from pipeline.core.errors import TopicMissingError
from pipeline.core.settings import KafkaSettings, WorkerSettings
from pipeline.kafka.admin import LEADER_MOVING, admin_client, kafka_error, partition_counts
from pipeline.kafka.connection import ConnectionConfig

# stage -> the topic it consumes (short name, before the prefix).
STAGE_TOPICS: dict[str, str] = {
    "preprocess": "requests",
    "inference": "preprocessed",
    "postprocess": "tokens",
}
TIMEOUT_S = 5.0
# The group coordinator is moving or still loading its offsets (a broker that just started):
# the answer comes within moments, so ask again before calling the read failed.
COORDINATOR_MOVING = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
    }
)
COORDINATOR_ATTEMPTS = 20
# Answers that say the client's cached metadata is out of date (a broker restarted with new
# leader epochs): librdkafka's admin client does not always refresh it, so the caller rebuilds.
STALE_METADATA = frozenset(
    {
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.STALE_BROKER_EPOCH,
    }
)
COORDINATOR_RETRY_S = 0.1


@dataclass(frozen=True)
class PartitionLag:
    """One partition of a stage's input: its end offset, the group's commit, and the gap."""

    stage: str
    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group never committed here (it starts at the earliest)
    end: int
    lag: int


def metadata_is_stale(exc: BaseException) -> bool:
    """True when ``exc`` (or the Kafka error it was raised from) says the client's metadata is
    out of date: rebuilding the client clears it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KafkaException) and seen.args:
            err = seen.args[0]
            if isinstance(err, KafkaError) and err.code() in STALE_METADATA:
                return True
        seen = seen.__cause__
    return False


def default_groups(app_id: str | None = None) -> dict[str, str]:
    """Every stage in one consumer group: the Faust app id (all stages run in one app)."""
    group = app_id if app_id is not None else WorkerSettings().app_id
    return {stage: group for stage in STAGE_TOPICS}


class LagReader:
    """Reads lag with one long-lived AdminClient: about four broker round trips per read.

    :meth:`rebuild` replaces the clients, for a caller whose reads keep failing.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        groups_by_stage: Mapping[str, str] | None = None,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        groups = dict(groups_by_stage) if groups_by_stage is not None else default_groups()
        unknown = set(groups) - set(STAGE_TOPICS)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; known: {sorted(STAGE_TOPICS)}")
        self.groups = groups
        self.topics = {stage: settings.topic_prefix + STAGE_TOPICS[stage] for stage in groups}
        self.timeout_s = timeout_s
        self._settings = settings
        self._client: AdminClient = admin_client(settings)
        self._connection = ConnectionConfig.from_settings(settings)
        self._readers: dict[str, Consumer] = {}

    def read(self) -> dict[str, int]:
        """Total lag per stage."""
        totals = dict.fromkeys(self.groups, 0)
        for part in self.read_partitions():
            totals[part.stage] += part.lag
        return totals

    async def read_async(self) -> dict[str, int]:
        """:meth:`read` in a thread, for the event loop."""
        return await asyncio.to_thread(self.read)

    def read_partitions(self) -> list[PartitionLag]:
        """Lag of every partition of every stage's input topic."""
        counts = partition_counts(self._client, set(self.topics.values()), self.timeout_s)
        missing = sorted(t for t, n in counts.items() if n is None)
        if missing:
            raise TopicMissingError(
                f"topics {missing} do not exist (run `sumstream topics create`)"
            )
        tps = {
            stage: [TopicPartition(topic, p) for p in range(counts[topic] or 0)]
            for stage, topic in self.topics.items()
        }
        committed = self._committed(tps)
        every = {(tp.topic, tp.partition) for parts in tps.values() for tp in parts}
        ends = self._offsets(every, OffsetSpec.latest())  # type: ignore[no-untyped-call]
        never = {(t, p) for (_g, t, p), offset in committed.items() if offset is None}
        starts = self._offsets(never, OffsetSpec.earliest())  # type: ignore[no-untyped-call]
        out: list[PartitionLag] = []
        for stage, parts in tps.items():
            group = self.groups[stage]
            for tp in parts:
                key = (tp.topic, tp.partition)
                done = committed.get((group, *key))
                end = ends[key]
                # Never committed: a Faust group starts at the earliest retained record.
                base = done if done is not None else starts.get(key, 0)
                out.append(
                    PartitionLag(
                        stage, group, tp.topic, tp.partition, done, end, max(0, end - base)
                    )
                )
        return out

    def _committed(
        self, tps: Mapping[str, list[TopicPartition]]
    ) -> dict[tuple[str, str, int], int | None]:
        by_group: dict[str, list[TopicPartition]] = {}
        for stage, parts in tps.items():
            by_group.setdefault(self.groups[stage], []).extend(parts)
        out: dict[tuple[str, str, int], int | None] = {}
        for group, parts in by_group.items():
            try:
                result = committed_offsets(self._group_reader(group), parts, self.timeout_s)
            except KafkaException as exc:
                raise kafka_error(f"reading offsets of group {group}", exc) from exc
            for tp in result:
                offset = tp.offset if tp.error is None and tp.offset >= 0 else None
                out[(group, tp.topic, tp.partition)] = offset
        return out

    def _group_reader(self, group: str) -> Consumer:
        # AdminClient.list_consumer_group_offsets crashes librdkafka 2.16 (NULL dereference
        # in rd_kafka_cgrp_op) when the coordinator answers NOT_COORDINATOR, e.g. while a
        # group forms; a consumer's committed() takes another code path. It never subscribes,
        # so it never joins the group it reads.
        reader = self._readers.get(group)
        if reader is None:
            reader = self._connection.confluent_consumer(
                {"group.id": group, "enable.auto.commit": False}
            )
            self._readers[group] = reader
        return reader

    def close(self) -> None:
        """Close the per-group offset readers."""
        readers, self._readers = self._readers, {}
        for reader in readers.values():
            reader.close()

    def rebuild(self) -> None:
        """Close the clients and make new ones, with metadata fetched afresh."""
        self.close()
        # An AdminClient has no close: librdkafka frees the old one once it is unreferenced.
        self._client = admin_client(self._settings)

    def _offsets(self, keys: set[tuple[str, int]], spec: OffsetSpec) -> dict[tuple[str, int], int]:
        if not keys:
            return {}
        out: dict[tuple[str, int], int] = {}
        for attempt in range(3):
            request = {TopicPartition(t, p): spec for t, p in keys if (t, p) not in out}
            futures = self._client.list_offsets(request, request_timeout=self.timeout_s)
            for tp, future in futures.items():
                try:
                    out[(tp.topic, tp.partition)] = future.result(self.timeout_s + 1).offset
                except KafkaException as exc:
                    # Leadership moving (new topic, broker restart) settles within moments.
                    if attempt == 2 or exc.args[0].code() not in LEADER_MOVING:
                        what = f"reading offsets of {tp.topic}[{tp.partition}]"
                        raise kafka_error(what, exc) from exc
            if len(out) == len(keys):
                break
            time.sleep(0.1)
        return out


def committed_offsets(
    reader: Consumer,
    parts: list[TopicPartition],
    timeout_s: float,
    *,
    attempts: int = COORDINATOR_ATTEMPTS,
    retry_s: float = COORDINATOR_RETRY_S,
) -> list[TopicPartition]:
    """``reader.committed(parts)``, asked again while the coordinator moves or loads."""
    for attempt in range(attempts):
        try:
            result: list[TopicPartition] = reader.committed(parts, timeout=timeout_s)
            return result
        except KafkaException as exc:
            if attempt == attempts - 1 or exc.args[0].code() not in COORDINATOR_MOVING:
                raise
        time.sleep(retry_s)
    raise AssertionError("unreachable")  # the loop returns or raises


def read_lag(
    settings: KafkaSettings,
    groups_by_stage: Mapping[str, str] | None = None,
    timeout_s: float = TIMEOUT_S,
) -> dict[str, int]:
    """Lag per stage (stage -> consumer group; default: every stage in the Faust app's group).

    Keep a :class:`LagReader` instead when reading repeatedly: it reuses its connection.
    """
    reader = LagReader(settings, groups_by_stage, timeout_s)
    try:
        return reader.read()
    finally:
        reader.close()
