"""Noticing that this worker did not run for longer than its consumer group's session timeout
(a SIGSTOP, a paused VM): by then the group has given its partitions to others, who resume
its requests, so nothing it had under way may reach `tokens` any more (docs/architecture.md,
"Rebalances")."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

# How often the watch notes that the loop ran; a freeze is a gap far longer than this.
TICK_S = 0.25


class FreezeWatch:
    """A ticking task, and the check an emit makes before it writes: whichever runs first
    after a freeze calls ``on_wake`` (once per freeze)."""

    def __init__(
        self,
        limit_s: float,
        on_wake: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit_s = limit_s
        self._on_wake = on_wake
        self._clock = clock
        self._last = clock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._last = self._clock()
        self._task = asyncio.ensure_future(self._tick())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def check(self) -> None:
        """Call ``on_wake`` if the process has just come back from a freeze longer than the
        limit. The ticking task cannot have run during the freeze, so the first of it and an
        emit to run afterwards still sees the tick from before."""
        now = self._clock()
        if now - self._last > self.limit_s:
            self._last = now
            self._on_wake()

    async def _tick(self) -> None:
        while True:
            self.check()
            self._last = self._clock()
            await asyncio.sleep(TICK_S)
