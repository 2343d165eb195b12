"""The quota ledger on the real broker: limits shared by two gateways through the `quota` topic."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from gateway.admission.quota import QuotaLedger, QuotaUnavailable, quota_refusal
from gateway.http.errors import BudgetExceeded
from pipeline.core.settings import KafkaSettings
from pipeline.core.tiers import Tier
from pipeline.core.topics import declared_topics
from pipeline.quota.state import month_start_ms, next_month_start_ms

pytestmark = pytest.mark.integration


def tier(name: str, rpm: int, tpm: int, budget_usd: float = 100.0) -> Tier:
    return Tier(
        name=name,
        rpm=rpm,
        tpm=tpm,
        max_input_tokens=1_000,
        max_output_tokens=100,
        weight=1,
        monthly_budget_usd=budget_usd,
        max_queue_wait_s=30.0,
        on_input_too_large="reject",
    )


TIERS = {
    "small": tier("small", rpm=5, tpm=1_000),
    "budget": tier("budget", rpm=100, tpm=100_000, budget_usd=0.00001),  # 10 micro-USD
}


@pytest.fixture(scope="module")
def settings(bootstrap: str) -> Iterator[KafkaSettings]:
    """A random prefix with only its `quota` topic, created as declared (LogAppendTime...)."""
    s = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"t-{uuid.uuid4().hex[:8]}.")
    spec = next(t for t in declared_topics(s) if t.short == "quota")
    admin = AdminClient({"bootstrap.servers": s.bootstrap_servers})
    name = spec.name(s.topic_prefix)
    topic = NewTopic(name, spec.partitions, 1, config=spec.config)
    for future in admin.create_topics([topic], operation_timeout=10).values():
        future.result(timeout=30)
    yield s
    for future in admin.delete_topics([name], operation_timeout=10).values():
        future.result(timeout=30)


@pytest.fixture
async def two_gateways(settings: KafkaSettings) -> AsyncIterator[tuple[QuotaLedger, QuotaLedger]]:
    async with (
        QuotaLedger(settings, TIERS, gateway_id="g0") as a,
        QuotaLedger(settings, TIERS, gateway_id="g1") as b,
    ):
        yield a, b


def user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


async def settled(ledger: QuotaLedger, user_id: str, **expected: int) -> None:
    """Wait until ``ledger`` has read what another instance wrote (it reads asynchronously)."""
    for _ in range(200):
        usage = ledger.usage(user_id)
        if all(getattr(usage, k) == v for k, v in expected.items()):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{ledger.gateway_id} never reached {expected}: {ledger.usage(user_id)}")


@pytest.mark.parametrize(("tokens", "allowed"), [(100, 5), (300, 3)])
async def test_two_gateways_never_grant_more_than_the_limits_together(
    two_gateways: tuple[QuotaLedger, QuotaLedger], tokens: int, allowed: int
) -> None:
    a, b = two_gateways
    uid = user()
    verdicts = await asyncio.gather(
        *(
            ledger.reserve(uid, "small", f"req-{ledger.gateway_id}-{i}", tokens)
            for i in range(10)
            for ledger in (a, b)
        )
    )
    granted = [v for v in verdicts if v.granted]
    # rpm 5 and tpm 1000: 5 requests of 100 tokens, or 3 of 300, whoever asked.
    assert len(granted) == allowed
    refused = [v for v in verdicts if not v.granted]
    assert {v.reason for v in refused} == {"rate_limit" if tokens == 100 else "token_limit"}
    assert all(v.retry_after_s is not None and 0 < v.retry_after_s <= 60 for v in refused)
    # Both instances hold the same state.
    for ledger in (a, b):
        await settled(ledger, uid, window_requests=allowed, window_tokens=allowed * tokens)


async def test_settle_frees_tokens_for_every_gateway(
    two_gateways: tuple[QuotaLedger, QuotaLedger],
) -> None:
    a, b = two_gateways
    uid = user()
    assert (await a.reserve(uid, "small", "big", 900)).granted
    refused = await b.reserve(uid, "small", "next", 200)
    assert (refused.granted, refused.reason) == (False, "token_limit")
    await a.settle(uid, "small", "big", 150, 42, input_tokens=120, output_tokens=30)
    assert (await b.reserve(uid, "small", "next", 200)).granted
    for ledger in (a, b):
        await settled(ledger, uid, tokens=150, cost_micro_usd=42, window_tokens=350, requests=2)
    usage = a.usage(uid)
    assert (usage.input_tokens, usage.output_tokens) == (120, 30)


async def test_release_gives_the_reservation_back(
    two_gateways: tuple[QuotaLedger, QuotaLedger],
) -> None:
    a, b = two_gateways
    uid = user()
    assert (await a.reserve(uid, "small", "r1", 1_000)).granted
    await a.release(uid, "small", "r1")
    assert (await b.reserve(uid, "small", "r2", 1_000)).granted
    await settled(a, uid, requests=1, window_requests=1)


async def test_a_restarted_ledger_reaches_the_same_state_from_the_log(
    settings: KafkaSettings,
) -> None:
    uid = user()
    async with QuotaLedger(settings, TIERS, gateway_id="g0") as first:
        for i in range(7):
            await first.reserve(uid, "small", f"r{i}", 150)
        await first.settle(uid, "small", "r0", 90, 11)
        await first.release(uid, "small", "r1")
        before = first.usage(uid)
        last = await first.reserve(uid, "small", "probe", 150)
    async with QuotaLedger(settings, TIERS, gateway_id="g0-restarted") as again:
        assert again.usage(uid) == first.usage(uid)
        # The probe was the last record: the restarted instance counts it as granted or not
        # exactly as the first did.
        assert (await again.reserve(uid, "small", "probe", 150)).granted == last.granted
    assert before.requests == 4  # 5 granted of 7 (rpm 5), one released
    assert before.tokens == 90 and before.cost_micro_usd == 11


async def test_budget_refusal(two_gateways: tuple[QuotaLedger, QuotaLedger]) -> None:
    a, b = two_gateways
    uid = user()
    assert (await a.reserve(uid, "budget", "r1", 10)).granted
    await a.settle(uid, "budget", "r1", 10, 10)
    refused = await b.reserve(uid, "budget", "r2", 10)
    assert (refused.granted, refused.reason) == (False, "budget")
    assert refused.retry_after_s is not None
    usage = b.usage(uid)
    assert usage.remaining_micro_usd == 0
    month_s = (
        next_month_start_ms(usage.period_start_ms) - month_start_ms(usage.period_start_ms)
    ) / 1000
    assert 0 < refused.retry_after_s <= month_s
    assert isinstance(quota_refusal(refused), BudgetExceeded)


async def test_reserve_times_out_cleanly(settings: KafkaSettings) -> None:
    async with QuotaLedger(settings, TIERS, gateway_id="hasty", timeout_s=0.000_001) as ledger:
        with pytest.raises(QuotaUnavailable) as caught:
            await ledger.reserve(user(), "small", "r", 1)
        assert caught.value.retriable and caught.value.status == 503
    # Stopped: nothing more to do, and a clear error rather than a hang.
    with pytest.raises(QuotaUnavailable):
        await ledger.reserve(user(), "small", "r", 1)


async def test_unreachable_broker_is_a_retriable_error() -> None:
    dead = KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix="t-unreachable.")
    ledger = QuotaLedger(dead, TIERS, gateway_id="g")
    with pytest.raises(QuotaUnavailable):
        await ledger.start()
    assert not ledger.ready
