"""An Anthropic-compatible LLM simulator (`sumstream llm-sim`, DESIGN.md section 9).

``POST /v1/messages`` answers exactly like the Messages API, as JSON or as a named-event SSE
stream, with a real extractive summary of the prompt's document (pipeline.llm.extractive), so
the official SDK talks to it through ``base_url``. Knobs inject upstream trouble on demand and
change at run time (``POST /_sim/config``); ``GET /_sim/stats`` counts what arrived.

It is a raw ASGI app: uvicorn's ``send`` silently ignores a closed socket, so noticing a client
that hangs up mid-stream needs a task waiting on ``receive``, and dropping the TCP connection
needs an exception to reach uvicorn; both are plainer without a framework in between.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import secrets
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client import Counter as MetricCounter
from pydantic import ValidationError

from pipeline.core.settings import SimulatorSettings
from pipeline.llm import extractive

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


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
)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
ERROR_MESSAGES = {429: "Rate limited", 500: "Internal server error", 529: "Overloaded"}
MAX_BODY_BYTES = 32 * 1024 * 1024  # the real API's request size limit
OFF_LOOP_BYTES = 64 * 1024
MAX_ATTEMPTS_PER_RECORD = 100


class _Rejection(Exception):
    """A request answered with an error before any token (HTTP status + Anthropic error body)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientGone(Exception):
    """The client hung up before it finished sending the request."""


class _ConnectionDropped(Exception):
    """Raised to uvicorn on purpose: it then closes the socket without ending the response."""


class _HideDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _ConnectionDropped))


_HIDE_DROPS = _HideDrops()


@dataclass(frozen=True, slots=True)
class Call:
    """The parts of a valid Messages request the simulator uses."""

    model: str
    max_tokens: int
    stream: bool
    prompt: str  # the last user message's text
    prefill: str  # the final assistant message's text, "" without one
    input_tokens: int
    stop_sequences: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    pieces: list[str]
    stop_reason: str
    stop_sequence: str | None


def reply_to(call: Call) -> Reply:
    """The model's answer: the summary after the prefill, cut by stop sequences and max_tokens.

    A prefill that is a prefix of the summary (e.g. the text already streamed, its trailing
    whitespace stripped as the API demands) is continued so that prefill + answer == summary.
    Any other prefill is answered with a space and the whole summary, as a model would start
    over after text that is not its own.
    """
    summary = extractive.full_summary(extractive.document_of(call.prompt))
    if summary.startswith(call.prefill):
        text = summary[len(call.prefill) :]
    else:
        text = " " + summary if summary else ""
    stop_reason, stop_sequence = "end_turn", None
    hits = [(text.find(s), s) for s in call.stop_sequences if s and s in text]
    if hits:
        at, stop_sequence = min(hits)
        text, stop_reason = text[:at], "stop_sequence"
    pieces = extractive.tokens(text)
    if len(pieces) > call.max_tokens:
        pieces = pieces[: call.max_tokens]
        text, stop_reason, stop_sequence = "".join(pieces), "max_tokens", None
    return Reply(text, pieces, stop_reason, stop_sequence)


