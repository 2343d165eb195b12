"""Scale-out without restarts: a worker joining mid-stream moves some partitions to itself, and
only the streams on those partitions are resumed (docs/architecture.md, "Rebalances").

One worker runs 12 streams; a second joins while every stream is under way. Faust's assignor
is sticky, so the first worker keeps part of its partitions: the streams there go on with the
same upstream call (one attempt each), the others are resumed by the newcomer from `tokens`.
Every client's text equals the summary, with no token missing or repeated.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from pipeline.core import events as token_events
from pipeline.core.codec import codec
from pipeline.core.partitioning import partition_for
from pipeline.core.records import TokenEvent
from pipeline.core.settings import KafkaSettings
from pipeline.llm.extractive import summarize
from tests.e2e.documents import document
from tests.e2e.faults import Clients
from tests.harness import Stack, eventually, running_stack, wait_for_balanced_group
from tests.harness.topics import Record, read_topic

pytestmark = pytest.mark.e2e

STREAMS = 12
MAX_TOKENS = 200  # the whole summary (~83 tokens)
TERMINAL = ("DONE", "ERROR", "CANCELLED")


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


async def test_a_worker_frozen_past_its_session_timeout_writes_nothing_after_it_wakes(
    stack: Stack,
) -> None:
    partitions = KafkaSettings().work_partitions
    if len(stack.workers) < 2:  # run on its own, without the test above
        stack.start_worker()
    a, b = stack.workers
    await asyncio.to_thread(wait_for_balanced_group, [a, b], partitions)
    docs = [document(51_000 + i) for i in range(6)]
    assignments = len(b.logged("inflight partitions assigned"))
    async with (
        httpx.AsyncClient(timeout=180) as client,
        Clients(client, stack.gateway, docs, MAX_TOKENS) as clients,
    ):
        await clients.under_way(3)
        os.killpg(a.popen.pid, signal.SIGSTOP)  # past the session timeout: b takes everything
        try:
            await asyncio.to_thread(
                eventually,
                lambda: (
                    len(b.logged("inflight partitions assigned")) > assignments
                    and b.owned_partitions() == set(range(partitions))
                ),
                timeout=60,
                message="b to own every partition",
            )
        finally:
            os.killpg(a.popen.pid, signal.SIGCONT)
        results = await clients.results()
        await asyncio.to_thread(a.wait_for_log, "inflight partitions assigned", 60)

    assert a.logged("woke from a freeze: emits held until the group assigns partitions again")
    ids = {r.request_id for r in results}
    for doc, result in zip(docs, results, strict=True):
        assert result.done["status"] == "COMPLETED", result.done
        assert result.text.strip() == summarize(doc, MAX_TOKENS).strip()
    # In `tokens`, no seq of these requests is written twice and nothing follows an end: the
    # frozen worker's runs, which b resumed, wrote nothing once it woke.
    records = read_topic(
        stack.bootstrap,
        stack.topics.tokens,
        until=lambda rs: sum(1 for r in rs if _terminal_of(r, ids)) >= len(ids),
    )
    written: dict[str, list[int]] = {rid: [] for rid in ids}
    ended: set[str] = set()
    for record in records:
        event = _event(record)
        if event is None or event["request_id"] not in ids or event["kind"] == "PROGRESS":
            continue
        rid = event["request_id"]
        assert rid not in ended, f"{rid}: {event['kind']} seq {event['seq']} after its end"
        written[rid].extend(seq for seq, _ in token_events.pieces(event))
        ended |= {rid} if event["kind"] in TERMINAL else set()
    for rid, seqs in written.items():
        assert len(seqs) == len(set(seqs)), f"{rid}: a seq written twice: {sorted(seqs)}"


def _event(record: Record) -> TokenEvent | None:
    """The TokenEvent of a record on `tokens` (None for what is not one: a tombstone)."""
    if not record.value:
        return None
    return codec().decode_as(record.value, "TokenEvent")


def _terminal_of(record: Record, ids: set[str]) -> bool:
    event = _event(record)
    return event is not None and event["request_id"] in ids and event["kind"] in TERMINAL
