"""Preprocess's half of a long document: chunks with a small overlap, the plan, the map jobs,
the PLAN record and the plan's ``progress`` event (docs/architecture.md, "Long documents")."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.core import events, longdoc
from pipeline.core.codec import codec
from pipeline.core.longdoc import Plan
from pipeline.core.pricing import ModelPrice, price_table
from pipeline.core.prompt import CHUNK_INSTRUCTIONS, SYSTEM_PROMPT, user_message
from pipeline.core.records import ChunkSummary, InferenceJob, SummarizeRequest, TokenEvent
from pipeline.core.settings import WorkerSettings
from pipeline.core.tiers import Tier
from pipeline.llm.extractive import count_tokens

# Where a sentence starts inside an overlap's words: after . ! or ? and a space.
_SENTENCE_START = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True, slots=True)
class LongJob:
    """What preprocess produces for a long document instead of one InferenceJob."""

    plan: Plan
    final: InferenceJob  # the final reduce, its prompt holding the summaries' placeholder
    maps: list[InferenceJob]
    plan_record: ChunkSummary
    progress: TokenEvent

    @property
    def reuse_key(self) -> str:
        return self.plan_record["reuse_key"]


def overhead_tokens() -> int:
    """The plan's prompt tokens per call beside the document (system prompt, instructions)."""
    return count_tokens(SYSTEM_PROMPT) + count_tokens(CHUNK_INSTRUCTIONS)


def with_overlap(parts: list[str], overlap: int) -> list[str]:
    """Each part after the first starts with the end of the one before it: its last whole
    sentences within ``overlap`` tokens (else its last ``overlap`` words)."""
    if overlap <= 0:
        return list(parts)
    out = [parts[0]] if parts else []
    for before, part in itertools.pairwise(parts):
        words = before.split()[-overlap:]
        tail = " ".join(words)
        sentences = _SENTENCE_START.split(tail, maxsplit=1)
        if len(sentences) == 2 and sentences[1]:
            tail = sentences[1]  # from the first sentence that starts inside the tail
        out.append(f"{tail}\n\n{part}")
    return out


def reuse_key(template: InferenceJob, maps: list[InferenceJob]) -> str:
    """``<user>/<hash>``: the same user, model and map prompts (so the same document, chunks
    and summary length) give the same key, whatever the request."""
    digest = hashlib.sha256()
    for part in (template["model"], template["system"], *(m["prompt"] for m in maps)):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"{template['user_id']}/{digest.hexdigest()}"


def long_job(
    template: InferenceJob,
    parts: list[str],
    tier: Tier,
    price: ModelPrice,
    *,
    document_tokens: int,
    overhead_tokens: int,
) -> LongJob:
    """The map jobs, PLAN record and plan event of ``template`` (the final reduce job) over
    the document ``parts`` (chunk texts, overlap included)."""
    parent = template["request_id"]
    plan = longdoc.plan(
        document_tokens,
        tier,
        max_output_tokens=template["max_output_tokens"],
        overhead_tokens=overhead_tokens,
        price=price,
        chunks=len(parts),
    )
    maps: list[InferenceJob] = []
    for index, part in enumerate(parts):
        instructions = CHUNK_INSTRUCTIONS.format(
            index=index + 1, count=len(parts), max_tokens=tier.reduce_output_tokens
        )
        prompt = user_message(part, instructions)
        maps.append(
            {
                **template,
                "request_id": longdoc.chunk_id(parent, 0, index),
                "prompt": prompt,
                "chunks": [],
                "max_output_tokens": tier.reduce_output_tokens,
                "group_concurrency": tier.map_concurrency,
                "input_tokens_estimate": count_tokens(SYSTEM_PROMPT) + count_tokens(prompt),
                "trace": dict(template["trace"]),
            }
        )
    return _with_plan(template, maps, plan, reuse_key(template, maps), tier)


def recounted(
    long: LongJob, document_tokens: int, tier: Tier, price: ModelPrice, *, overhead_tokens: int
) -> LongJob:
    """``long`` planned again for ``document_tokens`` (the upstream's count), same chunks."""
    plan = longdoc.plan(
        document_tokens,
        tier,
        max_output_tokens=long.final["max_output_tokens"],
        overhead_tokens=overhead_tokens,
        price=price,
        chunks=len(long.maps),
    )
    return _with_plan(long.final, long.maps, plan, long.reuse_key, tier)


def _with_plan(
    template: InferenceJob, maps: list[InferenceJob], plan: Plan, key: str, tier: Tier
) -> LongJob:
    """The final reduce job, PLAN record and plan event of ``plan``."""
    parent = template["request_id"]
    # Admission reserves the estimate plus the final output: the whole plan.
    final: InferenceJob = {
        **template,
        "input_tokens_estimate": plan.tokens - template["max_output_tokens"],
    }
    plan_json = plan.as_json()
    record: ChunkSummary = {
        "request_id": parent,
        "kind": "PLAN",
        "level": 0,
        "index": 0,
        "text": "",
        "usage": None,
        "error": None,
        "levels": list(plan.levels),
        "group_size": longdoc.group_size(tier),
        "job": codec().encode("InferenceJob", final),
        "plan": json.dumps(plan_json, separators=(",", ":"), sort_keys=True),
        "reuse_key": key,
        "created_at": template["created_at"],
        "trace": dict(template["trace"]),
    }
    progress = events.progress(events.StreamMeta.of(final), {"stage": "plan", **plan_json})
    return LongJob(plan, final, maps, record, progress)


def plan_ahead(
    request: SummarizeRequest,
    tiers: Mapping[str, Tier],
    settings: WorkerSettings,
    *,
    created_at: int,
) -> TokenEvent | None:
    """The plan's ``progress`` event of a long document from its raw text's count, before it
    is normalised and split (a 1M-token document takes ~1 s to; counting it ~0.1 s); None when
    the request is no long document of its tier. Normalising only changes whitespace, which the
    count splits on, so the count stands; the chunks are the estimate (the split may make a few
    more: the progress events carry the real total)."""
    tier = tiers.get(request.get("tier") or "")
    if tier is None:
        return None
    model = request.get("model") or tier.default_model or settings.default_model
    tokens = count_tokens(request.get("document") or "")
    if not tier.allows(model) or not longdoc.is_long(tokens, tier):
        return None
    if tokens > tier.document_limit:
        if tier.on_input_too_large == "reject":
            return None
        tokens = tier.document_limit  # truncated to it
    requested = request.get("max_output_tokens")
    plan = longdoc.plan(
        tokens,
        tier,
        max_output_tokens=min(requested or tier.max_output_tokens, tier.max_output_tokens),
        overhead_tokens=overhead_tokens(),
        price=price_table(settings.prices_file).price_for(model),
    )
    meta = events.StreamMeta.of(
        {**request, "tier": tier.name, "model": model, "created_at": created_at}
    )
    return events.progress(meta, {"stage": "plan", **plan.as_json()})
