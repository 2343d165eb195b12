"""Admission of a new request: queue wait (503), shared per-user limits and budget (429).

In order: this process's in-flight bound, and one user's share of it (429); the estimated
queue wait of the request's tier (``QueueWaitEstimator``, fed from consumer lag, so every
instance sees the same figures), counting the part of the queue the fair scheduler serves
before this user's new request, which sheds above the tier's ``max_queue_wait_s`` and may
degrade above a lower threshold (docs/architecture.md "Admission"); then a RESERVE of one
request and (input estimate + max output) tokens in the quota ledger, whose log decides the
same way at every instance (pipeline/quota/ledger.py). Shedding comes first, so a request
refused for load leaves nothing in the ledger.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway.admission.backpressure import QueueWaitEstimator, UserView
from gateway.admission.quota import KeyHeld, QuotaUnavailable, quota_refusal
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

    async def reserve(
        self,
        user_id: str,
        tier: str,
        request_id: str,
        tokens: int,
        *,
        idempotency_key: str | None = None,
        body_sha256: str | None = None,
    ) -> Verdict: ...

    async def release(self, user_id: str, tier: str, request_id: str) -> None: ...


@dataclass(frozen=True)
class Degradation:
    """What a degraded request gets instead: a cheaper model and/or a shorter output."""

    model: str | None = None
    output_ratio: float | None = None

    @property
    def enabled(self) -> bool:
        return self.model is not None or self.output_ratio is not None

    def apply(self, tier: Tier, model: str | None, max_output: int) -> tuple[str | None, int, str]:
        """The degraded (model, max output tokens) and the label recorded in the request.

        The model switch is skipped for a tier that does not list the cheaper model.
        """
        parts: list[str] = []
        if self.model is not None and model != self.model and tier.allows(self.model):
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
        user_inflight_share: float = 1.0,
        degradation: Degradation | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.tiers = tiers
        self.estimator = estimator
        self.ledger = ledger
        self.max_inflight = max_inflight
        self.max_user_inflight = max(1, math.ceil(user_inflight_share * max_inflight))
        self.degradation = degradation or Degradation()
        self._clock = clock
        model = self.degradation.model
        skipped = [name for name, tier in tiers.items() if model and not tier.allows(model)]
        if skipped:
            log.warning(
                "degrade_model %s is not listed for tiers %s: they degrade without a model switch",
                model,
                skipped,
            )
        # request_id -> (when it was admitted, its user); oldest first. A request counts from
        # admission (so a burst of concurrent POSTs sees itself) until its result or release.
        self._inflight: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._per_user: Counter[str] = Counter()
        self._weight: dict[str, int] = {}  # user -> the weight of its tier, for the fair share

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
        idempotency_key: str | None = None,
        body_sha256: str | None = None,
    ) -> Admitted:
        """Let ``request_id`` in or raise Overloaded (503) / RateLimited, BudgetExceeded (429).

        QuotaUnavailable (503) when the ledger cannot answer in time; KeyHeld when the ledger
        names another request that holds ``idempotency_key``.
        """
        tier = self.tiers[tier_name]
        now = self._clock()
        self._check_inflight(user_id)
        user = UserView(self._per_user[user_id], self.behind(user_id, tier.weight))
        decision = self.estimator.decide(tier, now, user=user)
        ESTIMATED_WAIT.set(decision.estimated_wait_s)
        error = decision.error()
        if error is not None:
            ADMISSION.labels("shed").inc()
            raise error
        degraded: str | None = None
        if decision.action == "degrade" and self.degradation.enabled:
            model, max_output_tokens, label = self.degradation.apply(tier, model, max_output_tokens)
            degraded = label or None
        tokens = input_tokens + max_output_tokens
        if tokens > tier.tpm:
            ADMISSION.labels("token_limit").inc()
            raise RateLimited(
                f"request needs ~{tokens} tokens, above the {tier_name} tier's {tier.tpm}/min",
                retriable=False,
                extra={"limit": "token_limit"},
            )
        self._track(request_id, user_id, tier.weight, now)
        try:
            verdict = await self.ledger.reserve(
                user_id,
                tier_name,
                request_id,
                tokens,
                idempotency_key=idempotency_key,
                body_sha256=body_sha256,
            )
        except BaseException:
            self._untrack(request_id)
            raise
        if verdict.reason == "duplicate" and verdict.duplicate_of is not None:
            self._untrack(request_id)
            ADMISSION.labels("duplicate").inc()
            raise KeyHeld(verdict.duplicate_of, verdict.duplicate_body)
        refusal = quota_refusal(verdict)
        if refusal is not None:
            self._untrack(request_id)
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

    def _check_inflight(self, user_id: str) -> None:
        """503 beyond this process's in-flight bound, 429 beyond one user's share of it."""
        if self.inflight >= self.max_inflight:
            ADMISSION.labels("inflight_bound").inc()
            raise Overloaded("too many requests in flight at this gateway", retry_after_s=1.0)
        if self._per_user[user_id] >= self.max_user_inflight:
            ADMISSION.labels("user_inflight_bound").inc()
            raise RateLimited(
                f"{self.max_user_inflight} requests of this user are in flight at this gateway",
                retry_after_s=1.0,
                extra={"limit": "inflight"},
            )

    def behind(self, user_id: str, weight: int) -> float:
        """Requests in flight here that the fair scheduler serves after a new one of ``user_id``.

        Weighted fair queuing gives each backlogged user starts in proportion to its tier's
        weight: before this user's n-th request starts, another user of weight w gets about
        n x w / ``weight`` starts, and the rest of its requests wait behind.
        """
        mine = self._per_user[user_id] + 1
        behind = 0.0
        for other, count in self._per_user.items():
            if other != user_id:
                behind += max(0.0, count - mine * self._weight[other] / weight)
        return behind

    def accepted(self, admitted: Admitted) -> None:
        """The request is in the log: count it until its result comes."""
        self.estimator.note_admitted()
        if admitted.request_id not in self._inflight:
            weight = self.tiers[admitted.tier].weight
            self._track(admitted.request_id, admitted.user_id, weight, self._clock())

    async def release(self, admitted: Admitted) -> None:
        """The request never reached the log: give its reservation back."""
        self._untrack(admitted.request_id)
        try:
            await self.ledger.release(admitted.user_id, admitted.tier, admitted.request_id)
        except QuotaUnavailable as exc:
            # The reservation then counts until its window passes: the safe side.
            log.warning(
                "release failed", extra={"request_id": admitted.request_id, "error": str(exc)}
            )

    def finished(self, request_id: str) -> None:
        """The request's result was seen here."""
        if self._untrack(request_id):
            self.estimator.note_finished()

    def _track(self, request_id: str, user_id: str, weight: int, now: float) -> None:
        self._inflight[request_id] = (now, user_id)
        self._per_user[user_id] += 1
        self._weight[user_id] = weight

    def _untrack(self, request_id: str) -> bool:
        entry = self._inflight.pop(request_id, None)
        if entry is None:
            return False
        user_id = entry[1]
        self._per_user[user_id] -= 1
        if self._per_user[user_id] <= 0:
            del self._per_user[user_id]
            self._weight.pop(user_id, None)
        return True

    def _expire(self, now: float) -> None:
        while self._inflight:
            request_id, (at, _) = next(iter(self._inflight.items()))
            if now - at <= INFLIGHT_EXPIRY_S:
                return
            self._untrack(request_id)
