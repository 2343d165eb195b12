from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.worker.inference.scheduler import FairScheduler

_ids = itertools.count()


@dataclass(frozen=True)
class Job:
    user_id: str
    weight: int = 1
    request_id: str = ""
    priority: int = 1

    @staticmethod
    def of(user: str, weight: int = 1, priority: int = 1) -> Job:
        return Job(user, weight, f"r{next(_ids)}", priority)


def drain_order(sched: FairScheduler[Job], n: int) -> list[Job]:
    """Run n jobs one at a time (each finishes before the next starts)."""
    out = []
    for _ in range(n):
        job = sched.next_nowait()
        assert job is not None
        out.append(job)
        sched.done(job)
    return out


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=10), min_size=1, max_size=5),
    n=st.integers(min_value=1, max_value=200),
)
def test_backlogged_users_get_shares_proportional_to_weight(weights: list[int], n: int) -> None:
    sched: FairScheduler[Job] = FairScheduler(max_running=1, max_per_user=1, max_queued=10_000)
    for user, weight in enumerate(weights):
        for _ in range(n):
            sched.put_nowait(Job.of(f"u{user}", weight))
    picked = drain_order(sched, n)
    total = sum(weights)
    for user, weight in enumerate(weights):
        count = sum(1 for job in picked if job.user_id == f"u{user}")
        assert abs(count - n * weight / total) <= len(weights)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.integers(0, 4)),
            st.tuples(st.just("next"), st.just(0)),
            st.tuples(st.just("done"), st.integers(0, 50)),
            st.tuples(st.just("remove"), st.integers(0, 50)),
        ),
        max_size=200,
    ),
    cap=st.integers(1, 3),
    max_running=st.integers(1, 6),
)
def test_caps_are_never_exceeded_and_no_job_is_lost_or_duplicated(
    ops: list[tuple[str, int]], cap: int, max_running: int
) -> None:
    sched: FairScheduler[Job] = FairScheduler(
        max_running=max_running, max_per_user=cap, max_queued=1000
    )
    queued: dict[str, Job] = {}
    running: list[Job] = []
    started: set[str] = set()
    for op, arg in ops:
        if op == "put":
            job = Job.of(f"u{arg}", weight=arg + 1)
            sched.put_nowait(job)
            queued[job.request_id] = job
        elif op == "next":
            job = sched.next_nowait()
            if job is None:
                # Nothing may start: either every slot is taken or every waiting user is capped.
                per_user = {j.user_id: 0 for j in queued.values()}
                for j in running:
                    if j.user_id in per_user:
                        per_user[j.user_id] += 1
                assert len(running) >= max_running or all(c >= cap for c in per_user.values())
            else:
                assert job.request_id in queued and job.request_id not in started
                started.add(job.request_id)
                del queued[job.request_id]
                running.append(job)
        elif op == "done" and running:
            job = running.pop(arg % len(running))
            sched.done(job)
        elif op == "remove" and queued:
            rid = sorted(queued)[arg % len(queued)]
            assert sched.remove(rid) is queued.pop(rid)
        assert sched.running == len(running) <= max_running
        assert sched.queued == len(queued)
        for user in {j.user_id for j in running}:
            assert sched.running_for(user) == sum(1 for j in running if j.user_id == user) <= cap


def test_light_user_is_not_stuck_behind_a_flood() -> None:
    sched: FairScheduler[Job] = FairScheduler(max_running=1, max_per_user=1, max_queued=1000)
    for _ in range(100):
        sched.put_nowait(Job.of("flooder"))
    drain_order(sched, 10)
    light = Job.of("light")
    sched.put_nowait(light)
    assert light in drain_order(sched, 2)


def test_per_user_cap_lets_other_users_through() -> None:
    sched: FairScheduler[Job] = FairScheduler(max_running=10, max_per_user=2, max_queued=1000)
    for _ in range(5):
        sched.put_nowait(Job.of("a"))
    sched.put_nowait(Job.of("b"))
    started = [sched.next_nowait() for _ in range(4)]
    assert [j.user_id if j else None for j in started].count("a") == 2
    assert sorted(j.user_id for j in started if j) == ["a", "a", "b"]
    assert sched.running_for("a") == 2


def test_removed_head_returns_its_virtual_time() -> None:
    sched: FairScheduler[Job] = FairScheduler(max_running=1, max_per_user=1, max_queued=100)
    a1, a2 = Job.of("a"), Job.of("a")
    sched.put_nowait(a1)
    sched.put_nowait(a2)
    b1 = Job.of("b")
    sched.put_nowait(b1)
    assert sched.remove(a1.request_id) is a1
    assert sched.remove(a1.request_id) is None
    # a2 inherits a1's tag, so a (first to arrive) still goes before b.
    assert drain_order(sched, 2) == [a2, b1]


