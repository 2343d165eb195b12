"""The `request-ids` table: the first record preprocess saw for each request id.

A record that reuses a known id is not the request's: it is dead-lettered and touches nothing
of the original (docs/architecture.md, "Identity"). The table is changelog-backed, so the
memory survives restarts and rebalances, and co-partitioned with `requests` (same partition
count, the producer's murmur2 partitioner, like the `inflight` table), so the worker that
reads a partition of `requests` owns the same partition of the table. Entries live as long as
`requests` keeps its records.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import faust

from pipeline.core.partitioning import partition_for
from pipeline.worker.tables import add_table, delete, write


@dataclass(frozen=True, slots=True)
class FirstRecord:
    """Where an id's first record is in `requests`, whom it named, and when it was seen."""

    user_id: str
    partition: int
    offset: int
    at_ms: int

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> FirstRecord:
        return cls(**json.loads(raw))

    def is_record(self, partition: int, offset: int) -> bool:
        """Is (partition, offset) this very record (delivered again after a restart)?"""
        return (self.partition, self.offset) == (partition, offset)


class RequestIds:
    """request id -> its first record, for the partitions of `requests` this worker reads."""

    def __init__(self, app: faust.App, partitions: int) -> None:
        self.partitions = partitions
        self.owned: set[int] = set()
        self.table = add_table(
            app,
            "request-ids",
            partitions=partitions,
            help="request_id -> its first record (pipeline/worker/request_ids.py)",
        )
        self.table.on_assigned = self._assigned

    def _assigned(self, partitions: set[int]) -> None:
        self.owned = partitions

    def first(self, request_id: bytes) -> FirstRecord | None:
        raw = self.table.get(request_id)
        return FirstRecord.decode(raw) if raw else None

    def remember(self, request_id: bytes, first: FirstRecord) -> None:
        """Store ``first`` and send its changelog record.

        Not awaited, since a broker round trip per record serialised the agent: Faust flushes
        the producer before it commits an offset, so once the claiming record's offset is
        committed its changelog record is durable; before that, a restart processes the
        claiming record again, in partition order, ahead of any later record with the id.
        Either way a restart cannot forget an id whose record was already acted on.
        """
        write(self.table, self.partitions, request_id, first.encode())

    def purge(self, horizon_ms: int) -> int:
        """Forget the owned ids first seen before ``horizon_ms``; how many there were."""
        old = [
            bytes(key)
            for key, raw in self.table.items()
            if partition_for(bytes(key), self.partitions) in self.owned
            and FirstRecord.decode(raw).at_ms < horizon_ms
        ]
        for key in old:
            delete(self.table, self.partitions, key)
        return len(old)
