"""The stream hub: tails this instance's partitions of ``tokens`` and ``results`` and fans
each request's events out to its SSE subscribers.

One consumer, manually assigned to the owned partitions, no group, starting at the end at
start-up. Per live request it keeps a bounded buffer of recent events, so a quick reconnect
to the same instance replays from memory. Fan-out never blocks the tail loop: each
subscriber has a bounded queue and is marked ``overflowed`` (then closed by its stream)
when it falls too far behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import TopicPartition

from pipeline.core import events as token_events
from pipeline.core.codec import codec
from pipeline.core.errors import CodecError
from pipeline.core.records import TERMINAL_KINDS
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.partition_tail import PartitionTail

log = logging.getLogger("sumstream.gateway.hub")


ItemKind = Literal["token", "result"]
Item = tuple[ItemKind, dict[str, Any]]


class Subscriber:
    """One client's view of one request: a backlog, then a bounded live queue."""

    def __init__(self, request_id: str, limit: int, backlog: Iterable[Item] = ()) -> None:
        self.request_id = request_id
        self.limit = limit
        self._backlog: deque[Item] = deque(backlog)
        self._live: deque[Item] = deque()
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self.overflowed = False
        self.closed_reason: str | None = None

    def push(self, item: Item) -> bool:
        """Queue ``item`` without waiting; on a full queue mark the subscriber overflowed."""
        if self.overflowed or self.closed_reason is not None:
            return False
        if len(self._live) >= self.limit:
            self.overflowed = True
            self._wake.set()
            return False
        self._live.append(item)
        self._wake.set()
        return True

    async def put(self, item: Item) -> None:
        """Queue ``item``, waiting for room (for feeds that may slow down, like log readers)."""
        while len(self._live) >= self.limit and self.closed_reason is None:
            self._space.clear()
            await self._space.wait()
        if self.closed_reason is None:
            self._live.append(item)
            self._wake.set()

    def close(self, reason: str) -> None:
        """End the subscription; ``get`` returns None once the queue is drained."""
        if self.closed_reason is None:
            self.closed_reason = reason
        self._wake.set()
        self._space.set()

    def ready(self, limit: int) -> list[Item]:
        """Up to ``limit`` items that are queued now, without waiting (none from the live
        queue once overflowed: ``get`` then says so)."""
        items: list[Item] = []
        while self._backlog and len(items) < limit:
            items.append(self._backlog.popleft())
        if self._live and not self.overflowed and len(items) < limit:
            while self._live and len(items) < limit:
                items.append(self._live.popleft())
            self._space.set()
        return items

    async def get(self) -> Item | None:
        """The next item; None when overflowed (at once) or closed (after the queue drains)."""
        while True:
            if self._backlog:
                return self._backlog.popleft()
            if self.overflowed:
                return None
            if self._live:
                item = self._live.popleft()
                self._space.set()
                return item
            if self.closed_reason is not None:
                return None
            self._wake.clear()
            await self._wake.wait()


@dataclass
class RequestStream:
    """What the hub knows of one request accepted here."""

    request_id: str
    events: deque[dict[str, Any]]
    registered_at: float
    truncated: bool = False
    last_seq: int = 0
    first_token_at: float | None = None
    # A long document's latest plan or progress event (seq 0, outside the seq stream): a
    # client that subscribes late still gets it first.
    progress: dict[str, Any] | None = None
    terminal: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    finished_at: float | None = None
    subscribers: set[Subscriber] = field(default_factory=set)


