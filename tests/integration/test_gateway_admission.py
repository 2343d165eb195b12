"""Admission at the gateway on the real broker: limits shared by two instances through the
quota ledger, results settled into usage and budget, lag shedding and degradation.

The workers are simulated as in test_gateway.py: the tests write results themselves, and
with no stage consuming, every accepted request is lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.admission.controller import prompt_overhead_tokens
from gateway.settings import GatewaySettings
from pipeline.core.settings import KafkaSettings
from pipeline.core.tiers import Tier
from pipeline.llm.extractive import count_tokens
from tests.harness import eventually_async
from tests.integration.test_gateway import (
    DOC,
    RunningGateway,
    Worker,
    auth,
    gateway_settings,
    post_json,
    read_topic,
    running_gateway,
    tiers,
    topics,
)

pytestmark = pytest.mark.integration


def pro(**limits: Any) -> Tier:
    values: dict[str, Any] = {
        "name": "pro",
        "rpm": 120,
        "tpm": 400_000,
        "max_input_tokens": 100_000,
        "max_output_tokens": 1_024,
        "weight": 4,
        "monthly_budget_usd": 100.0,
        "max_queue_wait_s": 60.0,
        "on_input_too_large": "truncate",
    }
    values.update(limits)
    return Tier(**values)


def settings_for(kafka: KafkaSettings, **overrides: Any) -> GatewaySettings:
    return gateway_settings(kafka, app_id=f"t-app-{uuid.uuid4().hex[:8]}", **overrides)


@contextlib.asynccontextmanager
async def two_gateways(
    kafka: KafkaSettings, table: dict[str, Tier], **overrides: Any
) -> AsyncIterator[tuple[RunningGateway, RunningGateway]]:
    app_id = f"t-app-{uuid.uuid4().hex[:8]}"
    async with (
        running_gateway(
            gateway_settings(kafka, instance_index=0, instance_count=2, app_id=app_id, **overrides),
            tier_table=table,
        ) as first,
        running_gateway(
            gateway_settings(kafka, instance_index=1, instance_count=2, app_id=app_id, **overrides),
            tier_table=table,
        ) as second,
    ):
        yield first, second


# A wait bound, not a latency assertion: on a loaded 2-core CI machine a brand-new settle
# group's first assignment has once taken longer than 20 s.
SETTLE_TIMEOUT_S = 60.0


async def usage(client: httpx.AsyncClient, user: str = "alice") -> dict[str, Any]:
    response = await client.get("/v1/usage", headers=auth(user))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_concurrent_requests_at_two_gateways_never_exceed_the_users_limits() -> None:
    output = 50
    need = count_tokens(DOC) + prompt_overhead_tokens(None, output) + output
    # Room for exactly two requests' reservations a minute; requests/min allow many more.
    table = tiers(pro=pro(tpm=2 * need + need // 2))
    async with topics() as kafka, two_gateways(kafka, table) as (a, b):
        async with a.client() as ca, b.client() as cb:
            answers = await asyncio.gather(
                *(post_json(c, max_output_tokens=output) for c in [ca, cb] * 4)
            )
            other_user = await post_json(cb, user="bob", max_output_tokens=output)
        records = await read_topic(kafka, kafka.topic_prefix + "requests", "SummarizeRequest")
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [202, 202] + [429] * 6
    for refused in (r for r in answers if r.status_code == 429):
        assert refused.json()["code"] == "rate_limited"
        assert refused.json()["limit"] == "token_limit"
        assert int(refused.headers["Retry-After"]) >= 1
    assert other_user.status_code == 202  # limits are per user
    assert len(records) == 3


async def test_requests_per_minute_hold_across_two_gateways() -> None:
    table = tiers(pro=pro(rpm=3))
    async with (
        topics() as kafka,
        two_gateways(kafka, table) as (a, b),
        a.client() as ca,
        b.client() as cb,
    ):
        answers = [(await post_json(c)).status_code for c in [ca, cb] * 3]
    assert answers == [202, 202, 202, 429, 429, 429]


async def test_results_are_settled_into_usage_even_when_their_gateway_is_gone() -> None:
    table = tiers()
    async with topics() as kafka, Worker(kafka) as worker:
        settings = settings_for(kafka, instance_index=1, instance_count=2)
        async with running_gateway(settings, tier_table=table) as survivor:
            first = gateway_settings(
                kafka, instance_index=0, instance_count=2, app_id=settings.app_id
            )
            async with running_gateway(first, tier_table=table) as doomed, doomed.client() as c:
                accepted = (await post_json(c, max_output_tokens=50)).json()["id"]
            # The gateway that accepted it is gone before its result: the other settles it.
            await worker.result(accepted, "a summary", 7, cost_micro_usd=1_234)
            # A request no gateway reserved (produced by another system) is billed too.
            await worker.result("external-1", "another", 3, cost_micro_usd=100)
            async with survivor.client() as client:

                async def settled() -> bool:
                    return (await usage(client))["cost_micro_usd"] == 1_334

                await eventually_async(settled, timeout=SETTLE_TIMEOUT_S, message="settled")
                figures = await usage(client)
                unauthenticated = await client.get("/v1/usage")
    assert figures["user"] == "alice" and figures["tier"] == "pro"
    assert figures["requests"] == 1  # the external request reserved nothing
    assert (figures["input_tokens"], figures["output_tokens"]) == (20, 10)
    assert figures["tokens"] == 30
    # The reservation (document + 50) was replaced by the real 17 tokens.
    assert figures["window"] == {"requests": 1, "tokens": 30}
    assert figures["cost_usd"] == pytest.approx(0.001334)
    assert figures["remaining_micro_usd"] == 100_000_000 - 1_334
    assert figures["limits"] == {"rpm": 120, "tpm": 400_000}
    # The tier's context allocation (docs/architecture.md, "Long documents").
    assert figures["documents"] == table["pro"].limits()
    assert figures["documents"]["long_documents"] is True
    assert figures["period_start"].endswith("T00:00:00Z")
    assert unauthenticated.status_code == 401


async def test_a_spent_budget_answers_429_budget_exceeded() -> None:
    table = tiers(pro=pro(monthly_budget_usd=0.001))  # 1000 micro-USD
    async with (
        topics() as kafka,
        Worker(kafka) as worker,
        running_gateway(settings_for(kafka), tier_table=table) as gw,
        gw.client() as client,
    ):
        rid = (await post_json(client)).json()["id"]
        await worker.result(rid, "s", 3, cost_micro_usd=1_000)

        async def spent() -> bool:
            return (await usage(client))["remaining_micro_usd"] == 0

        await eventually_async(spent, timeout=SETTLE_TIMEOUT_S, message="spent")
        refused = await post_json(client)
        other_user = await post_json(client, user="bob")
    assert refused.status_code == 429
    body = refused.json()
    assert body["code"] == "budget_exceeded"
    assert body["type"].endswith("/budget_exceeded")
    assert int(refused.headers["Retry-After"]) >= 1
    assert other_user.status_code == 202


@pytest.mark.parametrize(
    ("models", "degraded_to"),
    [
        ((), "cheap-model"),
        # A tier that does not list the degrade model degrades the output only.
        (("big-model", "small-model"), "big-model"),
    ],
)
async def test_growing_lag_degrades_then_sheds_with_retry_after(
    models: tuple[str, ...], degraded_to: str
) -> None:
    # Nothing consumes `requests`: each accepted request is one more record of lag, and
    # nothing completes, so the estimated wait only grows.
    table = tiers(pro=pro(max_queue_wait_s=4.0, models=models))
    async with topics() as kafka:
        settings = settings_for(
            kafka,
            lag_interval_s=0.2,
            degrade_model="cheap-model",
            degrade_output_ratio=0.5,
            degrade_at=0.25,
        )
        async with running_gateway(settings, tier_table=table) as gw, gw.client() as client:
            seen: list[tuple[str, httpx.Response]] = []
            for _ in range(60):
                response = await post_json(client, max_output_tokens=100, model="big-model")
                if response.status_code == 503:
                    seen.append(("shed", response))
                    break
                assert response.status_code == 202, response.text
                kind = "degraded" if response.json()["degraded"] else "plain"
                seen.append((kind, response))
                # The arrival rate, not a wait for a condition: the queue grows step by step.
                await asyncio.sleep(0.25)
            metrics = (await client.get("/metrics")).text
        records = await read_topic(kafka, kafka.topic_prefix + "requests", "SummarizeRequest")
    kinds = [k for k, _ in seen]
    assert kinds[0] == "plain"
    assert kinds[-1] == "shed"
    assert "degraded" in kinds
    # Once degraded, never back to plain: the wait only grows here.
    assert "plain" not in kinds[kinds.index("degraded") :]
    shed = seen[-1][1]
    assert shed.json()["code"] == "overloaded"
    assert shed.json()["estimated_wait_s"] >= 4.0  # above the limit, rounded to 0.1 s
    assert int(shed.headers["Retry-After"]) >= 1
    positions = [r.json()["queue_position"] for _, r in seen[:-1]]
    assert positions == sorted(positions) and positions[-1] > positions[0]
    by_id = {r["request_id"]: r for r in records}
    assert len(records) == len(seen) - 1  # the shed request was never produced
    for kind, response in seen[:-1]:
        record = by_id[response.json()["id"]]
        if kind == "degraded":
            switched = "model:cheap-model," if degraded_to == "cheap-model" else ""
            assert record["degraded"] == f"{switched}max_output_tokens:50"
            assert (record["model"], record["max_output_tokens"]) == (degraded_to, 50)
        else:
            assert record["degraded"] is None
            assert (record["model"], record["max_output_tokens"]) == ("big-model", 100)
    assert 'sumstream_consumer_lag_records{stage="preprocess"}' in metrics
    assert "sumstream_gateway_estimated_wait_seconds" in metrics
    assert 'sumstream_gateway_admission_total{verdict="degraded"}' in metrics


async def test_a_long_documents_plan_over_the_budget_left_is_refused_before_anything_runs() -> None:
    # Long documents beyond 100 tokens, in 200-token chunks; a budget of 1,000 micro-USD.
    long_pro = pro(
        monthly_budget_usd=0.001,
        max_input_tokens=100,
        long_documents=True,
        max_document_tokens=100_000,
        chunk_tokens=200,
        reduce_output_tokens=50,
    )
    long_doc = " ".join(["Clause seven binds the supplier to deliver on time."] * 600)
    async with (
        topics() as kafka,
        running_gateway(settings_for(kafka), tier_table=tiers(pro=long_pro)) as gw,
        gw.client() as client,
    ):
        await usage(client)  # the ledger is read: the budget left is known
        refused = await client.post(
            "/v1/summaries",
            json={"document": long_doc, "max_output_tokens": 100},
            headers={**auth("alice"), "Accept": "application/json"},
        )
        short = await post_json(
            client, document="The supplier delivered on time in May.", max_output_tokens=20
        )
        records = await read_topic(kafka, kafka.topic_prefix + "requests", "SummarizeRequest")
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert body["code"] == "budget_exceeded"
    assert body["remaining_micro_usd"] == 1_000
    assert body["plan"]["mode"] == "map_reduce" and body["plan"]["chunks"] >= 20
    assert body["plan"]["estimated_cost_micro_usd"] > 1_000
    assert short.status_code == 202
    assert [r["request_id"] for r in records] == [short.json()["id"]]
