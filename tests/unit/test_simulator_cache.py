"""Prompt caching in the simulator (pipeline/llm/simulator/cache.py) and what it costs (pricing)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from pipeline.core.pricing import ModelPrice, PriceTable
from pipeline.core.settings import SimulatorSettings, WorkerSettings
from pipeline.llm.client import Finished, UpstreamClient
from pipeline.llm.extractive import count_tokens
from pipeline.llm.simulator.app import LocalSimulator, serving
from pipeline.llm.simulator.cache import CacheUsage, PromptCache, Segment

MODEL = "claude-haiku-4-5"
SENTENCES = [
    "Kafka keeps an ordered log for every partition of a topic.",
    "Consumers in a group share the partitions and commit their offsets.",
    "Compaction keeps the last record for every key of a topic.",
    "Retention decides how long the broker keeps the records of a log.",
]


def document(words: int) -> str:
    """A document of about ``words`` simulator tokens."""
    text, i = [], 0
    while sum(count_tokens(s) for s in text) < words:
        text.append(f"{SENTENCES[i % len(SENTENCES)]} Section {i}.")
        i += 1
    return " ".join(text)


def marked(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}


# -- the cache alone ------------------------------------------------------------------------


def test_first_call_writes_the_marked_prefix_and_the_next_reads_it() -> None:
    cache = PromptCache(min_tokens=10)
    doc = document(50)
    segments = (Segment("user", doc, ttl_s=300.0), Segment("user", "Summarize it."))
    total = count_tokens(doc) + 2
    first = cache.account(MODEL, segments, total, now=0.0)
    assert first == CacheUsage(2, cache_creation_input_tokens=count_tokens(doc))
    second = cache.account(MODEL, segments, total, now=10.0)
    assert second == CacheUsage(2, cache_read_input_tokens=count_tokens(doc))


def test_an_entry_expires_after_its_ttl_since_last_use() -> None:
    cache = PromptCache(min_tokens=1)
    segments = (Segment("user", "a b c", ttl_s=300.0),)
    cache.account(MODEL, segments, 3, now=0.0)
    # A hit at 200 s refreshes the entry, so 450 s is still within 300 s of the last use.
    assert cache.account(MODEL, segments, 3, now=200.0).cache_read_input_tokens == 3
    assert cache.account(MODEL, segments, 3, now=450.0).cache_read_input_tokens == 3
    assert cache.account(MODEL, segments, 3, now=800.0).cache_creation_input_tokens == 3


def test_short_prefixes_model_and_text_changes_are_not_hits() -> None:
    cache = PromptCache(min_tokens=10)
    short = (Segment("user", "too short", ttl_s=300.0),)
    assert cache.account(MODEL, short, 2, now=0.0) == CacheUsage(2)
    doc = (Segment("user", document(20), ttl_s=300.0),)
    tokens = count_tokens(doc[0].text)
    cache.account(MODEL, doc, tokens, now=0.0)
    other_model = cache.account("claude-sonnet-4-5", doc, tokens, now=1.0)
    assert other_model.cache_read_input_tokens == 0
    changed = (Segment("user", doc[0].text + " More.", ttl_s=300.0),)
    assert cache.account(MODEL, changed, tokens + 1, now=1.0).cache_read_input_tokens == 0


def test_the_longest_cached_breakpoint_is_read_and_the_rest_written() -> None:
    cache = PromptCache(min_tokens=5)
    doc, turn = document(30), document(12)
    first = (Segment("user", doc, ttl_s=300.0), Segment("user", "q1"))
    cache.account(MODEL, first, count_tokens(doc) + 1, now=0.0)
    # Turn two: the document is read, the earlier turn is written at the second breakpoint.
    second = (
        Segment("user", doc, ttl_s=300.0),
        Segment("assistant", turn, ttl_s=300.0),
        Segment("user", "q2"),
    )
    total = count_tokens(doc) + count_tokens(turn) + 1
    usage = cache.account(MODEL, second, total, now=1.0)
    assert usage == CacheUsage(1, count_tokens(turn), count_tokens(doc))


# -- pricing --------------------------------------------------------------------------------


def test_cache_writes_cost_1_25x_and_reads_0_1x_input_by_default() -> None:
    price = ModelPrice(Decimal("3"), Decimal("15"))
    assert price.micro_usd(0, 0, cache_creation_tokens=1_000) == 3_750
    assert price.micro_usd(0, 0, cache_read_tokens=1_000) == 300
    assert price.micro_usd(100, 10, 1_000, 1_000) == 300 + 150 + 3_750 + 300


def test_a_price_row_may_set_its_own_cache_prices(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        "[default]\ninput_per_mtok = 3\noutput_per_mtok = 15\n"
        '[models."m"]\ninput_per_mtok = 1\noutput_per_mtok = 5\n'
        "cache_write_per_mtok = 2\ncache_read_per_mtok = 0.5\n"
    )
    table = PriceTable.load(path)
    assert table.micro_usd("m", 0, 0, 1_000, 1_000) == 2_000 + 500
    assert table.micro_usd("other", 0, 0, 1_000, 1_000) == 3_750 + 300


# -- over HTTP, through the SDK and the worker's client -------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[LocalSimulator]:
    settings = SimulatorSettings(port=0, ttft_ms=1, token_delay_ms=0)
    async with serving(settings) as running:
        yield running


async def test_the_sdk_sees_cache_usage_and_too_many_breakpoints_are_400(
    sim: LocalSimulator,
) -> None:
    doc = document(1_500)
    messages: Any = [{"role": "user", "content": [marked(doc), {"type": "text", "text": "Sum."}]}]
    async with anthropic.AsyncAnthropic(base_url=sim.url, api_key="k", max_retries=0) as sdk:
        first = await sdk.messages.create(model=MODEL, max_tokens=20, messages=messages)
        second = await sdk.messages.create(model=MODEL, max_tokens=20, messages=messages)
        five: Any = [{"role": "user", "content": [marked(f"block {i}") for i in range(5)]}]
        with pytest.raises(anthropic.BadRequestError, match="maximum of 4 blocks"):
            await sdk.messages.create(model=MODEL, max_tokens=20, messages=five)
    assert first.usage.cache_creation_input_tokens == count_tokens(doc)
    assert first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens == count_tokens(doc)
    assert second.usage.input_tokens == 1
    async with httpx.AsyncClient(base_url=sim.url) as http:
        stats = (await http.get("/_sim/stats", params={"records": "false"})).json()
    assert stats["input_tokens"]["cache_read"] == count_tokens(doc)


async def test_five_turns_over_a_20k_token_document_read_it_from_the_cache(
    sim: LocalSimulator,
) -> None:
    """The figure for docs: what caching the document saves over a 5-turn conversation."""
    doc = document(20_000)
    upstream = UpstreamClient(WorkerSettings(llm_sim_url=sim.url))
    history: list[dict[str, Any]] = []
    finished: list[Finished] = []
    try:
        for turn in range(5):
            question = {"type": "text", "text": f"Question {turn}: what about retention?"}
            first_turn = [marked(doc), question] if turn == 0 else [question]
            messages = [*history, {"role": "user", "content": first_turn}]
            async with upstream.stream(
                request_id=f"turn-{turn}", model=MODEL, system="", messages=messages, max_tokens=40
            ) as stream:
                answer = ""
                async for item in stream:
                    if isinstance(item, Finished):
                        finished.append(item)
                    else:
                        answer += item.text
            history = [*messages, {"role": "assistant", "content": answer}]
    finally:
        await upstream.close()
    doc_tokens = count_tokens(doc)
    assert finished[0].cache_creation_input_tokens == doc_tokens
    assert [f.cache_read_input_tokens for f in finished[1:]] == [doc_tokens] * 4
    prices = ModelPrice(Decimal("1"), Decimal("5"))
    cached = sum(
        prices.micro_usd(
            f.input_tokens, 0, f.cache_creation_input_tokens, f.cache_read_input_tokens
        )
        for f in finished
    )
    uncached = sum(
        prices.micro_usd(
            f.input_tokens + f.cache_creation_input_tokens + f.cache_read_input_tokens, 0
        )
        for f in finished
    )
    written = sum(f.cache_creation_input_tokens for f in finished)
    read = sum(f.cache_read_input_tokens for f in finished)
    plain = sum(f.input_tokens for f in finished)
    print(
        f"\nFIGURES cache: {plain + written + read} input tokens over 5 turns, {written} written, "
        f"{read} read, {plain} uncached; {cached} micro-USD instead of {uncached} at 1 USD/MTok"
    )
    # 1.25 + 4 x 0.1 = 1.65 document-prices instead of 5: about two thirds saved.
    assert cached < uncached * 0.4
