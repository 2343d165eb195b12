"""The minimal implementations `bench/floor.py` measures: sumstream's data flow with nothing
but the necessary parts (docs/architecture.md, "Performance targets").

Every record carries what sumstream's carries (a request with its document, a job, a STARTED,
N coalesced deltas, a terminal event, a result), padded to the mean sizes sumstream's records
have on the wire, as orjson instead of Avro. The parts:

* ``pipe`` (`bench/floor_gateway.py`): the gateway side in bare aiokafka (produce a request,
  tail `tokens` and `results` without a group, time the first delta), closed loops driven
  from stdin (``go``); with ``--worker`` the worker side (preprocess, inference, postprocess
  in one consumer group) runs in the same process.
* ``worker``: the worker side of ``pipe`` alone (bare aiokafka, one consumer group).
* ``faust``: the worker side as a Faust app whose agents only forward.
* ``gateway`` (`bench/floor_gateway.py`): Starlette/uvicorn: POST produces the request, one
  aiokafka consumer feeds each stream's SSE events (pending events in one write).

The inference part calls the model (``--upstream``: raw httpx stream decoded by
`pipeline/llm/sse.py`) or, without it, sends the deltas at the model's pace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

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
    from bench import floor_gateway

    if args.part == "pipe":
        asyncio.run(floor_gateway.pipe(cfg, args.concurrency, args.requests, args.worker))
    elif args.part == "worker":
        asyncio.run(bare_worker(cfg, asyncio.Event()))
    elif args.part == "faust":
        from faust import Worker

        sys.argv = [sys.argv[0]]  # Worker parses the command line
        Worker(faust_app(cfg), loglevel="warning").execute_from_commandline()
    else:
        import uvicorn

        uvicorn.run(
            floor_gateway.gateway_app(cfg),
            host="127.0.0.1",
            port=args.port,
            log_level="warning",
            access_log=False,
        )


if __name__ == "__main__":
    main()
