"""The changelog-backed `inflight` table and which of its partitions this worker owns.

The table uses the producer's partitioner (murmur2 of the request id, like `preprocessed`),
with as many partitions as `preprocessed`, so an entry lives in the same partition number as
its job and Faust's co-partitioning hands both to the same worker.
"""

from __future__ import annotations

from collections.abc import Awaitable

import faust

from pipeline.core.partitioning import partition_for
from pipeline.worker.inflight.entries import Entry, is_stale
from pipeline.worker.tables import OnAssigned, add_table, delete, write


class InflightEntries:
    """The table's entries, written only in the partitions this worker owns."""

    def __init__(
        self,
        app: faust.App,
        partitions: int,
        on_assigned: OnAssigned,
        *,
        max_message_bytes: int,
    ) -> None:
        self.partitions = partitions
        self.table = add_table(
            app,
            "inflight",
            partitions=partitions,
            help="request_id -> in-flight inference job (pipeline/worker/inflight/)",
            max_message_bytes=max_message_bytes,
        )
        self.table.on_assigned = on_assigned
        self.owned: set[int] = set()

    def owns(self, key: bytes) -> bool:
        return partition_for(key, self.partitions) in self.owned

    def owned_entries(self) -> list[tuple[bytes, Entry]]:
        """Every entry in the partitions this worker owns."""
        return [(bytes(k), Entry.decode(v)) for k, v in self.table.items() if self.owns(bytes(k))]

    def get(self, key: bytes) -> Entry | None:
        raw = self.table.get(key)
        return Entry.decode(raw) if raw else None

    def put(self, key: bytes, entry: Entry) -> None:
        """Write ``entry`` if this worker owns its partition (else its new owner decides)."""
        if self.owns(key):
            write(self.table, self.partitions, key, entry.encode())

    async def put_acked(self, key: bytes, entry: Entry) -> None:
        """Write ``entry`` and wait until the broker has the changelog record."""
        await self.put_soon(key, entry)

    def put_soon(self, key: bytes, entry: Entry) -> Awaitable[object]:
        """Write ``entry``; the result resolves once the broker has the changelog record."""
        return write(self.table, self.partitions, key, entry.encode())

    def purge(self, horizon_ms: int) -> int:
        """Delete the owned entries that are stale at ``horizon_ms``; how many were."""
        old = [key for key, entry in self.owned_entries() if is_stale(entry, horizon_ms)]
        for key in old:
            delete(self.table, self.partitions, key)
        return len(old)
