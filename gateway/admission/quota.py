"""Per-user limits (requests/min, tokens/min, monthly budget) whose state lives in Kafka.

The `quota` topic is the ledger: RESERVE, SETTLE and RELEASE records keyed by user id. Every
gateway instance reads every partition of it (no consumer group) and applies the records in
log order to a pure ``QuotaState``, which decides each RESERVE from the records before it in
its partition. All instances read the same log with the same tier table, so they reach the
same verdicts and two gateways admitting for one user never exceed the limits together.

Rules of the log (``QuotaState``):

* Time is the record's log timestamp (the topic uses LogAppendTime: one broker clock per
  partition, so gateway clock skew cannot widen a window), clamped to never go backwards.
* A RESERVE is granted iff the month's settled cost is below the tier's monthly budget, and
  within the sliding window ending at its time, granted requests + its own <= rpm and
  reserved-or-settled tokens + its own <= tpm. Refused RESERVEs count for nothing.
* Each calendar month (UTC) of a partition starts from an empty state, so an instance that
  replays from the start of the month (``QuotaLedger.start``) reaches exactly the state of an
  instance that has run all month. The price: the per-minute window restarts at 00:00 UTC on
  the 1st, which may let a user through twice their per-minute limit once a month.
* SETTLE replaces a reservation's tokens with the real figure and adds its cost to the month.
  A SETTLE without a reservation in the last ``horizon`` (a request produced straight onto
  `requests` by another system) counts its tokens at its own time and its cost.
* RELEASE drops a reservation that never ran. A RESERVE never settled nor released counts at
  its reserved figure until the window passes: the safe side.

Who settles: the gateways, in one consumer group on `results` (gateway/admission/settle.py), so each
result is settled once its partition's settler reads it, even when the gateway that accepted
the request is gone; with the result's total tokens and cost. A gateway that fails to
produce a request releases its reservation.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError

from gateway.http.errors import BrokerUnavailable, BudgetExceeded, GatewayError, RateLimited
from pipeline.core.codec import codec
from pipeline.core.errors import CodecError, TopicMissingError, ValidationError
from pipeline.core.partitioning import partition_for
from pipeline.core.settings import KafkaSettings
from pipeline.core.tiers import Tier

log = logging.getLogger("sumstream.gateway.quota")

Kind = Literal["RESERVE", "SETTLE", "RELEASE", "UNKNOWN"]
Reason = Literal["rate_limit", "token_limit", "budget"]
_RESERVED, _SETTLED, _RELEASED, _UNRESERVED = "reserved", "settled", "released", "unreserved"


class QuotaUnavailable(BrokerUnavailable):
    """The ledger could not write or read its record in time (broker gone, ledger stopped)."""

    title = "Quota ledger unavailable"
    code = "quota_unavailable"

    def __init__(self, message: str = "", *, retry_after_s: float | None = 1.0) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


@dataclass(frozen=True)
class QuotaEvent:
    """One record of the `quota` topic (schemas/QuotaEvent.avsc)."""

    event_id: str
    user_id: str
    kind: Kind
    request_id: str
    at: int
    tier: str = ""
    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 1
    cost_micro_usd: int = 0
    gateway: str = ""
    trace: Mapping[str, int] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, at: int | None = None) -> QuotaEvent:
        """Build from a decoded record; ``at`` (the log's timestamp) overrides the writer's."""
        names = cls.__dataclass_fields__
        values = {k: v for k, v in record.items() if k in names}
        if at is not None:
            values["at"] = at
        return cls(**values)


@dataclass(frozen=True)
class Verdict:
    """A RESERVE's outcome. ``retry_after_s`` says when the same RESERVE would fit."""

    granted: bool
    reason: Reason | None = None
    retry_after_s: float | None = None
    remaining_requests: int = 0
    remaining_tokens: int = 0

    def error(self) -> GatewayError | None:
        """The 429 to answer with when refused: its own problem type for the budget."""
        if self.granted:
            return None
        if self.reason == "budget":
            return BudgetExceeded(
                "the monthly budget of this tier is spent", retry_after_s=self.retry_after_s
            )
        what = "requests" if self.reason == "rate_limit" else "tokens"
        return RateLimited(
            f"{what} per minute limit of this tier reached",
            retry_after_s=self.retry_after_s,
            extra={"limit": self.reason},
        )


@dataclass(frozen=True)
class UsageSummary:
    """A user's figures for the current calendar month and the current window."""

    user_id: str
    tier: str
    period_start_ms: int
    period_end_ms: int
    requests: int
    tokens: int
    input_tokens: int
    output_tokens: int
    cost_micro_usd: int
    budget_micro_usd: int
    remaining_micro_usd: int
    rpm: int
    tpm: int
    window_requests: int
    window_tokens: int


def _counted_requests(entry: _Entry) -> int:
    return 0 if entry.state == _UNRESERVED else entry.requests


def _counted_tokens(entry: _Entry) -> int:
    return entry.tokens


def month_start_ms(t_ms: int) -> int:
    """Epoch ms of 00:00 UTC on the first day of ``t_ms``'s month."""
    d = datetime.fromtimestamp(t_ms / 1000, UTC)
    return calendar.timegm((d.year, d.month, 1, 0, 0, 0)) * 1000


def next_month_start_ms(t_ms: int) -> int:
    d = datetime.fromtimestamp(t_ms / 1000, UTC)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0)) * 1000


