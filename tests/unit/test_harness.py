"""The shared test harness (tests/harness/): waiting for a condition and reading SSE bodies."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.harness import SseEvent, collect, eventually, eventually_async, sse_events


def test_eventually_returns_the_first_answer_that_is_not_none_or_false() -> None:
    answers = iter([None, False, 0])
    assert eventually(lambda: next(answers), timeout=5, interval=0) == 0


def test_eventually_retries_a_failed_assertion_and_reports_the_last_one_on_timeout() -> None:
    calls = itertools.count(1)

    def never() -> bool:
        raise AssertionError(f"call {next(calls)}")

    with pytest.raises(TimeoutError, match=r"the thing; last check: call \d+"):
        eventually(never, timeout=0.05, interval=0, message="the thing")
    assert next(calls) > 2, "it was called again after the first failed assertion"


def test_eventually_ends_at_once_on_any_other_exception() -> None:
    calls: list[int] = []

    def exited() -> bool:
        calls.append(1)
        raise RuntimeError("the process exited")

    with pytest.raises(RuntimeError, match="exited"):
        eventually(exited, timeout=60)
    assert len(calls) == 1


async def test_eventually_async_awaits_coroutine_conditions_while_other_tasks_run() -> None:
    done = asyncio.Event()
    task = asyncio.create_task(done.wait())

    async def finished() -> bool:
        done.set()  # the task only finishes if the wait yields to the loop
        return task.done()

    assert await eventually_async(finished, timeout=5) is True


async def test_eventually_async_raises_timeout_with_the_message() -> None:
    with pytest.raises(TimeoutError, match="nothing happened"):
        await eventually_async(lambda: False, timeout=0.05, message="nothing happened")


BODY = [
    b': ping\r\n\r\nevent: accepted\r\ndata: {"id": "r1"}\r',
    b'\n\r\nevent: token\r\nid: 2\r\ndata: {"seq": 2, ',
    b'"text": "Hi"}\n\nevent: done\ndata: {"status": "COMPLETED"}\n\n',
]


def sse_client() -> httpx.AsyncClient:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in BODY:
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks(), headers={"content-type": "text/event-stream"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def test_sse_events_decode_json_data_across_chunk_and_crlf_boundaries() -> None:
    async with sse_client() as client, client.stream("GET", "http://sse.test/") as response:
        events = [event async for event in sse_events(response)]
    assert events == [
        SseEvent("accepted", {"id": "r1"}, None),
        SseEvent("token", {"seq": 2, "text": "Hi"}, "2"),
        # The last event id stays in force (WHATWG), so `done` carries the token's.
        SseEvent("done", {"status": "COMPLETED"}, "2"),
    ]


async def test_collect_gives_the_stream_in_order_with_its_text_and_done() -> None:
    async with sse_client() as client:
        result = await collect(client, "GET", "http://sse.test/")
    assert result.status_code == 200
    assert [e.event for e in result.events] == ["accepted", "token", "done"]
    assert (result.request_id, result.seqs, result.text) == ("r1", [2], "Hi")
    assert result.done == {"status": "COMPLETED"}
