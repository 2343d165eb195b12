from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ulid import ULID

from gateway.streams.ids import mint_request_id, owned_partitions
from pipeline.core.partitioning import partition_for


@given(st.integers(1, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(n, 48))))
def test_instances_own_disjoint_shares_that_cover_every_partition(case: tuple[int, int]) -> None:
    count, partitions = case
    shares = [owned_partitions(i, count, partitions) for i in range(count)]
    assert set().union(*shares) == set(range(partitions))
    assert sum(len(s) for s in shares) == partitions
    for i, share in enumerate(shares):
        assert all(p % count == i for p in share)


@settings(max_examples=50)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))))
def test_minted_ids_hash_into_an_owned_partition(case: tuple[int, int]) -> None:
    index, count = case
    owned = owned_partitions(index, count, 12)
    for _ in range(20):
        request_id = mint_request_id(owned, 12)
        ULID.from_str(request_id)  # a valid ULID, so its time positions the log readers
        assert partition_for(request_id, 12) in owned


def test_an_instance_without_partitions_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="owns none"):
        owned_partitions(5, 6, 4)
    with pytest.raises(ValueError):
        owned_partitions(2, 2, 4)


def test_ids_minted_in_one_millisecond_share_no_predictable_suffix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One frozen millisecond: a monotonic generator would hand out consecutive randomness.
    monkeypatch.setattr("gateway.streams.ids.now_ms", lambda: 1_767_225_600_000)
    owned = owned_partitions(0, 1, 12)
    ids = [ULID.from_str(mint_request_id(owned, 12)) for _ in range(200)]
    assert {u.milliseconds for u in ids} == {1_767_225_600_000}
    bits = sorted(int.from_bytes(u.bytes[6:], "big") for u in ids)
    # 80 random bits: two within 2**40 of each other happen with odds of about 2**-25.
    assert min(b - a for a, b in itertools.pairwise(bits)) > 2**40
