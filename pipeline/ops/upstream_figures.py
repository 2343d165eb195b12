"""The upstream limiter's figures for `sumstream top`, scraped from the workers' /metrics.

The topics say what the pipeline did; only the workers know what they have learned about the
upstream: the concurrency limit, their share of it, pauses on retry-after and paced calls
(docs/architecture.md, "Rate limits and adaptive concurrency").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class UpstreamFigures:
    """The limiter's metrics summed over the workers that answered."""

    workers: int = 0
    unreachable: int = 0
    limit: float = 0.0
    share: float = 0.0
    in_flight: float = 0.0
    pauses: float = 0.0
    paused_s: float = 0.0
    paced: float = 0.0
    rate_limited: float = 0.0

    def add(self, text: str) -> None:
        """Add one worker's /metrics text."""
        self.workers += 1
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "sumstream_upstream_concurrency_limit":
                    self.limit += sample.value
                elif sample.name == "sumstream_upstream_share_ratio":
                    self.share += sample.value
                elif sample.name == "sumstream_inference_inflight":
                    self.in_flight += sample.value
                elif sample.name == "sumstream_upstream_pauses_total":
                    self.pauses += sample.value
                elif sample.name == "sumstream_upstream_paused_seconds_total":
                    self.paused_s += sample.value
                elif sample.name == "sumstream_upstream_paced_calls_total":
                    self.paced += sample.value
                elif sample.name == "sumstream_upstream_rate_limited_total":
                    self.rate_limited += sample.value


async def scrape(urls: Iterable[str], timeout_s: float = 2.0) -> UpstreamFigures | None:
    """The figures of every worker in ``urls``; None when no URL was given."""
    urls = list(urls)
    if not urls:
        return None
    figures = UpstreamFigures()
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for url in urls:
            try:
                response = await client.get(url)
                response.raise_for_status()
            except httpx.HTTPError:
                figures.unreachable += 1
                continue
            figures.add(response.text)
    return figures


def render_lines(figures: UpstreamFigures | None) -> list[str]:
    """The `upstream` lines of a frame."""
    if figures is None:
        return ["upstream     n/a (--worker-metrics URL shows the learned limit)"]
    missing = f", {figures.unreachable} unreachable" if figures.unreachable else ""
    return [
        f"upstream     limit {figures.limit:g} calls ({figures.in_flight:g} in flight, "
        f"share {figures.share:.2f} over {figures.workers} workers{missing})",
        f"rate limits  {figures.pauses:g} pauses ({figures.paused_s:.1f} s)  "
        f"{figures.paced:g} paced calls  {figures.rate_limited:g} unforeseen 429s",
    ]
