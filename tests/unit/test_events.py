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
        events.delta(meta, seq=2, attempt=1, text="Hi"),
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
        codec().encode("TokenEvent", event)
        assert (event["source"], event["replay_of"], event["degraded"]) == (
            "replay",
            "r0",
            "extractive",
        )
    assert [e["kind"] for e in built] == ["STARTED", "DELTA", "DONE", "ERROR"]
    assert built[1]["text"] == "Hi" and built[1]["usage"] is None
    assert built[2]["usage"] == usage and built[2]["stop_reason"] == "end_turn"
    assert built[3]["error"] == {"code": "e", "message": "m", "retriable": True, "partial": False}


def test_a_terminal_event_copies_its_trace() -> None:
    trace = {"received": 1}
    event = events.terminal(
        StreamMeta.of(JOB), "CANCELLED", seq=1, attempt=0, usage=None, trace=trace
    )
    trace["later"] = 2
    assert event["trace"] == {"received": 1}
