"""Replay on a running pipeline: history, reruns that produce new results, the audit export."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pipeline.core.codec import codec
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.admin import create_topics
from pipeline.kafka.connection import ConnectionConfig
from pipeline.ops.audit import export
from pipeline.ops.history import request_history, scan
from pipeline.ops.reinject import rerun
from pipeline.ops.submit import build_request, produce_request
from pipeline.ops.timeline import history_lines
from pipeline.ops.top import Frame, snapshot
from tests.e2e.documents import document
from tests.harness import BOOTSTRAP, Stack, eventually_async

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A simulator and one worker on topics created up front (no gateway creates them here)."""
    s = Stack(tmp_path_factory.mktemp("replay"))
    create_topics(s.settings)
    try:
        s.start_simulator()
        s.start_worker()
        yield s
    finally:
        s.stop()
        s.remove_topics()


async def results_of(
    settings: KafkaSettings, since_ms: int, count: int, timeout_s: float = 90.0
) -> dict[str, dict[str, Any]]:
    """The results stamped since ``since_ms``, once there are ``count`` of them."""
    topic = TopicNames.from_settings(settings).results

    async def all_there() -> dict[str, dict[str, Any]] | None:
        found = {
            rec["request_id"]: rec
            for rec in [
                codec().decode_as(r.value, "SummaryResult")
                async for r in scan(
                    ConnectionConfig.from_settings(settings), [topic], since_ms=since_ms
                )
            ]
        }
        return found if len(found) >= count else None

    return await eventually_async(
        all_there, timeout=timeout_s, interval=0.5, message=f"{count} results"
    )


@dataclass
class Replayed:
    settings: KafkaSettings
    start_ms: int
    originals: list[dict[str, Any]]
    first: dict[str, dict[str, Any]]  # request id -> result, before the rerun
    mapping: dict[str, str]  # original id -> replay id
    results: dict[str, dict[str, Any]]  # every result after the rerun


@pytest.fixture(scope="module")
def replayed(stack: Stack) -> Replayed:
    """Three requests run to completion, then re-run once with `replay rerun`."""

    async def go() -> Replayed:
        settings = KafkaSettings(topic_prefix=stack.prefix, bootstrap_servers=BOOTSTRAP)
        start = int(time.time() * 1000) - 1_000
        originals = [
            build_request(document(700 + i), user=f"user-{i}", tier="pro", max_output_tokens=40)
            for i in range(3)
        ]
        for request in originals:
            produce_request(settings, request)
        first = await results_of(settings, start, 3)
        assert set(first) == {r["request_id"] for r in originals}, stack.logs()
        report = await rerun(settings, start, int(time.time() * 1000))
        assert set(report.mapping) == set(first) and not report.failed
        results = await results_of(settings, start, 6)
        assert len(results) == 6, stack.logs()
        return Replayed(settings, start, originals, first, report.mapping, results)

    return asyncio.run(go())


async def test_history_lists_a_completed_requests_records_topic_by_topic_in_order(
    replayed: Replayed,
) -> None:
    settings = replayed.settings
    records = await request_history(settings, replayed.originals[0]["request_id"])
    topics = [r.topic.removeprefix(settings.topic_prefix) for r in records]
    assert topics[:2] == ["requests", "preprocessed"]
    assert topics[-1] == "results"
    assert set(topics[2:-1]) == {"tokens"}
    kinds = [rec["kind"] for _, rec in (r.decode() for r in records[2:-1])]
    assert kinds[0] == "STARTED" and kinds[-1] == "DONE" and "DELTA" in kinds
    assert len(list(history_lines(records, settings))) == len(records)


def test_rerun_produces_new_results_for_the_same_documents(replayed: Replayed) -> None:
    assert all(r["status"] == "COMPLETED" for r in replayed.first.values())
    for old, new in replayed.mapping.items():
        assert new != old
        assert replayed.results[old] == replayed.first[old]  # the original is untouched
        assert replayed.results[new]["status"] == "COMPLETED"
        assert replayed.results[new]["summary"] == replayed.first[old]["summary"]
        assert replayed.results[new]["user_id"] == replayed.first[old]["user_id"]


def test_results_of_replays_name_their_original(replayed: Replayed) -> None:
    # SummaryResult.source/replay_of must carry the request's
    # (docs/architecture.md, "Replay and audit").
    for old, new in replayed.mapping.items():
        assert replayed.results[new]["replay_of"] == old
        assert replayed.results[new]["source"] == "replay"


async def test_export_and_top_agree_with_the_results(replayed: Replayed, stack: Stack) -> None:
    settings = replayed.settings
    out = io.StringIO()
    audit = await export(settings, replayed.start_ms, int(time.time() * 1000) + 1_000, out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert audit.rows == len(rows) == 6
    total = sum(r["usage"]["cost_micro_usd"] for r in replayed.results.values())
    assert audit.cost_micro_usd == sum(row["cost_micro_usd"] for row in rows) == total > 0
    assert {row["request_id"] for row in rows} == set(replayed.results)

    # `top` sees the same figures; lag drains to zero once the worker has committed.
    async def drained() -> Frame | None:
        frame = await snapshot(settings, window_s=300, group=stack.app_id)
        return frame if frame.lag and sum(frame.lag.values()) == 0 else None

    frame = await eventually_async(drained, timeout=30, interval=0.5, message="lag drained")
    assert frame.results == 6 and frame.in_flight == 0
    assert sum(t.cost_micro_usd for t in frame.tiers.values()) == total
    assert frame.lag == {"preprocess": 0, "inference": 0, "postprocess": 0}
