"""The main path end to end: real broker, simulator, worker and two gateway processes, over HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest

from pipeline.core import events as token_events
from pipeline.core.codec import codec
from pipeline.core.partitioning import partition_for
from pipeline.core.records import TERMINAL_KINDS, TokenEvent
from pipeline.core.settings import KafkaSettings
from pipeline.llm.extractive import summarize
from pipeline.ops.submit import build_request, produce_request
from tests.e2e.documents import document
from tests.harness import BOOTSTRAP, REPO, Stack, auth, collect, read_topic, running_stack
from tests.harness.topics import Record

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
        assert done["usage"]["output_tokens"] == len(result.seqs)
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


def _token_records(stack: Stack, request_ids: set[str]) -> list[TokenEvent]:
    """The TokenEvents of ``request_ids`` on `tokens`, once every one has its terminal."""
    keys = {rid.encode() for rid in request_ids}

    def decoded(records: list[Record]) -> list[TokenEvent]:
        return [
            cast(TokenEvent, codec().decode_as(r.value, "TokenEvent"))
            for r in records
            if r.key in keys
        ]

    def all_ended(records: list[Record]) -> bool:
        ended = {e["request_id"] for e in decoded(records) if e["kind"] in TERMINAL_KINDS}
        return ended == request_ids

    return decoded(read_topic(BOOTSTRAP, f"{stack.prefix}tokens", all_ended))


async def test_under_load_deltas_coalesce_and_clients_still_get_the_exact_summary(
    stack: Stack,
) -> None:
    docs = [document(600 + seed) for seed in range(30)]
    stack.sim_config(token_delay_ms=1)  # tokens faster than the broker acknowledges them
    try:
        async with httpx.AsyncClient(timeout=120) as client:

            async def resumed(doc: str) -> tuple[str, list[int], str]:
                body = {"document": doc, "max_output_tokens": MAX_TOKENS}
                url = f"{stack.gateway}/v1/summaries"
                first = await collect(
                    client, "POST", url, json=body, headers=auth(), stop_after_tokens=3
                )
                rest = await collect(
                    client,
                    "GET",
                    f"{url}/{first.request_id}/events",
                    headers={**auth(), "Last-Event-ID": str(first.seqs[-1])},
                )
                assert rest.done["summary"] == expected(doc)
                return first.request_id, first.seqs + rest.seqs, first.text + rest.text

            whole = [
                collect(
                    client,
                    "POST",
                    f"{stack.gateways[i % 2]}/v1/summaries",
                    json={"document": doc, "max_output_tokens": MAX_TOKENS},
                    headers=auth(),
                )
                for i, doc in enumerate(docs[1:])
            ]
            resume, *results = await asyncio.gather(resumed(docs[0]), *whole)
    finally:
        stack.sim_config(token_delay_ms=2)
    for doc, result in zip(docs[1:], results, strict=True):
        assert_complete_stream(result, doc)
    rid, seqs, text = resume
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert text.strip() == expected(docs[0])
    # On the topic: fewer DELTA records than the seqs they carry, and no seq twice.
    events = _token_records(stack, {rid} | {r.request_id for r in results})
    deltas = [e for e in events if e["kind"] == "DELTA"]
    covered = [(e["request_id"], s) for e in deltas for s, _ in token_events.pieces(e)]
    assert len(set(covered)) == len(covered)
    assert len(deltas) < len(covered)
    # Deltas carry no per-stream metadata: STARTED and the terminal do.
    assert {(e["user_id"], e["model"], e["created_at"]) for e in deltas} == {("", "", 0)}


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
