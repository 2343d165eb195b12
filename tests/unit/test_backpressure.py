"""Queue-wait estimate and admission decisions (gateway/admission/backpressure.py), no Kafka."""

from __future__ import annotations

import asyncio
import math

import pytest
from confluent_kafka import KafkaError, KafkaException
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge

from gateway.admission.backpressure import LagMonitor, QueueWaitEstimator, ThroughputMeter
from gateway.http.errors import Overloaded
from pipeline.core.tiers import Tier
from pipeline.kafka.admin import kafka_error


def tier(max_wait_s: float = 30.0) -> Tier:
    return Tier(
        name="t",
        rpm=10,
        tpm=1_000,
        max_input_tokens=100,
        max_output_tokens=100,
        weight=1,
        monthly_budget_usd=1.0,
        max_queue_wait_s=max_wait_s,
        on_input_too_large="reject",
    )


def lag(preprocess: int = 0, inference: int = 0, postprocess: int = 0) -> dict[str, int]:
    return {"preprocess": preprocess, "inference": inference, "postprocess": postprocess}


def test_wait_is_requests_ahead_over_throughput() -> None:
    est = QueueWaitEstimator()
    # Token events waiting for postprocess are not requests ahead of a new one.
    assert est.update(lag(preprocess=6, inference=14, postprocess=500), 2.0, now=0.0) == 10.0
    assert est.queue_position() == 21
    assert est.decide(tier(30.0), now=0.5).action == "admit"


def test_unknown_throughput_uses_the_floor_not_infinity() -> None:
    est = QueueWaitEstimator(min_rate_per_s=2.0)
    assert est.update(lag(inference=10), 0.0, now=0.0) == 5.0


def test_rises_fast_and_falls_slowly() -> None:
    est = QueueWaitEstimator(rise_s=1.0, fall_s=5.0)
    est.update(lag(), 1.0, now=0.0)
    up = est.update(lag(inference=100), 1.0, now=1.0)
    assert up == pytest.approx(100 * (1 - math.exp(-1)))
    est2 = QueueWaitEstimator(rise_s=1.0, fall_s=5.0)
    est2.update(lag(inference=100), 1.0, now=0.0)
    down = est2.update(lag(), 1.0, now=1.0)
    assert down == pytest.approx(100 * math.exp(-1 / 5))


def test_stalled_pipeline_waits_at_least_as_long_as_the_stall() -> None:
    est = QueueWaitEstimator(min_rate_per_s=10.0, rise_s=0.0, fall_s=0.0)
    est.update(lag(inference=5), 3.0, now=0.0)
    est.update(lag(inference=5), 0.0, now=10.0)
    assert est.update(lag(inference=5), 0.0, now=40.0) == 40.0
    # Progress again: back to lag / throughput.
    assert est.update(lag(inference=5), 1.0, now=41.0) == pytest.approx(0.5)


def test_ceiling() -> None:
    est = QueueWaitEstimator(ceiling_s=60.0)
    assert est.update(lag(inference=10_000), 1.0, now=0.0) == 60.0


def test_shed_with_retry_after_from_the_excess() -> None:
    est = QueueWaitEstimator(min_retry_s=1.0, max_retry_s=120.0)
    est.update(lag(inference=90), 2.0, now=0.0)  # 45 s
    decision = est.decide(tier(30.0), now=1.0)
    assert decision.action == "shed"
    assert decision.retry_after_s == 15.0
    error = decision.error()
    assert isinstance(error, Overloaded)
    assert (error.status, error.retry_after_s) == (503, 15.0)
    # A tier that tolerates longer waits is still admitted.
    assert est.decide(tier(60.0), now=1.0).action == "admit"
    assert est.decide(tier(60.0), now=1.0).error() is None


def test_retry_after_is_clamped() -> None:
    est = QueueWaitEstimator(min_retry_s=2.0, max_retry_s=30.0)
    est.update(lag(inference=31), 1.0, now=0.0)
    assert est.decide(tier(30.0), now=0.0).retry_after_s == 2.0
    est.update(lag(inference=500), 1.0, now=100.0)
    assert est.decide(tier(30.0), now=100.0).retry_after_s == 30.0


def test_degrade_between_the_lower_threshold_and_the_limit() -> None:
    est = QueueWaitEstimator(degrade_policy="shorter_output", degrade_ratio=0.5)
    est.update(lag(inference=20), 1.0, now=0.0)  # 20 s of a 30 s limit
    decision = est.decide(tier(30.0), now=0.0)
    assert (decision.action, decision.degrade) == ("degrade", "shorter_output")
    plain = QueueWaitEstimator()
    plain.update(lag(inference=20), 1.0, now=0.0)
    assert plain.decide(tier(30.0), now=0.0).action == "admit"


