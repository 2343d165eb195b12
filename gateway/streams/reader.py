"""One request's records read back from the log, typed; an unreadable broker is a 503.

The reader is ``pipeline.kafka.tail.read_request_records``; this module names the record type
of each topic the gateway reads and turns a broker that cannot be read into
``BrokerUnavailable`` (retriable, Retry-After: 1), the one failure a client can act on.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any, TypeVar, cast

from aiokafka.errors import KafkaError

from gateway.http.errors import BrokerUnavailable
from pipeline.core.errors import TopicMissingError
from pipeline.core.records import SummarizeRequest, SummaryResult, TokenEvent
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.tail import read_request_records

R = TypeVar("R")


async def _records(
    connection: ConnectionConfig, topic: str, request_id: str, schema: str, **options: Any
) -> AsyncGenerator[dict[str, Any], None]:
    records = cast(
        AsyncGenerator[dict[str, Any], None],
        read_request_records(connection, topic, request_id, schema=schema, **options),
    )
    async with contextlib.aclosing(records):
        try:
            async for record in records:
                yield record
        except (KafkaError, TopicMissingError) as exc:
            raise BrokerUnavailable("could not read the log", retry_after_s=1) from exc


def read_requests(
    connection: ConnectionConfig, topic: str, request_id: str, *, until_ms: int | None = None
) -> AsyncGenerator[SummarizeRequest, None]:
    """The SummarizeRequest records of ``request_id`` written so far (normally one), looking
    no further than records stamped ``until_ms``."""
    records = _records(connection, topic, request_id, "SummarizeRequest", until_ms=until_ms)
    # The codec has checked each record against the SummarizeRequest schema.
    return cast(AsyncGenerator[SummarizeRequest, None], records)


def read_results(
    connection: ConnectionConfig,
    topic: str,
    request_id: str,
    *,
    follow: bool,
    idle_timeout_s: float,
    until_ms: int | None = None,
) -> AsyncGenerator[SummaryResult, None]:
    """The SummaryResult of ``request_id``; with ``follow``, waiting up to ``idle_timeout_s``;
    without, looking no further than records stamped ``until_ms``."""
    records = _records(
        connection,
        topic,
        request_id,
        "SummaryResult",
        follow=follow,
        until_ms=until_ms,
        idle_timeout_s=idle_timeout_s,
        stop_at_terminal=False,
    )
    return cast(AsyncGenerator[SummaryResult, None], records)


def read_token_events(
    connection: ConnectionConfig,
    topic: str,
    request_id: str,
    *,
    follow: bool,
    idle_timeout_s: float,
) -> AsyncGenerator[TokenEvent, None]:
    """The TokenEvents of ``request_id`` in seq order, up to its terminal event when following."""
    records = _records(
        connection,
        topic,
        request_id,
        "TokenEvent",
        follow=follow,
        idle_timeout_s=idle_timeout_s,
    )
    return cast(AsyncGenerator[TokenEvent, None], records)


async def first(records: AsyncGenerator[R, None]) -> R | None:
    """The first record of ``records`` (closing the reader), or None when there is none."""
    async with contextlib.aclosing(records):
        async for record in records:
            return record
    return None
