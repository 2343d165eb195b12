"""The Faust app: an agent for each of any subset of the three stages (the `sumstream worker`
command that runs it is pipeline/worker/command.py).

Each stage is one agent on one topic (docs/architecture.md, "The stages"). Records are read and
written as raw bytes and decoded by pipeline/core/codec.py inside the agents
(pipeline/worker/agents.py), so an undecodable record becomes a dead letter instead of crashing
Faust. The inference stage keeps its in-flight work durable in a changelog-backed table
(pipeline/worker/inflight/).
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import uuid
from collections.abc import Iterable
from typing import Any

import faust
from faust.types import TP, EventT, StreamT, TopicT
from mode.utils.objects import cached_property
from prometheus_client import start_http_server

from pipeline.core.clock import now_ms
from pipeline.core.keys import load_keys, user_tiers
from pipeline.core.metrics import LagSampler
from pipeline.core.pricing import PriceTable
from pipeline.core.producers import ProducerTable
from pipeline.core.settings import WorkerSettings
from pipeline.core.tiers import load_tiers
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.lag import LagReader, metadata_is_stale
from pipeline.llm.client import UpstreamClient
from pipeline.memory.history import HistoryTable
from pipeline.memory.keystore import DataKeyTable
from pipeline.memory.store import PreferencesTable
from pipeline.quota.ledger import QuotaLedger
from pipeline.worker.admission import TopicAdmission
from pipeline.worker.agents import (
    events,
    on_record,
    origin,
    process,
    raw_topic,
    sender,
    timestamp_ms,
)
from pipeline.worker.dlq import DeadLetterQueue
from pipeline.worker.identity import RequestIdentity
from pipeline.worker.inference.upstream import Upstream
from pipeline.worker.inflight import InflightWork
from pipeline.worker.longdoc.agent import add_reduce, reuse_reader
from pipeline.worker.longdoc.count import upstream_count
from pipeline.worker.memory.sessions import Sessions
from pipeline.worker.postprocess import PostprocessStage, tail_reread
from pipeline.worker.preprocess import PreprocessStage
from pipeline.worker.request_ids import RequestIds
from pipeline.worker.transport import FlowControl, Transport

log = logging.getLogger("sumstream.worker")
# Requests preprocess handles at once (the preprocess agent's actors).
PREPROCESS_CONCURRENCY = 4

STAGES = ("preprocess", "inference", "postprocess")


class StageApp(faust.App):
    """faust.App with sumstream's transport and a lifecycle hook for the stages."""

    runtime: StageRuntime | None = None
    fetch_max_wait_ms: int = 1500

    def _new_transport(self) -> Any:
        return Transport(self.conf.broker_consumer, self)

    @cached_property
    def flow_control(self) -> FlowControl:
        return FlowControl(loop=self.loop)

    async def on_start(self) -> None:
        await super().on_start()
        if self.runtime is not None:
            await self.runtime.start()

    async def on_stop(self) -> None:
        # Stop the engine first: nothing may be emitted after the producer's last flush.
        if self.runtime is not None:
            await self.runtime.stop()
        await super().on_stop()


class StageRuntime:
    """Everything a worker runs besides Faust itself: stages, engine, metrics server."""

    def __init__(self, app: StageApp, settings: WorkerSettings, stages: set[str]) -> None:
        self.app = app
        self.settings = settings
        self.stages = stages
        self.topics = TopicNames.from_settings(settings)
        self.inflight: InflightWork | None = None
        self._metrics_server: Any = None
        self.metrics_port: int | None = None
        self._lag: LagSampler | None = None
        self.quota: QuotaLedger | None = None
        self.preferences: PreferencesTable | None = None
        self.history: HistoryTable | None = None
        # Users' data keys; preprocess creates one for a plain request ("Forgetting").
        self.keys = DataKeyTable(settings, writer="preprocess" in stages)

    async def start(self) -> None:
        self._start_metrics()
        # First: every record a stage or table reads may be sealed.
        await self.keys.start()
        if self.quota is not None:
            # Before any request is reserved: start-up replays the month's ledger.
            await self.quota.start()
        if self.preferences is not None:
            await self.preferences.start()
        if self.history is not None:
            await self.history.start()
        if self._metrics_server is not None:
            # Lag of this worker's stages, whole group: a worker fed by other systems (no
            # gateway running) still shows its queue.
            groups = {stage: self.settings.app_id for stage in sorted(self.stages)}
            reader = LagReader(self.settings, groups)
            self._lag = LagSampler(reader.read, rebuild=reader.rebuild, is_stale=metadata_is_stale)
            await self._lag.start()
        if self.inflight is not None:
            await self.inflight.start()

    async def stop(self) -> None:
        if self.inflight is not None:
            await self.inflight.stop()
        if self.quota is not None:
            await self.quota.stop()
        if self.preferences is not None:
            await self.preferences.stop()
        if self.history is not None:
            await self.history.stop()
        await self.keys.stop()
        if self._lag is not None:
            lag, self._lag = self._lag, None
            await lag.stop()
        if self._metrics_server is not None:
            server, self._metrics_server = self._metrics_server, None
            await asyncio.to_thread(server.shutdown)
            server.server_close()

    def _start_metrics(self) -> None:
        if self.settings.metrics_port < 0 or self._metrics_server is not None:
            return
        addr = self.settings.metrics_host
        try:
            server, _thread = start_http_server(self.settings.metrics_port, addr=addr)
        except OSError as exc:
            # Several workers on one host: the second takes any free port instead of failing.
            log.warning(
                "metrics port busy, using a free one",
                extra={"port": self.settings.metrics_port, "error": str(exc)},
            )
            server, _thread = start_http_server(0, addr=addr)
        self._metrics_server = server
        self.metrics_port = int(server.server_port)
        log.info("metrics", extra={"host": addr, "port": self.metrics_port, "path": "/metrics"})


