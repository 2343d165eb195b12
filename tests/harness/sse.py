"""SSE clients for tests: the events one request received, parsed by the benchmark's parser
(bench/sse.py) so tests and the benchmark read streams the same way."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.sse import SSEParser
from tests.harness.waiting import eventually_async


@dataclass
class SseEvent:
    """One server-sent event, its data decoded from JSON when it is JSON."""

    event: str
    data: Any
    id: str | None = None


@dataclass
class StreamResult:
    """Everything one SSE client received."""

    status_code: int
    events: list[SseEvent] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def of(self, name: str) -> list[SseEvent]:
        return [e for e in self.events if e.event == name]

    @property
    def request_id(self) -> str:
        return str(self.of("accepted")[0].data["id"])

    @property
    def text(self) -> str:
        return "".join(e.data["text"] for e in self.of("token"))

    @property
    def seqs(self) -> list[int]:
        """Every seq the token events cover, in order: a token event covers ``first_seq``..its
        id (docs/architecture.md, "Coalesced token records")."""
        return [
            seq
            for e in self.of("token")
            if e.id is not None
            for seq in range(int(e.data.get("first_seq") or e.id), int(e.id) + 1)
        ]

    @property
    def done(self) -> dict[str, Any]:
        done = self.of("done")
        assert done, f"no done event in {[e.event for e in self.events]}"
        return dict(done[-1].data)


def _decoded(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """The events of an SSE response body as they arrive."""
    parser = SSEParser()
    async for chunk in response.aiter_bytes():
        for event in parser.feed(chunk):
            yield SseEvent(event.event, _decoded(event.data), event.id)


async def collect(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    stop_after_tokens: int | None = None,
    **kwargs: Any,
) -> StreamResult:
    """Run one SSE request to its end (the `done` event) or until ``stop_after_tokens``."""
    async with client.stream(method, url, **kwargs) as response:
        result = StreamResult(response.status_code, headers=dict(response.headers))
        if response.status_code >= 300:
            await response.aread()
            result.events.append(SseEvent("http_error", response.json()))
            return result
        async for ev in sse_events(response):
            result.events.append(ev)
            if ev.event == "done":
                break
            if stop_after_tokens is not None and len(result.of("token")) >= stop_after_tokens:
                break
    return result


async def summary_result(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], request_id: str
) -> dict[str, Any]:
    """GET /v1/summaries/{id} until its result is there (202 while running)."""

    async def finished() -> dict[str, Any] | None:
        got = await client.get(f"{url}/v1/summaries/{request_id}", headers=headers)
        assert got.status_code in (200, 202), got.text
        body: dict[str, Any] = got.json()
        return body if got.status_code == 200 else None

    result: dict[str, Any] = await eventually_async(
        finished, timeout=120, message=f"the result of {request_id}"
    )
    return result
