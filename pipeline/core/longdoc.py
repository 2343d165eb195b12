"""The plan of a long document: one call, or a map-reduce tree (docs/architecture.md, "Long
documents").

Pure arithmetic over token counts, so the gateway (which knows only the document's tokens, for
the budget check before anything is produced) and preprocess (which knows the real chunks)
build the same kind of plan. A map call summarizes one chunk into at most
``reduce_output_tokens``; while a level's summaries do not fit one reduce call
(``chunk_tokens``), they are grouped and collapsed again; the final reduce writes the summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pipeline.core.pricing import ModelPrice
from pipeline.core.tiers import Tier

Mode = Literal["single", "map_reduce"]

# The overlap between consecutive chunks: a twentieth of a chunk, at most this many tokens, so
# a sentence cut at a chunk's end is seen whole by one of the two calls.
MAX_OVERLAP_TOKENS = 200
# Figures for the time estimate: time to first token and per output token of one call.
CALL_TTFT_S = 0.5
OUTPUT_TOKEN_S = 0.02


@dataclass(frozen=True, slots=True)
class Plan:
    """What a request will cost before any call: calls per level, tokens, cost and time."""

    mode: Mode
    document_tokens: int
    # Calls per level: [map chunks, collapse calls..., 1 final reduce]; [1] for one call.
    levels: tuple[int, ...]
    input_tokens: int
    output_tokens: int
    cost_micro_usd: int
    seconds: float

    @property
    def chunks(self) -> int:
        return self.levels[0] if self.mode == "map_reduce" else 0

    @property
    def calls(self) -> int:
        return sum(self.levels)

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def as_json(self) -> dict[str, object]:
        """The plan as the SSE ``progress`` event carries it."""
        return {
            "mode": self.mode,
            "document_tokens": self.document_tokens,
            "chunks": self.chunks,
            "levels": len(self.levels),
            "calls": self.calls,
            "calls_per_level": list(self.levels),
            "estimated_input_tokens": self.input_tokens,
            "estimated_output_tokens": self.output_tokens,
            "estimated_cost_micro_usd": self.cost_micro_usd,
            "estimated_seconds": round(self.seconds, 1),
        }


def overlap_tokens(tier: Tier) -> int:
    """Tokens each chunk repeats from the end of the one before it."""
    return min(MAX_OVERLAP_TOKENS, tier.chunk_tokens // 20)


def is_long(document_tokens: int, tier: Tier) -> bool:
    """Whether the document is map-reduced: beyond one call's allocation, on a tier that may."""
    return tier.long_documents and document_tokens > tier.max_input_tokens


def group_size(tier: Tier) -> int:
    """How many summaries one collapse or reduce call takes (at least 2, see tiers.py)."""
    return max(2, tier.chunk_tokens // tier.reduce_output_tokens)


def collapse_levels(summaries: int, tier: Tier) -> list[int]:
    """Calls per level after the map: collapse levels while the summaries do not fit one
    reduce call, then the final reduce (1)."""
    levels: list[int] = []
    per_call = group_size(tier)
    while summaries > per_call:
        summaries = math.ceil(summaries / per_call)
        levels.append(summaries)
    return [*levels, 1]


def estimated_chunks(document_tokens: int, tier: Tier) -> int:
    """Map calls for a document of ``document_tokens`` (chunks end on boundaries, so preprocess
    may make a few more; its plan counts the real ones)."""
    step = tier.chunk_tokens - overlap_tokens(tier)
    return max(1, math.ceil(max(0, document_tokens - overlap_tokens(tier)) / step))


def plan(
    document_tokens: int,
    tier: Tier,
    *,
    max_output_tokens: int,
    overhead_tokens: int,
    price: ModelPrice,
    chunks: int | None = None,
) -> Plan:
    """The plan for a document; ``overhead_tokens``: system prompt and instructions per call;
    ``chunks``: the real number of map chunks when known (else estimated)."""
    if not is_long(document_tokens, tier):
        input_tokens = document_tokens + overhead_tokens
        seconds = CALL_TTFT_S + max_output_tokens * OUTPUT_TOKEN_S
        cost = price.micro_usd(input_tokens, max_output_tokens)
        return Plan("single", document_tokens, (1,), input_tokens, max_output_tokens, cost, seconds)
    n = chunks if chunks is not None else estimated_chunks(document_tokens, tier)
    levels = (n, *collapse_levels(n, tier))
    summary = tier.reduce_output_tokens
    # Map: the document once plus its overlaps; each later level reads the summaries of the
    # level before (at most ``summary`` tokens each).
    input_tokens = document_tokens + (n - 1) * overlap_tokens(tier)
    input_tokens += sum(levels[:-1]) * summary + sum(levels) * overhead_tokens
    output_tokens = sum(levels[:-1]) * summary + max_output_tokens
    seconds = 0.0
    for calls in levels[:-1]:
        waves = math.ceil(calls / tier.map_concurrency)
        seconds += waves * (CALL_TTFT_S + summary * OUTPUT_TOKEN_S)
    seconds += CALL_TTFT_S + max_output_tokens * OUTPUT_TOKEN_S
    cost = price.micro_usd(input_tokens, output_tokens)
    return Plan("map_reduce", document_tokens, levels, input_tokens, output_tokens, cost, seconds)


# A chunk or collapse call runs as a request of its own, ``<parent>~<level>.<index>``: keyed
# by it, a document's calls spread over the partitions (and workers) of `preprocessed`.
CHUNK_SEPARATOR = "~"


def chunk_id(parent_id: str, level: int, index: int) -> str:
    """The request id of call ``index`` of ``level`` (0: the map) of ``parent_id``."""
    return f"{parent_id}{CHUNK_SEPARATOR}{level}.{index}"


def parse_chunk_id(request_id: str) -> tuple[str, int, int] | None:
    """(parent, level, index) of a chunk call's id; None for any other request id."""
    parent, sep, rest = request_id.partition(CHUNK_SEPARATOR)
    level, dot, index = rest.partition(".")
    if not sep or not dot or not level.isdigit() or not index.isdigit():
        return None
    return parent, int(level), int(index)


def parent_of(request_id: str) -> str:
    """The request a chunk call belongs to (the id itself for any other request)."""
    parsed = parse_chunk_id(request_id)
    return parsed[0] if parsed else request_id
