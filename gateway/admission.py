"""Admission control: per-user requests/min and tokens/min token buckets, per tier.

PER-PROCESS for now: each gateway instance keeps its own buckets, so N instances admit up
to N times a user's limits. DESIGN.md section 6 wants the limits shared through Kafka; a
later change replaces the bucket store and keeps this interface.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import Overloaded, RateLimited
from pipeline.tiers import Tier

Clock = Callable[[], float]


class TokenBucket:
    """A bucket of ``capacity`` tokens refilled at ``capacity`` per ``period_s``."""

    def __init__(self, capacity: float, period_s: float, now: float) -> None:
        self.capacity = capacity
        self.rate = capacity / period_s
        self.level = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` is available (0 when it is now; inf when it never is)."""
        self._refill(now)
        if amount <= self.level:
            return 0.0
        if amount > self.capacity or self.rate <= 0:
            return math.inf
        return (amount - self.level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def give_back(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


@dataclass
class _UserBuckets:
    requests: TokenBucket
    tokens: TokenBucket


@dataclass
class AdmissionTicket:
    """What admission reserved for one request; settle it once the real usage is known."""

    user: str
    tier: str
    reserved_tokens: int
    _controller: AdmissionController = field(repr=False)
    _settled: bool = field(default=False, repr=False)

    def settle(self, used_tokens: int | None = None) -> None:
        """Return the unused part of the reservation (all of it when ``used_tokens`` is None)."""
        if self._settled:
            return
        self._settled = True
        unused = self.reserved_tokens if used_tokens is None else self.reserved_tokens - used_tokens
        self._controller._release(self, max(0, unused))


class AdmissionController:
    """Rate limits by tier and a bound on in-flight requests for this process."""

    def __init__(
        self,
        tiers: Mapping[str, Tier],
        *,
        max_inflight: int = 2_000,
        max_users: int = 100_000,
        clock: Clock = time.monotonic,
    ) -> None:
        self._tiers = tiers
        self._max_inflight = max_inflight
        self._max_users = max_users
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], _UserBuckets] = OrderedDict()
        self.inflight = 0

    def tier(self, name: str) -> Tier | None:
        return self._tiers.get(name)

    def _user(self, user: str, tier: Tier, tier_name: str, now: float) -> _UserBuckets:
        key = (user, tier_name)
        buckets = self._buckets.get(key)
        if buckets is None:
            buckets = _UserBuckets(
                TokenBucket(tier.rpm, 60.0, now), TokenBucket(tier.tpm, 60.0, now)
            )
            self._buckets[key] = buckets
            # Forgetting an idle user only refills their buckets early: the bound is safe.
            while len(self._buckets) > self._max_users:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return buckets

    async def admit(self, user: str, tier: str, est_tokens: int) -> AdmissionTicket:
        """Reserve one request and ``est_tokens`` tokens, or raise RateLimited / Overloaded."""
        limits = self._tiers.get(tier)
        if limits is None:
            raise RateLimited(f"unknown tier {tier!r}", retriable=False)
        if self.inflight >= self._max_inflight:
            raise Overloaded("too many requests in flight at this gateway", retry_after_s=1.0)
        now = self._clock()
        buckets = self._user(user, limits, tier, now)
        if est_tokens > limits.tpm:
            raise RateLimited(
                f"request needs ~{est_tokens} tokens, above the {tier} tier's {limits.tpm}/min",
                retriable=False,
            )
        wait = max(buckets.requests.wait_for(1, now), buckets.tokens.wait_for(est_tokens, now))
        if wait > 0:
            raise RateLimited(
                f"{tier} tier limits: {limits.rpm} requests/min, {limits.tpm} tokens/min",
                retry_after_s=wait,
            )
        buckets.requests.take(1, now)
        buckets.tokens.take(est_tokens, now)
        self.inflight += 1
        return AdmissionTicket(user, tier, est_tokens, self)

    def _release(self, ticket: AdmissionTicket, unused_tokens: int) -> None:
        self.inflight = max(0, self.inflight - 1)
        buckets = self._buckets.get((ticket.user, ticket.tier))
        if buckets is not None and unused_tokens:
            buckets.tokens.give_back(unused_tokens, self._clock())

    def snapshot(self) -> dict[str, Any]:
        return {"inflight": self.inflight, "users": len(self._buckets)}
