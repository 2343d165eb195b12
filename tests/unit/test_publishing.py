"""RunPublisher: adaptive coalescing of a run's deltas, with the old publishing contracts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pipeline.core import events, sealing
from pipeline.core.codec import codec
from pipeline.core.records import TokenEvent
from pipeline.core.sealing import Keyring
from pipeline.worker.inference.publishing import (
    CHUNK_HOLD_S,
    EmitRefused,
    PublishError,
    RunPublisher,
    coalesce_hold_s,
    run_hold_s,
)
from pipeline.worker.inference.runs import Run, RunState


class GatedBroker:
    """An emit whose acknowledgements the test releases one at a time."""

    def __init__(self) -> None:
        self.sent: list[TokenEvent] = []
        self.acked: list[TokenEvent] = []
        self.gate = asyncio.Semaphore(0)
        self.arrived = asyncio.Event()
        self.fail_next = False

    async def emit(self, event: TokenEvent) -> None:
        codec().encode("TokenEvent", event)
        self.sent.append(event)
        self.arrived.set()
        await self.gate.acquire()
        if self.fail_next:
            raise RuntimeError("broker gone")
        self.acked.append(event)

    async def next_send(self) -> TokenEvent:
        while not self.arrived.is_set():
            await self.arrived.wait()
        self.arrived.clear()
        return self.sent[-1]


def new_run() -> Run:
    job: Any = {"request_id": "r1", "user_id": "u", "tier": "free", "model": "m", "trace": {}}
    run = Run(job=job, grant=asyncio.get_running_loop().create_future(), resume=None, deadline_ms=0)
    run.advance(RunState.RUNNING)
    return run


async def test_a_lone_delta_goes_at_once_and_the_ones_behind_a_send_go_as_one_record() -> None:
    broker = GatedBroker()
    publisher, run = RunPublisher(broker.emit), new_run()
    await publisher.delta(run, "The")  # returns without waiting for the broker
    first = await broker.next_send()
    assert (events.first_seq(first), first["seq"], first["text"]) == (1, 1, "The")
    for piece in [" cat", " sat", " down"]:
        await publisher.delta(run, piece)
    assert len(broker.sent) == 1  # the three wait for the first acknowledgement
    broker.gate.release()
    second = await broker.next_send()
    assert (events.first_seq(second), second["seq"], second["text"]) == (2, 4, " cat sat down")
    assert events.pieces(second) == [(2, " cat"), (3, " sat"), (4, " down")]
    broker.gate.release()
    finishing = asyncio.ensure_future(publisher.finish(run, "DONE"))
    terminal = await broker.next_send()
    broker.gate.release()
    await finishing
    assert (terminal["kind"], terminal["seq"], run.state) == ("DONE", 5, RunState.ENDED)


async def test_the_terminal_event_waits_for_every_pending_delta() -> None:
    broker = GatedBroker()
    publisher, run = RunPublisher(broker.emit), new_run()
    await publisher.delta(run, "a")
    await broker.next_send()
    await publisher.delta(run, "b")
    finishing = asyncio.ensure_future(publisher.finish(run, "DONE"))
    broker.gate.release()
    assert (await broker.next_send())["text"] == "b"
    assert not finishing.done()
    broker.gate.release()
    assert (await broker.next_send())["kind"] == "DONE"
    broker.gate.release()
    await finishing
    assert [(events.first_seq(e), e["seq"]) for e in broker.acked] == [(1, 1), (2, 2), (3, 3)]


async def test_a_failed_send_raises_publish_error_and_sends_nothing_after_it() -> None:
    broker = GatedBroker()
    publisher, run = RunPublisher(broker.emit), new_run()
    await publisher.delta(run, "a")
    await broker.next_send()
    await publisher.delta(run, "b")
    broker.fail_next = True
    broker.gate.release()
    with pytest.raises(PublishError):
        await publisher.finish(run, "DONE")
    with pytest.raises(PublishError):
        await publisher.delta(run, "c")
    assert [e["text"] for e in broker.sent] == ["a"]
    assert run.state is RunState.FINISHING


async def test_a_run_whose_deltas_failed_before_its_end_has_no_terminal_out() -> None:
    broker = GatedBroker()
    publisher, run = RunPublisher(broker.emit), new_run()
    await publisher.delta(run, "a")
    await broker.next_send()
    broker.fail_next = True
    broker.gate.release()
    with pytest.raises(PublishError):
        await publisher.finish(run, "DONE")
    # FINISHING, yet no terminal was sent: its release must bill what it used.
    assert run.state is RunState.FINISHING and not run.terminal_out


async def test_a_terminal_the_emit_refused_is_not_out_and_one_that_failed_may_be() -> None:
    async def refuse(event: TokenEvent) -> None:
        raise EmitRefused(event["request_id"])

    async def lose(event: TokenEvent) -> None:
        raise RuntimeError("acknowledgement timed out")  # the record may be on the broker

    refused, lost = new_run(), new_run()
    for emit, run in ((refuse, refused), (lose, lost)):
        with pytest.raises(PublishError):
            await RunPublisher(emit).finish(run, "DONE")
    assert not refused.terminal_out
    assert lost.terminal_out


async def test_close_lets_the_send_under_way_finish_and_drops_what_waits_behind_it() -> None:
    broker = GatedBroker()
    publisher, run = RunPublisher(broker.emit), new_run()
    await publisher.delta(run, "a")
    await broker.next_send()
    await publisher.delta(run, "b")
    closing = asyncio.ensure_future(publisher.close(run))
    await asyncio.sleep(0)  # let close start waiting
    assert not closing.done()
    broker.gate.release()
    await closing
    # "b" never went out: the next owner resumes after seq 1, what the log holds.
    assert [e["text"] for e in broker.acked] == ["a"]
    assert len(broker.sent) == 1


async def test_a_cancelled_send_fails_the_run_instead_of_leaving_a_gap() -> None:
    broker = GatedBroker()
    publisher, run = RunPublisher(broker.emit), new_run()
    await publisher.delta(run, "a")
    await broker.next_send()
    sending = run.outbox.sending
    assert sending is not None
    sending.cancel()  # a stopping event loop
    with pytest.raises(asyncio.CancelledError):
        await sending
    with pytest.raises(PublishError):
        await publisher.finish(run, "DONE")
    assert broker.acked == [] and [e["kind"] for e in broker.sent] == ["DELTA"]


class HeldSleep:
    """A sleep the test ends: records how long the publisher asked to wait."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.release = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        await self.release.wait()


