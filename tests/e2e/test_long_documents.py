"""Long documents end to end (docs/architecture.md, "Long documents"): a >60k-token document of
real text (the standard library's own sources) streams ``accepted``, the plan, progress and the
final summary; a worker SIGKILLed in the middle of the map costs no chunk call twice; a cancel
stops every chunk call."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from pipeline.core import longdoc
from pipeline.core.resources import DEFAULT_TIERS_FILE
from pipeline.llm.extractive import count_tokens
from tests.e2e.documents import stdlib_document
from tests.harness import Stack, StreamResult, auth, running_stack
from tests.harness.sse import SseEvent, sse_events
from tests.harness.waiting import eventually

pytestmark = pytest.mark.e2e

# The pro and enterprise tiers with small calls, so a 65k-token document makes 18 map
# calls, a collapse level of 2 and the final reduce.
LONG_TIER = """
max_input_tokens = 4_000
long_documents = true
max_document_tokens = 200_000
chunk_tokens = 4_000
map_concurrency = 4
reduce_output_tokens = 400
"""
MAX_OUTPUT = 120

OVERRIDDEN = {line.split("=")[0].strip() for line in LONG_TIER.strip().splitlines()}


DOCUMENT = stdlib_document(62_000)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("longdoc")
    # The pro and enterprise tables' own values of those keys give way to the test's.
    lines: list[str] = []
    section = ""
    for line in DEFAULT_TIERS_FILE.read_text().splitlines():
        if line.startswith("["):
            section = line
            lines.append(line)
            if section in ("[pro]", "[enterprise]"):
                lines.append(LONG_TIER)
        elif (
            section not in ("[pro]", "[enterprise]") or line.split("=")[0].strip() not in OVERRIDDEN
        ):
            lines.append(line)
    (tmp / "tiers.toml").write_text("\n".join(lines) + "\n")
    env = {"SUMSTREAM_TIERS_FILE": str(tmp / "tiers.toml")}
    with running_stack(tmp, env=env, ttft_ms=5, token_delay_ms=1) as s:
        yield s


async def follow(
    stack: Stack,
    on_event: Callable[[StreamResult, SseEvent], Any] | None = None,
    key: str = "key-ann",
) -> StreamResult:
    """POST the document and read its stream to ``done``; ``on_event`` sees every event."""
    result = StreamResult(0)
    async with (
        httpx.AsyncClient(timeout=180) as client,
        client.stream(
            "POST",
            f"{stack.gateway}/v1/summaries",
            json={"document": DOCUMENT, "max_output_tokens": MAX_OUTPUT},
            headers=auth(key),
        ) as response,
    ):
        result.status_code = response.status_code
        if response.status_code >= 300:
            await response.aread()
            raise AssertionError(response.text)
        async for event in sse_events(response):
            result.events.append(event)
            if on_event is not None:
                await on_event(result, event)
            if event.event == "done":
                break
    return result


def calls_of(stack: Stack, parent: str) -> dict[str, dict[str, Any]]:
    """The simulator's record of every call of ``parent`` (its chunk calls and its own)."""
    records: dict[str, dict[str, Any]] = stack.sim_stats()["requests"]
    return {rid: r for rid, r in records.items() if longdoc.parent_of(rid) == parent}


def completed_streams(record: dict[str, Any]) -> int:
    return sum(1 for s in record["streams"] if s["ended"] == "completed")


async def test_a_long_document_streams_its_plan_progress_and_the_final_summary(
    stack: Stack,
) -> None:
    assert count_tokens(DOCUMENT) > 60_000
    result = await follow(stack)
    names = [e.event for e in result.events]
    assert names[0] == "accepted"
    # The plan comes right after `accepted`, before any call has answered.
    assert names[1] == "progress" and result.events[1].data["stage"] == "plan"
    plan = result.events[1].data
    assert plan["chunks"] == 18 and plan["calls_per_level"] == [18, 2, 1]
    progress = [e.data for e in result.of("progress")[1:]]
    assert [p["done"] for p in progress] == list(range(1, 21))
    assert all(p["total"] == 20 for p in progress)
    assert progress[-1]["stage"] == "reduce"
    assert progress[-1]["cost_micro_usd"] > progress[0]["cost_micro_usd"] > 0
    # Progress before any text; the final reduce streams as normal tokens.
    assert names.index("token") > len(progress) + 1
    done = result.done
    assert done["status"] == "COMPLETED" and done["summary"] == result.text.strip() != ""
    # Every call was billed once, and the done event bills them all.
    calls = calls_of(stack, result.request_id)
    assert len(calls) == plan["calls"] == 21
    assert all(completed_streams(r) == 1 for r in calls.values())
    assert done["usage"]["attempts"] == 21
    assert stack.sim_stats()["peak_concurrent"] <= 4  # the tier's map_concurrency
    # done breaks the bill down: map, collapse, and the final reduce.
    phases = done["usage_by_phase"]
    assert set(phases) == {"map", "collapse", "reduce"}
    for key, total in (
        ("input_tokens", done["usage"]["input_tokens"]),
        ("output_tokens", done["usage"]["output_tokens"]),
        ("cost_micro_usd", done["cost"]["micro_usd"]),
    ):
        assert sum(p[key] for p in phases.values()) == total
        assert all(p[key] > 0 for p in phases.values())
    assert done["usage"]["input_tokens"] >= count_tokens(DOCUMENT)


