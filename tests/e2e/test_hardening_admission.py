"""Issue 17 items 6 and 7 on real processes (simulator, worker, gateway).

- A model outside the caller's tier list is refused: 422 at the gateway, a REJECTED result when
  the request comes straight over `requests`; no metric ever carries such a model as a label.
  Before the list, any string was accepted, priced at the default row and became a label.
- One user closing many streams at once neither pushes another user out (before: 503
  overloaded on the whole queue's wait) nor makes the pipeline call the model for the requests
  still queued (before: cancels waited for the 10 s grace, so most of them ran and were billed).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ulid import ULID

from pipeline.core.clock import now_ms
from pipeline.core.codec import codec
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.lag import LagReader
from tests.e2e.documents import document
from tests.harness import (
    BOOTSTRAP,
    Stack,
    TierRow,
    auth,
    collect,
    eventually_async,
    produce_raw,
    running_stack,
    signed,
    sse_events,
    summary_result,
    write_tiers,
)

pytestmark = pytest.mark.e2e

FREE_MODELS = ["claude-haiku-4-5", "claude-3-5-haiku-latest"]
# The worker runs this many upstream calls at once and holds as many more jobs in memory; the
# rest of a queue stays in the log, where the gateway's lag estimate sees it.
MAX_STREAMS = 4
HEAVY_STREAMS = 30


async def result_of(
    client: httpx.AsyncClient, url: str, key: str, request_id: str
) -> dict[str, Any]:
    return await summary_result(client, url, auth(key), request_id)


def model_labels(stack: Stack) -> set[str]:
    """Every value the ``model`` label takes in any process's /metrics."""
    values: set[str] = set()
    for url in stack.metrics_urls().values():
        text = httpx.get(url, timeout=10).text
        values.update(re.findall(r'[{,]model="((?:[^"\\]|\\.)*)"', text))
    return values


# -- item 6: the per-tier model list -----------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("hardening-admission")) as stack:
        yield stack


def test_a_model_outside_the_tier_list_is_refused_at_the_gateway_and_over_the_topic(
    stack: Stack,
) -> None:
    asyncio.run(_model_list(stack))


async def _model_list(stack: Stack) -> None:
    url = stack.gateway
    headers = {**auth("key-fay"), "Accept": "application/json"}
    async with httpx.AsyncClient(timeout=60) as client:
        for model in ("claude-opus-4-1", "made-up-model-for-a-label"):
            refused = await client.post(
                f"{url}/v1/summaries",
                json={"document": document(1), "model": model},
                headers=headers,
            )
            assert refused.status_code == 422, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            body = refused.json()
            assert body["code"] == "model_not_allowed"
            assert body["allowed_models"] == FREE_MODELS
        # A listed model runs; no model at all runs the tier's first.
        chosen = await collect(
            client,
            "POST",
            f"{url}/v1/summaries",
            json={"document": document(2), "model": "claude-3-5-haiku-latest"},
            headers=auth("key-fay"),
        )
        assert chosen.done["status"] == "COMPLETED"
        assert chosen.done["model"] == "claude-3-5-haiku-latest"
        default = await collect(
            client,
            "POST",
            f"{url}/v1/summaries",
            json={"document": document(3)},
            headers=auth("key-fay"),
        )
        assert default.done["model"] == FREE_MODELS[0]

        # The same request produced straight onto `requests` ends REJECTED, without a model call.
        request_id = str(ULID())
        topics = TopicNames.from_settings(
            KafkaSettings(bootstrap_servers=BOOTSTRAP, topic_prefix=stack.prefix)
        )
        record = {
            "request_id": request_id,
            "user_id": "fay",
            "tier": "free",
            "document": document(4),
            "model": "claude-opus-4-1",
            "source": "external",
            "created_at": now_ms(),
        }
        value = codec().encode("SummarizeRequest", record)
        produce_raw(BOOTSTRAP, topics.requests, request_id.encode(), value, headers=signed(value))
        rejected = await result_of(client, url, "key-fay", request_id)
    assert rejected["status"] == "REJECTED"
    assert rejected["error"]["code"] == "model_not_allowed"
    assert rejected["usage"]["attempts"] == 0
    assert request_id not in stack.sim_stats()["requests"]
    # Only listed models ever became a label (the rejected request is labelled with the default).
    labels = model_labels(stack)
    assert labels, "no model label at all"
    assert labels <= set(FREE_MODELS), labels


# -- item 7: one user's burst -------------------------------------------------------------------


def burst_tiers(path: Path) -> Path:
    """A heavy user's tier that tolerates a long queue and a light user's that does not."""
    tiers: dict[str, TierRow] = {
        "free": (10, 20_000, 8_000, 300, 1, 1.0, 30.0),
        # The light users: shed once the wait ahead of them passes 25 s. Measured on the whole
        # queue (the heavy user's HEAVY_STREAMS at ~1 request/s: 30 s and more) they are shed;
        # measured on the queue ahead of them, their wait is the time since the queue last
        # moved (the simulator's 3 s to first token, longer on a busy machine), well below.
        "pro": (600, 400_000, 100_000, 1_024, 4, 100.0, 25.0),
        # The heavy user: a queue of HEAVY_STREAMS at ~1 request/s is within its 120 s.
        "enterprise": (1_200, 4_000_000, 400_000, 4_096, 16, 10_000.0, 120.0),
    }
    return write_tiers(path, tiers)


