"""The one builder of each TokenEvent kind, and of the ``Usage`` and ``ErrorInfo`` they carry.

Every event of a request's stream repeats the same per-stream metadata (user, tier, model,
source, replay_of, degraded, created_at); ``StreamMeta.of`` takes it from the job or request
record in one place, so no producer of token events can drop a field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pipeline.core.records import ErrorInfo, TokenEvent, TokenKind, Trace, Usage

TerminalKind = Literal["DONE", "ERROR", "CANCELLED"]

# A request whose record does not say where it came from was submitted from outside.
DEFAULT_SOURCE = "external"


@dataclass(frozen=True, slots=True)
class StreamMeta:
    """What every TokenEvent of one request carries besides its seq, kind and payload."""

    request_id: str
    user_id: str
    tier: str
    model: str
    created_at: int
    source: str
    replay_of: str | None
    degraded: str | None

    @classmethod
    def of(cls, record: Mapping[str, object]) -> StreamMeta:
        """The metadata of an InferenceJob or SummarizeRequest (a missing field is empty)."""
        return cls(
            request_id=_text(record.get("request_id")),
            user_id=_text(record.get("user_id")),
            tier=_text(record.get("tier")),
            model=_text(record.get("model")),
            created_at=_int(record.get("created_at")),
            source=_text(record.get("source")) or DEFAULT_SOURCE,
            replay_of=_optional_text(record.get("replay_of")),
            degraded=_optional_text(record.get("degraded")),
        )


def usage(
    *, input_tokens: int, output_tokens: int, attempts: int, cost_micro_usd: int = 0
) -> Usage:
    """A Usage record (the worker leaves the cost at 0: postprocess prices it)."""
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "attempts": attempts,
        "cost_micro_usd": cost_micro_usd,
    }


def error_info(code: str, message: str, *, retriable: bool, partial: bool) -> ErrorInfo:
    """An ErrorInfo record: ``partial`` says the text streamed so far is kept."""
    return {"code": code, "message": message, "retriable": retriable, "partial": partial}


def started(meta: StreamMeta, *, seq: int, attempt: int, trace: Trace) -> TokenEvent:
    """The STARTED event: the upstream call for the request begins."""
    return _event(meta, "STARTED", seq=seq, attempt=attempt, trace=trace)


def delta(meta: StreamMeta, *, seq: int, attempt: int, text: str) -> TokenEvent:
    """A DELTA event: the next piece of the summary text."""
    return _event(meta, "DELTA", seq=seq, attempt=attempt, text=text)


def terminal(
    meta: StreamMeta,
    kind: TerminalKind,
    *,
    seq: int,
    attempt: int,
    usage: Usage | None,
    error: ErrorInfo | None = None,
    stop_reason: str | None = None,
    trace: Trace | None = None,
) -> TokenEvent:
    """The DONE, ERROR or CANCELLED event that ends the request's stream (its last seq)."""
    return _event(
        meta,
        kind,
        seq=seq,
        attempt=attempt,
        usage=usage,
        error=error,
        stop_reason=stop_reason,
        trace=trace,
    )


def _event(
    meta: StreamMeta,
    kind: TokenKind,
    *,
    seq: int,
    attempt: int,
    text: str = "",
    usage: Usage | None = None,
    error: ErrorInfo | None = None,
    stop_reason: str | None = None,
    trace: Trace | None = None,
) -> TokenEvent:
    return {
        "request_id": meta.request_id,
        "seq": seq,
        "kind": kind,
        "text": text,
        "attempt": attempt,
        "user_id": meta.user_id,
        "tier": meta.tier,
        "model": meta.model,
        "stop_reason": stop_reason,
        "usage": usage,
        "error": error,
        "created_at": meta.created_at,
        "source": meta.source,
        "replay_of": meta.replay_of,
        "degraded": meta.degraded,
        "trace": dict(trace) if trace else {},
    }


def _text(value: object) -> str:
    return str(value) if value else ""


def _optional_text(value: object) -> str | None:
    return None if value is None else str(value)


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float | str) and value else 0