async def test_a_worker_killed_in_the_middle_of_the_map_costs_no_chunk_call_twice(
    stack: Stack,
) -> None:
    # Slow calls, so the map is still under way when the worker dies.
    stack.sim_config(token_delay_ms=5)
    killed: list[int] = []

    async def kill_mid_map(result: StreamResult, event: SseEvent) -> None:
        if event.event == "progress" and event.data.get("done") == 5 and not killed:
            worker = stack.workers[-1]
            worker.kill9()
            killed.append(event.data["done"])
            stack.sim_config(token_delay_ms=1)
            stack.start_worker()

    try:
        # Another user than the first test's: its chunk summaries are not reused.
        result = await follow(stack, kill_mid_map, key="key-ben")
    finally:
        stack.sim_config(token_delay_ms=1)
    assert killed == [5]
    assert result.done["status"] == "COMPLETED", stack.logs()
    calls = calls_of(stack, result.request_id)
    assert len(calls) == 21
    # The calls cut off by the kill were resumed; only those running at the kill (the tier's
    # map_concurrency, 4) may have run again. A call that completed upstream just before the
    # kill, its summary record not yet written, completes twice: the open window of
    # docs/architecture.md, "Long documents" (seen once in a fresh-clone run).
    again = [rid for rid, r in calls.items() if len(r["streams"]) > 1]
    assert len(again) <= 4, again
    assert all(completed_streams(r) <= 2 for r in calls.values()), calls
    assert sum(completed_streams(r) for r in calls.values()) <= 21 + 4, calls


async def test_a_cancel_stops_every_chunk_call(stack: Stack) -> None:
    # Slow calls: the first ones are still running when the cancel comes.
    stack.sim_config(token_delay_ms=50)
    cancelled: list[str] = []

    async def cancel_while_calls_run(result: StreamResult, event: SseEvent) -> None:
        if event.event != "progress" or cancelled:
            return

        def calls_running() -> bool:
            streams = [s for r in calls_of(stack, result.request_id).values() for s in r["streams"]]
            return sum(1 for s in streams if s["ended"] is None) >= 2

        eventually(calls_running, timeout=30, message="the first chunk calls to start")
        async with httpx.AsyncClient(timeout=10) as client:
            url = f"{stack.gateway}/v1/summaries/{result.request_id}"
            answer = await client.delete(url, headers=auth("key-flood"))
        assert answer.status_code == 202, answer.text
        cancelled.append(result.request_id)

    try:
        result = await follow(stack, cancel_while_calls_run, key="key-flood")

        def every_call_ended() -> bool:
            calls = calls_of(stack, result.request_id)
            return all(s["ended"] is not None for r in calls.values() for s in r["streams"])

        eventually(every_call_ended, timeout=10, message="every chunk call to end")
    finally:
        stack.sim_config(token_delay_ms=1)
    assert result.done["status"] == "CANCELLED"
    assert result.of("error")[-1].data["code"] == "cancelled"
    streams = [s for r in calls_of(stack, result.request_id).values() for s in r["streams"]]
    # The running calls were closed by the worker (the simulator's client) and none
    # completed; the caps held most of the 18 back (a call that took a freed slot before its
    # own cancel arrived was closed as well).
    assert {s["ended"] for s in streams} == {"client_closed"}
    assert 2 <= len(streams) < 18


async def test_the_same_document_again_reuses_its_chunk_summaries(stack: Stack) -> None:
    # ann summarized DOCUMENT in the first test (within the reuse window): its map calls are
    # not made again; the collapse and final calls are.
    result = await follow(stack)
    plan, *progress = [e.data for e in result.of("progress")]
    assert plan["chunks"] == 18
    assert progress[-1]["reused_chunks"] == 18
    assert result.done["status"] == "COMPLETED"
    calls = calls_of(stack, result.request_id)
    assert sorted(longdoc.parse_chunk_id(rid)[1] for rid in calls if "~" in rid) == [1, 1]
    assert result.done["usage"]["attempts"] == 3