class StreamHub:
    """Registry of live requests and the Kafka tail that feeds them."""

    def __init__(
        self,
        *,
        buffer_events: int = 4_096,
        client_queue_events: int = 1_024,
        max_streams: int = 5_000,
        finished_retention_s: float = 60.0,
        on_result: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.buffer_events = buffer_events
        self.client_queue_events = client_queue_events
        self.max_streams = max_streams
        self.finished_retention_s = finished_retention_s
        self._on_result = on_result
        self._clock = clock
        self.streams: OrderedDict[str, RequestStream] = OrderedDict()
        self._finished: OrderedDict[str, float] = OrderedDict()
        self._waiting: set[str] = set()
        self._last_sweep = 0.0
        self._tail: PartitionTail | None = None
        self.tokens_topic = ""
        self.results_topic = ""
        self.running = False

    # -- registry -----------------------------------------------------------------------------

    def register(self, request_id: str) -> RequestStream:
        """Start buffering ``request_id``'s events; call BEFORE producing the request."""
        stream = self.streams.get(request_id)
        if stream is None:
            stream = RequestStream(request_id, deque(maxlen=self.buffer_events), self._clock())
            self.streams[request_id] = stream
            self._waiting.add(request_id)
            self._evict()
        return stream

    def forget(self, request_id: str) -> None:
        stream = self.streams.get(request_id)
        self._drop(request_id)
        if stream is not None:
            for sub in stream.subscribers:
                sub.close("forgotten")

    def get(self, request_id: str) -> RequestStream | None:
        return self.streams.get(request_id)

    def queued(self) -> int:
        """Requests accepted here that have not streamed a token yet."""
        return len(self._waiting)

    def subscribe(self, request_id: str, after_seq: int = 0) -> Subscriber | None:
        """A subscriber replaying from memory every event after ``after_seq``, then live.

        None when memory cannot guarantee no gap (unknown id, or the buffer dropped events
        the client still needs): the caller reads the log instead.
        """
        stream = self.streams.get(request_id)
        if stream is None:
            return None
        if stream.truncated and (
            not stream.events or token_events.first_seq(stream.events[0]) > after_seq
        ):
            return None
        backlog: list[Item] = [("token", stream.progress)] if stream.progress else []
        backlog += [
            ("token", ev)
            for ev in stream.events
            if ev["seq"] > after_seq and ev["kind"] not in TERMINAL_KINDS
        ]
        if stream.terminal is not None:
            backlog.append(("token", stream.terminal))
        if stream.result is not None:
            backlog.append(("result", stream.result))
        sub = Subscriber(request_id, self.client_queue_events, backlog)
        stream.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        stream = self.streams.get(sub.request_id)
        if stream is not None:
            stream.subscribers.discard(sub)

    def has_subscribers(self, request_id: str) -> bool:
        stream = self.streams.get(request_id)
        return stream is not None and bool(stream.subscribers)

    def _evict(self) -> None:
        # Finished streams leave in the order they finished: amortised O(1) per stream.
        now = self._clock()
        while self._finished:
            rid, finished_at = next(iter(self._finished.items()))
            if now - finished_at <= self.finished_retention_s:
                break
            del self._finished[rid]
            stream = self.streams.get(rid)
            if stream is not None and stream.subscribers:
                self._finished[rid] = now  # still being read; look again later
            elif stream is not None:
                self._drop(rid)
        if len(self.streams) <= self.max_streams:
            return
        # Over the bound: drop finished streams first, then the oldest idle ones. Their
        # clients fall back to the log reader, so nothing is lost but a little latency.
        for rid in [*self._finished, *self.streams]:
            if len(self.streams) <= self.max_streams:
                return
            stream = self.streams.get(rid)
            if stream is not None and not stream.subscribers:
                self._drop(rid)

    def _drop(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
        self._finished.pop(request_id, None)
        self._waiting.discard(request_id)

    # -- fan-out ------------------------------------------------------------------------------

    def dispatch_token(self, event: dict[str, Any]) -> None:
        """Buffer one TokenEvent of a registered request and fan it out."""
        stream = self.streams.get(event["request_id"])
        if stream is None:
            return
        seq = int(event["seq"])
        if event["kind"] == "PROGRESS":
            stream.progress = {"seq": 0, "kind": "PROGRESS", "text": event.get("text", "")}
            self._fan_out(stream, ("token", stream.progress))
            return
        if event["kind"] in TERMINAL_KINDS:
            if stream.terminal is not None:
                return
            stream.terminal = event
        elif seq <= stream.last_seq:
            return  # a duplicate delivery; seq is never reused
        else:
            stream.last_seq = seq
            if event["kind"] == "DELTA" and stream.first_token_at is None:
                stream.first_token_at = self._clock()
                self._waiting.discard(stream.request_id)
            # Streams only need these fields; the buffer keeps nothing else.
            event = {
                "seq": seq,
                "kind": event["kind"],
                "text": event.get("text", ""),
                "first_seq": event.get("first_seq", 0),
                "cuts": event.get("cuts", []),
            }
        if len(stream.events) == stream.events.maxlen:
            stream.truncated = True
        stream.events.append(event)
        self._fan_out(stream, ("token", event))

    def dispatch_result(self, result: dict[str, Any]) -> None:
        """Record the SummaryResult of a registered request and fan it out."""
        if self._on_result is not None:
            self._on_result(result)
        stream = self.streams.get(result["request_id"])
        if stream is None or stream.result is not None:
            return
        stream.result = result
        stream.finished_at = self._clock()
        self._finished[stream.request_id] = stream.finished_at
        self._waiting.discard(stream.request_id)
        self._fan_out(stream, ("result", result))

    def _fan_out(self, stream: RequestStream, item: Item) -> None:
        for sub in list(stream.subscribers):
            if not sub.push(item):
                # An overflowed subscriber gets nothing more; its stream closes it.
                stream.subscribers.discard(sub)

    # -- the Kafka tail -----------------------------------------------------------------------

    async def start(
        self,
        connection: ConnectionConfig,
        tokens_topic: str,
        results_topic: str,
        partitions: frozenset[int],
    ) -> None:
        """Assign the owned partitions of both topics at their end offsets and start tailing."""
        self.tokens_topic = tokens_topic
        self.results_topic = results_topic
        tail = PartitionTail(connection, name="gateway-hub", auto_offset_reset="latest")
        tps = [TopicPartition(t, p) for t in (tokens_topic, results_topic) for p in partitions]
        # At the end, resolved now: before any request is accepted.
        await tail.assign(tps)
        self._tail = tail
        self.running = True
        tail.run(self._dispatch_batch)

    async def stop(self) -> None:
        self.running = False
        if self._tail is not None:
            await self._tail.stop()
            self._tail = None
        for stream in self.streams.values():
            for sub in stream.subscribers:
                sub.close("shutting_down")

    async def _dispatch_batch(self, tp: TopicPartition, messages: list[Any]) -> None:
        try:
            is_tokens = tp.topic == self.tokens_topic
            for msg in messages:
                self._handle(is_tokens, msg.key, msg.value)
            if messages and self._clock() - self._last_sweep > 1.0:
                self._last_sweep = self._clock()
                self._evict()
        except Exception:
            # A bug in fan-out must not stop every stream of this instance.
            log.exception("hub dispatch failed")

    def _handle(self, is_tokens: bool, key: bytes | None, value: bytes | None) -> None:
        # Most records of a partition belong to requests nobody here streams: skip them
        # before paying for the decode.
        if key is None or key.decode(errors="replace") not in self.streams:
            return
        try:
            if is_tokens:
                self.dispatch_token(codec().decode_as(value, "TokenEvent"))
            else:
                self.dispatch_result(codec().decode_as(value, "SummaryResult"))
        except CodecError:
            return  # the stage that wrote it already dead-lettered it; not ours to judge
