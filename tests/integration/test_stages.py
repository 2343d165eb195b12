"""The three stages on the real broker: `sumstream worker` subprocesses against the simulator.

Requests are produced with confluent-kafka, as another system would; results, tokens and dead
letters are read back from the topics. Each stack has its own topic prefix and Faust app id.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ulid import ULID

from pipeline.core import events as token_events
from pipeline.core.codec import codec
from pipeline.core.partitioning import partition_for
from pipeline.core.results import LATENCY_SPANS
from pipeline.core.settings import KafkaSettings
from pipeline.kafka.admin import create_topics
from pipeline.llm.extractive import summarize
from tests.harness import (
    Proc,
    Record,
    Stack,
    produce_raw,
    read_topic,
    signed,
    wait_for_balanced_group,
)

pytestmark = pytest.mark.integration

DOCUMENT = (
    "The city council approved a new budget for public libraries on Monday. "
    "The plan adds evening hours at six branches and funds a mobile library for rural areas. "
    "Librarians said demand for study space has doubled since last year. "
    "The budget also replaces aging computers and expands the digital lending collection. "
    "Some council members questioned the cost of the mobile library. "
    "Supporters argued that rural residents currently travel over an hour to borrow books. "
    "The new hours start in September, and the mobile library will launch next spring. "
    "A public meeting on the plan is scheduled for the end of the month."
)


@dataclass
class StageStack(Stack):
    """A simulator plus workers; requests go in and results come out through the topics."""

    prefix: str = field(default_factory=lambda: f"t-{uuid.uuid4().hex[:8]}.")
    app_id: str = field(default_factory=lambda: f"it-{uuid.uuid4().hex[:8]}")

    def start_stage_worker(self, name: str) -> Proc:
        proc = self.start_worker(name=name)
        proc.wait_for_log("inflight partitions assigned", timeout=90)
        return proc

    # --- Kafka I/O as another system would do it -------------------------------------------

    def produce(self, topic: str, key: bytes | None, value: bytes | None) -> tuple[int, int]:
        """Produce one record, unsigned; return its (partition, offset)."""
        return produce_raw(self.bootstrap, topic, key, value)

    def submit(self, document: str = DOCUMENT, request_id: str | None = None, **fields: Any) -> str:
        request_id = request_id or str(ULID())
        record = {
            "request_id": request_id,
            "user_id": "ext-user",
            "tier": "pro",
            "document": document,
            "created_at": int(time.time() * 1000),
            "source": "external",
            **fields,
        }
        value = codec().encode("SummarizeRequest", record)
        produce_raw(
            self.bootstrap, self.topics.requests, request_id.encode(), value, headers=signed(value)
        )
        return request_id

    def read(
        self, topic: str, until: Callable[[list[Record]], bool], timeout_s: float = 30.0
    ) -> list[Record]:
        """Every record of ``topic`` until ``until`` holds."""
        return read_topic(self.bootstrap, topic, until, timeout=timeout_s)

    def result(self, request_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        key = request_id.encode()
        records = self.read(
            self.topics.results, lambda rs: any(r.key == key for r in rs), timeout_s
        )
        return codec().decode_as(next(r.value for r in records if r.key == key), "SummaryResult")

    def tokens(self, request_id: str) -> list[dict[str, Any]]:
        key = request_id.encode()

        def ended(rs: list[Record]) -> bool:
            return any(
                r.key == key
                and codec().decode_as(r.value, "TokenEvent")["kind"]
                in {"DONE", "ERROR", "CANCELLED"}
                for r in rs
            )

        return [
            codec().decode_as(r.value, "TokenEvent")
            for r in self.read(self.topics.tokens, ended)
            if r.key == key
        ]


@contextlib.contextmanager
def stack_at(tmp: Path, bootstrap: str) -> Iterator[StageStack]:
    env = {"SUMSTREAM_DATA_DIR": str(tmp / "data"), "SUMSTREAM_SESSION_TIMEOUT_S": "6"}
    stack = StageStack(tmp, bootstrap=bootstrap, extra_env=env)
    create_topics(stack.settings)
    try:
        stack.start_simulator(ttft_ms=5, token_delay_ms=2)
        yield stack
    finally:
        stack.stop()
        stack.remove_topics()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, bootstrap: str) -> Iterator[StageStack]:
    with stack_at(tmp_path_factory.mktemp("stages"), bootstrap) as s:
        s.start_stage_worker("worker")
        yield s


def test_a_request_from_another_system_completes(stack: StageStack) -> None:
    request_id = stack.submit(max_output_tokens=40)
    result = stack.result(request_id)
    expected = summarize(DOCUMENT, 40).strip()
    assert result["status"] == "COMPLETED", result
    assert result["summary"] == expected
    assert result["user_id"] == "ext-user" and result["tier"] == "pro"
    usage = result["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["attempts"] == 1
    assert usage["cost_micro_usd"] > 0
    assert set(result["latency_ms"]) == set(LATENCY_SPANS), result["latency_ms"]
    assert result["completed_at"] >= result["created_at"]

    events = stack.tokens(request_id)
    # A DELTA may cover several seqs: together the records cover 1..last without a gap.
    seqs = [s for e in events for s in range(token_events.first_seq(e), e["seq"] + 1)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert events[0]["kind"] == "STARTED" and events[-1]["kind"] == "DONE"
    assert "".join(e["text"] for e in events if e["kind"] == "DELTA").strip() == expected
    assert result["last_seq"] == events[-1]["seq"]


def test_a_replayed_job_of_a_finished_request_is_not_run_again(stack: StageStack) -> None:
    request_id = stack.submit(max_output_tokens=20)
    assert stack.result(request_id)["status"] == "COMPLETED"
    before = stack.tokens(request_id)
    # A new consumer group reads `preprocessed` from the start with an empty in-flight table,
    # as after an offset reset: every job there is a replay of one that already ran.
    replayer = stack.spawn(
        "worker-replay", ["worker", "--stages", "inference", "--metrics-port", "-1"],
        SUMSTREAM_APP_ID=f"{stack.app_id}-replay",
    )  # fmt: skip
    try:
        replayer.wait_for_log("request already ended; not run again", request_id=request_id)
    finally:
        replayer.stop()
    assert stack.tokens(request_id) == before


def test_oversized_input_on_a_rejecting_tier_ends_with_a_rejected_result(stack: StageStack) -> None:
    # fay's key is on the free tier (tests/harness/procs.py), which rejects oversized input.
    request_id = stack.submit(document="word " * 9_000, user_id="fay")
    result = stack.result(request_id)
    assert result["status"] == "REJECTED"
    assert result["error"]["code"] == "input_too_large"
    assert result["usage"]["cost_micro_usd"] == 0
    [event] = stack.tokens(request_id)
    assert (event["seq"], event["kind"]) == (1, "ERROR")


def test_poison_records_go_to_the_dead_letter_topic_and_every_stage_goes_on(
    stack: Stack,
) -> None:
    topics = stack.topics
    unknown = b"\xc3\x01" + bytes(range(8)) + b"\x02\x04"
    invalid_job_id = str(ULID())
    invalid = {
        topics.requests: codec().encode(
            "SummarizeRequest",
            {"request_id": "", "user_id": "", "document": "x", "created_at": 1},
        ),
        topics.preprocessed: codec().encode(
            "InferenceJob",
            {
                "request_id": invalid_job_id,
                "user_id": "u",
                "tier": "pro",
                "model": "claude-haiku-4-5",
                "prompt": "<document>x</document>",
                "max_output_tokens": 0,
                "deadline_ms": 1,
                "created_at": 1,
            },
        ),
        topics.tokens: codec().encode(
            "TokenEvent", {"request_id": "01J0000000000000000000000Z", "seq": 0, "kind": "DELTA"}
        ),
    }
    stages = {
        topics.requests: "preprocess",
        topics.preprocessed: "inference",
        topics.tokens: "postprocess",
    }
    produced: dict[tuple[str, int, int], tuple[bytes, str]] = {}
    for topic in stages:
        for value, error_type in [
            (b"not avro at all", "undecodable_record"),
            (unknown, "unknown_schema"),
            (invalid[topic], "invalid_record"),
        ]:
            key = invalid_job_id.encode() if topic == topics.preprocessed else b"poison"
            partition, offset = stack.produce(topic, key, value)
            produced[(topic, partition, offset)] = (value, error_type)

    # A valid request after the poison still goes through every stage.
    request_id = stack.submit(max_output_tokens=30)
    assert stack.result(request_id)["status"] == "COMPLETED"

    letters = [
        codec().decode_as(r.value, "DeadLetter")
        for r in stack.read(topics.dlq, lambda rs: len(rs) >= len(produced))
    ]
    found = {(d["origin_topic"], d["origin_partition"], d["origin_offset"]): d for d in letters}
    assert set(found) == set(produced)
    for where, (value, error_type) in produced.items():
        letter = found[where]
        assert letter["value"] == value
        assert letter["error_type"] == error_type, letter
        assert letter["stage"] == stages[where[0]]
        assert letter["error"]
        assert letter["created_at"] > 0

    # The invalid job still ends for its client.
    rejected = stack.result(invalid_job_id)
    assert rejected["status"] == "REJECTED"
    assert rejected["error"]["code"] == "invalid_request"


def test_a_cancel_on_the_control_topic_ends_the_stream(stack: StageStack) -> None:
    stack.sim_config(token_delay_ms=100)
    try:
        request_id = stack.submit(max_output_tokens=60)
        key = request_id.encode()
        stack.read(
            stack.topics.tokens,
            lambda rs: (
                sum(
                    r.key == key and codec().decode_as(r.value, "TokenEvent")["kind"] == "DELTA"
                    for r in rs
                )
                >= 2
            ),
        )
        cancel = {
            "request_id": request_id,
            "action": "CANCEL",
            "reason": "client",
            "user_id": "ext-user",
            "created_at": int(time.time() * 1000),
        }
        stack.produce(stack.topics.control, key, codec().encode("ControlEvent", cancel))
        result = stack.result(request_id)
    finally:
        stack.sim_config(token_delay_ms=2)
    assert result["status"] == "CANCELLED"
    assert 0 < len(result["summary"]) < len(summarize(DOCUMENT, 60))
    assert result["usage"]["output_tokens"] > 0
    assert stack.tokens(request_id)[-1]["kind"] == "CANCELLED"


def test_a_cancel_that_arrives_before_the_job_ends_it_without_a_model_call(
    stack: Stack,
) -> None:
    request_id = str(ULID())
    cancel = {"request_id": request_id, "action": "CANCEL", "created_at": 1}
    stack.produce(stack.topics.control, request_id.encode(), codec().encode("ControlEvent", cancel))
    # `control` and `requests` are different topics with no order between them: the job is
    # sent once the worker has recorded the cancel.
    stack.workers[0].wait_for_log(
        "cancel recorded for a job not running here", request_id=request_id
    )
    stack.submit(request_id=request_id)
    result = stack.result(request_id)
    assert result["status"] == "CANCELLED"
    assert result["usage"]["attempts"] == 0 and result["summary"] == ""


LONG_DOCUMENT = " ".join(
    f"Station {i} on the northern line reported {10 + i} delays in {month}, "
    f"mostly caused by signal faults and crowding at peak hours."
    for i, month in enumerate(["March", "April", "May", "June", "July"] * 4)
)


def ids_for_every_partition(partitions: int) -> list[str]:
    """Request ids that hash to each partition once, so every worker holds some jobs."""
    found: dict[int, str] = {}
    while len(found) < partitions:
        request_id = str(ULID())
        found.setdefault(partition_for(request_id, partitions), request_id)
    return [found[p] for p in range(partitions)]


def test_a_killed_worker_loses_nothing_repeats_no_token_and_the_survivors_jobs_go_on(
    tmp_path: Path, bootstrap: str
) -> None:
    with stack_at(tmp_path, bootstrap) as stack:
        stack.sim_config(token_delay_ms=150)
        a = stack.start_worker(name="worker-a")
        b = stack.start_worker(name="worker-b")
        partitions = KafkaSettings().work_partitions
        # The second join causes a rebalance: wait until it is over and each holds its share.
        wait_for_balanced_group([a, b], partitions)
        ids = ids_for_every_partition(partitions)
        for request_id in ids:
            stack.submit(document=LONG_DOCUMENT, request_id=request_id, max_output_tokens=80)
        keys = {i.encode() for i in ids}
        # Every stream is under way (STARTED + 2 deltas each), then worker a dies: after its
        # session times out, b is assigned a's partitions and their jobs resume from `tokens`;
        # b's own jobs go on through the rebalance with their upstream calls.
        stack.read(
            stack.topics.tokens,
            lambda rs: all(sum(r.key == k for r in rs) >= 3 for k in keys),
        )
        victims = a.owned_partitions()
        a.kill9()
        results = {i: stack.result(i, timeout_s=90) for i in ids}
        events = {i: stack.tokens(i) for i in ids}
        resumed = len(b.logged("resuming request"))

    expected = summarize(LONG_DOCUMENT, 80).strip()
    moved = [i for i in ids if partition_for(i, partitions) in victims]
    assert moved and len(moved) < len(ids)
    assert resumed >= len(moved), "every job of the killed worker went through a resume"
    for request_id in ids:
        result, stream = results[request_id], events[request_id]
        assert result["status"] == "COMPLETED", result
        assert result["summary"] == expected
        seqs = [s for e in stream for s in range(token_events.first_seq(e), e["seq"] + 1)]
        assert seqs == list(range(1, len(seqs) + 1)), "no seq duplicated or skipped"
        assert [e["kind"] for e in stream].count("STARTED") == 1
        assert [e["kind"] for e in stream].count("DONE") == 1
        assert "".join(e["text"] for e in stream if e["kind"] == "DELTA").strip() == expected
        if request_id in moved:
            assert result["usage"]["attempts"] >= 2  # the first attempt and the resumed one
        else:
            assert result["usage"]["attempts"] == 1  # kept running through the rebalance
