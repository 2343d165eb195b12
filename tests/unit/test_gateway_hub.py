"""The hub's fan-out and the SSE stream logic, fed by hand (no Kafka)."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from bench.sse import SSEEvent, SSEParser
from gateway.http.auth import KeyStore
from gateway.http.sse import summary_events
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from gateway.streams.hub import StreamHub
from pipeline.core.tiers import load_tiers

RID = "01JABCDEFGHJKMNPQRSTVWXYZ0"


def token(seq: int, kind: str = "DELTA", text: str | None = None) -> dict[str, Any]:
    return {
        "request_id": RID,
        "seq": seq,
        "kind": kind,
        "text": f"t{seq} " if text is None and kind == "DELTA" else (text or ""),
        "usage": None,
        "error": None,
    }


def result(last_seq: int, status: str = "COMPLETED", **extra: Any) -> dict[str, Any]:
    return {
        "request_id": RID,
        "user_id": "alice",
        "tier": "pro",
        "status": status,
        "summary": "the summary",
        "usage": {"input_tokens": 3, "output_tokens": 4, "attempts": 1, "cost_micro_usd": 7},
        "error": None,
        "last_seq": last_seq,
        "latency_ms": {"total": 9},
        "created_at": 1,
        "completed_at": 2,
        **extra,
    }


def gateway(**overrides: Any) -> Gateway:
    settings = GatewaySettings(keys_file=None, **overrides)
    return Gateway(settings, KeyStore(), load_tiers())


class Received:
    """A stream's chunks parsed back into events (a chunk may hold several)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks
        self.parser = SSEParser()
        self.buffer: deque[SSEEvent] = deque()
        self.writes = 0

    async def next(self) -> SSEEvent:
        while not self.buffer:
            chunk = await asyncio.wait_for(anext(self.chunks), 5)
            self.writes += 1
            self.buffer.extend(self.parser.feed(chunk))
        return self.buffer.popleft()

    async def take(self, n: int) -> list[SSEEvent]:
        return [await self.next() for _ in range(n)]

    async def rest(self) -> list[SSEEvent]:
        out = list(self.buffer)
        self.buffer.clear()
        async for chunk in self.chunks:
            self.writes += 1
            out += self.parser.feed(chunk)
        return out


def stream(gw: Gateway, **options: Any) -> Received:
    return Received(summary_events(gw, RID, "alice", **options))


def data(event: SSEEvent) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(event.data)
    return decoded


async def test_a_slow_subscriber_is_cut_off_without_slowing_the_others() -> None:
    hub = StreamHub(client_queue_events=4)
    hub.register(RID)
    fast = hub.subscribe(RID)
    slow = hub.subscribe(RID)
    assert fast is not None and slow is not None
    received = []
    for seq in range(1, 101):
        hub.dispatch_token(token(seq))  # never waits, whoever is behind
        item = await fast.get()
        assert item is not None
        received.append(item[1]["seq"])
    assert received == list(range(1, 101))
    assert slow.overflowed
    assert len(slow._live) == 4  # bounded: it holds at most its queue, never more
    assert await slow.get() is None
    stream = hub.get(RID)
    assert stream is not None and stream.subscribers == {fast}


async def test_a_slow_sse_client_gets_an_error_with_its_resume_cursor() -> None:
    gw = gateway(client_queue_events=3)
    gw.hub.register(RID)
    gw.hub.dispatch_token(token(1))
    gw.hub.dispatch_token(token(2))
    events = stream(gw)
    first = await events.take(2)
    assert [e.id for e in first] == ["1", "2"]
    for seq in range(3, 30):
        gw.hub.dispatch_token(token(seq))
    tail = await events.rest()
    assert [e.event for e in tail] == ["error"]
    assert data(tail[0])["code"] == "slow_consumer"
    assert data(tail[0])["last_seq"] == 2
    assert data(tail[0])["retriable"] is True


async def test_memory_replay_after_a_cursor_then_done() -> None:
    gw = gateway()
    gw.hub.register(RID)
    for seq in range(1, 6):
        gw.hub.dispatch_token(token(seq))
    gw.hub.dispatch_token(token(6, "DONE"))
    gw.hub.dispatch_result(result(6))
    events = await stream(gw, after_seq=3).rest()
    assert [e.event for e in events] == ["token", "token", "done"]
    assert [data(e)["seq"] for e in events[:2]] == [4, 5]
    done = data(events[-1])
    assert done["status"] == "COMPLETED"
    assert done["summary"] == "the summary"
    assert done["cost"] == {"micro_usd": 7, "usd": 7e-6}
    assert done["usage"] == {
        "input_tokens": 3,
        "output_tokens": 4,
        "attempts": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "document_tokens": 0,
        "memory_tokens": 0,
        "instruction_tokens": 0,
    }


async def test_duplicates_are_dropped_and_order_is_kept() -> None:
    hub = StreamHub()
    hub.register(RID)
    for seq in (1, 2, 2, 1, 3):
        hub.dispatch_token(token(seq))
    sub = hub.subscribe(RID)
    assert sub is not None
    got = [(await sub.get()) for _ in range(3)]
    assert [item[1]["seq"] for item in got if item] == [1, 2, 3]


