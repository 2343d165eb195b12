"""Pure parts of replay, history and top: time parsing, ordering, replays, audit rows, frames."""

from __future__ import annotations

import argparse
import io
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ulid import ULID

from pipeline.core.codec import codec
from pipeline.core.settings import KafkaSettings
from pipeline.ops import audit, reinject, replay, timeline, top
from pipeline.ops.history import LoggedRecord, Progress, format_time, merge_by_time, parse_time

NOW = 1_750_000_000_000  # 2025-06-15T15:06:40Z
TOPICS = ["p.requests", "p.preprocessed", "p.tokens", "p.results", "p.control", "p.dlq"]


def test_parse_time_accepts_iso_relative_now_and_epoch() -> None:
    assert parse_time("2025-06-15T15:06:40Z") == NOW
    assert parse_time("2025-06-15T15:06:40.250+00:00") == NOW + 250
    assert parse_time("2025-06-15T17:06:40+02:00") == NOW
    assert parse_time("2025-06-15T15:06:40") == NOW  # naive means UTC
    assert parse_time("2025-06-15") == parse_time("2025-06-15T00:00:00Z")
    assert parse_time("now", now=NOW) == NOW
    assert parse_time("-15m", now=NOW) == NOW - 15 * 60_000
    assert parse_time("-2h", now=NOW) == NOW - 2 * 3_600_000
    assert parse_time("-1.5d", now=NOW) == NOW - 36 * 3_600_000
    assert parse_time("30s", now=NOW) == NOW - 30_000
    assert parse_time("10m ago", now=NOW) == NOW - 600_000
    assert parse_time("-500ms", now=NOW) == NOW - 500
    assert parse_time(str(NOW)) == NOW


@pytest.mark.parametrize("text", ["yesterday", "-15x", "", "2025-13-01"])
def test_parse_time_rejects_other_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a time"):
        parse_time(text)


@given(st.integers(min_value=0, max_value=4_102_444_800_000))
def test_format_time_round_trips(ms: int) -> None:
    text = format_time(ms)
    assert text.endswith("Z")
    assert parse_time(text) == ms


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sumstream replay")
    replay.add_arguments(parser)
    return parser


def test_command_line_takes_relative_times_as_values() -> None:
    args = _parser().parse_args(["rerun", "--since", "-15m", "--until", "-1m", "--dry-run"])
    assert args.action == "rerun" and args.dry_run and not args.include_replays
    assert 0 < args.until - args.since <= 14 * 60_000 + 1_000
    args = _parser().parse_args(["export", "--since", "-2h", "--out", "audit.jsonl"])
    assert args.out == "audit.jsonl" and args.until >= args.since
    with pytest.raises(SystemExit):
        _parser().parse_args(["export", "--since", "whenever", "--out", "x"])


def test_since_after_until_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["export", "--since", "now", "--until", "-1h", "--out", "-"])
    assert replay.run(args) == 2
    assert "--since is after --until" in capsys.readouterr().err


def _logged(topic: str, partition: int, offset: int, ts: int, value: bytes = b"") -> LoggedRecord:
    return LoggedRecord(topic, partition, offset, ts, b"k", value)


def test_merge_orders_by_time_with_ties_in_pipeline_order() -> None:
    records = [
        _logged("p.results", 0, 7, 50),
        _logged("p.tokens", 1, 3, 20),
        _logged("p.control", 2, 0, 20),
        _logged("p.requests", 0, 1, 0),
        _logged("p.tokens", 1, 2, 10),
    ]
    merged = merge_by_time(records, TOPICS)
    assert [(r.topic, r.offset) for r in merged] == [
        ("p.requests", 1),
        ("p.tokens", 2),
        ("p.tokens", 3),
        ("p.control", 0),
        ("p.results", 7),
    ]


def test_merge_keeps_a_partition_in_log_order_when_clocks_disagree() -> None:
    # A resumed stream: the second worker's clock is behind the first's.
    records = [_logged("p.tokens", 0, 1, 100), _logged("p.tokens", 0, 2, 90)]
    records.append(_logged("p.control", 0, 0, 95))
    merged = merge_by_time(records, TOPICS)
    assert [(r.topic, r.offset) for r in merged] == [
        ("p.control", 0),
        ("p.tokens", 1),
        ("p.tokens", 2),
    ]


@given(
    st.lists(
        st.tuples(st.sampled_from(TOPICS), st.integers(0, 2), st.integers(0, 1_000)),
        max_size=40,
    )
)
def test_merge_is_a_permutation_that_keeps_every_partition_in_order(
    draws: list[tuple[str, int, int]],
) -> None:
    records = [_logged(topic, part, offset, ts) for offset, (topic, part, ts) in enumerate(draws)]
    merged = merge_by_time(records, TOPICS)
    assert sorted(merged, key=lambda r: r.offset) == records
    for topic in TOPICS:
        for part in range(3):
            run = [r.offset for r in merged if (r.topic, r.partition) == (topic, part)]
            assert run == sorted(run)


