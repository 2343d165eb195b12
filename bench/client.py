"""The load generator: many concurrent SSE streams over httpx, timed per event.

One client measures both systems (sumstream's gateway and the baseline), since both answer
``POST /v1/summaries`` with SSE ``token`` events (``id: seq``, data ``{text, seq}``) and a
final ``done`` (optionally preceded by ``error``). Times come from ``time.perf_counter`` taken
when a chunk is read from the socket, before it is parsed, so parsing cost is not charged
to the server.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httpx

from bench import stats
from bench.sse import SSEEvent, SSEParser


@dataclass
class StreamRecord:
    """Everything one stream did, with times in seconds on the perf_counter clock."""

    system: str
    phase: str
    index: int
    expected: str
    t_post: float = 0.0
    wall_post_ms: float = 0.0
    status: int = 0
    t_headers: float | None = None
    t_first_byte: float | None = None
    t_accepted: float | None = None
    t_first_token: float | None = None
    t_done: float | None = None
    t_end: float | None = None
    request_id: str | None = None
    token_times: list[float] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)  # the last seq of each token event
    first_seqs: list[int] = field(
        default_factory=list
    )  # its first (a token event may cover several)
    texts: list[str] = field(default_factory=list)
    event_ids: list[str | None] = field(default_factory=list)
    done: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    failure: str | None = None

    # -- derived -----------------------------------------------------------------------
    def _ms(self, t: float | None) -> float | None:
        return None if t is None else (t - self.t_post) * 1000.0

    @property
    def ttft_ms(self) -> float | None:
        """POST to the first ``token`` event."""
        return self._ms(self.t_first_token)

    @property
    def ttfb_ms(self) -> float | None:
        """POST to the response's status line and headers: the first byte the client gets."""
        return self._ms(self.t_headers)

    @property
    def first_body_ms(self) -> float | None:
        """POST to the first body byte (sumstream: ``accepted``; the baseline: a token)."""
        return self._ms(self.t_first_byte)

    @property
    def accepted_ms(self) -> float | None:
        """POST to the ``accepted`` event (sumstream only)."""
        return self._ms(self.t_accepted)

    @property
    def total_ms(self) -> float | None:
        return self._ms(self.t_done)

    @property
    def gaps_ms(self) -> list[float]:
        return [g * 1000.0 for g in stats.gaps(self.token_times)]

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def final(self) -> bool:
        """The stream ended with an explicit ``done`` event."""
        return self.done is not None

    @property
    def outcome(self) -> str:
        """completed | error (an error event or a failed status) | no_final | http_<code>."""
        if self.status and self.status != 200:
            return f"http_{self.status}"
        if self.done is None:
            return "no_final"
        status = str(self.done.get("status", "DONE")).upper()
        if self.error is not None or status not in {"DONE", "COMPLETED", "OK"}:
            return "error"
        return "completed"

    @property
    def complete(self) -> bool:
        """Every token arrived: the streamed text is exactly the expected summary."""
        return self.outcome == "completed" and self.text == self.expected

    @property
    def in_order(self) -> bool:
        """Token seq ranges are contiguous and increasing, and each SSE id is its last seq."""
        if not self.seqs:
            return False
        ranges = list(zip(self.first_seqs, self.seqs, strict=True))
        contiguous = all(f <= s for f, s in ranges) and all(
            b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges)
        )
        ids = zip(self.event_ids, self.seqs, strict=True)
        ids_match = all(i is None or i == str(s) for i, s in ids)
        return contiguous and ids_match

    @property
    def own(self) -> bool:
        """The stream carried its own request's text, not another client's.

        Every client sends a different document, so a crossed stream shows as text that is
        not a prefix of this request's summary; the final summary must match as well.
        """
        if not self.expected.startswith(self.text):
            return False
        if self.done is not None and "summary" in self.done:
            return str(self.done["summary"]).strip() == self.expected.strip()
        return True

    def to_json(self) -> dict[str, Any]:
        """A compact, JSON-ready view: derived timings, checks and the raw token offsets."""

        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 3)

        return {
            "system": self.system,
            "phase": self.phase,
            "index": self.index,
            "request_id": self.request_id,
            "wall_post_ms": round(self.wall_post_ms, 3),
            "status": self.status,
            "outcome": self.outcome,
            "failure": self.failure,
            "ttfb_ms": r(self.ttfb_ms),
            "first_body_ms": r(self.first_body_ms),
            "accepted_ms": r(self.accepted_ms),
            "ttft_ms": r(self.ttft_ms),
            "total_ms": r(self.total_ms),
            "tokens": sum(s - f + 1 for f, s in zip(self.first_seqs, self.seqs, strict=True)),
            "token_events": len(self.seqs),
            "complete": self.complete,
            "in_order": self.in_order,
            "own": self.own,
            "token_ms": [round((t - self.t_post) * 1000.0, 2) for t in self.token_times],
            "done": _without_summary(self.done),
            "error": self.error,
        }


