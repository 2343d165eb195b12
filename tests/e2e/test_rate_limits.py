"""Finishing what is accepted against a rate-limited upstream (docs/architecture.md, "Rate
limits and adaptive concurrency"), on real processes: simulator, worker, gateway, broker.

One stack serves the module; the tests run in file order. The token-bucket test runs first so
that the gateway's measured capacity is the rate-limited one (it remembers the highest recent
throughput); the two-worker test runs last, as it adds a worker and kills it. Figures are
printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.documents import document
from tests.e2e.faults import metric
from tests.harness import (
    Stack,
    StreamResult,
    TierRow,
    auth,
    collect,
    eventually,
    running_stack,
    wait_for_balanced_group,
    write_tiers,
)

pytestmark = pytest.mark.e2e

MAX_TOKENS = 60
DEFAULT_DEADLINE_S = 30.0
WIDE_WAIT_S = 120.0  # `enterprise` here (key-ann): its requests are never shed
QUICK_WAIT_S = 4.0  # `quick` (key-zed): shed when the expected wait passes 4 s
# The token bucket: 60,000 a minute is 1,000 a second, two requests of ~500 tokens.
TOKENS_PER_MINUTE = 60_000
OFFERED_PER_S = 4.0
OFFERED = 60
WORK_PARTITIONS = 6  # WorkerSettings.work_partitions (default)


def tiers_file(path: Path) -> Path:
    wide: TierRow = (6_000, 10_000_000, 100_000, 1_024, 1, 100_000.0, WIDE_WAIT_S)
    quick: TierRow = (6_000, 10_000_000, 100_000, 1_024, 1, 100_000.0, QUICK_WAIT_S)
    tiers = {"free": wide, "pro": wide, "enterprise": wide, "quick": quick, "tight": wide}
    return write_tiers(path, tiers)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("ratelimits")
    env = {
        "SUMSTREAM_TIERS_FILE": str(tiers_file(tmp / "tiers.toml")),
        "SUMSTREAM_DEFAULT_DEADLINE_S": str(DEFAULT_DEADLINE_S),
        "SUMSTREAM_MAX_STREAMS_PER_USER": "64",
        # Few jobs wait in the worker's memory: the rest is lag the gateway sees.
        "SUMSTREAM_MAX_QUEUED": "2",
    }
    with running_stack(tmp, env=env) as s:
        yield s


def fresh_sim(stack: Stack, **knobs: Any) -> None:
    """Clear the simulator's counters and set this test's knobs."""
    httpx.post(f"{stack.sim_url}/_sim/reset", timeout=5).raise_for_status()
    stack.sim_config(**knobs)


def completed_in_time(result: StreamResult, wait_s: float) -> bool:
    if result.status_code != 200 or not result.of("done"):
        return False
    done = result.done
    deadline_ms = (wait_s + DEFAULT_DEADLINE_S) * 1000
    return bool(
        done["status"] == "COMPLETED" and done["completed_at"] - done["created_at"] <= deadline_ms
    )


async def summarize(client: httpx.AsyncClient, url: str, doc: str, key: str) -> StreamResult:
    return await collect(
        client,
        "POST",
        f"{url}/v1/summaries",
        json={"document": doc, "max_output_tokens": MAX_TOKENS},
        headers=auth(key),
    )


async def drain_token_bucket(stack: Stack) -> None:
    """Another client of the same organisation spends the bucket: big prompts, then small
    ones, each until a 429."""
    body = {"model": "claude-haiku-4-5", "max_tokens": 1}
    async with httpx.AsyncClient(base_url=stack.sim_url, timeout=30) as sim:
        for size in (40, 4, 1):
            prompt = " ".join(document(9_000 + i) for i in range(size))
            for _ in range(100):
                answer = await sim.post(
                    "/v1/messages",
                    json={**body, "messages": [{"role": "user", "content": prompt}]},
                    headers={"x-api-key": "other-client"},
                )
                if answer.status_code == 429:
                    break
            else:
                raise AssertionError("the token bucket never ran out")


async def test_a_token_bucket_of_half_the_load_completes_every_accepted_request(
    stack: Stack,
) -> None:
    fresh_sim(stack, ttft_ms=50, token_delay_ms=2, tokens_per_minute=TOKENS_PER_MINUTE)
    await drain_token_bucket(stack)
    before = stack.sim_stats()["attempts"]
    async with httpx.AsyncClient(timeout=120) as client:

        async def offered(i: int) -> StreamResult:
            await asyncio.sleep(i / OFFERED_PER_S)  # an open-loop arrival schedule
            return await summarize(client, stack.gateway, document(100 + i), "key-zed")

        results = await asyncio.gather(*(offered(i) for i in range(OFFERED)))
    refused = [r for r in results if r.status_code == 503]
    completed = [r for r in results if completed_in_time(r, QUICK_WAIT_S)]
    attempts = stack.sim_stats()["attempts"] - before
    print(
        f"\ntoken bucket: {len(completed)} completed, {len(refused)} refused at the door, "
        f"{attempts} upstream attempts ({attempts / max(1, len(completed)):.2f} per completed)"
    )
    # Every request either completed within its deadline or was refused before it was accepted.
    assert len(completed) + len(refused) == OFFERED, [r.events[-2:] for r in results]
    assert all(r.headers.get("retry-after") for r in refused)
    # The door refuses some and admits a fair part: at steady state half, less while the
    # gateway's throughput estimate starts from its floor (1/s) on a loaded machine.
    assert refused and len(completed) >= OFFERED // 5
    assert attempts <= 1.2 * len(completed)
    paced = metric(stack.workers[0], "sumstream_upstream_paced_calls_total", reason="bucket")
    assert paced > 0, "calls were held for the bucket, not sent into a 429"


async def test_an_upstream_of_8_slots_finishes_64_clients_within_their_deadline(
    stack: Stack,
) -> None:
    fresh_sim(stack, ttft_ms=100, token_delay_ms=4, max_concurrent=8, retry_after_s=1.0)
    async with httpx.AsyncClient(timeout=120) as client:
        results = await asyncio.gather(
            *(summarize(client, stack.gateway, document(200 + i), "key-ann") for i in range(64))
        )
    stats = stack.sim_stats()
    completed = [r for r in results if completed_in_time(r, WIDE_WAIT_S)]
    per_completed = stats["attempts"] / max(1, len(completed))
    print(
        f"\n8 slots, 64 clients: {len(completed)}/64 completed, {stats['by_status']}, "
        f"{per_completed:.3f} attempts per completed, peak {stats['peak_concurrent']} open"
    )
    assert len(completed) == 64, [r.events[-2:] for r in results if r not in completed]
    assert per_completed <= 1.1
    limit = metric(stack.workers[0], "sumstream_upstream_concurrency_limit")
    assert 1 <= limit <= 9, "the learned limit settled at the upstream's 8 slots"


async def test_random_429s_on_30_percent_of_calls_are_retried_to_completion(stack: Stack) -> None:
    # Seed 1 makes 85 draws for 60 successes (1.42 a success, the expectation being 1.43).
    fresh_sim(stack, ttft_ms=20, token_delay_ms=1, error_rate=0.3, error_status=429, seed=1)
    budget_before = metric(stack.workers[0], "sumstream_retry_budget_exhausted_total")
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=180) as client:

        async def client_loop(c: int) -> list[StreamResult]:
            return [
                await summarize(client, stack.gateway, document(300 + 6 * c + i), "key-ann")
                for i in range(6)
            ]

        batches = await asyncio.gather(*(client_loop(c) for c in range(10)))
    results = [r for batch in batches for r in batch]
    stats = stack.sim_stats()
    completed = [r for r in results if completed_in_time(r, WIDE_WAIT_S)]
    per_completed = stats["attempts"] / max(1, len(completed))
    print(
        f"\nrandom 30 % 429: {len(completed)}/60 completed, {stats['by_status']}, "
        f"{per_completed:.3f} attempts per completed, {time.monotonic() - started:.1f} s"
    )
    assert len(completed) >= 59
    assert per_completed <= 1.5
    # 429s are not charged to the retry budget: it refused nothing.
    assert metric(stack.workers[0], "sumstream_retry_budget_exhausted_total") == budget_before
    assert metric(stack.workers[0], "sumstream_upstream_pauses_total") > 0


async def test_two_workers_split_the_upstream_by_partitions_and_a_survivor_takes_it_back(
    stack: Stack,
) -> None:
    first = stack.workers[0]
    fresh_sim(stack, ttft_ms=100, token_delay_ms=4, max_concurrent=8, retry_after_s=1.0)
    limit_alone = metric(first, "sumstream_upstream_concurrency_limit")
    second = stack.start_worker(name="worker-1")
    wait_for_balanced_group([first, second], partitions=WORK_PARTITIONS)

    owned = [len(w.owned_partitions()) / WORK_PARTITIONS for w in (first, second)]

    def shares_follow_partitions() -> bool:
        got = [metric(w, "sumstream_upstream_share_ratio") for w in (first, second)]
        return got == pytest.approx(owned)

    eventually(shares_follow_partitions, timeout=30, message=f"shares {owned}")
    assert sum(owned) == pytest.approx(1.0)
    # The first worker's learned limit was split with the partitions.
    split = metric(first, "sumstream_upstream_concurrency_limit")
    assert split <= max(1.0, limit_alone * owned[0] + 1)
    async with httpx.AsyncClient(timeout=120) as client:
        results = await asyncio.gather(
            *(summarize(client, stack.gateway, document(400 + i), "key-ann") for i in range(32))
        )
    stats = stack.sim_stats()
    completed = [r for r in results if completed_in_time(r, WIDE_WAIT_S)]
    print(f"\ntwo workers, 8 slots, 32 clients: {len(completed)}/32, {stats['by_status']}")
    assert len(completed) == 32
    assert stats["attempts"] <= 1.2 * 32
    # A worker dies: at the rebalance after its session timeout the survivor owns every
    # partition again, and its share of the upstream with them.
    second.kill9()
    eventually(
        lambda: metric(first, "sumstream_upstream_share_ratio") == 1.0,
        timeout=60,
        message="the survivor's share back to 1",
    )
