"""Backpressure at the gateway: estimate a new request's queue wait from consumer lag.

The queue is the log (docs/architecture.md, "Lag-driven admission"): requests waiting for
preprocess and inference are the lag of those stages. ``LagMonitor`` samples that lag and the
pipeline's completion count every second; ``QueueWaitEstimator`` turns them into an estimated
wait (lag / throughput, smoothed) and tells admission, per tier, to admit, degrade or shed with
a Retry-After.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec
from prometheus_client import Gauge

from gateway.http.errors import GatewayError, Overloaded
from gateway.metrics import ESTIMATED_WAIT, LAG_SAMPLE_AGE, QUEUE_DEPTH, THROUGHPUT
from pipeline.core.errors import TopicMissingError
from pipeline.core.metrics import CONSUMER_LAG, PeriodicSampler
from pipeline.core.settings import KafkaSettings
from pipeline.core.tiers import Tier
from pipeline.kafka.admin import admin_client, kafka_error, partition_counts
from pipeline.kafka.lag import LagReader, metadata_is_stale

log = logging.getLogger("sumstream.gateway.backpressure")

Action = Literal["admit", "degrade", "shed"]
# Stages whose lag is requests waiting ahead of a new one (postprocess lag counts token events).
QUEUE_STAGES = ("preprocess", "inference")


@dataclass(frozen=True)
class Decision:
    """What admission should do with a new request of one tier, and the figures behind it."""

    action: Action
    estimated_wait_s: float
    queue_position: int
    retry_after_s: float | None = None
    degrade: str | None = None
    # True when no lag sample is recent: the estimate is unknown (admission fails open until
    # the estimator's fail_closed_after_s, then sheds).
    stale: bool = False

    def error(self) -> GatewayError | None:
        """The 503 to answer with when shedding."""
        if self.action != "shed":
            return None
        if self.stale:
            return Overloaded(
                "the queue length is unknown (consumer lag cannot be read)",
                retry_after_s=self.retry_after_s,
                extra={"lag_sampled": False},
            )
        return Overloaded(
            f"estimated queue wait {self.estimated_wait_s:.0f} s is above this tier's limit",
            retry_after_s=self.retry_after_s,
            extra={"estimated_wait_s": round(self.estimated_wait_s, 1)},
        )


@dataclass(frozen=True)
class UserView:
    """A new request's user as this gateway sees it, for the fair-share wait."""

    # Requests of this user in flight here.
    own: int
    # Requests in flight here that the fair scheduler serves after the new one.
    behind: float


