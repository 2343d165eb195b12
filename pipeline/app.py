"""The Faust app and the `sumstream worker` command: any subset of the three stages.

Each stage is one agent on one topic (DESIGN.md section 4). Records are read and written as raw
bytes and decoded by pipeline/codec.py inside the agents, so an undecodable record becomes a
dead letter instead of crashing Faust. The inference stage keeps its in-flight work durable in
a changelog-backed table (``InflightWork``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.config
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, cast

import faust
import uvloop
from faust.tables.table import Table
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, EventT, StreamT, TopicT
from prometheus_client import start_http_server

from pipeline.admin import create_topics
from pipeline.codec import codec
from pipeline.dlq import DeadLetterQueue, Origin, SendRaw
from pipeline.errors import CodecError, SumstreamError, ValidationError
from pipeline.inference import InferenceEngine, ResumeState
from pipeline.lag import LagReader
from pipeline.llm.client import UpstreamClient
from pipeline.metrics import RECORDS_PROCESSED, LagSampler
from pipeline.partitioning import partition_for
from pipeline.postprocess import PostprocessStage, tail_reread
from pipeline.preprocess import PreprocessStage
from pipeline.pricing import PriceTable
from pipeline.settings import WorkerSettings
from pipeline.tail import TERMINAL_KINDS, read_request_records
from pipeline.tiers import load_tiers
from pipeline.topics import TopicNames

log = logging.getLogger("sumstream.worker")

STAGES = ("preprocess", "inference", "postprocess")
# How many requests the resume after a rebalance reads back from `tokens` at once.
RESUME_CONCURRENCY = 8
# A resume that fails (broker unreachable) is retried with this backoff while we own the job.
RESUME_RETRY_S = 1.0
RESUME_RETRY_MAX_S = 30.0
# A record whose handler keeps failing is retried this often (backoff doubling from
# PROCESS_BACKOFF_S, ~6 s in all), then dead-lettered.
PROCESS_ATTEMPTS = 5
PROCESS_BACKOFF_S = 0.2


# --- Faust transport: idempotent producer, short fetch wait -------------------------------


class _Producer(faust_aiokafka.Producer):
    def _settings_extra(self) -> dict[str, Any]:
        # acks=all + idempotence: a retried send is never duplicated or reordered, which is
        # what keeps a request's token seq order intact across broker hiccups.
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Faust passes fetch_max_wait_ms=1500 with no setting to change it; aiokafka reads
        # this attribute when the consumer starts. A long wait delays records that arrive
        # while a fetch for other partitions is parked at the broker.
        consumer._fetch_max_wait_ms = getattr(self.app, "fetch_max_wait_ms", 1500)
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer
    Producer = _Producer


class StageApp(faust.App):
    """faust.App with sumstream's transport and a lifecycle hook for the stages."""

    runtime: StageRuntime | None = None
    fetch_max_wait_ms: int = 1500

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)

    async def on_start(self) -> None:
        await super().on_start()
        if self.runtime is not None:
            await self.runtime.start()

    async def on_stop(self) -> None:
        # Stop the engine first: nothing may be emitted after the producer's last flush.
        if self.runtime is not None:
            await self.runtime.stop()
        await super().on_stop()


# --- In-flight table entries ----------------------------------------------------------------

State = Literal["R", "C", "D"]
_HEADER = struct.Struct(">cq")


@dataclass(frozen=True, slots=True)
class Entry:
    """One in-flight table value: R running (job bytes kept), C cancel requested, D done."""

    state: State
    at_ms: int
    job: bytes = b""

    def encode(self) -> bytes:
        return _HEADER.pack(self.state.encode(), self.at_ms) + self.job

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        state, at_ms = _HEADER.unpack_from(raw)
        return cls(cast(State, state.decode()), at_ms, bytes(raw[_HEADER.size :]))


