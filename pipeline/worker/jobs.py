"""InferenceJob values the inference stage handles outside the engine: validating a job, the
terminal events for jobs the engine never runs, and where a resumed stream picks up."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.core.errors import ValidationError
from pipeline.worker.inference.engine import ResumeState


def resume_state(events: Iterable[dict[str, Any]]) -> ResumeState | None:
    """What the engine needs to continue a stream from the events already in `tokens`.

    None when nothing was streamed yet (the job simply starts again, seq 1).
    """
    by_seq = {int(e["seq"]): e for e in events}
    if not by_seq:
        return None
    ordered = [by_seq[s] for s in sorted(by_seq)]
    deltas = [e for e in ordered if e.get("kind") == "DELTA"]
    usage = next((e["usage"] for e in reversed(ordered) if e.get("usage")), None) or {}
    trace: dict[str, int] = {}
    for event in ordered:
        trace.update(event.get("trace") or {})
    return ResumeState(
        text="".join(e.get("text") or "" for e in deltas),
        last_seq=ordered[-1]["seq"],
        attempts=max(
            int(usage.get("attempts") or 0), max(int(e.get("attempt") or 0) for e in ordered)
        ),
        input_tokens=int(usage.get("input_tokens") or 0),
        # Without a usage record, count a token per streamed delta (what the client saw).
        output_tokens=int(usage.get("output_tokens") or len(deltas)),
        trace=trace,
    )


def cancelled_event(
    job: dict[str, Any], *, seq: int, reason: str, state: ResumeState | None
) -> dict[str, Any]:
    """A CANCELLED TokenEvent for a job the engine is not running (cancelled while waiting)."""
    return {
        "request_id": job["request_id"],
        "seq": seq,
        "kind": "CANCELLED",
        "text": "",
        "attempt": state.attempts if state else 0,
        "user_id": job.get("user_id", ""),
        "tier": job.get("tier", ""),
        "model": job.get("model", ""),
        "stop_reason": None,
        "usage": {
            "input_tokens": state.input_tokens if state else 0,
            "output_tokens": state.output_tokens if state else 0,
            "attempts": state.attempts if state else 0,
            "cost_micro_usd": 0,
        },
        "error": {"code": "cancelled", "message": reason, "retriable": False, "partial": False},
        "created_at": job.get("created_at", 0),
        "trace": dict(job.get("trace") or {}),
    }


def invalid_job_event(job: dict[str, Any], message: str) -> dict[str, Any]:
    """A terminal ERROR for a job record whose values cannot run (its client still gets an end)."""
    event = cancelled_event(job, seq=1, reason=message, state=None)
    event["kind"] = "ERROR"
    event["usage"] = None
    event["error"] = {
        "code": "invalid_request",
        "message": message,
        "retriable": False,
        "partial": False,
    }
    return event


def validate_job(job: dict[str, Any]) -> None:
    """Raise ``ValidationError`` for an InferenceJob that cannot be run."""
    if not (job.get("request_id") or "").strip():
        raise ValidationError("request_id is empty")
    if not (job.get("prompt") or "").strip():
        raise ValidationError("prompt is empty")
    if int(job.get("max_output_tokens") or 0) < 1:
        raise ValidationError("max_output_tokens must be at least 1")
    if not job.get("model"):
        raise ValidationError("model is empty")
