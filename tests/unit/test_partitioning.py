from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.partitioning import partition_for

# (key, Java Utils.murmur2, partition of 6, partition of 7), computed with the kafka-clients
# 4.1.1 jar: Utils.toPositive(Utils.murmur2(key)) % n is the Java producer's choice for a key.
JAVA = [
    (b"", 275646681, 3, 2),
    (b"a", -1563381124, 4, 5),
    (b"ab", 316155434, 2, 0),
    (b"abc", 479470107, 3, 4),
    (b"21", -973932308, 0, 3),
    (b"foobar", -790332482, 0, 0),
    (b"a-little-bit-long-string", -985981536, 2, 1),
    (b"a-little-bit-longer-string", -1486304829, 5, 0),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971, 5, 3),
    (b"01JDZQ6V4T8M3K9X2YH7N5PQRS", -37508877, 5, 2),
    ("req-été-✓".encode(), -1691612291, 3, 4),
    (b"user-42", 1459644460, 4, 1),
    (b"\x00\xff\x80\x7f\x01", -1777108196, 0, 6),
]


@pytest.mark.parametrize(("key", "hashed", "of6", "of7"), JAVA)
def test_matches_the_java_client(key: bytes, hashed: int, of6: int, of7: int) -> None:
    assert partition_for(key, 6) == of6
    assert partition_for(key, 7) == of7
    assert partition_for(key, 1) == 0
    assert (hashed & 0x7FFFFFFF) % 6 == of6


def test_str_keys_are_their_utf8_bytes() -> None:
    assert partition_for("req-été-✓", 6) == partition_for("req-été-✓".encode(), 6) == 3


@settings(max_examples=500, deadline=None)
@given(key=st.binary(max_size=64), partitions=st.integers(1, 1000))
def test_matches_aiokafka_default_partitioner(key: bytes, partitions: int) -> None:
    all_partitions = list(range(partitions))
    expected = DefaultPartitioner()(key, all_partitions, all_partitions)
    assert partition_for(key, partitions) == expected
    assert 0 <= partition_for(key, partitions) < partitions


@settings(max_examples=200, deadline=None)
@given(key=st.text(max_size=40), partitions=st.integers(1, 64))
def test_is_stable_for_text_ids(key: str, partitions: int) -> None:
    assert partition_for(key, partitions) == partition_for(key.encode(), partitions)