def create_app(settings: WorkerSettings, stages: Iterable[str] = STAGES) -> StageApp:
    """The Faust app with an agent for each of ``stages`` (docs/architecture.md, "The stages")."""
    wanted = set(stages)
    unknown = wanted - set(STAGES)
    if unknown or not wanted:
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {sorted(wanted)}")
    # Faust creates only the last level of its data directory.
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    connection = ConnectionConfig.from_settings(settings)
    app = StageApp(
        settings.app_id,
        broker=connection.faust_broker(),
        broker_credentials=connection.faust_credentials(),
        # Every record a stage may produce, and a fetch that holds at least one of them.
        producer_max_request_size=connection.sizes.producer_request_bytes,
        consumer_max_fetch_size=connection.sizes.fetch_bytes,
        key_serializer="raw",
        value_serializer="raw",
        autodiscover=False,
        store="memory://",
        datadir=str(settings.data_dir / "faust" / settings.app_id),
        web_enabled=False,
        producer_acks=-1,
        producer_linger=settings.producer_linger_ms / 1000.0,
        # Do not wait for agents to drain on a rebalance: the inference agent may be blocked
        # on a full scheduler, and its work is in the in-flight table anyway.
        stream_wait_empty=False,
        stream_buffer_maxsize=1024,
        broker_commit_every=1000,
        broker_commit_interval=settings.commit_interval_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        # Standby replicas keep Faust's own assignor in every worker (even one without
        # tables), so workers running different stages can share the consumer group.
        table_standby_replicas=1,
        topic_partitions=settings.work_partitions,
        # Faust's own topics (in-flight changelog, assignor) are replicated like ours.
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        worker_redirect_stdouts=False,
    )
    app.fetch_max_wait_ms = settings.fetch_max_wait_ms
    runtime = StageRuntime(app, settings, wanted)
    app.runtime = runtime
    topics = runtime.topics
    tokens = raw_topic(app, topics.tokens)
    dlq = DeadLetterQueue(
        sender(raw_topic(app, topics.dlq)), max_record_bytes=settings.max_record_bytes
    )

    if "preprocess" in wanted:
        runtime.preferences = PreferencesTable(settings)
        runtime.history = HistoryTable(settings)
        runtime.quota = _add_preprocess(
            app, settings, topics, tokens, dlq, runtime.preferences, runtime.history, runtime.keys
        )
    if "inference" in wanted:
        runtime.inflight = _add_inference(app, settings, topics, tokens, dlq, runtime.keys)
        add_reduce(app, settings, topics, tokens, dlq, load_tiers(settings.tiers_file))
    if "postprocess" in wanted:
        _add_postprocess(app, settings, connection, topics, tokens, dlq, runtime.keys)
    return app