def test_one_user_closing_many_queued_streams_neither_runs_them_nor_pushes_another_user_out(
    tmp_path: Path,
) -> None:
    env = {
        "SUMSTREAM_TIERS_FILE": str(burst_tiers(tmp_path / "tiers.toml")),
        "SUMSTREAM_MAX_STREAMS": str(MAX_STREAMS),
        "SUMSTREAM_MAX_STREAMS_PER_USER": str(MAX_STREAMS),
        "SUMSTREAM_MAX_QUEUED": str(MAX_STREAMS),
    }
    with running_stack(tmp_path, env=env, ttft_ms=3_000, token_delay_ms=5) as stack:
        asyncio.run(_burst(stack))


async def _open_stream(
    client: httpx.AsyncClient, url: str, n: int, accepted: asyncio.Queue[str], stop: asyncio.Event
) -> int:
    """One SSE POST of the heavy user, held open until ``stop``; returns its HTTP status."""
    async with client.stream(
        "POST",
        f"{url}/v1/summaries",
        json={"document": document(500 + n), "max_output_tokens": 30},
        headers=auth("key-ann"),
    ) as response:
        if response.status_code != 200:
            await response.aread()
            await accepted.put("")
            return response.status_code
        events = sse_events(response)
        first = await anext(events)
        assert first.event == "accepted", first
        await accepted.put(str(first.data["id"]))
        await stop.wait()
        await events.aclose()
        return response.status_code


async def queue_depth(client: httpx.AsyncClient, url: str) -> float:
    """The gateway's latest lag sample of the queue (preprocess + inference)."""
    for line in (await client.get(f"{url}/metrics")).text.splitlines():
        if line.startswith("sumstream_gateway_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("no sumstream_gateway_queue_depth in /metrics")


async def _burst(stack: Stack) -> None:
    url = stack.gateway
    limits = httpx.Limits(max_connections=HEAVY_STREAMS + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        warm = await collect(
            client,
            "POST",
            f"{url}/v1/summaries",
            json={"document": document(1), "max_output_tokens": 30},
            headers=auth("key-light-1"),
        )
        assert warm.done["status"] == "COMPLETED"
        attempts_before = stack.sim_stats()["attempts"]

        accepted: asyncio.Queue[str] = asyncio.Queue()
        stop = asyncio.Event()
        streams = [
            asyncio.create_task(_open_stream(client, url, n, accepted, stop))
            for n in range(HEAVY_STREAMS)
        ]
        ids = [await accepted.get() for _ in range(HEAVY_STREAMS)]
        heavy_ids = [rid for rid in ids if rid]
        assert len(heavy_ids) == HEAVY_STREAMS, "the heavy user's own streams were refused"
        # Its first jobs run upstream; then every stream closes at once.
        await eventually_async(
            lambda: stack.sim_stats()["open_streams"] >= MAX_STREAMS,
            timeout=60,
            message="upstream calls",
        )
        # Until preprocess commits, its records also count in inference's lag: the estimator
        # sees the burst twice for up to a commit interval (docs/architecture.md, "Lag-driven
        # admission"). This test is about the fair share, not that window: it closes once
        # preprocess has committed and the gateway's latest lag sample counts the burst once.
        lag = LagReader(stack.settings, {"preprocess": stack.app_id})
        try:
            await eventually_async(
                lambda: lag.read()["preprocess"] == 0, timeout=60, message="preprocess committed"
            )
        finally:
            lag.close()

        async def sampled_once() -> bool:
            return await queue_depth(client, url) <= HEAVY_STREAMS

        await eventually_async(
            sampled_once, timeout=60, message="a lag sample without the double count"
        )
        running_at_close = stack.sim_stats()["attempts"] - attempts_before
        stop.set()
        statuses = await asyncio.gather(*streams)
        assert statuses == [200] * HEAVY_STREAMS

        # Another user's request right after: admitted and served.
        light = await collect(
            client,
            "POST",
            f"{url}/v1/summaries",
            json={"document": document(2), "max_output_tokens": 30},
            headers=auth("key-light-2"),
        )
        assert light.status_code == 200, light.events
        assert light.done["status"] == "COMPLETED"

        results = await asyncio.gather(
            *(result_of(client, url, "key-ann", rid) for rid in heavy_ids)
        )
    ends = {r["status"] for r in results}
    assert ends <= {"CANCELLED", "COMPLETED"}, ends
    cancelled = [r for r in results if r["status"] == "CANCELLED"]
    # Calls made for the heavy user: those running at the close, plus at most one round of
    # queued jobs the worker started while the cancels were on their way; not ~all of them.
    heavy_calls = stack.sim_stats()["attempts"] - attempts_before - 1
    assert heavy_calls <= running_at_close + MAX_STREAMS, (heavy_calls, running_at_close)
    assert len(cancelled) >= HEAVY_STREAMS - running_at_close - MAX_STREAMS
    # Cancelled while queued: nothing billed.
    billed = [r for r in cancelled if r["usage"]["attempts"] == 0]
    assert all(r["cost"]["micro_usd"] == 0 for r in billed)
