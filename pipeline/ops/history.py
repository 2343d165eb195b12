"""Reading the topics back by time: the shared reader behind replay, export and `top`.

`pipeline/kafka/tail.py` follows one request live and hands back decoded records; this module
reads windows of whole topics (or one key across every topic) and keeps each record's
coordinates (topic, partition, offset, timestamp), which an audit needs.
"""

from __future__ import annotations

import asyncio
import heapq
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.core.codec import codec
from pipeline.core.errors import SumstreamError, TopicMissingError
from pipeline.core.partitioning import partition_for
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.partition_tail import PartitionTail, partition_ids
from pipeline.kafka.tail import CLOCK_SKEW_MS, id_time_ms

# The order of the pipeline, used to break timestamp ties between topics.
STAGE_ORDER = ("requests", "preprocessed", "tokens", "chunks", "results", "control", "dlq")
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
MISSING_RETRIES = 10
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RELATIVE = re.compile(r"^-?\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)(?:\s+ago)?$")


class HistoryReadError(SumstreamError):
    """A window could not be read to its end (the broker stopped answering)."""

    code = "history_read_failed"
    retriable = True


def now_ms() -> int:
    return int(time.time() * 1000)


def parse_time(text: str, *, now: int | None = None) -> int:
    """Epoch ms from ISO 8601 (naive is UTC), relative ("-15m", "-2h"), "now" or epoch ms."""
    raw = text.strip()
    reference = now_ms() if now is None else now
    if raw.lower() == "now":
        return reference
    if raw.isdigit():
        return int(raw)
    match = _RELATIVE.match(raw.lower())
    if match:
        return reference - int(float(match.group(1)) * _UNITS_MS[match.group(2)])
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use ISO 8601, 'now', or relative like -15m, -2h, -1d)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    # Integer arithmetic: float seconds * 1000 can land a millisecond short.
    return (parsed - EPOCH) // timedelta(milliseconds=1)


def format_time(ms: int) -> str:
    """ISO 8601 in UTC with milliseconds, e.g. ``2025-05-01T12:00:00.123Z``."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@dataclass(frozen=True)
class LoggedRecord:
    """One record as it sits in the log, value still encoded."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None

    def decode(self) -> tuple[str, dict[str, Any]]:
        """(record type, record); raises CodecError for bytes that are not ours."""
        return codec().decode(self.value)


