"""InferenceJob values the inference stage handles outside the engine: validating a job, the
terminal events for jobs the engine never runs, and where a resumed stream picks up."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

from pipeline.core import events
from pipeline.core.errors import ValidationError
from pipeline.core.events import StreamMeta
from pipeline.core.records import ControlEvent, InferenceJob, TokenEvent, Trace, Usage
from pipeline.worker.inference.engine import ResumeState

OUTSIDE_SEQS = frozenset({"PROGRESS", "USAGE"})


def resume_state(stream: Iterable[TokenEvent]) -> ResumeState | None:
    """What the engine needs to continue a stream from the events already in `tokens`.

    None when nothing was streamed yet (the job simply starts again, seq 1).
    """
    # PROGRESS and USAGE events (seq 0) are outside the seq stream; a USAGE event is billed by
    # postprocess, on top of what the stream's last usage says.
    by_seq = {int(e["seq"]): e for e in stream if e["kind"] not in OUTSIDE_SEQS}
    if not by_seq:
        return None
    ordered = [by_seq[s] for s in sorted(by_seq)]
    # A DELTA may cover a range of seqs; a redelivered one counts once.
    texts = events.delta_texts(ordered)
    # The last usage out: an attempt's first DELTA carries the run's input so far (every
    # attempt's, the one streaming included); its output is what was streamed, a token a seq.
    last = next((e for e in reversed(ordered) if e.get("usage")), None)
    usage: Usage | None = last["usage"] if last else None
    streamed_output = last is None or last["kind"] == "DELTA"
    trace: Trace = {}
    for event in ordered:
        trace.update(event.get("trace") or {})
    return ResumeState(
        text="".join(texts[s] for s in sorted(texts)),
        last_seq=ordered[-1]["seq"],
        attempts=max(
            usage["attempts"] if usage else 0, max(int(e.get("attempt") or 0) for e in ordered)
        ),
        input_tokens=usage["input_tokens"] if usage else 0,
        cache_creation_input_tokens=int(usage.get("cache_creation_input_tokens") or 0)
        if usage
        else 0,
        cache_read_input_tokens=int(usage.get("cache_read_input_tokens") or 0) if usage else 0,
        # Without a terminal's usage, count a token per streamed seq (what the client saw).
        output_tokens=len(texts)
        if streamed_output or not usage
        else usage["output_tokens"] or len(texts),
        trace=trace,
    )


def cancelled_event(
    job: Mapping[str, object], *, seq: int, reason: str, state: ResumeState | None
) -> TokenEvent:
    """A CANCELLED TokenEvent for a job the engine is not running (cancelled while waiting)."""
    attempts = state.attempts if state else 0
    return events.terminal(
        StreamMeta.of(job),
        "CANCELLED",
        seq=seq,
        attempt=attempts,
        usage=events.usage(
            input_tokens=state.input_tokens if state else 0,
            output_tokens=state.output_tokens if state else 0,
            attempts=attempts,
        ),
        error=events.error_info("cancelled", reason, retriable=False, partial=False),
        trace=_trace(job),
    )


def invalid_job_event(job: Mapping[str, object], message: str) -> TokenEvent:
    """A terminal ERROR for a job record whose values cannot run (its client still gets an end)."""
    return events.terminal(
        StreamMeta.of(job),
        "ERROR",
        seq=1,
        attempt=0,
        usage=None,
        error=events.error_info("invalid_request", message, retriable=False, partial=False),
        trace=_trace(job),
    )


def validate_job(record: Mapping[str, object]) -> InferenceJob:
    """The decoded record as an InferenceJob; ``ValidationError`` if it cannot be run."""
    if not str(record.get("request_id") or "").strip():
        raise ValidationError("request_id is empty")
    if not str(record.get("prompt") or "").strip():
        raise ValidationError("prompt is empty")
    tokens = record.get("max_output_tokens")
    if not isinstance(tokens, int) or tokens < 1:
        raise ValidationError("max_output_tokens must be at least 1")
    if not record.get("model"):
        raise ValidationError("model is empty")
    # The codec checked every field's type against the schema; the values are checked above.
    return cast(InferenceJob, record)


def validate_control(record: Mapping[str, object]) -> ControlEvent:
    """The decoded record as a ControlEvent; ``ValidationError`` if it names no request."""
    if not str(record.get("request_id") or "").strip():
        raise ValidationError("request_id is empty")
    return cast(ControlEvent, record)


def _trace(job: Mapping[str, object]) -> Trace:
    trace = job.get("trace")
    return dict(cast(Trace, trace)) if isinstance(trace, dict) else {}
