"""Postprocess stage (tokens -> results): assemble, finalise, price, and time each request.

The pure parts (``assemble``, ``result_status``, ``latency_breakdown``, ``build_result``) are what
the stage is; ``PostprocessStage`` adds the bounded in-memory assembly and the topic wiring.
Postprocess is the only writer of `results`.

Every value of a result is derived from records in the log (the terminal event's own Kafka
timestamp stands for the result time), so re-processing a replayed terminal event produces
the same result again, never a different one (`results` is compacted by request id).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import cast

from ulid import ULID

from pipeline.core import events as token_events
from pipeline.core.codec import codec
from pipeline.core.errors import CodecError, ValidationError
from pipeline.core.longdoc import parse_chunk_id
from pipeline.core.metrics import (
    COST_MICRO_USD,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    RECORDS_PROCESSED,
    REQUESTS_COMPLETED,
    STAGE_SECONDS,
)
from pipeline.core.partitioning import partition_for
from pipeline.core.pricing import PriceTable
from pipeline.core.records import TERMINAL_KINDS, SummaryResult, TokenEvent
from pipeline.core.results import build_result
from pipeline.core.settings import WorkerSettings
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.tail import read_request_records
from pipeline.memory.keystore import DataKeyTable
from pipeline.worker.dlq import DeadLetterQueue, Origin
from pipeline.worker.longdoc.records import chunk_summary

log = logging.getLogger("sumstream.postprocess")

STAGE = "postprocess"
REREAD_ATTEMPTS = 3
REREAD_BACKOFF_S = 0.5


@dataclass(frozen=True, slots=True)
class Assembly:
    """A request's stream put back together: the text so far and whether any seq is missing."""

    text: str
    complete: bool
    last_seq: int


def assemble(events: Iterable[TokenEvent], upto_seq: int | None = None) -> Assembly:
    """Join the DELTA texts in seq order; a DELTA may cover a range of seqs, and a seq seen
    twice (a redelivered record) counts once.

    ``complete`` is true when every seq from 1 to ``upto_seq`` (default: the highest seen) is
    present, i.e. nothing was consumed by another instance or lost to a restart.
    """
    events = list(events)
    texts = token_events.delta_texts(events)
    seen = set(texts)
    seen.update(int(event["seq"]) for event in events)
    last = upto_seq if upto_seq is not None else max(seen, default=0)
    text = "".join(texts[s] for s in sorted(texts) if s <= last)
    complete = all(s in seen for s in range(1, last + 1))
    return Assembly(text=text, complete=complete, last_seq=last)


def validate_event(record: Mapping[str, object]) -> TokenEvent:
    """The decoded record as a TokenEvent; ``ValidationError`` if no request can be assembled
    from it."""
    if not str(record.get("request_id") or "").strip():
        raise ValidationError("request_id is empty")
    seq = record.get("seq", 0)
    if not isinstance(seq, int) or seq < 1:
        raise ValidationError(f"seq must be at least 1, got {seq}")
    problem = token_events.range_error(record)
    if problem is not None:
        raise ValidationError(problem)
    # The codec checked every field's type against the schema; the values are checked above.
    return cast(TokenEvent, record)


def validate_usage_event(record: Mapping[str, object]) -> TokenEvent:
    """A USAGE record as a TokenEvent; ``ValidationError`` if it cannot be billed."""
    if not str(record.get("request_id") or "").strip():
        raise ValidationError("request_id is empty")
    if not record.get("usage"):
        raise ValidationError("a USAGE event carries a usage")
    if not str(record.get("text") or ""):
        raise ValidationError("a USAGE event carries its id in text")
    return cast(TokenEvent, record)


Send = Callable[[bytes, bytes], Awaitable[None]]
# Re-reads every TokenEvent of one request from `tokens`: (request_id, created_at ms) -> events.
Reread = Callable[[str, int], Awaitable[list[TokenEvent]]]


def tail_reread(connection: ConnectionConfig, topic: str) -> Reread:
    """A ``Reread`` that reads the request's partition of ``topic`` with pipeline/kafka/tail.py."""

    async def reread(request_id: str, created_at: int) -> list[TokenEvent]:
        try:
            ULID.from_str(request_id)
            since: int | None = None  # tail positions by the time inside the id
        except ValueError:
            since = created_at or None
        return [
            cast(TokenEvent, record)
            async for record in read_request_records(
                connection, topic, request_id, schema="TokenEvent", since_ms=since
            )
        ]

    return reread