def test_duplicate_request_and_bad_done_are_rejected() -> None:
    sched: FairScheduler[Job] = FairScheduler(max_running=1, max_per_user=1, max_queued=10)
    job = Job.of("a")
    sched.put_nowait(job)
    with pytest.raises(ValueError):
        sched.put_nowait(job)
    with pytest.raises(ValueError):
        sched.done(job)
    with pytest.raises(ValueError):
        FairScheduler(max_running=0, max_per_user=1, max_queued=1)


async def test_put_blocks_when_full_and_next_blocks_when_empty() -> None:
    sched: FairScheduler[Job] = FairScheduler(max_running=1, max_per_user=1, max_queued=2)
    await sched.put(Job.of("a"))
    await sched.put(Job.of("b"))
    blocked = asyncio.create_task(sched.put(Job.of("c")))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    first = await sched.next()
    await asyncio.wait_for(blocked, 1.0)
    assert sched.queued == 2
    # The single slot is taken: next waits until done() frees it.
    waiting = asyncio.create_task(sched.next())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    sched.done(first)
    second = await asyncio.wait_for(waiting, 1.0)
    assert second.user_id in {"a", "b", "c"} and second is not first
    sched.done(second)
    third = await asyncio.wait_for(sched.next(), 1.0)
    sched.done(third)
    idle = asyncio.create_task(sched.next())
    await asyncio.sleep(0.01)
    assert not idle.done()
    idle.cancel()
    with pytest.raises(asyncio.CancelledError):
        await idle


def test_priority_zero_jobs_start_before_waiting_lower_priority_ones() -> None:
    sched: FairScheduler[Job] = FairScheduler(max_running=1, max_per_user=1, max_queued=100)
    topic = [Job.of("batch", priority=1) for _ in range(3)]
    for job in topic:
        sched.put_nowait(job)
    http = [Job.of(f"user{i}", priority=0) for i in range(2)]
    for job in http:
        sched.put_nowait(job)
    assert drain_order(sched, 5) == http + topic


async def test_resize_lets_waiting_jobs_start_and_bounds_the_queue() -> None:
    sched: FairScheduler[Job] = FairScheduler(max_running=1, max_per_user=10, max_queued=10)
    jobs = [Job.of("u") for _ in range(3)]
    for job in jobs:
        sched.put_nowait(job)
    assert sched.next_nowait() is jobs[0] and sched.next_nowait() is None
    waiter = asyncio.ensure_future(sched.next())
    await asyncio.sleep(0)
    sched.resize(max_running=2, max_queued=1)
    assert await asyncio.wait_for(waiter, 5) is jobs[1]
    # One job queued: a put now waits for room.
    put = asyncio.ensure_future(sched.put(Job.of("v")))
    await asyncio.sleep(0)
    assert not put.done()
    sched.remove(jobs[2].request_id)
    await asyncio.wait_for(put, 5)


@dataclass(frozen=True)
class ChunkJob(Job):
    group: tuple[str, int] | None = None


def test_a_groups_cap_bounds_its_jobs_at_once_and_other_users_go_on() -> None:
    sched: FairScheduler[Job] = FairScheduler(max_running=10, max_per_user=10, max_queued=100)
    chunks = [ChunkJob("ann", 1, f"doc~0.{i}", 1, ("doc", 2)) for i in range(5)]
    for job in chunks:
        sched.put_nowait(job)
    short = Job.of("bob")
    sched.put_nowait(short)
    started = [sched.next_nowait(), sched.next_nowait(), sched.next_nowait()]
    # Two of the document's calls at once and the other user's job; the third call waits.
    assert set(started) == {chunks[0], chunks[1], short}
    assert sched.next_nowait() is None
    sched.done(chunks[0])
    assert sched.next_nowait() == chunks[2]


async def test_grouped_jobs_do_not_fill_the_queue_for_other_jobs() -> None:
    sched: FairScheduler[Job] = FairScheduler(max_running=1, max_per_user=1, max_queued=2)
    for i in range(5):
        await asyncio.wait_for(sched.put(ChunkJob("ann", 1, f"doc~0.{i}", 1, ("doc", 1))), 1)
    await asyncio.wait_for(sched.put(Job.of("bob")), 1)
    await asyncio.wait_for(sched.put(Job.of("cy")), 1)
    blocked = asyncio.ensure_future(sched.put(Job.of("dee")))
    await asyncio.sleep(0)
    assert not blocked.done() and sched.queued == 7
    blocked.cancel()


def test_grouped_jobs_together_hold_at_most_half_the_slots() -> None:
    sched: FairScheduler[Job] = FairScheduler(max_running=4, max_per_user=4, max_queued=100)
    for doc in ("a", "b"):
        for i in range(3):
            sched.put_nowait(ChunkJob(f"user-{doc}", 1, f"{doc}~0.{i}", 1, (doc, 3)))
    started = [sched.next_nowait(), sched.next_nowait()]
    assert all(isinstance(j, ChunkJob) for j in started)
    # Two slots left, but only for jobs outside any group.
    assert sched.next_nowait() is None
    short = Job.of("bob")
    sched.put_nowait(short)
    assert sched.next_nowait() == short
