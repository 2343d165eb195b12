"""Preprocess adds a user's own past summaries ("context": "history") and splits the input
estimate into document, memory and instructions (docs/architecture.md, "Context and memory").

History is looked up by the job's user, which identity checks made the server's: nothing in
the request names whose history is read.
"""

from __future__ import annotations

from pipeline.core.records import InferenceJob, SummarizeRequest
from pipeline.core.tiers import Tier
from pipeline.llm.extractive import count_tokens, document_of
from pipeline.memory.history import PREAMBLE, HistoryTable, relevant, render


def with_history(
    job: InferenceJob,
    request: SummarizeRequest,
    table: HistoryTable | None,
    tier: Tier,
    *,
    forgotten_at: int = 0,
) -> InferenceJob:
    """``job`` with the most relevant past summaries of its user in the system prompt, within
    the tier's memory budget and what its input limit leaves after the document."""
    if request.get("context") != "history" or table is None:
        return job
    document = document_of(job["prompt"])
    room = tier.max_input_tokens - count_tokens(document)
    budget = max(0, min(tier.memory_tokens, room))
    past = [
        p
        for p in table.of(job["user_id"])
        if p.created_at > forgotten_at and p.request_id != job["request_id"]
    ]
    block = render(relevant(past, document, budget))
    if block:
        added = f"\n\n{PREAMBLE}\n{block}"
        job["system"] = (job.get("system") or "") + added
        tokens = count_tokens(added)
        job["memory_tokens"] = int(job.get("memory_tokens") or 0) + tokens
        job["input_tokens_estimate"] += tokens
    return job


def split_input(job: InferenceJob) -> InferenceJob:
    """Set the estimate's split: the document (or its parts), memory, and the rest."""
    parts = job.get("chunks") or []
    document = sum(count_tokens(document_of(p)) for p in parts) if parts else None
    if document is None:
        document = count_tokens(document_of(job["prompt"]))
    memory = int(job.get("memory_tokens") or 0)
    job["document_tokens"] = document
    job["memory_tokens"] = memory
    job["instruction_tokens"] = max(0, job["input_tokens_estimate"] - document - memory)
    return job
