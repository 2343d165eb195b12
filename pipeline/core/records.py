"""Typed shapes of sumstream's Avro records, one per schema in ``schemas/``.

The codec (``pipeline/core/codec.py``) reads and writes plain dicts; these TypedDicts say what
those dicts hold, so code past the decoder is checked by mypy instead of trusting
``dict[str, Any]``. A test (tests/unit/test_records.py) holds every TypedDict to its schema:
same field names, compatible types. Enum symbols are ``Literal`` types, so a misspelt kind
does not type-check.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

TokenKind = Literal["STARTED", "DELTA", "DONE", "ERROR", "CANCELLED", "PROGRESS", "USAGE"]
ChunkKind = Literal["PLAN", "SUMMARY", "FAILED"]
ResultStatus = Literal["COMPLETED", "PARTIAL", "FAILED", "CANCELLED", "REJECTED"]
ControlAction = Literal["CANCEL"]
QuotaKind = Literal["RESERVE", "SETTLE", "RELEASE", "UNKNOWN", "ATTACHED"]

# Token events that end a request's stream: exactly one per request, always the last seq.
TERMINAL_KINDS: frozenset[TokenKind] = frozenset({"DONE", "ERROR", "CANCELLED"})

# Trace keys are stage names (received, enqueued, preprocess_start, ...), values epoch ms.
Trace = dict[str, int]


class Usage(TypedDict):
    """Tokens, attempts and cost of one request so far (cumulative over attempts)."""

    input_tokens: int
    output_tokens: int
    attempts: int
    cost_micro_usd: int
    # Prompt caching (docs/architecture.md, "Prompt caching"): not counted in input_tokens.
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    # The input of one attempt split by what it is (estimates by preprocess's token count).
    document_tokens: int
    memory_tokens: int
    instruction_tokens: int


class ErrorInfo(TypedDict):
    """A structured error carried by a terminal token event and its result."""

    code: str
    message: str
    retriable: bool
    partial: bool


class SummarizeRequest(TypedDict):
    """A document to summarize, as the gateway or another system puts it on ``requests``."""

    request_id: str
    user_id: str
    tier: str
    document: str
    instructions: str | None
    max_output_tokens: int | None
    model: str | None
    deadline_ms: int | None
    idempotency_key: str | None
    body_sha256: str | None
    source: str
    replay_of: str | None
    degraded: str | None
    created_at: int
    trace: Trace
    session_of: NotRequired[str | None]
    context: NotRequired[str | None]


class InferenceJob(TypedDict):
    """A prepared prompt for the inference stage (``preprocessed``)."""

    request_id: str
    user_id: str
    tier: str
    model: str
    system: str
    prompt: str
    chunks: list[str]
    max_output_tokens: int
    input_tokens_estimate: int
    truncated: bool
    weight: int
    deadline_ms: int
    degraded: str | None
    source: str
    replay_of: str | None
    created_at: int
    trace: Trace
    # A long document's chunk call: at most this many of its parent's calls at once (0: any).
    group_concurrency: int
    # A long document's final reduce: the parts (from 1) no summary covers, and the usage of
    # its map and collapse calls.
    missing_sections: list[int]
    base_usage: Usage | None
    preferences_version: NotRequired[int | None]
    session_id: NotRequired[str | None]
    turns: NotRequired[list[str]]
    cache_prompt: NotRequired[bool]
    document_tokens: NotRequired[int]
    memory_tokens: NotRequired[int]
    instruction_tokens: NotRequired[int]


class TokenEvent(TypedDict):
    """One step of a request's stream on ``tokens``: started, a delta, or its terminal event.

    A DELTA may cover the seqs ``first_seq``..``seq`` (0: just ``seq``); ``cuts`` are the
    offsets in ``text`` where each covered seq but the last ends (docs/architecture.md,
    "Coalesced token records"). Deltas leave the per-stream metadata at its defaults.
    """

    request_id: str
    seq: int
    kind: TokenKind
    text: str
    attempt: int
    user_id: str
    tier: str
    model: str
    stop_reason: str | None
    usage: Usage | None
    error: ErrorInfo | None
    created_at: int
    source: str
    replay_of: str | None
    degraded: str | None
    trace: Trace
    first_seq: int
    cuts: list[int]


class SummaryResult(TypedDict):
    """The final record of a request on ``results``: text, usage, cost, status, latency."""

    request_id: str
    user_id: str
    tier: str
    model: str
    status: ResultStatus
    summary: str
    usage: Usage
    error: ErrorInfo | None
    stop_reason: str | None
    last_seq: int
    degraded: str | None
    source: str
    replay_of: str | None
    latency_ms: dict[str, int]
    created_at: int
    completed_at: int
    trace: Trace


class ControlEvent(TypedDict):
    """An instruction to the inference stage about one request (today: cancel)."""

    request_id: str
    action: ControlAction
    reason: str
    user_id: str
    created_at: int
    trace: Trace


class DeadLetter(TypedDict):
    """A record a stage could not handle, with where it came from and why."""

    key: bytes | None
    value: bytes | None
    error_type: str
    error: str
    stage: str
    origin_topic: str
    origin_partition: int
    origin_offset: int
    created_at: int
    trace: Trace


class QuotaEvent(TypedDict):
    """A reservation, settlement or release in a user's quota ledger (``quota``)."""

    event_id: str
    user_id: str
    tier: str
    kind: QuotaKind
    request_id: str
    tokens: int
    input_tokens: int
    output_tokens: int
    requests: int
    cost_micro_usd: int
    at: int
    gateway: str
    trace: Trace
    idempotency_key: NotRequired[str | None]
    body_sha256: NotRequired[str | None]


class ChunkSummary(TypedDict):
    """A long document's record on ``chunks`` (docs/architecture.md, "Long documents")."""

    request_id: str
    kind: ChunkKind
    level: int
    index: int
    text: str
    usage: Usage | None
    error: ErrorInfo | None
    levels: list[int]
    group_size: int
    job: bytes
    plan: str
    reuse_key: str
    created_at: int
    trace: Trace


class UserPreferences(TypedDict):
    """How one user likes their summaries (``preferences``, compacted, key user id)."""

    user_id: str
    version: int
    length: str | None
    style: str | None
    language: str | None
    audience: str | None
    guidance: str | None
    updated_at: int
    forgotten_at: int
    trace: Trace


class DataKey(TypedDict):
    """One user's data key for sealed text (``keys``, compacted, key ``<user>/<key_id>``)."""

    user_id: str
    key_id: str
    key: bytes
    created_at: int
    trace: Trace


# Schema name -> its TypedDict; tests/unit/test_records.py checks the two agree.
RECORD_TYPES: dict[str, type] = {
    "Usage": Usage,
    "ErrorInfo": ErrorInfo,
    "SummarizeRequest": SummarizeRequest,
    "InferenceJob": InferenceJob,
    "TokenEvent": TokenEvent,
    "SummaryResult": SummaryResult,
    "ControlEvent": ControlEvent,
    "DeadLetter": DeadLetter,
    "QuotaEvent": QuotaEvent,
    "ChunkSummary": ChunkSummary,
    "UserPreferences": UserPreferences,
    "DataKey": DataKey,
}
