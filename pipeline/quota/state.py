"""The quota maths: the verdict of every RESERVE, from the ledger records before it.

The `quota` topic is the ledger: RESERVE, SETTLE and RELEASE records keyed by user id. Every
process that reserves reads every partition of it (no consumer group) and applies the records in
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
* A RESERVE carrying the client's Idempotency-Key holds the (user, key) once granted, until the
  horizon passes or its request is released. A later RESERVE of another request under a held key
  is refused as ``duplicate`` and names the holder (and the body it was sent with), whatever the
  limits: the gateways answer it as a replay of the holder, so two POSTs with one key at two
  gateways never both run (docs/architecture.md, "Idempotency across gateways"). Beyond the
  horizon, each gateway's request index (which follows `requests` for 24 h) answers instead.

The Kafka side (writing records, reading the log, waiting for a verdict) is ``QuotaLedger`` in
pipeline/quota/ledger.py.
"""

from __future__ import annotations

import calendar
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pipeline.core.tiers import Tier

Kind = Literal["RESERVE", "SETTLE", "RELEASE", "UNKNOWN", "ATTACHED"]
Reason = Literal["rate_limit", "token_limit", "budget", "duplicate"]
_RESERVED, _SETTLED, _RELEASED, _UNRESERVED = "reserved", "settled", "released", "unreserved"


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
    idempotency_key: str | None = None
    body_sha256: str | None = None

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
    """A RESERVE's outcome. ``retry_after_s`` says when the same RESERVE would fit.

    ``duplicate_of`` (reason ``duplicate``): the request that holds the RESERVE's
    Idempotency-Key, and ``duplicate_body`` the body hash it was sent with.
    """

    granted: bool
    reason: Reason | None = None
    retry_after_s: float | None = None
    remaining_requests: int = 0
    remaining_tokens: int = 0
    duplicate_of: str | None = None
    duplicate_body: str | None = None


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
    key: str | None = None  # the Idempotency-Key it holds
    body: str | None = None


@dataclass
class _UserBook:
    tier: str = ""
    entries: deque[_Entry] = field(default_factory=deque)  # ordered by ``at``
    by_request: dict[str, _Entry] = field(default_factory=dict)
    # Idempotency-Key -> the live entry that holds it (pruned with the entries).
    keys: dict[str, _Entry] = field(default_factory=dict)
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
                if entry.key is not None and book.keys.get(entry.key) is entry:
                    del book.keys[entry.key]  # never produced: the key is free again
        return None

    def _prune(self, book: _UserBook, t: int) -> None:
        while book.entries and book.entries[0].at <= t - self.horizon_ms:
            old = book.entries.popleft()
            if book.by_request.get(old.request_id) is old:
                del book.by_request[old.request_id]
            if old.key is not None and book.keys.get(old.key) is old:
                del book.keys[old.key]

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
        holder = book.keys.get(event.idempotency_key) if event.idempotency_key else None
        if holder is not None:
            # Another request holds the key: this one is a replay of it and counts for nothing.
            return Verdict(
                False, "duplicate", duplicate_of=holder.request_id, duplicate_body=holder.body
            )
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
            if event.idempotency_key:
                entry.key, entry.body = event.idempotency_key, event.body_sha256
                book.keys[event.idempotency_key] = entry
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