def _request(**kw: Any) -> dict[str, Any]:
    rec = {
        "request_id": str(ULID()),
        "user_id": "alice",
        "tier": "pro",
        "document": "A document.",
        "instructions": "short",
        "max_output_tokens": 100,
        "model": "claude-haiku-4-5",
        "deadline_ms": None,
        "idempotency_key": "key-1",
        "source": "gateway",
        "replay_of": None,
        "degraded": "cheaper_model",
        "created_at": NOW,
        "trace": {"received": NOW, "enqueued": NOW + 1},
    }
    rec.update(kw)
    return rec


def test_replay_request_is_a_new_request_for_the_same_document() -> None:
    original = _request(deadline_ms=NOW + 30_000)
    again = reinject.replay_request(original)
    assert again["request_id"] != original["request_id"]
    ULID.from_str(again["request_id"])
    assert again["replay_of"] == original["request_id"]
    assert again["source"] == "replay"
    assert again["idempotency_key"] is None
    for name in ("user_id", "tier", "document", "instructions", "max_output_tokens", "model"):
        assert again[name] == original[name]
    assert again["degraded"] == "cheaper_model"
    assert again["created_at"] > NOW
    assert again["trace"] == {"received": again["created_at"], "enqueued": again["created_at"]}
    assert again["deadline_ms"] == again["created_at"] + 30_000
    codec().encode("SummarizeRequest", again)  # a valid record


def test_replay_request_on_another_model() -> None:
    again = reinject.replay_request(_request(), model="claude-sonnet-4-5")
    assert again["model"] == "claude-sonnet-4-5"
    assert again["degraded"] is None  # the original's degradation no longer describes it
    assert again["deadline_ms"] is None


def _result(**kw: Any) -> dict[str, Any]:
    rec = {
        "request_id": "01JXX",
        "user_id": "alice",
        "tier": "pro",
        "model": "claude-haiku-4-5",
        "status": "PARTIAL",
        "summary": "So far",
        "usage": {"input_tokens": 10, "output_tokens": 3, "attempts": 2, "cost_micro_usd": 42},
        "error": {"code": "deadline_exceeded", "message": "", "retriable": False, "partial": True},
        "stop_reason": None,
        "last_seq": 3,
        "degraded": None,
        "source": "replay",
        "replay_of": "01JWW",
        "latency_ms": {"total": 1234},
        "created_at": NOW,
        "completed_at": NOW + 1234,
        "trace": {},
    }
    rec.update(kw)
    return rec


def test_audit_row_says_who_when_what_model_tokens_cost_and_outcome() -> None:
    row = audit.audit_row(_result())
    assert row == {
        "request_id": "01JXX",
        "user_id": "alice",
        "tier": "pro",
        "created_at": "2025-06-15T15:06:40.000Z",
        "completed_at": "2025-06-15T15:06:41.234Z",
        "model": "claude-haiku-4-5",
        "status": "PARTIAL",
        "input_tokens": 10,
        "output_tokens": 3,
        "attempts": 2,
        "cost_micro_usd": 42,
        "error": "deadline_exceeded",
        "source": "replay",
        "replay_of": "01JWW",
    }
    assert audit.audit_row(_result(error=None, status="COMPLETED"))["error"] is None
    json.dumps(row)


def test_history_lines_show_essentials_and_undecodable_records() -> None:
    settings = KafkaSettings(topic_prefix="p.")
    token = {"request_id": "r", "seq": 4, "kind": "DELTA", "text": "x" * 100, "attempt": 2}
    records = [
        _logged("p.requests", 0, 0, NOW, codec().encode("SummarizeRequest", _request())),
        _logged("p.tokens", 1, 9, NOW + 12, codec().encode("TokenEvent", token)),
        _logged("p.results", 1, 3, NOW + 40, codec().encode("SummaryResult", _result())),
        _logged("p.requests", 0, 1, NOW + 41, b"\x00junk"),
    ]
    lines = list(timeline.history_lines(records, settings))
    assert lines[0].startswith("2025-06-15T15:06:40.000Z      +0ms requests     p0@0")
    assert "user=alice tier=pro source=gateway model=claude-haiku-4-5 doc=11 chars" in lines[0]
    assert "+12ms tokens       p1@9" in lines[1]
    assert "DELTA seq=4 attempt=2 " in lines[1] and "…" in lines[1] and "x" * 80 not in lines[1]
    assert "PARTIAL model=claude-haiku-4-5 in=10 out=3 attempts=2 cost=42µ$" in lines[2]
    assert "error=deadline_exceeded total=1234ms" in lines[2]
    assert "undecodable" in lines[3] and "not an Avro" in lines[3]
    rows = [json.loads(line) for line in timeline.history_lines(records, settings, as_json=True)]
    assert [row["offset_ms"] for row in rows] == [0, 12, 40, 41]
    assert rows[1]["record"]["text"] == "x" * 100
    assert rows[3]["record"] is None and "not an Avro" in rows[3]["error"]
    assert list(timeline.history_lines([], settings)) == []


