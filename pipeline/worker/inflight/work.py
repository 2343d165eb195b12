"""The inference stage's durable in-flight work: the changelog-backed `inflight` table, and
resuming what was in flight after a rebalance or a crash (docs/architecture.md, "The stages")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from contextlib import suppress
from typing import Any, cast

import faust
from faust.types import TP, EventT, TopicT

from pipeline.core import sealing
from pipeline.core.clock import now_ms
from pipeline.core.codec import codec
from pipeline.core.errors import CodecError, ValidationError
from pipeline.core.metrics import RECORDS_PROCESSED
from pipeline.core.records import TERMINAL_KINDS, InferenceJob, TokenEvent
from pipeline.core.settings import WorkerSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.tail import read_request_records
from pipeline.memory.keystore import DataKeyTable
from pipeline.worker.agents import timestamp_ms
from pipeline.worker.dlq import DeadLetterQueue, Origin
from pipeline.worker.inference.engine import InferenceEngine, ResumeState, Upstream
from pipeline.worker.inference.publishing import EmitRefused
from pipeline.worker.inflight.entries import (
    Entry,
    EntryState,
    JobAction,
    ResumeAction,
    done,
    on_cancel,
    on_job,
    on_resume,
)
from pipeline.worker.inflight.freeze import FreezeWatch
from pipeline.worker.inflight.table import InflightEntries
from pipeline.worker.jobs import (
    cancelled_event,
    invalid_job_event,
    resume_state,
    validate_control,
    validate_job,
)

log = logging.getLogger("sumstream.worker")


class PartitionMoved(EmitRefused):
    """An emit for a request whose partition another worker owns now: it is not sent."""


# How many requests the resume after a rebalance reads back from `tokens` at once.
RESUME_CONCURRENCY = 8
# A resume that fails (broker unreachable) is retried with this backoff while we own the job.
RESUME_RETRY_S = 1.0
RESUME_RETRY_MAX_S = 30.0


class InflightWork:
    """Runs jobs on the engine and keeps every accepted job in the `inflight` table.

    Faust commits a job's offset once the agent moves on, while the model call goes on for
    seconds (faust-streaming issue 606: nothing in Faust tracks that work). So a job is written
    to the table *before* the engine takes it and marked done *after* its terminal event: a
    worker that is killed leaves the entry behind, and whoever is assigned its partition next
    resumes the stream from the tokens already in `tokens`.
    """

    def __init__(
        self,
        app: faust.App,
        settings: WorkerSettings,
        topics: TopicNames,
        *,
        tokens_topic: TopicT,
        dlq: DeadLetterQueue,
        upstream: Upstream,
        keys: DataKeyTable | None = None,
    ) -> None:
        self.app = app
        # Jobs are sealed with their user's data key (docs/architecture.md, "Forgetting").
        self.keys = keys
        self.settings = settings
        self.topics = topics
        self._tokens_topic = tokens_topic
        self._dlq = dlq
        # Built once per worker: its breaker, retry budget and scheduler outlive every engine.
        self.upstream = upstream
        self.entries = InflightEntries(
            app,
            settings.work_partitions,
            self.on_assigned,
            max_message_bytes=settings.sizes.topic_message_bytes,
        )
        self._engine: InferenceEngine | None = None
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
        # Closed from a revoke until the next assignment: emits wait, so nothing reaches
        # `tokens` for a partition that may be moving (docs/architecture.md, "Rebalances").
        self._open = asyncio.Event()
        self._open.set()
        # A freeze long enough to lose the group's membership closes the gate too, before the
        # group tells us: the coordinator drops a member a session timeout after its last
        # heartbeat, which can be a heartbeat interval (and a little) before the freeze.
        limit_s = max(
            settings.heartbeat_interval_s,
            settings.session_timeout_s - 2 * settings.heartbeat_interval_s,
        )
        self._freeze = FreezeWatch(limit_s, self._hold_after_freeze)
        self._reopen: asyncio.TimerHandle | None = None
        # Set by a freeze: the next assignment releases every run, since another worker may
        # have resumed (and written for) any of them meanwhile; the resume picks up ours.
        self._membership_lost = False
        self._sending = 0
        self._sent = asyncio.Event()
        self._sent.set()
        # Requests whose partition moved to another worker: their emits are refused.
        self._moved: set[str] = set()
        # Table entries of admitted jobs on their way to the broker, by request id: a run's
        # first emit waits for its own, so no token is in `tokens` before its entry is durable.
        self._durable: dict[str, Awaitable[object]] = {}
        self._release_task: asyncio.Future[None] | None = None

    # -- lifecycle

    async def start(self) -> None:
        self._engine = self._new_engine()
        await self._engine.start()
        self._freeze.start()

    async def stop(self) -> None:
        await self._freeze.stop()
        await self._release_all()
        await self.upstream.close()

    def _new_engine(self) -> InferenceEngine:
        return InferenceEngine(self.settings, self.upstream, self._emit, self._on_finished)

    @property
    def engine(self) -> InferenceEngine:
        if self._engine is None:
            raise RuntimeError("the inference engine is not running")
        return self._engine

    async def _emit(self, event: TokenEvent) -> None:
        durable = self._durable.pop(event["request_id"], None)
        if durable is not None:
            await durable
        self._freeze.check()
        if not self._open.is_set():
            await self._open.wait()
        if event["request_id"] in self._moved:
            raise PartitionMoved(event["request_id"])
        self._sending += 1
        self._sent.clear()
        try:
            # One key per request => one partition, and sends keep call order, so a request's
            # events stay in seq order in `tokens` (the idempotent producer keeps it on retries).
            # Waits for the broker's acknowledgement: while it is outstanding, the run's next
            # deltas coalesce into one record (docs/architecture.md, "Coalesced token records").
            sent = await self._tokens_topic.send(
                key=event["request_id"].encode(), value=codec().encode("TokenEvent", event)
            )
            await sent
        finally:
            self._sending -= 1
            if not self._sending:
                self._sent.set()

    # -- ownership (rebalance)

    def _hold_after_freeze(self) -> None:
        """Hold every emit: the group gave our partitions away while we were stopped, and the
        runs (and queued jobs, whose STARTED waits here before any upstream call) learn which
        moved at the next assignment. Should the membership have survived after all, nothing
        comes: open again after a session timeout."""
        log.warning("woke from a freeze: emits held until the group assigns partitions again")
        self._open.clear()
        if self._reopen is not None:
            self._reopen.cancel()
        self._membership_lost = True
        loop = asyncio.get_running_loop()
        self._reopen = loop.call_later(self.settings.session_timeout_s, self._membership_kept)

    def _membership_kept(self) -> None:
        """No rebalance came within a session timeout of the wake: the group kept us."""
        self._reopen = None
        self._membership_lost = False
        self._open.set()

    def on_assigned(self, partitions: set[int]) -> None:
        """Called once the table's partitions are recovered: release what moved away, go on
        with what stayed, resume what was in flight in the partitions that came to us."""
        self._generation += 1
        self.entries.owned = set(partitions)
        if self._reopen is not None:
            self._reopen.cancel()
            self._reopen = None
        here = (self._engine.request_ids() if self._engine else set()) | set(self._waiting)
        lost, self._membership_lost = self._membership_lost, False
        self._moved = {rid for rid in here if lost or not self.entries.owns(rid.encode())}
        self._open.set()
        if self._moved:
            self._release_task = asyncio.ensure_future(self._release_moved(set(self._moved)))
        # One limit across processes: this worker's share of the upstream follows its share
        # of the partitions (docs/architecture.md, "Rate limits and adaptive concurrency").
        self.upstream.set_share(len(partitions), self.settings.work_partitions)
        snapshot = self.entries.owned_entries()
        log.info(
            "inflight partitions assigned",
            extra={
                "partitions": sorted(partitions),
                "entries": len(snapshot),
                "kept_running": len(here) - len(self._moved),
                "released": len(self._moved),
            },
        )
        if self._resume_task is not None:
            self._resume_task.cancel()
        # Marked before the agents resume, so a replayed job is left to the resume.
        self._resuming = {k.decode() for k, e in snapshot if e.unfinished}
        self._boundaries.clear()
        self._resume_task = asyncio.ensure_future(
            self._resume(snapshot, self._generation, partitions)
        )

    async def on_revoked(self) -> None:
        """Hold every job's emits until the next assignment says which partitions stay.

        Kafka's eager rebalancing revokes all partitions of a member at once, but Faust's
        assignor is sticky: most come back. So the runs go on (their upstream streams stay
        open) while nothing they emit reaches `tokens`; ``on_assigned`` releases the ones whose
        partition moved and lets the rest go on, so a rebalance costs no upstream call for an
        untouched partition (docs/architecture.md, "Rebalances").
        """
        if self._reopen is not None:
            # The rebalance a freeze announced: its assignment opens the gate, not the timer.
            self._reopen.cancel()
            self._reopen = None
        if not self.entries.owned and not self._waiting:
            return  # nothing can be running: jobs only start in owned partitions
        self._generation += 1
        self.entries.owned = set()
        self._open.clear()
        await self._stop_resuming()
        # Whatever was emitted before the hold reaches `tokens` before a new owner reads it.
        await self._sent.wait()
        await self.app.producer.flush()

    async def _release_moved(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._durable.pop(rid, None)
            fut = self._waiting.get(rid)
            if fut is not None:
                fut.cancel()
        if self._engine is not None:
            await self._send_unbilled(await self._engine.release(request_ids))
        # Released from a partition we own (after a freeze): the resume runs them again.
        self._moved -= {rid for rid in request_ids if self.entries.owns(rid.encode())}
        log.info("released requests whose partition moved", extra={"count": len(request_ids)})

    async def _stop_resuming(self) -> None:
        if self._resume_task is not None:
            self._resume_task.cancel()
            with suppress(asyncio.CancelledError):
                await self._resume_task
            self._resume_task = None
        self._resuming.clear()
        self._replay_until = {}
        self._boundaries.set()  # release an agent waiting for them; unknown ones fall back

    async def _release_all(self) -> None:
        await self._stop_resuming()
        # Held emits are refused, not sent: the next owner resumes these requests.
        self._moved = (self._engine.request_ids() if self._engine else set()) | set(self._waiting)
        self._open.set()
        for fut in list(self._waiting.values()):
            fut.cancel()
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await self._send_unbilled(await engine.stop())

    async def _send_unbilled(self, usage_events: list[TokenEvent]) -> None:
        """Write the USAGE events of released runs (docs/architecture.md, "Billing a resumed
        stream"). Outside the seq stream, so past the emit gate: the partition may be another
        worker's already, and they write no seq. Best effort: one that fails stays unbilled."""
        for event in usage_events:
            try:
                sent = await self._tokens_topic.send(
                    key=event["request_id"].encode(), value=codec().encode("TokenEvent", event)
                )
                await asyncio.wait_for(sent, self.settings.session_timeout_s)
            except Exception as exc:
                log.warning(
                    "unpublished usage not written: %r",
                    exc,
                    extra={"request_id": event["request_id"]},
                )

    async def _on_finished(self, request_id: str) -> None:
        self._durable.pop(request_id, None)
        self.entries.put(request_id.encode(), done(now_ms()))

    def purge_done(self) -> int:
        """Delete old done markers, and cancels whose job never came (they only skip replays)."""
        return self.entries.purge(now_ms() - self._retention_ms)

    # -- the agents

    async def on_job(self, event: EventT[Any]) -> None:
        """One record of `preprocessed`."""
        job = await self._decode_job(event)
        if job is None:
            return
        request_id = job["request_id"]
        key = request_id.encode()
        entry = self.entries.get(key)
        action = on_job(entry, handled_here=self._handled(request_id))
        if action is JobAction.ADMIT:
            await self._admit(event, job, key)
            RECORDS_PROCESSED.labels(stage="inference", outcome="ok").inc()
        elif action is JobAction.END_CANCELLED:
            # Cancelled before the job reached us: end the stream without a model call.
            await self._emit(cancelled_event(job, seq=1, reason="client", state=None))
            self.entries.put(key, done(now_ms()))
            RECORDS_PROCESSED.labels(stage="inference", outcome="cancelled").inc()
        elif action is JobAction.RESUME and entry is not None:
            # In the table but running nowhere (an earlier attempt at this record failed).
            await self._resume_one(key, entry, self._generation)
        else:
            # A replay of a job that is running, being resumed, or finished.
            RECORDS_PROCESSED.labels(stage="inference", outcome="duplicate").inc()

    async def _decode_job(self, event: EventT[Any]) -> InferenceJob | None:
        """The record's job; None when it is dead-lettered (and, if it names a request, ended)."""
        message = event.message
        origin = Origin(message.topic, message.partition, message.offset)
        record: Mapping[str, object] = {}
        try:
            record = await self._decode(message.value)
            job = validate_job(record)
            if sealing.is_forgotten(job, "InferenceJob"):
                # Its user was forgotten while it waited: its end, and no call on "[forgotten]".
                await self._emit(invalid_job_event(job, "the request's text was forgotten"))
                return None
            return job
        except (CodecError, ValidationError) as exc:
            await self._dlq.publish(
                key=message.key, value=message.value, exc=exc, stage="inference", origin=origin
            )
            RECORDS_PROCESSED.labels(stage="inference", outcome="dead_letter").inc()
            if isinstance(exc, ValidationError) and str(record.get("request_id") or "").strip():
                await self._emit(invalid_job_event(record, str(exc)))
            return None

    async def _decode(self, value: bytes | None) -> dict[str, Any]:
        if self.keys is None:
            return codec().decode_as(value, "InferenceJob")
        return await self.keys.decode(value, "InferenceJob")

    async def _admit(self, event: EventT[Any], job: InferenceJob, key: bytes) -> None:
        # Durable first: once the engine emits, a crash must leave this entry for the next
        # owner to resume (a replay without it would start the stream again at seq 1).
        fresh = Entry(EntryState.RUNNING, now_ms(), bytes(event.message.value or b""))
        replay = await self._maybe_replayed(event)
        if replay:
            await self.entries.put_acked(key, fresh)
            # Maybe a finished request whose done marker is gone (purged, or a new group
            # replaying the log): let its stream in `tokens` decide: skip, go on or start.
            await self._resume_one(key, fresh, self._generation)
            return
        # The agent goes on to the next job at once; the run's first emit waits for the entry
        # instead (after the model's first token, so it is long there), and Faust flushes the
        # producer before it commits this record's offset (docs/architecture.md, "The stages").
        self._durable[job["request_id"]] = self.entries.put_soon(key, fresh)
        try:
            await self._submit(job, None)
        except BaseException:
            self._durable.pop(job["request_id"], None)
            raise

    async def _maybe_replayed(self, event: EventT[Any]) -> bool:
        """Could another consumer already have run this job? Only records of the backlog found
        at assignment can be replays; anything newer arrived while we owned the partition."""
        await self._boundaries.wait()
        message = event.message
        bound = self._replay_until.get(message.partition)
        if bound is not None:
            return bool(message.offset < bound)
        written = timestamp_ms(event)  # boundary unknown: fall back to the record's age
        return written is not None and now_ms() - written > self._retention_ms

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
            (self._engine is not None and self._engine.is_active(request_id))
            or request_id in self._waiting
            or request_id in self._resuming
        )

    async def _submit(self, job: InferenceJob, resume: ResumeState | None) -> None:
        request_id = job["request_id"]
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
            control = validate_control(codec().decode_as(message.value, "ControlEvent"))
        except (CodecError, ValidationError) as exc:
            await self._dlq.publish(
                key=message.key, value=message.value, exc=exc, stage="control", origin=origin
            )
            return
        request_id = control["request_id"]
        reason = control.get("reason") or "client"
        # The engine knows queued, running and submitting jobs (and remembers a cancel that
        # comes first in memory); the table keeps the cancel across a rebalance or a crash.
        if await self.engine.cancel(request_id, reason):
            log.info("cancelled", extra={"request_id": request_id, "reason": reason})
            return
        key = request_id.encode()
        update = on_cancel(self.entries.get(key), now_ms())
        if update is not None:
            self.entries.put(key, update)
        log.info(
            "cancel recorded for a job not running here",
            extra={"request_id": request_id, "reason": reason},
        )

    # -- resume after a rebalance or a crash

    async def _resume(
        self, snapshot: list[tuple[bytes, Entry]], generation: int, partitions: set[int]
    ) -> None:
        if self._release_task is not None:
            # Released runs of partitions we own again (after a freeze) resume from `tokens`.
            with suppress(Exception):
                await asyncio.shield(self._release_task)
        await self._load_boundaries(partitions)
        gate = asyncio.Semaphore(RESUME_CONCURRENCY)

        async def one(key: bytes, entry: Entry) -> None:
            async with gate:
                if generation == self._generation:
                    await self._resume_one(key, entry, generation)
                    self._resuming.discard(key.decode())

        pending = [(k, e) for k, e in snapshot if e.unfinished]
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
            job = validate_job(await self._decode(entry.job))
        except (CodecError, ValidationError) as exc:
            # Written by a version whose schema this one does not know: it can never run here.
            log.error(
                "in-flight job unreadable", extra={"request_id": request_id, "error": str(exc)}
            )
            await self._emit(invalid_job_event({"request_id": request_id}, str(exc)))
            self.entries.put(key, done(now_ms()))
            return
        events = await self._stream_so_far(request_id)
        if generation != self._generation:
            return
        action = on_resume(
            self.entries.get(key), stream_ended=any(e["kind"] in TERMINAL_KINDS for e in events)
        )
        state = resume_state(events)
        if action is ResumeAction.MARK_DONE:
            log.info("request already ended; not run again", extra={"request_id": request_id})
            self.entries.put(key, done(now_ms()))
        elif action is ResumeAction.END_CANCELLED:
            seq = state.last_seq + 1 if state else 1
            await self._emit(cancelled_event(job, seq=seq, reason="client", state=state))
            self.entries.put(key, done(now_ms()))
        elif action is ResumeAction.CONTINUE:
            log.info(
                "resuming request",
                extra={"request_id": request_id, "last_seq": state.last_seq if state else 0},
            )
            await self._submit(job, state)

    async def _stream_so_far(self, request_id: str) -> list[TokenEvent]:
        """The request's events in `tokens`, up to its terminal event if it has one."""
        return [
            cast(TokenEvent, e)
            async for e in read_request_records(
                ConnectionConfig.from_settings(self.settings),
                self.topics.tokens,
                request_id,
                schema="TokenEvent",
                stop_at_terminal=True,
            )
        ]