class Progress:
    """A progress line on stderr for long reads: a bar on a terminal, a line every 10 s otherwise.

    Nothing is shown during the first second, so short runs stay quiet.
    """

    def __init__(self, label: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def update(self, done: int, total: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        interval = 0.1 if self.tty else 10.0
        if not force and (now - self._started < 1.0 or now - self._last_draw < interval):
            return
        self._last_draw = now
        self._drawn = True
        share = done / total if total else 1.0
        if self.tty:
            filled = int(share * 30)
            bar = "#" * filled + "-" * (30 - filled)
            self.stream.write(f"\r{self.label} [{bar}] {share:4.0%} {done}/{total} records")
        else:
            self.stream.write(f"{self.label}: {share:.0%} ({done}/{total} records)\n")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()


async def _partitions(
    consumer: AIOKafkaConsumer, topics: Sequence[str], key: bytes | None, missing_ok: bool
) -> list[TopicPartition]:
    existing = await consumer.topics()
    # Metadata lags topic creation by a moment; look again before calling a topic missing.
    for _ in range(MISSING_RETRIES):
        if all(t in existing for t in topics):
            break
        await asyncio.sleep(0.2)
        existing = await consumer.topics()
    missing = [t for t in topics if t not in existing]
    if missing and not missing_ok:
        raise TopicMissingError(f"missing topics: {', '.join(missing)}")
    present = [t for t in topics if t in existing]
    # A fresh consumer tracks no topics; assigning partition 0 (every topic has one) makes
    # the client fetch their metadata, which `consumer.topics()` alone does not keep.
    consumer.assign([TopicPartition(t, 0) for t in present])
    out: list[TopicPartition] = []
    for topic in present:
        partitions = await partition_ids(consumer, topic, attempts=100)
        if key is not None:
            out.append(TopicPartition(topic, partition_for(key, len(partitions))))
        else:
            out.extend(TopicPartition(topic, p) for p in sorted(partitions))
    return out


async def scan(
    connection: ConnectionConfig,
    topics: Sequence[str],
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    key: bytes | None = None,
    follow: bool = False,
    missing_ok: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    stall_timeout_s: float = 30.0,
) -> AsyncIterator[LoggedRecord]:
    """Yield the records of ``topics`` stamped in [since_ms, until_ms], each partition in order.

    Each partition is positioned with ``seek_to_time`` (or at its beginning) and, unless
    ``follow``, read up to its end as of the call (or the first offset past ``until_ms``),
    so records produced meanwhile (a rerun's own) are not read back. With ``key`` only
    that key's partition of each topic is read. Timestamps are the records' own (CreateTime).
    """
    # One function past ~60 lines: positioning, the per-partition stop offsets, progress and the
    # stall check share the same positions, and splitting them would pass all of it around.
    tail = PartitionTail(
        connection, name="history scan", poll_timeout_ms=200, max_records=2000, retry_s=0.2
    )
    try:
        consumer = await tail.open()
        tps = await _partitions(consumer, topics, key, missing_ok)
        if not tps:
            return
        if since_ms is not None:
            end = await tail.assign(tps, since_ms=since_ms)
        else:
            end = await tail.assign(tps, offsets=await consumer.beginning_offsets(tps))
        start = {tp: await consumer.position(tp) for tp in tps}
        stop = dict(end)
        if until_ms is not None and not follow:
            found = await consumer.offsets_for_times(dict.fromkeys(tps, max(0, until_ms + 1)))
            stop = {tp: found[tp].offset if found.get(tp) is not None else end[tp] for tp in tps}
        pending = {tp for tp in tps if follow or start[tp] < stop[tp]}
        if finished := [tp for tp in tps if tp not in pending]:
            consumer.pause(*finished)
        total = sum(max(0, stop[tp] - start[tp]) for tp in tps)
        positions = dict(start)
        moved_at = time.monotonic()
        if not pending:
            return
        async for batch in tail.rounds():
            for tp, messages in batch.items():
                for msg in messages:
                    if not follow and msg.offset >= stop[tp]:
                        break
                    if key is not None and msg.key != key:
                        continue
                    if since_ms is not None and msg.timestamp < since_ms:
                        continue
                    if until_ms is not None and msg.timestamp > until_ms:
                        continue
                    yield LoggedRecord(
                        msg.topic, msg.partition, msg.offset, msg.timestamp, msg.key, msg.value
                    )
            if follow:
                continue
            for tp in list(pending):
                position = await consumer.position(tp)
                if position != positions[tp]:
                    positions[tp] = position
                    moved_at = time.monotonic()
                if position >= stop[tp]:
                    pending.discard(tp)
                    consumer.pause(tp)
            if on_progress is not None:
                done = sum(max(0, min(positions[tp], stop[tp]) - start[tp]) for tp in tps)
                on_progress(done, total)
            if not pending:
                return
            if time.monotonic() - moved_at > stall_timeout_s:
                names = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(pending))
                raise HistoryReadError(f"no progress reading {names} for {stall_timeout_s:.0f} s")
    finally:
        await tail.stop()


def merge_by_time(records: Iterable[LoggedRecord], topics: Sequence[str]) -> list[LoggedRecord]:
    """Interleave records of several partitions by timestamp, keeping each partition's log order.

    Producer clocks differ (two workers around a resume), so a global sort by timestamp could
    reorder one stream; a merge of the per-partition runs cannot. Ties follow the pipeline order.
    """
    rank = {topic: i for i, topic in enumerate(topics)}
    runs: dict[tuple[str, int], list[LoggedRecord]] = {}
    for record in records:
        runs.setdefault((record.topic, record.partition), []).append(record)
    for run in runs.values():
        run.sort(key=lambda r: r.offset)
    return list(
        heapq.merge(*runs.values(), key=lambda r: (r.timestamp_ms, rank.get(r.topic, len(rank))))
    )


def stage_topics(settings: KafkaSettings) -> list[str]:
    """Every topic a request leaves records in, in pipeline order."""
    names = TopicNames.from_settings(settings)
    return [getattr(names, short) for short in STAGE_ORDER]


async def request_history(settings: KafkaSettings, request_id: str) -> list[LoggedRecord]:
    """Every record keyed ``request_id`` in every pipeline topic, in time order.

    Each topic's partition follows from the key; reading starts at the time inside the
    ULID (less the clock skew allowance), or at the beginning for ids minted elsewhere.
    Topics that do not exist are skipped.
    """
    topics = stage_topics(settings)
    born = id_time_ms(request_id)
    since = None if born is None else max(0, born - CLOCK_SKEW_MS)
    found = [
        record
        async for record in scan(
            ConnectionConfig.from_settings(settings),
            topics,
            since_ms=since,
            key=request_id.encode(),
            missing_ok=True,
        )
    ]
    return merge_by_time(found, topics)
