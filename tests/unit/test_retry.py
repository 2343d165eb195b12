from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.worker.inference.retry import RetryBudget, backoff_delay


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_allows_ratio_of_requests_plus_floor() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.1, min_retries_per_window=2, window_s=10.0, clock=clock)
    for _ in range(50):
        budget.deposit()
    granted = sum(budget.try_withdraw() for _ in range(100))
    assert granted == 5 + 2


def test_budget_credit_expires_after_the_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.5, min_retries_per_window=0, window_s=10.0, clock=clock)
    for _ in range(10):
        budget.deposit()
    assert budget.available == 5
    clock.now += 10.0
    assert budget.available == 0
    assert not budget.try_withdraw()


def test_floor_refills_only_after_a_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.1, min_retries_per_window=3, window_s=10.0, clock=clock)
    assert [budget.try_withdraw() for _ in range(4)] == [True, True, True, False]
    clock.now += 5.0
    assert not budget.try_withdraw()
    clock.now += 5.0
    assert budget.try_withdraw()


def test_zero_ratio_gives_only_the_floor() -> None:
    budget = RetryBudget(0.0, min_retries_per_window=1, window_s=1.0, clock=FakeClock())
    for _ in range(1000):
        budget.deposit()
    assert [budget.try_withdraw(), budget.try_withdraw()] == [True, False]


def test_invalid_budget_arguments() -> None:
    with pytest.raises(ValueError):
        RetryBudget(1.5)
    with pytest.raises(ValueError):
        RetryBudget(0.1, window_s=0)


# One operation: (seconds to advance the clock, True = a request deposits / False = a retry asks).
operations = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=3.0), st.booleans()), max_size=400
)


@settings(max_examples=200, deadline=None)
@given(
    ops=operations,
    ratio=st.sampled_from([0.0, 0.05, 0.1, 0.25, 1.0]),
    floor=st.integers(min_value=0, max_value=5),
    window=st.floats(min_value=0.5, max_value=20.0),
)
def test_budget_never_exceeds_ratio_times_requests_plus_floor(
    ops: list[tuple[float, bool]], ratio: float, floor: int, window: float
) -> None:
    clock = FakeClock()
    start = clock.now
    budget = RetryBudget(ratio, min_retries_per_window=floor, window_s=window, clock=clock)
    deposits = withdrawals = 0
    for advance, is_request in ops:
        clock.now += advance
        if is_request:
            budget.deposit()
            deposits += 1
        elif budget.try_withdraw():
            withdrawals += 1
    elapsed = clock.now - start
    # The budget compares absolute clock readings, the test a difference of them: the two can
    # round differently at an exact window boundary, so the boundary counts as reached.
    windows = math.floor(elapsed / window + 1e-9) + 1
    assert withdrawals <= ratio * deposits + floor * windows + 1e-9
    if elapsed < window * (1 - 1e-9):
        assert withdrawals <= math.floor(ratio * deposits + 1e-9) + floor


@settings(max_examples=100, deadline=None)
@given(deposits=st.integers(min_value=0, max_value=500), ratio=st.floats(0.0, 1.0))
def test_budget_grants_what_it_promises_within_a_window(deposits: int, ratio: float) -> None:
    budget = RetryBudget(ratio, min_retries_per_window=0, window_s=60.0, clock=FakeClock())
    for _ in range(deposits):
        budget.deposit()
    granted = sum(budget.try_withdraw() for _ in range(deposits + 1))
    assert granted == (deposits * round(ratio * 1000)) // 1000


@settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=200),
    base=st.floats(min_value=0.001, max_value=5.0),
    cap=st.floats(min_value=0.001, max_value=60.0),
    retry_after=st.one_of(st.none(), st.floats(min_value=0.0, max_value=120.0)),
    seed=st.integers(0, 2**32),
)
def test_backoff_is_full_jitter_capped_and_honours_retry_after(
    attempt: int, base: float, cap: float, retry_after: float | None, seed: int
) -> None:
    delay = backoff_delay(
        attempt, base_s=base, cap_s=cap, retry_after_s=retry_after, rng=random.Random(seed)
    )
    ceiling = min(cap, base * 2 ** (attempt - 1))
    if retry_after is not None:
        assert delay >= retry_after
        assert delay <= max(ceiling, retry_after)
    else:
        assert 0.0 <= delay <= ceiling


def test_backoff_grows_exponentially_on_average() -> None:
    rng = random.Random(7)
    means = [
        sum(backoff_delay(a, base_s=0.1, cap_s=100.0, rng=rng) for _ in range(2000)) / 2000
        for a in (1, 2, 3, 4)
    ]
    # Full jitter: the mean is half the ceiling, 0.05 * 2^(attempt-1).
    for attempt, mean in enumerate(means, start=1):
        assert mean == pytest.approx(0.05 * 2 ** (attempt - 1), rel=0.1)
