"""The gateway side of the floor (bench/floor_parts.py): one consumer tailing `tokens` and
`results` for every stream, driven bare (``pipe``) or behind Starlette/uvicorn (``gateway``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import corpus
from bench.floor_parts import DELTA, REQUEST, RESULT, Config, bare_worker, producer, value

# -- the gateway side -----------------------------------------------------------------------


class Tail:
    """One consumer on every partition of `tokens` and `results` (no group, from the end),
    handing each record to the stream registered for its key."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.streams: dict[bytes, Callable[[dict[str, Any]], None]] = {}
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=cfg.fetch_max_wait_ms,
        )

    async def start(self) -> None:
        await self.consumer.start()
        parts = [
            TopicPartition(topic, p)
            for topic in (self.cfg.topic("tokens"), self.cfg.topic("results"))
            for p in range(self.cfg.partitions)
        ]
        self.consumer.assign(parts)
        await self.consumer.seek_to_end(*parts)

    async def run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for rec in records:
                    handler = self.streams.get(rec.key or b"")
                    if handler is not None:
                        handler(orjson.loads(rec.value or b"{}"))


async def pipe(cfg: Config, concurrency: int, requests: int, with_worker: bool) -> None:
    """The gateway side in bare aiokafka, closed loops started by ``go`` on stdin; prints
    ``ready``, then one JSON line with the TTFTs (ms) of the timed requests."""
    stop = asyncio.Event()
    worker = asyncio.create_task(bare_worker(cfg, stop)) if with_worker else None
    prod = producer(cfg)
    await prod.start()
    tail = Tail(cfg)
    await tail.start()
    tailing = asyncio.create_task(tail.run())

    async def one(index: int) -> float:
        key = uuid.uuid4().hex.encode()
        first: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        done = asyncio.Event()

        def handler(record: dict[str, Any]) -> None:
            if record["k"] == DELTA and not first.done():
                first.set_result(time.perf_counter())
            elif record["k"] == RESULT:
                done.set()

        tail.streams[key] = handler
        document, _ = corpus.request(index, cfg.tokens)
        t0 = time.perf_counter()
        await (await prod.send(cfg.topic("requests"), value(cfg, REQUEST, doc=document), key=key))
        await asyncio.wait_for(done.wait(), 60)
        del tail.streams[key]
        return (first.result() - t0) * 1000.0

    async def loops(n: int, first_index: int) -> list[float]:
        counter = iter(range(first_index, first_index + n))
        ttfts: list[float] = []

        async def user() -> None:
            for i in counter:
                ttfts.append(await one(i))

        await asyncio.gather(*(user() for _ in range(concurrency)))
        return ttfts

    await loops(max(2 * concurrency, 40), 10_000)  # warm-up: the group has joined, caches hot
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    await reader.readline()
    t0 = time.perf_counter()
    ttfts = await loops(requests, 0)
    print(json.dumps({"ttft_ms": ttfts, "wall_s": time.perf_counter() - t0}), flush=True)
    await reader.readline()  # the caller has read its meters
    tailing.cancel()
    stop.set()
    if worker is not None:
        await worker
    await prod.stop()
    await tail.consumer.stop()


def gateway_app(cfg: Config) -> Any:
    """Starlette: POST produces the request and answers an SSE stream fed by one consumer."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        state["producer"] = prod = producer(cfg)
        await prod.start()
        state["tail"] = tail = Tail(cfg)
        await tail.start()
        tailing = asyncio.create_task(tail.run())
        yield
        tailing.cancel()
        await prod.stop()
        await tail.consumer.stop()

    async def summaries(request: Request) -> Response:
        body = orjson.loads(await request.body())
        key = uuid.uuid4().hex.encode()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        tail: Tail = state["tail"]
        tail.streams[key] = queue.put_nowait
        data = value(cfg, REQUEST, doc=body["document"])
        await (await state["producer"].send(cfg.topic("requests"), data, key=key))

        async def events() -> AsyncIterator[bytes]:
            yield b"event: accepted\r\ndata: " + orjson.dumps({"id": key.decode()}) + b"\r\n\r\n"
            try:
                while True:
                    items = [await queue.get()]
                    while not queue.empty():
                        items.append(queue.get_nowait())
                    chunk, end = _sse(items)
                    yield chunk
                    if end:
                        return
            finally:
                tail.streams.pop(key, None)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[Route("/v1/summaries", summaries, methods=["POST"]), Route("/healthz", healthz)],
        lifespan=lifespan,
    )


def _sse(items: list[dict[str, Any]]) -> tuple[bytes, bool]:
    """The wire bytes of queued records as SSE events; True when the stream ended."""
    out: list[bytes] = []
    for record in items:
        kind = record["k"]
        if kind == DELTA:
            data = orjson.dumps({"text": record["t"], "seq": record["s"], "first_seq": record["f"]})
            out.append(b"id: %d\r\nevent: token\r\ndata: %s\r\n\r\n" % (record["s"], data))
        elif kind == RESULT:
            data = orjson.dumps({"status": "DONE", "summary": record["summary"]})
            out.append(b"event: done\r\ndata: " + data + b"\r\n\r\n")
            return b"".join(out), True
    return b"".join(out), False
