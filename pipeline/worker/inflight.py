"""The inference stage's durable in-flight work: the changelog-backed `inflight` table, and
resuming what was in flight after a rebalance or a crash (DESIGN.md section 5)."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Literal, cast

import faust
from faust.tables.table import Table
from faust.types import TP, EventT, TopicT

from pipeline.core.codec import codec
from pipeline.core.errors import CodecError, ValidationError
from pipeline.core.metrics import RECORDS_PROCESSED
from pipeline.core.partitioning import partition_for
from pipeline.core.settings import WorkerSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.tail import TERMINAL_KINDS, read_request_records
from pipeline.llm.client import UpstreamClient
from pipeline.worker.agents import timestamp_ms
from pipeline.worker.dlq import DeadLetterQueue, Origin
from pipeline.worker.inference.engine import InferenceEngine, ResumeState
from pipeline.worker.jobs import cancelled_event, invalid_job_event, resume_state, validate_job

log = logging.getLogger("sumstream.worker")

# How many requests the resume after a rebalance reads back from `tokens` at once.
RESUME_CONCURRENCY = 8
# A resume that fails (broker unreachable) is retried with this backoff while we own the job.
RESUME_RETRY_S = 1.0
RESUME_RETRY_MAX_S = 30.0


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
        app: faust.App,
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
                    help="request_id -> in-flight inference job (see pipeline/worker/inflight.py)",
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
        written = timestamp_ms(event)  # boundary unknown: fall back to the record's age
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
                ConnectionConfig.from_settings(self.settings),
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