class ThroughputMeter:
    """Completions per second over a rolling window, from an ever-growing completion count."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def observe(self, completed_total: int, now: float) -> None:
        if self._samples and completed_total < self._samples[-1][1]:
            self._samples.clear()  # the count went back (topic recreated): start over
        self._samples.append((now, completed_total))
        # Keep one sample at or before the window's start so the rate spans the whole window.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class QueueWaitEstimator:
    """Estimated queue wait: requests ahead / completions per second, smoothed (EWMA).

    The smoothing is asymmetric: a rising wait is followed within about ``rise_s`` so the
    gateway sheds early in an overload; a falling one over ``fall_s`` so it does not flap.
    While the queue is not empty and nothing completes (upstream stalled, breaker open), the
    wait is at least how long that has lasted. ``min_rate_per_s`` stands in for throughput
    when none was measured yet (after idle), so a burst on a quiet system is not shed at once.

    Completions per second measure capacity only while there is a queue: on a lightly loaded
    pipeline they are the arrival rate. So the rate used is the highest one seen recently
    (forgotten over about ``capacity_memory_s``), not the last one: a burst after a quiet
    spell is not taken for a long queue. A stall is still caught by its duration.

    Without a sample for ``stale_after_s`` the estimate is unknown: admission fails open, and
    once that has lasted ``fail_closed_after_s`` (None: never) it sheds new work instead.
    """

    def __init__(
        self,
        *,
        queue_stages: Iterable[str] = QUEUE_STAGES,
        min_rate_per_s: float = 1.0,
        ceiling_s: float = 600.0,
        rise_s: float = 1.0,
        fall_s: float = 5.0,
        degrade_policy: str | None = None,
        degrade_ratio: float = 0.5,
        min_retry_s: float = 1.0,
        max_retry_s: float = 120.0,
        stale_after_s: float = 10.0,
        capacity_memory_s: float = 600.0,
        fail_closed_after_s: float | None = None,
    ) -> None:
        self.queue_stages = tuple(queue_stages)
        self.min_rate_per_s = min_rate_per_s
        self.ceiling_s = ceiling_s
        self.rise_s = rise_s
        self.fall_s = fall_s
        self.degrade_policy = degrade_policy
        self.degrade_ratio = degrade_ratio
        self.min_retry_s = min_retry_s
        self.max_retry_s = max_retry_s
        self.stale_after_s = stale_after_s
        self.fail_closed_after_s = fail_closed_after_s
        self.queued = 0
        self.capacity_memory_s = capacity_memory_s
        self.rate_per_s = min_rate_per_s
        self.capacity_per_s = 0.0
        self.smoothed_s = 0.0
        self._updated_at: float | None = None
        self._progress_at: float | None = None
        self._admitted_since_update = 0
        self._finished_since_update = 0
        # How long the queue has not moved at the last sample (0 while it moves).
        self.stalled_s = 0.0
        # When admission first asked for an estimate that was never sampled: staleness from then.
        self._first_decided_at: float | None = None

    def update(self, lag_by_stage: Mapping[str, int], throughput_per_s: float, now: float) -> float:
        """Feed one sample (lag per stage, completions per second); returns the smoothed wait."""
        self.queued = sum(max(0, lag_by_stage.get(stage, 0)) for stage in self.queue_stages)
        keep = 0.0
        if self._updated_at is not None and self.capacity_memory_s > 0:
            keep = math.exp(-max(0.0, now - self._updated_at) / self.capacity_memory_s)
        self.capacity_per_s = max(self.capacity_per_s * keep, throughput_per_s)
        self.rate_per_s = max(self.capacity_per_s, self.min_rate_per_s)
        raw = self.queued / self.rate_per_s
        if self.queued == 0 or throughput_per_s > 0 or self._progress_at is None:
            self._progress_at = now
        self.stalled_s = now - self._progress_at
        raw = max(raw, self.stalled_s)
        raw = min(raw, self.ceiling_s)
        if self._updated_at is None:
            self.smoothed_s = raw
        else:
            dt = max(0.0, now - self._updated_at)
            tau = self.rise_s if raw > self.smoothed_s else self.fall_s
            alpha = 1.0 - math.exp(-dt / tau) if tau > 0 else 1.0
            self.smoothed_s += alpha * (raw - self.smoothed_s)
        self._updated_at = now
        self._admitted_since_update = 0
        self._finished_since_update = 0
        return self.smoothed_s

    def note_admitted(self, count: int = 1) -> None:
        """Count a request admitted since the last sample (the next lag reading includes it)."""
        self._admitted_since_update += count

    def note_finished(self, count: int = 1) -> None:
        """Count a request of this gateway that ended since the last sample (it left the queue)."""
        self._finished_since_update += count

    def queued_now(self) -> int:
        """The queue as of the last sample, plus admissions and minus results seen since."""
        return max(0, self.queued + self._admitted_since_update - self._finished_since_update)

    def estimate_s(self) -> float:
        """The wait a new request would see now, including admissions since the last sample."""
        extra = self._admitted_since_update / self.rate_per_s
        return min(self.ceiling_s, self.smoothed_s + extra)

    def queue_position(self) -> int:
        """A new request's place in the queue (1 = next), for the `accepted` event."""
        return self.queued + self._admitted_since_update + 1

    def is_stale(self, now: float) -> bool:
        return self._updated_at is None or now - self._updated_at > self.stale_after_s

    def _blind_too_long(self, now: float) -> bool:
        if self.fail_closed_after_s is None:
            return False
        if self._first_decided_at is None:
            self._first_decided_at = now
        since = self._updated_at if self._updated_at is not None else self._first_decided_at
        return now - since > self.fail_closed_after_s

    def decide(self, tier: Tier, now: float, *, user: UserView | None = None) -> Decision:
        """Admit, degrade (when a policy is set) or shed a new request of ``tier``.

        With ``user``, the request is measured on the queue ahead of it (docs/architecture.md
        "Admission"): a user with other users' requests behind its own, or with none of its
        own in flight, takes the latest figures for that queue when they are lower than the
        smoothed whole-queue estimate. So one user's burst, even one cancelled a moment ago,
        sheds nobody else, while a user's own backlog keeps the smoothing that stops flapping.
        """
        wait = self.estimate_s()
        position = self.queue_position()
        if user is not None and (user.behind > 0 or user.own == 0):
            ahead = max(0.0, self.queued_now() - user.behind)
            wait = min(wait, self.ceiling_s, max(ahead / self.rate_per_s, self.stalled_s))
            position = min(position, int(ahead) + 1)
        if self.is_stale(now):
            if self._blind_too_long(now):
                retry = min(self.max_retry_s, max(self.min_retry_s, self.stale_after_s))
                return Decision("shed", wait, position, retry_after_s=retry, stale=True)
            return Decision("admit", wait, position, stale=True)
        limit = tier.max_queue_wait_s
        if wait > limit:
            # The queue must drain by the excess before a new request fits the limit.
            retry = min(self.max_retry_s, max(self.min_retry_s, wait - limit))
            return Decision("shed", wait, position, retry_after_s=retry)
        if self.degrade_policy is not None and wait > self.degrade_ratio * limit:
            return Decision("degrade", wait, position, degrade=self.degrade_policy)
        return Decision("admit", wait, position)


