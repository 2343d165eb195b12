"""The simulator's per-minute rate limits: four continuously refilled token buckets.

Like the Messages API, a request is admitted only when every bucket holds what it costs (one
request; its input tokens; its output tokens; both together), is answered with a 429
``rate_limit_error`` and a ``retry-after`` otherwise, and every response carries the buckets'
``anthropic-ratelimit-*`` headers. The simulator knows the reply it is about to send, so it
charges the real output at admission (the API estimates it from ``max_tokens`` and settles at
the end). A bucket whose knob is 0 is unlimited and reports ``UNLIMITED``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.llm import ratelimit
from pipeline.llm.ratelimit import BUCKETS

# What an unlimited bucket reports as its limit and remaining.
UNLIMITED = 1_000_000_000


@dataclass(slots=True)
class TokenBucket:
    """``per_minute`` units, refilled continuously; 0 means unlimited."""

    per_minute: int
    level: float
    at: float  # epoch seconds of ``level``

    @classmethod
    def full(cls, per_minute: int, now: float) -> TokenBucket:
        return cls(per_minute, float(per_minute), now)

    def refill(self, now: float) -> None:
        if self.per_minute:
            self.level = min(
                float(self.per_minute), self.level + (now - self.at) * self.per_minute / 60.0
            )
        self.at = max(self.at, now)

    def wait_s(self, amount: int) -> float:
        """Seconds until ``amount`` fits (after ``refill``); an amount beyond the limit waits
        for a full bucket and then still does not fit: 60 s."""
        if not self.per_minute:
            return 0.0
        if amount > self.per_minute:
            return 60.0
        return max(0.0, (amount - self.level) * 60.0 / self.per_minute)

    def headers(self, name: str) -> dict[str, str]:
        if not self.per_minute:
            return ratelimit.header_pairs(name, UNLIMITED, UNLIMITED, self.at)
        full_at = self.at + (self.per_minute - self.level) * 60.0 / self.per_minute
        return ratelimit.header_pairs(name, self.per_minute, math.floor(self.level), full_at)


class RateBuckets:
    """The four buckets of one simulator; knobs change their size at run time."""

    def __init__(self, sizes: Mapping[str, int], now: float) -> None:
        self.buckets = {name: TokenBucket.full(sizes.get(name, 0), now) for name in BUCKETS}

    def resize(self, sizes: Mapping[str, int], now: float) -> None:
        """New per-minute sizes by bucket name; a changed bucket starts full."""
        for name, size in sizes.items():
            if self.buckets[name].per_minute != size:
                self.buckets[name] = TokenBucket.full(size, now)

    def admit(self, input_tokens: int, output_tokens: int, now: float) -> float:
        """Take the request's cost and return 0.0, or take nothing and return the seconds
        until it would fit."""
        costs = {
            "requests": 1,
            "tokens": input_tokens + output_tokens,
            "input-tokens": input_tokens,
            "output-tokens": output_tokens,
        }
        wait = 0.0
        for name, bucket in self.buckets.items():
            bucket.refill(now)
            wait = max(wait, bucket.wait_s(costs[name]))
        if wait > 0:
            return wait
        for name, bucket in self.buckets.items():
            if bucket.per_minute:
                bucket.level -= costs[name]
        return 0.0

    def headers(self, now: float) -> list[tuple[bytes, bytes]]:
        """The ``anthropic-ratelimit-*`` headers as they stand at ``now``."""
        pairs: list[tuple[bytes, bytes]] = []
        for name, bucket in self.buckets.items():
            bucket.refill(now)
            pairs += [(k.encode(), v.encode()) for k, v in bucket.headers(name).items()]
        return pairs
