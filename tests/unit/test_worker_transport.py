"""The worker's Faust consumer: an ack counts toward the committed offset only for a record
fetched in the current generation, on a partition sought back to its committed offset."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from pipeline.worker.app import StageApp
from pipeline.worker.transport import Consumer, FlowControl, ack_counts

TOPIC = "test-transport-requests"
REQUESTS_0 = TP(TOPIC, 0)


def test_an_ack_counts_in_the_current_generation_only() -> None:
    assert ack_counts(REQUESTS_0, 7, 7, set())
    assert not ack_counts(REQUESTS_0, 6, 7, set())
    # A message built without a generation (Faust's own internal ones) keeps Faust's rule.
    assert ack_counts(REQUESTS_0, None, 7, set())


def test_an_ack_on_a_revoked_partition_not_yet_sought_back_does_not_count() -> None:
    assert not ack_counts(REQUESTS_0, 7, 7, {REQUESTS_0})
    assert ack_counts(TP(TOPIC, 1), 7, 7, {REQUESTS_0})


def _message(offset: int, generation: int | None) -> ConsumerMessage:
    return ConsumerMessage(
        TOPIC, 0, offset, 0.0, 0, [], b"k", b"v", None, 1, 1, REQUESTS_0, generation_id=generation
    )


@contextlib.asynccontextmanager
async def worker_consumer() -> AsyncIterator[Any]:
    """A worker app's own consumer (never started: acks need no broker)."""
    app = StageApp("test-transport", broker="kafka://127.0.0.1:1", autodiscover=False)
    app.topics.add(app.topic(TOPIC, value_serializer="raw"))
    await app.topics._update_indices()  # what an agent's start does: its records are acked
    app.consumer_generation_id = 7
    built = app.consumer
    assert isinstance(built, Consumer)
    try:
        yield built
    finally:
        built._thread.thread_loop.close()  # the consumer thread's loop, never run


async def test_the_worker_consumer_skips_stale_acks_and_commits_only_processed_records() -> None:
    async with worker_consumer() as consumer:
        assert not consumer.ack(_message(10, generation=6))  # fetched before the rebalance
        assert FaustConsumer._new_offset(consumer, REQUESTS_0) is None
        assert consumer.ack(_message(11, generation=7))
        assert FaustConsumer._new_offset(consumer, REQUESTS_0) == 12


async def test_the_worker_consumer_counts_acks_again_once_the_partition_is_sought_back() -> None:
    async with worker_consumer() as consumer:
        consumer._unsettled.add(REQUESTS_0)
        assert not consumer.ack(_message(20, generation=7))
        consumer._unsettled.discard(REQUESTS_0)  # what seek_to_committed does for them
        assert consumer.ack(_message(21, generation=7))
        assert FaustConsumer._new_offset(consumer, REQUESTS_0) == 22


async def test_a_resume_while_the_flow_runs_keeps_the_buffered_records() -> None:
    app = StageApp("test-transport-flow", broker="kafka://127.0.0.1:1", autodiscover=False)
    flow = app.flow_control
    assert isinstance(flow, FlowControl)
    flow.resume()  # the flow starts suspended until the worker starts
    buffer: Any = app.FlowControlQueue(maxsize=0, clear_on_resume=True)
    buffer.put_nowait("fetched after the seek")
    flow.resume()  # the recovery's second resume: the flow was running
    assert buffer.qsize() == 1
    flow.suspend()
    flow.resume()  # a resume from a suspension drops what was buffered before it
    assert buffer.qsize() == 0


# -- offsets the fetch skipped (docs/architecture.md, "Rebalances") -----------------------------


async def test_offsets_the_fetch_skipped_are_not_committed_over_but_re_read() -> None:
    async with worker_consumer() as consumer:
        consumer._committed_offset[REQUESTS_0] = 101
        # The drain loop read 101, then got 113: Faust would take 102-112 as absent.
        await consumer._add_gap(REQUESTS_0, 102, 113)
        assert consumer.ack(_message(101, generation=7))
        assert consumer.ack(_message(113, generation=7))
        assert FaustConsumer._new_offset(consumer, REQUESTS_0) == 102  # not past the skip
        assert consumer._rewind == {REQUESTS_0: 101}


async def test_the_next_fetch_seeks_back_to_the_skipped_offsets(monkeypatch: Any) -> None:
    sought: list[tuple[TP, int]] = []

    async def seek(tp: TP, offset: int) -> None:
        sought.append((tp, offset))

    async def nothing(self: Any, timeout: float) -> AsyncIterator[Any]:
        for item in ():
            yield item

    monkeypatch.setattr(FaustConsumer, "getmany", nothing)
    async with worker_consumer() as consumer:
        monkeypatch.setattr(consumer, "seek", seek)
        await consumer._add_gap(REQUESTS_0, 102, 113)
        assert [item async for item in consumer.getmany(timeout=0.0)] == []
        assert sought == [(REQUESTS_0, 101)]
        assert consumer._rewind == {}


async def test_a_skip_seen_again_after_its_re_read_is_taken_as_a_real_hole() -> None:
    async with worker_consumer() as consumer:
        consumer._rewound[REQUESTS_0] = 101
        await consumer._add_gap(REQUESTS_0, 102, 113)
        assert consumer._rewind == {}
        assert consumer._gap[REQUESTS_0]  # Faust's rule: the offsets count as absent
