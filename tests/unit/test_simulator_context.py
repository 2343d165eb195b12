"""The simulator's context window and ``count_tokens`` endpoint, and the local token estimate
measured against it on real text (the standard library's own sources)."""

from __future__ import annotations

import sysconfig
from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import httpx
import pytest

from pipeline.core.prompt import SYSTEM_PROMPT, user_message
from pipeline.core.settings import SimulatorSettings
from pipeline.llm.extractive import count_tokens
from pipeline.llm.simulator.app import LocalSimulator, serving

MODEL = "claude-haiku-4-5"


@pytest.fixture
async def sim() -> AsyncIterator[LocalSimulator]:
    async with serving(SimulatorSettings(port=0, ttft_ms=1, token_delay_ms=0)) as running:
        yield running


@pytest.fixture
async def client(sim: LocalSimulator) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=sim.url, api_key="k", max_retries=0) as sdk:
        yield sdk


def stdlib_texts(count: int) -> list[str]:
    """Real text: the first ``count`` stdlib modules (docstrings, comments and code)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 4_000)[:count]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


async def test_a_prompt_over_the_context_window_is_the_apis_400(
    sim: LocalSimulator, client: anthropic.AsyncAnthropic
) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        await http.post("/_sim/config", json={"context_window_tokens": 50})
    prompt = " ".join(["word"] * 60)
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": prompt}]
        )
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == "prompt is too long: 60 tokens > 50 maximum"


async def test_input_plus_max_tokens_over_the_window_is_refused_too(
    sim: LocalSimulator, client: anthropic.AsyncAnthropic
) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        await http.post("/_sim/config", json={"context_window_tokens": 50})
    with pytest.raises(anthropic.BadRequestError, match=r"40 \+ 20 > 50"):
        await client.messages.create(
            model=MODEL,
            max_tokens=20,
            messages=[{"role": "user", "content": " ".join(["word"] * 40)}],
        )
    fits = await client.messages.create(
        model=MODEL, max_tokens=10, messages=[{"role": "user", "content": " ".join(["w"] * 40)}]
    )
    assert fits.usage.input_tokens == 40


async def test_the_default_window_is_the_models_200k(sim: LocalSimulator) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "x " * 200_001}],
    }
    async with httpx.AsyncClient(base_url=sim.url, headers={"x-api-key": "k"}) as http:
        answer = await http.post("/v1/messages", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "prompt is too long: 200001 tokens > 200000 maximum"


async def test_count_tokens_answers_the_input_tokens_a_call_is_billed(
    sim: LocalSimulator, client: anthropic.AsyncAnthropic
) -> None:
    text = stdlib_texts(1)[0]
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": text}]
    counted = await client.messages.count_tokens(
        model=MODEL, system=SYSTEM_PROMPT, messages=messages
    )
    billed = await client.messages.create(
        model=MODEL, system=SYSTEM_PROMPT, max_tokens=5, messages=messages
    )
    assert counted.input_tokens == billed.usage.input_tokens > 500
    async with httpx.AsyncClient(base_url=sim.url) as http:
        assert (await http.get("/_sim/stats")).json()["count_tokens_calls"] == 1
        refused = await http.post("/v1/messages/count_tokens", json={"model": MODEL})
    assert refused.status_code == 401


async def test_the_local_estimate_is_within_one_percent_of_the_simulators_count(
    client: anthropic.AsyncAnthropic,
) -> None:
    # The estimate preprocess plans with is the simulator's tokenizer applied locally
    # (docs/architecture.md, "Long documents"); measured here on 40 real files, whole prompts.
    errors: list[float] = []
    for text in stdlib_texts(40):
        prompt = user_message(text, "Summarize the document above.")
        estimate = count_tokens(SYSTEM_PROMPT) + count_tokens(prompt)
        counted = await client.messages.count_tokens(
            model=MODEL, system=SYSTEM_PROMPT, messages=[{"role": "user", "content": prompt}]
        )
        errors.append(abs(estimate - counted.input_tokens) / counted.input_tokens)
    assert len(errors) == 40
    assert max(errors) <= 0.01
