"""The lag monitor on the real broker: lag per stage and completions read from Kafka."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry, Gauge

from gateway.admission.backpressure import CompletionCounter, LagMonitor, QueueWaitEstimator
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames

pytestmark = pytest.mark.integration


async def produce(bootstrap: str, counts: dict[str, int]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for topic, n in counts.items():
            for i in range(n):
                await producer.send_and_wait(topic, b"x", key=f"k{i}".encode())
    finally:
        await producer.stop()


async def test_monitor_reads_lag_and_completions_from_the_broker(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames]
) -> None:
    topics = make_topics(stream_partitions=2, work_partitions=2)
    await produce(kafka_settings.bootstrap_servers, {topics.requests: 5, topics.preprocessed: 2})
    await produce(kafka_settings.bootstrap_servers, {topics.results: 3})
    group = f"g-{uuid.uuid4().hex[:8]}"  # never committed: everything retained is lag
    estimator = QueueWaitEstimator(min_rate_per_s=1.0)
    gauge = Gauge("lag_it", "lag", ["stage"], registry=CollectorRegistry())
    groups = dict.fromkeys(("preprocess", "inference", "postprocess"), group)
    monitor = LagMonitor.from_settings(kafka_settings, estimator, groups, gauge=gauge)
    assert await monitor.sample(), monitor.last_error
    assert estimator.queued == 7
    assert estimator.queue_position() == 8
    assert gauge.labels(stage="preprocess")._value.get() == 5
    assert gauge.labels(stage="inference")._value.get() == 2
    assert CompletionCounter(kafka_settings).read() == 3

    await produce(kafka_settings.bootstrap_servers, {topics.results: 4})
    assert await monitor.sample(), monitor.last_error
    assert monitor.meter.rate() > 0


async def test_missing_topics_make_the_sample_fail_not_the_monitor(
    kafka_settings: KafkaSettings,
) -> None:
    estimator = QueueWaitEstimator()
    gauge = Gauge("lag_it2", "lag", ["stage"], registry=CollectorRegistry())
    monitor = LagMonitor.from_settings(kafka_settings, estimator, gauge=gauge)
    assert not await monitor.sample()
    assert monitor.last_error is not None
    assert estimator.is_stale(0.0)


async def test_after_failures_the_monitor_reads_the_broker_with_rebuilt_clients(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames]
) -> None:
    estimator = QueueWaitEstimator()
    gauge = Gauge("lag_it3", "lag", ["stage"], registry=CollectorRegistry())
    group = f"g-{uuid.uuid4().hex[:8]}"
    groups = dict.fromkeys(("preprocess", "inference", "postprocess"), group)
    monitor = LagMonitor.from_settings(
        kafka_settings, estimator, groups, gauge=gauge, rebuild_after=1
    )
    async with monitor:
        pass  # started and stopped: the clients behind it are closed, sampling still works
    assert not await monitor.sample()  # no topics yet
    assert monitor.rebuilds == 1
    topics = make_topics()
    await produce(kafka_settings.bootstrap_servers, {topics.requests: 3, topics.results: 2})
    assert await monitor.sample(), monitor.last_error
    assert estimator.queued == 3
    assert (monitor.failures, monitor.rebuilds) == (0, 1)
    await monitor.stop()
