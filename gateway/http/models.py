"""The HTTP API's bodies: what clients send, and how records are shown to them."""

from __future__ import annotations

from typing import Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.records import ErrorInfo, SummaryResult, Usage


class SummaryIn(BaseModel):
    """``POST /v1/summaries``: the document to summarize and optional guidance."""

    model_config = ConfigDict(extra="forbid", strict=True)

    document: str = Field(min_length=1, description="the text to summarize")
    instructions: str | None = Field(default=None, max_length=4_000)
    max_output_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    model: str | None = Field(default=None, min_length=1, max_length=200)
    context: Literal["history"] | None = Field(
        default=None, description="history: add your most relevant past summaries as context"
    )
    # A document that normalises to nothing is refused by intake (422 empty_document).


class Links(BaseModel):
    self: str
    events: str


class AcceptedOut(BaseModel):
    """The 202 answer (``Accept: application/json``) and the SSE ``accepted`` event's data."""

    id: str
    status: str = "accepted"
    queue_position: int = Field(description="place in the pipeline's queue (1 = next), from lag")
    estimated_wait_s: float = Field(description="estimated wait before processing starts")
    max_output_tokens: int = Field(
        description="the output cap that applies: the one asked for, clamped to the tier's "
        "maximum (or the tier's maximum when none was asked), or the degraded one"
    )
    degraded: str | None = Field(
        default=None, description="degradation applied under load, e.g. model:<cheaper model>"
    )
    links: Links


class UsageOut(BaseModel):
    """``GET /v1/usage``: the caller's figures for the current calendar month (UTC)."""

    user: str
    tier: str
    period_start: str = Field(description="start of the month, ISO 8601 UTC")
    period_end: str = Field(description="start of the next month, ISO 8601 UTC")
    requests: int = Field(description="requests admitted this month")
    input_tokens: int
    output_tokens: int
    tokens: int = Field(description="input + output tokens billed this month")
    cost_micro_usd: int
    cost_usd: float
    budget_micro_usd: int = Field(description="the tier's monthly budget")
    remaining_micro_usd: int
    limits: dict[str, int] = Field(description="rpm and tpm of the tier")
    window: dict[str, int] = Field(
        description="requests and tokens counted in the current one-minute window"
    )
    documents: dict[str, int | bool] = Field(
        default_factory=dict,
        description="the tier's context allocation: max_input_tokens (one call), "
        "long_documents, max_document_tokens, chunk_tokens, map_concurrency, reduce_output_tokens",
    )


class RunningOut(BaseModel):
    id: str
    status: str = "running"
    links: Links


def links(request_id: str) -> Links:
    base = f"/v1/summaries/{request_id}"
    return Links(self=base, events=f"{base}/events")


class UsageBody(TypedDict):
    input_tokens: int
    output_tokens: int
    attempts: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    document_tokens: int
    memory_tokens: int
    instruction_tokens: int


class CostBody(TypedDict):
    micro_usd: int
    usd: float


class ResultBody(TypedDict):
    """A SummaryResult as the API shows it: the ``done`` event's data and ``GET``'s body."""

    id: str
    status: str
    summary: str
    model: str
    tier: str
    usage: UsageBody
    cost: CostBody
    latency_ms: dict[str, int]
    stop_reason: str | None
    error: ErrorInfo | None
    degraded: str | None
    last_seq: int
    created_at: int | None
    completed_at: int | None


NO_USAGE: Usage = {
    "input_tokens": 0,
    "output_tokens": 0,
    "attempts": 0,
    "cost_micro_usd": 0,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
    "document_tokens": 0,
    "memory_tokens": 0,
    "instruction_tokens": 0,
}


def result_json(result: SummaryResult) -> ResultBody:
    """A SummaryResult record as the API shows it (``done`` event and ``GET``)."""
    # Read with defaults: a stand-in result built from a terminal event lacks some fields.
    usage = result.get("usage") or NO_USAGE
    cost = int(usage.get("cost_micro_usd", 0))
    return {
        "id": result["request_id"],
        "status": result["status"],
        "summary": result.get("summary", ""),
        "model": result.get("model", ""),
        "tier": result.get("tier", ""),
        "usage": {
            "input_tokens": int(usage.get("input_tokens", 0)),
            "output_tokens": int(usage.get("output_tokens", 0)),
            "attempts": int(usage.get("attempts", 0)),
            "cache_creation_input_tokens": int(usage.get("cache_creation_input_tokens", 0)),
            "cache_read_input_tokens": int(usage.get("cache_read_input_tokens", 0)),
            "document_tokens": int(usage.get("document_tokens", 0)),
            "memory_tokens": int(usage.get("memory_tokens", 0)),
            "instruction_tokens": int(usage.get("instruction_tokens", 0)),
        },
        "cost": {"micro_usd": cost, "usd": cost / 1_000_000},
        "latency_ms": dict(result.get("latency_ms") or {}),
        "stop_reason": result.get("stop_reason"),
        "error": result.get("error"),
        "degraded": result.get("degraded"),
        "last_seq": int(result.get("last_seq", 0)),
        "created_at": result.get("created_at"),
        "completed_at": result.get("completed_at"),
    }
