"""What the simulator saw: counters since the last reset and bounded per-request records.

``GET /_sim/stats`` serves them; tests read them to assert what reached the upstream.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.llm.simulator.cache import CacheUsage

MAX_ATTEMPTS_PER_RECORD = 100
INPUT_KINDS = ("uncached", "cache_creation", "cache_read")


@dataclass(slots=True)
class StreamRecord:
    """One accepted response; ``ended``: completed | client_closed | fault | error."""

    started_at: int
    streaming: bool
    prefill_chars: int
    ended_at: int | None = None
    ended: str | None = None
    tokens: int = 0
    # What the attempt is billed by: its model and prompt size (``tokens`` is its output).
    model: str = ""
    input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


@dataclass(slots=True)
class RequestRecord:
    """Every attempt seen for one ``x-sumstream-request-id``."""

    attempts: int = 0
    outcomes: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    streams: list[StreamRecord] = field(default_factory=list)
    # Every accepted call's prompt text (system and messages), when record_prompts is on.
    prompts: list[str] = field(default_factory=list)


class Stats:
    """Counters since the last reset; per-request records bounded to the most recent ones.

    An attempt's outcome is ``rejected`` (an HTTP error before any token) or how its response
    ended (see StreamRecord).
    """

    def __init__(self, max_records: int, peak_concurrent: int = 0) -> None:
        self.attempts = 0
        self.by_status: Counter[int] = Counter()
        self.by_outcome: Counter[str] = Counter()
        self.peak_concurrent = peak_concurrent
        self.counts = 0  # POST /v1/messages/count_tokens answered
        # Input tokens of accepted calls by how they were priced (prompt caching, cache.py).
        self.input_tokens: Counter[str] = Counter()
        self.records: OrderedDict[str, RequestRecord] = OrderedDict()
        self._max_records = max_records

    def attempt(self, request_id: str | None) -> RequestRecord:
        self.attempts += 1
        if request_id is None:
            record = RequestRecord()  # counted, but not kept
        elif (found := self.records.get(request_id)) is not None:
            record = found
            self.records.move_to_end(request_id)
        else:
            record = self.records[request_id] = RequestRecord()
            if len(self.records) > self._max_records:
                self.records.popitem(last=False)
        record.attempts += 1
        return record

    def status(self, record: RequestRecord, status: int) -> None:
        self.by_status[status] += 1
        append_bounded(record.statuses, status)

    def cached(self, usage: CacheUsage) -> None:
        self.input_tokens["uncached"] += usage.input_tokens
        self.input_tokens["cache_creation"] += usage.cache_creation_input_tokens
        self.input_tokens["cache_read"] += usage.cache_read_input_tokens

    def prompt(self, record: RequestRecord, text: str) -> None:
        append_bounded(record.prompts, text)

    def finish(self, record: RequestRecord, outcome: str) -> None:
        self.by_outcome[outcome] += 1
        append_bounded(record.outcomes, outcome)

    def as_json(self, open_streams: int, request_ids: list[str] | None) -> dict[str, Any]:
        """Totals, and the records of ``request_ids`` (all of them when None)."""
        ids = list(self.records) if request_ids is None else request_ids
        return {
            "attempts": self.attempts,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_outcome": dict(sorted(self.by_outcome.items())),
            "open_streams": open_streams,
            "peak_concurrent": self.peak_concurrent,
            "count_tokens_calls": self.counts,
            "input_tokens": {k: self.input_tokens[k] for k in INPUT_KINDS},
            "requests": {i: _record_json(self.records[i]) for i in ids if i in self.records},
        }


def _record_json(record: RequestRecord) -> dict[str, Any]:
    # Hand-written rather than dataclasses.asdict: a full dump has 10,000 records.
    streams = [
        {
            "started_at": s.started_at,
            "ended_at": s.ended_at,
            "ended": s.ended,
            "tokens": s.tokens,
            "streaming": s.streaming,
            "prefill_chars": s.prefill_chars,
            "model": s.model,
            "input_tokens": s.input_tokens,
            "cache_read_input_tokens": s.cache_read_input_tokens,
            "cache_creation_input_tokens": s.cache_creation_input_tokens,
        }
        for s in record.streams
    ]
    found: dict[str, Any] = {
        "attempts": record.attempts,
        "outcomes": list(record.outcomes),
        "statuses": list(record.statuses),
        "streams": streams,
    }
    if record.prompts:
        found["prompts"] = list(record.prompts)
    return found


def append_bounded(items: list[Any], item: Any) -> None:
    items.append(item)
    if len(items) > MAX_ATTEMPTS_PER_RECORD:
        del items[0]
