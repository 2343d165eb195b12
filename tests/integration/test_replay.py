"""Replay, audit export and `top` on the real broker, with records produced as the workers would."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer
from ulid import ULID

from pipeline.core.codec import codec
from pipeline.core.settings import KafkaSettings, child_env
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.tail import id_time_ms
from pipeline.ops import cli
from pipeline.ops.audit import audit_rows, export
from pipeline.ops.history import LoggedRecord, parse_time, request_history, scan
from pipeline.ops.reinject import rerun
from pipeline.ops.timeline import history_lines
from pipeline.ops.top import render, snapshot, watch

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(
    kafka_settings: KafkaSettings, make_topics: Callable[..., TopicNames]
) -> KafkaSettings:
    """Fresh topics under this test's prefix; the stream and work topics differ in partitions."""
    chosen = kafka_settings.model_copy(update={"stream_partitions": 4, "work_partitions": 3})
    make_topics(chosen)
    return chosen


class Writer:
    """Produces records as the stages do: idempotent, acks=all, murmur2, explicit timestamps."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.topics = TopicNames.from_settings(settings)
        self.producer = Producer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "enable.idempotence": True,
                "acks": "all",
                "partitioner": "murmur2_random",
            }
        )

    def send(
        self, short: str, key: str, value: bytes | None, at_ms: int, schema: str | None = None
    ) -> None:
        self.producer.produce(
            getattr(self.topics, short), key=key.encode(), value=value, timestamp=at_ms
        )

    def record(self, short: str, schema: str, rec: dict[str, Any], at_ms: int) -> None:
        self.send(
            short, rec.get("request_id") or rec["key"].decode(), codec().encode(schema, rec), at_ms
        )

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def request(
    rid: str, at: int, *, user: str = "alice", tier: str = "pro", **kw: Any
) -> dict[str, Any]:
    return {
        "request_id": rid,
        "user_id": user,
        "tier": tier,
        "document": f"The document of {rid}. It has two sentences.",
        "source": "gateway",
        "created_at": at,
        "trace": {"received": at, "enqueued": at},
        **kw,
    }


def job(rid: str, at: int) -> dict[str, Any]:
    return {
        "request_id": rid,
        "user_id": "alice",
        "tier": "pro",
        "model": "claude-haiku-4-5",
        "prompt": "Summarize: ...",
        "max_output_tokens": 256,
        "input_tokens_estimate": 40,
        "deadline_ms": at + 120_000,
        "created_at": at,
    }


def token(rid: str, seq: int, kind: str, text: str = "", **kw: Any) -> dict[str, Any]:
    return {"request_id": rid, "seq": seq, "kind": kind, "text": text, **kw}


def result(
    rid: str,
    at: int,
    *,
    status: str = "COMPLETED",
    tier: str = "pro",
    cost: int = 100,
    latency: dict[str, int] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    return {
        "request_id": rid,
        "user_id": "alice",
        "tier": tier,
        "model": "claude-haiku-4-5",
        "status": status,
        "summary": "The summary.",
        "usage": {"input_tokens": 40, "output_tokens": 12, "attempts": 1, "cost_micro_usd": cost},
        "latency_ms": latency or {},
        "created_at": at - 500,
        "completed_at": at,
        **kw,
    }


async def test_request_history_shows_every_record_in_time_order(settings: KafkaSettings) -> None:
    rid = str(ULID())
    other = str(ULID())
    t0 = id_time_ms(rid)
    assert t0 is not None
    w = Writer(settings)
    w.record("requests", "SummarizeRequest", request(rid, t0), t0)
    w.send("requests", rid, b"garbage", t0 + 1)  # a poison record under the same key
    w.record("requests", "SummarizeRequest", request(other, t0 + 2), t0 + 2)
    w.record("preprocessed", "InferenceJob", job(rid, t0), t0 + 5)
    w.record("tokens", "TokenEvent", token(rid, 0, "STARTED"), t0 + 10)
    w.record("tokens", "TokenEvent", token(other, 0, "STARTED"), t0 + 11)
    w.record("tokens", "TokenEvent", token(rid, 1, "DELTA", "The "), t0 + 20)
    w.record("tokens", "TokenEvent", token(rid, 2, "DELTA", "summary."), t0 + 30)
    cancel = {"request_id": rid, "action": "CANCEL", "reason": "client", "created_at": t0 + 35}
    w.record("control", "ControlEvent", cancel, t0 + 35)
    usage = {"input_tokens": 40, "output_tokens": 2, "attempts": 1, "cost_micro_usd": 7}
    w.record("tokens", "TokenEvent", token(rid, 3, "CANCELLED", usage=usage), t0 + 45)
    w.record("results", "SummaryResult", result(rid, t0 + 50, status="CANCELLED", cost=7), t0 + 50)
    letter = {
        "key": rid.encode(),
        "value": b"garbage",
        "error_type": "undecodable_record",
        "error": "not an Avro single-object encoded record",
        "stage": "preprocess",
        "origin_topic": w.topics.requests,
        "origin_partition": 0,
        "origin_offset": 1,
        "created_at": t0 + 60,
    }
    w.record("dlq", "DeadLetter", letter, t0 + 60)
    w.flush()

    records = await request_history(settings, rid)

    seen = [(r.topic.removeprefix(settings.topic_prefix), _kind(r)) for r in records]
    assert seen == [
        ("requests", "SummarizeRequest"),
        ("requests", "undecodable"),
        ("preprocessed", "InferenceJob"),
        ("tokens", "STARTED"),
        ("tokens", "DELTA"),
        ("tokens", "DELTA"),
        ("control", "ControlEvent"),
        ("tokens", "CANCELLED"),
        ("results", "SummaryResult"),
        ("dlq", "DeadLetter"),
    ]
    assert [r.timestamp_ms - t0 for r in records] == [0, 1, 5, 10, 20, 30, 35, 45, 50, 60]
    assert all(r.key == rid.encode() for r in records)

    lines = list(history_lines(records, settings))
    assert len(lines) == 10
    assert "+0ms" in lines[0] and "SummarizeRequest" in lines[0] and "user=alice" in lines[0]
    assert "undecodable" in lines[1]
    assert 'DELTA seq=2 attempt=1 "summary."' in lines[5]
    assert "CANCELLED" in lines[8] and "cost=7µ$" in lines[8] and "+50ms" in lines[8]
    assert "stage=preprocess" in lines[9]
    as_json = [json.loads(line) for line in history_lines(records, settings, as_json=True)]
    assert [row["offset_ms"] for row in as_json] == [0, 1, 5, 10, 20, 30, 35, 45, 50, 60]
    assert as_json[6]["record"]["action"] == "CANCEL"
    assert as_json[9]["record"]["value"] == "Z2FyYmFnZQ=="  # bytes as base64


def _kind(logged: LoggedRecord) -> str:
    try:
        name, rec = logged.decode()
    except Exception:
        return "undecodable"
    return str(rec["kind"]) if name == "TokenEvent" else name


def test_replay_request_command(settings: KafkaSettings) -> None:
    rid = str(ULID())
    t0 = id_time_ms(rid)
    assert t0 is not None
    w = Writer(settings)
    w.record("requests", "SummarizeRequest", request(rid, t0), t0)
    w.record("tokens", "TokenEvent", token(rid, 0, "STARTED"), t0 + 3)
    w.record("results", "SummaryResult", result(rid, t0 + 9), t0 + 9)
    w.flush()
    env = child_env(
        topic_prefix=settings.topic_prefix, bootstrap_servers=settings.bootstrap_servers
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.ops.cli", "replay", "request", rid, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["topic"], r["type"], r["offset_ms"]) for r in rows] == [
        ("requests", "SummarizeRequest", 0),
        ("tokens", "TokenEvent", 3),
        ("results", "SummaryResult", 9),
    ]
    missing = subprocess.run(
        [sys.executable, "-m", "pipeline.ops.cli", "replay", "request", str(ULID())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 1
    assert "no records" in missing.stderr


async def _requests_log(settings: KafkaSettings) -> list[LoggedRecord]:
    topics = TopicNames.from_settings(settings)
    found = [r async for r in scan(ConnectionConfig.from_settings(settings), [topics.requests])]
    return sorted(found, key=lambda r: (r.partition, r.offset))


async def test_rerun_injects_new_requests_and_leaves_the_originals(settings: KafkaSettings) -> None:
    now = int(time.time() * 1000)
    w = Writer(settings)
    first = request(str(ULID()), now - 300_000, user="alice")
    second = request(
        str(ULID()),
        now - 240_000,
        user="bob",
        tier="free",
        deadline_ms=now - 240_000 + 60_000,
        idempotency_key="k-1",
        instructions="one line",
    )
    again = request(str(ULID()), now - 180_000, source="replay", replay_of=first["request_id"])
    old = request(str(ULID()), now - 7_200_000, user="alice")
    for rec in (first, second, again, old):
        w.record("requests", "SummarizeRequest", rec, rec["created_at"])
    w.send("requests", "poison", b"\x00not avro", now - 200_000)
    w.flush()
    before = await _requests_log(settings)
    assert len(before) == 5
    since, until = parse_time("-10m"), parse_time("now")

    plan = await rerun(settings, since, until, dry_run=True)
    assert set(plan.mapping) == {first["request_id"], second["request_id"]}
    assert (plan.skipped_replays, plan.undecodable) == (1, 1)
    assert await _requests_log(settings) == before  # a dry run produces nothing
    bob_only = await rerun(settings, since, until, dry_run=True, user="bob")
    assert set(bob_only.mapping) == {second["request_id"]}
    assert bob_only.skipped_users == 1
    with_replays = await rerun(settings, since, until, dry_run=True, include_replays=True)
    assert len(with_replays.mapping) == 3

    mapped: list[tuple[str, str]] = []
    started = int(time.time() * 1000)
    report = await rerun(
        settings,
        since,
        until,
        model="claude-sonnet-4-5",
        on_mapped=lambda o, n, _r: mapped.append((o, n)),
    )
    assert not report.failed
    assert sorted(mapped) == sorted(report.mapping.items())
    assert set(report.mapping) == {first["request_id"], second["request_id"]}

    after = await _requests_log(settings)
    by_coordinates = {(r.topic, r.partition, r.offset): r for r in after}
    for kept in before:  # same offsets, same bytes
        assert by_coordinates[(kept.topic, kept.partition, kept.offset)] == kept
    new = [r for r in after if r not in before]
    assert len(new) == 2
    replays = {
        rec["replay_of"]: rec
        for rec in (codec().decode_as(r.value, "SummarizeRequest") for r in new)
    }
    for logged in new:
        assert logged.key is not None
        assert logged.key.decode() in report.mapping.values()
    for original in (first, second):
        replay = replays[original["request_id"]]
        assert replay["request_id"] == report.mapping[original["request_id"]]
        assert replay["request_id"] != original["request_id"]
        assert ULID.from_str(replay["request_id"]).milliseconds >= started
        assert replay["source"] == "replay"
        assert replay["model"] == "claude-sonnet-4-5"
        assert replay["created_at"] >= started
        assert (replay["document"], replay["user_id"], replay["tier"]) == (
            original["document"],
            original["user_id"],
            original["tier"],
        )
    bob = replays[second["request_id"]]
    assert bob["instructions"] == "one line"
    assert bob["idempotency_key"] is None
    assert bob["deadline_ms"] - bob["created_at"] == 60_000

    # The replays are now in the window too; without --include-replays they are not re-run.
    second_pass = await rerun(settings, since, parse_time("now"), dry_run=True)
    assert set(second_pass.mapping) == {first["request_id"], second["request_id"]}
    assert second_pass.skipped_replays == 3


async def test_export_keeps_the_last_result_per_request(settings: KafkaSettings) -> None:
    now = int(time.time() * 1000)
    w = Writer(settings)
    ids = [str(ULID()) for _ in range(5)]
    a, b, c, d, e = ids
    w.record("results", "SummaryResult", result(a, now - 60_000, cost=100), now - 60_000)
    error = {"code": "upstream_unavailable", "message": "gave up", "retriable": True}
    failed = result(b, now - 50_000, status="FAILED", tier="free", cost=30, error=error)
    w.record("results", "SummaryResult", failed, now - 50_000)
    w.record(
        "results", "SummaryResult", result(c, now - 40_000, status="PARTIAL", cost=10), now - 40_000
    )
    replayed = result(c, now - 30_000, cost=50, source="replay", replay_of=a)
    w.record("results", "SummaryResult", replayed, now - 30_000)
    w.record("results", "SummaryResult", result(d, now - 7_200_000, cost=1000), now - 7_200_000)
    w.record("results", "SummaryResult", result(e, now - 20_000, cost=5), now - 20_000)
    w.send("results", e, None, now - 19_000)  # tombstone
    w.send("results", "junk", b"junk", now - 18_000)
    w.flush()

    out = io.StringIO()
    report = await export(settings, parse_time("-30m"), parse_time("now"), out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [row["request_id"] for row in rows] == [a, b, c]
    assert (report.rows, report.cost_micro_usd, report.undecodable) == (3, 180, 1)
    assert sum(row["cost_micro_usd"] for row in rows) == 180
    assert rows[1]["status"] == "FAILED" and rows[1]["error"] == "upstream_unavailable"
    assert rows[1]["tier"] == "free"
    assert rows[2]["status"] == "COMPLETED" and rows[2]["source"] == "replay"
    assert rows[2]["replay_of"] == a
    assert set(rows[0]) == {
        "request_id", "user_id", "tier", "created_at", "completed_at", "model", "status",
        "input_tokens", "output_tokens", "attempts", "cost_micro_usd", "error", "source",
        "replay_of",
    }  # fmt: skip
    assert rows[0]["completed_at"].endswith("Z")
    assert parse_time(rows[0]["completed_at"]) == now - 60_000
    # A narrower window sees only what was stamped in it.
    narrow = await audit_rows(settings, now - 45_000, now - 35_000)
    assert [(row["request_id"], row["status"]) for row in narrow] == [(c, "PARTIAL")]


def test_export_command(
    settings: KafkaSettings, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: Any
) -> None:
    now = int(time.time() * 1000)
    w = Writer(settings)
    for i, cost in enumerate((11, 22, 33)):
        w.record("results", "SummaryResult", result(str(ULID()), now - i, cost=cost), now - i)
    w.flush()
    monkeypatch.setenv("SUMSTREAM_TOPIC_PREFIX", settings.topic_prefix)
    monkeypatch.setenv("SUMSTREAM_BOOTSTRAP_SERVERS", settings.bootstrap_servers)
    target = tmp_path / "audit.jsonl"
    assert cli.main(["replay", "export", "--since", "-5m", "--out", str(target)]) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert sorted(row["cost_micro_usd"] for row in rows) == [11, 22, 33]
    assert "exported 3 results (0.000066 USD)" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["audit.jsonl"]  # no temporary left behind


async def test_top_once_renders_the_figures(settings: KafkaSettings, group_id: str) -> None:
    now = int(time.time() * 1000)
    w = Writer(settings)
    streaming, done_pro, done_free, old = (str(ULID()) for _ in range(4))
    for rid in (streaming, done_pro, done_free):
        w.record("tokens", "TokenEvent", token(rid, 0, "STARTED"), now - 5_000)
        w.record("tokens", "TokenEvent", token(rid, 1, "DELTA", "x"), now - 4_000)
    w.record(
        "results",
        "SummaryResult",
        result(
            done_pro,
            now - 3_000,
            cost=250,
            latency={"time_to_first_token": 300, "ttft": 200, "total": 900},
        ),
        now - 3_000,
    )
    w.record(
        "results",
        "SummaryResult",
        result(done_free, now - 2_000, tier="free", status="PARTIAL", cost=50,
               latency={"time_to_first_token": 500, "ttft": 400, "total": 1500}),
        now - 2_000,
    )  # fmt: skip
    w.record("results", "SummaryResult", result(old, now - 300_000, cost=999), now - 300_000)
    w.flush()

    frame = await snapshot(settings, window_s=60, group=group_id)

    assert frame.results == 2
    assert frame.in_flight == 1
    assert frame.throughput == pytest.approx(2 / 60)
    assert frame.statuses == {"COMPLETED": 1, "PARTIAL": 1}
    assert frame.tiers["pro"].cost_micro_usd == 250
    assert frame.tiers["free"].cost_micro_usd == 50
    assert frame.latency["time_to_first_token"] == (300.0, 500.0)
    assert frame.latency["total"] == (900.0, 1500.0)
    text = render(frame, settings.topic_prefix)
    assert "throughput   0.03 results/s (2 in the window)" in text
    assert "in flight    1" in text
    assert "ttft client  p50 300 ms  p99 500 ms" in text
    assert "all                 2        80        24    0.000300" in text


def test_top_once_command(
    settings: KafkaSettings, group_id: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    now = int(time.time() * 1000)
    w = Writer(settings)
    rid = str(ULID())
    w.record("tokens", "TokenEvent", token(rid, 0, "STARTED"), now - 1_000)
    w.record("results", "SummaryResult", result(rid, now - 500, tier="enterprise"), now - 500)
    w.flush()
    monkeypatch.setenv("SUMSTREAM_TOPIC_PREFIX", settings.topic_prefix)
    monkeypatch.setenv("SUMSTREAM_BOOTSTRAP_SERVERS", settings.bootstrap_servers)
    assert cli.main(["top", "--once", "--group", group_id]) == 0
    frame = capsys.readouterr().out
    assert f"topics {settings.topic_prefix}*" in frame
    assert "in flight    0" in frame
    assert "enterprise          1        40        12    0.000100" in frame


async def test_top_follows_new_results_live(settings: KafkaSettings, group_id: str) -> None:
    out = io.StringIO()
    view = asyncio.create_task(
        watch(settings, window_s=60, interval_s=0.2, group=group_id, out=out)
    )
    try:
        deadline = time.monotonic() + 30
        while "0 in the window" not in out.getvalue():
            assert time.monotonic() < deadline and not view.done(), out.getvalue()
            await asyncio.sleep(0.1)
        w = Writer(settings)
        now = int(time.time() * 1000)
        rid = str(ULID())
        w.record("tokens", "TokenEvent", token(rid, 0, "STARTED"), now)
        w.record("results", "SummaryResult", result(rid, now + 1, cost=77), now + 1)
        w.flush()
        while "1 in the window" not in out.getvalue():
            assert time.monotonic() < deadline and not view.done(), out.getvalue()
            await asyncio.sleep(0.1)
    finally:
        view.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await view
    last = out.getvalue().rsplit("sumstream top", 1)[1]
    assert "in flight    0" in last
    assert "pro                 1        40        12    0.000077" in last
    assert "\x1b[" not in out.getvalue()  # not a terminal: frames are appended, not redrawn
