"""Table writes name their changelog partition themselves (no producer metadata needed)."""

from __future__ import annotations

from typing import Any, cast

from faust.tables.table import Table

from pipeline.core.partitioning import partition_for
from pipeline.worker.tables import delete, write


class RecordingTable:
    """The two parts of a Faust table the writes use: its store and its changelog send."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.sent: list[tuple[int | None, bytes, bytes | None, dict[str, Any]]] = []

    def send_changelog(
        self, partition: int | None, key: bytes, value: bytes | None, **kw: Any
    ) -> str:
        self.sent.append((partition, key, value, kw))
        return "future"


def test_a_write_and_a_delete_send_to_the_keys_murmur2_partition_not_the_producers_choice() -> None:
    fake = RecordingTable()
    table = cast(Table[bytes, bytes], fake)
    keys = [f"01J{i:023d}".encode() for i in range(50)]
    for key in keys:
        assert write(table, 12, key, b"v") == "future"
    assert all(partition is not None for partition, _, _, _ in fake.sent)
    assert [p for p, _, _, _ in fake.sent] == [partition_for(k, 12) for k in keys]
    assert len({p for p, _, _, _ in fake.sent}) > 1  # spread, not a constant
    assert fake.data == dict.fromkeys(keys, b"v")
    delete(table, 12, keys[0])
    assert keys[0] not in fake.data
    assert fake.sent[-1] == (partition_for(keys[0], 12), keys[0], None, {"value_serializer": "raw"})
