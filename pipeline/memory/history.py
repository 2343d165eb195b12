"""A user's own history as context: their past summaries, the most relevant first (BM25).

``HistoryTable`` reads `results` (every partition, the last ``window``) into each user's recent
summaries; ``relevant`` ranks them against a new document with BM25 (``bm25s``: a sparse-matrix
BM25 with its own English stop words, no model to download) and keeps what fits the tier's
memory budget. See docs/architecture.md, "Context and memory".
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import bm25s
from aiokafka import TopicPartition

from pipeline.core import sealing
from pipeline.core.clock import now_ms
from pipeline.core.codec import codec
from pipeline.core.errors import CodecError
from pipeline.core.records import SummaryResult
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.partition_tail import PartitionTail, partition_ids
from pipeline.llm.extractive import count_tokens

log = logging.getLogger("sumstream.memory")

# Past summaries kept per user, and how far back the table reads `results` at start.
PER_USER = 200
WINDOW_MS = 7 * 24 * 3600 * 1000
# The query is the document's start: enough words to say what it is about.
QUERY_WORDS = 2_000
TOP_K = 5
PREAMBLE = (
    "The reader's own earlier summaries that may be relevant are inside <history> tags. Use "
    "them only as background; summarize the document above, not them."
)


@dataclass(frozen=True, slots=True)
class PastSummary:
    request_id: str
    created_at: int
    summary: str


def relevant(past: Sequence[PastSummary], query: str, budget_tokens: int) -> list[PastSummary]:
    """The past summaries most relevant to ``query`` (BM25), best first, within the budget."""
    if not past or budget_tokens <= 0:
        return []
    corpus = [p.summary for p in past]
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False
    )
    words = " ".join(query.split()[:QUERY_WORDS])
    found, scores = retriever.retrieve(
        bm25s.tokenize([words], stopwords="en", show_progress=False),
        k=min(TOP_K, len(corpus)),
        show_progress=False,
    )
    chosen: list[PastSummary] = []
    used = 0
    for index, score in zip(found[0], scores[0], strict=True):
        if score <= 0:
            break  # nothing in common with the document
        tokens = count_tokens(past[int(index)].summary)
        if used + tokens <= budget_tokens:
            chosen.append(past[int(index)])
            used += tokens
    return chosen


def render(chosen: Sequence[PastSummary]) -> str:
    """The <history> block, or "" when nothing was chosen."""
    if not chosen:
        return ""
    items = "\n".join(f'<summary id="{p.request_id}">\n{p.summary}\n</summary>' for p in chosen)
    return f"<history>\n{items}\n</history>"


class HistoryTable:
    """Each user's recent COMPLETED summaries, read from `results` (a cache of the log)."""

    def __init__(self, settings: KafkaSettings, *, start_timeout_s: float = 60.0) -> None:
        self.settings = settings
        self.topic = TopicNames.from_settings(settings).results
        self._start_timeout_s = start_timeout_s
        self._by_user: dict[str, deque[PastSummary]] = {}
        self._tail: PartitionTail | None = None

    def of(self, user_id: str) -> list[PastSummary]:
        return list(self._by_user.get(user_id, ()))

    async def start(self) -> None:
        connection = ConnectionConfig.from_settings(self.settings)
        self._tail = PartitionTail(connection, name="history", poll_timeout_ms=500)
        try:
            consumer = await self._tail.open()
            tps = [
                TopicPartition(self.topic, p)
                for p in sorted(await partition_ids(consumer, self.topic))
            ]
            await self._tail.assign(tps, since_ms=now_ms() - WINDOW_MS)
            self._tail.run(self._apply_batch)
            async with asyncio.timeout(self._start_timeout_s):
                await self._tail.caught_up.wait()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        tail, self._tail = self._tail, None
        if tail is not None:
            await tail.stop()

    async def _apply_batch(self, tp: TopicPartition, messages: list[Any]) -> None:
        for message in messages:
            if message.value is None:
                continue
            try:
                result = cast(SummaryResult, codec().decode_as(message.value, "SummaryResult"))
            except CodecError:
                continue  # postprocess wrote it: nothing else writes results
            self.remember(result)

    def remember(self, result: SummaryResult) -> None:
        if result["status"] != "COMPLETED" or result["summary"] in ("", sealing.FORGOTTEN):
            return
        past = self._by_user.setdefault(result["user_id"], deque(maxlen=PER_USER))
        if any(p.request_id == result["request_id"] for p in past):
            return  # a result redelivered or compacted again
        past.append(PastSummary(result["request_id"], int(result["created_at"]), result["summary"]))
