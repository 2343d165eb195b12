"""Preparing a request, as pure functions: validate, normalise, apply the tier, build the
prompt and its map-reduce chunks, or say why it is rejected (docs/architecture.md, "The
stages"). ``PreprocessStage`` (pipeline/worker/preprocess.py) wires them to the topics."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal

from pipeline.core import events, longdoc
from pipeline.core.errors import ValidationError
from pipeline.core.pricing import ModelPrice, price_table
from pipeline.core.prompt import (
    CHUNK_INSTRUCTIONS,
    DEFAULT_INSTRUCTIONS,
    REDUCE_PREAMBLE,
    SYSTEM_PROMPT,
    normalize_document,
    normalize_text,
    user_message,
)
from pipeline.core.records import InferenceJob, SummarizeRequest, TokenEvent, Trace
from pipeline.core.settings import WorkerSettings
from pipeline.core.tiers import Tier
from pipeline.llm.extractive import count_tokens
from pipeline.worker.longdoc.split import LongJob, long_job, with_overlap

# The engine replaces this literal in a map-reduce job's prompt with the chunk summaries.
CHUNK_PLACEHOLDER = "{chunk_summaries}"
MAX_REQUEST_ID_CHARS = 200
MAX_INSTRUCTIONS_CHARS = 4_000
# A chunk smaller than this would make map-reduce pointless (a misconfigured model budget).
MIN_CHUNK_TOKENS = 64

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request cannot run. ``dead_letter``: the record itself is invalid, keep a copy."""

    code: str
    message: str
    dead_letter: bool = False


def truncate_to_tokens(text: str, max_tokens: int) -> str:
    """The longest prefix of ``text`` ending at a word boundary within ``max_tokens`` tokens."""
    if count_tokens(text) <= max_tokens:
        return text
    lo, hi = 0, len(text)
    # Binary search on characters: count_tokens is monotone in the prefix length for any sane
    # tokenizer, and this needs only O(log n) counts.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(text[:mid]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo]
    boundary = max(cut.rfind(" "), cut.rfind("\n"))
    if boundary > 0 and lo < len(text) and not text[lo].isspace():
        cut = cut[:boundary]
    return cut.rstrip()