def _without_summary(done: dict[str, Any] | None) -> dict[str, Any] | None:
    # The summary text is checked, not stored: it would dominate the results file.
    if done is None:
        return None
    return {k: v for k, v in done.items() if k != "summary"}


def _json(data: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except json.JSONDecodeError:
        return {"raw": data}
    return value if isinstance(value, dict) else {"value": value}


def _on_event(rec: StreamRecord, ev: SSEEvent, now: float) -> bool:
    """Record one event; True when the stream is finished."""
    if ev.event == "token":
        data = _json(ev.data)
        if rec.t_first_token is None:
            rec.t_first_token = now
        rec.token_times.append(now)
        seq = int(data.get("seq", -1))
        rec.seqs.append(seq)
        rec.first_seqs.append(int(data.get("first_seq", seq)))
        rec.texts.append(str(data.get("text", "")))
        rec.event_ids.append(ev.id)
    elif ev.event == "accepted":
        rec.t_accepted = now
        data = _json(ev.data)
        rid = data.get("id") or data.get("request_id")
        rec.request_id = None if rid is None else str(rid)
    elif ev.event == "error":
        rec.error = _json(ev.data)
    elif ev.event == "done":
        rec.done = _json(ev.data)
        rec.t_done = now
        return True
    return False


class _Exchange(asyncio.Protocol):
    """One HTTP/1.1 request and its streamed response, on its own connection.

    A plain protocol instead of a full HTTP client: on two shared cores the load generator
    must cost far less than the systems it measures (see README: httpx spent ~10x more CPU
    per event), and ``data_received`` gives the arrival time of every read.
    """

    def __init__(self, rec: StreamRecord) -> None:
        self.rec = rec
        self.parser = SSEParser()
        self.transport: asyncio.Transport | None = None
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._head = bytearray()
        self._in_body = False
        self._chunked = False
        self._length: int | None = None
        self._cbuf = bytearray()
        self._cstate = "size"
        self._cleft = 0
        self._error_body = bytearray()

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.finished.done():
            return
        if not self._in_body:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            data = bytes(self._head[end + 4 :])
            self._parse_head(bytes(self._head[:end]), now)
            self._in_body = True
            if not data:
                return
        if self._chunked:
            for piece in self._dechunk(data):
                self._payload(piece, now)
        else:
            if self._length is not None:
                data = data[: self._length]
                self._length -= len(data)
            self._payload(data, now)
            if self._length == 0:
                self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            if self.rec.status != 200 and self._in_body:
                self.rec.error = _json(self._error_body.decode(errors="replace"))
            elif self.rec.failure is None:
                reason = f": {exc}" if exc else ""
                self.rec.failure = f"connection closed without a final event{reason}"
            self.finished.set_result(None)

    # -- HTTP/1.1 framing ----------------------------------------------------------------
    def _parse_head(self, head: bytes, now: float) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.rec.t_headers = now
        self.rec.status = int(lines[0].split(" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "transfer-encoding" and "chunked" in value.lower():
                self._chunked = True
            elif name == "content-length":
                self._length = int(value.strip())

    def _dechunk(self, data: bytes) -> list[bytes]:
        self._cbuf += data
        out: list[bytes] = []
        while self._cbuf:
            if self._cstate == "size":
                end = self._cbuf.find(b"\r\n")
                if end < 0:
                    break
                size = int(bytes(self._cbuf[:end]).split(b";")[0], 16)
                del self._cbuf[: end + 2]
                if size == 0:
                    self._finish()
                    break
                self._cstate, self._cleft = "data", size
            elif self._cstate == "data":
                piece = bytes(self._cbuf[: self._cleft])
                del self._cbuf[: len(piece)]
                self._cleft -= len(piece)
                out.append(piece)
                if self._cleft == 0:
                    self._cstate = "crlf"
            else:
                if len(self._cbuf) < 2:
                    break
                del self._cbuf[:2]
                self._cstate = "size"
        return out

    def _payload(self, data: bytes, now: float) -> None:
        if self.rec.status != 200:
            self._error_body += data
            return
        if self.rec.t_first_byte is None:
            self.rec.t_first_byte = now
        for ev in self.parser.feed(data):
            if _on_event(self.rec, ev, now):
                # The stream is over for the user the moment ``done`` arrives.
                self._finish()
                return

    def _finish(self) -> None:
        if self.finished.done():
            return
        if self.rec.status != 200:
            self.rec.error = _json(self._error_body.decode(errors="replace"))
        elif self.rec.done is None and self.rec.failure is None:
            self.rec.failure = "response ended without a final event"
        self.rec.t_end = time.perf_counter()
        self.finished.set_result(None)
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True)
class Target:
    """A system under test: where to POST (several gateways take turns by request index),
    and the API keys of its users."""

    name: str
    url: str
    api_keys: tuple[str, ...] = ("bench",)
    more_urls: tuple[str, ...] = ()

    def key(self, user: int) -> str:
        return self.api_keys[user % len(self.api_keys)]

    def url_for(self, index: int) -> str:
        urls = (self.url, *self.more_urls)
        return urls[index % len(urls)]


def _request_bytes(url: httpx.URL, api_key: str, body: bytes) -> bytes:
    head = (
        f"POST {url.raw_path.decode()} HTTP/1.1\r\n"
        f"Host: {url.host}:{url.port}\r\n"
        f"Authorization: Bearer {api_key}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def connect(target: Target, rec: StreamRecord) -> _Exchange:
    """Open the connection for one stream (before its start signal, for bursts)."""
    url = httpx.URL(target.url_for(rec.index))
    loop = asyncio.get_running_loop()
    _, exchange = await loop.create_connection(lambda: _Exchange(rec), url.host, url.port or 80)
    return exchange


async def run_stream(
    target: Target,
    user: int,
    document: str,
    max_output_tokens: int,
    rec: StreamRecord,
    *,
    exchange: _Exchange | None = None,
    deadline_s: float = 120.0,
) -> StreamRecord:
    """POST one summary request and read its SSE stream to the end, filling ``rec``.

    Times start at the request's write: connecting is not part of what is measured.
    """
    body = json.dumps({"document": document, "max_output_tokens": max_output_tokens}).encode()
    data = _request_bytes(httpx.URL(target.url_for(rec.index)), target.key(user), body)
    try:
        if exchange is None:
            exchange = await connect(target, rec)
    except OSError as exc:
        rec.failure = f"connect failed: {exc}"
        return rec
    transport = exchange.transport
    assert transport is not None
    try:
        rec.wall_post_ms = time.time() * 1000.0
        rec.t_post = time.perf_counter()
        transport.write(data)
        async with asyncio.timeout(deadline_s):
            await asyncio.shield(exchange.finished)
    except TimeoutError:
        rec.failure = f"no final event within {deadline_s:.0f} s"
        rec.t_end = time.perf_counter()
    finally:
        transport.close()
    return rec


Docs = Callable[[int], tuple[str, str]]  # index -> (document, expected summary)


async def closed_loop(
    target: Target,
    phase: str,
    docs: Docs,
    *,
    concurrency: int,
    requests: int,
    max_output_tokens: int,
    duration_s: float | None = None,
    deadline_s: float = 120.0,
    first_index: int = 0,
) -> list[StreamRecord]:
    """``concurrency`` users, each sending its next request when its stream ends.

    Stops starting requests after ``requests`` in total or after ``duration_s``, whichever
    comes first, then waits for the streams in flight. Request i uses ``docs(first_index + i)``.
    """
    records: list[StreamRecord] = []
    counter = iter(range(first_index, first_index + requests))
    t_stop = None if duration_s is None else time.perf_counter() + duration_s

    async def user(u: int) -> None:
        for i in counter:
            if t_stop is not None and time.perf_counter() >= t_stop:
                return
            document, expected = docs(i)
            rec = StreamRecord(target.name, phase, i, expected)
            records.append(rec)
            await run_stream(target, u, document, max_output_tokens, rec, deadline_s=deadline_s)

    await asyncio.gather(*(user(u) for u in range(concurrency)))
    return records


async def burst(
    target: Target,
    phase: str,
    docs: Docs,
    *,
    users: int,
    max_output_tokens: int,
    first_index: int = 0,
    deadline_s: float = 120.0,
) -> list[StreamRecord]:
    """``users`` requests written at the same instant, each on a connection opened before."""
    records = [
        StreamRecord(target.name, phase, first_index + u, docs(first_index + u)[1])
        for u in range(users)
    ]
    # Connect first so the burst measures the server, not handshakes queued in the client.
    exchanges = await asyncio.gather(
        *(connect(target, rec) for rec in records), return_exceptions=True
    )
    start = asyncio.Event()

    async def user(u: int, rec: StreamRecord, exchange: _Exchange | BaseException) -> None:
        if isinstance(exchange, BaseException):
            rec.failure = f"connect failed: {exchange}"
            return
        document = docs(rec.index)[0]
        await start.wait()
        await run_stream(
            target, u, document, max_output_tokens, rec, exchange=exchange, deadline_s=deadline_s
        )

    tasks = [
        asyncio.create_task(user(u, rec, ex))
        for u, (rec, ex) in enumerate(zip(records, exchanges, strict=True))
    ]
    await asyncio.sleep(0.05)
    start.set()
    await asyncio.gather(*tasks)
    return records
