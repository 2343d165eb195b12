"""Request ids: ULIDs minted so that they hash into a partition this instance owns."""

from __future__ import annotations

from pipeline.core.clock import now_ms
from pipeline.core.ids import random_ulid
from pipeline.core.partitioning import partition_for

# With N instances a random id lands in an owned partition with probability >= 1/N,
# so this bound is never reached in practice; it only turns a bug into an error.
MAX_ATTEMPTS = 10_000


def owned_partitions(index: int, count: int, partitions: int) -> frozenset[int]:
    """The token/result partitions instance ``index`` of ``count`` owns (p % count == index)."""
    if not 0 <= index < count:
        raise ValueError(f"instance index {index} is not in [0, {count})")
    owned = frozenset(p for p in range(partitions) if p % count == index)
    if not owned:
        raise ValueError(
            f"instance {index} of {count} owns none of {partitions} partitions: "
            "run at most as many gateway instances as stream partitions"
        )
    return owned


def mint_request_id(owned: frozenset[int], partitions: int) -> str:
    """A new ULID whose murmur2 partition (of ``partitions``) is in ``owned``."""
    for _ in range(MAX_ATTEMPTS):
        candidate = str(random_ulid(now_ms()))
        if partition_for(candidate, partitions) in owned:
            return candidate
    raise RuntimeError(f"no id hashed into partitions {sorted(owned)} of {partitions}")


def mint_follow_up_id(
    owned: frozenset[int], partitions: int, session_id: str, requests_partitions: int
) -> str:
    """A new ULID on the session's partition of `requests` (so the worker holding the session
    reads the follow-up), in ``owned`` of the stream ``partitions`` when that is possible.

    Both can be impossible together (with 6 and 6 partitions, a session minted by another
    gateway instance): the follow-up's stream is then served from the log, like any stream
    another instance owns.
    """
    target = partition_for(session_id, requests_partitions)
    for attempt in range(MAX_ATTEMPTS):
        candidate = str(random_ulid(now_ms()))
        if partition_for(candidate, requests_partitions) != target:
            continue
        if attempt >= MAX_ATTEMPTS // 10 or partition_for(candidate, partitions) in owned:
            return candidate
    raise RuntimeError(f"no id hashed into partition {target} of {requests_partitions}")
