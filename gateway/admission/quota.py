"""The gateway's face of the quota ledger (pipeline/quota/): its failures and refusals as HTTP.

The ledger itself is shared with the workers, which reserve for requests other systems produce
onto `requests` (docs/architecture.md, "Identity").
"""

from __future__ import annotations

from gateway.http.errors import BrokerUnavailable, BudgetExceeded, GatewayError, RateLimited
from pipeline.quota import ledger
from pipeline.quota.state import Verdict


class QuotaUnavailable(BrokerUnavailable, ledger.QuotaUnavailableError):
    """The ledger could not write or read its record in time (broker gone, ledger stopped)."""

    title = "Quota ledger unavailable"
    code = "quota_unavailable"

    def __init__(self, message: str = "", *, retry_after_s: float | None = 1.0) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class QuotaLedger(ledger.QuotaLedger):
    """The quota ledger whose failures answer 503 ``quota_unavailable``."""

    unavailable = QuotaUnavailable


class KeyHeld(Exception):
    """A RESERVE refused as ``duplicate``: another request holds the user's Idempotency-Key in
    the ledger, and this POST is a replay of it (docs/architecture.md, "Idempotency across
    gateways")."""

    def __init__(self, request_id: str, body_sha256: str | None) -> None:
        super().__init__(f"the Idempotency-Key is held by {request_id}")
        self.request_id = request_id
        self.body_sha256 = body_sha256


def quota_refusal(verdict: Verdict) -> GatewayError | None:
    """The 429 to answer a refused RESERVE with: its own problem type for the budget."""
    if verdict.granted:
        return None
    if verdict.reason == "budget":
        return BudgetExceeded(
            "the monthly budget of this tier is spent", retry_after_s=verdict.retry_after_s
        )
    what = "requests" if verdict.reason == "rate_limit" else "tokens"
    return RateLimited(
        f"{what} per minute limit of this tier reached",
        retry_after_s=verdict.retry_after_s,
        extra={"limit": verdict.reason},
    )
