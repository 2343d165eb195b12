"""Request ids: ULIDs (sortable, carrying their creation time) with fresh random bits."""

from __future__ import annotations

import secrets

from ulid import ULID

# A ULID is 48 bits of epoch milliseconds and 80 bits of randomness.
RANDOM_BYTES = 10


def random_ulid(ms: int) -> ULID:
    """A ULID at ``ms`` with fresh random bits.

    ``ULID()`` is monotonic: within one millisecond it adds 1 to the previous id's bits, so an
    id would tell the next one (of any user). Request ids must not be guessable.
    """
    return ULID.from_bytes(ms.to_bytes(6, "big") + secrets.token_bytes(RANDOM_BYTES))
