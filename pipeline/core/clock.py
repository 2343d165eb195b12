"""The one wall clock of sumstream's records: epoch milliseconds, as every ``trace`` carries."""

from __future__ import annotations

import time


def now_ms() -> int:
    """The current time in epoch milliseconds."""
    return time.time_ns() // 1_000_000
