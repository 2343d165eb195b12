from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.codec import codec
from pipeline.core.partitioning import partition_for
from pipeline.core.pricing import DEFAULT_PRICES_FILE, PriceTable
from pipeline.core.results import LATENCY_SPANS, build_result, latency_breakdown, result_status
from pipeline.core.settings import WorkerSettings
from pipeline.worker.dlq import DeadLetterQueue, Origin
from pipeline.worker.postprocess import PostprocessStage, assemble

RID = "01J0000000000000000000000B"
T0 = 1_750_000_000_000
TRACE = {
    "received": T0,
    "enqueued": T0 + 2,
    "preprocess_start": T0 + 5,
    "preprocess_end": T0 + 6,
    "inference_start": T0 + 9,
    "first_token": T0 + 209,
    "last_token": T0 + 509,
}
PRICES = PriceTable.load(DEFAULT_PRICES_FILE)


def event(seq: int, kind: str = "DELTA", text: str = "", **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": RID,
        "seq": seq,
        "kind": kind,
        "text": text,
        "attempt": 1,
        "user_id": "bob",
        "tier": "pro",
        "model": "claude-haiku-4-5",
        "stop_reason": None,
        "usage": None,
        "error": None,
        "created_at": T0,
        "trace": {},
    }
    base.update(kw)
    return base


def done(seq: int, **kw: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 1000, "output_tokens": 3, "attempts": 2, "cost_micro_usd": 0},
        "trace": TRACE,
    }
    defaults.update(kw)
    return event(seq, "DONE", **defaults)


STREAM = [
    event(1, "STARTED", trace={"inference_start": T0 + 9}),
    event(2, text=" The"),
    event(3, text=" bridge"),
    event(4, text=" opened.\n"),
    done(5),
]


# --- pure functions ----------------------------------------------------------------------------


def test_assemble_joins_deltas_in_seq_order() -> None:
    shuffled = STREAM[:]
    random.Random(3).shuffle(shuffled)
    out = assemble(shuffled + STREAM[1:3])  # duplicates counted once
    assert out.text == " The bridge opened.\n"
    assert out.complete and out.last_seq == 5


def test_assemble_notices_a_missing_seq() -> None:
    out = assemble([STREAM[0], STREAM[1], STREAM[3], STREAM[4]])
    assert not out.complete
    assert not assemble(STREAM[2:]).complete  # started mid-stream
    assert assemble(STREAM[:3], upto_seq=3).complete
    assert not assemble(STREAM[:3], upto_seq=4).complete


