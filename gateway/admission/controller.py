"""Admission of a new request: queue wait (503), shared per-user limits and budget (429).

In order: this process's in-flight bound; the estimated queue wait of the request's tier
(``QueueWaitEstimator``, fed from consumer lag, so every instance sees the same figures),
which sheds above the tier's ``max_queue_wait_s`` and may degrade above a lower threshold;
then a RESERVE of one request and (input estimate + max output) tokens in the quota ledger,
whose log decides the same way at every instance (pipeline/quota/ledger.py). Shedding comes first,
so a request refused for load leaves nothing in the ledger.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway.admission.backpressure import QueueWaitEstimator
from gateway.admission.quota import QuotaUnavailable, quota_refusal
from gateway.http.errors import Overloaded, RateLimited
from gateway.metrics import ADMISSION, ESTIMATED_WAIT
from pipeline.core.prompt import DEFAULT_INSTRUCTIONS, SYSTEM_PROMPT, user_message
from pipeline.core.tiers import Tier
from pipeline.llm.extractive import count_tokens
from pipeline.quota.state import Verdict

log = logging.getLogger("sumstream.gateway.admission")

Clock = Callable[[], float]
# An accepted request whose result this process never sees stops counting after this long:
# longer than any deadline (the tier's max queue wait plus the workers' default deadline).
INFLIGHT_EXPIRY_S = 900.0


def prompt_overhead_tokens(instructions: str | None, max_output_tokens: int) -> int:
    """Input tokens billed besides the document: the system prompt and the instructions
    preprocess wraps it in (pipeline/worker/preprocess.py), so the reservation covers them too."""
    text = instructions or DEFAULT_INSTRUCTIONS.format(max_tokens=max_output_tokens)
    return count_tokens(SYSTEM_PROMPT) + count_tokens(user_message("", text))


class Ledger(Protocol):
    """What admission needs of the quota ledger (pipeline/quota/ledger.py ``QuotaLedger``)."""

    async def reserve(self, user_id: str, tier: str, request_id: str, tokens: int) -> Verdict: ...

    async def release(self, user_id: str, tier: str, request_id: str) -> None: ...


@dataclass(frozen=True)
class Degradation:
    """What a degraded request gets instead: a cheaper model and/or a shorter output."""

    model: str | None = None
    output_ratio: float | None = None

    @property
    def enabled(self) -> bool:
        return self.model is not None or self.output_ratio is not None

    def apply(self, model: str | None, max_output: int) -> tuple[str | None, int, str]:
        """The degraded (model, max output tokens) and the label recorded in the request."""
        parts: list[str] = []
        if self.model is not None and model != self.model:
            model = self.model
            parts.append(f"model:{model}")
        if self.output_ratio is not None:
            shorter = max(1, int(max_output * self.output_ratio))
            if shorter < max_output:
                max_output = shorter
                parts.append(f"max_output_tokens:{max_output}")
        return model, max_output, ",".join(parts)


@dataclass(frozen=True)
class Admitted:
    """A request admission let through: what was reserved and what it may use."""

    request_id: str
    user_id: str
    tier: str
    reserved_tokens: int
    max_output_tokens: int
    model: str | None
    degraded: str | None
    queue_position: int
    estimated_wait_s: float


class Admission:
    """One gateway's admission: the lag estimate, the shared ledger, the local bound."""

    def __init__(
        self,
        tiers: Mapping[str, Tier],
        estimator: QueueWaitEstimator,
        ledger: Ledger,
        *,
        max_inflight: int = 2_000,
        degradation: Degradation | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.tiers = tiers
        self.estimator = estimator
        self.ledger = ledger
        self.max_inflight = max_inflight
        self.degradation = degradation or Degradation()
        self._clock = clock
        # request_id -> when it was accepted; oldest first.
        self._inflight: OrderedDict[str, float] = OrderedDict()

    @property
    def inflight(self) -> int:
        self._expire(self._clock())
        return len(self._inflight)

    async def admit(
        self,
        user_id: str,
        tier_name: str,
        request_id: str,
        *,
        input_tokens: int,
        max_output_tokens: int,
        model: str | None,
    ) -> Admitted:
        """Let ``request_id`` in or raise Overloaded (503) / RateLimited, BudgetExceeded (429).

        QuotaUnavailable (503) when the ledger cannot answer in time.
        """
        tier = self.tiers[tier_name]
        now = self._clock()
        if self.inflight >= self.max_inflight:
            ADMISSION.labels("inflight_bound").inc()
            raise Overloaded("too many requests in flight at this gateway", retry_after_s=1.0)
        decision = self.estimator.decide(tier, now)
        ESTIMATED_WAIT.set(decision.estimated_wait_s)
        error = decision.error()
        if error is not None:
            ADMISSION.labels("shed").inc()
            raise error
        degraded: str | None = None
        if decision.action == "degrade" and self.degradation.enabled:
            model, max_output_tokens, label = self.degradation.apply(model, max_output_tokens)
            degraded = label or None
        tokens = input_tokens + max_output_tokens
        if tokens > tier.tpm:
            ADMISSION.labels("token_limit").inc()
            raise RateLimited(
                f"request needs ~{tokens} tokens, above the {tier_name} tier's {tier.tpm}/min",
                retriable=False,
                extra={"limit": "token_limit"},
            )
        verdict = await self.ledger.reserve(user_id, tier_name, request_id, tokens)
        refusal = quota_refusal(verdict)
        if refusal is not None:
            ADMISSION.labels(verdict.reason or "refused").inc()
            raise refusal
        ADMISSION.labels("degraded" if degraded else "admitted").inc()
        return Admitted(
            request_id=request_id,
            user_id=user_id,
            tier=tier_name,
            reserved_tokens=tokens,
            max_output_tokens=max_output_tokens,
            model=model,
            degraded=degraded,
            queue_position=decision.queue_position,
            estimated_wait_s=round(decision.estimated_wait_s, 3),
        )

    def accepted(self, admitted: Admitted) -> None:
        """The request is in the log: count it until its result comes."""
        self.estimator.note_admitted()
        self._inflight[admitted.request_id] = self._clock()

    async def release(self, admitted: Admitted) -> None:
        """The request never reached the log: give its reservation back."""
        try:
            await self.ledger.release(admitted.user_id, admitted.tier, admitted.request_id)
        except QuotaUnavailable as exc:
            # The reservation then counts until its window passes: the safe side.
            log.warning(
                "release failed", extra={"request_id": admitted.request_id, "error": str(exc)}
            )

    def finished(self, request_id: str) -> None:
        """The request's result was seen here."""
        self._inflight.pop(request_id, None)

    def _expire(self, now: float) -> None:
        while self._inflight:
            _, at = next(iter(self._inflight.items()))
            if now - at <= INFLIGHT_EXPIRY_S:
                return
            self._inflight.popitem(last=False)
