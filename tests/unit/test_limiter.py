"""The learned limit of one upstream: AIMD, the shared pause, pacing from the buckets, shares."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.llm.ratelimit import Bucket, RateLimits
from pipeline.worker.inference.limiter import Cost, UpstreamLimiter

CALL = Cost(input_tokens=100, output_tokens=50)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: FakeClock, **kwargs: int) -> UpstreamLimiter:
    """A limiter whose every slot is in use (only a limit in use grows)."""
    limits = UpstreamLimiter(ceiling=kwargs.pop("ceiling", 64), initial=4, clock=clock, **kwargs)
    limits.in_flight = 1_000
    return limits


def test_a_limit_not_in_use_does_not_grow() -> None:
    clock = FakeClock()
    limits = UpstreamLimiter(ceiling=64, initial=4, clock=clock)
    for _ in range(10):
        limits.started(CALL)
        limits.succeeded(clock.now, 0.2)
        limits.ended()
    assert limits.allowed == 4
    for _ in range(3):
        limits.started(CALL)
    limits.succeeded(clock.now, 0.2)  # 3 of 4 in use: nearly all
    assert limits.allowed == 5


def test_slow_start_adds_one_per_success_until_the_first_refusal_then_decreases() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    for _ in range(5):
        limits.succeeded(clock.now, 0.2)
    assert limits.allowed == 9
    limits.refused(clock.now - 0.1, retry_after_s=None)
    assert limits.allowed == 6 and not limits.slow_start  # 9 x 0.7
    # Back fast (one per success) to just below where it was refused...
    for _ in range(2):
        limits.succeeded(clock.now, 0.2)
    assert limits.allowed == 8
    # ...then congestion avoidance, slowed down past the refused limit.
    for _ in range(8):
        limits.succeeded(clock.now, 0.2)
    assert limits.allowed == 8


def test_a_refusal_by_a_drained_bucket_pauses_but_keeps_the_concurrency_limit() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    limits.limit = 20.0
    started = clock.now
    clock.now += 0.5
    # The 429's own report: the token bucket is empty; its refill is the pacing's business.
    limits.reported(RateLimits(seen_at=clock.now, tokens=Bucket(6_000, 0, clock.now + 30)), started)
    limits.refused(started, retry_after_s=3.0)
    assert limits.allowed == 20
    assert limits.delay_s(CALL) >= 3.0
    # A refusal while every bucket has room is the upstream's concurrency: it decreases.
    clock.now += 5.0
    limits.reported(
        RateLimits(seen_at=clock.now, tokens=Bucket(6_000, 6_000, clock.now)), clock.now
    )
    limits.refused(clock.now, retry_after_s=None)
    assert limits.allowed == 14


def test_refusals_of_calls_started_before_a_decrease_do_not_decrease_again() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    limits.limit = 20.0
    started = clock.now
    clock.now += 1.0
    for _ in range(10):
        limits.refused(started, retry_after_s=None)
    assert limits.allowed == 14
    clock.now += 1.0
    limits.refused(clock.now, retry_after_s=None)
    assert limits.allowed == 9


def test_probing_beyond_the_refused_limit_is_slower_than_climbing_back_to_it() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    limits.limit = 9.0
    limits.refused(clock.now, retry_after_s=None)  # refused at 9: back to 6.3
    successes = 0
    while limits.allowed < 8:
        limits.succeeded(clock.now, 0.2)
        successes += 1
    to_eight = successes
    while limits.allowed < 9:
        limits.succeeded(clock.now, 0.2)
        successes += 1
    assert successes - to_eight >= 2 * to_eight


def test_a_slow_first_token_holds_the_limit() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    limits.succeeded(clock.now, 0.2)
    assert limits.allowed == 5
    limits.succeeded(clock.now, 2.0)  # > 2 x 0.2 + 0.25
    assert limits.allowed == 5
    limits.succeeded(clock.now, 0.5)
    assert limits.allowed == 6


def test_the_limit_never_passes_the_ceiling_nor_drops_below_one() -> None:
    clock = FakeClock()
    limits = limiter(clock, ceiling=6)
    for _ in range(20):
        limits.succeeded(clock.now, 0.1)
    assert limits.allowed == 6
    for _ in range(20):
        clock.now += 1.0
        limits.refused(clock.now, retry_after_s=None)
    assert limits.allowed == 1


@given(st.lists(st.tuples(st.booleans(), st.floats(0.01, 5.0)), max_size=200))
def test_allowed_stays_within_one_and_the_ceiling(events: list[tuple[bool, float]]) -> None:
    clock = FakeClock()
    limits = limiter(clock, ceiling=16)
    for ok, ttft in events:
        clock.now += 0.1
        if ok:
            limits.succeeded(clock.now, ttft)
        else:
            limits.refused(clock.now - ttft, retry_after_s=None)
        assert 1 <= limits.allowed <= 16


def test_retry_after_pauses_every_call_once_until_then() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    limits.refused(clock.now, retry_after_s=2.0)
    limits.refused(clock.now, retry_after_s=1.0)  # a shorter pause does not shorten it
    assert limits.delay_s(CALL) == pytest.approx(2.0)
    clock.now += 2.0
    assert limits.delay_s(CALL) == 0.0


def test_a_call_that_would_overrun_the_token_bucket_waits_for_the_refill() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    # 6,000 tokens per minute = 100 per second; 200 left.
    report = RateLimits(seen_at=clock.now, tokens=Bucket(6_000, 200, clock.now + 58))
    started = limits.started(CALL)  # 150, sent before the report was made
    limits.reported(report, started)
    assert limits.delay_s(CALL) == 0.0
    limits.started(CALL)  # 150 more the report does not know of: 50 left
    assert limits.delay_s(CALL) == pytest.approx(1.0)
    clock.now += 1.0
    assert limits.delay_s(CALL) == 0.0


def test_the_request_bucket_paces_too_and_an_unlimited_one_never_does() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    report = RateLimits(
        seen_at=clock.now,
        requests=Bucket(60, 0, clock.now + 60),
        tokens=Bucket(1_000_000_000, 1_000_000_000, clock.now),
    )
    limits.reported(report, clock.now)
    assert limits.delay_s(CALL) == pytest.approx(1.0)


def test_a_worker_takes_its_share_of_the_buckets_and_the_fleet_ceiling() -> None:
    clock = FakeClock()
    limits = UpstreamLimiter(ceiling=64, initial=8, fleet_ceiling=8, clock=clock)
    limits.reported(RateLimits(seen_at=clock.now, tokens=Bucket(6_000, 200, clock.now)), 0.0)
    assert limits.delay_s(CALL) == 0.0
    limits.set_share(0.5)  # 3 of 6 partitions: 100 of the 200 tokens left, 4 of 8 streams
    assert limits.own_ceiling == 4 and limits.allowed == 4
    assert limits.delay_s(CALL) == pytest.approx(1.0)  # 50 more at 50 per second
    # The other worker died: this one owns every partition again.
    limits.set_share(1.0)
    assert limits.own_ceiling == 8 and limits.allowed == 8


def test_expected_output_follows_recent_replies_within_max_tokens() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    assert limits.expected_output(300) == 300
    limits.observe_output(80)
    assert limits.expected_output(300) == 80
    assert limits.expected_output(50) == 50


async def test_wait_for_room_wakes_when_a_report_makes_room() -> None:
    clock = FakeClock()
    limits = UpstreamLimiter(ceiling=64, initial=4, clock=clock)
    limits.reported(RateLimits(seen_at=clock.now, requests=Bucket(1, 0, clock.now + 60)), 0.0)
    waiter = asyncio.create_task(limits.wait_for_room(CALL))
    await asyncio.sleep(0)
    assert not waiter.done()
    limits.reported(RateLimits(seen_at=clock.now + 1, requests=Bucket(1, 1, clock.now)), 0.0)
    assert await asyncio.wait_for(waiter, 5.0) is True
    assert await limits.wait_for_room(CALL) is False


async def test_a_call_waits_while_the_limit_is_full_and_starts_when_one_ends() -> None:
    clock = FakeClock()
    limits = UpstreamLimiter(ceiling=64, initial=4, clock=clock)
    for _ in range(4):
        limits.started(CALL)
    limits.refused(clock.now - 1.0, retry_after_s=None)  # 4 x 0.7: 2 allowed, 4 in flight
    assert limits.allowed == 2 and limits.full
    waiter = asyncio.create_task(limits.wait_for_room(CALL))
    for in_flight in (3, 2):
        limits.ended()
        await asyncio.sleep(0)
        assert limits.in_flight == in_flight and not waiter.done()
    limits.ended()  # 1 in flight: room for one more under the limit of 2
    assert await asyncio.wait_for(waiter, 5.0) is True
    assert await limits.wait_for_room(CALL) is False


def test_restart_after_an_outage_learns_again_from_the_initial_limit_in_slow_start() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    for _ in range(5):
        clock.now += 1.0
        limits.refused(clock.now, retry_after_s=None)
    assert limits.allowed == 1
    limits.restart()
    assert limits.allowed == 4 and limits.slow_start
    limits.succeeded(clock.now, 0.2)
    assert limits.allowed == 5


def test_a_refusal_cuts_a_grown_limit_to_what_the_upstream_answered_meanwhile() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    limits.limit = 64.0  # grown while the upstream took everything
    for _ in range(8):
        limits.accepted()  # its capacity dropped: 8 streams answered, the rest refused
    limits.refused(clock.now, retry_after_s=None)
    assert limits.allowed == 8
    # Probing past 8 goes slowly: the refusal happened at 9, not at the old 64.
    for _ in range(8):
        limits.succeeded(clock.now, 0.2)
    assert limits.allowed == 8
    limits.ended(accepted=True)
    assert limits.accepted_now == 7


def test_an_answer_without_a_report_ends_the_pacing_by_an_old_one() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    # A drained token bucket paces every call...
    limits.reported(RateLimits(seen_at=clock.now, tokens=Bucket(6_000, 0, clock.now + 60)), 0.0)
    assert limits.delay_s(CALL) > 0
    # ...until an answer comes without any rate-limit headers: the buckets are gone.
    clock.now += 1.0
    limits.reported(RateLimits(seen_at=clock.now), clock.now)
    assert limits.delay_s(CALL) == 0.0


def test_after_a_calm_spell_without_refusals_the_limit_grows_by_slow_start_again() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    limits.limit = 10.0
    limits.refused(clock.now, retry_after_s=None)
    assert limits.allowed == 7 and not limits.slow_start
    clock.now += 5.0
    for _ in range(3):  # within the episode: back to just below 10, then probing slowly
        limits.succeeded(clock.now, 0.2)
    assert limits.allowed == 9 and not limits.slow_start
    clock.now += 20.0
    for _ in range(10):
        limits.succeeded(clock.now, 0.2)
    assert limits.slow_start and limits.allowed >= 18


def _successes_to_grow(limits: UpstreamLimiter, clock: FakeClock) -> int:
    """Successes (ten a second) until the limit grows by one call."""
    start, n = limits.allowed, 0
    while limits.allowed == start:
        clock.now += 0.1
        limits.succeeded(clock.now, 0.2)
        n += 1
    return n


def test_refusals_in_a_row_at_one_level_slow_the_probing_beyond_it_each_time() -> None:
    clock = FakeClock()
    limits = limiter(clock)
    probes = []
    for _ in range(3):  # a hard limit of 8: every probe to 9 is refused
        limits.limit = 9.0
        for _ in range(8):
            limits.accepted()
        limits.refused(clock.now, retry_after_s=None)
        limits.accepted_now = 0
        assert limits.allowed == 6 and not limits.slow_start  # 9 x 0.7
        while limits.allowed < 8:  # back fast to just below the refusal at 9
            limits.succeeded(clock.now, 0.2)
        probes.append(_successes_to_grow(limits, clock))
    assert probes[1] >= 2 * probes[0] - 1 and probes[2] >= 2 * probes[1] - 1
    # A refusal at another level is a new episode: probing at its base pace again.
    limits.limit = 20.0
    for _ in range(16):
        limits.accepted()
    limits.refused(clock.now, retry_after_s=None)
    limits.accepted_now = 0
    assert limits.allowed == 14  # 20 x 0.7, below the 16 answered
    while limits.allowed < 16:
        limits.succeeded(clock.now, 0.2)
    assert _successes_to_grow(limits, clock) <= 2 * 16 * 4


def test_a_worker_with_half_the_partitions_probes_beyond_a_refusal_half_as_fast() -> None:
    probes = []
    for share in (1.0, 0.5):
        clock = FakeClock()
        limits = limiter(clock)
        limits.set_share(share)
        limits.limit = 9.0
        for _ in range(8):
            limits.accepted()
        limits.refused(clock.now, retry_after_s=None)
        limits.accepted_now = 0
        while limits.allowed < 8:
            limits.succeeded(clock.now, 0.2)
        probes.append(_successes_to_grow(limits, clock))
    assert probes[1] >= 2 * probes[0] - 1