@dataclass(slots=True)
class _Entry:
    request_id: str
    at: int
    requests: int
    tokens: int
    state: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost: int = 0


@dataclass
class _UserBook:
    tier: str = ""
    entries: deque[_Entry] = field(default_factory=deque)  # ordered by ``at``
    by_request: dict[str, _Entry] = field(default_factory=dict)
    # Month totals.
    requests: int = 0
    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: int = 0


class QuotaState:
    """The verdict function: the state of one partition of the ledger, fed in log order."""

    def __init__(
        self, tiers: Mapping[str, Tier], *, window_ms: int = 60_000, horizon_ms: int = 3_600_000
    ) -> None:
        self.tiers = tiers
        self.window_ms = window_ms
        # How long a reservation is remembered for its SETTLE/RELEASE (at least the window).
        self.horizon_ms = max(horizon_ms, window_ms)
        self.month_start: int | None = None
        self.month_end: int | None = None
        self.last_at = 0
        self.users: dict[str, _UserBook] = {}

    def apply(self, event: QuotaEvent) -> Verdict | None:
        """Apply the next record of the partition; a RESERVE returns its verdict."""
        t = max(event.at, self.last_at)
        self.last_at = t
        if self.month_end is None or t >= self.month_end:
            self.users.clear()
            self.month_start, self.month_end = month_start_ms(t), next_month_start_ms(t)
        book = self.users.setdefault(event.user_id, _UserBook())
        self._prune(book, t)
        if event.kind == "RESERVE":
            book.tier = event.tier
            return self._reserve(book, event, t)
        if event.kind == "SETTLE":
            self._settle(book, event, t)
        elif event.kind == "RELEASE":
            entry = self._live(book, event.request_id, t)
            if entry is not None and entry.state == _RESERVED:
                entry.state = _RELEASED
                book.requests -= entry.requests
        return None

    def _prune(self, book: _UserBook, t: int) -> None:
        while book.entries and book.entries[0].at <= t - self.horizon_ms:
            old = book.entries.popleft()
            if book.by_request.get(old.request_id) is old:
                del book.by_request[old.request_id]

    def _live(self, book: _UserBook, request_id: str, t: int) -> _Entry | None:
        entry = book.by_request.get(request_id)
        return entry if entry is not None and entry.at > t - self.horizon_ms else None

    def _window(self, book: _UserBook, t: int) -> list[_Entry]:
        """The entries that count at ``t``, oldest first."""
        out: list[_Entry] = []
        for entry in reversed(book.entries):
            if entry.at <= t - self.window_ms:
                break
            if entry.state != _RELEASED:
                out.append(entry)
        out.reverse()
        return out

    def _reserve(self, book: _UserBook, event: QuotaEvent, t: int) -> Verdict:
        tier = self.tiers.get(event.tier)
        window = self._window(book, t)
        used_requests = sum(map(_counted_requests, window))
        used_tokens = sum(map(_counted_tokens, window))
        rpm = tier.rpm if tier else 0
        tpm = tier.tpm if tier else 0
        existing = self._live(book, event.request_id, t)
        if existing is not None and existing.state in (_RESERVED, _SETTLED):
            # The same request reserved again (a writer's retry): one reservation, granted.
            return Verdict(True, None, None, rpm - used_requests, tpm - used_tokens)
        if tier is None:
            # A tier this instance does not know: refused the same way by every instance.
            return Verdict(False, "rate_limit", self.window_ms / 1000)
        if book.cost >= tier.monthly_budget_micro_usd:
            return Verdict(False, "budget", (next_month_start_ms(t) - t) / 1000)
        over_requests = used_requests + event.requests - rpm
        over_tokens = used_tokens + event.tokens - tpm
        if over_requests <= 0 and over_tokens <= 0:
            entry = _Entry(event.request_id, t, event.requests, event.tokens, _RESERVED)
            book.entries.append(entry)
            book.by_request[event.request_id] = entry
            book.requests += event.requests
            return Verdict(True, None, None, -over_requests, -over_tokens)
        wait_ms = max(
            self._frees_at(window, over_requests, t, _counted_requests),
            self._frees_at(window, over_tokens, t, _counted_tokens),
        )
        reason: Reason = "rate_limit" if over_requests > 0 else "token_limit"
        return Verdict(
            False, reason, wait_ms / 1000, max(0, rpm - used_requests), max(0, tpm - used_tokens)
        )

    def _frees_at(
        self, window: list[_Entry], need: int, t: int, amount: Callable[[_Entry], int]
    ) -> int:
        """Ms from ``t`` until enough of the oldest entries leave the window to free ``need``.

        A RESERVE bigger than the whole limit never fits; it gets one window, and the gateway
        should have refused it before (the tier's max input and output tokens).
        """
        if need <= 0:
            return 0
        freed = 0
        for entry in window:
            freed += amount(entry)
            if freed >= need:
                return entry.at + self.window_ms - t
        return self.window_ms

    def _settle(self, book: _UserBook, event: QuotaEvent, t: int) -> None:
        entry = self._live(book, event.request_id, t)
        if entry is None:
            entry = _Entry(event.request_id, t, 0, 0, _UNRESERVED)
            book.entries.append(entry)
            book.by_request[event.request_id] = entry
        elif entry.state in (_SETTLED, _UNRESERVED):
            # A second SETTLE for one request replaces the first.
            book.tokens -= entry.tokens
            book.input_tokens -= entry.input_tokens
            book.output_tokens -= entry.output_tokens
            book.cost -= entry.cost
        elif entry.state == _RELEASED:
            # Released, yet it ran after all: it counts again.
            book.requests += entry.requests
        if entry.state != _UNRESERVED:
            entry.state = _SETTLED
        entry.tokens = event.tokens
        entry.input_tokens = event.input_tokens
        entry.output_tokens = event.output_tokens
        entry.cost = event.cost_micro_usd
        book.tokens += event.tokens
        book.input_tokens += event.input_tokens
        book.output_tokens += event.output_tokens
        book.cost += event.cost_micro_usd

    def usage(self, user_id: str, tier_name: str | None, now_ms: int) -> UsageSummary:
        """The user's month and window figures as of ``now_ms`` (at least the last record)."""
        t = max(now_ms, self.last_at)
        current = self.month_end is not None and t < self.month_end
        book = self.users.get(user_id) if current else None
        book = book or _UserBook()
        name = tier_name or book.tier
        tier = self.tiers.get(name)
        window = self._window(book, t)
        budget = tier.monthly_budget_micro_usd if tier else 0
        return UsageSummary(
            user_id=user_id,
            tier=name,
            period_start_ms=month_start_ms(t),
            period_end_ms=next_month_start_ms(t),
            requests=book.requests,
            tokens=book.tokens,
            input_tokens=book.input_tokens,
            output_tokens=book.output_tokens,
            cost_micro_usd=book.cost,
            budget_micro_usd=budget,
            remaining_micro_usd=max(0, budget - book.cost),
            rpm=tier.rpm if tier else 0,
            tpm=tier.tpm if tier else 0,
            window_requests=sum(map(_counted_requests, window)),
            window_tokens=sum(map(_counted_tokens, window)),
        )


