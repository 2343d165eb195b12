"""Preprocess applies the user's preferences to a prepared job.

The preferences are looked up by the job's user, which identity checks made the server's
(docs/architecture.md, "Identity"); the gateway's header only says how fresh they must be.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from pipeline.core.producers import Headers
from pipeline.core.records import InferenceJob
from pipeline.memory import preferences as prefs
from pipeline.memory.store import PreferencesTable

log = logging.getLogger("sumstream.preprocess")

# How long preprocess waits for a PUT the gateway acknowledged before the request to reach it.
FRESHNESS_WAIT_S = 2.0


def version_hint(headers: Headers | None) -> int:
    """The preferences version the gateway knew the user had (0: none, or not a gateway)."""
    if not headers:
        return 0
    pairs: Iterable[tuple[str, bytes | None]] = (
        headers.items() if isinstance(headers, Mapping) else headers
    )
    for key, value in pairs:
        if key == prefs.PREFERENCES_VERSION_HEADER and value:
            try:
                return max(0, int(value))
            except ValueError:
                return 0
    return 0


async def with_preferences(
    job: InferenceJob, table: PreferencesTable, headers: Headers | None
) -> InferenceJob:
    """``job`` with its user's preferences applied (waiting briefly for a fresher version)."""
    user = job["user_id"]
    wanted = version_hint(headers)
    if wanted and not await table.wait_for(user, wanted, FRESHNESS_WAIT_S):
        log.warning(
            "preferences older than the gateway's, using them",
            extra={"request_id": job["request_id"], "version": table.version(user)},
        )
    return prefs.apply(job, table.get(user))
