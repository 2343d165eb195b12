"""The upstream model API and its health, one per worker process.

Partition assignments come and go with every rebalance; an upstream outage does not. So the
circuit breaker, the retry budget, the learned limit and the fair scheduler live here, with the
client, for the life of the worker, and every engine built for an assignment shares them.
"""

from __future__ import annotations

from pipeline.core.metrics import (
    UPSTREAM_CONCURRENCY_LIMIT,
    UPSTREAM_PACED,
    UPSTREAM_PAUSED_SECONDS,
    UPSTREAM_PAUSES,
    UPSTREAM_RATE_LIMITED,
    UPSTREAM_SHARE,
)
from pipeline.core.settings import WorkerSettings
from pipeline.llm.client import UpstreamClient
from pipeline.worker.inference.breaker import CircuitBreaker
from pipeline.worker.inference.limiter import UpstreamLimiter
from pipeline.worker.inference.retry import RetryBudget
from pipeline.worker.inference.runs import Run
from pipeline.worker.inference.scheduler import FairScheduler


class Upstream:
    """The client of one upstream with its breaker, retry budget, limiter and scheduler."""

    def __init__(self, settings: WorkerSettings, client: UpstreamClient) -> None:
        self.client = client
        self.max_queued = settings.max_queued
        self.priority_sources = frozenset(
            s.strip() for s in settings.priority_sources.split(",") if s.strip()
        )
        self.breaker = CircuitBreaker(
            client.name,
            failure_threshold=settings.breaker_failure_threshold,
            reset_s=settings.breaker_reset_s,
            on_recovered=lambda: self.limiter.restart(),
        )
        self.budget = RetryBudget(
            settings.retry_budget_ratio,
            min_retries_per_window=settings.retry_budget_min,
            window_s=settings.retry_budget_window_s,
        )
        self.limiter = UpstreamLimiter(
            ceiling=settings.max_streams,
            initial=settings.upstream_initial_concurrency,
            fleet_ceiling=settings.upstream_max_concurrency,
            on_change=self._limit_changed,
        )
        self.scheduler: FairScheduler[Run] = FairScheduler(
            max_running=self.limiter.allowed,
            max_per_user=settings.max_streams_per_user,
            max_queued=settings.max_queued,
        )
        self._limit_changed(self.limiter)
        # Every series exists from the start (at 0), so dashboards and rates see them.
        name = client.name
        for counter in (UPSTREAM_PAUSES, UPSTREAM_PAUSED_SECONDS, UPSTREAM_RATE_LIMITED):
            counter.labels(upstream=name)
        for reason in ("pause", "bucket", "limit"):
            UPSTREAM_PACED.labels(upstream=name, reason=reason)

    def set_share(self, partitions: int, of: int) -> None:
        """This worker owns ``partitions`` of the ``of`` partitions of ``preprocessed``."""
        # A worker between assignments keeps its last share: it takes no new jobs anyway.
        if partitions > 0 and of > 0:
            self.limiter.set_share(partitions / of)
            self._limit_changed(self.limiter)

    def priority_of(self, source: str) -> int:
        """The scheduler's priority class of a job from ``source`` (0 first)."""
        return 0 if source in self.priority_sources else 1

    def _limit_changed(self, limiter: UpstreamLimiter) -> None:
        UPSTREAM_CONCURRENCY_LIMIT.labels(upstream=self.client.name).set(limiter.allowed)
        UPSTREAM_SHARE.labels(upstream=self.client.name).set(limiter.share)
        self.scheduler.resize(max_running=limiter.allowed, max_queued=self.max_queued)

    async def close(self) -> None:
        """Close the client's connections (at worker stop)."""
        await self.client.close()