def test_the_hold_is_none_for_light_load_and_grows_to_its_maximum() -> None:
    assert coalesce_hold_s(1, 8, 48, 25.0) == 0.0
    assert coalesce_hold_s(8, 8, 48, 25.0) == 0.0
    assert coalesce_hold_s(28, 8, 48, 25.0) == pytest.approx(0.0125)
    assert coalesce_hold_s(200, 8, 48, 25.0) == pytest.approx(0.025)
    assert coalesce_hold_s(200, 8, 48, 0.0) == 0.0


def test_a_chunk_calls_records_wait_at_least_the_chunk_hold_and_others_the_loads() -> None:
    chunk = "01J0000000000000000000000A~0.3"
    assert run_hold_s(chunk, 0.0) == CHUNK_HOLD_S
    assert run_hold_s(chunk, 2 * CHUNK_HOLD_S) == 2 * CHUNK_HOLD_S
    assert run_hold_s("01J0000000000000000000000A", 0.0) == 0.0
    assert run_hold_s("01J0000000000000000000000A", 0.01) == 0.01


async def test_under_load_a_runs_next_record_waits_the_hold_and_takes_every_delta_meanwhile() -> (
    None
):
    broker, sleep = GatedBroker(), HeldSleep()
    publisher, run = RunPublisher(broker.emit, hold=lambda run: 0.02, sleep=sleep), new_run()
    await publisher.delta(run, "The")  # the first record goes at once: no added TTFT
    assert (await broker.next_send())["text"] == "The"
    broker.gate.release()
    await publisher.delta(run, " cat")
    for _ in range(5):  # the drain acknowledges the first send, then waits the hold
        await asyncio.sleep(0)
    assert len(sleep.asked) == 1 and 0 < sleep.asked[0] <= 0.02
    await publisher.delta(run, " sat")
    sleep.release.set()
    second = await broker.next_send()
    assert (events.first_seq(second), second["seq"], second["text"]) == (2, 3, " cat sat")
    assert len(broker.sent) == 2


async def test_a_coalesced_delta_is_sealed_once_and_its_cuts_index_the_opened_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ring = Keyring()
    monkeypatch.setattr(sealing, "keyring", lambda: ring)
    ring.add("u", "k1", sealing.new_key())
    broker = GatedBroker()
    publisher, run = RunPublisher(broker.emit), new_run()
    await publisher.delta(run, "The")
    await broker.next_send()
    for piece in [" cat", " sat"]:
        await publisher.delta(run, piece)
    broker.gate.release()
    second = await broker.next_send()
    assert second["text"].startswith("ss1:k1:") and "cat" not in second["text"]
    opened = codec().decode_as(codec().encode("TokenEvent", second), "TokenEvent")
    assert [piece for _, piece in events.pieces(opened)] == [" cat", " sat"]
    broker.gate.release()
    await publisher.close(run)
