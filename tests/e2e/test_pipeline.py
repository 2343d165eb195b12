"""The main path end to end: real broker, simulator, worker and two gateway processes, over HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.core.codec import codec
from pipeline.core.partitioning import partition_for
from pipeline.core.settings import KafkaSettings
from pipeline.llm.extractive import summarize
from pipeline.ops.submit import build_request, produce_request
from tests.e2e.documents import document
from tests.harness import BOOTSTRAP, REPO, Stack, auth, collect, read_topic, running_stack

pytestmark = pytest.mark.e2e

MAX_TOKENS = 60
STAGES = {"queue_wait", "preprocess", "inference_queue", "ttft", "generation", "total"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("pipeline"), gateways=2) as s:
        yield s


def expected(doc: str, max_tokens: int = MAX_TOKENS) -> str:
    return summarize(doc, max_tokens).strip()


def assert_complete_stream(result, doc: str) -> None:  # type: ignore[no-untyped-def]
    assert result.status_code == 200, result.events
    assert result.events[0].event == "accepted"
    seqs = result.seqs
    assert seqs, "no token events"
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"gap or disorder: {seqs}"
    done = result.done
    assert done["status"] == "COMPLETED", done
    assert done["id"] == result.request_id
    assert done["summary"] == result.text.strip()
    assert done["summary"] == expected(doc)


async def test_25_concurrent_clients_each_receive_their_own_summary(stack: Stack) -> None:
    docs = [document(seed) for seed in range(25)]
    async with httpx.AsyncClient(timeout=120) as client:
        results = await asyncio.gather(
            *(
                collect(
                    client,
                    "POST",
                    f"{stack.gateways[i % 2]}/v1/summaries",
                    json={"document": doc, "max_output_tokens": MAX_TOKENS},
                    headers=auth(),
                )
                for i, doc in enumerate(docs)
            )
        )
    for doc, result in zip(docs, results, strict=True):
        assert_complete_stream(result, doc)
    assert len({r.request_id for r in results}) == 25


async def test_every_result_carries_usage_cost_and_latency_of_every_stage(stack: Stack) -> None:
    doc = document(101)
    async with httpx.AsyncClient(timeout=60) as client:
        result = await collect(
            client,
            "POST",
            f"{stack.gateway}/v1/summaries",
            json={"document": doc, "max_output_tokens": MAX_TOKENS},
            headers=auth(),
        )
        done = result.done
        assert done["usage"]["input_tokens"] > 0
        assert done["usage"]["output_tokens"] == len(result.of("token"))
        assert done["usage"]["attempts"] == 1
        assert done["cost"]["micro_usd"] > 0
        assert set(done["latency_ms"]) >= STAGES, done["latency_ms"]
        # The same result is served by GET, and only to its owner.
        url = f"{stack.gateway}/v1/summaries/{result.request_id}"
        got = (await client.get(url, headers=auth())).json()
        assert got["summary"] == done["summary"]
        other = await client.get(url, headers=auth("key-ben"))
        assert other.status_code == 404
        assert other.headers["content-type"].startswith("application/problem+json")


async def test_last_event_id_resume_has_no_duplicate_and_no_gap(stack: Stack) -> None:
    doc = document(202)
    stack.sim_config(token_delay_ms=20)
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            first = await collect(
                client,
                "POST",
                f"{stack.gateway}/v1/summaries",
                json={"document": doc, "max_output_tokens": MAX_TOKENS},
                headers=auth(),
                stop_after_tokens=5,
            )
            last = first.seqs[-1]
            rest = await collect(
                client,
                "GET",
                f"{stack.gateway}/v1/summaries/{first.request_id}/events",
                headers={**auth(), "Last-Event-ID": str(last)},
            )
    finally:
        stack.sim_config(token_delay_ms=2)
    seqs = first.seqs + rest.seqs
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert (first.text + rest.text).strip() == expected(doc)
    assert rest.done["summary"] == expected(doc)


async def test_a_gateway_that_does_not_own_a_stream_still_serves_it_whole_and_in_order(
    stack: Stack,
) -> None:
    doc = document(303)
    async with httpx.AsyncClient(timeout=60) as client:
        accepted = await client.post(
            f"{stack.gateways[0]}/v1/summaries",
            json={"document": doc, "max_output_tokens": MAX_TOKENS},
            headers={**auth(), "Accept": "application/json"},
        )
        assert accepted.status_code == 202, accepted.text
        request_id = accepted.json()["id"]
        # Gateway 0 of 2 minted the id into a partition it owns; gateway 1 does not own it.
        assert partition_for(request_id, KafkaSettings().stream_partitions) % 2 == 0
        result = await collect(
            client, "GET", f"{stack.gateways[1]}/v1/summaries/{request_id}/events", headers=auth()
        )
    seqs = result.seqs
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert result.done["summary"] == expected(doc)
    assert result.text.strip() == expected(doc)


def _consume_result(topic: str, request_id: str, timeout_s: float = 60) -> dict[str, object]:
    key = request_id.encode()
    records = read_topic(
        BOOTSTRAP, topic, lambda rs: any(r.key == key for r in rs), timeout=timeout_s
    )
    return codec().decode_as(next(r.value for r in records if r.key == key), "SummaryResult")


def test_a_request_produced_straight_onto_requests_completes_with_its_summary(stack: Stack) -> None:
    settings = KafkaSettings(topic_prefix=stack.prefix, bootstrap_servers=BOOTSTRAP)
    doc = document(404)
    request = build_request(doc, user="batch-system", tier="pro", max_output_tokens=MAX_TOKENS)
    request["source"] = "external"
    produce_request(settings, request)
    result = _consume_result(f"{stack.prefix}results", request["request_id"])
    assert result["status"] == "COMPLETED"
    assert result["summary"] == expected(doc)
    assert result["user_id"] == "batch-system"
    assert set(result["latency_ms"]) >= STAGES  # type: ignore[arg-type]


def test_sumstream_submit_prints_the_streamed_summary(stack: Stack, tmp_path: Path) -> None:
    doc = document(505)
    path = tmp_path / "doc.txt"
    path.write_text(doc)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.ops.cli", "submit", str(path)],
        env=stack.env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # The default output budget of the `pro` tier applies.
    assert proc.stdout.strip() == summarize(doc, 1024).strip()
    assert "COMPLETED" in proc.stderr