def evaluate(
    events: list[QuotaEvent], tiers: Mapping[str, Tier], *, window_ms: int = 60_000
) -> dict[str, Verdict]:
    """The verdict of every RESERVE in ``events`` (one partition's records, in log order)."""
    state = QuotaState(tiers, window_ms=window_ms)
    verdicts: dict[str, Verdict] = {}
    for event in events:
        verdict = state.apply(event)
        if verdict is not None:
            verdicts[event.event_id] = verdict
    return verdicts


class QuotaLedger:
    """The per-user limits of every gateway instance, shared through the `quota` topic."""

    def __init__(
        self,
        settings: KafkaSettings,
        tiers: Mapping[str, Tier],
        *,
        gateway_id: str,
        window_s: float = 60.0,
        timeout_s: float = 5.0,
        horizon_s: float = 3600.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.settings = settings
        self.tiers = tiers
        self.gateway_id = gateway_id
        self.topic = f"{settings.topic_prefix}quota"
        self._window_ms = round(window_s * 1000)
        self._horizon_ms = round(horizon_s * 1000)
        self._timeout_s = timeout_s
        self._start_timeout_s = start_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._states: dict[int, QuotaState] = {}
        self._waiters: dict[str, asyncio.Future[Verdict | None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._ready: asyncio.Future[None] | None = None
        self._stopping = False

    async def __aenter__(self) -> QuotaLedger:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def ready(self) -> bool:
        return self._ready is not None and self._ready.done() and not self._ready.exception()

    async def start(self) -> None:
        """Connect, replay the month so far from every partition, then serve."""
        s = self.settings
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            linger_ms=0,
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )
        try:
            await self._producer.start()
            await self._consumer.start()
            tps = [TopicPartition(self.topic, p) for p in await self._partitions()]
            self._consumer.assign(tps)
            # Each month of a partition starts empty (see QuotaState): replaying from the
            # month's first record reaches the state of an instance that ran all month.
            since = month_start_ms(int(time.time() * 1000))
            found = await self._consumer.offsets_for_times(dict.fromkeys(tps, since))
            ends: dict[TopicPartition, int] = await self._consumer.end_offsets(tps)
            for tp in tps:
                hit = found.get(tp)
                self._consumer.seek(tp, hit.offset if hit is not None else ends[tp])
            self._states = {
                tp.partition: QuotaState(
                    self.tiers, window_ms=self._window_ms, horizon_ms=self._horizon_ms
                )
                for tp in tps
            }
            self._ready = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._consume(ends), name="quota-ledger")
            async with asyncio.timeout(self._start_timeout_s):
                await asyncio.shield(self._ready)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, KafkaError | TimeoutError):
                raise QuotaUnavailable(f"quota ledger cannot start: {exc!r}") from exc
            raise
        log.info("quota ledger ready", extra={"topic": self.topic, "partitions": len(tps)})

    async def stop(self) -> None:
        """Stop reading and writing; callers still waiting get QuotaUnavailable."""
        self._stopping = True
        tasks = [t for t in (self._task, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        # return_exceptions: a crashed reader was logged already; collect it, do not re-raise.
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._background.clear()
        self._fail_waiters(QuotaUnavailable("quota ledger stopped"))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(QuotaUnavailable("quota ledger stopped"))
        if self._ready is not None and self._ready.done():
            self._ready.exception()  # retrieved, so asyncio does not warn about it
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(KafkaError):
                    await client.stop()
        self._consumer = self._producer = None
        self._stopping = False

    async def reserve(self, user_id: str, tier: str, request_id: str, tokens: int) -> Verdict:
        """Reserve one request and ``tokens`` tokens; the log decides (see QuotaState)."""
        if tier not in self.tiers:
            raise ValidationError(f"unknown tier {tier!r}")
        if tokens < 0:
            raise ValidationError("tokens must not be negative")
        self._check_running()
        event = self._event("RESERVE", user_id, tier, request_id, tokens=tokens)
        try:
            verdict = await self._append(event)
        except QuotaUnavailable:
            if not self._stopping:
                # The RESERVE may still land and be granted: give it back once the log is back.
                self._spawn(self._release_quietly(user_id, tier, request_id))
            raise
        assert verdict is not None
        return verdict

    async def settle(
        self,
        user_id: str,
        tier: str,
        request_id: str,
        actual_tokens: int,
        cost_micro_usd: int,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> None:
        """Replace the request's reservation by what it really used and cost."""
        await self._append(
            self._event(
                "SETTLE",
                user_id,
                tier,
                request_id,
                tokens=actual_tokens,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost_micro_usd=cost_micro_usd,
            )
        )

    async def release(self, user_id: str, tier: str, request_id: str) -> None:
        """Give back a reservation whose request never ran (e.g. producing it failed)."""
        await self._append(self._event("RELEASE", user_id, tier, request_id, requests=0))

    def usage(self, user_id: str, tier: str | None = None) -> UsageSummary:
        """The user's figures for this month, as this instance has read them (GET /v1/usage)."""
        partition = partition_for(user_id, len(self._states)) if self._states else 0
        state = self._states.get(partition) or QuotaState(self.tiers, window_ms=self._window_ms)
        return state.usage(user_id, tier, int(time.time() * 1000))

    # -- internals -----------------------------------------------------------------------------

    def _event(
        self,
        kind: Kind,
        user_id: str,
        tier: str,
        request_id: str,
        *,
        tokens: int = 0,
        input_tokens: int = 0,
        output_tokens: int = 0,
        requests: int = 1,
        cost_micro_usd: int = 0,
    ) -> QuotaEvent:
        return QuotaEvent(
            event_id=uuid.uuid4().hex,
            user_id=user_id,
            kind=kind,
            request_id=request_id,
            at=int(time.time() * 1000),
            tier=tier,
            tokens=tokens,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            requests=requests,
            cost_micro_usd=cost_micro_usd,
            gateway=self.gateway_id,
        )

    async def _append(self, event: QuotaEvent) -> Verdict | None:
        """Write ``event`` and wait until this instance has applied it: the log's answer."""
        self._check_running()
        assert self._producer is not None
        future: asyncio.Future[Verdict | None] = asyncio.get_running_loop().create_future()
        self._waiters[event.event_id] = future
        value = codec().encode("QuotaEvent", event.to_record())
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._producer.send_and_wait(
                    self.topic, value, key=event.user_id.encode(), timestamp_ms=event.at
                )
                return await future
        except (KafkaError, TimeoutError) as exc:
            raise QuotaUnavailable(f"quota {event.kind} not confirmed: {exc!r}") from exc
        finally:
            self._waiters.pop(event.event_id, None)

    def _check_running(self) -> None:
        if self._producer is None or self._stopping or not self.ready:
            raise QuotaUnavailable("quota ledger not running")

    async def _release_quietly(self, user_id: str, tier: str, request_id: str) -> None:
        event = self._event("RELEASE", user_id, tier, request_id, requests=0)
        value = codec().encode("QuotaEvent", event.to_record())
        producer = self._producer
        with contextlib.suppress(KafkaError, TimeoutError):
            async with asyncio.timeout(self._timeout_s * 6):
                if producer is not None:
                    await producer.send_and_wait(
                        self.topic, value, key=user_id.encode(), timestamp_ms=event.at
                    )

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _partitions(self) -> list[int]:
        assert self._producer is not None
        try:
            # Waits for metadata that names the topic (it may have been created a moment ago).
            async with asyncio.timeout(10):
                return sorted(await self._producer.partitions_for(self.topic))
        except (UnknownTopicOrPartitionError, TimeoutError) as exc:
            raise TopicMissingError(
                f"topic {self.topic} missing: run `sumstream topics create`"
            ) from exc

    async def _consume(self, ends: dict[TopicPartition, int]) -> None:
        try:
            await self._consume_loop(ends)
        except Exception as exc:
            # A bug, not the broker: say so loudly; every reserve now answers 503.
            log.exception("quota ledger reader crashed")
            error = QuotaUnavailable(f"quota ledger reader crashed: {exc!r}")
            self._fail_waiters(error)
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(error)
            raise

    async def _consume_loop(self, ends: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None and self._ready is not None
        pending = {tp for tp, end in ends.items() if await self._consumer.position(tp) < end}
        while True:
            if not pending and not self._ready.done():
                self._ready.set_result(None)
            try:
                batch = await self._consumer.getmany(timeout_ms=500, max_records=2000)
            except KafkaError as exc:
                # The client reconnects by itself; reserves time out meanwhile (503).
                log.warning("quota ledger read failed", extra={"error": repr(exc)})
                await asyncio.sleep(0.5)
                continue
            for tp, messages in batch.items():
                state = self._states[tp.partition]
                for message in messages:
                    self._apply(state, message)
            for tp in list(pending):
                if await self._consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)

    def _apply(self, state: QuotaState, message: Any) -> None:
        try:
            record = codec().decode_as(message.value, "QuotaEvent")
        except CodecError as exc:
            # Every instance skips the same record, so verdicts still agree.
            log.warning(
                "undecodable quota record skipped",
                extra={"partition": message.partition, "offset": message.offset, "error": str(exc)},
            )
            return
        event = QuotaEvent.from_record(record, at=message.timestamp)
        verdict = state.apply(event)
        future = self._waiters.get(event.event_id)
        if future is not None and not future.done():
            future.set_result(verdict)

    def _fail_waiters(self, exc: Exception) -> None:
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(exc)
        self._waiters.clear()
