"""preprocess's identity checks (pipeline/worker/identity.py) on a stand-in for the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.core.partitioning import partition_for
from pipeline.core.producers import ProducerTable
from pipeline.core.records import SummarizeRequest
from pipeline.worker.dlq import Origin
from pipeline.worker.identity import (
    DuplicateRequestError,
    MisplacedRecordError,
    RequestIdentity,
    UnauthenticatedProducerError,
    UnknownUserError,
    UserNotAllowedError,
)
from pipeline.worker.request_ids import FirstRecord

PARTITIONS = 6
RID = "01J0000000000000000000000A"
PART = partition_for(RID.encode(), PARTITIONS)
FILE = """
[[producers]]
name = "crm"
secret = "crm-secret-0123456789"
users = ["ann", "nokey"]

[[producers]]
name = "batch"
secret = "batch-secret-0123456789"
users = ["*"]
tier = "pro"

[[producers]]
name = "replay"
secret = "replay-secret-0123456789"
users = ["*"]
replay = true
"""


class Ids:
    """The `request-ids` table's interface, in memory."""

    def __init__(self) -> None:
        self.data: dict[bytes, FirstRecord] = {}

    def first(self, key: bytes) -> FirstRecord | None:
        return self.data.get(key)

    def remember(self, key: bytes, first: FirstRecord) -> None:
        self.data[key] = first


@pytest.fixture
def producers(tmp_path: Path) -> ProducerTable:
    path = tmp_path / "producers.toml"
    path.write_text(FILE)
    return ProducerTable.load(path)


@pytest.fixture
def ids() -> Ids:
    return Ids()


@pytest.fixture
def identity(producers: ProducerTable, ids: Ids) -> RequestIdentity:
    return RequestIdentity(producers, {"ann": "enterprise", "ben": "free"}, ids, PARTITIONS)  # type: ignore[arg-type]


def request(**fields: Any) -> SummarizeRequest:
    record: dict[str, Any] = {
        "request_id": RID,
        "user_id": "ann",
        "tier": "pro",
        "document": "text",
        "source": "external",
        "replay_of": None,
        **fields,
    }
    return record  # type: ignore[return-value]


def at(offset: int, partition: int = PART) -> Origin:
    return Origin("t.requests", partition, offset)


async def check(
    identity: RequestIdentity,
    producers: ProducerTable,
    producer: str,
    rec: SummarizeRequest,
    offset: int = 5,
) -> SummarizeRequest:
    value = repr(sorted(rec.items())).encode()
    origin = at(offset, partition_for(rec["request_id"].encode(), PARTITIONS))
    vouched = await identity.check(rec, value, origin, producers.get(producer).headers(value))
    return vouched.request


async def test_the_tier_is_the_users_from_the_keys_table(
    identity: RequestIdentity, producers: ProducerTable
) -> None:
    trusted = await check(identity, producers, "crm", request(tier="free"))
    assert trusted["tier"] == "enterprise"


async def test_a_user_without_a_key_gets_the_producers_tier_or_is_refused(
    identity: RequestIdentity, producers: ProducerTable
) -> None:
    trusted = await check(
        identity, producers, "batch", request(user_id="walk-in", tier="enterprise")
    )
    assert trusted["tier"] == "pro"
    with pytest.raises(UnknownUserError):
        await check(
            identity,
            producers,
            "crm",
            request(request_id="01J0000000000000000000000B", user_id="nokey"),
        )


async def test_a_producer_acts_only_for_its_users(
    identity: RequestIdentity, producers: ProducerTable
) -> None:
    with pytest.raises(UserNotAllowedError) as caught:
        await check(identity, producers, "crm", request(user_id="ben"))
    assert caught.value.ends_stream


async def test_replay_of_counts_only_from_a_replay_producer(
    identity: RequestIdentity, producers: ProducerTable
) -> None:
    claimed = {"source": "replay", "replay_of": "01J0000000000000000000000Z"}
    billed = await check(identity, producers, "batch", request(**claimed))
    assert (billed["source"], billed["replay_of"]) == ("external", None)
    rid = "01J0000000000000000000000C"
    value = b"replay"
    vouched = await identity.check(
        request(request_id=rid, **claimed),
        value,
        at(6, partition_for(rid.encode(), PARTITIONS)),
        producers.get("replay").headers(value),
    )
    assert (vouched.request["source"], vouched.request["replay_of"]) == (
        "replay",
        "01J0000000000000000000000Z",
    )


async def test_the_first_record_of_an_id_owns_it_and_a_redelivery_is_not_a_duplicate(
    identity: RequestIdentity, producers: ProducerTable, ids: Ids
) -> None:
    await check(identity, producers, "crm", request(), offset=5)
    assert ids.data[RID.encode()].user_id == "ann"
    # The same record again (a restart before the commit) passes.
    await check(identity, producers, "crm", request(), offset=5)
    with pytest.raises(DuplicateRequestError) as caught:
        await check(identity, producers, "batch", request(user_id="ben"), offset=9)
    assert not caught.value.ends_stream
    assert ids.data[RID.encode()].user_id == "ann"


async def test_an_unsigned_record_claims_its_id_and_is_refused(
    identity: RequestIdentity, producers: ProducerTable, ids: Ids
) -> None:
    with pytest.raises(UnauthenticatedProducerError) as caught:
        await identity.check(request(user_id="ben"), b"v", at(3), None)
    assert caught.value.ends_stream and caught.value.code == "unauthenticated_producer"
    with pytest.raises(DuplicateRequestError):
        await check(identity, producers, "crm", request(), offset=4)


async def test_a_record_outside_its_ids_partition_is_refused_and_claims_nothing(
    identity: RequestIdentity, ids: Ids
) -> None:
    with pytest.raises(MisplacedRecordError) as caught:
        await identity.check(request(), b"v", at(1, (PART + 1) % PARTITIONS), None)
    assert not caught.value.ends_stream
    assert ids.data == {}
