from __future__ import annotations

from pipeline.core import events
from pipeline.core.codec import codec
from pipeline.core.events import StreamMeta

JOB: dict[str, object] = {
    "request_id": "r1",
    "user_id": "carol",
    "tier": "pro",
    "model": "claude-haiku-4-5",
    "created_at": 7,
    "source": "replay",
    "replay_of": "r0",
    "degraded": "extractive",
}


def test_stream_meta_carries_every_per_stream_field_of_the_job() -> None:
    meta = StreamMeta.of(JOB)
    assert meta == StreamMeta(
        "r1", "carol", "pro", "claude-haiku-4-5", 7, "replay", "r0", "extractive"
    )


def test_stream_meta_of_a_bare_record_defaults_to_an_external_source() -> None:
    meta = StreamMeta.of({"request_id": "r"})
    assert (meta.user_id, meta.source, meta.replay_of, meta.degraded) == (
        "",
        "external",
        None,
        None,
    )


def test_every_builder_makes_a_valid_token_event_with_the_stream_metadata() -> None:
    meta = StreamMeta.of(JOB)
    usage = events.usage(input_tokens=3, output_tokens=2, attempts=1)
    built = [
        events.started(meta, seq=1, attempt=1, trace={"inference_start": 5}),
        events.terminal(meta, "DONE", seq=3, attempt=1, usage=usage, stop_reason="end_turn"),
        events.terminal(
            meta,
            "ERROR",
            seq=3,
            attempt=2,
            usage=None,
            error=events.error_info("e", "m", retriable=True, partial=False),
        ),
    ]
    for event in built:
        assert codec().decode_as(codec().encode("TokenEvent", event), "TokenEvent") == event
        assert (event["source"], event["replay_of"], event["degraded"]) == (
            "replay",
            "r0",
            "extractive",
        )
    assert [e["kind"] for e in built] == ["STARTED", "DONE", "ERROR"]
    assert built[1]["usage"] == usage and built[1]["stop_reason"] == "end_turn"
    assert built[2]["error"] == {"code": "e", "message": "m", "retriable": True, "partial": False}


def test_a_terminal_event_copies_its_trace() -> None:
    trace = {"received": 1}
    event = events.terminal(
        StreamMeta.of(JOB), "CANCELLED", seq=1, attempt=0, usage=None, trace=trace
    )
    trace["later"] = 2
    assert event["trace"] == {"received": 1}


def test_a_delta_carries_its_range_and_text_and_leaves_the_metadata_at_the_defaults() -> None:
    event = events.delta("r1", first_seq=4, pieces=["The", " cat", "", " sat"], attempt=2)
    assert codec().decode_as(codec().encode("TokenEvent", event), "TokenEvent") == event
    assert (event["first_seq"], event["seq"], event["text"], event["cuts"]) == (
        4,
        7,
        "The cat sat",
        [3, 7, 7],
    )
    assert (event["user_id"], event["tier"], event["model"], event["created_at"]) == ("", "", "", 0)
    assert (event["source"], event["trace"], event["attempt"]) == ("external", {}, 2)
    assert events.pieces(event) == [(4, "The"), (5, " cat"), (6, ""), (7, " sat")]
    assert [events.text_after(event, n) for n in range(2, 9)] == [
        "The cat sat",
        "The cat sat",
        " cat sat",
        " sat",
        " sat",
        "",
        "",
    ]


def test_a_one_seq_delta_is_written_as_an_old_single_delta() -> None:
    event = events.delta("r1", first_seq=3, pieces=["Hi"], attempt=1)
    assert (event["seq"], event["first_seq"], event["cuts"]) == (3, 0, [])
    assert events.first_seq(event) == 3 and events.pieces(event) == [(3, "Hi")]


def test_range_error_names_cuts_that_do_not_fit_the_range_or_the_text() -> None:
    good = events.delta("r1", first_seq=1, pieces=["a", "b"], attempt=1)
    assert events.range_error(good) is None
    assert events.range_error({**good, "cuts": []}) == "0 cuts for 2 seqs"
    assert events.range_error({**good, "cuts": [5]}) is not None
    assert events.range_error({**good, "first_seq": 3}) is not None
    started = events.started(StreamMeta.of(JOB), seq=1, attempt=1, trace={})
    assert events.range_error({**started, "first_seq": 1}) is not None
