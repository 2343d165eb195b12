"""The changelog-backed `inflight` table and which of its partitions this worker owns.

The table uses the producer's partitioner (murmur2 of the request id, like `preprocessed`),
with as many partitions as `preprocessed`, so an entry lives in the same partition number as
its job and Faust's co-partitioning hands both to the same worker.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import cast

import faust

from pipeline.core.partitioning import partition_for
from pipeline.worker.inflight.entries import Entry, is_stale
from pipeline.worker.tables import OnAssigned, OwnedTable, delete, write


class InflightTable(OwnedTable):
    """The `inflight` table; tells its owner when its partitions are recovered."""


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
        self.table = cast(
            InflightTable,
            app.tables.add(
                InflightTable(
                    app,
                    name="inflight",
                    partitions=partitions,
                    # bytes => the "raw" serializer for keys and values.
                    key_type=bytes,
                    value_type=bytes,
                    use_partitioner=True,
                    # An entry holds a whole job: the changelog takes what the other topics
                    # take (docs/architecture.md, "Record sizes").
                    extra_topic_configs={"max.message.bytes": str(max_message_bytes)},
                    help="request_id -> in-flight inference job (pipeline/worker/inflight/)",
                ),
            ),
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
