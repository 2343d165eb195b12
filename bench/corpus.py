"""Benchmark documents: deterministic, different for every request, long enough to fill 100 tokens.

Each document names its own subject (a code word built from its index) in every sentence, so
every summary is different and a stream delivered to the wrong client cannot pass the check.
"""

from __future__ import annotations

import random

from pipeline.llm.extractive import summarize

SENTENCES = 24
_SUBJECTS = ("platform", "pipeline", "service", "cluster", "gateway", "ledger", "archive")
_VERBS = (
    "processed",
    "recorded",
    "delivered",
    "summarized",
    "scheduled",
    "replicated",
    "audited",
    "measured",
)
_OBJECTS = (
    "incoming invoices",
    "customer tickets",
    "quarterly reports",
    "sensor readings",
    "contract drafts",
    "support transcripts",
    "shipping manifests",
    "research abstracts",
)
_DETAILS = (
    "across three regional data centres",
    "with a median delay well below one second",
    "after the operations team reviewed the nightly backlog",
    "while the finance group tracked every unit of cost",
    "before the audit window closed on Friday evening",
    "under the retention policy agreed with legal counsel",
    "despite a short outage of the upstream provider",
    "and the dashboard showed steady throughput all week",
)


def codeword(index: int) -> str:
    """The unique subject of document ``index``: one token, never a prefix of another."""
    return f"Unit{index:06d}X"


def document(index: int, clauses: int = 1) -> str:
    """Document ``index``: ``SENTENCES`` sentences of about ``20 * clauses`` words about its
    subject (the summarizer keeps whole sentences, so longer summaries need longer ones)."""
    rng = random.Random(index)
    name = codeword(index)
    sentences = []
    for n in range(SENTENCES):
        subject = rng.choice(_SUBJECTS)
        parts = [
            f"In week {n + 1} the {name} {subject} {rng.choice(_VERBS)} "
            f"{rng.randint(100, 9999)} {rng.choice(_OBJECTS)} {rng.choice(_DETAILS)}"
        ]
        for _ in range(clauses - 1):
            parts.append(
                f"then it {rng.choice(_VERBS)} {rng.randint(100, 9999)} more "
                f"{rng.choice(_OBJECTS)} {rng.choice(_DETAILS)}"
            )
        parts.append(
            f"and {name} reported {rng.randint(2, 99)} exceptions to the {subject} owners."
        )
        sentences.append(", ".join(parts))
    return " ".join(sentences)


def clauses_for(max_tokens: int) -> int:
    """Clauses per sentence so that the summary fills ``max_tokens`` (1 up to 100 tokens)."""
    return 1 if max_tokens <= 100 else -(-max_tokens // 75)


def expected(index: int, max_tokens: int) -> str:
    """The exact text the simulator streams for document ``index``."""
    return summarize(document(index, clauses_for(max_tokens)), max_tokens)


def request(index: int, max_tokens: int) -> tuple[str, str]:
    """(document, expected summary) for request ``index``."""
    return document(index, clauses_for(max_tokens)), expected(index, max_tokens)
