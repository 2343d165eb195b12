"""Who sent each recent request, and under which Idempotency-Key.

The choice: the map lives in memory and is rebuilt from the ``requests`` topic itself
(field ``idempotency_key``), reading the last ``idempotency_window_s`` (24 h) at start-up
and then following the topic. So a restarted instance still dedupes, and instances see each
other's keys within a fetch round trip. Two POSTs with the same key racing at two instances
within that round trip are told apart by the quota ledger: the RESERVE carries the key, and the
second in log order is refused as a duplicate naming the first (docs/architecture.md,
"Idempotency across gateways"); ``Intake`` then records the holder here.

Each key also keeps the SHA-256 of the body it was first sent with (``body_sha256``, carried in
the record), so the key reused for another body answers 422 instead of the first request.

The same follow gives the owner (user id) of every recent request, so GET and DELETE from
any instance can answer 404 to anybody else without reading the log. The owner is the user of
the id's first record in the partition its key hashes to, as preprocess decides
(docs/architecture.md, "Identity"): a later record reusing the id, or one produced into another
partition, changes nothing here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition

from gateway.http.errors import IdempotencyKeyReused
from pipeline.core.codec import codec
from pipeline.core.errors import CodecError
from pipeline.core.partitioning import partition_for
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.partition_tail import PartitionTail

log = logging.getLogger("sumstream.gateway.idempotency")


def body_sha256(fields: Mapping[str, object]) -> str:
    """The fingerprint of a request body's fields (key order and JSON spacing do not count)."""
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class RequestOwner:
    user_id: str
    tier: str
    created_at: int


class RequestIndex:
    """Bounded maps: request id -> owner, and (user, Idempotency-Key) -> request id."""

    def __init__(
        self,
        *,
        window_s: float = 24 * 3600.0,
        max_entries: int = 100_000,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.window_ms = int(window_s * 1000)
        self.max_entries = max_entries
        self._clock_ms = clock_ms
        self.owners: OrderedDict[str, RequestOwner] = OrderedDict()
        # (user, key) -> (request id, created at, body_sha256 or None when not recorded).
        self.keys: OrderedDict[tuple[str, str], tuple[str, int, str | None]] = OrderedDict()
        self.ready = asyncio.Event()
        self._tail: PartitionTail | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self._partitions = 1

    # -- the maps -----------------------------------------------------------------------------

    def owner(self, request_id: str) -> RequestOwner | None:
        return self.owners.get(request_id)

    def remember(self, request_id: str, user_id: str, tier: str, created_at: int) -> None:
        """Record the owner of ``request_id``, unless it already has one: the first one wins."""
        if request_id in self.owners:
            return
        self.owners[request_id] = RequestOwner(user_id, tier, created_at)
        while len(self.owners) > self.max_entries:
            self.owners.popitem(last=False)

    def lookup(self, user_id: str, key: str, body: str | None = None) -> str | None:
        """The request id already sent under (user, key) within the window, if any.

        IdempotencyKeyReused (422) when it was sent with a body other than ``body`` (a
        body_sha256); a request recorded without one cannot be told apart and matches.
        """
        found = self.keys.get((user_id, key))
        if found is None:
            return None
        request_id, created_at, first_body = found
        if self._clock_ms() - created_at > self.window_ms:
            del self.keys[(user_id, key)]
            return None
        if body is not None and first_body is not None and body != first_body:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used for a request with another body; "
                "use a new key for a new request"
            )
        return request_id

    def reserve(self, user_id: str, key: str, request_id: str, body: str | None = None) -> str:
        """Claim (user, key) for ``request_id``; returns the id that holds it (maybe older)."""
        existing = self.lookup(user_id, key, body)
        if existing is not None:
            return existing
        self._put_key(user_id, key, request_id, self._clock_ms(), body)
        return request_id

    def release(self, user_id: str, key: str, request_id: str) -> None:
        """Undo a reservation whose request was never produced."""
        if self.keys.get((user_id, key), ("", 0))[0] == request_id:
            del self.keys[(user_id, key)]

    def _put_key(
        self, user_id: str, key: str, request_id: str, created_at: int, body: str | None
    ) -> None:
        # The first record under a key wins, as at the instance that accepted it.
        if (user_id, key) in self.keys:
            return
        self.keys[(user_id, key)] = (request_id, created_at, body)
        while len(self.keys) > self.max_entries:
            self.keys.popitem(last=False)

    def observe(self, request: dict[str, Any]) -> None:
        """Take one SummarizeRequest record from the log into the maps (in log order)."""
        known = self.owners.get(request["request_id"])
        if known is not None and known.user_id != request["user_id"]:
            return  # a later record reusing another user's id: preprocess dead-letters it
        created_at = int(request.get("created_at") or 0)
        self.remember(request["request_id"], request["user_id"], request["tier"], created_at)
        key = request.get("idempotency_key")
        if key and self._clock_ms() - created_at <= self.window_ms:
            body = request.get("body_sha256")
            self._put_key(request["user_id"], key, request["request_id"], created_at, body)

    # -- rebuild and follow -------------------------------------------------------------------

    async def start(
        self, connection: ConnectionConfig, requests_topic: str, partitions: int
    ) -> None:
        """Assign every partition of ``requests`` from (now - window) and follow it.

        ``ready`` is set once the records that existed at start-up have been read.
        """
        tail = PartitionTail(
            connection,
            name="gateway-request-index",
            auto_offset_reset="latest",
            max_records=2_000,
        )
        self._partitions = partitions
        tps = [TopicPartition(requests_topic, p) for p in range(partitions)]
        await tail.assign(tps, since_ms=self._clock_ms() - self.window_ms)
        self._tail = tail
        self._ready_task = asyncio.create_task(self._announce_ready(tail))
        tail.run(self._observe_batch)

    async def stop(self) -> None:
        if self._ready_task is not None:
            self._ready_task.cancel()
            self._ready_task = None
        if self._tail is not None:
            await self._tail.stop()
            self._tail = None

    async def _observe_batch(self, tp: TopicPartition, messages: list[Any]) -> None:
        for msg in messages:
            if msg.key is None or partition_for(msg.key, self._partitions) != tp.partition:
                continue  # not where its id belongs: preprocess dead-letters it
            try:
                self.observe(codec().decode_as(msg.value, "SummarizeRequest"))
            except CodecError:
                continue  # preprocess dead-letters it

    async def _announce_ready(self, tail: PartitionTail) -> None:
        await tail.caught_up.wait()
        log.info("request index rebuilt: %d requests, %d keys", len(self.owners), len(self.keys))
        self.ready.set()
