"""The one builder of a SummaryResult: status, usage and cost, latency per stage.

Postprocess writes results with it; the gateway builds the stand-in it sends when a stream's
terminal event came but its result did not (docs/architecture.md, "The stages").
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.core import events as token_events
from pipeline.core.pricing import PriceTable
from pipeline.core.records import ResultStatus, SummaryResult, TokenEvent, Trace, Usage

# Error codes that mean "turned away before any model call": the result is REJECTED.
REJECTION_CODES = frozenset(
    {"invalid_request", "unknown_tier", "input_too_large", "model_not_allowed"}
) | frozenset(
    # Refused for who wrote it or for whom (pipeline/worker/identity.py), or over the quota.
    {"unauthenticated_producer", "user_not_allowed", "unknown_user"}
    | {"rate_limited", "budget_exceeded"}
)

# latency_ms key -> (start stamp, end stamp) in the request's trace. Documented in
# ``latency_breakdown``; a key is present only when both stamps are.
LATENCY_SPANS: dict[str, tuple[tuple[str, ...], str]] = {
    "admission": (("received",), "enqueued"),
    "queue_wait": (("enqueued", "received"), "preprocess_start"),
    "preprocess": (("preprocess_start",), "preprocess_end"),
    "inference_queue": (("preprocess_end",), "inference_start"),
    "ttft": (("inference_start",), "first_token"),
    "generation": (("first_token",), "last_token"),
    "time_to_first_token": (("received",), "first_token"),
    "total": (("received",), "result"),
}


def result_status(terminal: TokenEvent, summary: str) -> ResultStatus:
    """SummaryStatus for a terminal event: DONE/CANCELLED as such, ERROR by its code and text."""
    kind = terminal.get("kind")
    if kind == "DONE":
        return "COMPLETED"
    if kind == "CANCELLED":
        return "CANCELLED"
    error = terminal.get("error")
    if error and error.get("code") in REJECTION_CODES:
        return "REJECTED"
    if error and error.get("partial") and summary:
        return "PARTIAL"
    return "FAILED"


def latency_breakdown(trace: Mapping[str, int]) -> dict[str, int]:
    """Per-stage durations in ms from a request's trace stamps (epoch ms).

    - ``admission``: received -> enqueued (the gateway's time before the request was in Kafka)
    - ``queue_wait``: enqueued (else received) -> preprocess_start (waiting in `requests`)
    - ``preprocess``: preprocess_start -> preprocess_end
    - ``inference_queue``: preprocess_end -> inference_start (in `preprocessed` and the scheduler)
    - ``ttft``: inference_start -> first_token (the model's time to first token, retries included)
    - ``generation``: first_token -> last_token
    - ``time_to_first_token``: received -> first_token (what the client waits for)
    - ``total``: received -> result (the terminal event's time in `tokens`)

    Stamps come from different hosts, so a negative span (clock skew) is reported as 0.
    """
    out: dict[str, int] = {}
    for key, (starts, end) in LATENCY_SPANS.items():
        start = next((trace[s] for s in starts if s in trace), None)
        if start is not None and end in trace:
            out[key] = max(int(trace[end]) - int(start), 0)
    return out


def _split(usage: Usage | None, name: str) -> int:
    # The usage split by what the input is (docs/architecture.md, "Context and memory").
    value = usage.get(name) if usage else None
    return int(value) if isinstance(value, int) else 0


def build_result(
    terminal: TokenEvent,
    text: str,
    prices: PriceTable,
    *,
    result_ms: int,
) -> SummaryResult:
    """The SummaryResult for a request whose stream ended with ``terminal``.

    ``text`` is the concatenated DELTA text; ``result_ms`` is the time the stream ended.
    """
    summary = text.strip()
    usage_in = terminal.get("usage")
    input_tokens = int(usage_in.get("input_tokens") or 0) if usage_in else 0
    output_tokens = int(usage_in.get("output_tokens") or 0) if usage_in else 0
    cache_written = int(usage_in.get("cache_creation_input_tokens") or 0) if usage_in else 0
    cache_read = int(usage_in.get("cache_read_input_tokens") or 0) if usage_in else 0
    model = str(terminal.get("model") or "")
    usage = token_events.usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        attempts=int(usage_in.get("attempts") or 0) if usage_in else 0,
        cost_micro_usd=prices.micro_usd(
            model, input_tokens, output_tokens, cache_written, cache_read
        ),
        cache_creation_input_tokens=cache_written,
        cache_read_input_tokens=cache_read,
        document_tokens=_split(usage_in, "document_tokens"),
        memory_tokens=_split(usage_in, "memory_tokens"),
        instruction_tokens=_split(usage_in, "instruction_tokens"),
    )
    trace: Trace = {str(k): int(v) for k, v in (terminal.get("trace") or {}).items()}
    trace["result"] = result_ms
    error = terminal.get("error")
    return {
        "request_id": terminal["request_id"],
        "user_id": terminal.get("user_id") or "",
        "tier": terminal.get("tier") or "free",
        "model": model,
        "status": result_status(terminal, summary),
        "summary": summary,
        "usage": usage,
        "error": error.copy() if error else None,
        "stop_reason": terminal.get("stop_reason"),
        "last_seq": int(terminal["seq"]),
        "degraded": terminal.get("degraded"),
        "source": terminal.get("source") or "external",
        "replay_of": terminal.get("replay_of"),
        "latency_ms": latency_breakdown(trace),
        "created_at": int(terminal.get("created_at") or 0),
        "completed_at": result_ms,
        "trace": trace,
    }
