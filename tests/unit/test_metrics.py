"""Worker and gateway metrics: conventional names and units, bounded labels, the lag sampler, and
postprocess counting tokens, cost and stage latency from the very result it writes."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge
from prometheus_client.metrics import MetricWrapperBase

import gateway.metrics
import pipeline.core.metrics
from pipeline.core.metrics import LagSampler, PeriodicSampler
from tests.unit.test_postprocess import STREAM, feed, make_stage, results_of

# Labels whose values grow with users, requests or content: never a label
# (docs/architecture.md, "Observability").
UNBOUNDED = {"user", "user_id", "request_id", "id", "key", "api_key", "document", "prompt"}


def declared() -> list[MetricWrapperBase]:
    modules = (pipeline.core.metrics, gateway.metrics)
    return [v for m in modules for v in vars(m).values() if isinstance(v, MetricWrapperBase)]


def families() -> dict[str, str]:
    """name -> type of every sumstream family in the default registry."""
    return {f.name: f.type for f in REGISTRY.collect() if f.name.startswith("sumstream_")}


def test_names_are_prefixed_snake_case_with_conventional_units() -> None:
    found = families()
    assert len(found) >= 25
    for name, kind in found.items():
        assert re.fullmatch(r"sumstream_[a-z0-9]+(_[a-z0-9]+)*", name), name
        if kind == "histogram":
            # Every histogram measures time, in seconds.
            assert name.endswith("_seconds"), name
        if kind == "gauge":
            assert not name.endswith(("_total", "_count", "_sum", "_bucket")), name
    # Counters are exported with the _total suffix.
    sample_names = {s.name for f in REGISTRY.collect() for s in f.samples}
    assert "sumstream_retry_budget_exhausted_total" in sample_names


def test_labels_are_bounded() -> None:
    metrics = declared()
    assert len(metrics) >= 25
    for metric in metrics:
        labels = set(metric._labelnames)
        assert not labels & UNBOUNDED, (metric._name, labels)


def test_section_7_of_the_design_is_covered() -> None:
    found = families()
    for name in (
        "sumstream_gateway_requests",  # request counts by outcome (gateway)
        "sumstream_requests_completed",  # ... and by final status (postprocess)
        "sumstream_stage_duration_seconds",  # queue wait, preprocess, ttft, total...
        "sumstream_inter_token_seconds",
        "sumstream_input_tokens",
        "sumstream_output_tokens",
        "sumstream_cost_micro_usd",
        "sumstream_retries",
        "sumstream_upstream_errors",
        "sumstream_circuit_breaker_state",
        "sumstream_inference_inflight",
        "sumstream_consumer_lag_records",
        "sumstream_gateway_sse_clients",
        "sumstream_gateway_overhead_seconds",
    ):
        assert name in found, name
    assert set(pipeline.core.metrics.COST_MICRO_USD._labelnames) == {"tier", "model"}
    assert set(pipeline.core.metrics.OUTPUT_TOKENS._labelnames) == {"tier", "model"}


# --- postprocess ------------------------------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_postprocess_counts_what_the_result_it_wrote_says() -> None:
    labels = {"tier": "pro", "model": "claude-haiku-4-5"}
    names = ("sumstream_input_tokens_total", "sumstream_output_tokens_total")
    before = {n: sample(n, **labels) for n in (*names, "sumstream_cost_micro_usd_total")}
    stages = ("queue_wait", "preprocess", "inference_queue", "ttft", "generation", "total")
    counts = {s: sample("sumstream_stage_duration_seconds_count", stage=s) for s in stages}
    sums = {s: sample("sumstream_stage_duration_seconds_sum", stage=s) for s in stages}
    completed = sample("sumstream_requests_completed_total", tier="pro", status="COMPLETED")

    stage, results, _, _ = make_stage()
    await feed(stage, STREAM)
    [result] = results_of(results)

    usage = result["usage"]
    assert usage["cost_micro_usd"] > 0
    added = {n: sample(n, **labels) - before[n] for n in before}
    assert added == {
        "sumstream_input_tokens_total": usage["input_tokens"],
        "sumstream_output_tokens_total": usage["output_tokens"],
        "sumstream_cost_micro_usd_total": usage["cost_micro_usd"],
    }
    assert sample("sumstream_requests_completed_total", tier="pro", status="COMPLETED") == (
        completed + 1
    )
    for name in stages:
        assert sample("sumstream_stage_duration_seconds_count", stage=name) == counts[name] + 1
        observed = sample("sumstream_stage_duration_seconds_sum", stage=name) - sums[name]
        assert observed == pytest.approx(result["latency_ms"][name] / 1000)

    # A duplicate terminal event is not counted twice.
    await feed(stage, STREAM[-1:])
    assert (
        sample("sumstream_output_tokens_total", **labels) - before[names[1]]
        == (usage["output_tokens"])
    )


# --- the lag sampler --------------------------------------------------------------------------


def private_gauge() -> tuple[Gauge, CollectorRegistry]:
    registry = CollectorRegistry()
    return Gauge("lag_records", "lag", ["stage"], registry=registry), registry


async def test_lag_sampler_sets_the_gauge_per_stage() -> None:
    gauge, registry = private_gauge()
    sampler = LagSampler(lambda: {"preprocess": 3, "inference": 0}, gauge=gauge)
    assert await sampler.sample()
    assert registry.get_sample_value("lag_records", {"stage": "preprocess"}) == 3
    assert registry.get_sample_value("lag_records", {"stage": "inference"}) == 0


async def test_a_failed_lag_sample_keeps_the_last_values_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gauge, registry = private_gauge()
    answers: list[dict[str, int] | Exception] = [
        {"preprocess": 5},
        ConnectionError("broker away"),
        ConnectionError("still away"),
        {"preprocess": 1},
    ]

    def read() -> dict[str, int]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    sampler = LagSampler(read, gauge=gauge)
    caplog.set_level(logging.INFO, "sumstream.metrics")
    assert await sampler.sample()
    assert not await sampler.sample()
    assert not await sampler.sample()
    assert isinstance(sampler.last_error, ConnectionError)
    assert registry.get_sample_value("lag_records", {"stage": "preprocess"}) == 5
    assert [r.message for r in caplog.records] == ["lag sample failed"]
    assert await sampler.sample()
    assert sampler.last_error is None
    assert registry.get_sample_value("lag_records", {"stage": "preprocess"}) == 1
    assert [r.message for r in caplog.records][-1] == "lag sampling recovered"


async def test_lag_sampler_samples_until_stopped() -> None:
    gauge, _ = private_gauge()
    reads = 0
    twice = asyncio.Event()

    def read() -> dict[str, int]:
        nonlocal reads
        reads += 1
        if reads >= 2:
            twice.set()
        return {"postprocess": reads}

    sampler = LagSampler(read, interval_s=0.01, gauge=gauge)
    await sampler.start()
    try:
        await asyncio.wait_for(twice.wait(), 10)
    finally:
        await sampler.stop()
    done = reads
    await asyncio.sleep(0.05)
    assert reads == done  # nothing runs after stop


class FlakyRead:
    """A lag read that fails ``failures`` times with ``error``, then answers; counts rebuilds."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.rebuilds = 0
        self.closed = 0

    def read(self) -> dict[str, int]:
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        return {"preprocess": 2}

    def rebuild(self) -> None:
        self.rebuilds += 1

    def close(self) -> None:
        self.closed += 1


