"""Preprocess stage (requests -> preprocessed): validate, normalise, apply the tier, prompt.

``prepare`` is the pure heart of the stage; ``PreprocessStage`` wires it to the topics. A request
that is turned away here still ends for its client: the stage writes a terminal ERROR TokenEvent
(seq 1) so postprocess writes a REJECTED result and the gateway closes the stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from pipeline.core import events, sealing
from pipeline.core.codec import codec
from pipeline.core.errors import CodecError, ValidationError
from pipeline.core.metrics import RECORDS_PROCESSED
from pipeline.core.producers import Headers
from pipeline.core.records import ChunkSummary, InferenceJob, SummarizeRequest
from pipeline.core.settings import WorkerSettings
from pipeline.core.tiers import Tier
from pipeline.memory.history import HistoryTable
from pipeline.memory.keystore import DataKeyTable
from pipeline.memory.store import PreferencesTable
from pipeline.worker.admission import TopicAdmission
from pipeline.worker.dlq import DeadLetterQueue, Origin, error_type
from pipeline.worker.identity import IdentityError, RequestIdentity
from pipeline.worker.longdoc.count import Count, counted
from pipeline.worker.longdoc.split import LongJob, plan_ahead
from pipeline.worker.memory.history import split_input, with_history
from pipeline.worker.memory.preferences import with_preferences
from pipeline.worker.memory.sessions import Sessions, conversation
from pipeline.worker.prepare import (
    Rejection,
    prepare,
    rejected,
    rejection_event,
    validate_request,
)

log = logging.getLogger("sumstream.preprocess")

Send = Callable[[bytes, bytes], Awaitable[None]]
# Reads the chunk summaries kept under a reuse key (pipeline/worker/longdoc/agent.py).
ReuseReader = Callable[[str], Awaitable[list[ChunkSummary]]]

STAGE = "preprocess"
# Records larger than this are prepared on a thread (a long document takes ~1 ms per 1k tokens).
PREPARE_IN_THREAD_BYTES = 64 * 1024
# A long document in a record larger than this (~150k tokens) has its plan sent from its raw
# count before it is prepared, so the client has it within ~300 ms of `accepted`.
PLAN_AHEAD_BYTES = 1_000_000


class PreprocessStage:
    """Consumes SummarizeRequest records; produces InferenceJobs or terminal rejections."""

    def __init__(
        self,
        settings: WorkerSettings,
        tiers: Mapping[str, Tier],
        *,
        send_job: Send,
        send_token: Send,
        dlq: DeadLetterQueue,
        identity: RequestIdentity | None = None,
        admission: TopicAdmission | None = None,
        send_chunk: Send | None = None,
        reuse: ReuseReader | None = None,
        count: Count | None = None,
        preferences: PreferencesTable | None = None,
        sessions: Sessions | None = None,
        history: HistoryTable | None = None,
        keys: DataKeyTable | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.tiers = tiers
        # None only in tests of the stage's own logic; the worker always checks both.
        self.identity = identity
        self.admission = admission
        self.preferences = preferences
        self.sessions = sessions
        self.history = history
        # Requests are opened with, and jobs sealed with, the user's data key ("Forgetting");
        # None only in tests of the stage's own logic.
        self.keys = keys
        self._send_job = send_job
        self._send_token = send_token
        self._send_chunk = send_chunk
        self._reuse = reuse
        self._count = count
        self._dlq = dlq
        self._clock = clock
        # One big document prepared at a time: each holds the GIL for its whole split, and
        # several at once left the event loop (every stream of this worker) a sixth of it.
        self._cpu = asyncio.Semaphore(1)
        # The agent handles several records at once, but an id belongs to its *first* record
        # in the partition (docs/architecture.md, "Identity"): records are decoded and their
        # ids claimed one at a time, in the order the agent took them (the lock is FIFO).
        self._in_order = asyncio.Lock()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def _decode(self, value: bytes | None) -> dict[str, Any]:
        if self.keys is None:
            return codec().decode_as(value, "SummarizeRequest")
        return await self.keys.decode(value, "SummarizeRequest")

    async def handle(
        self,
        key: bytes | None,
        value: bytes | None,
        origin: Origin,
        timestamp_ms: int | None,
        headers: Headers | None = None,
    ) -> None:
        """Process one record of `requests`; never raises for a bad record (it is dead-lettered)."""
        now = self._now_ms()
        try:
            async with self._in_order:
                # The codec checked the record's shape against the schema; prepare checks values.
                request = cast(SummarizeRequest, await self._decode(value))
                vouched = None
                if self.identity is not None and value is not None:
                    validate_request(request)
                    vouched = await self.identity.check(request, value, origin, headers)
                    request = vouched.request
            big = len(value or b"") > PREPARE_IN_THREAD_BYTES
            planned = len(value or b"") > PLAN_AHEAD_BYTES and await self._plan_ahead(
                request, now, timestamp_ms
            )
            if sealing.is_forgotten(request, "SummarizeRequest"):
                # Its user was forgotten while it waited: the text is gone, so is the request.
                outcome: InferenceJob | LongJob | Rejection = rejected(
                    "request_forgotten", "the request's text was forgotten at its user's request"
                )
            else:
                outcome = await self._prepare(request, now, timestamp_ms, big)
        except IdentityError as exc:
            await self._refuse(key, value, origin, request, exc, now, timestamp_ms)
            return
        except (CodecError, ValidationError) as exc:
            await self._dlq.publish(key=key, value=value, exc=exc, stage=STAGE, origin=origin)
            RECORDS_PROCESSED.labels(stage=STAGE, outcome="dead_letter").inc()
            return
        if isinstance(outcome, LongJob):
            outcome = await self._long_with_memory(outcome, request, headers)
            if self._count is not None:
                outcome = await counted(outcome, request, self._count, self.tiers, self.settings)
        elif not isinstance(outcome, Rejection):
            outcome = await self._with_memory(outcome, request, headers)
        if self.keys is not None and not isinstance(outcome, Rejection):
            # A request another system wrote in plain text gets a key here: its copies
            # downstream are sealed (the record on `requests` stays as it was written).
            await self.keys.key_for(request["user_id"])
        if big:
            # Sealing a big job costs milliseconds (docs/architecture.md, "Forgetting").
            outcome, values = await asyncio.to_thread(self._encode_outcome, outcome)
        else:
            outcome, values = self._encode_outcome(outcome)
        if not isinstance(outcome, Rejection) and self.admission and vouched:
            # After the size check: an oversized job reserves nothing.
            reserved = outcome.final if isinstance(outcome, LongJob) else outcome
            cost = outcome.plan.cost_micro_usd if isinstance(outcome, LongJob) else None
            refused = await self.admission.refusal(reserved, vouched.producer, plan_cost=cost)
            outcome = rejected(*refused) if refused else outcome
        if isinstance(outcome, Rejection):
            if outcome.dead_letter:
                await self._dlq.publish(
                    key=key,
                    value=value,
                    exc=ValidationError(f"{outcome.code}: {outcome.message}"),
                    stage=STAGE,
                    origin=origin,
                )
            await self._reject(request, outcome, now_ms=now, enqueued_ms=timestamp_ms)
            return
        if isinstance(outcome, LongJob):
            await self._send_long(outcome, values, planned=planned)
            return
        await self._send_job(request["request_id"].encode(), values[0])
        # Stage latencies are observed once per request by postprocess, from the trace.
        RECORDS_PROCESSED.labels(stage=STAGE, outcome="ok").inc()
        log.info(
            "request prepared",
            extra={
                "request_id": request["request_id"],
                "tier": outcome["tier"],
                "input_tokens_estimate": outcome["input_tokens_estimate"],
                "chunks": len(outcome["chunks"]),
                "truncated": outcome["truncated"],
            },
        )

    def _encode_outcome(
        self, outcome: InferenceJob | LongJob | Rejection
    ) -> tuple[InferenceJob | LongJob | Rejection, list[bytes]]:
        """The records to produce (the job, or a long document's map jobs), or the rejection
        of one that does not fit a record."""
        if isinstance(outcome, Rejection):
            return outcome, []
        jobs = outcome.maps if isinstance(outcome, LongJob) else [outcome]
        encoded = [self._encoded(job) for job in jobs]
        refusal = next((e for e in encoded if isinstance(e, Rejection)), None)
        if refusal is not None:
            return refusal, []
        return outcome, [e for e in encoded if isinstance(e, bytes)]

    async def _plan_ahead(
        self, request: SummarizeRequest, now: int, enqueued_ms: int | None
    ) -> bool:
        """Send a big long document's plan before preparing it; whether it was sent."""
        if request.get("session_of"):
            return False  # a follow-up's document is the session's
        created_at = int(request.get("created_at") or 0) or enqueued_ms or now
        async with self._cpu:
            event = await asyncio.to_thread(
                plan_ahead, request, self.tiers, self.settings, created_at=created_at
            )
        if event is None:
            return False
        await self._send_token(request["request_id"].encode(), codec().encode("TokenEvent", event))
        return True

    async def _send_long(self, long: LongJob, maps: list[bytes], *, planned: bool) -> None:
        """A long document: its PLAN record first (the reduce step's state starts there), the
        plan's ``progress`` event (unless ``planned`` ahead), then every map job keyed by its
        own id, so the calls spread over the partitions (docs/architecture.md, "Long
        documents")."""
        parent = long.final["request_id"]
        if self._send_chunk is None:
            raise RuntimeError("a long document needs the chunks topic")
        await self._send_chunk(parent.encode(), codec().encode("ChunkSummary", long.plan_record))
        if not planned:
            await self._send_token(parent.encode(), codec().encode("TokenEvent", long.progress))
        reused = await self._reused(long)
        for index, (job, value) in enumerate(zip(long.maps, maps, strict=True)):
            if index in reused:
                # The same user's same document, summarized within the window: no call.
                kept: ChunkSummary = {
                    **reused[index],
                    "request_id": parent,
                    "usage": events.usage(input_tokens=0, output_tokens=0, attempts=0),
                }
                await self._send_chunk(parent.encode(), codec().encode("ChunkSummary", kept))
            else:
                await self._send_job(job["request_id"].encode(), value)
        RECORDS_PROCESSED.labels(stage=STAGE, outcome="ok").inc()
        log.info(
            "long document planned",
            extra={
                "request_id": parent,
                "tier": long.final["tier"],
                "chunks": long.plan.chunks,
                "levels": len(long.plan.levels),
                "input_tokens_estimate": long.plan.input_tokens,
                "reused_chunks": len(reused),
            },
        )

    async def _reused(self, long: LongJob) -> dict[int, ChunkSummary]:
        """Map summaries kept for this user's same document within the window, by index."""
        if self._reuse is None:
            return {}
        try:
            kept = await self._reuse(long.reuse_key)
        except Exception as exc:
            # Reuse saves money; it never stops a request.
            log.warning("chunk summaries not read for reuse", extra={"error": repr(exc)})
            return {}
        return {
            r["index"]: r
            for r in kept
            if r["kind"] == "SUMMARY" and r["level"] == 0 and 0 <= r["index"] < len(long.maps)
        }

    async def _prepare(
        self, request: SummarizeRequest, now: int, enqueued_ms: int | None, big: bool
    ) -> InferenceJob | LongJob | Rejection:
        """``prepare``, or for a follow-up: the session's document and turns around it."""
        tier = self.tiers.get(request.get("tier") or "")
        session_id = request.get("session_of")
        if not session_id or self.sessions is None or tier is None:
            prepared = functools.partial(
                prepare, request, self.tiers, self.settings, now_ms=now, enqueued_ms=enqueued_ms
            )
            # A big document is normalised, counted and split on a thread, so the streams this
            # worker is running keep their pace meanwhile.
            if not big:
                return prepared()
            async with self._cpu:
                return await asyncio.to_thread(prepared)
        forgotten_at = self.preferences.forgotten_at(request["user_id"]) if self.preferences else 0
        found = await self.sessions.follow_up(request, tier, now, forgotten_at=forgotten_at)
        if isinstance(found, Rejection):
            return found
        expanded, session = found
        job = prepare(expanded, self.tiers, self.settings, now_ms=now, enqueued_ms=enqueued_ms)
        if isinstance(job, Rejection):
            return job
        if isinstance(job, LongJob) or job["chunks"]:
            return rejected(
                "session_unavailable", "the document is too long to hold a conversation about"
            )
        return conversation(job, session, session_id)

    async def _with_memory(
        self, job: InferenceJob, request: SummarizeRequest, headers: Headers | None
    ) -> InferenceJob:
        """The user's preferences and history (looked up by the job's user), then the split."""
        forgotten_at = 0
        if self.preferences is not None:
            job = await with_preferences(job, self.preferences, headers)
            forgotten_at = self.preferences.forgotten_at(job["user_id"])
        tier = self.tiers.get(job["tier"])
        if tier is not None:
            job = with_history(job, request, self.history, tier, forgotten_at=forgotten_at)
        return split_input(job)

    async def _long_with_memory(
        self, long: LongJob, request: SummarizeRequest, headers: Headers | None
    ) -> LongJob:
        """A long document takes the user's memory in its final reduce, whose text the user
        reads (the chunk summaries are the model's own notes); the plan record carries it."""
        final = await self._with_memory(long.final, request, headers)
        plan_record: ChunkSummary = {
            **long.plan_record,
            "job": codec().encode("InferenceJob", final),
        }
        return dataclasses.replace(long, final=final, plan_record=plan_record)

    def _encoded(self, job: InferenceJob) -> bytes | Rejection:
        """The job's record, or a rejection when it would not fit one: measured, not estimated,
        since normalisation can triple a document's UTF-8 size and a job the producer refuses
        would leave its client waiting (docs/architecture.md, "Record sizes")."""
        job["trace"]["preprocess_end"] = self._now_ms()
        value = codec().encode("InferenceJob", job, sealed_for=job["user_id"])
        if len(value) > self.settings.max_record_bytes:
            return rejected(
                "input_too_large",
                f"the prepared request is {len(value)} bytes; records are limited to "
                f"{self.settings.max_record_bytes}",
            )
        return value

    async def abandon(self, value: bytes | None, exc: BaseException) -> None:
        """End the stream of a request the stage gave up on (dead-lettered after retries), so
        its client gets ``error`` + ``done``; nothing of it was streamed yet."""
        try:
            request = cast(SummarizeRequest, codec().decode_as(value, "SummarizeRequest"))
            validate_request(request)
        except (CodecError, ValidationError):
            return  # no request id to answer
        # The error type only: the client sees this message, the operator has the dead letter.
        rejection = rejected(
            "preprocess_failed",
            f"the request could not be prepared ({error_type(exc)}); it is kept in the "
            "dead-letter topic",
        )
        await self._reject(request, rejection, now_ms=self._now_ms(), enqueued_ms=None)

    async def _reject(
        self,
        request: SummarizeRequest,
        rejection: Rejection,
        *,
        now_ms: int,
        enqueued_ms: int | None,
    ) -> None:
        """End a turned-away request's stream, and count and log it."""
        await self._end_stream(request, rejection, now_ms=now_ms, enqueued_ms=enqueued_ms)
        RECORDS_PROCESSED.labels(stage=STAGE, outcome="rejected").inc()
        log.info(
            "request rejected",
            extra={
                "request_id": request["request_id"],
                "code": rejection.code,
                "reason": rejection.message,
            },
        )

    async def _end_stream(
        self,
        request: SummarizeRequest,
        rejection: Rejection,
        *,
        now_ms: int,
        enqueued_ms: int | None,
    ) -> None:
        """Write the terminal ERROR (seq 1) that ends a turned-away request's stream."""
        event = rejection_event(
            request,
            rejection,
            model=self.settings.default_model,
            now_ms=now_ms,
            enqueued_ms=enqueued_ms,
        )
        event["trace"]["preprocess_end"] = self._now_ms()
        await self._send_token(request["request_id"].encode(), codec().encode("TokenEvent", event))

    async def _refuse(
        self,
        key: bytes | None,
        value: bytes | None,
        origin: Origin,
        request: SummarizeRequest,
        exc: IdentityError,
        now: int,
        timestamp_ms: int | None,
    ) -> None:
        """Dead-letter a record refused for its identity; end its stream if the id is its own
        (a record reusing another request's id must leave that request alone)."""
        await self._dlq.publish(key=key, value=value, exc=exc, stage=STAGE, origin=origin)
        if exc.ends_stream:
            rejection = rejected(exc.code, str(exc))
            await self._end_stream(request, rejection, now_ms=now, enqueued_ms=timestamp_ms)
        RECORDS_PROCESSED.labels(stage=STAGE, outcome="refused").inc()
        log.warning(
            "request refused",
            extra={"request_id": request["request_id"], "code": exc.code, "reason": str(exc)},
        )