class PostprocessStage:
    """Consumes TokenEvents; on each terminal event produces the request's SummaryResult."""

    def __init__(
        self,
        settings: WorkerSettings,
        prices: PriceTable,
        *,
        send_result: Send,
        dlq: DeadLetterQueue,
        reread: Reread,
        send_chunk: Send | None = None,
        keys: DataKeyTable | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        # Deltas are opened, and the summary sealed, with the user's data key ("Forgetting").
        self.keys = keys
        self._send_chunk = send_chunk
        self.prices = prices
        self._send_result = send_result
        self._dlq = dlq
        self._reread = reread
        self._clock = clock
        # request_id -> events seen so far (by seq). Bounded: the least recently active
        # request is dropped first, and its terminal event then re-reads the stream from `tokens`.
        self._open: OrderedDict[str, dict[int, TokenEvent]] = OrderedDict()
        # Recently finished ids: a replayed or duplicate terminal is not finalised twice.
        self._finished: OrderedDict[str, None] = OrderedDict()
        # USAGE events of streams under way here, by request and by their id: billed at the end.
        self._usages: dict[str, dict[str, TokenEvent]] = {}

    @property
    def open_requests(self) -> int:
        return len(self._open)

    async def handle(
        self, key: bytes | None, value: bytes | None, origin: Origin, timestamp_ms: int | None
    ) -> None:
        """Process one record of `tokens`; never raises for a bad record (it is dead-lettered)."""
        try:
            if self.keys is None:
                decoded = codec().decode_as(value, "TokenEvent")
            else:
                decoded = await self.keys.decode(value, "TokenEvent")
            if decoded.get("kind") == "PROGRESS":
                # A long document's plan or progress: for its client, nothing to assemble.
                RECORDS_PROCESSED.labels(stage=STAGE, outcome="progress").inc()
                return
            if decoded.get("kind") == "USAGE":
                usage_event = validate_usage_event(decoded)
            else:
                event = validate_event(decoded)
        except (CodecError, ValidationError) as exc:
            await self._dlq.publish(key=key, value=value, exc=exc, stage=STAGE, origin=origin)
            RECORDS_PROCESSED.labels(stage=STAGE, outcome="dead_letter").inc()
            return
        if decoded.get("kind") == "USAGE":
            await self._on_usage(usage_event)
            return
        request_id = event["request_id"]
        if request_id in self._finished:
            RECORDS_PROCESSED.labels(stage=STAGE, outcome="duplicate").inc()
            return
        if event["kind"] in TERMINAL_KINDS:
            result_ms = timestamp_ms if timestamp_ms is not None else int(self._clock() * 1000)
            usages = self._usages.pop(request_id, {})
            await self._finish(event, self._open.pop(request_id, {}), result_ms, usages)
            return
        self._open_stream(request_id).setdefault(int(event["seq"]), event)

    def on_revoked(self, partitions: set[int]) -> None:
        """Forget the streams under way in ``partitions`` of `tokens`: another instance may
        finish them while we do not own them (a freeze past the session timeout), and an entry
        kept here would wait for an end we never read, holding a USAGE event that came after
        it (chaos seed 11: a result left unamended). An end read later re-reads its stream."""
        count = self.settings.stream_partitions
        for request_id in [r for r in self._open if partition_for(r.encode(), count) in partitions]:
            del self._open[request_id]
            self._usages.pop(request_id, None)

    def _open_stream(self, request_id: str) -> dict[int, TokenEvent]:
        events = self._open.get(request_id)
        if events is None:
            events = self._open[request_id] = {}
            while len(self._open) > self.settings.postprocess_max_open:
                # The least recently active stream: its end re-reads it from `tokens`.
                dropped, _ = self._open.popitem(last=False)
                self._usages.pop(dropped, None)
        else:
            self._open.move_to_end(request_id)
        return events

    async def _on_usage(self, event: TokenEvent) -> None:
        """Upstream work a released run could not publish (docs/architecture.md, "Billing a
        resumed stream"): billed with the stream's end, or by amending a result already out."""
        request_id = event["request_id"]
        RECORDS_PROCESSED.labels(stage=STAGE, outcome="usage").inc()
        if request_id not in self._open:
            # Not under way here: maybe finished (here or by another instance). The log says.
            stream = await self._reread_with_retries(request_id, event)
            terminal = next((e for e in stream if e["kind"] in TERMINAL_KINDS), None)
            if terminal is not None:
                by_seq = {int(e["seq"]): e for e in stream if int(e["seq"]) > 0}
                usages = {str(e["text"]): e for e in stream if e["kind"] == "USAGE"}
                usages[str(event["text"])] = event
                await self._finish(terminal, by_seq, int(self._clock() * 1000), usages, amend=True)
                return
        self._open_stream(request_id)
        self._usages.setdefault(request_id, {})[str(event["text"])] = event

    async def _finish(
        self,
        terminal: TokenEvent,
        events: dict[int, TokenEvent],
        result_ms: int,
        usages: dict[str, TokenEvent],
        *,
        amend: bool = False,
    ) -> None:
        started = time.perf_counter()
        request_id = terminal["request_id"]
        events.setdefault(int(terminal["seq"]), terminal)
        assembly = assemble(events.values(), upto_seq=int(terminal["seq"]))
        if not assembly.complete:
            # Part of the stream was consumed before a restart or by another instance.
            reread = await self._reread_with_retries(request_id, terminal)
            assembly = assemble([*reread, *events.values()], upto_seq=int(terminal["seq"]))
            usages.update({str(e["text"]): e for e in reread if e["kind"] == "USAGE"})
            log_at = logging.INFO if assembly.complete else logging.ERROR
            log.log(
                log_at,
                "stream re-read from tokens",
                extra={"request_id": request_id, "complete": assembly.complete},
            )
        if usages:
            # Work released runs received but never published: billed with the rest.
            total = terminal.get("usage")
            for extra in usages.values():
                used = extra.get("usage")
                if used:
                    total = token_events.add_usage(total, used)
            terminal = cast(TokenEvent, {**terminal, "usage": total})
        result = build_result(terminal, assembly.text, self.prices, result_ms=result_ms)
        chunk = parse_chunk_id(request_id)
        if chunk is not None and self._send_chunk is not None:
            # A long document's chunk call: its summary goes to the reduce step, not to
            # `results` (the parent's result bills it; docs/architecture.md, "Long documents").
            record = chunk_summary(result, *chunk)
            await self._send_chunk(chunk[0].encode(), codec().encode("ChunkSummary", record))
            self._finished[request_id] = None
            return
        value = codec().encode("SummaryResult", result, sealed_for=result["user_id"])
        await self._send_result(request_id.encode(), value)
        self._finished[request_id] = None
        while len(self._finished) > self.settings.postprocess_max_open:
            self._finished.popitem(last=False)
        if not amend:  # the counters saw this request once already (they are at least once)
            self._observe(result, time.perf_counter() - started)
        log.info(
            "result amended with unpublished usage" if amend else "result",
            extra={
                "request_id": request_id,
                "status": result["status"],
                "output_tokens": result["usage"]["output_tokens"],
                "cost_micro_usd": result["usage"]["cost_micro_usd"],
            },
        )

    async def _reread_with_retries(self, request_id: str, terminal: TokenEvent) -> list[TokenEvent]:
        for attempt in range(REREAD_ATTEMPTS):
            try:
                return await self._reread(request_id, int(terminal.get("created_at") or 0))
            except Exception as exc:
                log.warning(
                    "re-read failed",
                    extra={"request_id": request_id, "attempt": attempt + 1, "error": repr(exc)},
                )
                await asyncio.sleep(REREAD_BACKOFF_S * 2**attempt)
        # Still write a result (with the text this instance saw) rather than none at all.
        return []

    @staticmethod
    def _observe(result: SummaryResult, seconds: float) -> None:
        tier, model, usage = result["tier"], result["model"], result["usage"]
        RECORDS_PROCESSED.labels(stage=STAGE, outcome="ok").inc()
        REQUESTS_COMPLETED.labels(tier=tier, status=result["status"]).inc()
        INPUT_TOKENS.labels(tier=tier, model=model).inc(usage["input_tokens"])
        OUTPUT_TOKENS.labels(tier=tier, model=model).inc(usage["output_tokens"])
        COST_MICRO_USD.labels(tier=tier, model=model).inc(usage["cost_micro_usd"])
        STAGE_SECONDS.labels(stage="postprocess").observe(seconds)
        for key, ms in result["latency_ms"].items():
            if key != "admission":
                STAGE_SECONDS.labels(stage=key).observe(ms / 1000)