async def test_a_sampler_rebuilds_its_clients_after_every_n_failures_in_a_row() -> None:
    gauge, registry = private_gauge()
    flaky = FlakyRead(5, ConnectionError("broker away"))
    sampler = LagSampler(flaky.read, gauge=gauge, rebuild=flaky.rebuild)
    # rebuild_after defaults to 3: the 3rd failure rebuilds, the 4th and 5th do not yet.
    assert [await sampler.sample() for _ in range(5)] == [False] * 5
    assert (flaky.rebuilds, sampler.rebuilds, sampler.failures) == (1, 1, 5)
    assert await sampler.sample()
    assert sampler.failures == 0
    assert registry.get_sample_value("lag_records", {"stage": "preprocess"}) == 2


async def test_a_stale_metadata_error_rebuilds_at_once() -> None:
    gauge, _ = private_gauge()
    flaky = FlakyRead(1, LookupError("leader epoch fenced"))
    sampler = LagSampler(
        flaky.read,
        gauge=gauge,
        rebuild=flaky.rebuild,
        is_stale=lambda exc: isinstance(exc, LookupError),
    )
    assert not await sampler.sample()
    assert flaky.rebuilds == 1
    assert await sampler.sample()


async def test_a_failing_rebuild_is_tried_again_on_the_next_failure() -> None:
    gauge, _ = private_gauge()
    flaky = FlakyRead(3, LookupError("stale"))
    attempts = 0

    def rebuild() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("cannot connect yet")

    sampler = LagSampler(flaky.read, gauge=gauge, rebuild=rebuild, is_stale=lambda exc: True)
    assert not await sampler.sample()
    assert not await sampler.sample()
    assert (attempts, sampler.rebuilds) == (2, 1)


class Discarding(PeriodicSampler[dict[str, int]]):
    def apply(self, reading: dict[str, int]) -> None:
        pass


async def test_sample_age_counts_from_the_last_good_sample() -> None:
    now = 100.0
    flaky = FlakyRead(0, ConnectionError())
    sampler = Discarding(flaky.read, interval_s=1.0, name="t", age_clock=lambda: now)
    now = 130.0
    assert sampler.sample_age_s() == 30.0  # never sampled: counted from construction
    assert await sampler.sample()
    assert sampler.sample_age_s() == 0.0
    flaky.failures = 1
    now = 145.0
    assert not await sampler.sample()
    assert sampler.sample_age_s() == 15.0


async def test_stop_closes_the_clients_behind_the_reads() -> None:
    flaky = FlakyRead(0, ConnectionError())
    async with Discarding(flaky.read, interval_s=60.0, name="t", close=flaky.close):
        assert flaky.closed == 0
    assert flaky.closed == 1
