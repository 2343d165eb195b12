"""Tools for the failure-contract tests (test_failures*.py): a TCP proxy that cuts connections,
the workers' Prometheus figures, simulator knobs, many SSE clients at once, a broker of one's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from pipeline.core.errors import SumstreamError
from pipeline.core.settings import REPO_ROOT, BrokerSettings, KafkaSettings
from pipeline.kafka.admin import create_topics
from pipeline.ops import broker
from tests.harness import (
    Proc,
    Stack,
    StreamResult,
    auth,
    eventually,
    eventually_async,
    free_port,
    sse_events,
)

# -- a proxy between the workers and the simulator ---------------------------------------------


class FlakyProxy:
    """Forwards TCP to ``target_port``; ``cut(n)`` drops every open connection and refuses the
    next ``n`` ones (reset at once), which the SDK sees as a connection error before any byte.

    It runs its own event loop on a thread, so it keeps serving while a test blocks.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.refused = 0
        self.forwarded = 0
        self._refuse_left = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        self._server = self._call(
            asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        )

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            if self._server is not None:
                await self._server.wait_closed()

        try:
            self._call(close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def cut(self, refuse_next: int) -> None:
        """Abort every open connection, and reset the next ``refuse_next`` new ones."""

        async def cut() -> None:
            self._refuse_left = refuse_next
            for writer in list(self._writers):
                writer.transport.abort()

        self._call(cut())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refuse_left > 0:
            self._refuse_left -= 1
            self.refused += 1
            writer.transport.abort()
            return
        self.forwarded += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    # One side ended: end the other so the pair closes together.
    writer.transport.abort()


# -- workers: metrics -------------------------------------------------------------------------


def metric(worker: Proc, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there is none)."""
    text = httpx.get(f"http://127.0.0.1:{worker.metrics_port()}/metrics", timeout=5).text
    total = 0.0
    pattern = re.compile(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$")
    for line in text.splitlines():
        found = pattern.match(line)
        if found is None or found.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', found.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(found.group(4))
    return total


@contextlib.contextmanager
def sim_knobs(stack: Stack, **knobs: Any) -> Iterator[None]:
    """Set simulator knobs for a block, then put back the harness defaults."""
    stack.sim_config(**knobs)
    try:
        yield
    finally:
        stack.sim_config(
            ttft_ms=20,
            token_delay_ms=2,
            fail_all=False,
            fail_next=0,
            error_rate=0.0,
            fault_at_token=0,
            fault_times=-1,
            fault_kind="error",
            retry_after_s=1.0,
            error_status=529,
        )


# -- many SSE clients at once -------------------------------------------------------------------


class Clients:
    """SSE clients streaming one document each through a gateway, counting their tokens.

    ``async with Clients(...) as clients``: ``await clients.under_way(3)`` returns once every
    stream has 3 tokens; ``await clients.results()`` waits for every `done`. Leaving the block
    cancels whatever still runs.
    """

    def __init__(
        self, client: httpx.AsyncClient, url: str, docs: list[str], max_tokens: int
    ) -> None:
        self._client = client
        self._url = url
        self._docs = docs
        self._max_tokens = max_tokens
        self.tokens = [0] * len(docs)
        self._tasks: list[asyncio.Task[StreamResult]] = []

    async def __aenter__(self) -> Clients:
        self._tasks = [asyncio.create_task(self._follow(i)) for i in range(len(self._docs))]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def under_way(self, tokens: int, timeout_s: float = 90) -> None:
        async def every_stream_has_tokens() -> bool:
            for task in self._tasks:
                if task.done():
                    result = await task  # raises what made the client fail
                    raise RuntimeError(f"a stream ended early: {result.events[-3:]}")
            return min(self.tokens) >= tokens

        await eventually_async(
            every_stream_has_tokens, timeout=timeout_s, message=f"{tokens} tokens a stream"
        )

    async def results(self) -> list[StreamResult]:
        return list(await asyncio.gather(*self._tasks))

    async def _follow(self, index: int) -> StreamResult:
        async with self._client.stream(
            "POST",
            f"{self._url}/v1/summaries",
            json={"document": self._docs[index], "max_output_tokens": self._max_tokens},
            headers=auth(),
        ) as response:
            result = StreamResult(response.status_code)
            async for event in sse_events(response):
                result.events.append(event)
                if event.event == "token":
                    self.tokens[index] += 1
                if event.event == "done":
                    break
        return result


# -- a broker of one's own -----------------------------------------------------------------------


@contextlib.contextmanager
def fresh_broker(data_dir: Path) -> Iterator[BrokerSettings]:
    """A new single-node broker on free ports (the shared one is never touched), stopped after.

    It is warmed up first: right after it starts, a broker can answer ListOffsets for a partition
    it has just become leader of with UNKNOWN_LEADER_EPOCH, which pipeline/kafka/admin.py does not
    treat as "not yet" (reported); once it has settled, creating topics goes through at once.
    """
    port = free_port()
    settings = BrokerSettings(
        data_dir=data_dir,
        broker_port=port,
        controller_port=free_port(),
        bootstrap_servers=f"127.0.0.1:{port}",
        # The jars are shared with the main broker: fetched once per checkout.
        jars_dir=REPO_ROOT / ".data" / "kafka" / "jars",
        broker_heap="384m",
    )
    try:
        broker.start(settings, wait_s=180)
        probe = KafkaSettings(bootstrap_servers=settings.bootstrap_servers, topic_prefix="warm.")

        def topics_created() -> bool:
            try:
                create_topics(probe)
            except SumstreamError as exc:
                raise AssertionError(f"not yet: {exc}") from exc
            return True

        eventually(topics_created, timeout=60, interval=1.0, message="the new broker settled")
        yield settings
    finally:
        broker.stop(settings)  # never leave a broker behind, whatever failed
