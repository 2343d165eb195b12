"""A long document's plan on the upstream's own token count (docs/architecture.md, "Long
documents"): asked when counting is enabled, here of a real simulator's ``count_tokens``
endpoint; the local estimate stands when the count fails."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import pytest
from pydantic import SecretStr

from pipeline.core.codec import codec
from pipeline.core.prompt import SYSTEM_PROMPT
from pipeline.core.settings import SimulatorSettings, WorkerSettings
from pipeline.llm.extractive import count_tokens
from pipeline.llm.simulator.app import LocalSimulator, serving
from pipeline.worker.dlq import DeadLetterQueue, Origin
from pipeline.worker.longdoc.count import counts_upstream, upstream_count
from pipeline.worker.preprocess import PreprocessStage
from tests.harness import free_port
from tests.unit.test_longdoc import LONG, NOW, document, request
from tests.unit.test_preprocess import Sink

ORIGIN = Origin("t.requests", 0, 7)
DOC = document(300)  # ~4,500 tokens: map-reduced on LONG (1,000 per call)


@pytest.fixture
async def sim() -> AsyncIterator[LocalSimulator]:
    async with serving(SimulatorSettings(port=0, ttft_ms=1, token_delay_ms=0)) as running:
        yield running


async def plan_of(settings: WorkerSettings) -> dict[str, object]:
    """The plan event preprocess sends for DOC, counting as ``settings`` say."""
    tokens, chunks, jobs, dead = Sink(), Sink(), Sink(), Sink()
    count = upstream_count(settings)
    stage = PreprocessStage(
        settings,
        {"pro": LONG},
        send_job=jobs,
        send_token=tokens,
        send_chunk=chunks,
        dlq=DeadLetterQueue(dead, clock=lambda: NOW / 1000),
        count=count,
        clock=lambda: NOW / 1000,
    )
    try:
        await stage.handle(b"k", codec().encode("SummarizeRequest", request(DOC)), ORIGIN, NOW)
    finally:
        if count is not None:
            await count.close()
    assert dead.sent == [] and jobs.sent
    [(_, raw)] = tokens.sent
    plan: dict[str, object] = json.loads(codec().decode_as(raw, "TokenEvent")["text"])
    assert plan["stage"] == "plan"
    return plan


def test_preprocess_asks_the_upstream_when_a_real_key_is_set_or_the_setting_says_so() -> None:
    key = SecretStr("sk-real")
    assert not counts_upstream(WorkerSettings(anthropic_api_key=None))
    assert counts_upstream(WorkerSettings(anthropic_api_key=key))
    assert not counts_upstream(WorkerSettings(anthropic_api_key=key, count_tokens_upstream=False))
    assert counts_upstream(WorkerSettings(anthropic_api_key=None, count_tokens_upstream=True))


async def test_the_plan_takes_the_upstreams_count_when_counting_is_enabled(
    sim: LocalSimulator,
) -> None:
    settings = WorkerSettings(
        anthropic_api_key=None, count_tokens_upstream=True, llm_sim_url=sim.url
    )
    plan = await plan_of(settings)
    assert sim.app.stats.counts == 1
    async with anthropic.AsyncAnthropic(base_url=sim.url, api_key="k", max_retries=0) as sdk:
        counted = await sdk.messages.count_tokens(
            model="claude-haiku-4-5",
            system=SYSTEM_PROMPT,
            messages=[{"role": "user", "content": DOC}],
        )
    assert plan["document_tokens"] == counted.input_tokens - count_tokens(SYSTEM_PROMPT)


async def test_the_local_estimate_stands_when_the_upstream_count_fails() -> None:
    # Nothing listens there: the count fails to connect.
    unreachable = f"http://127.0.0.1:{free_port()}"
    settings = WorkerSettings(
        anthropic_api_key=None,
        count_tokens_upstream=True,
        llm_sim_url=unreachable,
        upstream_connect_timeout_s=1.0,
    )
    plan = await plan_of(settings)
    local = await plan_of(WorkerSettings(anthropic_api_key=None, count_tokens_upstream=False))
    assert plan == local
    assert plan["document_tokens"] == count_tokens(DOC)
