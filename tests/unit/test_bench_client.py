"""The benchmark's measuring parts: SSE parsing, HTTP framing, stream checks and statistics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import analysis, client, stats
from bench.client import StreamRecord
from bench.sse import SSEEvent, SSEParser

# -- SSE parser -------------------------------------------------------------------------------

STREAM = (
    b": ping - 2026-01-01\r\n\r\n"
    b'event: accepted\r\ndata: {"id": "r1"}\r\n\r\n'
    b'event: token\r\nid: 1\r\ndata: {"text": "Hello", "seq": 1}\r\n\r\n'
    b'event: token\r\nid: 2\r\ndata: {"text": " world", "seq": 2}\r\n\r\n'
    b'event: done\r\ndata: {"status": "COMPLETED",\r\ndata:  "summary": "Hello world"}\r\n\r\n'
)
EXPECTED = [
    SSEEvent("accepted", '{"id": "r1"}', None),
    SSEEvent("token", '{"text": "Hello", "seq": 1}', "1"),
    SSEEvent("token", '{"text": " world", "seq": 2}', "2"),
    SSEEvent("done", '{"status": "COMPLETED",\n "summary": "Hello world"}', "2"),
]


def parse_in_pieces(data: bytes, cuts: list[int]) -> list[SSEEvent]:
    parser = SSEParser()
    out: list[SSEEvent] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += parser.feed(data[last:cut])
        last = cut
    return out


def test_parses_named_events_ids_comments_and_multiline_data() -> None:
    assert SSEParser().feed(STREAM) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    assert parse_in_pieces(STREAM, cuts) == EXPECTED


@pytest.mark.parametrize("sep", [b"\n", b"\r", b"\r\n"])
def test_every_line_ending(sep: bytes) -> None:
    data = STREAM.replace(b"\r\n", b"\n").replace(b"\n", sep)
    assert SSEParser().feed(data) == EXPECTED
    # One byte at a time: a CRLF split between two chunks is still one line break.
    assert parse_in_pieces(data, list(range(len(data)))) == EXPECTED


def test_utf8_split_inside_a_character_bom_and_default_event_name() -> None:
    data = "\ufeffdata: caf\u00e9 \u2014 na\u00efve\n\n".encode()
    cut = data.index("\u00e9".encode()) + 1  # in the middle of the two-byte é
    assert parse_in_pieces(data, [cut]) == [SSEEvent("message", "caf\u00e9 \u2014 na\u00efve")]


def test_event_without_data_is_not_dispatched_and_fields_reset() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: token\n\ndata: x\n\n") == [SSEEvent("message", "x")]
    assert parser.feed(b"data\n\n") == [SSEEvent("message", "")]


# -- stream records ---------------------------------------------------------------------------


def record(texts: list[str], seqs: list[int], expected: str, **done: object) -> StreamRecord:
    rec = StreamRecord("s", "p", 0, expected, t_post=10.0, status=200)
    for i, (text, seq) in enumerate(zip(texts, seqs, strict=True)):
        client._on_event(
            rec, SSEEvent("token", json.dumps({"text": text, "seq": seq}), str(seq)), 10.2 + i / 100
        )
    payload = {"status": "COMPLETED", "summary": expected, **done}
    client._on_event(rec, SSEEvent("done", json.dumps(payload)), 11.5)
    return rec


def test_a_complete_ordered_own_stream_passes_every_check() -> None:
    rec = record(["A", " b", " c."], [1, 2, 3], "A b c.")
    assert (rec.outcome, rec.complete, rec.in_order, rec.own) == ("completed", True, True, True)
    assert rec.ttft_ms == pytest.approx(200.0)
    assert rec.gaps_ms == pytest.approx([10.0, 10.0])
    assert rec.total_ms == pytest.approx(1500.0)


def test_missing_duplicated_or_foreign_tokens_fail_their_checks() -> None:
    missing = record(["A", " c."], [1, 3], "A b c.")
    assert not missing.complete and not missing.in_order
    duplicated = record(["A", " b", " b", " c."], [1, 2, 2, 3], "A b c.")
    assert not duplicated.in_order and not duplicated.complete
    foreign = record(["X", " y", " z."], [1, 2, 3], "A b c.", summary="X y z.")
    assert foreign.in_order and not foreign.own and not foreign.complete


def test_coalesced_token_events_count_every_seq_they_cover() -> None:
    rec = StreamRecord("s", "p", 0, "A b c.", t_post=10.0, status=200)
    for i, (text, first, seq) in enumerate([("A", 1, 1), (" b c.", 2, 3)]):
        data = json.dumps({"text": text, "seq": seq, "first_seq": first})
        client._on_event(rec, SSEEvent("token", data, str(seq)), 10.2 + i / 100)
    client._on_event(rec, SSEEvent("done", json.dumps({"status": "COMPLETED"})), 11.5)
    assert rec.in_order and rec.to_json()["tokens"] == 3
    rec.first_seqs[1] = 3  # seq 2 missing from the ranges
    assert not rec.in_order


def test_error_then_done_and_no_final_event_outcomes() -> None:
    rec = StreamRecord("s", "p", 0, "x", t_post=0.0, status=200)
    client._on_event(rec, SSEEvent("error", '{"code": "upstream", "partial": false}'), 1.0)
    assert rec.outcome == "no_final"
    client._on_event(rec, SSEEvent("done", '{"status": "FAILED"}'), 1.1)
    assert rec.outcome == "error"
    assert StreamRecord("s", "p", 0, "x", status=503).outcome == "http_503"


# -- HTTP framing against a real socket -------------------------------------------------------


class OneShotServer:
    """A socket server that answers one request with fixed bytes, written in pieces."""

    def __init__(self, chunks: list[bytes], pause_s: float = 0.0) -> None:
        self.chunks, self.pause_s = chunks, pause_s
        self.handled = asyncio.Event()
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            for chunk in self.chunks:
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(self.pause_s)
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.handled.set()

    async def __aenter__(self) -> OneShotServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.wait_for(self.handled.wait(), 5)
        self.server.close()
        await self.server.wait_closed()

    def target(self) -> client.Target:
        return client.Target("t", f"http://127.0.0.1:{self.port}/v1/summaries")


def chunked(body: bytes, sizes: list[int]) -> list[bytes]:
    """``body`` as HTTP/1.1 chunks, then the writes cut at odd places across chunk framing."""
    framed = b""
    pos = 0
    for size in sizes:
        piece = body[pos : pos + size]
        pos += size
        if piece:
            framed += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    framed += f"{len(body) - pos:x}\r\n".encode() + body[pos:] + b"\r\n" if pos < len(body) else b""
    framed += b"0\r\n\r\n"
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    wire = head + framed
    return [wire[i : i + 7] for i in range(0, len(wire), 7)]


async def test_reads_a_chunked_sse_response_split_at_arbitrary_bytes() -> None:
    body = (
        b'event: token\r\nid: 1\r\ndata: {"text": "A", "seq": 1}\r\n\r\n'
        b'event: token\r\nid: 2\r\ndata: {"text": " b.", "seq": 2}\r\n\r\n'
        b'event: done\r\ndata: {"status": "COMPLETED", "summary": "A b."}\r\n\r\n'
    )
    async with OneShotServer(chunked(body, [5, 40, 3, 30]), pause_s=0.001) as server:
        rec = StreamRecord("t", "p", 0, "A b.")
        await client.run_stream(server.target(), 0, "doc", 10, rec, deadline_s=5)
    assert rec.failure is None
    assert (rec.status, rec.complete, rec.in_order, rec.own) == (200, True, True, True)
    assert rec.t_headers is not None and rec.t_first_token is not None
    assert rec.t_post <= rec.t_headers <= rec.t_first_token <= rec.token_times[-1]


async def test_an_error_status_keeps_its_problem_json_and_a_cut_stream_is_no_final() -> None:
    problem = b'{"title": "Too Many Requests", "status": 429}'
    head = f"HTTP/1.1 429 Too Many Requests\r\ncontent-length: {len(problem)}\r\n\r\n"
    async with OneShotServer([head.encode() + problem]) as server:
        rec = StreamRecord("t", "p", 0, "x")
        await client.run_stream(server.target(), 0, "d", 5, rec)
    assert rec.outcome == "http_429" and rec.error == {"title": "Too Many Requests", "status": 429}

    cut = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"7\r\ndata: x\r\n"
    async with OneShotServer([cut]) as server:
        rec = StreamRecord("t", "p", 0, "x")
        await client.run_stream(server.target(), 0, "d", 5, rec)
    assert rec.outcome == "no_final" and rec.failure is not None


# -- statistics -------------------------------------------------------------------------------


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=60))
def test_percentile_matches_the_standard_librarys_inclusive_quantiles(values: list[float]) -> None:
    if len(values) == 1:
        assert stats.percentile(values, 99) == values[0]
        return
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    assert stats.percentile(values, 50) == pytest.approx(cuts[49], abs=1e-6)
    assert stats.percentile(values, 99) == pytest.approx(cuts[98], abs=1e-6)
    assert stats.percentile(values, 0) == min(values)
    assert stats.percentile(values, 100) == max(values)


def test_describe_known_sample_and_empty() -> None:
    d = stats.describe([float(v) for v in range(1, 101)])
    assert (d.n, d.min, d.max, d.mean) == (100, 1.0, 100.0, 50.5)
    assert d.p50 == pytest.approx(50.5) and d.p99 == pytest.approx(99.01)
    assert math.isnan(stats.describe([]).p99) and stats.describe([]).n == 0
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_ratio_rate_and_gaps() -> None:
    assert stats.ratio(3.0, 2.0) == 1.5
    assert math.isnan(stats.ratio(1.0, 0.0)) and math.isnan(stats.ratio(math.nan, 1.0))
    assert stats.rate(100, 1.0, 3.0) == 50.0 and stats.rate(5, 2.0, 2.0) == 0.0
    assert stats.gaps([1.0, 1.5, 3.0]) == [0.5, 1.5]


def test_bootstrap_interval_covers_a_real_shift_and_not_zero() -> None:
    base = [200.0 + (i % 17) for i in range(200)]
    shifted = [v + 30.0 for v in base]
    lo, hi = stats.bootstrap_diff(shifted, base, 50.0)
    assert lo <= 30.0 <= hi and lo > 0
    lo, hi = stats.bootstrap_diff(base, base, 50.0)
    assert lo <= 0.0 <= hi


def stream_json(system: str, phase: str, ttft: float, n_tokens: int = 3) -> dict[str, object]:
    token_ms = [ttft + 10.0 * i for i in range(n_tokens)]
    return {
        "system": system,
        "phase": phase,
        "outcome": "completed",
        "failure": None,
        "ttft_ms": ttft,
        "ttfb_ms": 2.0,
        "accepted_ms": 3.0 if system == "sumstream" else None,
        "total_ms": token_ms[-1] + 1,
        "wall_post_ms": 1_000_000.0,
        "tokens": n_tokens,
        "token_ms": token_ms,
        "complete": True,
        "in_order": True,
        "own": True,
        "done": (
            {"latency_ms": {"queue_wait": 4, "time_to_first_token": ttft - 5}}
            if system == "sumstream"
            else {}
        ),
    }


def results_of(baseline_ttft: list[float], sumstream_ttft: list[float]) -> dict[str, object]:
    streams = [stream_json("baseline", "overhead/c50", t) for t in baseline_ttft]
    streams += [stream_json("sumstream", "overhead/c50", t) for t in sumstream_ttft]
    return {
        "plan": {
            "systems": ["baseline", "sumstream"],
            "ttft_ms": 200.0,
            "token_delay_ms": 10.0,
            "levels": [50],
            "throughput_levels": [],
            "burst_users": [],
        },
        "phases": [],
        "streams": streams,
    }


def test_analysis_overhead_is_sumstream_minus_baseline_at_each_percentile() -> None:
    base = [200.0 + (i % 5) for i in range(100)]
    a = analysis.analyze(results_of(base, [t + 8.0 for t in base]))
    o = a["overhead"]["50"]["overhead"]
    assert o["ttft_p50"]["diff"] == pytest.approx(8.0)
    assert o["ttft_p99"]["diff"] == pytest.approx(8.0)
    assert o["gap_p99"]["diff"] == pytest.approx(0.0)
    v = a["overhead_verdict"]
    assert v["ttft_p50"] == {"limit": 15.0, "over_model": 10.0, "over_baseline": 8.0, "ok": True}
    assert v["ttft_p99"]["over_model"] == pytest.approx(12.0) and v["ttft_p99"]["ok"]
    assert v["gap_p99"]["over_model"] == pytest.approx(0.0) and v["gap_p99"]["ok"]
    assert a["overhead"]["50"]["sumstream"]["latency_ms"]["queue_wait"]["p50"] == 4.0
    # The client saw the first token 5 ms after the trace's first_token stamp.
    assert a["overhead"]["50"]["sumstream"]["latency_ms"]["delivery"]["p50"] == 5.0
    row = a["throughput"]["levels"][0]
    assert row["sumstream"]["gap_p99_over_pacing"] == pytest.approx(0.0)
    # 100 streams of 3 tokens, the last 224 ms after the (shared) POST time.
    assert a["overhead"]["50"]["baseline"]["tokens_per_s"] == pytest.approx(300 / 0.224, rel=0.01)


def test_a_saturated_baseline_cannot_make_sumstream_meet_a_target() -> None:
    a = analysis.analyze(results_of([2000.0] * 50, [300.0] * 50))
    v = a["overhead_verdict"]["ttft_p50"]
    assert v["over_baseline"] == pytest.approx(-1700.0)
    assert v["over_model"] == pytest.approx(100.0)
    assert v["ok"] is False


def test_tokens_per_second_counts_each_run_of_a_phase_but_not_the_time_between() -> None:
    first = [stream_json("baseline", "p", 100.0) | {"run": 0} for _ in range(10)]
    # The second half ran 60 s later (the other system's phases were in between).
    later = [
        stream_json("baseline", "p", 100.0) | {"run": 3, "wall_post_ms": 1_060_000.0}
        for _ in range(10)
    ]
    summary = analysis.summarize(first + later)
    # Each run: 10 streams x 3 tokens within 0.12 s of its first POST.
    assert summary["span_s"] == pytest.approx(0.24)
    assert summary["tokens_per_s"] == pytest.approx(60 / 0.24, rel=0.01)
