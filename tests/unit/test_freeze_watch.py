"""The freeze watch: a gap in the process's run longer than the limit is noticed once."""

from __future__ import annotations

from pipeline.worker.inflight.freeze import FreezeWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_gap_beyond_the_limit_calls_on_wake_once() -> None:
    clock, woke = Clock(), []
    watch = FreezeWatch(8.0, lambda: woke.append(clock.now), clock=clock)
    for _ in range(40):  # a running loop: checks a quarter second apart
        clock.now += 0.25
        watch.check()
        watch._last = clock.now  # what the ticking task does after its check
    assert woke == []
    clock.now += 9.0  # stopped for longer than the limit
    watch.check()
    watch.check()  # the emit after the ticking task (or the other way round)
    assert woke == [clock.now]


def test_a_gap_within_the_limit_is_no_freeze() -> None:
    clock, woke = Clock(), []
    watch = FreezeWatch(8.0, lambda: woke.append(clock.now), clock=clock)
    clock.now += 7.5
    watch.check()
    assert woke == []