def test_admissions_between_samples_count() -> None:
    est = QueueWaitEstimator()
    est.update(lag(inference=10), 1.0, now=0.0)
    est.note_admitted(25)
    assert est.queue_position() == 36
    assert est.decide(tier(30.0), now=0.1).action == "shed"
    est.update(lag(inference=10), 1.0, now=1.0)
    assert est.queue_position() == 11


def test_no_recent_sample_fails_open() -> None:
    est = QueueWaitEstimator(stale_after_s=5.0)
    assert est.decide(tier(0.0), now=0.0).stale
    est.update(lag(inference=1_000), 1.0, now=0.0)
    assert est.decide(tier(30.0), now=4.0).action == "shed"
    late = est.decide(tier(30.0), now=6.0)
    assert (late.action, late.stale) == ("admit", True)


def test_throughput_meter_rolls() -> None:
    meter = ThroughputMeter(window_s=10.0)
    assert meter.rate() == 0.0
    for second in range(21):
        meter.observe(second * 3, float(second))
    assert meter.rate() == pytest.approx(3.0)
    meter.observe(75, 21.0)  # 15 completions in the last second
    assert meter.rate() == pytest.approx((75 - 33) / 10)
    meter.observe(2, 22.0)  # the count went back: start over
    assert meter.rate() == 0.0


samples = st.lists(
    st.tuples(
        st.integers(0, 5_000),
        st.floats(0, 100, allow_nan=False),
        st.floats(0.01, 5, allow_nan=False),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(samples)
def test_estimate_stays_between_zero_and_the_ceiling(seq: list[tuple[int, float, float]]) -> None:
    est = QueueWaitEstimator(ceiling_s=300.0)
    now = 0.0
    for queued, rate, dt in seq:
        now += dt
        before = est.smoothed_s
        after = est.update(lag(inference=queued), rate, now)
        assert 0.0 <= after <= 300.0
        # The rate used: the highest seen recently, never below the floor.
        assert est.rate_per_s >= max(rate, est.min_rate_per_s)
        raw_floor = min(queued / est.rate_per_s, 300.0)
        # The smoothed value moves from where it was towards the sample: it never undershoots
        # both (the sample may be higher than lag / rate while the pipeline is stalled).
        assert after >= min(before, raw_floor) - 1e-9


@settings(max_examples=200, deadline=None)
@given(samples, st.integers(0, 5_000), st.integers(0, 5_000))
def test_more_lag_never_means_a_shorter_wait(
    seq: list[tuple[int, float, float]], a: int, b: int
) -> None:
    low, high = sorted((a, b))
    results = []
    for last in (low, high):
        est = QueueWaitEstimator()
        now = 0.0
        for queued, rate, dt in seq:
            now += dt
            est.update(lag(inference=queued), rate, now)
        results.append(est.update(lag(inference=last), 1.0, now + 1.0))
    assert results[0] <= results[1]


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 600, allow_nan=False), st.floats(0, 300, allow_nan=False))
def test_decision_follows_the_tier_limit(wait: float, limit: float) -> None:
    est = QueueWaitEstimator(ceiling_s=600.0, min_rate_per_s=1.0)
    est.update({"inference": 0}, 1.0, now=0.0)
    est.smoothed_s = wait
    decision = est.decide(tier(limit), now=0.0)
    if wait > limit:
        assert decision.action == "shed"
        assert decision.retry_after_s is not None
        assert 1.0 <= decision.retry_after_s <= 120.0
    else:
        assert decision.action == "admit"


# -- the monitor, with fake readers ------------------------------------------------------------


def _gauge() -> Gauge:
    return Gauge("lag_test", "lag", ["stage"], registry=CollectorRegistry())


async def test_monitor_feeds_the_estimator_and_the_gauge() -> None:
    completed = iter([100, 110, 130])
    times = iter([0.0, 1.0, 2.0])
    est = QueueWaitEstimator(rise_s=0.0, fall_s=0.0)
    gauge = _gauge()
    monitor = LagMonitor(
        est,
        lambda: lag(inference=30),
        lambda: next(completed),
        gauge=gauge,
        clock=lambda: next(times),
    )
    for _ in range(3):
        assert await monitor.sample()
    assert monitor.meter.rate() == 15.0
    assert est.smoothed_s == 2.0
    assert gauge.labels(stage="inference")._value.get() == 30


async def test_monitor_survives_failing_reads() -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("broker down")

    est = QueueWaitEstimator()
    monitor = LagMonitor(est, broken, lambda: 0, gauge=_gauge())
    assert not await monitor.sample()
    assert isinstance(monitor.last_error, RuntimeError)
    assert est.decide(tier(), now=0.0).stale


