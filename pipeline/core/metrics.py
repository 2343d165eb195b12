"""Every Prometheus metric a worker exports, declared once (docs/architecture.md, "Observability").

Labels stay bounded: stage, tier, model, outcome, error type. Per-user figures live in the
results topic and the usage API, never in labels.

Token and cost counters are incremented by postprocess from the very SummaryResult it writes,
so summed over the workers they equal the sums over `results`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Generic, Self, TypeVar

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("sumstream.metrics")

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)

RECORDS_PROCESSED = Counter(
    "sumstream_records_processed_total", "Records a stage handled", ["stage", "outcome"]
)
DEAD_LETTERS = Counter(
    "sumstream_dead_letters_total", "Records sent to the dead-letter topic", ["stage", "error_type"]
)
STAGE_SECONDS = Histogram(
    "sumstream_stage_duration_seconds",
    "Per-stage latency: queue_wait, preprocess, inference_queue, ttft, generation, "
    "time_to_first_token, total (from each result's trace); engine_queue, upstream_ttft, "
    "postprocess (measured in the stage)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_SECONDS = Histogram(
    "sumstream_inter_token_seconds",
    "Gap between consecutive upstream tokens of one stream",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
REQUESTS_COMPLETED = Counter(
    "sumstream_requests_completed_total", "Requests that reached a final result", ["tier", "status"]
)
INPUT_TOKENS = Counter("sumstream_input_tokens_total", "Input tokens billed", ["tier", "model"])
OUTPUT_TOKENS = Counter("sumstream_output_tokens_total", "Output tokens billed", ["tier", "model"])
COST_MICRO_USD = Counter(
    "sumstream_cost_micro_usd_total", "Cost billed in micro-USD", ["tier", "model"]
)
UPSTREAM_ATTEMPTS = Counter(
    "sumstream_upstream_attempts_total", "Calls made to the model API", ["kind"]
)
UPSTREAM_ERRORS = Counter(
    "sumstream_upstream_errors_total", "Failed upstream calls by error type", ["error_type"]
)
RETRIES = Counter("sumstream_retries_total", "Upstream retries and resumes", ["reason"])
RETRY_BUDGET_EXHAUSTED = Counter(
    "sumstream_retry_budget_exhausted_total", "Retries refused by the retry budget"
)
BREAKER_STATE = Gauge(
    "sumstream_circuit_breaker_state",
    "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open",
    ["upstream"],
)
# The upstream limiter (pipeline/worker/inference/limiter.py): per worker process.
UPSTREAM_CONCURRENCY_LIMIT = Gauge(
    "sumstream_upstream_concurrency_limit",
    "Upstream calls this worker may have in flight: the learned limit within its share",
    ["upstream"],
)
UPSTREAM_SHARE = Gauge(
    "sumstream_upstream_share_ratio",
    "This worker's share of the upstream's limits (its preprocessed partitions / all)",
    ["upstream"],
)
UPSTREAM_PAUSES = Counter(
    "sumstream_upstream_pauses_total",
    "Pauses of every call to the upstream on a retry-after",
    ["upstream"],
)
UPSTREAM_PAUSED_SECONDS = Counter(
    "sumstream_upstream_paused_seconds_total",
    "Seconds for which a retry-after paused calls to the upstream",
    ["upstream"],
)
UPSTREAM_PACED = Counter(
    "sumstream_upstream_paced_calls_total",
    "Calls held back before they went upstream, by what held them (pause or bucket)",
    ["upstream", "reason"],
)
UPSTREAM_RATE_LIMITED = Counter(
    "sumstream_upstream_rate_limited_total",
    "429 answers the limiter did not foresee (retried outside the retry budget)",
    ["upstream"],
)
INFLIGHT = Gauge("sumstream_inference_inflight", "Upstream streams in flight")
QUEUED = Gauge("sumstream_inference_queued", "Jobs waiting in the fair scheduler")
# Set by every worker (LagSampler) and by the gateway (gateway/admission/backpressure.py):
# each reports the whole consumer group's lag, so aggregate it across processes with max.
CONSUMER_LAG = Gauge(
    "sumstream_consumer_lag_records",
    "Records in a stage's input topic its consumer group has not committed (whole group)",
    ["stage"],
)

LAG_SAMPLE_INTERVAL_S = 5.0

T = TypeVar("T")


class PeriodicSampler(Generic[T]):
    """Calls the blocking ``read`` in a thread every ``interval_s`` and hands each value to
    ``apply`` (the subclass's).

    A failed read leaves the last values in place and is logged once, on ``logger``, until
    sampling recovers: metrics and estimates must not stop the process that takes them. A
    long-lived client can stay broken after its broker restarts (cached leader epochs that the
    broker fences), so ``rebuild`` (close and recreate the clients behind ``read``) runs after
    every ``rebuild_after`` failures in a row, and at once when ``is_stale(error)`` says the
    client's metadata is out of date. ``close`` releases those clients after :meth:`stop`.
    """

    def __init__(
        self,
        read: Callable[[], T],
        *,
        interval_s: float,
        name: str,
        logger: logging.Logger = log,
        rebuild: Callable[[], None] | None = None,
        rebuild_after: int = 3,
        is_stale: Callable[[Exception], bool] = lambda exc: False,
        close: Callable[[], None] | None = None,
        age_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.last_error: Exception | None = None
        self.failures = 0  # in a row, since the last good sample
        self.rebuilds = 0
        self._read_sample = read
        self._rebuild = rebuild
        self._rebuild_after = max(1, rebuild_after)
        self._is_stale = is_stale
        self._close = close
        self._age_clock = age_clock
        self._name = name
        self._log = logger
        # Age counts from construction until the first good sample: never sampled is stale.
        self._last_good_at = age_clock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def apply(self, reading: T) -> None:
        """Use one successful sample."""
        raise NotImplementedError

    def sample_age_s(self) -> float:
        """Seconds since the last good sample (since construction when there was none)."""
        return max(0.0, self._age_clock() - self._last_good_at)

    async def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        # No cancel: a read in its thread cannot be interrupted; it is bounded by its timeouts.
        self._stopping.set()
        if self._task is not None:
            task, self._task = self._task, None
            await task
        if self._close is not None:
            await asyncio.to_thread(self._close)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def sample(self) -> bool:
        """Read once and apply it; False (and ``last_error``) when the read failed."""
        try:
            reading = await asyncio.to_thread(self._read_sample)
        except Exception as exc:  # broker away, topic missing, client stuck on old metadata
            await self._failed(exc)
            return False
        if self.last_error is not None:
            self._log.info("lag sampling recovered", extra={"failures": self.failures})
            self.last_error = None
        self.failures = 0
        self._last_good_at = self._age_clock()
        self.apply(reading)
        return True

    async def _failed(self, exc: Exception) -> None:
        if self.last_error is None:
            self._log.warning("lag sample failed", extra={"error": repr(exc)})
        self.last_error = exc
        self.failures += 1
        if self._rebuild is None:
            return
        stale = self._is_stale(exc)
        if not stale and self.failures % self._rebuild_after:
            return
        try:
            await asyncio.to_thread(self._rebuild)
        except Exception as rebuild_exc:  # the next failed sample tries again
            self._log.warning("lag sampler rebuild failed", extra={"error": repr(rebuild_exc)})
            return
        self.rebuilds += 1
        # The first rebuild of an outage at info, the rest at debug: a broker down for minutes
        # must not fill the log (the failure count in the next line says how long it lasted).
        level = logging.INFO if self.failures <= self._rebuild_after else logging.DEBUG
        self._log.log(
            level,
            "lag sampler clients rebuilt",
            extra={"failures": self.failures, "stale_metadata": stale, "error": repr(exc)},
        )

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)


class LagSampler(PeriodicSampler[Mapping[str, int]]):
    """Sets ``CONSUMER_LAG`` every ``interval_s`` from ``read`` (stage -> lag), in a thread.

    ``read`` is blocking (pipeline/kafka/lag.py ``LagReader.read``: admin API round trips). A failed
    sample leaves the last values in place and is logged once until sampling recovers;
    ``rebuild`` and ``is_stale`` are :class:`PeriodicSampler`'s (``LagReader.rebuild``).
    """

    def __init__(
        self,
        read: Callable[[], Mapping[str, int]],
        *,
        interval_s: float = LAG_SAMPLE_INTERVAL_S,
        gauge: Gauge = CONSUMER_LAG,
        rebuild: Callable[[], None] | None = None,
        is_stale: Callable[[Exception], bool] = lambda exc: False,
    ) -> None:
        super().__init__(
            read, interval_s=interval_s, name="lag-sampler", rebuild=rebuild, is_stale=is_stale
        )
        self._gauge = gauge

    def apply(self, reading: Mapping[str, int]) -> None:
        for stage, lag in reading.items():
            self._gauge.labels(stage=stage).set(lag)