def _units(text: str, budget: int) -> list[tuple[str, str, int]]:
    """Pieces of ``text`` within ``budget`` tokens, each with the joiner that preceded it and
    its token count."""
    units: list[tuple[str, str, int]] = []
    for p_index, paragraph in enumerate(text.split("\n\n")):
        joiner = "\n\n" if p_index else ""
        tokens = count_tokens(paragraph)
        if tokens <= budget:
            units.append((paragraph, joiner, tokens))
            continue
        for s_index, sentence in enumerate(_SENTENCE_END.split(paragraph)):
            rest = sentence
            sep = joiner if s_index == 0 else " "
            while rest:
                piece = truncate_to_tokens(rest, budget)
                if not piece:  # a single "word" beyond the budget: cut it by characters
                    piece = rest[: max(1, len(rest) // 2)]
                    while count_tokens(piece) > budget and len(piece) > 1:
                        piece = piece[: len(piece) // 2]
                units.append((piece, sep, count_tokens(piece)))
                rest = rest[len(piece) :].lstrip()
                sep = " "
    return units


def split_into_chunks(text: str, budget: int) -> list[str]:
    """Split ``text`` at paragraph, sentence, then word boundaries into ``budget``-token chunks."""
    chunks: list[str] = []
    # The chunk under way as its pieces and joiners, joined once it is full (a 1M-token
    # document has ~50k paragraphs: growing one string per piece copied each chunk ~1,000x).
    current: list[str] = []
    current_tokens = current_chars = 0
    for piece, joiner, tokens in _units(text, budget):
        # Pieces are joined by whitespace, which count_tokens splits on: the count of the
        # joined text is the sum of the counts, so each piece is counted once (a long
        # document's plan must come quickly).
        if current_chars and current_tokens + tokens > budget:
            chunks.append("".join(current))
            current, current_tokens, current_chars = [piece], tokens, len(piece)
        elif current_chars:
            current += [joiner, piece]
            current_tokens += tokens
            current_chars += len(joiner) + len(piece)
        else:  # nothing but empty pieces so far: they and their joiners go
            current, current_tokens, current_chars = [piece], current_tokens + tokens, len(piece)
    if current_chars:
        chunks.append("".join(current))
    return chunks


def rejected(code: str, message: str, *, dead_letter: bool = False) -> Rejection:
    return Rejection(code=code, message=message, dead_letter=dead_letter)


def validate_request(request: SummarizeRequest) -> None:
    """Raise ``ValidationError`` when a request cannot even be answered (no usable request id)."""
    request_id = request.get("request_id") or ""
    if not request_id.strip():
        raise ValidationError("request_id is empty")
    if len(request_id) > MAX_REQUEST_ID_CHARS or any(c.isspace() for c in request_id):
        raise ValidationError("request_id must be at most 200 characters without whitespace")
    if longdoc.CHUNK_SEPARATOR in request_id:
        # Reserved for a long document's chunk calls (docs/architecture.md, "Long documents").
        raise ValidationError(f"request_id must not contain {longdoc.CHUNK_SEPARATOR!r}")


def prepare(
    request: SummarizeRequest,
    tiers: Mapping[str, Tier],
    settings: WorkerSettings,
    *,
    now_ms: int,
    enqueued_ms: int | None = None,
) -> InferenceJob | LongJob | Rejection:
    """Turn a SummarizeRequest into an InferenceJob (a LongJob for a document its tier
    map-reduces: docs/architecture.md, "Long documents"), or say why it is rejected.

    Raises ``ValidationError`` when the request has no usable id (nothing can be answered).
    ``now_ms`` stamps preprocess_start; the caller stamps preprocess_end when it produces.
    """
    validate_request(request)
    checked = _check(request, tiers)
    if isinstance(checked, Rejection):
        return checked
    tier, document = checked
    model = request.get("model") or tier.default_model or settings.default_model
    if not tier.allows(model):
        # Not dead-lettered: the record is well formed, its tier just does not list the model.
        return rejected(
            "model_not_allowed", f"model {model[:64]!r} is not available on the {tier.name} tier"
        )
    requested_output = request.get("max_output_tokens")
    max_output = min(requested_output or tier.max_output_tokens, tier.max_output_tokens)
    fitted = _fit(document, tier)
    if isinstance(fitted, Rejection):
        return fitted
    document, truncated = fitted

    instructions = normalize_text(request.get("instructions") or "")[:MAX_INSTRUCTIONS_CHARS]
    if not instructions:
        instructions = DEFAULT_INSTRUCTIONS.format(max_tokens=max_output)
    document_tokens = count_tokens(document)
    long = longdoc.is_long(document_tokens, tier)
    if long:
        # The final reduce's prompt; the reduce step puts the summaries in its placeholder.
        prompt = user_message(CHUNK_PLACEHOLDER, f"{REDUCE_PREAMBLE} {instructions}")
        chunks: list[str] = []
        estimate = 0
    else:
        prompt, chunks, estimate = _prompt(document, instructions, max_output, settings)

    created_at = int(request.get("created_at") or 0) or enqueued_ms or now_ms
    allowance_s = settings.default_deadline_s
    if long:
        # A tree of calls takes longer than one: its own estimate on top.
        allowance_s += longdoc.plan(
            document_tokens,
            tier,
            max_output_tokens=max_output,
            overhead_tokens=0,
            price=ModelPrice(Decimal(0), Decimal(0)),
        ).seconds
    deadline_ms = request.get("deadline_ms") or int(
        created_at + (tier.max_queue_wait_s + allowance_s) * 1000
    )
    trace = _trace(request, created_at, enqueued_ms)
    trace["preprocess_start"] = now_ms
    job: InferenceJob = {
        "request_id": request["request_id"],
        "user_id": request["user_id"],
        "tier": tier.name,
        "model": model,
        "system": SYSTEM_PROMPT,
        "prompt": prompt,
        "chunks": chunks,
        "max_output_tokens": max_output,
        "input_tokens_estimate": estimate,
        "truncated": truncated,
        "weight": tier.weight,
        "deadline_ms": int(deadline_ms),
        "degraded": request.get("degraded"),
        "source": request.get("source") or "external",
        "replay_of": request.get("replay_of"),
        "created_at": created_at,
        "trace": trace,
        "group_concurrency": 0,
        "missing_sections": [],
        "base_usage": None,
    }
    if not long:
        return job
    overlap = longdoc.overlap_tokens(tier)
    parts = with_overlap(split_into_chunks(document, tier.chunk_tokens - overlap), overlap)
    return long_job(
        job,
        parts,
        tier,
        price_table(settings.prices_file).price_for(model),
        document_tokens=document_tokens,
        overhead_tokens=count_tokens(SYSTEM_PROMPT) + count_tokens(CHUNK_INSTRUCTIONS),
    )


def _check(request: SummarizeRequest, tiers: Mapping[str, Tier]) -> tuple[Tier, str] | Rejection:
    """The request's tier and normalised document, or why the record itself is invalid."""
    if not (request.get("user_id") or "").strip():
        return rejected("invalid_request", "user_id is empty", dead_letter=True)
    tier = tiers.get(request.get("tier") or "")
    if tier is None:
        return rejected("unknown_tier", f"unknown tier {request.get('tier')!r}", dead_letter=True)
    requested_output = request.get("max_output_tokens")
    if requested_output is not None and requested_output < 1:
        return rejected("invalid_request", "max_output_tokens must be at least 1", dead_letter=True)
    document = normalize_document(request.get("document") or "")
    if not document:
        return rejected("invalid_request", "document is empty", dead_letter=True)
    return tier, document


def _fit(document: str, tier: Tier) -> tuple[str, bool] | Rejection:
    """The document within the tier's input limit (and whether it was cut), or a rejection."""
    doc_tokens = count_tokens(document)
    limit = tier.document_limit
    if doc_tokens <= limit:
        return document, False
    if tier.on_input_too_large == "reject":
        return rejected(
            "input_too_large",
            f"document has ~{doc_tokens} tokens; the {tier.name} tier allows {limit}",
        )
    return truncate_to_tokens(document, limit), True


def _prompt(
    document: str, instructions: str, max_output: int, settings: WorkerSettings
) -> tuple[str, list[str], int]:
    """The final prompt, the map-reduce chunk prompts (none if the document fits the model's
    budget), and the estimated input tokens of all calls."""
    overhead = count_tokens(SYSTEM_PROMPT) + count_tokens(user_message("", instructions))
    chunk_budget = settings.model_budget_tokens - overhead - max_output
    chunks: list[str] = []
    if count_tokens(document) > chunk_budget:
        # Leave room for the longer chunk instructions, so each map call also fits.
        chunk_budget = max(chunk_budget - count_tokens(CHUNK_INSTRUCTIONS), MIN_CHUNK_TOKENS)
        parts = split_into_chunks(document, chunk_budget)
        chunks = [
            user_message(
                part,
                CHUNK_INSTRUCTIONS.format(index=i, count=len(parts), max_tokens=max_output),
            )
            for i, part in enumerate(parts, start=1)
        ]
        prompt = user_message(CHUNK_PLACEHOLDER, f"{REDUCE_PREAMBLE} {instructions}")
        estimate = sum(count_tokens(c) for c in chunks) + count_tokens(prompt)
    else:
        prompt = user_message(document, instructions)
        estimate = count_tokens(prompt)
    return prompt, chunks, estimate + count_tokens(SYSTEM_PROMPT)


def _trace(request: SummarizeRequest, created_at: int, enqueued_ms: int | None) -> Trace:
    """The request's trace so far, with its receipt and (if known) enqueue time."""
    trace: Trace = dict(request.get("trace") or {})
    trace.setdefault("received", created_at)
    if enqueued_ms is not None:
        trace.setdefault("enqueued", enqueued_ms)
    return trace


def rejection_event(
    request: SummarizeRequest,
    rejection: Rejection,
    *,
    model: str,
    now_ms: int,
    enqueued_ms: int | None = None,
) -> TokenEvent:
    """The terminal ERROR TokenEvent (seq 1) that ends a rejected request's stream."""
    created_at = int(request.get("created_at") or 0) or enqueued_ms or now_ms
    trace = _trace(request, created_at, enqueued_ms)
    trace.setdefault("preprocess_start", now_ms)
    meta = events.StreamMeta.of(request)
    meta = replace(meta, model=model, created_at=created_at)
    error = events.error_info(rejection.code, rejection.message, retriable=False, partial=False)
    return events.terminal(meta, "ERROR", seq=1, attempt=0, usage=None, error=error, trace=trace)