def resume_state(events: Iterable[dict[str, Any]]) -> ResumeState | None:
    """What the engine needs to continue a stream from the events already in `tokens`.

    None when nothing was streamed yet (the job simply starts again, seq 1).
    """
    by_seq = {int(e["seq"]): e for e in events}
    if not by_seq:
        return None
    ordered = [by_seq[s] for s in sorted(by_seq)]
    deltas = [e for e in ordered if e.get("kind") == "DELTA"]
    usage = next((e["usage"] for e in reversed(ordered) if e.get("usage")), None) or {}
    trace: dict[str, int] = {}
    for event in ordered:
        trace.update(event.get("trace") or {})
    return ResumeState(
        text="".join(e.get("text") or "" for e in deltas),
        last_seq=ordered[-1]["seq"],
        attempts=max(
            int(usage.get("attempts") or 0), max(int(e.get("attempt") or 0) for e in ordered)
        ),
        input_tokens=int(usage.get("input_tokens") or 0),
        # Without a usage record, count a token per streamed delta (what the client saw).
        output_tokens=int(usage.get("output_tokens") or len(deltas)),
        trace=trace,
    )


def cancelled_event(
    job: dict[str, Any], *, seq: int, reason: str, state: ResumeState | None
) -> dict[str, Any]:
    """A CANCELLED TokenEvent for a job the engine is not running (cancelled while waiting)."""
    return {
        "request_id": job["request_id"],
        "seq": seq,
        "kind": "CANCELLED",
        "text": "",
        "attempt": state.attempts if state else 0,
        "user_id": job.get("user_id", ""),
        "tier": job.get("tier", ""),
        "model": job.get("model", ""),
        "stop_reason": None,
        "usage": {
            "input_tokens": state.input_tokens if state else 0,
            "output_tokens": state.output_tokens if state else 0,
            "attempts": state.attempts if state else 0,
            "cost_micro_usd": 0,
        },
        "error": {"code": "cancelled", "message": reason, "retriable": False, "partial": False},
        "created_at": job.get("created_at", 0),
        "trace": dict(job.get("trace") or {}),
    }


def invalid_job_event(job: dict[str, Any], message: str) -> dict[str, Any]:
    """A terminal ERROR for a job record whose values cannot run (its client still gets an end)."""
    event = cancelled_event(job, seq=1, reason=message, state=None)
    event["kind"] = "ERROR"
    event["usage"] = None
    event["error"] = {
        "code": "invalid_request",
        "message": message,
        "retriable": False,
        "partial": False,
    }
    return event


def validate_job(job: dict[str, Any]) -> None:
    """Raise ``ValidationError`` for an InferenceJob that cannot be run."""
    if not (job.get("request_id") or "").strip():
        raise ValidationError("request_id is empty")
    if not (job.get("prompt") or "").strip():
        raise ValidationError("prompt is empty")
    if int(job.get("max_output_tokens") or 0) < 1:
        raise ValidationError("max_output_tokens must be at least 1")
    if not job.get("model"):
        raise ValidationError("model is empty")


# --- The inference stage's durable in-flight work -------------------------------------------


class InflightTable(Table[bytes, bytes]):
    """The `inflight` table; tells the runtime when its partitions are recovered."""

    work: InflightWork | None = None

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        await super().on_recovery_completed(active_tps, standby_tps)
        if self.work is not None:
            self.work.on_assigned({tp.partition for tp in active_tps})


