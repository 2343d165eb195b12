"""Tools for the failure-contract tests (test_failures*.py): a TCP proxy that cuts connections,
the workers' Prometheus figures and log lines, and raw access to the topics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.core.errors import SumstreamError
from pipeline.core.settings import REPO_ROOT, BrokerSettings, KafkaSettings
from pipeline.kafka.admin import create_topics
from pipeline.ops import broker
from tests.e2e.harness import Proc, Stack, StreamResult, auth, free_port, sse_events

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


# -- workers: metrics and log -----------------------------------------------------------------


def log_records(proc: Proc) -> list[dict[str, Any]]:
    """The JSON log lines of a sumstream process (non-JSON lines skipped)."""
    out = []
    try:
        text = proc.log_path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def metrics_port(worker: Proc, timeout_s: float = 60) -> int:
    """The worker's /metrics port, from its ``metrics`` log line (it is started with port 0)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for record in log_records(worker):
            if record.get("msg") == "metrics" and "port" in record:
                return int(record["port"])
        time.sleep(0.2)
    raise TimeoutError(f"{worker.name} logged no metrics port:\n{worker.tail()}")


def metric(worker: Proc, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there is none)."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port(worker)}/metrics", timeout=5).text
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


async def wait_for_async(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true after {timeout_s} s: {what}")
        await asyncio.sleep(0.2)


# -- topics -------------------------------------------------------------------------------------


def end_offsets(bootstrap: str, topic: str) -> int:
    """Records ever written to ``topic`` (the sum of its partitions' end offsets)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused"})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        total = 0
        for p in meta.topics[topic].partitions:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high
        return total
    finally:
        consumer.close()


def produce_raw(bootstrap: str, topic: str, key: bytes | None, value: bytes) -> tuple[int, int]:
    """Produce one record as it is (no codec); returns its partition and offset."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    delivered: list[Any] = []
    producer.produce(
        topic, key=key, value=value, on_delivery=lambda err, msg: delivered.append((err, msg))
    )
    producer.flush(30)
    [(err, msg)] = delivered
    assert err is None, err
    return int(msg.partition()), int(msg.offset())


@dataclass(frozen=True)
class Record:
    key: bytes | None
    value: bytes
    partition: int
    offset: int
    timestamp_ms: int


def read_topic(
    bootstrap: str, topic: str, until: Callable[[list[Record]], bool], timeout_s: float = 60
) -> list[Record]:
    """Read ``topic`` from the start until ``until(records so far)`` holds."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False}
    )
    records: list[Record] = []
    try:
        meta = consumer.list_topics(topic, timeout=10)
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions])
        deadline = time.monotonic() + timeout_s
        while not until(records):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: condition not met; {len(records)} records read")
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            records.append(
                Record(msg.key(), msg.value(), msg.partition(), msg.offset(), msg.timestamp()[1])
            )
        return records
    finally:
        consumer.close()


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
        async with asyncio.timeout(timeout_s):
            while min(self.tokens) < tokens:
                for task in self._tasks:
                    if task.done():
                        result = await task  # raises what made the client fail
                        raise AssertionError(f"a stream ended early: {result.events[-3:]}")
                await asyncio.sleep(0.1)

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
        for attempt in range(20):
            try:
                create_topics(probe)
                break
            except SumstreamError:
                if attempt == 19:
                    raise
                time.sleep(1.0)
        yield settings
    finally:
        broker.stop(settings)  # never leave a broker behind, whatever failed
