"""Quota for requests other systems produce: preprocess reserves them in the per-user ledger.

The gateway reserves its own requests before it produces them; a producer whose entry says
``reserves = true`` (pipeline/core/producers.py) is trusted to have done the same. Every other
request is reserved here, in the same `quota` ledger (pipeline/quota/), before its job is
produced: the same rpm, tpm and monthly budget hold however a request arrives
(docs/architecture.md, "Identity").
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pipeline.core.producers import ProducerIdentity
from pipeline.core.records import InferenceJob
from pipeline.quota.state import UsageSummary, Verdict


class Reserver(Protocol):
    """What admission needs of the quota ledger (pipeline/quota/ledger.py ``QuotaLedger``)."""

    async def reserve(self, user_id: str, tier: str, request_id: str, tokens: int) -> Verdict: ...


@runtime_checkable
class BudgetReader(Protocol):
    """A ledger that can say what is left of a user's monthly budget (QuotaLedger)."""

    @property
    def ready(self) -> bool: ...

    def usage(self, user_id: str, tier: str | None = None) -> UsageSummary: ...


class TopicAdmission:
    """Reserves a job's request and tokens unless its producer reserved them already."""

    def __init__(self, ledger: Reserver) -> None:
        self.ledger = ledger

    async def refusal(
        self, job: InferenceJob, producer: ProducerIdentity, *, plan_cost: int | None = None
    ) -> tuple[str, str] | None:
        """None when the job may run; else the (code, message) of its terminal ERROR.

        ``plan_cost``: a long document's estimated cost, refused before any call when the
        month's budget has less left (docs/architecture.md, "Long documents"). Raises the
        ledger's QuotaUnavailableError when it cannot answer (retried by the agent).
        """
        if producer.reserves:
            return None
        if plan_cost is not None and isinstance(self.ledger, BudgetReader) and self.ledger.ready:
            left = self.ledger.usage(job["user_id"], job["tier"]).remaining_micro_usd
            if plan_cost > left:
                return (
                    "budget_exceeded",
                    f"the document's plan is estimated at {plan_cost} micro-USD; the month's "
                    f"budget has {left} left",
                )
        tokens = job["input_tokens_estimate"] + job["max_output_tokens"]
        verdict = await self.ledger.reserve(job["user_id"], job["tier"], job["request_id"], tokens)
        if verdict.granted:
            return None
        if verdict.reason == "budget":
            return "budget_exceeded", "the monthly budget of this tier is spent"
        what = "requests" if verdict.reason == "rate_limit" else "tokens"
        return "rate_limited", f"{what} per minute limit of this tier reached"