async def test_memory_declines_when_the_buffer_dropped_needed_events() -> None:
    hub = StreamHub(buffer_events=16)
    hub.register(RID)
    for seq in range(1, 41):
        hub.dispatch_token(token(seq))
    assert hub.subscribe(RID, after_seq=0) is None  # seq 1..24 are gone: read the log
    sub = hub.subscribe(RID, after_seq=30)
    assert sub is not None
    first = await sub.get()
    assert first is not None and first[1]["seq"] == 31
    assert hub.subscribe("unknown-id") is None


async def test_a_result_before_its_last_tokens_waits_for_them() -> None:
    gw = gateway(result_grace_s=5)
    gw.hub.register(RID)
    gw.hub.dispatch_token(token(1))
    events = stream(gw)
    assert [e.id for e in await events.take(1)] == ["1"]
    gw.hub.dispatch_result(result(3))  # tokens 2 and 3 are still on their way
    pending = asyncio.ensure_future(events.next())
    await asyncio.sleep(0.05)
    assert not pending.done()
    gw.hub.dispatch_token(token(2))
    gw.hub.dispatch_token(token(3))
    gw.hub.dispatch_token(token(4, "DONE"))
    assert (await pending).id == "2"
    tail = await events.rest()
    assert [e.event for e in tail] == ["token", "done"]


async def test_a_failed_result_sends_error_then_done() -> None:
    gw = gateway()
    gw.hub.register(RID)
    gw.hub.dispatch_token(token(1))
    gw.hub.dispatch_token(token(2, "ERROR"))
    error = {
        "code": "upstream_unavailable",
        "message": "gave up",
        "retriable": True,
        "partial": False,
    }
    gw.hub.dispatch_result(result(2, status="FAILED", error=error))
    events = await stream(gw).rest()
    assert [e.event for e in events] == ["token", "error", "done"]
    assert data(events[1])["code"] == "upstream_unavailable"
    assert data(events[1])["partial"] is False
    assert data(events[2])["status"] == "FAILED"


async def test_a_stopping_gateway_ends_streams_with_a_resumable_error() -> None:
    gw = gateway()
    gw.hub.register(RID)
    gw.hub.dispatch_token(token(1))
    events = stream(gw)
    await events.take(1)
    pending = asyncio.ensure_future(events.next())
    await asyncio.sleep(0.01)
    await gw.hub.stop()
    closing = await pending
    assert closing.event == "error"
    assert data(closing) | {"message": ""} == {
        "code": "shutting_down",
        "message": "",
        "partial": True,
        "retriable": True,
        "last_seq": 1,
    }
    assert await events.rest() == []


async def test_finished_streams_are_evicted_after_their_retention() -> None:
    now = [0.0]
    hub = StreamHub(finished_retention_s=10, max_streams=1_000, clock=lambda: now[0])
    hub.register(RID)
    hub.dispatch_result(result(0))
    hub.register("other")
    now[0] = 11
    hub.register("third")  # registering sweeps
    assert hub.get(RID) is None
    assert hub.get("other") is not None


async def test_the_registry_is_bounded_but_keeps_streams_being_read() -> None:
    hub = StreamHub(max_streams=3)
    hub.register("a")
    reader = hub.subscribe("a")
    for rid in ("b", "c", "d", "e"):
        hub.register(rid)
    assert len(hub.streams) == 3
    assert reader is not None and hub.get("a") is not None  # it has a client: kept
    assert hub.get("b") is None and hub.get("c") is None


async def test_queued_counts_requests_without_a_first_token() -> None:
    hub = StreamHub()
    for rid in ("a", "b", "c"):
        hub.register(rid)
    assert hub.queued() == 3
    hub.dispatch_token({"request_id": "a", "seq": 1, "kind": "STARTED", "text": ""})
    assert hub.queued() == 3  # started is not a token yet
    hub.dispatch_token({"request_id": "a", "seq": 2, "kind": "DELTA", "text": "x"})
    hub.dispatch_result({"request_id": "b", "status": "FAILED", "last_seq": 0})
    hub.forget("c")
    assert hub.queued() == 0


async def test_every_event_queued_for_a_client_goes_out_in_one_write() -> None:
    gw = gateway()
    gw.hub.register(RID)
    events = stream(gw)
    gw.hub.dispatch_token(token(1))
    assert [e.id for e in await events.take(1)] == ["1"]
    for seq in range(2, 7):
        gw.hub.dispatch_token(token(seq))  # five tokens queue while the stream is away
    gw.hub.dispatch_token(token(7, "DONE"))
    gw.hub.dispatch_result(result(7))
    writes = events.writes
    tail = await events.rest()
    assert [e.id for e in tail if e.event == "token"] == ["2", "3", "4", "5", "6"]
    assert tail[-1].event == "done"
    assert events.writes - writes == 2  # the five tokens in one write, then done
