from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from pipeline.worker.inference.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("sumstream_circuit_breaker_state", {"upstream": name})


def test_opens_after_consecutive_failures_then_half_opens_and_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("t-cycle", failure_threshold=3, reset_s=5.0, clock=clock)
    assert breaker.state is BreakerState.CLOSED and gauge("t-cycle") == 0
    with caplog.at_level(logging.INFO, logger="sumstream.breaker"):
        breaker.record_failure()
        breaker.record_failure()
        assert breaker.allow()
        breaker.record_failure()
        assert breaker.state is BreakerState.OPEN and gauge("t-cycle") == 2
        assert not breaker.allow()
        clock.now += 5.0
        assert breaker.state is BreakerState.HALF_OPEN and gauge("t-cycle") == 1
        assert breaker.allow()  # the probe
        assert not breaker.allow()
        breaker.record_success()
        assert breaker.state is BreakerState.CLOSED and gauge("t-cycle") == 0
    states = [(r.upstream, r.state) for r in caplog.records]  # type: ignore[attr-defined]
    assert states == [("t-cycle", "open"), ("t-cycle", "half_open"), ("t-cycle", "closed")]


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker("t-reset", failure_threshold=2, reset_s=1.0, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_failed_probe_reopens_for_another_period() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("t-reopen", failure_threshold=1, reset_s=2.0, clock=clock)
    breaker.record_failure()
    clock.now += 2.0
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()


def test_abandoned_probe_frees_the_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("t-abandon", failure_threshold=1, reset_s=1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()
    assert not breaker.allow()
    breaker.record_abandoned()
    assert breaker.allow()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(["allow", "success", "failure", "abandon", "tick"]),
        max_size=80,
    )
)
def test_half_open_lets_exactly_one_probe_through(ops: list[str]) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("t-prop", failure_threshold=2, reset_s=1.0, clock=clock)
    probes = 0
    for op in ops:
        if op == "allow":
            state = breaker.state
            allowed = breaker.allow()
            if state is BreakerState.OPEN:
                assert not allowed
            if state is BreakerState.CLOSED:
                assert allowed
            if state is BreakerState.HALF_OPEN and allowed:
                probes += 1
                assert probes == 1
        elif op == "success":
            breaker.record_success()
            probes = 0
        elif op == "failure":
            breaker.record_failure()
            if breaker.state is not BreakerState.HALF_OPEN:
                probes = 0
        elif op == "abandon":
            breaker.record_abandoned()
            probes = 0
        else:
            clock.now += 0.6


async def test_waiters_get_through_after_reset_and_one_probe_at_a_time() -> None:
    breaker = CircuitBreaker("t-wait", failure_threshold=1, reset_s=0.05)
    breaker.record_failure()
    order: list[str] = []

    async def waiter(name: str) -> None:
        await breaker.wait_closed_or_probe()
        order.append(name)

    tasks = [asyncio.create_task(waiter(f"w{i}")) for i in range(3)]
    await asyncio.sleep(0.2)
    # After reset_s exactly one waiter (the probe) got through; the others wait for its verdict.
    assert len(order) == 1 and breaker.state is BreakerState.HALF_OPEN
    breaker.record_success()
    await asyncio.wait_for(asyncio.gather(*tasks), 2.0)
    assert sorted(order) == ["w0", "w1", "w2"]


async def test_waiter_is_cancellable() -> None:
    breaker = CircuitBreaker("t-cancel", failure_threshold=1, reset_s=60.0)
    breaker.record_failure()
    task = asyncio.create_task(breaker.wait_closed_or_probe())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_wait_not_open_holds_while_open_and_lets_everyone_through_half_open() -> None:
    # The inference stage stops taking jobs with this: all of them may queue once it half-opens
    # (only one becomes the probe), none while it is open.
    breaker = CircuitBreaker("t-intake", failure_threshold=1, reset_s=0.2)
    await asyncio.wait_for(breaker.wait_not_open(), 1.0)  # closed: at once
    breaker.record_failure()
    waiters = [asyncio.create_task(breaker.wait_not_open()) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiters)
    await asyncio.wait_for(asyncio.gather(*waiters), 2.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the probe slot is still free for whoever calls first


async def test_wait_not_open_returns_when_the_breaker_closes_early() -> None:
    breaker = CircuitBreaker("t-intake-close", failure_threshold=1, reset_s=60.0)
    breaker.record_failure()
    waiter = asyncio.create_task(breaker.wait_not_open())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    breaker.record_success()  # e.g. a call started before it opened succeeded
    await asyncio.wait_for(waiter, 1.0)


def test_closing_after_an_opening_calls_on_recovered_once() -> None:
    clock = FakeClock()
    recovered: list[bool] = []
    breaker = CircuitBreaker(
        "t-recovered",
        failure_threshold=1,
        reset_s=1.0,
        clock=clock,
        on_recovered=lambda: recovered.append(True),
    )
    breaker.record_success()  # closed already: nothing recovered
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()  # the probe
    breaker.record_success()
    breaker.record_success()
    assert recovered == [True]
