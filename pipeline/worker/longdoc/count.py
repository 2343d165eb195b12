"""The upstream's own token count of a long document, for its plan (docs/architecture.md, "Long
documents"): asked when a real key is configured (or ``count_tokens_upstream`` says so); the
local estimate stands when it is not, or when the count fails."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from pipeline.core.pricing import price_table
from pipeline.core.prompt import SYSTEM_PROMPT
from pipeline.core.records import SummarizeRequest
from pipeline.core.settings import WorkerSettings
from pipeline.core.tiers import Tier
from pipeline.llm.client import UpstreamClient
from pipeline.llm.extractive import count_tokens
from pipeline.worker.longdoc.split import LongJob, overhead_tokens, recounted

log = logging.getLogger("sumstream.preprocess")

# (model, document) -> the document's tokens as the upstream counts them.
Count = Callable[[str, str], Awaitable[int]]


def counts_upstream(settings: WorkerSettings) -> bool:
    """Whether preprocess asks the upstream: by the setting, else when a real key is set."""
    if settings.count_tokens_upstream is not None:
        return settings.count_tokens_upstream
    return UpstreamClient.has_real_key(settings)


class UpstreamCount:
    """The upstream's count of a document: a :data:`Count` over its own client."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._client = UpstreamClient(settings)
        self._system_tokens = count_tokens(SYSTEM_PROMPT)

    async def __call__(self, model: str, document: str) -> int:
        # The document as the one user message of a call; the system prompt's share is the
        # local figure (a few tokens either way), as the plan adds it per call itself.
        total = await self._client.count_tokens(
            model=model, system=SYSTEM_PROMPT, messages=[{"role": "user", "content": document}]
        )
        return max(1, total - self._system_tokens)

    async def close(self) -> None:
        await self._client.close()


def upstream_count(settings: WorkerSettings) -> UpstreamCount | None:
    """The upstream's count, or None when preprocess counts locally only (the worker keeps
    it for its lifetime)."""
    return UpstreamCount(settings) if counts_upstream(settings) else None


async def counted(
    long: LongJob,
    request: SummarizeRequest,
    count: Count,
    tiers: Mapping[str, Tier],
    settings: WorkerSettings,
) -> LongJob:
    """``long`` planned on the upstream's count of its document (the raw document, whitespace
    included: never below the normalised one's count); the local estimate stands for a cut
    document or when the count fails."""
    tier = tiers.get(long.final["tier"])
    if tier is None or long.final["truncated"]:
        return long
    model = long.final["model"]
    try:
        tokens = await count(model, request.get("document") or "")
    except Exception as exc:
        # The count sharpens the estimate; it never stops a request.
        log.warning("upstream token count failed", extra={"error": repr(exc)})
        return long
    log.info(
        "long document counted upstream",
        extra={
            "request_id": long.final["request_id"],
            "local_tokens": long.plan.document_tokens,
            "upstream_tokens": tokens,
        },
    )
    price = price_table(settings.prices_file).price_for(model)
    return recounted(long, tokens, tier, price, overhead_tokens=overhead_tokens())
