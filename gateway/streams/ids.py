"""Request ids: ULIDs minted so that they hash into a partition this instance owns."""

from __future__ import annotations

import secrets

from ulid import ULID

from pipeline.core.clock import now_ms
from pipeline.core.partitioning import partition_for

# With N instances a random id lands in an owned partition with probability >= 1/N,
# so this bound is never reached in practice; it only turns a bug into an error.
MAX_ATTEMPTS = 10_000
# A ULID is 48 bits of epoch milliseconds and 80 bits of randomness.
RANDOM_BYTES = 10


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


def random_ulid(ms: int) -> ULID:
    """A ULID at ``ms`` with fresh random bits.

    ``ULID()`` is monotonic: within one millisecond it adds 1 to the previous id's bits, so an
    id would tell the next one (of any user). Request ids must not be guessable.
    """
    return ULID.from_bytes(ms.to_bytes(6, "big") + secrets.token_bytes(RANDOM_BYTES))


def mint_request_id(owned: frozenset[int], partitions: int) -> str:
    """A new ULID whose murmur2 partition (of ``partitions``) is in ``owned``."""
    for _ in range(MAX_ATTEMPTS):
        candidate = str(random_ulid(now_ms()))
        if partition_for(candidate, partitions) in owned:
            return candidate
    raise RuntimeError(f"no id hashed into partitions {sorted(owned)} of {partitions}")
