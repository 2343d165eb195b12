"""Who sent a request and what its result is: from memory first, else from the log."""

from __future__ import annotations

from typing import Any, cast

from gateway.admission.idempotency import RequestIndex, RequestOwner
from gateway.settings import GatewaySettings
from gateway.streams.hub import StreamHub
from gateway.streams.reader import first, read_requests, read_results
from pipeline.core.clock import now_ms
from pipeline.core.records import SummaryResult
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.tail import CLOCK_SKEW_MS, id_time_ms


class RequestLookup:
    """Answers ``owner_of`` and ``result_of`` for any request id, accepted here or elsewhere."""

    def __init__(
        self,
        settings: GatewaySettings,
        connection: ConnectionConfig,
        topics: TopicNames,
        index: RequestIndex,
        hub: StreamHub,
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.topics = topics
        self.index = index
        self.hub = hub

    async def owner_of(self, request_id: str) -> RequestOwner | None:
        """Who sent ``request_id``: from memory, else from the log (requests, then results)."""
        owner = self.index.owner(request_id)
        born = id_time_ms(request_id)
        if owner is not None or born is None:
            # Ids that are not ULIDs cannot be positioned in the log; the index has every
            # request of the last window, so those older than it are not found.
            return owner
        if not self._could_exist(born):
            return None
        # The id's first record in its partition owns it, as in preprocess (a later one reusing
        # the id is dead-lettered there and ignored by the index).
        window_ms = int(self.settings.lookup_request_window_s * 1000)
        request = await first(
            read_requests(
                self.connection, self.topics.requests, request_id, until_ms=born + window_ms
            )
        )
        if request is not None:
            # The index keeps the plain records it reads from `requests` itself.
            self.index.observe(cast(dict[str, Any], request))
            return self.index.owner(request_id)
        result = await self.result_of(request_id)
        if result is not None:
            self.index.remember(
                request_id, result["user_id"], result["tier"], int(result["created_at"])
            )
            return self.index.owner(request_id)
        return None

    async def result_of(self, request_id: str, *, follow: bool = False) -> SummaryResult | None:
        """The SummaryResult of ``request_id``, or None when it has none (yet)."""
        stream = self.hub.get(request_id)
        if stream is not None and (stream.result is not None or not follow):
            # Registered here before it was produced: the hub has seen every result of its
            # partition since, so no result in memory means none in the log either.
            return cast(SummaryResult | None, stream.result)
        born = id_time_ms(request_id)
        if not follow and born is not None and not self._could_exist(born):
            return None
        window_ms = int(self.settings.lookup_result_window_s * 1000)
        reader = read_results(
            self.connection,
            self.topics.results,
            request_id,
            follow=follow,
            idle_timeout_s=self.settings.result_timeout_s,
            until_ms=None if born is None else born + window_ms,
        )
        return await first(reader)

    def _could_exist(self, born_ms: int) -> bool:
        """Whether an id minted at ``born_ms`` can have records in the log: not older than
        the results' retention, not from the future (beyond clock skew)."""
        now = now_ms()
        max_age_ms = int(self.settings.lookup_max_age_s * 1000)
        return now - max_age_ms <= born_ms <= now + CLOCK_SKEW_MS
