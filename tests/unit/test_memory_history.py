"""History as context (pipeline/memory/history.py, pipeline/worker/memory/history.py)."""

from __future__ import annotations

from typing import cast

from pipeline.core.prompt import user_message
from pipeline.core.records import InferenceJob, SummarizeRequest
from pipeline.core.settings import KafkaSettings
from pipeline.core.tiers import Tier
from pipeline.llm.extractive import count_tokens
from pipeline.memory.history import HistoryTable, PastSummary, relevant, render
from pipeline.worker.memory.history import split_input, with_history

PAST = [
    PastSummary("r1", 1, "Kafka partitions keep an ordered log; consumers commit offsets."),
    PastSummary("r2", 2, "The Lisbon weather was sunny and lunch was served at noon."),
    PastSummary("r3", 3, "Compaction keeps the last record per key of a Kafka topic."),
]


def tier(memory_tokens: int = 1_000, max_input_tokens: int = 10_000) -> Tier:
    return Tier(
        "pro", 1, 1, max_input_tokens, 1, 1, 1.0, 1.0, "reject", memory_tokens=memory_tokens
    )


def job(user: str = "ann", document: str = "Kafka consumers read partitions.") -> InferenceJob:
    return cast(
        InferenceJob,
        {
            "request_id": "new",
            "user_id": user,
            "tier": "pro",
            "system": "S.",
            "prompt": user_message(document, "Summarize."),
            "chunks": [],
            "input_tokens_estimate": 20,
        },
    )


def table(user: str = "ann") -> HistoryTable:
    found = HistoryTable(KafkaSettings())
    for p in PAST:
        found.remember(
            {  # type: ignore[typeddict-item]
                "request_id": p.request_id,
                "user_id": user,
                "status": "COMPLETED",
                "summary": p.summary,
                "created_at": p.created_at,
            }
        )
    return found


def test_relevant_ranks_by_bm25_and_drops_what_shares_nothing() -> None:
    chosen = relevant(PAST, "How do Kafka consumers commit offsets of partitions?", 1_000)
    assert chosen[0].request_id == "r1"
    assert "r2" not in [p.request_id for p in chosen]


def test_relevant_stays_within_the_budget() -> None:
    first = count_tokens(PAST[0].summary)
    chosen = relevant(PAST, "Kafka partitions offsets compaction key topic", first)
    assert sum(count_tokens(p.summary) for p in chosen) <= first
    assert relevant(PAST, "Kafka", 0) == []


def test_history_goes_to_the_system_prompt_counted_as_memory() -> None:
    request = cast(SummarizeRequest, {"context": "history"})
    out = split_input(with_history(job(), request, table(), tier()))
    assert "<history>" in out["system"] and PAST[0].summary in out["system"]
    assert out["memory_tokens"] > 0
    assert out["document_tokens"] == count_tokens("Kafka consumers read partitions.")
    total = out["document_tokens"] + out["memory_tokens"] + out["instruction_tokens"]
    assert total == out["input_tokens_estimate"]


def test_no_history_without_asking_for_another_user_or_before_forgetting() -> None:
    asked = cast(SummarizeRequest, {"context": "history"})
    assert (
        "<history>"
        not in with_history(job(), cast(SummarizeRequest, {}), table(), tier())["system"]
    )
    assert "<history>" not in with_history(job("ben"), asked, table("ann"), tier())["system"]
    forgot = with_history(job(), asked, table(), tier(), forgotten_at=3)
    assert "<history>" not in forgot["system"]


def test_memory_counts_toward_the_input_limit() -> None:
    asked = cast(SummarizeRequest, {"context": "history"})
    document = "Kafka consumers read partitions."
    # The input limit leaves no room beyond the document: no history.
    full = tier(max_input_tokens=count_tokens(document))
    assert "<history>" not in with_history(job(), asked, table(), full)["system"]


def test_render_is_empty_without_choice() -> None:
    assert render([]) == ""
