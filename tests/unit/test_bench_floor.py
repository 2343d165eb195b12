"""The floor's minimal implementations (bench/floor_parts.py, floor_gateway.py) and its summary
(bench/floor_report.py): the records a request costs, their sizes, the SSE bytes it writes."""

from __future__ import annotations

import asyncio

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import client, floor_report
from bench.floor_gateway import _sse
from bench.floor_parts import (
    DELTA,
    RESULT,
    STARTED,
    TERMINAL,
    Config,
    Inference,
    Postprocess,
    value,
)
from bench.sse import SSEParser


def paced(deltas: int, tokens: int = 100) -> Config:
    return Config("unused:9092", "t.", deltas=deltas, tokens=tokens, ttft_ms=0, token_ms=0)


def run_inference(cfg: Config) -> list[dict[str, object]]:
    sent: list[dict[str, object]] = []

    async def send(topic: str, key: bytes, data: bytes) -> None:
        assert topic == "t.tokens" and key == b"k"
        sent.append(orjson.loads(data))

    async def go() -> None:
        inference = Inference(cfg, send)
        await inference.run(b"k", {"doc": "d"})
        await inference.http.aclose()

    asyncio.run(go())
    return sent


@settings(max_examples=40, deadline=None)
@given(deltas=st.integers(1, 120), tokens=st.integers(1, 120))
def test_inference_sends_started_the_measured_number_of_gapless_deltas_then_the_end(
    deltas: int, tokens: int
) -> None:
    sent = run_inference(paced(deltas, tokens))
    assert sent[0]["k"] == STARTED and sent[-1]["k"] == TERMINAL
    ranges = [(d["f"], d["s"]) for d in sent[1:-1]]
    assert all(d["k"] == DELTA for d in sent[1:-1])
    assert ranges[0] == (1, 1)  # the first token goes alone, as sumstream's does
    assert [f for f, _ in ranges[1:]] == [s + 1 for _, s in ranges[:-1]]
    assert ranges[-1][1] == tokens == sent[-1]["s"]
    assert len(ranges) == max(min(deltas, tokens), 1 if tokens == 1 else 2)


def test_records_are_padded_to_the_measured_mean_size_of_their_kind() -> None:
    cfg = Config("unused:9092", "t.", sizes={DELTA: 76, STARTED: 191})
    assert abs(len(value(cfg, STARTED)) - 191) <= 8
    assert abs(len(value(cfg, DELTA, t="a b c", s=3, f=1)) - 76) <= 8
    assert orjson.loads(value(cfg, DELTA, t="a b c", s=3, f=1))["t"] == "a b c"
    assert len(value(cfg, TERMINAL)) < 20  # no size measured: no padding


def test_postprocess_assembles_the_summary_and_answers_at_the_terminal_event_only() -> None:
    post = Postprocess(Config("unused:9092", "t."))
    assert post.on_token(b"k", {"k": STARTED}) is None
    assert post.on_token(b"k", {"k": DELTA, "t": "Hello", "s": 1, "f": 1}) is None
    assert post.on_token(b"k", {"k": DELTA, "t": " world", "s": 3, "f": 2}) is None
    result = post.on_token(b"k", {"k": TERMINAL, "s": 3})
    assert result is not None and orjson.loads(result)["summary"] == "Hello world"
    assert post.texts == {}


def test_floor_gateway_writes_events_the_bench_client_accepts_as_a_complete_stream() -> None:
    records = [
        {"k": STARTED},
        {"k": DELTA, "t": "Hello", "s": 1, "f": 1},
        {"k": DELTA, "t": " big world", "s": 3, "f": 2},
    ]
    first, ended = _sse(records)
    last, end = _sse([{"k": RESULT, "summary": "Hello big world"}, {"k": DELTA, "t": "x"}])
    assert not ended and end
    rec = client.StreamRecord("floor", "unit", 0, "Hello big world")
    for event in SSEParser().feed(first + last):
        client._on_event(rec, event, 0.0)
    assert rec.complete and rec.in_order and rec.own
    assert rec.event_ids == ["1", "3"]


def test_summary_gives_median_and_range_over_rounds_and_ttft_over_the_same_rounds_baseline() -> (
    None
):
    def result(row: str, round_: int, broker: float, ttft: float) -> dict[str, object]:
        return {
            "row": row,
            "round": round_,
            "cpu_ms": {"broker": broker, "pipe": 5.0},
            "total_ms": broker + 5.0,
            "ttft_p50": ttft,
            "ttft_p99": ttft * 2,
            "load": [[1.5, 1.0, 1.0], [1.6, 1.0, 1.0]],
        }

    bare = [result("bare", i, b, t) for i, (b, t) in enumerate(((10, 250), (14, 260), (11, 300)))]
    base = [result("baseline", i, 0, t) for i, t in enumerate((240, 200, 250))]
    rows = floor_report.summarize(bare + base)
    assert [r["row"] for r in rows] == ["baseline", "bare"]
    summary = rows[1]
    assert summary["cpu_ms"]["broker"] == {"median": 11.0, "min": 10.0, "max": 14.0}
    assert summary["total_ms"]["median"] == 16.0
    assert summary["ttft_p50"] == {"median": 260.0, "min": 250.0, "max": 300.0}
    assert summary["over_p50"] == {"median": 50.0, "min": 10.0, "max": 60.0}
    assert summary["over_p99"] == {"median": 100.0, "min": 20.0, "max": 120.0}
    assert summary["load_1m"] == [1.5, 1.5, 1.5]
    assert "| bare |" in floor_report.markdown({"summary": rows})
