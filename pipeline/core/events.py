"""The one builder of each TokenEvent kind, and of the ``Usage`` and ``ErrorInfo`` they carry;
and the one reading of the seq range a coalesced DELTA covers.

STARTED and terminal events carry the per-stream metadata (user, tier, model, source,
replay_of, degraded, created_at, trace); ``StreamMeta.of`` takes it from the job or request
record in one place, so no producer of token events can drop a field. A DELTA carries only
its request id, its seq range and its text (docs/architecture.md, "Coalesced token records").
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, cast

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
    *,
    input_tokens: int,
    output_tokens: int,
    attempts: int,
    cost_micro_usd: int = 0,
    cache_creation_input_tokens: int = 0,
    cache_read_input_tokens: int = 0,
    document_tokens: int = 0,
    memory_tokens: int = 0,
    instruction_tokens: int = 0,
) -> Usage:
    """A Usage record (the worker leaves the cost at 0: postprocess prices it)."""
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "attempts": attempts,
        "cost_micro_usd": cost_micro_usd,
        "cache_creation_input_tokens": cache_creation_input_tokens,
        "cache_read_input_tokens": cache_read_input_tokens,
        "document_tokens": document_tokens,
        "memory_tokens": memory_tokens,
        "instruction_tokens": instruction_tokens,
    }


def error_info(code: str, message: str, *, retriable: bool, partial: bool) -> ErrorInfo:
    """An ErrorInfo record: ``partial`` says the text streamed so far is kept."""
    return {"code": code, "message": message, "retriable": retriable, "partial": partial}


def started(meta: StreamMeta, *, seq: int, attempt: int, trace: Trace) -> TokenEvent:
    """The STARTED event: the upstream call for the request begins."""
    return _event(meta, "STARTED", seq=seq, attempt=attempt, trace=trace)


def delta(
    request_id: str,
    *,
    first_seq: int,
    pieces: Sequence[str],
    attempt: int,
    usage: Usage | None = None,
) -> TokenEvent:
    """A DELTA covering ``first_seq`` and the seqs after it, one per piece of text; the
    per-stream metadata stays at the schema's defaults (STARTED and the terminal carry it).
    ``usage`` rides on an attempt's first DELTA only (the run's input so far)."""
    if not pieces:
        raise ValueError("a DELTA covers at least one seq")
    cuts: list[int] = []
    end = 0
    for piece in pieces[:-1]:
        end += len(piece)
        cuts.append(end)
    event = _event(
        replace(DELTA_META, request_id=request_id),
        "DELTA",
        seq=first_seq + len(pieces) - 1,
        attempt=attempt,
        text="".join(pieces),
        usage=usage,
    )
    event["first_seq"] = first_seq if len(pieces) > 1 else 0
    event["cuts"] = cuts
    return event


def progress(meta: StreamMeta, payload: Mapping[str, object]) -> TokenEvent:
    """A PROGRESS event: a long document's plan or progress (JSON in ``text``), seq 0, outside
    the seq stream (docs/architecture.md, "Long documents")."""
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    return _event(meta, "PROGRESS", seq=0, attempt=0, text=text)


def unpublished_usage(meta: StreamMeta, used: Usage) -> TokenEvent:
    """A USAGE event: upstream work a worker received but could not publish before its run was
    released (seq 0, outside the seq stream; docs/architecture.md, "Billing a resumed stream").
    Its text is a fresh id, so a redelivered record counts once."""
    return _event(meta, "USAGE", seq=0, attempt=0, text=uuid.uuid4().hex, usage=used)


def add_usage(base: Usage | None, extra: Usage) -> Usage:
    """``base`` plus the tokens of ``extra`` (a USAGE event's): what the request really used."""
    total = dict(base) if base else dict(usage(input_tokens=0, output_tokens=0, attempts=0))
    for name in (
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ):
        total[name] = _count(total.get(name)) + _count(extra.get(name))
    return cast(Usage, total)


def _count(value: object) -> int:
    return value if isinstance(value, int) else 0


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


# What a DELTA leaves in the metadata fields: the schema's defaults.
DELTA_META = StreamMeta("", "", "", "", 0, DEFAULT_SOURCE, None, None)


def first_seq(event: Mapping[str, object]) -> int:
    """The first seq ``event`` covers (its ``seq`` unless it is a coalesced DELTA)."""
    seq = int(event["seq"])  # type: ignore[call-overload]
    first = event.get("first_seq") or 0
    return first if isinstance(first, int) and 0 < first <= seq else seq


def range_error(event: Mapping[str, object]) -> str | None:
    """Why ``event``'s seq range or cuts cannot be read, or None when they can."""
    seq, first = event.get("seq"), event.get("first_seq") or 0
    cuts = event.get("cuts") or []
    if not isinstance(seq, int) or not isinstance(first, int) or not isinstance(cuts, list):
        return "seq, first_seq and cuts must be numbers"
    if first and (first > seq or event.get("kind") != "DELTA"):
        return f"first_seq {first} must be a DELTA's, at most its seq {seq}"
    covered = seq - first + 1 if first else 1
    if len(cuts) != covered - 1:
        return f"{len(cuts)} cuts for {covered} seqs"
    bounds = [0, *cuts, len(str(event.get("text") or ""))]
    if any(b < a for a, b in itertools.pairwise(bounds)):
        return "cuts must be increasing offsets within the text"
    return None


def pieces(event: Mapping[str, object]) -> list[tuple[int, str]]:
    """Each seq a DELTA covers with its piece of the text, in seq order (none for other kinds)."""
    if event.get("kind") != "DELTA":
        return []
    text = str(event.get("text") or "")
    cuts = event.get("cuts") or []
    bounds = [0, *cuts, len(text)] if isinstance(cuts, list) else [0, len(text)]
    first = first_seq(event)
    return [(first + i, text[bounds[i] : bounds[i + 1]]) for i in range(len(bounds) - 1)]


def text_after(event: Mapping[str, object], after_seq: int) -> str:
    """The part of a DELTA's text that follows seq ``after_seq`` (all of it, or nothing)."""
    text = str(event.get("text") or "")
    first = first_seq(event)
    if after_seq < first:
        return text
    if after_seq >= int(event["seq"]):  # type: ignore[call-overload]
        return ""
    cuts = event.get("cuts") or []
    return text[cuts[after_seq - first] :] if isinstance(cuts, list) else ""


def delta_texts(stream: Iterable[Mapping[str, object]]) -> dict[int, str]:
    """Each seq's piece of text over a stream's DELTAs in any order, a seq seen twice (a
    redelivered record) counted once."""
    texts: dict[int, str] = {}
    for event in stream:
        for seq, piece in pieces(event):
            texts.setdefault(seq, piece)
    return texts


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
        "first_seq": 0,
        "cuts": [],
    }


def _text(value: object) -> str:
    return str(value) if value else ""


def _optional_text(value: object) -> str | None:
    return None if value is None else str(value)


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float | str) and value else 0
