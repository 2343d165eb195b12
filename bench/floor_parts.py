"""The minimal implementations `bench/floor.py` measures: sumstream's data flow with nothing
but the necessary parts (docs/architecture.md, "Performance targets").

Every record carries what sumstream's carries (a request with its document, a job, a STARTED,
N coalesced deltas, a terminal event, a result), padded to the mean sizes sumstream's records
have on the wire, as orjson instead of Avro. The parts:

* ``pipe``: the gateway side in bare aiokafka (produce a request, tail `tokens` and `results`
  without a group, time the first delta), closed loops driven from stdin (``go``); with
  ``--worker`` the worker side (preprocess, inference, postprocess in one consumer group) runs
  in the same process.
* ``worker``: the worker side of ``pipe`` alone (bare aiokafka, one consumer group).
* ``faust``: the worker side as a Faust app whose agents only forward.
* ``gateway``: Starlette/uvicorn: POST produces the request, one aiokafka consumer feeds each
  stream's SSE events (pending events in one write).

The inference part calls the model (``--upstream``: raw httpx stream decoded by
`pipeline/llm/sse.py`) or, without it, sends the deltas at the model's pace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench import corpus
from bench.baseline import MODEL, prompt
from pipeline.llm.sse import SseDecoder

# Record kinds, the first key of every value.
REQUEST, JOB, STARTED, DELTA, TERMINAL, RESULT = "R", "J", "S", "D", "T", "X"


@dataclass(frozen=True)
class Config:
    """What every part shares: broker, topics, the model's pace, sizes and coalescing."""

    bootstrap: str
    prefix: str
    deltas: int = 33
    tokens: int = 100
    ttft_ms: float = 200.0
    token_ms: float = 10.0
    upstream: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    fetch_max_wait_ms: int = 50
    worker_fetch_max_wait_ms: int = 1500
    partitions: int = 6

    def topic(self, name: str) -> str:
        return f"{self.prefix}{name}"

    @property
    def ends(self) -> frozenset[int]:
        """The seqs that end a DELTA record: ``deltas`` records over ``tokens`` tokens, the
        first token alone (as sumstream's first delta goes at once), the rest spread evenly."""
        n = max(1, min(self.deltas, self.tokens)) - 1
        rest = self.tokens - 1
        return frozenset({1, *(1 + round(j * rest / n) for j in range(1, n + 1))} if n else {1})


def value(cfg: Config, kind: str, **fields: Any) -> bytes:
    """A record value of ``kind`` padded to sumstream's mean size for that kind."""
    raw = orjson.dumps({"k": kind, **fields})
    want = cfg.sizes.get(kind, 0)
    if len(raw) + 8 < want:
        raw = orjson.dumps({"k": kind, **fields, "p": "x" * (want - len(raw) - 8)})
    return raw


def producer(cfg: Config) -> AIOKafkaProducer:
    # sumstream's producers: idempotent, acks=all, no linger.
    return AIOKafkaProducer(
        bootstrap_servers=cfg.bootstrap, acks="all", enable_idempotence=True, linger_ms=0
    )


# -- the worker side ------------------------------------------------------------------------