def _add_preprocess(
    app: StageApp,
    settings: WorkerSettings,
    topics: TopicNames,
    tokens: TopicT,
    dlq: DeadLetterQueue,
    preferences: PreferencesTable,
    history: HistoryTable,
    keys: DataKeyTable,
) -> QuotaLedger:
    """The preprocess agent: `requests` -> `preprocessed`, or a rejection on `tokens`; returns
    the quota ledger it reserves other systems' requests in (the runtime starts it).

    Its `request-ids` table has as many partitions as `requests` and the same key, so Faust's
    assignor hands partition p of both to one worker (see the `control` agent below).
    """
    ids = RequestIds(app, settings.work_partitions)
    # Co-partitioned with `requests` like `request-ids` (pipeline/worker/memory/sessions.py).
    sessions = Sessions(
        app,
        settings.work_partitions,
        ConnectionConfig.from_settings(settings),
        topics,
        max_message_bytes=settings.sizes.topic_message_bytes,
    )
    tiers = load_tiers(settings.tiers_file)
    ledger = QuotaLedger(
        settings, tiers, gateway_id=f"worker-{settings.app_id}-{uuid.uuid4().hex[:8]}"
    )
    identity = RequestIdentity(
        ProducerTable.load(settings.producers_file),
        user_tiers(load_keys(settings.keys_file, settings.dev_api_key)),
        ids,
        settings.work_partitions,
    )
    preprocess = PreprocessStage(
        settings,
        tiers,
        send_job=sender(raw_topic(app, topics.preprocessed)),
        send_token=sender(tokens),
        dlq=dlq,
        identity=identity,
        admission=TopicAdmission(ledger),
        send_chunk=sender(raw_topic(app, topics.chunks)),
        reuse=reuse_reader(settings, topics.reuse),
        count=upstream_count(settings),
        preferences=preferences,
        sessions=sessions,
        history=history,
        keys=keys,
    )

    async def on_request(event: EventT[Any]) -> None:
        # The producer's signature is in the record's headers (pipeline/core/producers.py).
        message = event.message
        await preprocess.handle(
            message.key, message.value, origin(event), timestamp_ms(event), message.headers
        )

    # Several requests at once: a long document's preparation (~0.5 s for 100k tokens: the
    # split on a thread, the reuse read) must not hold the short requests behind it (the
    # bench's start-up stall, docs/architecture.md "Long documents"). Faust acks each record
    # when its handler ends and commits only below the oldest unacknowledged one.
    @app.agent(
        raw_topic(app, topics.requests), name="preprocess", concurrency=PREPROCESS_CONCURRENCY
    )
    async def preprocess_agent(stream: StreamT[Any]) -> None:
        async for event in events(stream):
            await process("preprocess", on_request, event, dlq, preprocess.abandon)

    retention_ms = int(settings.request_ids_retention_s * 1000)

    @app.timer(600.0)  # type: ignore[untyped-decorator]
    async def purge_request_ids() -> None:
        ids.purge(now_ms() - retention_ms)

    @app.timer(60.0)  # type: ignore[untyped-decorator]
    async def purge_sessions() -> None:
        for session_id in sessions.expired(tiers, now_ms(), preferences.forgotten_at):
            await sessions.forget(session_id)

    return ledger


def _add_inference(
    app: StageApp,
    settings: WorkerSettings,
    topics: TopicNames,
    tokens: TopicT,
    dlq: DeadLetterQueue,
    keys: DataKeyTable,
) -> InflightWork:
    """The inference and control agents, on the in-flight work they share."""
    inflight = InflightWork(
        app,
        settings,
        topics,
        tokens_topic=tokens,
        dlq=dlq,
        # Once per worker: the upstream's health outlives every partition assignment.
        upstream=Upstream(settings, UpstreamClient(settings)),
        keys=keys,
    )

    @app.agent(raw_topic(app, topics.preprocessed), name="inference")
    async def inference_agent(stream: StreamT[Any]) -> None:
        async for event in events(stream):
            await process("inference", inflight.on_job, event, dlq)

    # `control` has as many partitions as `preprocessed` and the same key, and every worker
    # that runs inference subscribes to both: Faust's assignor groups topics with the same
    # partition count and the same subscribers and assigns partition p of all of them to
    # one worker (faust/assignor/partition_assignor.py, _get_copartitioned_groups), so a
    # cancel reaches the worker that owns the request's job.
    @app.agent(raw_topic(app, topics.control), name="control")
    async def control_agent(stream: StreamT[Any]) -> None:
        async for event in events(stream):
            await process("control", inflight.on_control, event, dlq)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        await inflight.on_revoked()

    @app.timer(60.0)  # type: ignore[untyped-decorator]
    async def purge_done() -> None:
        inflight.purge_done()

    return inflight


def _add_postprocess(
    app: StageApp,
    settings: WorkerSettings,
    connection: ConnectionConfig,
    topics: TopicNames,
    tokens: TopicT,
    dlq: DeadLetterQueue,
    keys: DataKeyTable,
) -> None:
    """The postprocess agent: `tokens` -> `results`."""
    postprocess = PostprocessStage(
        settings,
        PriceTable.load(settings.prices_file),
        send_result=sender(raw_topic(app, topics.results)),
        dlq=dlq,
        reread=tail_reread(connection, topics.tokens),
        send_chunk=sender(raw_topic(app, topics.chunks)),
        keys=keys,
    )
    on_token = on_record(postprocess.handle)

    @app.agent(tokens, name="postprocess")
    async def postprocess_agent(stream: StreamT[Any]) -> None:
        async for event in events(stream):
            await process("postprocess", on_token, event, dlq)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_tokens_revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        postprocess.on_revoked({tp.partition for tp in revoked if tp.topic == topics.tokens})