def parse_call(body: bytes) -> Call:
    """Validate a Messages request body like the real API does where that is cheap."""
    try:
        data = json.loads(body)
    except ValueError:
        raise _invalid("There was an error parsing the body of your request as JSON") from None
    if not isinstance(data, dict):
        raise _invalid("body: Input should be an object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid(
            "model: Field required" if model is None else "model: Input should be a string"
        )
    max_tokens = data.get("max_tokens")
    if max_tokens is None:
        raise _invalid("max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise _invalid("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise _invalid("max_tokens: Input should be greater than or equal to 1")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream: Input should be a valid boolean")
    messages = data.get("messages")
    if messages is None:
        raise _invalid("messages: Field required")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: at least one message is required")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages.{i}: Input should be an object")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise _invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        text, has_other_blocks = _text_of(message.get("content"), f"messages.{i}.content")
        final_assistant = role == "assistant" and i == len(messages) - 1
        blank = not text or text.isspace()
        if blank and not has_other_blocks and not final_assistant:
            raise _invalid(
                f"messages.{i}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
        turns.append((role, text))
    prefill = turns[-1][1] if turns[-1][0] == "assistant" else ""
    if prefill != prefill.rstrip():
        raise _invalid("final assistant content cannot end with trailing whitespace")
    prompt = next((text for role, text in reversed(turns) if role == "user"), None)
    if prompt is None:
        raise _invalid("messages: at least one user message is required")
    system = data.get("system")
    system_text = "" if system is None else _text_of(system, "system")[0]
    stop_sequences = data.get("stop_sequences") or []
    if not isinstance(stop_sequences, list) or not all(isinstance(s, str) for s in stop_sequences):
        raise _invalid("stop_sequences: Input should be a list of strings")
    input_tokens = extractive.count_tokens(system_text) + sum(
        extractive.count_tokens(text) for _, text in turns
    )
    return Call(model, max_tokens, stream, prompt, prefill, input_tokens, tuple(stop_sequences))


def _prepare(body: bytes) -> tuple[Call, Reply]:
    call = parse_call(body)
    return call, reply_to(call)


def _text_of(content: object, where: str) -> tuple[str, bool]:
    """The text of a content field (string or blocks) and whether it had non-text blocks."""
    if isinstance(content, str):
        return content, False
    if content is None:
        raise _invalid(f"{where}: Field required")
    if not isinstance(content, list):
        raise _invalid(f"{where}: Input should be a valid string or list of content blocks")
    parts: list[str] = []
    other = False
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _invalid(f"{where}.{j}.type: Field required")
        if block["type"] != "text":
            other = True
            continue
        if not isinstance(block.get("text"), str):
            raise _invalid(f"{where}.{j}.text: Field required")
        parts.append(block["text"])
    return "".join(parts), other


def _invalid(message: str) -> _Rejection:
    return _Rejection(400, message)


@dataclass(slots=True)
class StreamRecord:
    """One accepted response; ``ended``: completed | client_closed | fault | error."""

    started_at: int
    streaming: bool
    prefill_chars: int
    ended_at: int | None = None
    ended: str | None = None
    tokens: int = 0


@dataclass(slots=True)
class RequestRecord:
    """Every attempt seen for one ``x-sumstream-request-id``."""

    attempts: int = 0
    outcomes: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    streams: list[StreamRecord] = field(default_factory=list)


class Stats:
    """Counters since the last reset; per-request records bounded to the most recent ones.

    An attempt's outcome is ``rejected`` (an HTTP error before any token) or how its response
    ended (see StreamRecord).
    """

    def __init__(self, max_records: int, peak_concurrent: int = 0) -> None:
        self.attempts = 0
        self.by_status: Counter[int] = Counter()
        self.by_outcome: Counter[str] = Counter()
        self.peak_concurrent = peak_concurrent
        self.records: OrderedDict[str, RequestRecord] = OrderedDict()
        self._max_records = max_records

    def attempt(self, request_id: str | None) -> RequestRecord:
        self.attempts += 1
        if request_id is None:
            record = RequestRecord()  # counted, but not kept
        elif (found := self.records.get(request_id)) is not None:
            record = found
            self.records.move_to_end(request_id)
        else:
            record = self.records[request_id] = RequestRecord()
            if len(self.records) > self._max_records:
                self.records.popitem(last=False)
        record.attempts += 1
        return record

    def status(self, record: RequestRecord, status: int) -> None:
        self.by_status[status] += 1
        _append_bounded(record.statuses, status)

    def finish(self, record: RequestRecord, outcome: str) -> None:
        self.by_outcome[outcome] += 1
        _append_bounded(record.outcomes, outcome)

    def as_json(self, open_streams: int, request_ids: list[str] | None) -> dict[str, Any]:
        """Totals, and the records of ``request_ids`` (all of them when None)."""
        ids = list(self.records) if request_ids is None else request_ids
        return {
            "attempts": self.attempts,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_outcome": dict(sorted(self.by_outcome.items())),
            "open_streams": open_streams,
            "peak_concurrent": self.peak_concurrent,
            "requests": {i: _record_json(self.records[i]) for i in ids if i in self.records},
        }


def _record_json(record: RequestRecord) -> dict[str, Any]:
    # Hand-written rather than dataclasses.asdict: a full dump has 10,000 records.
    streams = [
        {
            "started_at": s.started_at,
            "ended_at": s.ended_at,
            "ended": s.ended,
            "tokens": s.tokens,
            "streaming": s.streaming,
            "prefill_chars": s.prefill_chars,
        }
        for s in record.streams
    ]
    return {
        "attempts": record.attempts,
        "outcomes": list(record.outcomes),
        "statuses": list(record.statuses),
        "streams": streams,
    }


def _append_bounded(items: list[Any], item: Any) -> None:
    items.append(item)
    if len(items) > MAX_ATTEMPTS_PER_RECORD:
        del items[0]


class Simulator:
    """The ASGI app: knobs, counters and the open streams of one simulator."""

    def __init__(self, settings: SimulatorSettings | None = None) -> None:
        self.settings = settings or SimulatorSettings()
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
        self.stats = Stats(self.settings.max_records, peak_concurrent=self.open_streams)

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
        return self.config()

    def config(self) -> dict[str, Any]:
        """The knobs now in force, with what is left of fail_next and fault_times."""
        values = {name: getattr(self.knobs, name) for name in KNOBS}
        values["fail_next"] = self._fail_next
        values["fault_times"] = self._faults_left
        return values

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        handler = self._routes.get((scope["method"], scope["path"]))
        if handler is not None:
            await handler(scope, receive, send)
        elif any(path == scope["path"] for _, path in self._routes):
            await _send_error(send, 405, "Method not allowed")
        else:
            await _send_error(send, 404, "Not found")

    async def _messages(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-sumstream-request-id", b"").decode("latin-1") or None
        stats, knobs = self.stats, self.knobs
        record = stats.attempt(request_id)
        try:
            if not headers.get(b"x-api-key") and not headers.get(b"authorization", b"").startswith(
                b"Bearer "
            ):
                raise _Rejection(401, "x-api-key header is required")
            body = await _read_body(receive)
            # A big document is parsed and summarized on a thread (once: the summary is
            # cached), so the streams already open keep their pace meanwhile.
            if len(body) > OFF_LOOP_BYTES:
                call, reply = await asyncio.to_thread(_prepare, body)
            else:
                call, reply = _prepare(body)
            self._admit(knobs)
        except _Rejection as rejection:
            retry_after = rejection.status in (429, 529)
            extra = [(b"retry-after", f"{knobs.retry_after_s:g}".encode())] if retry_after else []
            await _send_error(send, rejection.status, rejection.message, extra)
            self._status(stats, record, rejection.status)
            stats.finish(record, "rejected")
            return
        except _ClientGone:
            stats.finish(record, "client_closed")
            return
        await self._respond(call, reply, knobs, stats, record, receive, send)

    def _admit(self, knobs: SimulatorSettings) -> None:
        if knobs.max_concurrent and self.open_streams >= knobs.max_concurrent:
            raise _Rejection(429, "Number of concurrent connections has exceeded your rate limit")
        failing = knobs.fail_all or self._fail_next > 0
        if self._fail_next > 0 and not knobs.fail_all:
            self._fail_next -= 1
        # Draw only when a rate is set, so a seeded run replays the same failures.
        if failing or (knobs.error_rate > 0 and self._rng.random() < knobs.error_rate):
            status = knobs.error_status
            raise _Rejection(status, ERROR_MESSAGES.get(status, "Internal server error"))

    async def _respond(
        self,
        call: Call,
        reply: Reply,
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
            started_at=_now_ms(), streaming=call.stream, prefill_chars=len(call.prefill)
        )
        _append_bounded(record.streams, stream)
        self._status(stats, record, 200)
        self.open_streams += 1
        self._open_metric.inc()
        stats.peak_concurrent = max(stats.peak_concurrent, self.open_streams)
        ended = "error"
        try:
            work = (
                self._stream(send, call, reply, knobs, fault_at, stream)
                if call.stream
                else self._reply(send, call, reply, knobs, stream)
            )
            ended = await _unless_disconnected(receive, work) or "client_closed"
        except _ConnectionDropped:
            ended = "fault"
            raise
        finally:
            self.open_streams -= 1
            self._open_metric.dec()
            self._ended_metric.labels(ended).inc()
            self._tokens_metric.inc(stream.tokens)
            stream.ended, stream.ended_at = ended, _now_ms()
            stats.finish(record, ended)

    async def _stream(
        self,
        send: Send,
        call: Call,
        reply: Reply,
        knobs: SimulatorSettings,
        fault_at: int,
        stream: StreamRecord,
    ) -> str:
        message = _message(call, reply, content=[], output_tokens=0)
        message["stop_reason"] = None
        message["stop_sequence"] = None
        await send({"type": "http.response.start", "status": 200, "headers": _headers(_SSE)})
        start = _event("message_start", {"type": "message_start", "message": message})
        await _send_body(send, start + _BLOCK_START + _PING, more=True)
        frames = [_DELTA_HEAD + _json(piece) + _DELTA_TAIL for piece in reply.pieces]
        await _pace(send, frames[: fault_at or len(frames)], knobs, stream)
        if fault_at:
            if knobs.fault_kind == "drop":
                raise _ConnectionDropped
            # Mid-stream the API reports overload or an internal error, never a rate limit.
            status = 529 if knobs.error_status in (429, 529) else 500
            error = {"type": ERROR_TYPES[status], "message": ERROR_MESSAGES[status]}
            await _send_body(send, _event("error", {"type": "error", "error": error}), more=False)
            return "fault"
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence},
            "usage": {"input_tokens": call.input_tokens, "output_tokens": len(frames)},
        }
        await _send_body(
            send, _BLOCK_STOP + _event("message_delta", delta) + _MESSAGE_STOP, more=False
        )
        return "completed"

    async def _reply(
        self, send: Send, call: Call, reply: Reply, knobs: SimulatorSettings, stream: StreamRecord
    ) -> str:
        # Generation takes as long as streaming the same tokens would.
        tokens = len(reply.pieces)
        await asyncio.sleep((knobs.ttft_ms + knobs.token_delay_ms * max(0, tokens - 1)) / 1000)
        content = [{"type": "text", "text": reply.text}]
        await _send_json(send, 200, _message(call, reply, content, tokens))
        stream.tokens = tokens
        return "completed"

    def _status(self, stats: Stats, record: RequestRecord, status: int) -> None:
        stats.status(record, status)
        self._attempts_metric.labels(str(status)).inc()

    async def _get_config(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, self.config())

    async def _post_config(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            changes = json.loads(await _read_body(receive))
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object of knobs")
            config = self.configure(changes)
        except ValidationError as exc:
            await _send_error(send, 400, "; ".join(_describe(e) for e in exc.errors()))
        except ValueError as exc:
            await _send_error(send, 400, str(exc))
        except _Rejection as rejection:
            await _send_error(send, rejection.status, rejection.message)
        except _ClientGone:
            return
        else:
            await _send_json(send, 200, config)

    async def _get_stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        # ?request_id=a&request_id=b: only those records; ?records=false: totals only.
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        ids = [] if query.get("records") == ["false"] else query.get("request_id")
        await _send_json(send, 200, self.stats.as_json(self.open_streams, ids))

    async def _post_reset(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.reset()
        await _send_json(send, 200, self.config())

    async def _get_metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = generate_latest(self.registry)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": _headers({"content-type": CONTENT_TYPE_LATEST}, len(body)),
            }
        )
        await _send_body(send, body, more=False)

    async def _get_health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, {"status": "ok"})


