"""The limit of one upstream, learned from its answers (docs/architecture.md, "Rate limits and
adaptive concurrency").

Three signals, one object per upstream and worker:

- **Concurrency (AIMD).** A 429 or an overload (529) multiplies the limit by ``decrease``, once
  per round trip: answers to calls started before the last decrease were sent under the old
  limit and say nothing new. A success adds ``1 / limit`` (one per round of ``limit`` calls)
  while the time to first token stays within ``ttft_tolerance`` x its recent best; a slower
  first token holds the limit where it is. After a decrease the limit climbs back fast to just
  below where it was refused, then probes beyond it ``probe_slowdown`` times more slowly, so a
  hard limit costs a refused call every few dozen, not every few; each refusal in a row at
  the same level doubles that slowdown again.
- **Pause.** A ``retry-after`` pauses every new call to the upstream until then, once for
  everybody, instead of each request sleeping on its own.
- **Pacing.** The last ``anthropic-ratelimit-*`` report, refilled since at the bucket's rate and
  minus the calls started since, says whether a call of this weight (input tokens + expected
  output) fits; if not, how long until it does.

With N workers each takes ``share`` (its part of the ``preprocessed`` partitions) of the
configured ceiling and of every bucket, so together they stay within what the upstream allows.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.llm.ratelimit import Bucket, RateLimits

# How long the limit at which the upstream refused slows down probing beyond it.
REFUSAL_MEMORY_S = 120.0
# After this long without a refusal the limit grows by slow start again: the episode that
# lowered it is over, and one refusal (cut to what the upstream answered) finds the new level.
CALM_S = 15.0
# Refusals in a row at about the same level (within one call) say the upstream has a hard
# limit there: each doubles how slowly the limiter probes beyond it, up to 2**MAX_REPEATS. The
# calm before slow start stays CALM_S: after a burst of random 429s (refusals at one low level
# too) the limit must recover in seconds.
MAX_REPEATS = 4
# How many recent first-token times the latency baseline is the best of.
TTFT_SAMPLES = 50
# A refusal whose report shows a bucket with less than this share left is the bucket's doing.
DRAINED = 0.1
# Calls started more than this long ago no longer count as unreported: every bucket has
# refilled them by now.
HELD_FOR_S = 60.0


@dataclass(frozen=True, slots=True)
class Cost:
    """What one call takes from the buckets: one request, its input and expected output."""

    input_tokens: int
    output_tokens: int

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class _Held:
    started_at: float
    cost: Cost


class UpstreamLimiter:
    """The learned concurrency limit, the shared pause and bucket pacing of one upstream."""

    def __init__(
        self,
        *,
        ceiling: int,
        initial: int,
        fleet_ceiling: int = 0,
        decrease: float = 0.7,
        ttft_tolerance: float = 2.0,
        ttft_slack_s: float = 0.25,
        probe_slowdown: float = 4.0,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[UpstreamLimiter], None] | None = None,
    ) -> None:
        if ceiling < 1 or initial < 1:
            raise ValueError("the ceiling and the initial limit must be at least 1")
        if not 0.0 < decrease < 1.0:
            raise ValueError("decrease must be within (0, 1)")
        self.ceiling = ceiling
        self.fleet_ceiling = fleet_ceiling
        self.decrease = decrease
        self.ttft_tolerance = ttft_tolerance
        self.ttft_slack_s = ttft_slack_s
        self.probe_slowdown = probe_slowdown
        self.share = 1.0
        self.paused_until = 0.0
        self.in_flight = 0
        # Calls the upstream answered with a stream (200) that are still running: what it
        # took while it refused others, the best guess of its capacity.
        self.accepted_now = 0
        self.initial = initial
        self.limit = float(min(initial, ceiling))
        self._clock = clock
        self._on_change = on_change
        self._decreased_at = 0.0
        # Until the first refusal the limit grows by one per success (doubling per round trip).
        self.slow_start = True
        # The limit at which the upstream last refused (and when): probing beyond it goes
        # slowly for REFUSAL_MEMORY_S, then at the usual pace, since limits get raised.
        self._refused_at: float | None = None
        self._refused_time = 0.0
        self._repeats = 0
        self._ttfts: deque[float] = deque(maxlen=TTFT_SAMPLES)
        self._report: RateLimits | None = None
        self._held: deque[_Held] = deque()
        self._expected_output: float | None = None
        self._changed = asyncio.Event()

    # -- what callers ask

    @property
    def allowed(self) -> int:
        """Calls that may be in flight now: the learned limit within this worker's ceiling."""
        return max(1, min(math.floor(self.limit), self.own_ceiling))

    @property
    def own_ceiling(self) -> int:
        """``ceiling`` (this process's streams), within this worker's share of the fleet's."""
        if not self.fleet_ceiling:
            return self.ceiling
        return max(1, min(self.ceiling, math.floor(self.fleet_ceiling * self.share)))

    def expected_output(self, max_tokens: int) -> int:
        """Output tokens to expect from a call allowed ``max_tokens``: the recent mean, capped."""
        if self._expected_output is None:
            return max_tokens
        return min(max_tokens, math.ceil(self._expected_output))

    def delay_s(self, cost: Cost) -> float:
        """Seconds a call of ``cost`` must wait: the pause, then room in every bucket."""
        now = self._clock()
        wait = max(0.0, self.paused_until - now)
        report = self._report
        if report is None:
            return wait
        self._forget_held(now)
        elapsed = now - report.seen_at
        held = [entry.cost for entry in self._held]
        buckets = (
            (report.requests, 1, len(held)),
            (report.tokens, cost.tokens, sum(c.tokens for c in held)),
            (report.input_tokens, cost.input_tokens, sum(c.input_tokens for c in held)),
            (report.output_tokens, cost.output_tokens, sum(c.output_tokens for c in held)),
        )
        for bucket, amount, promised in buckets:
            if bucket is not None:
                wait = max(wait, self._share_of(bucket).wait_s(amount, elapsed, held=promised))
        return wait

    @property
    def full(self) -> bool:
        """Are ``allowed`` calls in flight already? After a decrease, jobs that hold a
        scheduler slot since before it retry only as calls end, not every retry-after."""
        return self.in_flight >= self.allowed

    async def wait_for_room(self, cost: Cost) -> bool:
        """Wait until a call of ``cost`` may start: no pause, room in every bucket and fewer
        than ``allowed`` calls in flight. True when it had to wait (a paced call)."""
        waited = False
        while (delay := self.delay_s(cost)) > 0 or self.full:
            waited = True
            event = self._changed
            try:
                # No time to wait for a full limit: a call ending or the limit rising wakes us.
                async with asyncio.timeout(delay if delay > 0 else None):
                    await event.wait()
            except TimeoutError:
                pass
        return waited

    async def wait_unpaused(self) -> None:
        """Wait until no retry-after pauses the upstream."""
        while (delay := self.paused_until - self._clock()) > 0:
            event = self._changed
            try:
                async with asyncio.timeout(delay):
                    await event.wait()
            except TimeoutError:
                pass

    # -- what callers tell

    def started(self, cost: Cost) -> float:
        """A call goes out now: it holds its cost until a report counts it. Returns its start."""
        now = self._clock()
        self._held.append(_Held(now, cost))
        self.in_flight += 1
        return now

    def accepted(self) -> None:
        """A call that ``started`` was answered with a stream."""
        self.accepted_now += 1

    def ended(self, accepted: bool = False) -> None:
        """A call that ``started`` is over, whatever its outcome (``accepted``: it had been)."""
        self.in_flight = max(0, self.in_flight - 1)
        if accepted:
            self.accepted_now = max(0, self.accepted_now - 1)
        self._notify()  # room for a call waiting on a full limit

    def reported(self, limits: RateLimits, started_at: float) -> None:
        """A response of the call started at ``started_at`` reported the buckets."""
        if limits.empty:
            # An answer without a report: the upstream no longer limits by buckets (a limit
            # lifted, another endpoint); an old report must not pace calls for ever.
            if self._report is not None and limits.seen_at >= self._report.seen_at:
                self._report = None
                self._held.clear()
                self._notify()
            return
        if self._report is None or limits.seen_at >= self._report.seen_at:
            self._report = limits
        # The upstream counted every call that reached it before this one.
        while self._held and self._held[0].started_at <= started_at:
            self._held.popleft()
        self._notify()

    def observe_output(self, output_tokens: int) -> None:
        """A call ended with ``output_tokens``: the expected output follows (moving average)."""
        self._expected_output = (
            float(output_tokens)
            if self._expected_output is None
            else 0.8 * self._expected_output + 0.2 * output_tokens
        )

    def succeeded(self, started_at: float, ttft_s: float | None) -> None:
        """A call got its first token after ``ttft_s`` (None: a whole reply, no latency signal)."""
        if ttft_s is not None:
            self._ttfts.append(ttft_s)
            if ttft_s > self.ttft_tolerance * min(self._ttfts) + self.ttft_slack_s:
                return  # the upstream is slowing down: hold the limit
        # Only a limit in use is tested by a success: an idle one must not grow without bound.
        if self.limit >= self.own_ceiling or self.in_flight < self.allowed - 1:
            return
        now = self._clock()
        if not self.slow_start and now - self._refused_time > CALM_S:
            self.slow_start, self._refused_at, self._repeats = True, None, 0
        if self._refused_at is not None and now - self._refused_time > REFUSAL_MEMORY_S:
            self._refused_at, self._repeats = None, 0
        if self.slow_start:
            step = 1.0
        elif self._refused_at is not None and self.limit + 1 < self._refused_at:
            step = 1.0  # back fast to just below where the upstream last refused
        else:
            step = 1.0 / self.limit
            if self._refused_at is not None:
                # Every worker probes its share: together they probe as fast as one would.
                step *= self.share / (self.probe_slowdown * 2**self._repeats)
        self._set_limit(min(float(self.own_ceiling), self.limit + step))

    def refused(self, started_at: float, retry_after_s: float | None) -> None:
        """A 429 or an overload: pause for ``retry_after_s`` and decrease, once per round trip.

        A refusal whose own report shows a drained bucket is the bucket's doing: the pause and
        the pacing deal with it, and the concurrency limit stays (it would only have to climb
        back once the bucket refills)."""
        now = self._clock()
        if retry_after_s is not None and retry_after_s > 0:
            self.paused_until = max(self.paused_until, now + retry_after_s)
        if self._bucket_drained(started_at):
            self._notify()
            return
        if started_at >= self._decreased_at:
            self._decreased_at = now
            self.slow_start = False
            limit = self.limit * self.decrease
            refused_at = self.limit
            if self.accepted_now:
                # What the upstream takes is what it answered meanwhile: a limit grown far
                # beyond that (an upstream whose capacity just dropped) goes straight there.
                limit = min(limit, float(self.accepted_now))
                refused_at = min(refused_at, float(self.accepted_now + 1))
            again = self._refused_at is not None and abs(refused_at - self._refused_at) <= 1
            self._repeats = min(self._repeats + 1, MAX_REPEATS) if again else 0
            self._refused_at, self._refused_time = refused_at, now
            self._set_limit(max(1.0, limit))
        self._notify()

    def restart(self) -> None:
        """Learn the limit afresh (after an outage, whose refusals said nothing about it)."""
        self.slow_start = True
        self._refused_at, self._repeats = None, 0
        self._set_limit(float(max(1, min(self.initial, self.own_ceiling))))

    def set_share(self, share: float) -> None:
        """This worker's part of the upstream (its partitions / all); the limit scales along."""
        share = min(1.0, max(share, 1e-6))
        if share != self.share:
            ratio, self.share = share / self.share, share
            self._set_limit(max(1.0, min(float(self.own_ceiling), self.limit * ratio)))
            if self._refused_at is not None:
                self._refused_at *= ratio

    # -- internals

    def _bucket_drained(self, started_at: float) -> bool:
        """Did the report of a call started at ``started_at`` (or later) show a bucket below
        DRAINED of its size?"""
        report = self._report
        if report is None or report.seen_at < started_at:
            return False
        buckets = (report.requests, report.tokens, report.input_tokens, report.output_tokens)
        return any(b is not None and b.remaining < DRAINED * b.limit for b in buckets)

    def _share_of(self, bucket: Bucket) -> Bucket:
        if self.share >= 1.0:
            return bucket
        return Bucket(
            max(1, math.floor(bucket.limit * self.share)),
            math.floor(bucket.remaining * self.share),
            bucket.reset_at,
        )

    def _forget_held(self, now: float) -> None:
        while self._held and self._held[0].started_at < now - HELD_FOR_S:
            self._held.popleft()

    def _set_limit(self, limit: float) -> None:
        before = self.allowed
        self.limit = limit
        if self.allowed != before and self._on_change is not None:
            self._on_change(self)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
