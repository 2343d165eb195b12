"""The upstream model API and its health, one per worker process.

Partition assignments come and go with every rebalance; an upstream outage does not. So the
circuit breaker, the retry budget and the fair scheduler live here, with the client, for the
life of the worker, and every engine built for an assignment shares them.
"""

from __future__ import annotations

from pipeline.core.settings import WorkerSettings
from pipeline.llm.client import UpstreamClient
from pipeline.worker.inference.breaker import CircuitBreaker
from pipeline.worker.inference.retry import RetryBudget
from pipeline.worker.inference.runs import Run
from pipeline.worker.inference.scheduler import FairScheduler


class Upstream:
    """The client of one upstream with its breaker, retry budget and scheduler."""

    def __init__(self, settings: WorkerSettings, client: UpstreamClient) -> None:
        self.client = client
        self.breaker = CircuitBreaker(
            client.name,
            failure_threshold=settings.breaker_failure_threshold,
            reset_s=settings.breaker_reset_s,
        )
        self.budget = RetryBudget(
            settings.retry_budget_ratio,
            min_retries_per_window=settings.retry_budget_min,
            window_s=settings.retry_budget_window_s,
        )
        self.scheduler: FairScheduler[Run] = FairScheduler(
            max_running=settings.max_streams,
            max_per_user=settings.max_streams_per_user,
            max_queued=settings.max_queued,
        )

    async def close(self) -> None:
        """Close the client's connections (at worker stop)."""
        await self.client.close()
