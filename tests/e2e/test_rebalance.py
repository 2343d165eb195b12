"""Scale-out without restarts: a worker joining mid-stream moves some partitions to itself, and
only the streams on those partitions are resumed (docs/architecture.md, "Rebalances").

One worker runs 12 streams; a second joins while every stream is under way. Faust's assignor
is sticky, so the first worker keeps part of its partitions: the streams there go on with the
same upstream call (one attempt each), the others are resumed by the newcomer from `tokens`.
Every client's text equals the summary, with no token missing or repeated.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from pipeline.core.partitioning import partition_for
from pipeline.core.settings import KafkaSettings
from pipeline.llm.extractive import summarize
from tests.e2e.documents import document
from tests.e2e.faults import Clients
from tests.harness import Stack, running_stack, wait_for_balanced_group

pytestmark = pytest.mark.e2e

STREAMS = 12
MAX_TOKENS = 200  # the whole summary (~83 tokens)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("rebalance"),
        workers=1,
        env={"SUMSTREAM_MAX_STREAMS_PER_USER": "32"},
        # Long enough streams that the newcomer joins while every one is still running.
        token_delay_ms=150,
    ) as s:
        yield s


async def test_a_joining_worker_costs_no_upstream_call_for_streams_it_does_not_take(
    stack: Stack,
) -> None:
    (a,) = stack.workers
    partitions = KafkaSettings().work_partitions
    docs = [document(50_000 + i) for i in range(STREAMS)]
    async with (
        httpx.AsyncClient(timeout=180) as client,
        Clients(client, stack.gateway, docs, MAX_TOKENS) as clients,
    ):
        await clients.under_way(3)
        joined_at = time.monotonic()
        b = stack.start_worker()
        await asyncio.to_thread(wait_for_balanced_group, [a, b], partitions)
        settled_s = time.monotonic() - joined_at
        results = await clients.results()

    kept = a.owned_partitions()
    stayed = [r for r in results if partition_for(r.request_id, partitions) in kept]
    moved = [r for r in results if r not in stayed]
    # The assignment after b joined: how many of a's runs went on, how many it released.
    assigned = a.logged("inflight partitions assigned")[-1]
    extra_calls_stayed = sum(r.done["usage"]["attempts"] - 1 for r in stayed)
    print(
        f"\nFIGURES rebalance: streams={STREAMS} stayed={len(stayed)} moved={len(moved)} "
        f"kept_running={assigned['kept_running']} released={assigned['released']} "
        f"extra_upstream_calls_untouched={extra_calls_stayed} group_settled_s={settled_s:.1f}"
    )
    assert stayed and moved, "the newcomer took some partitions and left a some of its own"
    assert assigned["kept_running"] >= 1, "a's streams were still running at the rebalance"
    for doc, result in zip(docs, results, strict=True):
        assert result.status_code == 200
        assert result.done["status"] == "COMPLETED", result.done
        assert not result.of("error")
        assert result.text.strip() == summarize(doc, MAX_TOKENS).strip()
        seqs = result.seqs
        assert seqs == sorted(set(seqs)), f"{result.request_id}: {seqs}"
    assert extra_calls_stayed == 0
    # The moved ones were resumed by the newcomer: their first call and the resumed one.
    resumed = {str(line["request_id"]) for line in b.logged("resuming request")}
    assert {r.request_id for r in moved} <= resumed
    assert all(r.done["usage"]["attempts"] == 2 for r in moved)
