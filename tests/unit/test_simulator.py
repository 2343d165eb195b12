"""The simulator served by uvicorn on a free port, driven by the real anthropic SDK."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam

from pipeline.core.settings import SimulatorSettings
from pipeline.llm.extractive import count_tokens, full_summary, summarize, tokens
from pipeline.llm.simulator import asgi
from pipeline.llm.simulator.app import LocalSimulator, serving
from pipeline.llm.simulator.cli import add_arguments, run

DOCUMENT = (
    "Apache Kafka is a distributed event streaming platform used for data pipelines. "
    "The weather in Lisbon was sunny on the day of the conference. "
    "Kafka stores streams of records in topics, and topics are split into partitions. "
    "Each partition of a Kafka topic is an ordered, append-only log of records. "
    "Producers write records to Kafka topics and consumers read records from partitions. "
    "Lunch was served at noon. "
    "A Kafka broker keeps records for a configurable retention period, e.g. seven days. "
    "Consumer groups let many consumers share the partitions of a topic. "
)
PROMPT = f"Summarize the document.\n<document>\n{DOCUMENT}\n</document>"
SUMMARY = full_summary(DOCUMENT)
MODEL = "claude-haiku-4-5"


def user(text: str = PROMPT) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


@pytest.fixture
async def sim() -> AsyncIterator[LocalSimulator]:
    settings = SimulatorSettings(port=0, ttft_ms=1, token_delay_ms=0.5, retry_after_s=0.5)
    async with serving(settings) as running:
        yield running


@pytest.fixture
async def client(sim: LocalSimulator) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=sim.url, api_key="k", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def http(sim: LocalSimulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url) as plain:
        yield plain


async def knobs(http: httpx.AsyncClient, **changes: Any) -> dict[str, Any]:
    response = await http.post("/_sim/config", json=changes)
    assert response.status_code == 200, response.text
    config: dict[str, Any] = response.json()
    return config


async def record_of(http: httpx.AsyncClient, request_id: str) -> dict[str, Any]:
    stats = (await http.get("/_sim/stats", params={"request_id": request_id})).json()
    record: dict[str, Any] = stats["requests"][request_id]
    return record


def rid(request_id: str) -> dict[str, str]:
    return {"x-sumstream-request-id": request_id}


async def test_stream_helper_gives_the_summary_and_usage(client: anthropic.AsyncAnthropic) -> None:
    async with client.messages.stream(model=MODEL, max_tokens=1000, messages=user()) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == SUMMARY == summarize(DOCUMENT, 1000)
    assert final.content[0].type == "text"
    assert final.content[0].text == SUMMARY
    assert final.model == MODEL
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == count_tokens(PROMPT)
    assert final.usage.output_tokens == len(tokens(SUMMARY))


async def test_max_tokens_cuts_the_stream(client: anthropic.AsyncAnthropic) -> None:
    async with client.messages.stream(model=MODEL, max_tokens=9, messages=user()) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "text"
    assert final.content[0].text == summarize(DOCUMENT, 9)
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 9


async def test_raw_stream_has_the_named_events_in_order(client: anthropic.AsyncAnthropic) -> None:
    stream = await client.messages.create(
        model=MODEL, max_tokens=1000, messages=user(), stream=True
    )
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    deltas = len(tokens(SUMMARY))
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    texts = [e.delta.text for e in events if e.type == "content_block_delta"]  # type: ignore[union-attr]
    assert texts == tokens(SUMMARY)
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and start.message.usage.input_tokens == count_tokens(
        PROMPT
    )
    assert delta.type == "message_delta"
    assert delta.usage.output_tokens == deltas
    assert delta.delta.stop_reason == "end_turn"


async def test_the_wire_format_has_pings_and_named_events(sim: LocalSimulator) -> None:
    body = {"model": MODEL, "max_tokens": 5, "stream": True, "messages": user()}
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(base_url=sim.url) as plain:
        response = await plain.post("/v1/messages", json=body, headers=headers)
    assert response.headers["content-type"].startswith("text/event-stream")
    names = [line[7:] for line in response.text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[3:] == [
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


async def test_non_streaming_message(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model=MODEL, max_tokens=1000, messages=user(), system="You summarize documents."
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == SUMMARY
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == count_tokens(PROMPT) + 3
    assert message.usage.output_tokens == len(tokens(SUMMARY))


async def test_answers_are_deterministic_and_per_document(client: anthropic.AsyncAnthropic) -> None:
    other = "Cats sleep most of the day. Cats hunt at night. Dogs bark."
    answers = []
    for prompt in (PROMPT, f"<document>{other}</document>", PROMPT):
        message = await client.messages.create(model=MODEL, max_tokens=200, messages=user(prompt))
        assert message.content[0].type == "text"
        answers.append(message.content[0].text)
    assert answers == [SUMMARY, summarize(other, 200), SUMMARY]


async def test_bearer_token_is_accepted(sim: LocalSimulator) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=sim.url, auth_token="t", api_key=None, max_retries=0
    ) as sdk:
        message = await sdk.messages.create(model=MODEL, max_tokens=3, messages=user())
    assert message.usage.output_tokens == 3


async def test_missing_key_is_401(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": user()}
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("cut", [1, 4, 5, 6, 23, len(SUMMARY) - 1, len(SUMMARY)])
@pytest.mark.parametrize("stream", [True, False])
async def test_prefill_is_continued(
    client: anthropic.AsyncAnthropic, cut: int, stream: bool
) -> None:
    # Cuts land mid-word, on a space (stripped, as the API demands) and at the very end.
    prefix = SUMMARY[:cut].rstrip()
    messages: list[MessageParam] = [*user(), {"role": "assistant", "content": prefix}]
    if stream:
        async with client.messages.stream(model=MODEL, max_tokens=1000, messages=messages) as s:
            rest = "".join([piece async for piece in s.text_stream])
    else:
        message = await client.messages.create(model=MODEL, max_tokens=1000, messages=messages)
        assert message.content[0].type == "text"
        rest = message.content[0].text
    assert prefix + rest == SUMMARY
    if SUMMARY[len(prefix) : len(prefix) + 1] == " ":
        assert rest.startswith(" ")


async def test_prefill_continuation_respects_max_tokens(client: anthropic.AsyncAnthropic) -> None:
    done = tokens(SUMMARY)[:4]
    messages: list[MessageParam] = [*user(), {"role": "assistant", "content": "".join(done)}]
    message = await client.messages.create(model=MODEL, max_tokens=6, messages=messages)
    assert message.content[0].type == "text"
    assert "".join(done) + message.content[0].text == summarize(DOCUMENT, 10)
    assert message.stop_reason == "max_tokens"


async def test_foreign_prefill_gets_the_whole_summary(client: anthropic.AsyncAnthropic) -> None:
    messages: list[MessageParam] = [*user(), {"role": "assistant", "content": "Here it is:"}]
    message = await client.messages.create(model=MODEL, max_tokens=1000, messages=messages)
    assert message.content[0].type == "text"
    assert message.content[0].text == " " + SUMMARY


async def test_prefill_with_trailing_whitespace_is_rejected(
    client: anthropic.AsyncAnthropic,
) -> None:
    messages: list[MessageParam] = [*user(), {"role": "assistant", "content": "Kafka "}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(model=MODEL, max_tokens=10, messages=messages)
    assert caught.value.status_code == 400
    assert "trailing whitespace" in str(caught.value.body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 5, "messages": user()}, "model: Field required"),
        ({"model": MODEL, "messages": user()}, "max_tokens: Field required"),
        ({"model": MODEL, "max_tokens": 0, "messages": user()}, "max_tokens"),
        ({"model": MODEL, "max_tokens": "5", "messages": user()}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 5}, "messages: Field required"),
        ({"model": MODEL, "max_tokens": 5, "messages": []}, "messages"),
        ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}, "role"),
        ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": ""}]}, "empty"),
        ([1, 2], "object"),
    ],
)
async def test_bad_requests_are_400_json(
    http: httpx.AsyncClient, body: object, message: str
) -> None:
    response = await http.post("/v1/messages", json=body, headers={"x-api-key": "k"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert message in error["error"]["message"]


async def test_malformed_json_is_400(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/messages", content=b"{nope", headers={"x-api-key": "k"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_content_blocks(client: anthropic.AsyncAnthropic) -> None:
    prefix = SUMMARY[:30].rstrip()
    message = await client.messages.create(
        model=MODEL,
        max_tokens=1000,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Summarize the document."},
                    {"type": "text", "text": f"<document>{DOCUMENT}</document>"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": prefix}]},
        ],
    )
    assert message.content[0].type == "text"
    assert prefix + message.content[0].text == SUMMARY


async def test_big_documents_are_summarized_too(client: anthropic.AsyncAnthropic) -> None:
    # Beyond 64 KiB the request is parsed and summarized off the event loop.
    document = " ".join(
        f"Queue {i % 50} holds job {i} for the Kafka worker {i % 7}." for i in range(4000)
    )
    assert len(document) > 100_000
    prompt = f"<document>{document}</document>"
    messages = user(prompt)
    async with client.messages.stream(model=MODEL, max_tokens=1000, messages=messages) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "text"
    assert final.content[0].text == summarize(document, 1000)
    assert final.usage.input_tokens == count_tokens(prompt)


async def test_oversized_body_is_413(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(asgi, "MAX_BODY_BYTES", 1000)
    body = {"model": MODEL, "max_tokens": 5, "messages": user("x " * 1000)}
    response = await http.post("/v1/messages", json=body, headers={"x-api-key": "k"})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"


async def test_stop_sequences(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model=MODEL, max_tokens=1000, messages=user(), stop_sequences=["partitions", "records"]
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == SUMMARY[: SUMMARY.index("records")]
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "records"


async def test_beyond_max_concurrent_is_429_with_retry_after(
    sim: LocalSimulator, client: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    await knobs(http, max_concurrent=2, ttft_ms=60_000)
    held = [
        await client.messages.create(model=MODEL, max_tokens=10, messages=user(), stream=True)
        for _ in range(2)
    ]
    try:
        with pytest.raises(anthropic.RateLimitError) as caught:
            await client.messages.create(model=MODEL, max_tokens=10, messages=user())
        assert caught.value.response.headers["retry-after"] == "0.5"
        assert caught.value.body == {
            "type": "error",
            "error": {
                "type": "rate_limit_error",
                "message": "Number of concurrent connections has exceeded your rate limit",
            },
        }
        stats = (await http.get("/_sim/stats")).json()
        assert stats["open_streams"] == 2
        assert stats["peak_concurrent"] == 2
        assert stats["by_status"] == {"200": 2, "429": 1}
    finally:
        for stream in held:
            await stream.close()


async def test_fail_next_then_success(
    client: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    await knobs(http, fail_next=2, error_status=529)
    for _ in range(2):
        with pytest.raises(anthropic.OverloadedError) as caught:
            await client.messages.create(
                model=MODEL, max_tokens=5, messages=user(), extra_headers=rid("r-1")
            )
        assert caught.value.status_code == 529
        assert caught.value.response.headers["retry-after"] == "0.5"
        assert caught.value.body == {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"},
        }
    message = await client.messages.create(
        model=MODEL, max_tokens=5, messages=user(), extra_headers=rid("r-1")
    )
    assert message.usage.output_tokens == 5
    record = await record_of(http, "r-1")
    assert record["attempts"] == 3
    assert record["statuses"] == [529, 529, 200]
    assert record["outcomes"] == ["rejected", "rejected", "completed"]
    assert len(record["streams"]) == 1
    assert (await http.get("/_sim/config")).json()["fail_next"] == 0


async def test_fail_all_is_an_outage_until_turned_off(
    client: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    await knobs(http, fail_all=True, error_status=500)
    for _ in range(3):
        with pytest.raises(anthropic.InternalServerError) as caught:
            async with client.messages.stream(model=MODEL, max_tokens=5, messages=user()) as s:
                await s.get_final_message()
        assert caught.value.status_code == 500
        assert "retry-after" not in caught.value.response.headers
        assert caught.value.body == {
            "type": "error",
            "error": {"type": "api_error", "message": "Internal server error"},
        }
    await knobs(http, fail_all=False)
    message = await client.messages.create(model=MODEL, max_tokens=5, messages=user())
    assert message.usage.output_tokens == 5
    stats = (await http.get("/_sim/stats")).json()
    assert stats["attempts"] == 4
    assert stats["by_status"] == {"200": 1, "500": 3}
    assert stats["by_outcome"] == {"completed": 1, "rejected": 3}


async def test_error_rate_is_reproducible_with_a_seed(
    client: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    async def pattern() -> list[bool]:
        outcomes = []
        for _ in range(16):
            try:
                await client.messages.create(model=MODEL, max_tokens=1, messages=user())
                outcomes.append(True)
            except anthropic.RateLimitError:
                outcomes.append(False)
        return outcomes

    await knobs(http, error_rate=0.5, error_status=429, seed=7)
    first = await pattern()
    await knobs(http, seed=7)
    assert await pattern() == first
    assert 0 < first.count(False) < 16


@pytest.mark.parametrize("at", [1, 6])
async def test_fault_at_token_sends_an_error_event(
    client: anthropic.AsyncAnthropic, http: httpx.AsyncClient, at: int
) -> None:
    await knobs(http, fault_at_token=at, fault_kind="error", error_status=529)
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client.messages.stream(
            model=MODEL, max_tokens=1000, messages=user(), extra_headers=rid("r-err")
        ) as stream:
            async for piece in stream.text_stream:
                received.append(piece)
    assert received == tokens(SUMMARY)[:at]
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    record = await record_of(http, "r-err")
    assert record["outcomes"] == ["fault"]
    assert record["streams"][0]["ended"] == "fault"
    assert record["streams"][0]["tokens"] == at


async def test_fault_at_token_can_drop_the_connection(
    client: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    await knobs(http, fault_at_token=5, fault_kind="drop")
    received: list[str] = []
    try:
        async with client.messages.stream(
            model=MODEL, max_tokens=1000, messages=user(), extra_headers=rid("r-drop")
        ) as stream:
            async for piece in stream.text_stream:
                received.append(piece)
    except Exception as exc:  # the SDK passes the HTTP library's transport error through
        assert "incomplete chunked read" in str(exc)
    else:
        pytest.fail("the stream ended cleanly")
    assert received == tokens(SUMMARY)[:5]
    record = await record_of(http, "r-drop")
    assert record["streams"][0]["ended"] == "fault"
    # The simulator is still healthy afterwards.
    await knobs(http, fault_at_token=0)
    message = await client.messages.create(model=MODEL, max_tokens=3, messages=user())
    assert message.usage.output_tokens == 3


async def test_fault_times_limits_the_faulty_streams(
    client: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    config = await knobs(http, fault_at_token=3, fault_times=1)
    assert config["fault_times"] == 1
    with pytest.raises(anthropic.APIStatusError):
        async with client.messages.stream(model=MODEL, max_tokens=50, messages=user()) as s:
            await s.get_final_message()
    async with client.messages.stream(model=MODEL, max_tokens=1000, messages=user()) as s:
        final = await s.get_final_message()
    assert final.usage.output_tokens == len(tokens(SUMMARY))
    assert (await http.get("/_sim/config")).json()["fault_times"] == 0


async def test_short_streams_do_not_reach_the_fault(
    client: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    await knobs(http, fault_at_token=10, fault_times=1)
    async with client.messages.stream(model=MODEL, max_tokens=10, messages=user()) as s:
        final = await s.get_final_message()
    assert final.stop_reason == "max_tokens"
    assert (await http.get("/_sim/config")).json()["fault_times"] == 1


async def test_client_closing_mid_stream_is_recorded(
    client: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    await knobs(http, ttft_ms=0, token_delay_ms=20)
    async with client.messages.stream(
        model=MODEL, max_tokens=1000, messages=user(), extra_headers=rid("r-close")
    ) as stream:
        async for _ in stream.text_stream:
            break
    closed_at = time.time() * 1000
    record = await record_of(http, "r-close")
    for _ in range(200):  # the close reaches the server a moment later
        if record["streams"][0]["ended"] is not None:
            break
        await asyncio.sleep(0.01)
        record = await record_of(http, "r-close")
    stream_record = record["streams"][0]
    assert stream_record["ended"] == "client_closed"
    assert record["outcomes"] == ["client_closed"]
    assert 1 <= stream_record["tokens"] < len(tokens(SUMMARY))
    assert stream_record["started_at"] <= stream_record["ended_at"] <= closed_at + 1000
    assert (await http.get("/_sim/stats")).json()["open_streams"] == 0


async def test_stats_count_attempts_per_request_id(
    client: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    await knobs(http, fail_next=1)
    for request_id in ("a", "b", "a"):
        with contextlib.suppress(anthropic.OverloadedError):
            await client.messages.create(
                model=MODEL, max_tokens=4, messages=user(), extra_headers=rid(request_id)
            )
    await client.messages.create(model=MODEL, max_tokens=4, messages=user())  # no id
    stats = (await http.get("/_sim/stats")).json()
    assert stats["attempts"] == 4
    assert set(stats["requests"]) == {"a", "b"}
    assert stats["requests"]["a"]["attempts"] == 2
    assert stats["requests"]["a"]["outcomes"] == ["rejected", "completed"]
    assert stats["requests"]["b"]["outcomes"] == ["completed"]
    stream = stats["requests"]["b"]["streams"][0]
    assert stream["ended"] == "completed"
    assert stream["streaming"] is False
    assert stream["tokens"] == 4
    assert stream["started_at"] <= stream["ended_at"]
    totals = (await http.get("/_sim/stats", params={"records": "false"})).json()
    assert totals["requests"] == {}
    assert totals["attempts"] == 4
    await http.post("/_sim/reset")
    stats = (await http.get("/_sim/stats")).json()
    assert stats["attempts"] == 0
    assert stats["requests"] == {}


async def test_records_are_bounded() -> None:
    async with serving(
        SimulatorSettings(port=0, ttft_ms=0, token_delay_ms=0, max_records=3)
    ) as sim:
        async with anthropic.AsyncAnthropic(base_url=sim.url, api_key="k") as sdk:
            for i in range(5):
                await sdk.messages.create(
                    model=MODEL, max_tokens=1, messages=user(), extra_headers=rid(f"id-{i}")
                )
        assert list(sim.app.stats.records) == ["id-2", "id-3", "id-4"]
        assert sim.app.stats.attempts == 5


async def test_concurrent_streams_each_get_their_own_summary(
    client: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    documents = [
        f"Topic {i} is about queue number {i}. Queue {i} holds jobs. Sky." for i in range(20)
    ]

    async def one(document: str) -> str:
        messages = user(f"<document>{document}</document>")
        async with client.messages.stream(model=MODEL, max_tokens=100, messages=messages) as s:
            return "".join([piece async for piece in s.text_stream])

    results = await asyncio.gather(*(one(d) for d in documents))
    assert results == [summarize(d, 100) for d in documents]
    stats = (await http.get("/_sim/stats")).json()
    assert stats["by_outcome"] == {"completed": 20}


async def test_runtime_config(http: httpx.AsyncClient) -> None:
    config = (await http.get("/_sim/config")).json()
    assert config["ttft_ms"] == 1
    assert config["fault_kind"] == "error"
    changed = await knobs(http, ttft_ms=7, fault_kind="drop", max_concurrent=3)
    assert changed["ttft_ms"] == 7
    assert changed["fault_kind"] == "drop"
    assert (await http.get("/_sim/config")).json() == changed
    for bad in ({"nope": 1}, {"error_rate": 2}, {"fault_kind": "explode"}, {"error_status": 404}):
        response = await http.post("/_sim/config", json=bad)
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert (await http.get("/_sim/config")).json() == changed
    restored = (await http.post("/_sim/reset")).json()
    assert restored == config


async def test_ttft_change_takes_effect(
    client: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    await knobs(http, ttft_ms=60_000)
    stream = await client.messages.create(model=MODEL, max_tokens=5, messages=user(), stream=True)
    try:
        assert (await stream.__anext__()).type == "message_start"
        assert (await stream.__anext__()).type == "content_block_start"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.__anext__(), 0.3)
    finally:
        await stream.close()


async def test_metrics_and_health(
    client: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    await client.messages.create(model=MODEL, max_tokens=2, messages=user())
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    metrics = await http.get("/metrics")
    assert metrics.status_code == 200
    assert 'sumstream_sim_attempts_total{status="200"} 1.0' in metrics.text
    assert "sumstream_sim_open_streams 0.0" in metrics.text
    assert 'sumstream_sim_streams_total{ended="completed"} 1.0' in metrics.text


async def test_unknown_routes(http: httpx.AsyncClient) -> None:
    assert (await http.get("/v2/nothing")).status_code == 404
    response = await http.get("/v1/messages")
    assert response.status_code == 405
    assert response.json()["type"] == "error"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_cli_runs_the_simulator() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUMSTREAM_SIM_")}
    command = [sys.executable, "-m", "pipeline.ops.cli", "llm-sim", "--port", str(port)]
    flags = ["--ttft-ms", "3", "--token-delay-ms", "0", "--fault-kind", "drop", "--fail-all"]
    process = subprocess.Popen([*command, *flags], env=env, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as plain:
            for _ in range(300):
                try:
                    if plain.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            config = plain.get("/_sim/config").json()
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = process.communicate(timeout=10)
    assert config["ttft_ms"] == 3
    assert config["token_delay_ms"] == 0
    assert config["fault_kind"] == "drop"
    assert config["fail_all"] is True
    assert process.returncode == 0
    assert b"llm-sim on http://127.0.0.1" in stderr
    assert b"Traceback" not in stderr


def test_cli_rejects_bad_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--error-status", "404", "--port", "0"])) == 2
    assert "error_status" in capsys.readouterr().err
