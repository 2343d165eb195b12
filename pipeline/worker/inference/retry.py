"""Retry timing and the retry budget that keeps a broken upstream from causing a retry storm.

The budget follows Finagle's design: every request deposits ``ratio`` of a retry, every retry
withdraws a whole one, and deposits expire after ``window_s`` so credit from a healthy past cannot
pay for a storm now. A small floor (``min_retries_per_window``) lets a quiet service still retry.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

# Credit is counted in thousandths of a retry so that ten deposits of 0.1 make exactly one retry.
_UNIT = 1000
# Deposits closer together than this fraction of the window share one expiry entry, which bounds
# memory to ~100 entries whatever the request rate. The merged entry keeps the earlier expiry, so
# merging can only make the budget stricter, never looser.
_MERGE_FRACTION = 0.01


@dataclass(slots=True)
class _Credit:
    expires_at: float
    units: int


class RetryBudget:
    """Allows at most ``ratio`` x recent requests + ``min_retries_per_window`` retries.

    Guarantee: if every deposit and withdrawal happens within one window, withdrawals never exceed
    ``floor(ratio * deposits) + min_retries_per_window``; over any run of length T, they never
    exceed ``ratio * deposits + min_retries_per_window * (T / window_s + 1)``.
    """

    def __init__(
        self,
        ratio: float = 0.1,
        *,
        min_retries_per_window: int = 3,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("ratio must be within [0, 1]")
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.ratio = ratio
        self.min_retries_per_window = max(0, min_retries_per_window)
        self.window_s = window_s
        self._clock = clock
        self._per_deposit = round(ratio * _UNIT)
        self._merge_s = window_s * _MERGE_FRACTION
        self._credits: deque[_Credit] = deque()  # oldest first
        self._balance = 0
        self._floor_used: deque[float] = deque()  # when each floor-paid retry happened

    def deposit(self) -> None:
        """Record one request (not a retry): it earns ``ratio`` of a retry for one window."""
        if self._per_deposit == 0:
            return
        expires = self._clock() + self.window_s
        if self._credits and expires - self._credits[-1].expires_at <= self._merge_s:
            self._credits[-1].units += self._per_deposit
        else:
            self._credits.append(_Credit(expires, self._per_deposit))
        self._balance += self._per_deposit

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False means the caller must not retry."""
        now = self._clock()
        self._expire(now)
        if self._balance >= _UNIT:
            self._take(_UNIT)
            return True
        if len(self._floor_used) < self.min_retries_per_window:
            self._floor_used.append(now)
            return True
        return False

    @property
    def available(self) -> int:
        """Whole retries the budget would allow right now."""
        self._expire(self._clock())
        return self._balance // _UNIT + self.min_retries_per_window - len(self._floor_used)

    def _expire(self, now: float) -> None:
        while self._credits and self._credits[0].expires_at <= now:
            self._balance -= self._credits.popleft().units
        while self._floor_used and self._floor_used[0] <= now - self.window_s:
            self._floor_used.popleft()

    def _take(self, units: int) -> None:
        # Oldest credit first: it expires soonest, so spending it wastes the least.
        self._balance -= units
        while units > 0:
            head = self._credits[0]
            used = min(units, head.units)
            head.units -= used
            units -= used
            if head.units == 0:
                self._credits.popleft()


def backoff_delay(
    attempt: int,
    *,
    base_s: float,
    cap_s: float,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry).

    Exponential backoff with full jitter (uniform in [0, min(cap, base * 2^(attempt-1))]) so
    clients that failed together do not retry together; never sooner than ``retry_after_s``.
    """
    ceiling = min(cap_s, base_s * 2.0 ** min(max(attempt, 1) - 1, 62))
    delay = (rng or random).uniform(0.0, ceiling)
    if retry_after_s is not None and retry_after_s > delay:
        delay = retry_after_s
    return delay
