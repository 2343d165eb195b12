"""The gateway's composition root: builds every part of the process, starts and stops them.

``Gateway`` owns every Kafka client and background task of the process (producer, stream
hub, request index, quota ledger, result settler, lag monitor) and closes them in ``stop()``.
Routes reach the parts through it: ``intake`` (submit, cancel), ``lookup`` (owner, result)
and ``streams`` (SSE clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Coroutine, Mapping
from typing import Any, NotRequired, TypedDict

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from gateway.admission.backpressure import LagMonitor, QueueWaitEstimator
from gateway.admission.controller import Admission, Degradation
from gateway.admission.idempotency import RequestIndex
from gateway.admission.intake import Intake
from gateway.admission.quota import QuotaLedger
from gateway.admission.settle import ResultSettler
from gateway.http.auth import KeyStore, Principal
from gateway.http.errors import NotReady
from gateway.settings import GatewaySettings
from gateway.streams.clients import ClientStreams
from gateway.streams.hub import StreamHub
from gateway.streams.ids import owned_partitions
from gateway.streams.lookup import RequestLookup
from pipeline.core.codec import codec
from pipeline.core.errors import TopicMissingError
from pipeline.core.tiers import Tier
from pipeline.core.topics import TopicNames, declared_topics
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.lag import STAGE_TOPICS
from pipeline.memory.keystore import DataKeyTable
from pipeline.memory.store import PreferencesTable
from pipeline.quota.state import UsageSummary

log = logging.getLogger("sumstream.gateway")


class Readiness(TypedDict):
    """``/readyz``'s checks: ``ready`` is the verdict, the rest say why."""

    ready: bool
    started: bool
    index_ready: bool
    quota_ready: bool
    lag_sampled: bool
    lag_sample_age_s: float | None
    broker: bool
    error: NotRequired[str]
    missing_topics: NotRequired[list[str]]


