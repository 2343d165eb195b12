"""A ~1M-token enterprise document end to end (docs/architecture.md, "Long documents"): the
stack takes 10 MB records, and the document streams ``accepted``, its plan before any call has
answered, progress as the chunks finish, and the final summary."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from pipeline.core import longdoc
from pipeline.llm.extractive import count_tokens
from tests.e2e.documents import stdlib_document
from tests.harness import Stack, StreamResult, auth, running_stack
from tests.harness.sse import sse_events

pytestmark = pytest.mark.e2e

DOCUMENT = stdlib_document(1_000_000)
# A 1M-token document of source code is ~8.2 MB, ~8.5 MB as JSON: records of 10 MB hold it.
RECORD_BYTES = "10000000"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("longdoc-1m")
    env = {"SUMSTREAM_MAX_RECORD_BYTES": RECORD_BYTES}
    # The shipped enterprise tier; a fast simulator, so the ~70 calls take seconds.
    with running_stack(tmp, env=env, ttft_ms=5, token_delay_ms=0.2) as s:
        # The worker's partitions assigned: the plan's latency is then the pipeline's own.
        s.workers[0].wait_for_log("inflight partitions assigned")
        yield s


async def test_a_1m_token_enterprise_document_streams_its_plan_progress_and_summary(
    stack: Stack,
) -> None:
    assert count_tokens(DOCUMENT) > 1_000_000
    result = StreamResult(0)
    arrived: list[float] = []
    async with (
        httpx.AsyncClient(timeout=120) as client,
        client.stream(
            "POST",
            f"{stack.gateway}/v1/summaries",
            json={"document": DOCUMENT, "max_output_tokens": 200},
            headers=auth("key-ann"),  # enterprise
        ) as response,
    ):
        result.status_code = response.status_code
        if response.status_code >= 300:
            await response.aread()
            raise AssertionError(response.text)
        async for event in sse_events(response):
            result.events.append(event)
            arrived.append(time.monotonic())
            if event.event == "done":
                break
    names = [e.event for e in result.events]
    assert names[0] == "accepted"
    # The plan comes next, before any call has answered and before the first token.
    assert names[1] == "progress" and result.events[1].data["stage"] == "plan"
    plan = result.events[1].data
    # 16k-token chunks (the enterprise tier's) of a 1M-token document.
    assert plan["chunks"] >= 1_000_000 // 16_000 and plan["document_tokens"] > 1_000_000
    # The plan's latency from `accepted`, for docs/architecture.md (not asserted: timings).
    print(f"plan {1000 * (arrived[1] - arrived[0]):.0f} ms after accepted")
    progress = [e.data for e in result.of("progress")[1:]]
    total = progress[0]["total"]  # every call but the final reduce reports progress
    assert [p["done"] for p in progress] == list(range(1, total + 1))
    assert all(p["total"] == total for p in progress)
    assert names.index("token") > len(progress) + 1
    done = result.done
    assert done["status"] == "COMPLETED" and done["summary"] == result.text.strip() != ""
    records = stack.sim_stats()["requests"]
    calls = {rid: r for rid, r in records.items() if longdoc.parent_of(rid) == result.request_id}
    assert len(calls) == total + 1 == done["usage"]["attempts"]
    assert done["usage"]["input_tokens"] >= count_tokens(DOCUMENT)
    # The plan, sent ahead of the split, estimates the chunks within a few of those made.
    maps = [rid for rid in calls if (longdoc.parse_chunk_id(rid) or ("", -1, 0))[1] == 0]
    assert abs(len(maps) - plan["chunks"]) <= 2, (len(maps), plan)