def test_essentials_of_control_and_dead_letters() -> None:
    control = {"request_id": "r", "action": "CANCEL", "reason": "disconnect", "created_at": 0}
    assert timeline.essentials("ControlEvent", control) == "CANCEL reason=disconnect"
    letter = {
        "key": b"r",
        "value": b"?",
        "error_type": "invalid_record",
        "error": "empty document",
        "stage": "preprocess",
        "origin_topic": "p.requests",
        "origin_partition": 2,
        "origin_offset": 17,
        "created_at": 0,
    }
    line = timeline.essentials("DeadLetter", letter)
    assert line == (
        'stage=preprocess error=invalid_record: "empty document" origin=p.requests[2]@17'
    )


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    screen = _Terminal()
    bar = Progress("reading", stream=screen)
    bar.update(5, 10)  # within the first second: quiet
    assert screen.getvalue() == ""
    bar.update(5, 10, force=True)
    bar.close()
    assert screen.getvalue() == "\rreading [" + "#" * 15 + "-" * 15 + "]  50% 5/10 records\n"
    log = io.StringIO()
    lines = Progress("reading", stream=log)
    lines.update(0, 0, force=True)
    lines.close()
    assert log.getvalue() == "reading: 100% (0/0 records)\n"
    off = io.StringIO()
    silent = Progress("reading", stream=off, enabled=False)
    silent.update(1, 2, force=True)
    silent.close()
    assert off.getvalue() == ""


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert top.percentile(values, 50) == 50
    assert top.percentile(values, 99) == 99
    assert top.percentile([7], 99) == 7
    assert top.percentile([3, 1, 2], 0) == 1


def _summary(tier: str, cost: int, **latency: int) -> dict[str, Any]:
    return _result(tier=tier, status="COMPLETED", latency_ms=latency, usage={
        "input_tokens": 10, "output_tokens": 5, "attempts": 1, "cost_micro_usd": cost,
    })  # fmt: skip


def test_view_counts_in_flight_streams_and_results_in_the_window() -> None:
    view = top.PipelineView(window_s=60)
    view.add_token(b"a", NOW - 5_000)
    view.add_token(b"b", NOW - 4_000)
    view.add_result(b"b", NOW - 3_000, _summary("pro", 100, ttft=200, total=900))
    view.add_token(b"b", NOW - 3_500)  # read after its result while catching up
    view.add_result(b"c", NOW - 2_000, _summary("free", 20, ttft=400))
    view.add_result(b"d", NOW - 61_000, _summary("pro", 999))  # before the window
    view.add_token(b"e", NOW - 400_000)  # a stream silent for minutes: not counted

    frame = view.frame(NOW, {"preprocess": 1, "inference": 5, "postprocess": 0})

    assert frame.in_flight == 1
    assert frame.results == 2
    assert frame.throughput == pytest.approx(2 / 60)
    assert frame.statuses == {"COMPLETED": 2}
    assert {name: t.cost_micro_usd for name, t in frame.tiers.items()} == {"pro": 100, "free": 20}
    assert frame.latency == {"ttft": (200.0, 400.0), "total": (900.0, 900.0)}
    text = top.render(frame, "p.")
    assert "throughput   0.03 results/s (2 in the window)" in text
    assert "in flight    1 " in text
    assert "lag          preprocess 1  inference 5  postprocess 0" in text
    assert "ttft model   p50 200 ms  p99 400 ms" in text
    assert "ttft client  -" in text
    assert "free                1        10         5    0.000020" in text
    assert "all                 2        20        10    0.000120" in text
    assert "lag          n/a" in top.render(view.frame(NOW), "p.")


def test_view_reads_records_of_both_topics() -> None:
    view = top.PipelineView(window_s=10)
    value = codec().encode("SummaryResult", _summary("pro", 5, total=1_500))
    view.feed(LoggedRecord("p.tokens", 0, 0, NOW - 100, b"a", b"not decoded"), "p.results")
    view.feed(LoggedRecord("p.results", 0, 0, NOW - 50, b"z", value), "p.results")
    view.feed(LoggedRecord("p.results", 0, 1, NOW - 40, b"y", b"junk"), "p.results")
    view.feed(LoggedRecord("p.results", 0, 2, NOW - 30, b"y", None), "p.results")
    frame = view.frame(NOW)
    assert (frame.in_flight, frame.results) == (1, 1)
    assert "total        p50 1500 ms  p99 1500 ms" in top.render(frame, "p.")
    # A minute later the window is empty and old samples are gone.
    later = view.frame(NOW + 60_000)
    assert later.results == 0 and later.tiers == {}
