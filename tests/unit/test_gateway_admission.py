from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.admission import AdmissionController, TokenBucket
from gateway.errors import Overloaded, RateLimited
from pipeline.tiers import Tier

FREE = Tier("free", 3, 1_000, 8_000, 300, 1, 1.0, 30.0, "reject")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@given(
    st.floats(1, 1e6),
    st.lists(st.tuples(st.floats(0, 120), st.floats(0, 1e6)), max_size=30),
)
def test_a_bucket_never_exceeds_its_capacity_and_waits_are_exact(
    capacity: float, steps: list[tuple[float, float]]
) -> None:
    bucket = TokenBucket(capacity, 60.0, 0.0)
    now = 0.0
    for dt, amount in steps:
        now += dt
        wait = bucket.wait_for(amount, now)
        assert bucket.level <= capacity
        if amount > capacity:
            assert math.isinf(wait)
        elif wait == 0:
            bucket.take(amount, now)
            assert bucket.level >= -1e-6
        else:
            # After exactly the announced wait, the amount is there.
            assert bucket.wait_for(amount, now + wait + 1e-6) == 0


async def test_requests_per_minute_are_limited_with_a_retry_after() -> None:
    clock = Clock()
    admission = AdmissionController({"free": FREE}, clock=clock)
    tickets = [await admission.admit("u", "free", 10) for _ in range(3)]
    with pytest.raises(RateLimited) as caught:
        await admission.admit("u", "free", 10)
    assert caught.value.retriable
    assert caught.value.retry_after_s == pytest.approx(20.0)  # one request refills in 60/3 s
    # Another user is not affected.
    await admission.admit("v", "free", 10)
    clock.now = 20.0
    await admission.admit("u", "free", 10)
    for ticket in tickets:
        ticket.settle(10)


async def test_tokens_are_reserved_and_the_unused_part_is_given_back() -> None:
    clock = Clock()
    admission = AdmissionController({"free": FREE}, clock=clock)
    ticket = await admission.admit("u", "free", 900)
    with pytest.raises(RateLimited):
        await admission.admit("u", "free", 200)  # 900 reserved of 1000/min
    ticket.settle(100)  # it used only 100: 800 come back
    ticket.settle(100)  # settling twice changes nothing
    await admission.admit("u", "free", 200)


async def test_a_request_above_the_tiers_minute_is_never_admitted() -> None:
    admission = AdmissionController({"free": FREE})
    with pytest.raises(RateLimited) as caught:
        await admission.admit("u", "free", 5_000)
    assert not caught.value.retriable


async def test_in_flight_bound_gives_overloaded() -> None:
    admission = AdmissionController({"free": FREE}, max_inflight=2)
    first = await admission.admit("a", "free", 1)
    await admission.admit("b", "free", 1)
    with pytest.raises(Overloaded) as caught:
        await admission.admit("c", "free", 1)
    assert caught.value.retry_after_s
    first.settle()
    await admission.admit("c", "free", 1)