class Inference:
    """The inference part: STARTED, the deltas (coalesced ``per_record`` tokens), terminal."""

    def __init__(self, cfg: Config, send: Callable[[str, bytes, bytes], Awaitable[None]]) -> None:
        self.cfg = cfg
        self.send = send
        self.http = httpx.AsyncClient(base_url=cfg.upstream or "http://unused", timeout=60.0)
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, key: bytes, job: dict[str, Any]) -> None:
        task = asyncio.create_task(self.run(key, job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, key: bytes, job: dict[str, Any]) -> None:
        tokens = self.cfg.topic("tokens")
        await self.send(tokens, key, value(self.cfg, STARTED))
        seq = 0
        ends = self.cfg.ends
        pending: list[str] = []
        async for text in self.pieces(str(job.get("doc", ""))):
            pending.append(text)
            if seq + len(pending) in ends:
                first, seq = seq + 1, seq + len(pending)
                delta = value(self.cfg, DELTA, t="".join(pending), s=seq, f=first)
                await self.send(tokens, key, delta)
                pending = []
        if pending:
            first, seq = seq + 1, seq + len(pending)
            await self.send(tokens, key, value(self.cfg, DELTA, t="".join(pending), s=seq, f=first))
        await self.send(tokens, key, value(self.cfg, TERMINAL, s=seq))

    async def pieces(self, document: str) -> AsyncIterator[str]:
        """The model's text deltas: from the upstream, or paced like the simulator."""
        if self.cfg.upstream is None:
            await asyncio.sleep(self.cfg.ttft_ms / 1000.0)
            t0 = time.perf_counter()
            for i in range(self.cfg.tokens):
                wait = t0 + i * self.cfg.token_ms / 1000.0 - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                yield "w "
            return
        body = {
            "model": MODEL,
            "max_tokens": self.cfg.tokens,
            "stream": True,
            "messages": [{"role": "user", "content": prompt(document)}],
        }
        headers = {"x-api-key": "floor", "anthropic-version": "2023-06-01"}
        async with self.http.stream("POST", "/v1/messages", json=body, headers=headers) as resp:
            decoder = SseDecoder()
            async for chunk in resp.aiter_raw():
                for frame in decoder.feed(chunk):
                    if frame.event == "content_block_delta":
                        yield str(frame.data["delta"].get("text", ""))


class Postprocess:
    """The postprocess part: the text of each stream, and its result at the terminal event."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.texts: dict[bytes, list[str]] = {}

    def on_token(self, key: bytes, record: dict[str, Any]) -> bytes | None:
        kind = record["k"]
        if kind == DELTA:
            self.texts.setdefault(key, []).append(record["t"])
        elif kind == TERMINAL:
            summary = "".join(self.texts.pop(key, []))
            return value(self.cfg, RESULT, summary=summary)
        return None


async def bare_worker(cfg: Config, stop: asyncio.Event) -> None:
    """Preprocess, inference and postprocess in one consumer group, bare aiokafka."""
    prod = producer(cfg)
    cons = AIOKafkaConsumer(
        cfg.topic("requests"),
        cfg.topic("preprocessed"),
        cfg.topic("tokens"),
        bootstrap_servers=cfg.bootstrap,
        group_id=f"{cfg.prefix}worker",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=cfg.worker_fetch_max_wait_ms,
        auto_commit_interval_ms=1000,
    )
    await prod.start()
    await cons.start()

    async def send(topic: str, key: bytes, data: bytes) -> None:
        await prod.send(topic, data, key=key)

    inference = Inference(cfg, send)
    post = Postprocess(cfg)
    try:
        while not stop.is_set():
            batches = await cons.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for rec in records:
                    key, data = rec.key or b"", orjson.loads(rec.value or b"{}")
                    if tp.topic == cfg.topic("requests"):
                        await send(cfg.topic("preprocessed"), key, value(cfg, JOB, doc=data["doc"]))
                    elif tp.topic == cfg.topic("preprocessed"):
                        inference.start(key, data)
                    else:
                        result = post.on_token(key, data)
                        if result is not None:
                            await send(cfg.topic("results"), key, result)
    finally:
        await cons.stop()
        await prod.stop()
        await inference.http.aclose()


def faust_app(cfg: Config) -> Any:
    """The worker side as a Faust app that only forwards (the settings sumstream's app uses
    where they bear on cost: acks=all, no linger, commit every second, memory store)."""
    import faust

    app = faust.App(
        f"{cfg.prefix}floor",
        broker=f"kafka://{cfg.bootstrap}",
        key_serializer="raw",
        value_serializer="raw",
        autodiscover=False,
        store="memory://",
        web_enabled=False,
        producer_acks=-1,
        producer_linger=0.0,
        stream_wait_empty=False,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        worker_redirect_stdouts=False,
    )
    topics = {n: app.topic(cfg.topic(n)) for n in ("requests", "preprocessed", "tokens", "results")}
    by_name = {cfg.topic(n): t for n, t in topics.items()}

    async def send(topic: str, key: bytes, data: bytes) -> None:
        await by_name[topic].send(key=key, value=data)

    inference = Inference(cfg, send)
    post = Postprocess(cfg)

    @app.agent(topics["requests"])
    async def preprocess(stream: Any) -> None:
        async for key, data in stream.items():
            doc = orjson.loads(data)["doc"]
            await topics["preprocessed"].send(key=key, value=value(cfg, JOB, doc=doc))

    @app.agent(topics["preprocessed"])
    async def infer(stream: Any) -> None:
        async for key, data in stream.items():
            inference.start(key, orjson.loads(data))

    @app.agent(topics["tokens"])
    async def postprocess(stream: Any) -> None:
        async for key, data in stream.items():
            result = post.on_token(key, orjson.loads(data))
            if result is not None:
                await topics["results"].send(key=key, value=result)

    return app


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_parts")
    parser.add_argument("part", choices=("pipe", "faust", "gateway", "worker"))
    parser.add_argument("--config", required=True, help="the Config as JSON")
    parser.add_argument("--worker", action="store_true", help="pipe: the worker side too")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--port", type=int, default=19160)
    args = parser.parse_args(argv)
    cfg = Config(**json.loads(args.config))
    if args.part == "pipe":
        asyncio.run(pipe(cfg, args.concurrency, args.requests, args.worker))
    elif args.part == "worker":
        asyncio.run(bare_worker(cfg, asyncio.Event()))
    elif args.part == "faust":
        from faust import Worker

        sys.argv = [sys.argv[0]]  # Worker parses the command line
        Worker(faust_app(cfg), loglevel="warning").execute_from_commandline()
    else:
        import uvicorn

        uvicorn.run(
            gateway_app(cfg),
            host="127.0.0.1",
            port=args.port,
            log_level="warning",
            access_log=False,
        )


if __name__ == "__main__":
    main()
