"""The ``anthropic-ratelimit-*`` response headers: what is left of each per-minute bucket.

The Messages API sends ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
{limit,remaining,reset}`` on every response; ``reset`` is an RFC 3339 time at which the bucket
is full again. The buckets refill continuously, so ``remaining`` grows at ``limit`` per minute
(docs/architecture.md, "Rate limits and adaptive concurrency").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

PREFIX = "anthropic-ratelimit-"
BUCKETS = ("requests", "tokens", "input-tokens", "output-tokens")


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket as a response reported it: its size, what was left, when it is full again."""

    limit: int
    remaining: int
    reset_at: float  # epoch seconds

    def wait_s(self, amount: float, elapsed_s: float, *, held: float = 0.0) -> float:
        """Seconds until ``amount`` fits, ``elapsed_s`` after the report, with ``held`` already
        promised to calls the report did not count; an amount beyond the limit waits for a full
        bucket."""
        if self.limit <= 0:
            return 0.0
        rate = self.limit / 60.0
        level = min(float(self.limit), self.remaining + rate * max(0.0, elapsed_s)) - held
        missing = min(amount, float(self.limit)) - level
        return max(0.0, missing / rate)


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The buckets a response reported (None for one it did not), read at ``seen_at``."""

    seen_at: float
    requests: Bucket | None = None
    tokens: Bucket | None = None
    input_tokens: Bucket | None = None
    output_tokens: Bucket | None = None

    @property
    def empty(self) -> bool:
        return not (self.requests or self.tokens or self.input_tokens or self.output_tokens)


def parse(headers: Mapping[str, str], now: float) -> RateLimits:
    """The buckets in ``headers`` (lower-case names, as httpx and ASGI give them)."""
    found: dict[str, Bucket] = {}
    for name in BUCKETS:
        bucket = _bucket(headers, PREFIX + name, now)
        if bucket is not None:
            found[name.replace("-", "_")] = bucket
    return RateLimits(seen_at=now, **found)


def _bucket(headers: Mapping[str, str], prefix: str, now: float) -> Bucket | None:
    limit = _int(headers.get(prefix + "-limit"))
    remaining = _int(headers.get(prefix + "-remaining"))
    if limit is None or remaining is None:
        return None
    reset_at = parse_time(headers.get(prefix + "-reset"))
    return Bucket(limit, max(0, remaining), now if reset_at is None else reset_at)


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def parse_time(value: str | None) -> float | None:
    """Epoch seconds of an RFC 3339 time (``2026-12-02T09:30:00Z``), None when unreadable."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def format_time(epoch_s: float) -> str:
    """RFC 3339 in UTC with a ``Z``, whole seconds rounded up, as the API writes ``reset``."""
    when = datetime.fromtimestamp(math.ceil(epoch_s), tz=UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def header_pairs(name: str, limit: int, remaining: int, reset_at: float) -> dict[str, str]:
    """The three headers of bucket ``name`` (one of BUCKETS)."""
    prefix = PREFIX + name
    return {
        prefix + "-limit": str(limit),
        prefix + "-remaining": str(max(0, remaining)),
        prefix + "-reset": format_time(reset_at),
    }