class InflightWork:
    """Runs jobs on the engine and keeps every accepted job in the `inflight` table.

    Faust commits a job's offset once the agent moves on, while the model call goes on for
    seconds (faust-streaming issue 606: nothing in Faust tracks that work). So a job is written
    to the table *before* the engine takes it and marked done *after* its terminal event: a
    worker that is killed leaves the entry behind, and whoever is assigned its partition next
    resumes the stream from the tokens already in `tokens`.

    The table uses the producer's partitioner (murmur2 of the request id, like `preprocessed`),
    with as many partitions as `preprocessed`, so an entry lives in the same partition number as
    its job and Faust's co-partitioning hands both to the same worker.
    """

    def __init__(
        self,
        app: StageApp,
        settings: WorkerSettings,
        topics: TopicNames,
        *,
        tokens_topic: TopicT,
        dlq: DeadLetterQueue,
        client: UpstreamClient,
    ) -> None:
        self.app = app
        self.settings = settings
        self.topics = topics
        self._tokens_topic = tokens_topic
        self._dlq = dlq
        self._client = client
        self.table = cast(
            InflightTable,
            app.tables.add(
                InflightTable(
                    app,
                    name="inflight",
                    partitions=settings.work_partitions,
                    # bytes => the "raw" serializer for keys and values.
                    key_type=bytes,
                    value_type=bytes,
                    use_partitioner=True,
                    help="request_id -> in-flight inference job (see pipeline/app.py)",
                ),
            ),
        )
        self.table.work = self
        self._engine: InferenceEngine | None = None
        self._owned: set[int] = set()
        self._generation = 0
        # Jobs whose submit is waiting for room in the scheduler, by request id.
        self._waiting: dict[str, asyncio.Future[None]] = {}
        # Entries the resume after the last assignment has yet to handle.
        self._resuming: set[str] = set()
        self._resume_task: asyncio.Task[None] | None = None
        self._retention_ms = int(settings.inflight_done_retention_s * 1000)
        # Per `preprocessed` partition: the end offset when we were assigned it. Records before
        # it may have been run by the previous owner; the ones after cannot have been.
        self._replay_until: dict[int, int] = {}
        self._boundaries = asyncio.Event()

    # -- lifecycle

    async def start(self) -> None:
        self._engine = self._new_engine()
        await self._engine.start()

    async def stop(self) -> None:
        await self._release_all()
        await self._client.close()

    def _new_engine(self) -> InferenceEngine:
        return InferenceEngine(self.settings, self._client, self._emit, self._on_finished)

    @property
    def engine(self) -> InferenceEngine:
        if self._engine is None:
            raise RuntimeError("the inference engine is not running")
        return self._engine

    async def _emit(self, event: dict[str, Any]) -> None:
        # One key per request => one partition, and sends keep call order, so a request's
        # events stay in seq order in `tokens` (the idempotent producer keeps it on retries).
        await self._tokens_topic.send(
            key=event["request_id"].encode(), value=codec().encode("TokenEvent", event)
        )

    # -- ownership (rebalance)

    def _partition(self, key: bytes) -> int:
        return partition_for(key, self.settings.work_partitions)

    def owns(self, key: bytes) -> bool:
        return self._partition(key) in self._owned

    def on_assigned(self, partitions: set[int]) -> None:
        """Called once the table's partitions are recovered: resume what was in flight."""
        self._generation += 1
        self._owned = set(partitions)
        snapshot = [
            (bytes(k), Entry.decode(v)) for k, v in self.table.items() if self.owns(bytes(k))
        ]
        log.info(
            "inflight partitions assigned",
            extra={"partitions": sorted(partitions), "entries": len(snapshot)},
        )
        if self._resume_task is not None:
            self._resume_task.cancel()
        # Marked before the agents resume, so a replayed job is left to the resume.
        self._resuming = {k.decode() for k, e in snapshot if e.state != "D"}
        self._boundaries.clear()
        self._resume_task = asyncio.ensure_future(
            self._resume(snapshot, self._generation, partitions)
        )

    async def on_revoked(self) -> None:
        """Stop every job without emitting: the partitions' next owner resumes them.

        Kafka's eager rebalancing revokes all partitions of a member at once, so this stops
        everything; partitions that come back are resumed from the table like any other.
        """
        if not self._owned and not self._waiting:
            return  # nothing can be running: jobs only start in owned partitions
        self._generation += 1
        self._owned = set()
        await self._release_all()
        self._engine = self._new_engine()
        await self._engine.start()
        # Whatever the stopped jobs emitted reaches `tokens` before the new owner reads it.
        await self.app.producer.flush()

    async def _release_all(self) -> None:
        if self._resume_task is not None:
            self._resume_task.cancel()
            with suppress(asyncio.CancelledError):
                await self._resume_task
            self._resume_task = None
        self._resuming.clear()
        self._replay_until = {}
        self._boundaries.set()  # release an agent waiting for them; unknown ones fall back
        for fut in list(self._waiting.values()):
            fut.cancel()
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.stop()

    # -- table writes (only for partitions this worker owns)

    def _put(self, key: bytes, entry: Entry) -> None:
        if self.owns(key):
            self.table[key] = entry.encode()

    async def _put_acked(self, key: bytes, entry: Entry) -> None:
        """Like ``_put``, and wait until the broker has the changelog record."""
        raw = entry.encode()
        # table[key] = raw would not let us wait for the write: set the store and send the
        # changelog record ourselves (the same two steps, with the send's future kept).
        self.table.data[key] = raw
        await self.table.send_changelog(None, key, raw)

    def _entry(self, key: bytes) -> Entry | None:
        raw = self.table.get(key)
        return Entry.decode(raw) if raw else None

    async def _on_finished(self, request_id: str) -> None:
        self._put(request_id.encode(), Entry("D", _now_ms()))

    def purge_done(self) -> int:
        """Delete old done markers, and cancels whose job never came (they only skip replays)."""
        horizon = _now_ms() - int(self.settings.inflight_done_retention_s * 1000)
        old = []
        for k, v in self.table.items():
            entry = Entry.decode(v)
            stale = entry.state == "D" or (entry.state == "C" and not entry.job)
            if stale and entry.at_ms < horizon and self.owns(bytes(k)):
                old.append(bytes(k))
        for key in old:
            del self.table[key]
        return len(old)

    # -- the agents

    async def on_job(self, event: EventT[Any]) -> None:
        """One record of `preprocessed`."""
        message = event.message
        origin = Origin(message.topic, message.partition, message.offset)
        try:
            job = codec().decode_as(message.value, "InferenceJob")
            validate_job(job)
        except (CodecError, ValidationError) as exc:
            await self._dlq.publish(
                key=message.key, value=message.value, exc=exc, stage="inference", origin=origin
            )
            RECORDS_PROCESSED.labels(stage="inference", outcome="dead_letter").inc()
            if isinstance(exc, ValidationError) and (job.get("request_id") or "").strip():
                await self._emit(invalid_job_event(job, str(exc)))
            return
        request_id: str = job["request_id"]
        key = request_id.encode()
        entry = self._entry(key)
        if entry is None:
            # Durable first: once the engine emits, a crash must leave this entry for the next
            # owner to resume (a replay without it would start the stream again at seq 1).
            fresh = Entry("R", _now_ms(), bytes(message.value or b""))
            replay = await self._maybe_replayed(event)
            await self._put_acked(key, fresh)
            if replay:
                # Maybe a finished request whose done marker is gone (purged, or a new group
                # replaying the log): let its stream in `tokens` decide: skip, go on or start.
                await self._resume_one(key, fresh, self._generation)
            else:
                await self._submit(job, None)
            RECORDS_PROCESSED.labels(stage="inference", outcome="ok").inc()
        elif entry.state == "C" and not entry.job:
            # Cancelled before the job reached us: end the stream without a model call.
            await self._emit(cancelled_event(job, seq=1, reason="client", state=None))
            self._put(key, Entry("D", _now_ms()))
            RECORDS_PROCESSED.labels(stage="inference", outcome="cancelled").inc()
        elif entry.state != "D" and not self._handled(request_id):
            # In the table but running nowhere (an earlier attempt at this record failed).
            await self._resume_one(key, entry, self._generation)
        else:
            # A replay of a job that is running, being resumed, or finished.
            RECORDS_PROCESSED.labels(stage="inference", outcome="duplicate").inc()

    async def _maybe_replayed(self, event: EventT[Any]) -> bool:
        """Could another consumer already have run this job? Only records of the backlog found
        at assignment can be replays; anything newer arrived while we owned the partition."""
        await self._boundaries.wait()
        message = event.message
        bound = self._replay_until.get(message.partition)
        if bound is not None:
            return bool(message.offset < bound)
        written = _timestamp_ms(event)  # boundary unknown: fall back to the record's age
        return written is not None and _now_ms() - written > self._retention_ms

    async def _load_boundaries(self, partitions: set[int]) -> None:
        try:
            ends = await self.app.consumer.highwaters(
                *(TP(self.topics.preprocessed, p) for p in partitions)
            )
            self._replay_until = {tp.partition: int(end) for tp, end in ends.items()}
        except Exception as exc:
            log.warning("cannot read the end offsets of preprocessed", extra={"error": repr(exc)})
            self._replay_until = {}
        finally:
            self._boundaries.set()

    def _handled(self, request_id: str) -> bool:
        """Is the job running, waiting for the scheduler, or about to be resumed here?"""
        return (
            self.engine.is_active(request_id)
            or request_id in self._waiting
            or request_id in self._resuming
        )

    async def _submit(self, job: dict[str, Any], resume: ResumeState | None) -> None:
        request_id: str = job["request_id"]
        if request_id in self._waiting:
            return  # already on its way into the engine
        # The submit blocks while the scheduler is full (so the agent stops pulling from
        # Kafka); it runs as its own future so a rebalance can abandon it without cancelling
        # the agent itself.
        fut = asyncio.ensure_future(self.engine.submit(job, resume))
        self._waiting[request_id] = fut
        try:
            await fut
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not fut.cancelled() or (task is not None and task.cancelling()):
                raise
            log.info("job released before it started", extra={"request_id": request_id})
            return
        finally:
            self._waiting.pop(request_id, None)

    async def on_control(self, event: EventT[Any]) -> None:
        """One record of `control` (a cancel)."""
        message = event.message
        origin = Origin(message.topic, message.partition, message.offset)
        try:
            control = codec().decode_as(message.value, "ControlEvent")
            if not (control.get("request_id") or "").strip():
                raise ValidationError("request_id is empty")
        except (CodecError, ValidationError) as exc:
            await self._dlq.publish(
                key=message.key, value=message.value, exc=exc, stage="control", origin=origin
            )
            return
        request_id: str = control["request_id"]
        reason: str = control.get("reason") or "client"
        # The engine knows queued, running and submitting jobs (and remembers a cancel that
        # comes first in memory); the table keeps the cancel across a rebalance or a crash.
        if await self.engine.cancel(request_id, reason):
            log.info("cancelled", extra={"request_id": request_id, "reason": reason})
            return
        key = request_id.encode()
        entry = self._entry(key)
        if entry is None:
            # The job has not reached inference yet; it will be ended when it does.
            self._put(key, Entry("C", _now_ms()))
        elif entry.state == "R":
            # Waiting to be resumed after a rebalance; the resume ends it instead.
            self._put(key, Entry("C", entry.at_ms, entry.job))
        log.info(
            "cancel recorded for a job not running here",
            extra={"request_id": request_id, "reason": reason},
        )

    # -- resume after a rebalance or a crash

    async def _resume(
        self, snapshot: list[tuple[bytes, Entry]], generation: int, partitions: set[int]
    ) -> None:
        await self._load_boundaries(partitions)
        gate = asyncio.Semaphore(RESUME_CONCURRENCY)

        async def one(key: bytes, entry: Entry) -> None:
            async with gate:
                if generation == self._generation:
                    await self._resume_one(key, entry, generation)
                    self._resuming.discard(key.decode())

        pending = [(k, e) for k, e in snapshot if e.state != "D"]
        delay = RESUME_RETRY_S
        while pending and generation == self._generation:
            results = await asyncio.gather(*(one(k, e) for k, e in pending), return_exceptions=True)
            failed = []
            for (key, entry), result in zip(pending, results, strict=True):
                if isinstance(result, Exception):
                    failed.append((key, entry))
                    log.warning(
                        "resume failed; retrying",
                        extra={"request_id": key.decode(errors="replace"), "error": repr(result)},
                    )
            pending = failed
            if pending:
                # The broker may be restarting: keep the job and try again, it is not lost.
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESUME_RETRY_MAX_S)
        if generation == self._generation:
            self.purge_done()

    async def _resume_one(self, key: bytes, entry: Entry, generation: int) -> None:
        """Continue, end or skip one table entry according to what `tokens` holds for it."""
        request_id = key.decode()
        if self.engine.is_active(request_id) or request_id in self._waiting:
            return
        if not entry.job:
            return  # a cancel marker for a job that never arrived: the job's arrival ends it
        try:
            job = codec().decode_as(entry.job, "InferenceJob")
        except CodecError as exc:
            # Written by a version whose schema this one does not know: it can never run here.
            log.error(
                "in-flight job unreadable", extra={"request_id": request_id, "error": str(exc)}
            )
            await self._emit(invalid_job_event({"request_id": request_id}, str(exc)))
            self._put(key, Entry("D", _now_ms()))
            return
        events = [
            e
            async for e in read_request_records(
                self.settings.bootstrap_servers,
                self.topics.tokens,
                request_id,
                schema="TokenEvent",
                stop_at_terminal=True,
            )
        ]
        if generation != self._generation:
            return
        current = self._entry(key)
        if current is None or current.state == "D":
            return
        if any(e.get("kind") in TERMINAL_KINDS for e in events):
            log.info("request already ended; not run again", extra={"request_id": request_id})
            self._put(key, Entry("D", _now_ms()))
            return
        state = resume_state(events)
        if current.state == "C":
            seq = state.last_seq + 1 if state else 1
            await self._emit(cancelled_event(job, seq=seq, reason="client", state=state))
            self._put(key, Entry("D", _now_ms()))
            return
        log.info(
            "resuming request",
            extra={"request_id": request_id, "last_seq": state.last_seq if state else 0},
        )
        await self._submit(job, state)


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- The app --------------------------------------------------------------------------------


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

    async def start(self) -> None:
        self._start_metrics()
        if self._metrics_server is not None:
            # Lag of this worker's stages, whole group: a worker fed by other systems (no
            # gateway running) still shows its queue.
            groups = {stage: self.settings.app_id for stage in sorted(self.stages)}
            self._lag = LagSampler(LagReader(self.settings, groups).read)
            await self._lag.start()
        if self.inflight is not None:
            await self.inflight.start()

    async def stop(self) -> None:
        if self.inflight is not None:
            await self.inflight.stop()
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
        try:
            server, _thread = start_http_server(self.settings.metrics_port)
        except OSError as exc:
            # Several workers on one host: the second takes any free port instead of failing.
            log.warning(
                "metrics port busy, using a free one",
                extra={"port": self.settings.metrics_port, "error": str(exc)},
            )
            server, _thread = start_http_server(0)
        self._metrics_server = server
        self.metrics_port = int(server.server_port)
        log.info("metrics", extra={"port": self.metrics_port, "path": "/metrics"})


