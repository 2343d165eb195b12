"""The disconnect cancel of gateway/streams/clients.py, with the hub fed by hand (no Kafka)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from gateway.admission.idempotency import RequestIndex
from gateway.settings import GatewaySettings
from gateway.streams.clients import ClientStreams
from gateway.streams.hub import StreamHub
from gateway.streams.lookup import RequestLookup
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig

RID = "01JABCDEFGHJKMNPQRSTVWXYZ0"
HERE, THERE = "gw-a", "gw-b"


class Harness:
    """ClientStreams on a real hub, recording its background tasks and the cancels it sends."""

    def __init__(self, *, cancel_grace_s: float, running: bool = True) -> None:
        settings = GatewaySettings(keys_file=None, cancel_grace_s=cancel_grace_s)
        topics = TopicNames.from_settings(settings)
        self.hub = StreamHub()
        self.tasks: list[asyncio.Task[Any]] = []
        self.cancels: list[tuple[str, str, str]] = []
        self.cancelled = asyncio.Event()
        self.announced: list[tuple[str, str]] = []
        self.running = running
        connection = ConnectionConfig.from_settings(settings)
        lookup = RequestLookup(settings, connection, topics, RequestIndex(), self.hub)
        self.streams = ClientStreams(
            settings,
            connection,
            topics,
            self.hub,
            lookup,
            spawn=self.spawn,
            cancel=self.cancel,
            running=lambda: self.running,
            gateway_id=HERE,
            announce=lambda user_id, request_id: self.announced.append((user_id, request_id)),
        )

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.append(task)
        return task

    async def cancel(self, request_id: str, user_id: str, reason: str) -> None:
        self.cancels.append((request_id, user_id, reason))
        self.cancelled.set()


async def test_an_abandoned_unfinished_stream_is_cancelled_after_the_grace() -> None:
    h = Harness(cancel_grace_s=0)
    h.hub.register(RID)
    source = h.streams.open(RID, 0)
    assert source.kind == "memory"
    source.close(h.hub)
    h.streams.closed(RID, "alice", finished=False)
    await asyncio.wait_for(h.cancelled.wait(), 5)
    assert h.cancels == [(RID, "alice", "disconnect")]


def started(hub: StreamHub) -> None:
    """The worker began the request: its STARTED event reached the hub."""
    hub.dispatch_token({"request_id": RID, "seq": 1, "kind": "STARTED", "text": ""})


async def test_a_client_back_within_the_grace_stops_the_cancel() -> None:
    h = Harness(cancel_grace_s=3_600)
    h.hub.register(RID)
    started(h.hub)
    h.streams.open(RID, 0).close(h.hub)
    h.streams.closed(RID, "alice", finished=False)
    [timer] = h.tasks
    h.streams.open(RID, 0)  # the client reconnects
    assert timer.cancelling() == 1
    with pytest.raises(asyncio.CancelledError):
        await timer
    assert h.cancels == []


async def test_a_result_that_arrived_during_the_grace_stops_the_cancel() -> None:
    h = Harness(cancel_grace_s=0)
    h.hub.register(RID)
    h.streams.open(RID, 0).close(h.hub)
    h.hub.dispatch_result({"request_id": RID, "status": "COMPLETED", "last_seq": 0})
    h.streams.closed(RID, "alice", finished=False)
    [timer] = h.tasks
    await timer
    assert h.cancels == []


@pytest.mark.parametrize(("finished", "running"), [(True, True), (False, False)])
async def test_a_finished_request_or_a_stopping_gateway_starts_no_cancel(
    finished: bool, running: bool
) -> None:
    h = Harness(cancel_grace_s=0, running=running)
    h.hub.register(RID)
    h.streams.open(RID, 0).close(h.hub)
    h.streams.closed(RID, "alice", finished=finished)
    assert h.tasks == []
    assert h.cancels == []


async def test_a_stream_closed_while_its_request_is_queued_is_cancelled_without_the_grace() -> None:
    h = Harness(cancel_grace_s=3_600)
    h.hub.register(RID)
    h.streams.open(RID, 0).close(h.hub)
    h.streams.closed(RID, "alice", finished=False)
    await asyncio.wait_for(h.cancelled.wait(), 5)
    assert h.cancels == [(RID, "alice", "disconnect")]


@pytest.mark.parametrize("kind", ["STARTED", "DELTA"])
async def test_a_stream_closed_once_its_request_started_waits_for_the_grace(kind: str) -> None:
    h = Harness(cancel_grace_s=3_600)
    h.hub.register(RID)
    h.hub.dispatch_token({"request_id": RID, "seq": 1, "kind": kind, "text": "x"})
    h.streams.open(RID, 0).close(h.hub)
    h.streams.closed(RID, "alice", finished=False)
    [timer] = h.tasks
    await asyncio.sleep(0)  # the timer runs up to its sleep
    assert not timer.done() and h.cancels == []
    timer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await timer


async def test_a_request_this_gateway_does_not_hold_keeps_the_grace() -> None:
    # Accepted elsewhere (read from the log): whether it started is unknown here.
    h = Harness(cancel_grace_s=3_600)
    h.streams.closed(RID, "alice", finished=False)
    [timer] = h.tasks
    await asyncio.sleep(0)
    assert not timer.done() and h.cancels == []
    timer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await timer


# -- a client that comes back at another gateway (docs/architecture.md, "Cancel on disconnect
# across gateways") ------------------------------------------------------------------------------


async def test_an_attach_at_another_gateway_stops_this_ones_cancel_timer() -> None:
    h = Harness(cancel_grace_s=3_600)
    h.hub.register(RID)
    started(h.hub)
    h.streams.open(RID, 0).close(h.hub)
    h.streams.closed(RID, "alice", finished=False)
    [timer] = h.tasks
    h.streams.attached(RID, THERE)  # its ATTACHED record, read from `quota`
    with pytest.raises(asyncio.CancelledError):
        await timer
    assert h.cancels == []


async def test_a_stream_closed_after_its_client_attached_elsewhere_starts_no_cancel() -> None:
    h = Harness(cancel_grace_s=0)
    h.hub.register(RID)
    started(h.hub)
    source = h.streams.open(RID, 0)
    h.streams.attached(RID, THERE)
    source.close(h.hub)
    h.streams.closed(RID, "alice", finished=False)
    assert h.tasks == [] and h.cancels == []


async def test_a_client_back_here_after_another_gateway_makes_this_one_own_the_cancel() -> None:
    h = Harness(cancel_grace_s=0)
    h.hub.register(RID)
    started(h.hub)
    h.streams.attached(RID, THERE)
    source = h.streams.open(RID, 3, announce_for="alice")  # a resume here
    assert h.announced == [("alice", RID)]
    source.close(h.hub)
    h.streams.closed(RID, "alice", finished=False)
    await asyncio.wait_for(h.cancelled.wait(), 5)
    assert h.cancels == [(RID, "alice", "disconnect")]


async def test_a_first_stream_announces_nothing() -> None:
    h = Harness(cancel_grace_s=3_600)
    h.hub.register(RID)
    h.streams.open(RID, 0)
    assert h.announced == []
