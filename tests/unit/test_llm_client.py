"""The upstream client (pipeline/llm/client.py) against the simulator served on a free port."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Mapping

import pytest
from pydantic import SecretStr

from pipeline.core.settings import SimulatorSettings, WorkerSettings
from pipeline.llm.client import (
    Delta,
    Finished,
    UpstreamAttemptError,
    UpstreamClient,
    parse_retry_after,
)
from pipeline.llm.extractive import full_summary, tokens
from pipeline.llm.simulator.app import LocalSimulator, serving

DOCUMENT = (
    "Kafka keeps an ordered log per partition. Consumers track their offsets in the log. "
    "The weather was fine. Producers append records to the log of a partition. "
    "Lunch was at noon. A consumer group shares the partitions of a topic among members. "
    "Retention decides how long the log keeps records. Compaction keeps the last record per key."
)
MESSAGES = [{"role": "user", "content": f"Summarize.\n<document>{DOCUMENT}</document>"}]


@pytest.fixture
async def sim() -> AsyncIterator[LocalSimulator]:
    settings = SimulatorSettings(port=0, ttft_ms=2, token_delay_ms=1, retry_after_s=0.25)
    async with serving(settings) as running:
        yield running


@pytest.fixture
async def client(sim: LocalSimulator) -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient(WorkerSettings(llm_sim_url=sim.url))
    try:
        yield upstream
    finally:
        await upstream.close()


def call(request_id: str, max_tokens: int = 500) -> dict[str, object]:
    return {
        "request_id": request_id,
        "model": "claude-haiku-4-5",
        "system": "",
        "messages": MESSAGES,
        "max_tokens": max_tokens,
    }


def record(sim: LocalSimulator, request_id: str) -> dict[str, object]:
    data = sim.app.stats.as_json(sim.app.open_streams, [request_id])
    found: dict[str, object] = data["requests"][request_id]
    return found


async def test_stream_yields_deltas_then_finished(client: UpstreamClient) -> None:
    assert client.name == "llm-sim"
    items = []
    async with client.stream(**call("c-1")) as stream:  # type: ignore[arg-type]
        async for item in stream:
            items.append(item)
    *deltas, finished = items
    assert all(isinstance(d, Delta) for d in deltas)
    assert "".join(d.text for d in deltas if isinstance(d, Delta)) == full_summary(DOCUMENT)
    assert isinstance(finished, Finished) and finished.stop_reason == "end_turn"
    assert finished.output_tokens == len(deltas) == len(tokens(full_summary(DOCUMENT)))
    assert finished.input_tokens > 0


async def test_complete_returns_text_and_usage(client: UpstreamClient) -> None:
    text, finished = await client.complete(**call("c-2", max_tokens=5))  # type: ignore[arg-type]
    assert text == "".join(tokens(full_summary(DOCUMENT))[:5])
    assert finished.stop_reason == "max_tokens" and finished.output_tokens == 5


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(429, "rate_limit_error"), (529, "overloaded_error"), (500, "api_error")],
)
async def test_http_errors_are_retriable_with_retry_after(
    sim: LocalSimulator, client: UpstreamClient, status: int, error_type: str
) -> None:
    sim.app.configure({"fail_next": 1, "error_status": status})
    with pytest.raises(UpstreamAttemptError) as caught:
        async with client.stream(**call("c-3")):  # type: ignore[arg-type]
            pass
    err = caught.value
    assert err.retriable and err.status == status and err.error_type == error_type
    assert err.tokens_received == 0 and err.input_tokens == 0
    if status in (429, 529):
        assert err.retry_after_s == pytest.approx(0.25)


async def test_bad_request_is_not_retriable(client: UpstreamClient) -> None:
    bad = {**call("c-4"), "messages": [{"role": "user", "content": " "}]}
    with pytest.raises(UpstreamAttemptError) as caught:
        await client.complete(**bad)  # type: ignore[arg-type]
    assert not caught.value.retriable and caught.value.status == 400


@pytest.mark.parametrize(
    ("kind", "error_type", "status"),
    [("error", "overloaded_error", 529), ("drop", "connection_error", None)],
)
async def test_mid_stream_failure_reports_what_had_arrived(
    sim: LocalSimulator, client: UpstreamClient, kind: str, error_type: str, status: int | None
) -> None:
    sim.app.configure({"fault_at_token": 4, "fault_times": 1, "fault_kind": kind})
    received = []
    with pytest.raises(UpstreamAttemptError) as caught:
        async with client.stream(**call("c-5")) as stream:  # type: ignore[arg-type]
            async for item in stream:
                received.append(item)
    err = caught.value
    assert err.retriable and err.error_type == error_type and err.status == status
    assert err.tokens_received == 4 == len(received) and err.output_tokens == 4
    assert err.input_tokens > 0


async def test_leaving_early_closes_the_http_stream(
    sim: LocalSimulator, client: UpstreamClient
) -> None:
    sim.app.configure({"token_delay_ms": 50})
    async with client.stream(**call("c-6")) as stream:  # type: ignore[arg-type]
        async for item in stream:
            assert isinstance(item, Delta)
            break
    left = time.time() * 1000
    async with asyncio.timeout(1.0):
        while record(sim, "c-6")["streams"][0]["ended"] is None:  # type: ignore[index]
            await asyncio.sleep(0.01)
    stream_record = record(sim, "c-6")["streams"][0]  # type: ignore[index]
    assert stream_record["ended"] == "client_closed"
    assert stream_record["ended_at"] - left < 1000


async def test_real_api_client_is_named_anthropic() -> None:
    upstream = UpstreamClient(
        WorkerSettings(anthropic_api_key=SecretStr("sk-test"), anthropic_base_url="http://x")
    )
    try:
        assert upstream.name == "anthropic"
    finally:
        await upstream.close()


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (parse_retry_after({"retry-after": date}) or 0) <= 30


async def test_every_answer_hands_its_ratelimit_headers_over(
    sim: LocalSimulator, client: UpstreamClient
) -> None:
    sim.app.configure({"requests_per_minute": 2})
    seen: list[int] = []

    def remaining(headers: Mapping[str, str]) -> None:
        seen.append(int(headers["anthropic-ratelimit-requests-remaining"]))

    async with client.stream(**call("rl-stream"), on_headers=remaining) as stream:
        async for _ in stream:
            pass
    await client.complete(**call("rl-complete"), on_headers=remaining)
    with pytest.raises(UpstreamAttemptError) as refused:
        await client.complete(**call("rl-refused"), on_headers=remaining)
    assert refused.value.status == 429
    with pytest.raises(UpstreamAttemptError):
        async with client.stream(**call("rl-refused-stream"), on_headers=remaining):
            pass
    # Two requests took the bucket's two; the refusals say nothing is left.
    assert seen == [1, 0, 0, 0]