@given(st.lists(st.text(max_size=5), max_size=30), st.randoms())
def test_assemble_is_order_and_duplicate_insensitive(texts: list[str], rnd: random.Random) -> None:
    events = [event(i + 1, text=t) for i, t in enumerate(texts)]
    noisy = events + rnd.sample(events, k=len(events) // 2)
    rnd.shuffle(noisy)
    out = assemble(noisy)
    assert out.text == "".join(texts)
    assert out.complete


LATE = {"code": "deadline_exceeded", "partial": True}


@pytest.mark.parametrize(
    ("terminal", "summary", "status"),
    [
        ({"kind": "DONE"}, "x", "COMPLETED"),
        ({"kind": "CANCELLED", "error": {"code": "cancelled"}}, "x", "CANCELLED"),
        ({"kind": "ERROR", "error": {"code": "input_too_large"}}, "", "REJECTED"),
        ({"kind": "ERROR", "error": {"code": "invalid_request"}}, "", "REJECTED"),
        ({"kind": "ERROR", "error": {"code": "unknown_tier"}}, "", "REJECTED"),
        (
            {"kind": "ERROR", "error": {"code": "deadline_exceeded", "partial": True}},
            "x",
            "PARTIAL",
        ),
        ({"kind": "ERROR", "error": {"code": "deadline_exceeded", "partial": True}}, "", "FAILED"),
        ({"kind": "ERROR", "error": {"code": "upstream_unavailable"}}, "x", "FAILED"),
        ({"kind": "ERROR", "error": None}, "", "FAILED"),
    ],
)
def test_result_status(terminal: dict[str, Any], summary: str, status: str) -> None:
    assert result_status(terminal, summary) == status


def test_latency_breakdown_has_every_stage() -> None:
    latency = latency_breakdown({**TRACE, "result": T0 + 512})
    assert latency == {
        "admission": 2,
        "queue_wait": 3,
        "preprocess": 1,
        "inference_queue": 3,
        "ttft": 200,
        "generation": 300,
        "time_to_first_token": 209,
        "total": 512,
    }
    assert set(latency) == set(LATENCY_SPANS)


def test_latency_breakdown_skips_missing_stamps_and_clamps_skew() -> None:
    # A rejection never reached inference; an external request has no `enqueued` stamp.
    latency = latency_breakdown(
        {"received": T0, "preprocess_start": T0 - 3, "preprocess_end": T0 + 1, "result": T0 + 4}
    )
    assert latency == {"queue_wait": 0, "preprocess": 4, "total": 4}


def test_build_result() -> None:
    result = build_result(done(5), " The bridge opened.\n", PRICES, result_ms=T0 + 512)
    assert result["status"] == "COMPLETED"
    assert result["summary"] == "The bridge opened."
    # claude-haiku-4-5: 1 micro-USD per input token, 5 per output token
    assert result["usage"] == {
        "input_tokens": 1000,
        "output_tokens": 3,
        "attempts": 2,
        "cost_micro_usd": 1015,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "document_tokens": 0,
        "memory_tokens": 0,
        "instruction_tokens": 0,
    }
    assert result["last_seq"] == 5 and result["stop_reason"] == "end_turn"
    assert result["user_id"] == "bob" and result["tier"] == "pro"
    assert result["completed_at"] == T0 + 512 and result["created_at"] == T0
    assert result["trace"]["result"] == T0 + 512
    assert result["latency_ms"]["total"] == 512
    assert result["error"] is None
    codec().encode("SummaryResult", result)


def test_build_result_prices_cache_writes_and_reads() -> None:
    usage = {
        "input_tokens": 100,
        "output_tokens": 10,
        "attempts": 1,
        "cost_micro_usd": 0,
        "cache_creation_input_tokens": 2_000,
        "cache_read_input_tokens": 20_000,
    }
    result = build_result(event(4, "DONE", usage=usage), "x", PRICES, result_ms=T0)
    # claude-haiku-4-5 at 1 micro-USD an input token: writes 1.25, reads 0.1.
    assert result["usage"]["cost_micro_usd"] == 100 + 50 + 2_500 + 2_000
    assert result["usage"]["cache_read_input_tokens"] == 20_000


def test_build_result_keeps_inner_whitespace_and_the_error() -> None:
    error = {"code": "deadline_exceeded", "message": "late", "retriable": False, "partial": True}
    terminal = event(4, "ERROR", error=error, usage=None)
    result = build_result(terminal, "  one\n\ntwo  three ", PRICES, result_ms=T0)
    assert result["summary"] == "one\n\ntwo  three"
    assert result["status"] == "PARTIAL"
    assert result["error"] == error
    assert result["usage"] == {
        "input_tokens": 0,
        "output_tokens": 0,
        "attempts": 0,
        "cost_micro_usd": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "document_tokens": 0,
        "memory_tokens": 0,
        "instruction_tokens": 0,
    }


# --- the stage ---------------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, bytes]] = []

    async def __call__(self, key: bytes | None, value: bytes) -> None:
        self.sent.append((key, value))


class Log:
    """Stands in for the `tokens` topic that the stage re-reads from."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, request_id: str, created_at: int) -> list[dict[str, Any]]:
        self.calls.append((request_id, created_at))
        return [e for e in self.events if e["request_id"] == request_id]


def make_stage(
    log: Log | None = None, max_open: int = 100
) -> tuple[PostprocessStage, Sink, Sink, Log]:
    results, dead = Sink(), Sink()
    log = log or Log(STREAM)
    stage = PostprocessStage(
        WorkerSettings(postprocess_max_open=max_open),
        PRICES,
        send_result=results,
        dlq=DeadLetterQueue(dead),
        reread=log,
    )
    return stage, results, dead, log


ORIGIN = Origin("t.tokens", 0, 7)


async def feed(stage: PostprocessStage, events: list[dict[str, Any]], ts: int = T0 + 512) -> None:
    for e in events:
        await stage.handle(e["request_id"].encode(), codec().encode("TokenEvent", e), ORIGIN, ts)


def results_of(sink: Sink) -> list[dict[str, Any]]:
    return [codec().decode_as(v, "SummaryResult") for _, v in sink.sent]


async def test_stage_writes_one_result_per_terminal_event() -> None:
    stage, results, dead, log = make_stage()
    await feed(stage, STREAM)
    [result] = results_of(results)
    assert results.sent[0][0] == RID.encode()
    assert result["summary"] == "The bridge opened."
    assert result["status"] == "COMPLETED"
    assert result["completed_at"] == T0 + 512
    assert log.calls == [] and dead.sent == []
    assert stage.open_requests == 0


async def test_stage_re_reads_the_stream_when_seqs_are_missing() -> None:
    stage, results, _, log = make_stage()
    await feed(stage, STREAM[3:])  # a restart lost seqs 1-3
    [result] = results_of(results)
    assert result["summary"] == "The bridge opened."
    assert log.calls == [(RID, T0)]


async def test_a_replayed_terminal_event_gives_the_same_result() -> None:
    stage, results, _, _ = make_stage()
    await feed(stage, STREAM)
    await feed(stage, STREAM[2:])  # the log replayed after a commit was lost
    assert len(results.sent) == 1
    # A restarted instance (fresh memory) produces an identical record, not a different one.
    fresh, again, _, _ = make_stage()
    await feed(fresh, STREAM[2:])
    assert again.sent == results.sent


async def test_interleaved_requests_are_assembled_separately() -> None:
    other = "01J0000000000000000000000C"
    theirs = [{**e, "request_id": other, "text": e["text"].upper()} for e in STREAM]
    stage, results, _, log = make_stage(Log(STREAM + theirs))
    mixed = [e for pair in zip(STREAM, theirs, strict=True) for e in pair]
    await feed(stage, mixed)
    by_id = {r["request_id"]: r["summary"] for r in results_of(results)}
    assert by_id == {RID: "The bridge opened.", other: "THE BRIDGE OPENED."}
    assert log.calls == []


async def test_memory_is_bounded_and_evicted_requests_are_re_read() -> None:
    ids = [f"01J00000000000000000000{i:03d}" for i in range(5)]
    streams = {i: [{**e, "request_id": i} for e in STREAM] for i in ids}
    log = Log([e for s in streams.values() for e in s])
    stage, results, _, _ = make_stage(log, max_open=2)
    for i in ids:
        await feed(stage, streams[i][:4])
    assert stage.open_requests == 2
    for i in ids:
        await feed(stage, streams[i][4:])
    assert [r["summary"] for r in results_of(results)] == ["The bridge opened."] * 5
    assert sorted(c[0] for c in log.calls) == ids[:3]


async def test_rejection_becomes_a_rejected_result() -> None:
    error = {"code": "input_too_large", "message": "big", "retriable": False, "partial": False}
    rejection = event(
        1,
        "ERROR",
        error=error,
        attempt=0,
        trace={"received": T0, "preprocess_start": T0 + 1, "preprocess_end": T0 + 2},
    )
    stage, results, _, _ = make_stage()
    await feed(stage, [rejection], ts=T0 + 3)
    [result] = results_of(results)
    assert result["status"] == "REJECTED"
    assert result["error"] == error
    assert result["latency_ms"] == {"queue_wait": 1, "preprocess": 1, "total": 3}


@pytest.mark.parametrize(
    ("value", "error_type"),
    [
        (b"\x00garbage", "undecodable_record"),
        (codec().encode("TokenEvent", event(0)), "invalid_record"),
        (codec().encode("TokenEvent", event(1, request_id="")), "invalid_record"),
        (
            codec().encode(
                "ControlEvent", {"request_id": RID, "action": "CANCEL", "created_at": 1}
            ),
            "unknown_schema",
        ),
    ],
)
async def test_poison_tokens_are_dead_lettered_and_the_stage_goes_on(
    value: bytes, error_type: str
) -> None:
    stage, results, dead, _ = make_stage()
    await stage.handle(b"key", value, ORIGIN, None)
    await feed(stage, STREAM)
    letter = codec().decode_as(dead.sent[0][1], "DeadLetter")
    assert letter["error_type"] == error_type
    assert letter["stage"] == "postprocess"
    assert (letter["origin_topic"], letter["origin_offset"]) == ("t.tokens", 7)
    assert letter["value"] == value
    assert len(results.sent) == 1


async def test_a_failing_re_read_still_writes_a_result(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.worker.postprocess.REREAD_BACKOFF_S", 0.0)
    calls = 0

    async def broken(request_id: str, created_at: int) -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        raise ConnectionError("broker down")

    results = Sink()
    stage = PostprocessStage(
        WorkerSettings(),
        PRICES,
        send_result=results,
        dlq=DeadLetterQueue(Sink()),
        reread=broken,
    )
    await feed(stage, STREAM[2:])
    assert calls == 3
    [result] = results_of(results)
    assert result["summary"] == "bridge opened."  # what this instance saw


# --- work a released run could not publish (USAGE events) --------------------------------------


def usage_event(uid: str, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return event(
        0,
        "USAGE",
        text=uid,
        attempt=0,
        usage={
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "attempts": 0,
            "cost_micro_usd": 0,
        },
    )


async def test_usage_before_the_end_is_billed_with_the_result_once() -> None:
    stage, results, _, _ = make_stage()
    released = usage_event("u1", 161, 27)
    await feed(stage, [*STREAM[:2], released, released, *STREAM[2:]])  # redelivered: once
    [result] = results_of(results)
    assert result["usage"]["input_tokens"] == 1000 + 161
    assert result["usage"]["output_tokens"] == 3 + 27
    assert result["usage"]["cost_micro_usd"] == PRICES.micro_usd(
        "claude-haiku-4-5", input_tokens=1161, output_tokens=30
    )


async def test_usage_after_the_result_amends_it_from_the_log() -> None:
    released = usage_event("u2", 0, 6)
    log = Log([*STREAM, released])
    stage, results, _, _ = make_stage(log=log)
    await feed(stage, STREAM)
    await feed(stage, [released])
    first, amended = results_of(results)
    assert first["usage"]["output_tokens"] == 3
    assert amended["usage"]["output_tokens"] == 3 + 6
    assert amended["summary"] == first["summary"]
    assert amended["usage"]["cost_micro_usd"] > first["usage"]["cost_micro_usd"]


async def test_usage_for_a_stream_finished_elsewhere_amends_it_once_per_usage() -> None:
    first_usage, second_usage = usage_event("u3", 50, 0), usage_event("u4", 0, 4)
    log = Log([*STREAM, first_usage, second_usage])
    stage, results, _, _ = make_stage(log=log)
    # This instance never saw the stream: both USAGE events read the end from the log.
    await feed(stage, [first_usage, second_usage])
    amended = results_of(results)[-1]
    assert amended["usage"]["input_tokens"] == 1000 + 50
    assert amended["usage"]["output_tokens"] == 3 + 4


async def test_usage_for_a_stream_not_ended_yet_waits_for_its_end() -> None:
    released = usage_event("u5", 161, 0)
    log = Log([*STREAM[:2], released])  # the end is not written yet
    stage, results, _, _ = make_stage(log=log)
    await feed(stage, [released])
    assert results.sent == []
    log.events = [*STREAM, released]
    await feed(stage, STREAM[2:])  # a resumed owner's seqs and end: the start is re-read
    [result] = results_of(results)
    assert result["usage"]["input_tokens"] == 1000 + 161


async def test_usage_after_a_revoke_amends_a_result_another_instance_wrote() -> None:
    # This instance read the stream's start, was frozen past its session timeout, and got the
    # partition back after another instance had ended the stream and written its result
    # (chaos seed 11): the USAGE event it reads next must amend that result, not wait for an
    # end it will never read.
    released = usage_event("u6", 161, 27)
    log = Log([*STREAM, released])
    stage, results, _, _ = make_stage(log=log)
    await feed(stage, STREAM[:2])
    stage.on_revoked({partition_for(STREAM[0]["request_id"].encode(), 6)})
    await feed(stage, [released])
    [amended] = results_of(results)
    assert amended["usage"]["input_tokens"] == 1000 + 161
    assert amended["usage"]["output_tokens"] == 3 + 27


async def test_a_revoke_keeps_the_streams_of_partitions_still_owned() -> None:
    stage, results, _, log = make_stage()
    await feed(stage, STREAM[:2])
    kept = partition_for(STREAM[0]["request_id"].encode(), 6)
    stage.on_revoked({p for p in range(6) if p != kept})
    await feed(stage, STREAM[2:])
    [result] = results_of(results)
    assert result["status"] == "COMPLETED"
    assert log.calls == []  # assembled from what it held: nothing re-read
