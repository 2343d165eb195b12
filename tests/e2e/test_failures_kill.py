"""Issue 4 point 4: an inference worker killed with SIGKILL while 20 streams are in flight.

Two workers share the consumer group; 20 clients stream through the gateway; once every stream
is under way, one worker is killed -9. After its session times out (10 s) the other is assigned
its partitions and resumes each request from the tokens already in `tokens`: every client's
stream completes, with no seq duplicated or skipped, and no request is lost.
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

STREAMS = 20
MAX_TOKENS = 200  # the whole summary (~83 tokens)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("kill"),
        workers=2,
        # 20 streams of one user: above the default per-user cap of 8 per worker.
        env={"SUMSTREAM_MAX_STREAMS_PER_USER": "32"},
        token_delay_ms=100,
    ) as s:
        yield s


async def test_a_worker_killed_mid_stream_loses_nothing_and_repeats_nothing(
    stack: Stack,
) -> None:
    a, b = stack.workers
    partitions = KafkaSettings().work_partitions
    # The second join causes a rebalance: wait until it is over and each worker holds its share.
    await asyncio.to_thread(wait_for_balanced_group, [a, b], partitions)
    docs = [document(40_000 + i) for i in range(STREAMS)]
    async with (
        httpx.AsyncClient(timeout=180) as client,
        Clients(client, stack.gateway, docs, MAX_TOKENS) as clients,
    ):
        # Every stream is under way (3 tokens each), then worker a dies.
        await clients.under_way(3)
        victims = a.owned_partitions()
        a.kill9()
        killed_at = time.monotonic()
        results = await clients.results()
        finished_after_s = time.monotonic() - killed_at

    on_victim = [r for r in results if partition_for(r.request_id, partitions) in victims]
    resumed = len(b.logged("resuming request"))
    print(
        f"\nFIGURES kill: streams={STREAMS} on_killed_worker={len(on_victim)} "
        f"resumed_by_survivor={resumed} all_done_after_kill_s={finished_after_s:.1f}"
    )
    assert on_victim, "the killed worker held some of the streams"
    assert resumed >= len(on_victim)
    ids = [r.request_id for r in results]
    assert len(set(ids)) == STREAMS
    for doc, result in zip(docs, results, strict=True):
        assert result.status_code == 200
        assert result.events[0].event == "accepted"
        seqs = result.seqs
        # STARTED is seq 1; the tokens follow from 2 without a duplicate or a gap.
        assert seqs == list(range(2, 2 + len(seqs))), f"{result.request_id}: {seqs}"
        done = result.done
        assert done["status"] == "COMPLETED", done
        assert not result.of("error")
        assert result.text.strip() == summarize(doc, MAX_TOKENS).strip()
        assert done["summary"] == summarize(doc, MAX_TOKENS).strip()
        assert done["usage"]["output_tokens"] >= len(seqs)
    for result in on_victim:
        # The killed attempt and the resumed one (the survivor's own jobs may resume too:
        # the rebalance revokes every partition).
        assert result.done["usage"]["attempts"] >= 2
