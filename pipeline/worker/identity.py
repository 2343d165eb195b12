"""Who a request belongs to and who wrote it: preprocess's checks before a request may run.

In order (docs/architecture.md, "Identity"): the record must sit in its key's partition; the
first record of an id wins, a later one is dead-lettered without touching the original; the
record must be signed by a known producer (pipeline/core/producers.py) that may act for its
user; the tier is the user's from the keys table, never the record's; ``replay_of`` counts only
from a producer allowed to replay. A refusal is an ``IdentityError``: always a dead letter,
and for a new id also the terminal ERROR that ends its stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.core.clock import now_ms
from pipeline.core.errors import ValidationError
from pipeline.core.partitioning import partition_for
from pipeline.core.producers import Headers, ProducerIdentity, ProducerTable
from pipeline.core.records import SummarizeRequest
from pipeline.worker.dlq import Origin
from pipeline.worker.request_ids import FirstRecord, RequestIds


class IdentityError(ValidationError):
    """A record preprocess will not run for identity reasons. ``ends_stream``: the id is this
    record's own, so its stream ends with the error; otherwise the id belongs to another."""

    code = "identity"
    ends_stream = True


class MisplacedRecordError(IdentityError):
    """The record is not in the partition its key (the request id) hashes to."""

    code = "misplaced_record"
    ends_stream = False


class DuplicateRequestError(IdentityError):
    """An earlier record already has this request id: the first one owns it."""

    code = "duplicate_request_id"
    ends_stream = False


class UnauthenticatedProducerError(IdentityError):
    """No valid producer signature on the record."""

    code = "unauthenticated_producer"


class UserNotAllowedError(IdentityError):
    """The producer may not act for the record's user."""

    code = "user_not_allowed"


class UnknownUserError(IdentityError):
    """Neither the keys table nor the producer gives the user a tier."""

    code = "unknown_user"


@dataclass(frozen=True, slots=True)
class Vouched:
    """A request that passed: with the server's tier, and the producer that wrote it."""

    request: SummarizeRequest
    producer: ProducerIdentity


class RequestIdentity:
    """The checks, with the producers, the user -> tier table and the ids seen so far."""

    def __init__(
        self,
        producers: ProducerTable,
        user_tiers: Mapping[str, str],
        ids: RequestIds,
        partitions: int,
    ) -> None:
        self.producers = producers
        self.user_tiers = user_tiers
        self.ids = ids
        self.partitions = partitions

    async def check(
        self,
        request: SummarizeRequest,
        value: bytes,
        origin: Origin,
        headers: Headers | None,
    ) -> Vouched:
        """The request as it may run, or raise the ``IdentityError`` that refuses it."""
        key = request["request_id"].encode()
        if origin.partition != partition_for(key, self.partitions):
            raise MisplacedRecordError(
                f"partition {origin.partition}, but the id belongs in "
                f"{partition_for(key, self.partitions)}"
            )
        first = self.ids.first(key)
        if first is not None and not first.is_record(origin.partition, origin.offset):
            raise DuplicateRequestError(
                f"the id's first record is at offset {first.offset}; this one is ignored"
            )
        if first is None:
            # Claimed before the other checks: an id is its first record's, even a refused one.
            self.ids.remember(
                key, FirstRecord(request["user_id"], origin.partition, origin.offset, now_ms())
            )
        producer = self.producers.verify(headers, value)
        if producer is None:
            raise UnauthenticatedProducerError("no valid sumstream-producer signature")
        return Vouched(self._as_server_sees_it(request, producer), producer)

    def _as_server_sees_it(
        self, request: SummarizeRequest, producer: ProducerIdentity
    ) -> SummarizeRequest:
        user_id = request["user_id"]
        if not producer.may_act_for(user_id):
            raise UserNotAllowedError(f"producer {producer.name!r} may not act for this user")
        tier = self.user_tiers.get(user_id) or producer.tier
        if tier is None:
            raise UnknownUserError("the user has no tier in the keys table")
        trusted: SummarizeRequest = {**request, "tier": tier}
        if not producer.replay and (request.get("replay_of") or request.get("source") == "replay"):
            # Only the replay tool's reruns go unbilled; anyone else's runs as the user's own.
            trusted["replay_of"] = None
            trusted["source"] = "external"
        return trusted
