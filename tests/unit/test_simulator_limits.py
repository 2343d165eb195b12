"""The simulator's per-minute buckets and ratelimit headers, read back with the worker's parser."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest

from pipeline.core.settings import SimulatorSettings
from pipeline.llm import ratelimit
from pipeline.llm.simulator.app import serving
from pipeline.llm.simulator.limits import UNLIMITED, RateBuckets, TokenBucket

DOCUMENT = (
    "Apache Kafka is a distributed event streaming platform used for data pipelines. "
    "Kafka stores streams of records in topics, and topics are split into partitions. "
    "Consumer groups let many consumers share the partitions of a topic. "
)
BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": f"<document>\n{DOCUMENT}\n</document>"}],
}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    settings = SimulatorSettings(port=0, ttft_ms=1, token_delay_ms=0)
    async with serving(settings) as sim, httpx.AsyncClient(base_url=sim.url) as plain:
        yield plain


async def call(http: httpx.AsyncClient, *, stream: bool = False) -> httpx.Response:
    return await http.post(
        "/v1/messages", json={**BODY, "stream": stream}, headers={"x-api-key": "k"}
    )


def headers_of(response: httpx.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in response.headers.items()}


async def test_every_response_carries_the_four_buckets_with_an_rfc3339_reset(
    http: httpx.AsyncClient,
) -> None:
    await http.post("/_sim/config", json={"requests_per_minute": 5, "tokens_per_minute": 100_000})
    for response in (await call(http), await call(http, stream=True)):
        assert response.status_code == 200
        limits = ratelimit.parse(headers_of(response), time.time())
        assert limits.requests is not None and limits.requests.limit == 5
        assert limits.tokens is not None and limits.tokens.limit == 100_000
        assert limits.input_tokens is not None and limits.input_tokens.limit == UNLIMITED
        assert limits.output_tokens is not None
        reset = response.headers["anthropic-ratelimit-requests-reset"]
        assert reset.endswith("Z") and ratelimit.parse_time(reset) is not None
    # Two requests spent: what is left says so (the refill in between is below one request).
    assert limits.requests.remaining == 3


async def test_an_empty_request_bucket_is_a_429_rate_limit_error_with_retry_after(
    http: httpx.AsyncClient,
) -> None:
    await http.post("/_sim/config", json={"requests_per_minute": 2})
    assert [(await call(http)).status_code for _ in range(2)] == [200, 200]
    refused = await call(http)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    # One request refills in 30 s at 2 per minute.
    assert 0 < float(refused.headers["retry-after"]) <= 30
    assert refused.headers["anthropic-ratelimit-requests-remaining"] == "0"
    stats = (await http.get("/_sim/stats", params={"records": "false"})).json()
    assert stats["by_status"] == {"200": 2, "429": 1}


async def test_the_token_bucket_charges_input_and_output_and_refuses_what_does_not_fit(
    http: httpx.AsyncClient,
) -> None:
    first = await call(http)
    usage = first.json()["usage"]
    cost = usage["input_tokens"] + usage["output_tokens"]
    await http.post("/_sim/config", json={"tokens_per_minute": cost * 2 + cost // 2})
    ok = await call(http)
    assert int(ok.headers["anthropic-ratelimit-tokens-remaining"]) in range(
        cost + cost // 2 - 1, cost + cost // 2 + 1
    )
    assert (await call(http)).status_code == 200
    assert (await call(http)).status_code == 429
    # Turned off at run time, the bucket reports unlimited again.
    await http.post("/_sim/config", json={"tokens_per_minute": 0})
    assert (await call(http)).headers["anthropic-ratelimit-tokens-limit"] == str(UNLIMITED)


def test_a_bucket_refills_continuously_up_to_its_limit() -> None:
    bucket = TokenBucket.full(60, now=0.0)
    bucket.level = 0.0
    bucket.refill(10.0)
    assert bucket.level == pytest.approx(10.0)
    assert bucket.wait_s(15) == pytest.approx(5.0)
    assert bucket.wait_s(61) == 60.0
    bucket.refill(1_000.0)
    assert bucket.level == 60.0


def test_buckets_take_nothing_when_one_refuses() -> None:
    buckets = RateBuckets({"requests": 10, "tokens": 100}, now=0.0)
    assert buckets.admit(50, 40, 0.0) == 0.0
    assert buckets.admit(20, 0, 0.0) > 0
    # The refused request took no request either.
    assert buckets.buckets["requests"].level == 9.0


def test_parse_reads_the_headers_the_api_sends() -> None:
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": "2026-12-02T09:30:00Z",
        "anthropic-ratelimit-tokens-limit": "bad",
        "anthropic-ratelimit-tokens-remaining": "1",
    }
    limits = ratelimit.parse(headers, now=1.0)
    assert limits.requests == ratelimit.Bucket(
        50, 49, ratelimit.parse_time("2026-12-02T09:30:00Z") or 0
    )
    assert limits.tokens is None and limits.input_tokens is None
    assert not limits.empty
    assert ratelimit.parse({}, now=1.0).empty
    assert ratelimit.format_time(ratelimit.parse_time("2026-12-02T09:30:00Z") or 0) == (
        "2026-12-02T09:30:00Z"
    )


def test_a_bucket_report_says_how_long_to_wait_for_an_amount() -> None:
    bucket = ratelimit.Bucket(limit=600, remaining=100, reset_at=0.0)  # 10 per second
    assert bucket.wait_s(50, elapsed_s=0.0) == 0.0
    assert bucket.wait_s(150, elapsed_s=0.0) == pytest.approx(5.0)
    assert bucket.wait_s(150, elapsed_s=2.0) == pytest.approx(3.0)
    assert bucket.wait_s(50, elapsed_s=0.0, held=100) == pytest.approx(5.0)
