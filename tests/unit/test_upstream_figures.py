"""`sumstream top`'s upstream lines, scraped from a real /metrics endpoint."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from pipeline.ops.top import Frame, render
from pipeline.ops.upstream_figures import UpstreamFigures, render_lines, scrape
from tests.harness import free_port


def worker_registry(limit: float, share: float, pauses: float, paced: float) -> CollectorRegistry:
    """A worker's limiter metrics, declared as pipeline/core/metrics.py declares them."""
    registry = CollectorRegistry()
    labels = {"upstream": "llm-sim"}
    Gauge("sumstream_upstream_concurrency_limit", "", ["upstream"], registry=registry).labels(
        **labels
    ).set(limit)
    Gauge("sumstream_upstream_share_ratio", "", ["upstream"], registry=registry).labels(
        **labels
    ).set(share)
    Counter("sumstream_upstream_pauses", "", ["upstream"], registry=registry).labels(**labels).inc(
        pauses
    )
    Counter("sumstream_upstream_paced_calls", "", ["upstream", "reason"], registry=registry).labels(
        reason="bucket", **labels
    ).inc(paced)
    return registry


async def test_top_sums_the_limiter_figures_of_every_worker_and_counts_the_silent_ones() -> None:
    urls = []
    servers = []
    for limit, share in ((5, 0.5), (3, 0.5)):
        port = free_port()
        server, thread = start_http_server(
            port, addr="127.0.0.1", registry=worker_registry(limit, share, 2, 7)
        )
        servers.append((server, thread))
        urls.append(f"http://127.0.0.1:{port}/metrics")
    urls.append(f"http://127.0.0.1:{free_port()}/metrics")  # nobody there
    try:
        figures = await scrape(urls)
    finally:
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join()
    assert figures is not None
    assert (figures.workers, figures.unreachable) == (2, 1)
    assert (figures.limit, figures.share, figures.pauses, figures.paced) == (8, 1.0, 4, 14)
    text = render(Frame(at_ms=0, window_s=60, results=0, in_flight=0, upstream=figures), "p.")
    assert "upstream     limit 8 calls" in text and "over 2 workers, 1 unreachable" in text
    assert "4 pauses" in text and "14 paced calls" in text


async def test_without_worker_urls_top_says_where_the_figures_come_from() -> None:
    assert await scrape([]) is None
    assert "--worker-metrics" in render_lines(None)[0]
    assert "limit 0 calls" in render_lines(UpstreamFigures())[0]
