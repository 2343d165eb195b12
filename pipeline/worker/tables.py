"""Writes to the worker's changelog-backed tables, and the recovery hook they share.

Faust's own ``table[key] = value`` lets the producer pick the changelog partition, which needs
the producer's metadata for the changelog topic: just after a takeover it may have none yet,
and the write fails (a TypeError inside Faust). Our tables are co-partitioned by murmur2 of
the key (docs/architecture.md, "Partitioning"), so the partition is known without asking.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from faust.tables.table import Table
from faust.types import TP

from pipeline.core.partitioning import partition_for

OnAssigned = Callable[[set[int]], None]


class OwnedTable(Table[bytes, bytes]):
    """A bytes table that tells its owner which partitions it holds once they are recovered."""

    on_assigned: OnAssigned | None = None

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        await super().on_recovery_completed(active_tps, standby_tps)
        if self.on_assigned is not None:
            self.on_assigned({tp.partition for tp in active_tps})


def write(table: Table[bytes, bytes], partitions: int, key: bytes, raw: bytes) -> Awaitable[object]:
    """Set ``key`` and send its changelog record; the result resolves once the broker has it."""
    table.data[key] = raw
    return table.send_changelog(partition_for(key, partitions), key, raw)


def delete(table: Table[bytes, bytes], partitions: int, key: bytes) -> None:
    """Remove ``key`` and send its tombstone."""
    table.data.pop(key, None)
    table.send_changelog(partition_for(key, partitions), key, None, value_serializer="raw")
