"""The records of a long document's reduce step: a chunk call's summary from its result, the
collapse and final jobs, and the progress events (docs/architecture.md, "Long documents")."""

from __future__ import annotations

from pipeline.core.records import ChunkSummary, SummaryResult

# Summaries of a level that count as done: the text is there, whole or cut short.
SUMMARY_STATUSES = ("COMPLETED", "PARTIAL")


def chunk_summary(result: SummaryResult, parent: str, level: int, index: int) -> ChunkSummary:
    """The SUMMARY (or FAILED) record of one chunk call, from the result postprocess built."""
    ok = result["status"] in SUMMARY_STATUSES and bool(result["summary"])
    return {
        "request_id": parent,
        "kind": "SUMMARY" if ok else "FAILED",
        "level": level,
        "index": index,
        "text": result["summary"],
        "usage": result["usage"],
        "error": result["error"],
        "levels": [],
        "group_size": 2,
        "job": b"",
        "plan": "",
        "reuse_key": "",
        "created_at": result["created_at"],
        "trace": dict(result["trace"]),
    }
