"""An Anthropic-compatible LLM simulator (`sumstream llm-sim`, see docs/architecture.md).

``POST /v1/messages`` answers exactly like the Messages API, as JSON or as a named-event SSE
stream, with a real extractive summary of the prompt's document (pipeline.llm.extractive), so
the official SDK talks to it through ``base_url``. Knobs inject upstream trouble on demand and
change at run time (``POST /_sim/config``); ``GET /_sim/stats`` counts what arrived.

It is a raw ASGI app (see asgi.py); dropping the TCP connection needs an exception to reach
uvicorn, which is plainer without a framework in between.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client import Counter as MetricCounter
from pydantic import ValidationError

from pipeline.core.clock import now_ms
from pipeline.core.settings import SimulatorSettings
from pipeline.llm.simulator import admin, asgi, protocol
from pipeline.llm.simulator.asgi import ClientGone, Receive, Scope, Send
from pipeline.llm.simulator.cache import CacheUsage, PromptCache
from pipeline.llm.simulator.limits import RateBuckets
from pipeline.llm.simulator.pacing import pace
from pipeline.llm.simulator.protocol import Call, Rejection, Reply
from pipeline.llm.simulator.stats import RequestRecord, Stats, StreamRecord, append_bounded

# Knob -> rate-limit bucket (limits.py).
BUCKET_KNOBS = {
    "requests_per_minute": "requests",
    "tokens_per_minute": "tokens",
    "input_tokens_per_minute": "input-tokens",
    "output_tokens_per_minute": "output-tokens",
}
# The SimulatorSettings fields that POST /_sim/config may change.
KNOBS = (
    "ttft_ms",
    "token_delay_ms",
    "max_concurrent",
    "error_rate",
    "error_status",
    "seed",
    "fail_next",
    "fail_all",
    "fault_at_token",
    "fault_kind",
    "fault_times",
    "retry_after_s",
    "context_window_tokens",
    "cache_min_tokens",
    "record_prompts",
    *BUCKET_KNOBS,
)
# A bigger body is parsed and summarized on a thread.
OFF_LOOP_BYTES = 64 * 1024


class _ConnectionDropped(Exception):
    """Raised to uvicorn on purpose: it then closes the socket without ending the response."""


class _HideDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _ConnectionDropped))


_HIDE_DROPS = _HideDrops()


class Simulator:
    """The ASGI app: knobs, counters and the open streams of one simulator."""

    def __init__(self, settings: SimulatorSettings | None = None) -> None:
        self.settings = settings or SimulatorSettings()
        self._admin = admin.AdminGuard(self.settings.host, self.settings.admin_token)
        self.open_streams = 0
        self.registry = CollectorRegistry()
        self._attempts_metric = MetricCounter(
            "sumstream_sim_attempts_total",
            "Requests to /v1/messages by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self._ended_metric = MetricCounter(
            "sumstream_sim_streams_total",
            "Accepted responses by how they ended",
            ["ended"],
            registry=self.registry,
        )
        self._tokens_metric = MetricCounter(
            "sumstream_sim_output_tokens_total", "Tokens sent", registry=self.registry
        )
        self._open_metric = Gauge(
            "sumstream_sim_open_streams", "Responses in progress", registry=self.registry
        )
        self._routes: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("POST", "/v1/messages"): self._messages,
            ("POST", "/v1/messages/count_tokens"): self._count_tokens,
            ("GET", "/_sim/config"): self._get_config,
            ("POST", "/_sim/config"): self._post_config,
            ("GET", "/_sim/stats"): self._get_stats,
            ("POST", "/_sim/reset"): self._post_reset,
            ("GET", "/metrics"): self._get_metrics,
            ("GET", "/healthz"): self._get_health,
        }
        self.reset()
        logging.getLogger("uvicorn.error").addFilter(_HIDE_DROPS)

    def reset(self) -> None:
        """Clear the stats and restore every knob from the settings."""
        self.knobs = self.settings
        self._fail_next = self.settings.fail_next
        self._faults_left = self.settings.fault_times
        self._rng = random.Random(self.settings.seed)
        self.buckets = RateBuckets(self._bucket_sizes(self.settings), time.time())
        self.stats = Stats(self.settings.max_records, peak_concurrent=self.open_streams)
        self.cache = PromptCache(min_tokens=self.settings.cache_min_tokens)

    def configure(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change knobs (SimulatorSettings names); raises ValueError when one is unknown or bad."""
        unknown = sorted(set(changes) - set(KNOBS))
        if unknown:
            raise ValueError(f"unknown knobs: {', '.join(unknown)}")
        self.knobs = SimulatorSettings(**{**self.knobs.model_dump(), **self.config(), **changes})
        # fail_next and fault_times are counters that requests use up; only a new value resets them.
        if "fail_next" in changes:
            self._fail_next = self.knobs.fail_next
        if "fault_times" in changes:
            self._faults_left = self.knobs.fault_times
        if "seed" in changes:
            self._rng = random.Random(self.knobs.seed)
        self.buckets.resize(self._bucket_sizes(self.knobs), time.time())
        self.cache.min_tokens = self.knobs.cache_min_tokens
        return self.config()

    @staticmethod
    def _bucket_sizes(knobs: SimulatorSettings) -> dict[str, int]:
        return {bucket: getattr(knobs, knob) for knob, bucket in BUCKET_KNOBS.items()}

    def config(self) -> dict[str, Any]:
        """The knobs now in force, with what is left of fail_next and fault_times."""
        values = {name: getattr(self.knobs, name) for name in KNOBS}
        values["fail_next"] = self._fail_next
        values["fault_times"] = self._faults_left
        return values

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"].startswith(admin.PREFIX):
            refusal = self._admin.refusal(dict(scope["headers"]))
            if refusal is not None:
                challenge = [(b"www-authenticate", b"Bearer")] if refusal.status == 401 else []
                await asgi.send_error(send, refusal.status, refusal.message, challenge)
                return
        handler = self._routes.get((scope["method"], scope["path"]))
        if handler is not None:
            await handler(scope, receive, send)
        elif any(path == scope["path"] for _, path in self._routes):
            await asgi.send_error(send, 405, "Method not allowed")
        else:
            await asgi.send_error(send, 404, "Not found")

    async def _messages(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-sumstream-request-id", b"").decode("latin-1") or None
        stats, knobs = self.stats, self.knobs
        record = stats.attempt(request_id)
        try:
            if not headers.get(b"x-api-key") and not headers.get(b"authorization", b"").startswith(
                b"Bearer "
            ):
                raise Rejection(401, "x-api-key header is required")
            body = await asgi.read_body(receive)
            # A big document is parsed and summarized on a thread (once: the summary is
            # cached), so the streams already open keep their pace meanwhile.
            window = knobs.context_window_tokens
            if len(body) > OFF_LOOP_BYTES:
                call, reply = await asyncio.to_thread(protocol.prepare, body, window)
            else:
                call, reply = protocol.prepare(body, window)
            self._admit(knobs)
            self._charge(call, reply)
            # Only an accepted call reads or writes the cache, as only it is billed.
            cached = self.cache.account(call.model, call.segments, call.input_tokens, time.time())
        except Rejection as rejection:
            extra = self.buckets.headers(time.time())
            if rejection.status in (429, 529):
                wait = rejection.retry_after_s
                wait = knobs.retry_after_s if wait is None else wait
                extra.append((b"retry-after", f"{wait:g}".encode()))
            await asgi.send_error(send, rejection.status, rejection.message, extra)
            self._status(stats, record, rejection.status)
            stats.finish(record, "rejected")
            return
        except ClientGone:
            stats.finish(record, "client_closed")
            return
        stats.cached(cached)
        if knobs.record_prompts:
            stats.prompt(record, "\n".join(segment.text for segment in call.segments))
        await self._respond(call, reply, cached, knobs, stats, record, receive, send)

    async def _count_tokens(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/messages/count_tokens``: the prompt's input tokens, as the API counts them
        (free, and outside the rate-limit buckets, as there)."""
        headers = dict(scope["headers"])
        try:
            if not headers.get(b"x-api-key") and not headers.get(b"authorization", b"").startswith(
                b"Bearer "
            ):
                raise Rejection(401, "x-api-key header is required")
            body = await asgi.read_body(receive)
            count = await asyncio.to_thread(protocol.parse_count, body)
        except Rejection as rejection:
            await asgi.send_error(send, rejection.status, rejection.message)
            return
        except ClientGone:
            return
        self.stats.counts += 1
        await asgi.send_json(send, 200, {"input_tokens": count})

    def _admit(self, knobs: SimulatorSettings) -> None:
        if knobs.max_concurrent and self.open_streams >= knobs.max_concurrent:
            raise Rejection(429, "Number of concurrent connections has exceeded your rate limit")
        failing = knobs.fail_all or self._fail_next > 0
        if self._fail_next > 0 and not knobs.fail_all:
            self._fail_next -= 1
        # Draw only when a rate is set, so a seeded run replays the same failures.
        if failing or (knobs.error_rate > 0 and self._rng.random() < knobs.error_rate):
            status = knobs.error_status
            raise Rejection(status, protocol.ERROR_MESSAGES.get(status, "Internal server error"))

    def _charge(self, call: Call, reply: Reply) -> None:
        wait = self.buckets.admit(call.input_tokens, len(reply.pieces), time.time())
        if wait > 0:
            # Whole seconds, rounded up, as the API sends them.
            raise Rejection(
                429,
                "This request would exceed the rate limit for your organization",
                retry_after_s=float(math.ceil(wait)),
            )

    async def _respond(
        self,
        call: Call,
        reply: Reply,
        cached: CacheUsage,
        knobs: SimulatorSettings,
        stats: Stats,
        record: RequestRecord,
        receive: Receive,
        send: Send,
    ) -> None:
        fault_at = 0
        # A stream too short to reach the fault completes and leaves fault_times alone.
        if call.stream and 0 < knobs.fault_at_token < len(reply.pieces) and self._faults_left:
            fault_at = knobs.fault_at_token
            self._faults_left = max(-1, self._faults_left - 1)
        stream = StreamRecord(
            started_at=now_ms(),
            streaming=call.stream,
            prefill_chars=len(call.prefill),
            model=call.model,
            input_tokens=call.input_tokens,
            cache_read_input_tokens=cached.cache_read_input_tokens,
            cache_creation_input_tokens=cached.cache_creation_input_tokens,
        )
        append_bounded(record.streams, stream)
        self._status(stats, record, 200)
        self.open_streams += 1
        self._open_metric.inc()
        stats.peak_concurrent = max(stats.peak_concurrent, self.open_streams)
        ended = "error"
        try:
            work = (
                self._stream(send, call, reply, cached, knobs, fault_at, stream)
                if call.stream
                else self._reply(send, call, reply, cached, knobs, stream)
            )
            ended = await asgi.unless_disconnected(receive, work) or "client_closed"
        except _ConnectionDropped:
            ended = "fault"
            raise
        finally:
            self.open_streams -= 1
            self._open_metric.dec()
            self._ended_metric.labels(ended).inc()
            self._tokens_metric.inc(stream.tokens)
            stream.ended, stream.ended_at = ended, now_ms()
            stats.finish(record, ended)

    async def _stream(
        self,
        send: Send,
        call: Call,
        reply: Reply,
        cached: CacheUsage,
        knobs: SimulatorSettings,
        fault_at: int,
        stream: StreamRecord,
    ) -> str:
        message = protocol.message(call, reply, content=[], output_tokens=0, cached=cached)
        message["stop_reason"] = None
        message["stop_sequence"] = None
        headers = asgi.headers(protocol.SSE_HEADERS) + self.buckets.headers(time.time())
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        start = protocol.event("message_start", {"type": "message_start", "message": message})
        await asgi.send_body(send, start + protocol.BLOCK_START + protocol.PING, more=True)
        frames = [protocol.delta_frame(piece) for piece in reply.pieces]
        await pace(send, frames[: fault_at or len(frames)], knobs, stream)
        if fault_at:
            if knobs.fault_kind == "drop":
                raise _ConnectionDropped
            # Mid-stream the API reports overload or an internal error, never a rate limit.
            status = 529 if knobs.error_status in (429, 529) else 500
            error = protocol.error_body(status, protocol.ERROR_MESSAGES[status])
            await asgi.send_body(send, protocol.event("error", error), more=False)
            return "fault"
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence},
            "usage": protocol.usage(call, cached, len(frames)),
        }
        await asgi.send_body(
            send,
            protocol.BLOCK_STOP + protocol.event("message_delta", delta) + protocol.MESSAGE_STOP,
            more=False,
        )
        return "completed"

    async def _reply(
        self,
        send: Send,
        call: Call,
        reply: Reply,
        cached: CacheUsage,
        knobs: SimulatorSettings,
        stream: StreamRecord,
    ) -> str:
        # Generation takes as long as streaming the same tokens would.
        tokens = len(reply.pieces)
        await asyncio.sleep((knobs.ttft_ms + knobs.token_delay_ms * max(0, tokens - 1)) / 1000)
        content = [{"type": "text", "text": reply.text}]
        await asgi.send_json(
            send,
            200,
            protocol.message(call, reply, content, tokens, cached),
            self.buckets.headers(time.time()),
        )
        stream.tokens = tokens
        return "completed"

    def _status(self, stats: Stats, record: RequestRecord, status: int) -> None:
        stats.status(record, status)
        self._attempts_metric.labels(str(status)).inc()

    async def _get_config(self, scope: Scope, receive: Receive, send: Send) -> None:
        await asgi.send_json(send, 200, self.config())

    async def _post_config(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            changes = json.loads(await asgi.read_body(receive))
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object of knobs")
            config = self.configure(changes)
        except ValidationError as exc:
            await asgi.send_error(send, 400, "; ".join(_describe(e) for e in exc.errors()))
        except ValueError as exc:
            await asgi.send_error(send, 400, str(exc))
        except Rejection as rejection:
            await asgi.send_error(send, rejection.status, rejection.message)
        except ClientGone:
            return
        else:
            await asgi.send_json(send, 200, config)

    async def _get_stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        # ?request_id=a&request_id=b: only those records; ?records=false: totals only.
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        ids = [] if query.get("records") == ["false"] else query.get("request_id")
        await asgi.send_json(send, 200, self.stats.as_json(self.open_streams, ids))

    async def _post_reset(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.reset()
        await asgi.send_json(send, 200, self.config())

    async def _get_metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = generate_latest(self.registry)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": asgi.headers({"content-type": CONTENT_TYPE_LATEST}, len(body)),
            }
        )
        await asgi.send_body(send, body, more=False)

    async def _get_health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await asgi.send_json(send, 200, {"status": "ok"})


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


@dataclass(frozen=True, slots=True)
class LocalSimulator:
    app: Simulator
    url: str


@asynccontextmanager
async def serving(settings: SimulatorSettings | None = None) -> AsyncIterator[LocalSimulator]:
    """Serve a simulator with uvicorn inside the running event loop (tests, benchmarks).

    Without settings it listens on a free port of 127.0.0.1; ``url`` is the SDK's base_url.
    """
    app = Simulator(settings or SimulatorSettings(port=0))
    config = uvicorn.Config(
        app,
        host=app.settings.host,
        port=app.settings.port,
        log_config=None,
        log_level=app.settings.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the simulator did not start")
            await asyncio.sleep(0.005)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield LocalSimulator(app, f"http://{app.settings.host}:{port}")
    finally:
        server.should_exit = True
        await task