class CompletionCounter:
    """Records ever written to `results`; its growth per second is the pipeline's throughput.

    Read from the end offsets, so it sees every gateway's and every other system's requests.
    :meth:`rebuild` replaces the client, for a caller whose reads keep failing.
    """

    def __init__(self, settings: KafkaSettings, timeout_s: float = 5.0) -> None:
        self.topic = f"{settings.topic_prefix}results"
        self.timeout_s = timeout_s
        self._settings = settings
        self._client = admin_client(settings)
        self._partitions: int | None = None

    def rebuild(self) -> None:
        """A new client (fresh metadata); the partition count is read again."""
        self._client = admin_client(self._settings)
        self._partitions = None

    def read(self) -> int:
        if self._partitions is None:
            count = partition_counts(self._client, [self.topic], self.timeout_s).get(self.topic)
            if not count:
                raise TopicMissingError(f"topic {self.topic} does not exist")
            self._partitions = count
        request = {
            TopicPartition(self.topic, p): OffsetSpec.latest()  # type: ignore[no-untyped-call]
            for p in range(self._partitions)
        }
        futures = self._client.list_offsets(request, request_timeout=self.timeout_s)
        total = 0
        for tp, future in futures.items():
            try:
                total += int(future.result(timeout=self.timeout_s + 1).offset)
            except KafkaException as exc:
                raise kafka_error(f"reading the end of {tp.topic}[{tp.partition}]", exc) from exc
        return total


class LagMonitor(PeriodicSampler[tuple[Mapping[str, int], int]]):
    """Samples lag and completions every ``interval_s`` in a thread and feeds the estimator.

    A failed sample keeps the estimator's last state; it turns stale (docs/architecture.md,
    "Lag-driven admission", for what admission does then). ``rebuild`` recreates the Kafka
    clients behind the reads when samples keep failing (:class:`PeriodicSampler`).
    """

    def __init__(
        self,
        estimator: QueueWaitEstimator,
        read_lag: Callable[[], Mapping[str, int]],
        read_completed: Callable[[], int],
        *,
        interval_s: float = 1.0,
        throughput_window_s: float = 10.0,
        gauge: Gauge = CONSUMER_LAG,
        clock: Callable[[], float] = time.monotonic,
        rebuild: Callable[[], None] | None = None,
        rebuild_after: int = 3,
        is_stale: Callable[[Exception], bool] = metadata_is_stale,
        close: Callable[[], None] | None = None,
        age_gauge: Gauge = LAG_SAMPLE_AGE,
    ) -> None:
        super().__init__(
            self._read,
            interval_s=interval_s,
            name="lag-monitor",
            logger=log,
            rebuild=rebuild,
            rebuild_after=rebuild_after,
            is_stale=is_stale,
            close=close,
        )
        # Read at scrape time, so the age grows even while a read hangs in its thread.
        age_gauge.set_function(self.sample_age_s)
        self.estimator = estimator
        self.meter = ThroughputMeter(throughput_window_s)
        self._read_lag = read_lag
        self._read_completed = read_completed
        self._gauge = gauge
        self._clock = clock

    @classmethod
    def from_settings(
        cls,
        settings: KafkaSettings,
        estimator: QueueWaitEstimator,
        groups_by_stage: Mapping[str, str] | None = None,
        *,
        interval_s: float = 1.0,
        throughput_window_s: float = 10.0,
        gauge: Gauge = CONSUMER_LAG,
        rebuild_after: int = 3,
    ) -> LagMonitor:
        """A monitor reading the Faust group's lag (pipeline/kafka/lag.py) and `results` growth."""
        lag = LagReader(settings, groups_by_stage)
        completed = CompletionCounter(settings)

        def rebuild() -> None:
            lag.rebuild()
            completed.rebuild()

        return cls(
            estimator,
            lag.read,
            completed.read,
            interval_s=interval_s,
            throughput_window_s=throughput_window_s,
            gauge=gauge,
            rebuild=rebuild,
            rebuild_after=rebuild_after,
            close=lag.close,
        )

    def apply(self, reading: tuple[Mapping[str, int], int]) -> None:
        lag, completed = reading
        now = self._clock()
        for stage, value in lag.items():
            self._gauge.labels(stage=stage).set(value)
        self.meter.observe(completed, now)
        wait = self.estimator.update(lag, self.meter.rate(), now)
        QUEUE_DEPTH.set(self.estimator.queued)
        THROUGHPUT.set(self.meter.rate())
        ESTIMATED_WAIT.set(wait)

    def _read(self) -> tuple[Mapping[str, int], int]:
        return self._read_lag(), self._read_completed()
