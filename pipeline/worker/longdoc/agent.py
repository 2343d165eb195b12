"""The reduce step's agents: `chunks` (plans and chunk summaries) and `control` (a cancel of a
long document), over the changelog-backed ``longdoc`` table keyed by the parent request
(docs/architecture.md, "Long documents")."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import faust
from faust.tables.table import Table
from faust.types import EventT, StreamT, TopicT

from pipeline.core.clock import now_ms
from pipeline.core.codec import codec
from pipeline.core.errors import CodecError
from pipeline.core.metrics import RECORDS_PROCESSED
from pipeline.core.records import ChunkSummary, ControlEvent
from pipeline.core.settings import WorkerSettings
from pipeline.core.tiers import Tier
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.tail import read_request_records
from pipeline.worker.agents import events, on_record, process, raw_topic, sender
from pipeline.worker.dlq import DeadLetterQueue, Origin
from pipeline.worker.longdoc.reduce import DocState, Step, on_cancel, on_plan, on_summary
from pipeline.worker.preprocess import ReuseReader
from pipeline.worker.tables import add_table, write

log = logging.getLogger("sumstream.longdoc")

STAGE = "reduce"
Send = Callable[[bytes, bytes], Awaitable[None]]


class LongDocReducer:
    """Applies chunk records and cancels to the ``longdoc`` table and sends what they cause."""

    def __init__(
        self,
        table: Table[bytes, bytes],
        tiers: Mapping[str, Tier],
        *,
        partitions: int,
        send_job: Send,
        send_token: Send,
        send_control: Send,
        send_reuse: Send,
        dlq: DeadLetterQueue,
    ) -> None:
        self.table = table
        self.tiers = tiers
        self.partitions = partitions
        self._send_job = send_job
        self._send_token = send_token
        self._send_control = send_control
        self._send_reuse = send_reuse
        self._dlq = dlq

    def _put(self, parent: bytes, raw: bytes) -> None:
        # The changelog partition named here, not by Faust (docs/architecture.md, "The stages").
        write(self.table, self.partitions, parent, raw)

    async def on_chunk(
        self, key: bytes | None, value: bytes | None, origin: Origin, timestamp_ms: int | None
    ) -> None:
        """One record of `chunks`."""
        try:
            record = cast(ChunkSummary, codec().decode_as(value, "ChunkSummary"))
        except CodecError as exc:
            await self._dlq.publish(key=key, value=value, exc=exc, stage=STAGE, origin=origin)
            return
        parent = record["request_id"].encode()
        raw = self.table.get(parent)
        if record["kind"] == "PLAN":
            if raw is None:
                tier = self.tiers.get(codec().decode_as(record["job"], "InferenceJob")["tier"])
                summary_tokens = tier.reduce_output_tokens if tier else 512
                concurrency = tier.map_concurrency if tier else 0
                self._put(parent, on_plan(record, summary_tokens, concurrency).encode())
            return
        if raw is None:
            log.warning("chunk summary without a plan", extra={"request_id": record["request_id"]})
            return
        state = DocState.decode(raw)
        step = on_summary(state, record)
        await self._apply(parent, state, step)

    async def on_control(self, event: EventT[Any]) -> None:
        """A cancel of a long document: cancel its outstanding calls and end its stream."""
        try:
            control = cast(ControlEvent, codec().decode_as(event.message.value, "ControlEvent"))
        except CodecError:
            return  # the inference stage's control agent dead-letters it
        parent = control["request_id"].encode()
        raw = self.table.get(parent)
        if raw is None:
            return
        state = DocState.decode(raw)
        calls, terminal = on_cancel(state, control.get("reason") or "client")
        if terminal is None:
            return
        for call in calls:
            cancel: ControlEvent = {**control, "request_id": call}
            await self._send_control(call.encode(), codec().encode("ControlEvent", cancel))
        await self._send_token(parent, codec().encode("TokenEvent", terminal))
        self._put(parent, state.stored())
        log.info(
            "long document cancelled", extra={"request_id": parent.decode(), "calls": len(calls)}
        )

    async def _apply(self, parent: bytes, state: DocState, step: Step) -> None:
        # Sends first, then the table: a crash in between redoes the step, and every job it
        # sends again has the same id, which the inference stage runs once.
        for job in step.jobs:
            await self._send_job(job["request_id"].encode(), codec().encode("InferenceJob", job))
        for record in step.keep:
            # Kept for the same user's same document (docs/architecture.md, "Long documents").
            await self._send_reuse(state.reuse_key.encode(), codec().encode("ChunkSummary", record))
        if step.progress is not None:
            await self._send_token(parent, codec().encode("TokenEvent", step.progress))
        if step.terminal is not None:
            await self._send_token(parent, codec().encode("TokenEvent", step.terminal))
        if step.changed:
            self._put(parent, state.stored())
        RECORDS_PROCESSED.labels(stage=STAGE, outcome="ok").inc()


def reuse_reader(settings: WorkerSettings, topic: str) -> ReuseReader | None:
    """Reads the chunk summaries kept under a key within ``chunk_reuse_window_s`` (None: off):
    one partition of the `reuse` topic, from the window's start (pipeline/kafka/tail.py)."""
    window_ms = int(settings.chunk_reuse_window_s * 1000)
    if window_ms <= 0:
        return None
    connection = ConnectionConfig.from_settings(settings)

    async def read(key: str) -> list[ChunkSummary]:
        records = read_request_records(
            connection, topic, key, schema="ChunkSummary", since_ms=now_ms() - window_ms
        )
        return [cast(ChunkSummary, r) async for r in records]

    return read


def add_reduce(
    app: faust.App,
    settings: WorkerSettings,
    topics: TopicNames,
    tokens: TopicT,
    dlq: DeadLetterQueue,
    tiers: Mapping[str, Tier],
) -> LongDocReducer:
    """The reduce agents of the inference stage. `chunks`, `control` and the ``longdoc``
    changelog have `preprocessed`'s partition count and key by the parent request, so one
    worker owns a parent's records, its cancel and its state."""
    table = add_table(
        app,
        "longdoc",
        partitions=settings.work_partitions,
        help="parent request id -> a long document's reduce progress",
        max_message_bytes=settings.sizes.topic_message_bytes,
    )
    reducer = LongDocReducer(
        table,
        tiers,
        partitions=settings.work_partitions,
        send_job=sender(raw_topic(app, topics.preprocessed)),
        send_token=sender(tokens),
        send_control=sender(raw_topic(app, topics.control)),
        send_reuse=sender(raw_topic(app, topics.reuse)),
        dlq=dlq,
    )
    on_chunk = on_record(reducer.on_chunk)

    @app.agent(raw_topic(app, topics.chunks), name="reduce")
    async def reduce_agent(stream: StreamT[Any]) -> None:
        async for event in events(stream):
            await process(STAGE, on_chunk, event, dlq)

    @app.agent(raw_topic(app, topics.control), name="reduce-control")
    async def reduce_control_agent(stream: StreamT[Any]) -> None:
        async for event in events(stream):
            await process("reduce-control", reducer.on_control, event, dlq)

    return reducer
