"""Quota for requests other systems produce (pipeline/worker/admission.py), on a stand-in ledger."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from pipeline.core.producers import ProducerIdentity
from pipeline.quota.state import UsageSummary, Verdict
from pipeline.worker.admission import TopicAdmission

JOB: Any = {
    "request_id": "r1",
    "user_id": "fay",
    "tier": "free",
    "input_tokens_estimate": 300,
    "max_output_tokens": 100,
}


class Ledger:
    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.reserved: list[tuple[str, str, str, int]] = []

    async def reserve(self, user_id: str, tier: str, request_id: str, tokens: int) -> Verdict:
        self.reserved.append((user_id, tier, request_id, tokens))
        return self.verdict


def producer(*, reserves: bool) -> ProducerIdentity:
    return ProducerIdentity("p", SecretStr("s" * 16), None, reserves=reserves)


async def test_a_request_its_producer_reserved_is_not_reserved_again() -> None:
    ledger = Ledger(Verdict(False, "rate_limit"))
    assert await TopicAdmission(ledger).refusal(JOB, producer(reserves=True)) is None
    assert ledger.reserved == []


async def test_other_requests_reserve_one_request_and_input_plus_output_tokens() -> None:
    ledger = Ledger(Verdict(True))
    assert await TopicAdmission(ledger).refusal(JOB, producer(reserves=False)) is None
    assert ledger.reserved == [("fay", "free", "r1", 400)]


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("rate_limit", "rate_limited"),
        ("token_limit", "rate_limited"),
        ("budget", "budget_exceeded"),
    ],
)
async def test_a_refused_reservation_names_its_limit(reason: Any, code: str) -> None:
    refusal = await TopicAdmission(Ledger(Verdict(False, reason))).refusal(
        JOB, producer(reserves=False)
    )
    assert refusal is not None and refusal[0] == code


class BudgetLedger(Ledger):
    """A ledger that also tells what is left of the month's budget."""

    ready = True

    def __init__(self, verdict: Verdict, left: int) -> None:
        super().__init__(verdict)
        self.left = left

    def usage(self, user_id: str, tier: str | None = None) -> UsageSummary:
        return UsageSummary(user_id, tier or "", 0, 0, 0, 0, 0, 0, 0, 10_000, self.left, 1, 1, 0, 0)


async def test_a_long_documents_plan_above_the_budget_left_is_refused_before_reserving() -> None:
    ledger = BudgetLedger(Verdict(True), left=500)
    refusal = await TopicAdmission(ledger).refusal(JOB, producer(reserves=False), plan_cost=501)
    assert refusal is not None and refusal[0] == "budget_exceeded"
    assert "501" in refusal[1] and "500 left" in refusal[1]
    assert ledger.reserved == []
    fits = await TopicAdmission(ledger).refusal(JOB, producer(reserves=False), plan_cost=500)
    assert fits is None and len(ledger.reserved) == 1