class Gateway:
    """One gateway instance: instance ``settings.instance_index`` of ``instance_count``."""

    def __init__(
        self, settings: GatewaySettings, keys: KeyStore, tiers: Mapping[str, Tier]
    ) -> None:
        # Wiring only, one constructor call per part; longer than ~60 lines for that reason.
        self.settings = settings
        self.keys = keys
        self.tiers = tiers
        self.topics = TopicNames.from_settings(settings)
        degradation = Degradation(settings.degrade_model, settings.degrade_output_ratio)
        self.estimator = QueueWaitEstimator(
            min_rate_per_s=settings.min_throughput_per_s,
            stale_after_s=settings.lag_stale_after_s,
            fail_closed_after_s=settings.lag_fail_closed_after_s or None,
            degrade_policy="degrade" if degradation.enabled else None,
            degrade_ratio=settings.degrade_at,
        )
        self.ledger = QuotaLedger(
            settings,
            tiers,
            gateway_id=f"{socket.gethostname()}/{settings.instance_index}/{os.getpid()}",
            timeout_s=settings.quota_timeout_s,
            start_timeout_s=settings.quota_start_timeout_s,
        )
        self.admission = Admission(
            tiers,
            self.estimator,
            self.ledger,
            max_inflight=settings.max_inflight,
            user_inflight_share=settings.user_inflight_share,
            degradation=degradation,
        )
        self.connection = ConnectionConfig.from_settings(settings)
        self.settler = ResultSettler(
            self.connection,
            self.topics.results,
            settings.settle_group,
            self.ledger,
            backfill_s=settings.settle_backfill_s,
            on_settled=self.admission.finished,
        )
        self.monitor: LagMonitor | None = None
        self.hub = StreamHub(
            buffer_events=settings.stream_buffer_events,
            client_queue_events=settings.client_queue_events,
            max_streams=settings.max_tracked_streams,
            finished_retention_s=settings.finished_retention_s,
            on_result=self._on_result,
        )
        self.index = RequestIndex(
            window_s=settings.idempotency_window_s, max_entries=settings.max_index_entries
        )
        # The caller's memory (docs/architecture.md, "Context and memory").
        self.preferences = PreferencesTable(settings, writer=True)
        # Users' data keys: text on the immutable topics is sealed with them ("Forgetting").
        self.data_keys = DataKeyTable(settings, writer=True)
        self.producer: AIOKafkaProducer | None = None
        self.partitions = 0
        self.owned: frozenset[int] = frozenset()
        self.started = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.intake = Intake(
            settings,
            tiers,
            self.topics,
            index=self.index,
            admission=self.admission,
            estimator=self.estimator,
            hub=self.hub,
            spawn=self.spawn,
            running=self._running,
            budget_left=self._budget_left,
            preferences=self.preferences,
            keys=self.data_keys,
        )
        self.lookup = RequestLookup(settings, self.connection, self.topics, self.index, self.hub)
        self.streams = ClientStreams(
            settings,
            self.connection,
            self.topics,
            self.hub,
            self.lookup,
            spawn=self.spawn,
            cancel=self.intake.cancel,
            running=self._running,
            gateway_id=self.ledger.gateway_id,
            announce=self.ledger.attach,
        )
        self.ledger.on_attached = self.streams.attached

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, read the stream partition count, and start the hub and the index."""
        s = self.settings
        producer = self.connection.producer(
            acks="all", enable_idempotence=True, linger_ms=s.producer_linger_ms
        )
        await producer.start()
        self.producer = producer
        try:
            self.partitions, requests_partitions = await self._check_topics(producer)
            self.owned = owned_partitions(s.instance_index, s.instance_count, self.partitions)
            self.intake.open(
                producer, self.owned, self.partitions, requests_partitions=requests_partitions
            )
            # Keys first: every record the hub and the readers decode may be sealed.
            await self.data_keys.start()
            await self.hub.start(
                self.connection, self.topics.tokens, self.topics.results, self.owned
            )
            await self.index.start(self.connection, self.topics.requests, requests_partitions)
            # The month so far is replayed from `quota` before the first admission.
            await self.ledger.start()
            await self.preferences.start()
            await self.settler.start()
            groups = dict.fromkeys(STAGE_TOPICS, s.app_id)
            self.monitor = LagMonitor.from_settings(
                s,
                self.estimator,
                groups,
                interval_s=s.lag_interval_s,
                rebuild_after=s.lag_rebuild_after,
            )
            await self.monitor.start()
        except BaseException:
            await self.stop()
            raise
        self.started = True
        log.info(
            "gateway started",
            extra={
                "instance": s.instance_index,
                "instances": s.instance_count,
                "owned_partitions": sorted(self.owned),
            },
        )

    async def _check_topics(self, producer: AIOKafkaProducer) -> tuple[int, int]:
        """The partition counts of the stream topics (tokens, results) and of ``requests``."""
        counts = await self._partition_counts(producer)
        if not all(counts.values()):
            missing = [t for t, n in counts.items() if not n]
            raise TopicMissingError(f"missing topics {missing}: run `sumstream topics create`")
        requests_partitions = counts.pop(self.topics.requests)
        if len(set(counts.values())) != 1:
            raise TopicMissingError(f"tokens and results must share a partition count: {counts}")
        # Metadata for the topics it writes, and the schemas, now: not on the first POST.
        for topic in (self.topics.requests, self.topics.control):
            await producer.partitions_for(topic)
        codec()
        return counts[self.topics.tokens], requests_partitions

    async def _partition_counts(self, producer: AIOKafkaProducer) -> dict[str, int]:
        # Topics created a moment ago (by `sumstream up` or a test) take a little while to
        # show up in metadata with leaders; wait for them rather than fail at once.
        deadline = time.monotonic() + self.settings.startup_wait_s
        while True:
            cluster = await producer.client.fetch_all_metadata()
            counts: dict[str, int] = {}
            for topic in (self.topics.tokens, self.topics.results, self.topics.requests):
                partitions = cluster.partitions_for_topic(topic) or set()
                led = [
                    p
                    for p in partitions
                    if cluster.leader_for_partition(TopicPartition(topic, p)) not in (None, -1)
                ]
                counts[topic] = len(partitions) if len(led) == len(partitions) else 0
            if all(counts.values()) or time.monotonic() > deadline:
                return counts
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """Cancel the background tasks, then stop every client (safe after a failed start)."""
        self.started = False
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.monitor is not None:
            await self.monitor.stop()
            self.monitor = None
        await self.settler.stop()
        await self.ledger.stop()
        await self.preferences.stop()
        await self.hub.stop()
        await self.data_keys.stop()
        await self.index.stop()
        self.intake.close()
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    def _running(self) -> bool:
        return self.started

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background task the gateway cancels and awaits on stop."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def readiness(self) -> Readiness:
        """Broker reachable, every declared topic present, request index and ledger rebuilt."""
        checks: Readiness = {
            "ready": False,
            "started": self.started,
            "index_ready": self.index.ready.is_set(),
            "quota_ready": self.ledger.ready,
            # Informational: without lag figures admission fails open for a while, then sheds
            # (docs/architecture.md, "Lag-driven admission"); the process itself is fine.
            "lag_sampled": self.monitor is not None and self.monitor.last_error is None,
            "lag_sample_age_s": (
                round(self.monitor.sample_age_s(), 1) if self.monitor is not None else None
            ),
            "broker": False,
        }
        if self.producer is None:
            return checks
        try:
            cluster = await asyncio.wait_for(self.producer.client.fetch_all_metadata(), 2.0)
        except (KafkaError, TimeoutError) as exc:
            return {**checks, "error": type(exc).__name__}
        present = cluster.topics()
        missing = [
            spec.name(self.settings.topic_prefix)
            for spec in declared_topics(self.settings)
            if spec.name(self.settings.topic_prefix) not in present
        ]
        ready = self.started and checks["index_ready"] and checks["quota_ready"] and not missing
        return {**checks, "ready": ready, "broker": True, "missing_topics": missing}

    # -- what routes ask of the process as a whole --------------------------------------------

    def usage(self, principal: Principal) -> UsageSummary:
        """The caller's tokens, cost and limits for this month, from the quota ledger."""
        if not self.ledger.ready:
            raise NotReady("the quota ledger is not ready")
        return self.ledger.usage(principal.user_id, principal.tier)

    def _budget_left(self, user_id: str, tier: str) -> int | None:
        """Micro-USD left of the user's monthly budget, None before the ledger is read."""
        if not self.ledger.ready:
            return None
        return self.ledger.usage(user_id, tier).remaining_micro_usd

    def _on_result(self, result: Mapping[str, Any]) -> None:
        self.admission.finished(result["request_id"])
