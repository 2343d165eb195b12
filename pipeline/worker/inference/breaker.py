"""A circuit breaker per upstream: stop calling a failing model API, probe it, recover."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable

from pipeline.core.metrics import BREAKER_STATE

logger = logging.getLogger("sumstream.breaker")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


# The gauge's encoding, documented on BREAKER_STATE.
_GAUGE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; after ``reset_s``, one probe.

    A successful probe closes it, a failed one opens it again for another ``reset_s``.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_recovered: Callable[[], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_s = reset_s
        self._clock = clock
        # Called when it closes after an opening (the upstream limiter relearns its limit).
        self._on_recovered = on_recovered
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self._changed = asyncio.Event()
        BREAKER_STATE.labels(upstream=name).set(_GAUGE_VALUE[self._state])

    @property
    def state(self) -> BreakerState:
        # Open turns half-open lazily, when somebody looks after reset_s has passed.
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_s:
            self._transition(BreakerState.HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        """May a call go upstream now? In half-open, True for exactly one caller (the probe)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        """The upstream answered: any state closes."""
        self._failures = 0
        if self._state is not BreakerState.CLOSED:
            self._transition(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """The upstream failed in a way that says it is unhealthy (5xx, 429, connection)."""
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._transition(BreakerState.OPEN)
        elif state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._transition(BreakerState.OPEN)
        # Failures reported while open come from calls started before it opened: the clock
        # keeps running from the first opening so the probe is not postponed forever.

    def record_abandoned(self) -> None:
        """A call ended without a verdict (cancelled, deadline): free the probe slot if it held it.

        The breaker cannot tell which call was the probe, so a non-probe call abandoned while
        half-open also frees the slot; the cost is at most one extra probe.
        """
        if self._state is BreakerState.HALF_OPEN and self._probe_in_flight:
            self._probe_in_flight = False
            self._notify()

    async def wait_closed_or_probe(self) -> None:
        """Wait until ``allow()`` says yes for this caller (it may be the half-open probe)."""
        while not self.allow():
            event = self._changed
            timeout: float | None = None
            if self._state is BreakerState.OPEN:
                timeout = max(0.0, self._opened_at + self.reset_s - self._clock())
            try:
                async with asyncio.timeout(timeout):
                    await event.wait()
            except TimeoutError:
                pass

    async def wait_not_open(self) -> None:
        """Wait while the breaker is open; it turns half-open by itself after ``reset_s``."""
        while self.state is BreakerState.OPEN:
            event = self._changed
            timeout = max(0.0, self._opened_at + self.reset_s - self._clock())
            try:
                async with asyncio.timeout(timeout):
                    await event.wait()
            except TimeoutError:
                pass

    def _transition(self, state: BreakerState) -> None:
        previous = self._state
        self._state = state
        self._probe_in_flight = False
        if state is BreakerState.OPEN:
            self._opened_at = self._clock()
        if state is BreakerState.CLOSED:
            self._failures = 0
            if self._on_recovered is not None:
                self._on_recovered()
        BREAKER_STATE.labels(upstream=self.name).set(_GAUGE_VALUE[state])
        level = logging.WARNING if state is BreakerState.OPEN else logging.INFO
        logger.log(
            level,
            "circuit breaker for %s: %s -> %s",
            self.name,
            previous.value,
            state.value,
            extra={"upstream": self.name, "state": state.value, "previous_state": previous.value},
        )
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
