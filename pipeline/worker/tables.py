"""How the worker declares and writes its changelog-backed tables.

Faust's own ``table[key] = value`` lets the producer pick the changelog partition, which needs
the producer's metadata for the changelog topic: just after a takeover it may have none yet,
and the write fails (a TypeError inside Faust). Our tables are co-partitioned by murmur2 of
the key (docs/architecture.md, "Partitioning"), so the partition is known without asking.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

import faust
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


def add_table(
    app: faust.App,
    name: str,
    *,
    partitions: int,
    help: str,
    max_message_bytes: int | None = None,
) -> OwnedTable:
    """A bytes table keyed like `requests` (murmur2 of the key, ``partitions`` of them).
    ``max_message_bytes``: for tables whose entries hold a whole job or document, so the
    changelog takes what the other topics take (docs/architecture.md, "Record sizes")."""
    extra = {} if max_message_bytes is None else {"max.message.bytes": str(max_message_bytes)}
    table = OwnedTable(
        app,
        name=name,
        partitions=partitions,
        # bytes => the "raw" serializer for keys and values.
        key_type=bytes,
        value_type=bytes,
        use_partitioner=True,
        extra_topic_configs=extra,
        help=help,
    )
    return cast(OwnedTable, app.tables.add(table))


def write(table: Table[bytes, bytes], partitions: int, key: bytes, raw: bytes) -> Awaitable[object]:
    """Set ``key`` and send its changelog record; the result resolves once the broker has it."""
    table.data[key] = raw
    return table.send_changelog(partition_for(key, partitions), key, raw)


def delete(table: Table[bytes, bytes], partitions: int, key: bytes) -> None:
    """Remove ``key`` and send its tombstone."""
    table.data.pop(key, None)
    table.send_changelog(partition_for(key, partitions), key, None, value_serializer="raw")
