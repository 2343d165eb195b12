"""Kafka's default key partitioner (murmur2), so a stream's partition follows from its id."""

from __future__ import annotations

from aiokafka.partitioner import murmur2


def partition_for(key: str | bytes, partitions: int) -> int:
    """The partition chosen by Kafka's default partitioner (and librdkafka murmur2_random)."""
    raw = key.encode() if isinstance(key, str) else key
    return (int(murmur2(raw)) & 0x7FFFFFFF) % partitions