def _raw_topic(app: StageApp, name: str) -> TopicT:
    return app.topic(name, key_serializer="raw", value_serializer="raw")


def _sender(topic: TopicT) -> SendRaw:
    async def send(key: bytes | None, value: bytes) -> None:
        await topic.send(key=key, value=value)

    return send


async def _events(stream: StreamT[Any]) -> AsyncIterator[EventT[Any]]:
    async for event in stream.events():
        yield event


def _origin(event: EventT[Any]) -> Origin:
    message = event.message
    return Origin(message.topic, message.partition, message.offset)


def _timestamp_ms(event: EventT[Any]) -> int | None:
    ts = event.message.timestamp
    return int(ts * 1000) if ts else None


def create_app(settings: WorkerSettings, stages: Iterable[str] = STAGES) -> StageApp:
    """The Faust app with an agent for each of ``stages`` (see DESIGN.md sections 4 and 5)."""
    wanted = set(stages)
    unknown = wanted - set(STAGES)
    if unknown or not wanted:
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {sorted(wanted)}")
    # Faust creates only the last level of its data directory.
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    brokers = ";".join(f"kafka://{b.strip()}" for b in settings.bootstrap_servers.split(","))
    app = StageApp(
        settings.app_id,
        broker=brokers,
        key_serializer="raw",
        value_serializer="raw",
        autodiscover=False,
        store="memory://",
        datadir=str(settings.data_dir / "faust" / settings.app_id),
        web_enabled=False,
        producer_acks=-1,
        producer_linger=0.0,
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
        consumer_auto_offset_reset="earliest",
        worker_redirect_stdouts=False,
    )
    app.fetch_max_wait_ms = settings.fetch_max_wait_ms
    runtime = StageRuntime(app, settings, wanted)
    app.runtime = runtime
    topics = runtime.topics
    tokens = _raw_topic(app, topics.tokens)
    dlq = DeadLetterQueue(_sender(_raw_topic(app, topics.dlq)))

    if "preprocess" in wanted:
        preprocess = PreprocessStage(
            settings,
            load_tiers(settings.tiers_file),
            send_job=_sender(_raw_topic(app, topics.preprocessed)),
            send_token=_sender(tokens),
            dlq=dlq,
        )

        on_request = _on_record(preprocess.handle)

        @app.agent(_raw_topic(app, topics.requests), name="preprocess")
        async def preprocess_agent(stream: StreamT[Any]) -> None:
            async for event in _events(stream):
                await _process("preprocess", on_request, event, dlq)

    if "inference" in wanted:
        inflight = InflightWork(
            app,
            settings,
            topics,
            tokens_topic=tokens,
            dlq=dlq,
            client=UpstreamClient(settings),
        )
        runtime.inflight = inflight

        @app.agent(_raw_topic(app, topics.preprocessed), name="inference")
        async def inference_agent(stream: StreamT[Any]) -> None:
            async for event in _events(stream):
                await _process("inference", inflight.on_job, event, dlq)

        # `control` has as many partitions as `preprocessed` and the same key, and every worker
        # that runs inference subscribes to both: Faust's assignor groups topics with the same
        # partition count and the same subscribers and assigns partition p of all of them to
        # one worker (faust/assignor/partition_assignor.py, _get_copartitioned_groups), so a
        # cancel reaches the worker that owns the request's job.
        @app.agent(_raw_topic(app, topics.control), name="control")
        async def control_agent(stream: StreamT[Any]) -> None:
            async for event in _events(stream):
                await _process("control", inflight.on_control, event, dlq)

        @app.on_partitions_revoked.connect  # type: ignore[arg-type]
        async def on_revoked(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
            await inflight.on_revoked()

        @app.timer(60.0)  # type: ignore[untyped-decorator]
        async def purge_done() -> None:
            inflight.purge_done()

    if "postprocess" in wanted:
        postprocess = PostprocessStage(
            settings,
            PriceTable.load(settings.prices_file),
            send_result=_sender(_raw_topic(app, topics.results)),
            dlq=dlq,
            reread=tail_reread(settings.bootstrap_servers, topics.tokens),
        )

        on_token = _on_record(postprocess.handle)

        @app.agent(tokens, name="postprocess")
        async def postprocess_agent(stream: StreamT[Any]) -> None:
            async for event in _events(stream):
                await _process("postprocess", on_token, event, dlq)

    return app


OnEvent = Callable[[EventT[Any]], Awaitable[None]]
OnRecord = Callable[[bytes | None, bytes | None, Origin, int | None], Awaitable[None]]


def _on_record(handle: OnRecord) -> OnEvent:
    """Adapt a stage's ``handle(key, value, origin, timestamp_ms)`` to a Faust event."""

    async def on_event(event: EventT[Any]) -> None:
        message = event.message
        await handle(message.key, message.value, _origin(event), _timestamp_ms(event))

    return on_event


async def _process(stage: str, handle: OnEvent, event: EventT[Any], dlq: DeadLetterQueue) -> None:
    """Run one record's work, retrying failures; then dead-letter it rather than stall.

    Stage handlers dead-letter bad records themselves; what reaches here is unexpected (a
    broker hiccup, a bug). Handlers are idempotent, so a retry is safe.
    """
    with record_context(stage, event.message.key):
        await _process_record(stage, handle, event, dlq)


async def _process_record(
    stage: str, handle: OnEvent, event: EventT[Any], dlq: DeadLetterQueue
) -> None:
    error: Exception | None = None
    for attempt in range(PROCESS_ATTEMPTS):
        try:
            await handle(event)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
            log.warning(
                "record failed, retrying",
                exc_info=True,
                extra={"stage": stage, "attempt": attempt + 1, "offset": event.message.offset},
            )
            await asyncio.sleep(min(PROCESS_BACKOFF_S * 2**attempt, 5.0))
    assert error is not None
    RECORDS_PROCESSED.labels(stage=stage, outcome="error").inc()
    message = event.message
    try:
        await dlq.publish(
            key=message.key, value=message.value, exc=error, stage=stage, origin=_origin(event)
        )
    except Exception:
        log.exception("record dropped: even the dead-letter topic failed", extra={"stage": stage})


# --- Logging --------------------------------------------------------------------------------

_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


# The record a stage is handling: (stage, request id = the record's key). Set around each
# record by ``_process``; tasks started meanwhile (the inference run of a job) copy it, so
# their lines, the upstream client's included, carry the request id too.
_RECORD: ContextVar[tuple[str, str] | None] = ContextVar("sumstream_record", default=None)
# A key is a request id; a longer one is not (a poison record) and is cut.
MAX_LOGGED_KEY = 64
# Loggers that print request bodies (the prompt, i.e. the document) at DEBUG: never below INFO.
BODY_LOGGERS = ("anthropic", "httpx", "httpx2", "httpcore")


@contextmanager
def record_context(stage: str, key: bytes | None) -> Iterator[None]:
    """Tag every log line emitted while handling one record with its stage and request id."""
    request_id = key[:MAX_LOGGED_KEY].decode("utf-8", "replace") if key else ""
    token = _RECORD.set((stage, request_id))
    try:
        yield
    finally:
        _RECORD.reset(token)


class RecordContextFilter(logging.Filter):
    """Adds ``stage`` and ``request_id`` of the record being handled; explicit extras win."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _RECORD.get()
        if current is not None:
            stage, request_id = current
            if not hasattr(record, "stage"):
                record.stage = stage
            if request_id and not hasattr(record, "request_id"):
                record.request_id = request_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra=`` fields (request_id, stage...) become keys.

    The same shape as the gateway's lines (gateway/logs.py): ts is ISO 8601 UTC in ms.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def logging_config(settings: WorkerSettings) -> dict[str, Any]:
    """A dictConfig for Faust's worker: JSON lines on stderr (or plain text).

    No document text at any level: the HTTP client libraries stay at INFO or above.
    """
    formatter = (
        {"()": f"{__name__}.JsonFormatter"}
        if settings.log_json
        else {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    )
    level = settings.log_level.upper()
    numeric = logging.getLevelNamesMapping().get(level, logging.INFO)
    body_level = logging.getLevelName(max(logging.INFO, numeric))
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"record": {"()": f"{__name__}.RecordContextFilter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["record"],
            },
        },
        "loggers": {name: {"level": body_level} for name in BODY_LOGGERS},
        "root": {"handlers": ["stderr"], "level": level},
    }


# --- The command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stages",
        default=None,
        help="comma-separated subset of preprocess,inference,postprocess (default: all, or "
        "SUMSTREAM_STAGES)",
    )
    parser.add_argument("--app-id", default=None, help="Faust app id = consumer group")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus /metrics port (0: any free port, -1: off)",
    )
    parser.add_argument("--log-level", default=None)


def run(args: argparse.Namespace) -> int:
    """`sumstream worker`: create the topics, then run the Faust worker until stopped."""
    overrides: dict[str, Any] = {}
    if args.stages is not None:
        overrides["stages"] = args.stages
    if args.app_id is not None:
        overrides["app_id"] = args.app_id
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    settings = WorkerSettings(**overrides)
    stages = [s.strip() for s in settings.stages.split(",") if s.strip()]
    logging.config.dictConfig(logging_config(settings))

    try:
        created = create_topics(settings)
    except SumstreamError as exc:
        log.error("cannot prepare the topics", extra={"error": str(exc), "code": exc.code})
        return 1
    if created:
        log.info("topics created", extra={"topics": created})
    # uvloop cuts the per-event cost of the asyncio machinery that every token passes through.
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    app = create_app(settings, stages)
    worker = faust.Worker(
        app,
        loop=loop,
        loglevel=settings.log_level.upper(),
        logging_config=logging_config(settings),
        quiet=True,
        redirect_stdouts=False,
    )
    log.info("worker starting", extra={"app_id": settings.app_id, "stages": stages})
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0