async def _pace(
    send: Send, frames: list[bytes], knobs: SimulatorSettings, stream: StreamRecord
) -> None:
    """Send token frames on schedule: the first after ttft, then one every token_delay."""
    loop = asyncio.get_running_loop()
    delay = knobs.token_delay_ms / 1000
    first = loop.time() + knobs.ttft_ms / 1000
    if not frames:
        await asyncio.sleep(knobs.ttft_ms / 1000)
    sent = 0
    while sent < len(frames):
        wait = first + sent * delay - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        # Everything due by now goes in one write, so a loaded server catches up on its
        # schedule instead of drifting behind it one sleep at a time.
        due = len(frames) if delay == 0 else int((loop.time() - first) / delay) + 1
        end = min(len(frames), max(sent + 1, due))
        await _send_body(send, b"".join(frames[sent:end]), more=True)
        stream.tokens = sent = end


async def _unless_disconnected(receive: Receive, work: Coroutine[Any, Any, str]) -> str | None:
    """Run ``work`` unless the client hangs up first; then cancel it and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    return None if task.cancelled() else task.result()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _Rejection(413, "Request exceeds the maximum allowed number of bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _message(
    call: Call, reply: Reply, content: list[dict[str, str]], output_tokens: int
) -> dict[str, Any]:
    return {
        "id": f"msg_sim{secrets.token_hex(10)}",
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": reply.stop_sequence,
        "usage": {"input_tokens": call.input_tokens, "output_tokens": output_tokens},
    }


def _json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _event(name: str, data: object) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _json(data) + b"\n\n"


_SSE = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
_BLOCK_START = _event(
    "content_block_start",
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
)
_PING = _event("ping", {"type": "ping"})
_BLOCK_STOP = _event("content_block_stop", {"type": "content_block_stop", "index": 0})
_MESSAGE_STOP = _event("message_stop", {"type": "message_stop"})
# A delta frame is these two around the JSON string of the token: built per token without
# serialising the whole event.
_DELTA_HEAD = (
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
)
_DELTA_TAIL = b"}}\n\n"


def _headers(values: Mapping[str, str], length: int | None = None) -> list[tuple[bytes, bytes]]:
    pairs = [(k.encode(), v.encode()) for k, v in values.items()]
    pairs.append((b"request-id", f"req_sim{secrets.token_hex(10)}".encode()))
    if length is not None:
        pairs.append((b"content-length", str(length).encode()))
    return pairs


async def _send_body(send: Send, body: bytes, *, more: bool) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": more})


async def _send_json(
    send: Send, status: int, value: object, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = _json(value)
    headers = _headers({"content-type": "application/json"}, len(body)) + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await _send_body(send, body, more=False)


async def _send_error(
    send: Send, status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    kind = ERROR_TYPES.get(status, "api_error")
    await _send_json(
        send, status, {"type": "error", "error": {"type": kind, "message": message}}, extra
    )


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for `sumstream llm-sim`; each overrides its SUMSTREAM_SIM_* variable."""
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--ttft-ms", type=float, help="time to the first token")
    parser.add_argument("--token-delay-ms", type=float, help="delay between tokens")
    parser.add_argument(
        "--max-concurrent", type=int, help="open responses before 429 (0: no limit)"
    )
    parser.add_argument(
        "--error-rate", type=float, help="share of requests failed before any token"
    )
    parser.add_argument("--error-status", type=int, help="429, 500 or 529")
    parser.add_argument("--seed", type=int, help="seed of the error-rate draws")
    parser.add_argument("--fail-next", type=int, help="fail the next N requests")
    parser.add_argument("--fail-all", action="store_true", default=None, help="fail every request")
    parser.add_argument("--fault-at-token", type=int, help="break streams after N tokens")
    parser.add_argument("--fault-kind", choices=["error", "drop"])
    parser.add_argument("--fault-times", type=int, help="streams that get the fault (-1: all)")
    parser.add_argument("--retry-after-s", type=float, help="retry-after on 429 and 529")


def run(args: argparse.Namespace) -> int:
    """Run the simulator with uvicorn until interrupted."""
    names = ("host", "port", "log_level", *KNOBS)
    overrides = {n: v for n in names if (v := getattr(args, n, None)) is not None}
    try:
        settings = SimulatorSettings(**overrides)
    except ValidationError as exc:
        print(f"sumstream llm-sim: {exc}", file=sys.stderr)
        return 2
    print(
        f"llm-sim on http://{settings.host}:{settings.port} (ttft {settings.ttft_ms:g} ms, "
        f"token delay {settings.token_delay_ms:g} ms)",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn re-raises the Ctrl-C it has already handled by shutting down.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(
            Simulator(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
    return 0