async def test_monitor_start_stop_samples_in_the_background() -> None:
    sampled = asyncio.Event()
    loop = asyncio.get_running_loop()

    def read() -> dict[str, int]:
        loop.call_soon_threadsafe(sampled.set)
        return lag(preprocess=3)

    est = QueueWaitEstimator()
    async with LagMonitor(est, read, lambda: 0, interval_s=0.05, gauge=_gauge()):
        await asyncio.wait_for(sampled.wait(), 10)
    assert est.queued == 3


def test_a_burst_after_a_quiet_spell_is_measured_against_the_capacity_seen_before() -> None:
    est = QueueWaitEstimator(min_rate_per_s=1.0, rise_s=0.0, fall_s=0.0, capacity_memory_s=600)
    est.update(lag(inference=40), 8.0, now=0.0)  # busy: 8 completions a second
    est.update(lag(), 0.2, now=60.0)  # quiet: the rate is only the arrivals now
    burst = est.update(lag(inference=40), 0.2, now=61.0)
    assert burst == pytest.approx(40 / (8.0 * math.exp(-61 / 600)))
    # Without the memory, the same burst looks like a 40 s queue.
    forgetful = QueueWaitEstimator(min_rate_per_s=1.0, rise_s=0.0, fall_s=0.0, capacity_memory_s=0)
    forgetful.update(lag(inference=40), 8.0, now=0.0)
    assert forgetful.update(lag(inference=40), 0.2, now=61.0) == pytest.approx(40.0)


def test_a_stall_is_caught_whatever_the_capacity_remembered() -> None:
    est = QueueWaitEstimator(rise_s=0.0, fall_s=0.0)
    est.update(lag(inference=4), 50.0, now=0.0)
    est.update(lag(inference=4), 0.0, now=1.0)
    # Nothing completed since the sample at 0 s: a 31 s stall, not 4 / 50 per second.
    assert est.update(lag(inference=4), 0.0, now=31.0) == pytest.approx(31.0)


def test_a_long_staleness_sheds_new_work_with_a_retry_after() -> None:
    est = QueueWaitEstimator(stale_after_s=5.0, fail_closed_after_s=60.0)
    est.update(lag(), 1.0, now=0.0)
    blind = est.decide(tier(30.0), now=30.0)
    assert (blind.action, blind.stale) == ("admit", True)  # fails open for a while
    closed = est.decide(tier(30.0), now=61.0)
    assert (closed.action, closed.stale, closed.retry_after_s) == ("shed", True, 5.0)
    error = closed.error()
    assert isinstance(error, Overloaded) and "unknown" in str(error)
    est.update(lag(), 1.0, now=62.0)
    assert est.decide(tier(30.0), now=62.5).action == "admit"


def test_never_sampled_counts_as_stale_from_the_first_decision() -> None:
    est = QueueWaitEstimator(stale_after_s=5.0, fail_closed_after_s=60.0)
    assert est.decide(tier(30.0), now=1_000.0).action == "admit"
    assert est.decide(tier(30.0), now=1_059.0).action == "admit"
    assert est.decide(tier(30.0), now=1_061.0).action == "shed"


def fenced() -> Exception:
    """What CompletionCounter.read raises when the broker fenced its cached leader epoch."""
    cause = KafkaException(KafkaError(KafkaError.FENCED_LEADER_EPOCH))
    try:
        raise kafka_error("reading the end of results[0]", cause) from cause
    except Exception as exc:
        return exc


async def test_monitor_rebuilds_its_clients_when_the_leader_epoch_is_fenced() -> None:
    rebuilt: list[int] = []
    failures = [fenced()]

    def completed() -> int:
        if failures:
            raise failures.pop()
        return 7

    est = QueueWaitEstimator()
    monitor = LagMonitor(
        est, lambda: lag(inference=4), completed, gauge=_gauge(), rebuild=lambda: rebuilt.append(1)
    )
    assert not await monitor.sample()
    assert rebuilt == [1]  # at the first such failure, not after rebuild_after of them
    assert await monitor.sample()
    assert est.queued == 4 and monitor.last_error is None


async def test_monitor_exports_the_age_of_its_last_good_sample() -> None:
    registry = CollectorRegistry()
    age = Gauge("age_test", "age", registry=registry)
    monitor = LagMonitor(
        QueueWaitEstimator(), lambda: lag(), lambda: 0, gauge=_gauge(), age_gauge=age
    )
    assert await monitor.sample()
    first = registry.get_sample_value("age_test")
    assert first is not None and first < 60.0
