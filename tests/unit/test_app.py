from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.codec import codec
from pipeline.core.errors import ValidationError
from pipeline.core.jsonlog import JsonFormatter
from pipeline.core.settings import WorkerSettings
from pipeline.worker.agents import process as _process
from pipeline.worker.app import create_app
from pipeline.worker.dlq import DeadLetterQueue
from pipeline.worker.inflight import Entry, EntryState
from pipeline.worker.jobs import cancelled_event, invalid_job_event, resume_state, validate_job

JOB = {
    "request_id": "01J0000000000000000000000D",
    "user_id": "carol",
    "tier": "enterprise",
    "model": "claude-haiku-4-5",
    "system": "s",
    "prompt": "<document>x</document>",
    "chunks": [],
    "max_output_tokens": 10,
    "input_tokens_estimate": 5,
    "truncated": False,
    "weight": 16,
    "deadline_ms": 2,
    "degraded": None,
    "created_at": 1,
    "trace": {"received": 1},
}


@given(st.sampled_from(EntryState), st.integers(0, 2**62), st.binary(max_size=64))
def test_entry_round_trip(state: EntryState, at_ms: int, job: bytes) -> None:
    entry = Entry(state, at_ms, job)
    assert Entry.decode(entry.encode()) == entry


def delta(seq: int, text: str, **kw: object) -> dict[str, object]:
    return {
        "seq": seq,
        "kind": "DELTA",
        "text": text,
        "attempt": 1,
        "usage": None,
        "trace": {},
        **kw,
    }


def test_resume_state_from_the_streamed_events() -> None:
    events = [
        {"seq": 1, "kind": "STARTED", "text": "", "attempt": 1, "trace": {"inference_start": 5}},
        delta(3, " world"),
        delta(2, "Hello"),
        delta(4, "!", attempt=2),
    ]
    state = resume_state(events)
    assert state is not None
    assert state.text == "Hello world!"
    assert state.last_seq == 4
    assert state.attempts == 2
    assert state.input_tokens == 0
    assert state.output_tokens == 3  # no usage record: one per delta
    assert state.trace == {"inference_start": 5}


def test_resume_state_bills_the_input_an_attempts_first_delta_reported() -> None:
    # The usage on an attempt's first DELTA: every attempt's input so far, output before it.
    usage = {"input_tokens": 40, "output_tokens": 1, "attempts": 3, "cost_micro_usd": 0}
    state = resume_state([delta(1, "a"), delta(2, "b", usage=usage), delta(3, "c")])
    assert state is not None
    # Input as reported; output is what was streamed, a token a seq, the last attempt's too.
    assert (state.input_tokens, state.output_tokens, state.attempts) == (40, 3, 3)


def test_resume_state_takes_a_terminal_events_usage_whole() -> None:
    usage = {"input_tokens": 40, "output_tokens": 9, "attempts": 3, "cost_micro_usd": 0}
    ended = {"seq": 3, "kind": "DONE", "text": "", "attempt": 3, "usage": usage}
    state = resume_state([delta(1, "a"), delta(2, "b"), ended])
    assert state is not None
    assert (state.input_tokens, state.output_tokens, state.attempts) == (40, 9, 3)


def test_nothing_streamed_means_a_fresh_start() -> None:
    assert resume_state([]) is None


def test_cancelled_event_for_a_job_that_never_ran() -> None:
    event = cancelled_event(JOB, seq=1, reason="client", state=None)
    assert (event["seq"], event["kind"]) == (1, "CANCELLED")
    assert event["usage"]["attempts"] == 0
    assert event["tier"] == "enterprise" and event["trace"] == {"received": 1}
    codec().encode("TokenEvent", event)


def test_invalid_job_event_needs_only_an_id() -> None:
    event = invalid_job_event({"request_id": "r"}, "bad")
    assert event["kind"] == "ERROR" and event["error"]["code"] == "invalid_request"
    codec().encode("TokenEvent", event)


def test_events_for_jobs_the_engine_never_runs_keep_source_replay_of_and_degraded() -> None:
    replayed = {**JOB, "source": "replay", "replay_of": "01J0000000000000000000000C"}
    replayed["degraded"] = "extractive"
    state = resume_state([delta(1, "a")])
    for event in (
        cancelled_event(replayed, seq=2, reason="client", state=state),
        invalid_job_event(replayed, "bad"),
    ):
        assert (event["source"], event["replay_of"], event["degraded"]) == (
            "replay",
            "01J0000000000000000000000C",
            "extractive",
        )
        codec().encode("TokenEvent", event)


@pytest.mark.parametrize(
    ("field", "value"),
    [("request_id", ""), ("prompt", " "), ("max_output_tokens", 0), ("model", "")],
)
def test_validate_job(field: str, value: object) -> None:
    validate_job(JOB)
    with pytest.raises(ValidationError):
        validate_job({**JOB, field: value})


def test_create_app_registers_the_chosen_stages(tmp_path: Path) -> None:
    settings = WorkerSettings(app_id="unit-app", topic_prefix="u.", data_dir=tmp_path)
    app = create_app(settings, ["preprocess", "postprocess"])
    names = {agent.name for agent in app.agents.values()}
    assert names == {"preprocess", "postprocess"}
    assert {t for agent in app.agents.values() for t in agent.channel.topics} == {
        "u.requests",
        "u.tokens",
    }
    assert app.conf.stream_wait_empty is False
    assert app.conf.producer_acks == -1
    assert app.conf.web_enabled is False
    # The in-flight table exists only with inference; request ids and sessions only with
    # preprocess.
    assert set(app.tables.data) == {"request-ids", "sessions"}
    with pytest.raises(ValueError, match="stages"):
        create_app(settings, ["preprocess", "transcode"])
    with pytest.raises(ValueError, match="stages"):
        create_app(settings, [])


def test_json_log_lines_carry_extras() -> None:
    record = logging.LogRecord("sumstream.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.request_id = "01J"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "hello you"
    assert line["request_id"] == "01J"
    assert line["level"] == "info" and line["logger"] == "sumstream.x"


class FakeMessage:
    key = b"k"
    value = b"v"
    topic = "t.preprocessed"
    partition = 2
    offset = 9
    timestamp = 1.5


class FakeEvent:
    message = FakeMessage()


async def test_a_failing_record_is_retried_then_dead_lettered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pipeline.worker.agents.PROCESS_BACKOFF_S", 0.0)
    letters: list[bytes] = []

    async def send(key: bytes | None, value: bytes) -> None:
        letters.append(value)

    dlq = DeadLetterQueue(send)
    calls = 0

    async def flaky(event: object) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("broker hiccup")

    await _process("inference", flaky, FakeEvent(), dlq)  # type: ignore[arg-type]
    assert calls == 3 and letters == []

    async def broken(event: object) -> None:
        raise KeyError("bug")

    await _process("inference", broken, FakeEvent(), dlq)  # type: ignore[arg-type]
    [raw] = letters
    letter = codec().decode_as(raw, "DeadLetter")
    assert letter["error_type"] == "KeyError" and letter["stage"] == "inference"
    assert (letter["origin_topic"], letter["origin_partition"], letter["origin_offset"]) == (
        "t.preprocessed",
        2,
        9,
    )
    assert (letter["key"], letter["value"]) == (b"k", b"v")
