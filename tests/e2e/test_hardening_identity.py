"""Who owns a request and who may write one, on real processes (docs/architecture.md, "Identity").

Before these checks a record produced straight onto `requests` was trusted for everything: one
reusing user A's request id with user B made B the owner (B's GET returned A's summary, A got
404); any unsigned record ran; its `tier` and `replay_of` were taken as written.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ulid import ULID

from pipeline.core.codec import codec
from pipeline.core.partitioning import partition_for
from pipeline.llm.extractive import summarize
from tests.e2e.documents import document
from tests.harness import (
    BOOTSTRAP,
    Record,
    Stack,
    auth,
    collect,
    eventually,
    produce_raw,
    read_topic,
    running_stack,
    signed,
)

pytestmark = pytest.mark.e2e

MAX_TOKENS = 40
DEFAULT_PRODUCERS = Path(__file__).resolve().parents[2] / "config" / "producers.toml"
# A producer that may act for ann only, and has no tier for users without keys.
PARTNER_SECRET = "partner-secret-0123456789abcdef"
PARTNER = f"""
[[producers]]
name = "partner"
secret = "{PARTNER_SECRET}"
users = ["ann"]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("hardening-identity")
    producers = tmp / "producers.toml"
    producers.write_text(DEFAULT_PRODUCERS.read_text() + PARTNER)
    env = {"SUMSTREAM_PRODUCERS_FILE": str(producers)}
    with running_stack(tmp, env=env) as s:
        yield s


def request_value(request_id: str, user: str, doc: str, **fields: Any) -> bytes:
    now = int(time.time() * 1000)
    record = {
        "request_id": request_id,
        "user_id": user,
        "tier": "pro",
        "document": doc,
        "max_output_tokens": MAX_TOKENS,
        "source": "external",
        "created_at": now,
        "trace": {"received": now, "enqueued": now},
        **fields,
    }
    return codec().encode("SummarizeRequest", record)


def produce(stack: Stack, request_id: str, value: bytes, headers: Any = None) -> None:
    produce_raw(BOOTSTRAP, stack.topics.requests, request_id.encode(), value, headers=headers)


def records_of(stack: Stack, topic: str, request_id: str, schema: str, count: int = 1) -> list[Any]:
    """The decoded records keyed ``request_id`` in ``topic``, once there are ``count``."""
    key = request_id.encode()

    def enough(records: list[Record]) -> bool:
        return sum(r.key == key for r in records) >= count

    found = read_topic(BOOTSTRAP, topic, enough, timeout=90)
    return [codec().decode_as(r.value, schema) for r in found if r.key == key]


def dead_letters(stack: Stack, request_id: str) -> list[str]:
    """The error types of the dead letters of ``request_id`` (waiting for one)."""
    return [d["error_type"] for d in records_of(stack, stack.topics.dlq, request_id, "DeadLetter")]


def result_of(stack: Stack, request_id: str) -> dict[str, Any]:
    [result] = records_of(stack, stack.topics.results, request_id, "SummaryResult")
    return dict(result)


async def test_a_record_reusing_a_request_id_is_dead_lettered_and_the_owner_keeps_it(
    stack: Stack,
) -> None:
    doc = document(7)
    stack.sim_config(token_delay_ms=30)
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            first = await collect(
                client,
                "POST",
                f"{stack.gateway}/v1/summaries",
                json={"document": doc, "max_output_tokens": MAX_TOKENS},
                headers=auth("key-ann"),
                stop_after_tokens=3,
            )
            request_id = first.request_id
            # Mid-stream, a validly signed record names ann's id with ben as its user.
            forged = request_value(request_id, "ben", document(8))
            produce(stack, request_id, forged, signed(forged))
            assert dead_letters(stack, request_id) == ["duplicate_request_id"]
            rest = await collect(
                client,
                "GET",
                f"{stack.gateway}/v1/summaries/{request_id}/events",
                headers={**auth("key-ann"), "Last-Event-ID": str(first.seqs[-1])},
            )
            url = f"{stack.gateway}/v1/summaries/{request_id}"
            assert (await client.get(url, headers=auth("key-ben"))).status_code == 404
            events = await client.get(f"{url}/events", headers=auth("key-ben"))
            assert events.status_code == 404
            mine = await client.get(url, headers=auth("key-ann"))
    finally:
        stack.sim_config(token_delay_ms=2)
    expected = summarize(doc, MAX_TOKENS).strip()
    assert rest.done["status"] == "COMPLETED", rest.events
    assert (first.text + rest.text).strip() == expected
    assert mine.status_code == 200
    assert mine.json()["summary"] == expected
    # One job and one result: the duplicate never ran.
    assert len(records_of(stack, stack.topics.preprocessed, request_id, "InferenceJob")) == 1
    assert result_of(stack, request_id)["user_id"] == "ann"


def test_a_record_outside_its_ids_partition_is_dead_lettered_and_owns_nothing(
    stack: Stack,
) -> None:
    request_id = str(ULID())
    value = request_value(request_id, "ann", document(16))
    produce(stack, request_id, value, signed(value))
    assert result_of(stack, request_id)["status"] == "COMPLETED"
    # Validly signed, naming ben, in a partition the id does not hash to: it would come
    # before or after ann's record depending on who reads which partition first.
    forged = request_value(request_id, "ben", document(17))
    home = partition_for(request_id.encode(), stack.settings.work_partitions)
    elsewhere = (home + 1) % stack.settings.work_partitions
    produce_raw(
        BOOTSTRAP,
        stack.topics.requests,
        request_id.encode(),
        forged,
        headers=signed(forged),
        partition=elsewhere,
    )
    assert dead_letters(stack, request_id) == ["misplaced_record"]
    url = f"{stack.gateway}/v1/summaries/{request_id}"
    assert httpx.get(url, headers=auth("key-ben"), timeout=30).status_code == 404
    assert httpx.get(url, headers=auth("key-ann"), timeout=30).status_code == 200


def forged(value: bytes) -> list[tuple[str, bytes]]:
    """Signed as the demo producer, with the wrong secret."""
    return signed(value, secret="not-the-demo-secret-at-all")


def unknown(value: bytes) -> list[tuple[str, bytes]]:
    return signed(value, producer="nobody")


@pytest.mark.parametrize("headers", [None, forged, unknown], ids=["unsigned", "forged", "unknown"])
def test_a_record_without_a_valid_signature_is_dead_lettered_and_its_stream_ends(
    stack: Stack, headers: Any
) -> None:
    request_id = str(ULID())
    value = request_value(request_id, "ann", document(9))
    produce(stack, request_id, value, headers(value) if headers else None)
    assert dead_letters(stack, request_id) == ["unauthenticated_producer"]
    result = result_of(stack, request_id)
    assert result["status"] == "REJECTED"
    assert result["error"]["code"] == "unauthenticated_producer"


def test_a_producer_may_act_only_for_its_users(stack: Stack) -> None:
    partner = {"producer": "partner", "secret": PARTNER_SECRET}
    theirs, other = str(ULID()), str(ULID())
    value = request_value(other, "ben", document(10))
    produce(stack, other, value, signed(value, **partner))
    value = request_value(theirs, "ann", document(10))
    produce(stack, theirs, value, signed(value, **partner))
    assert dead_letters(stack, other) == ["user_not_allowed"]
    refused = result_of(stack, other)
    assert (refused["status"], refused["error"]["code"]) == ("REJECTED", "user_not_allowed")
    accepted = result_of(stack, theirs)
    # ann's tier is her key's (enterprise), not the record's (pro).
    assert (accepted["status"], accepted["tier"]) == ("COMPLETED", "enterprise")


def test_a_record_claiming_enterprise_for_a_pro_user_runs_at_pro(stack: Stack) -> None:
    request_id = str(ULID())
    value = request_value(
        request_id, "flood", document(11), tier="enterprise", max_output_tokens=4_000
    )
    produce(stack, request_id, value, signed(value))
    [job] = records_of(stack, stack.topics.preprocessed, request_id, "InferenceJob")
    # pro's output cap (config/tiers.toml), not enterprise's 4,096.
    assert (job["tier"], job["max_output_tokens"]) == ("pro", 1_024)
    assert result_of(stack, request_id)["tier"] == "pro"


def usage_cost(stack: Stack, key: str) -> int:
    response = httpx.get(f"{stack.gateway}/v1/usage", headers=auth(key), timeout=10)
    response.raise_for_status()
    return int(response.json()["cost_micro_usd"])


def test_replay_of_from_a_producer_that_may_not_replay_is_billed(stack: Stack) -> None:
    before = usage_cost(stack, "key-ben")
    request_id = str(ULID())
    value = request_value(request_id, "ben", document(12), source="replay", replay_of=str(ULID()))
    produce(stack, request_id, value, signed(value))
    result = result_of(stack, request_id)
    assert result["status"] == "COMPLETED"
    assert (result["replay_of"], result["source"]) == (None, "external")
    cost = result["usage"]["cost_micro_usd"]
    assert cost > 0
    eventually(
        lambda: usage_cost(stack, "key-ben") >= before + cost,
        timeout=60,
        message="ben to be billed for the run",
    )


def test_topic_borne_requests_beyond_the_users_rpm_are_rejected(stack: Stack) -> None:
    # fay's key is on the free tier: 10 requests a minute (config/tiers.toml).
    ids = [str(ULID()) for _ in range(12)]
    for request_id in ids:
        value = request_value(request_id, "fay", document(13))
        produce(stack, request_id, value, signed(value))
    results = [result_of(stack, request_id) for request_id in ids]
    outcomes = sorted((r["status"], r["error"]["code"] if r["error"] else None) for r in results)
    assert outcomes == [("COMPLETED", None)] * 10 + [("REJECTED", "rate_limited")] * 2


def test_the_first_record_of_an_id_still_wins_after_the_worker_restarts(stack: Stack) -> None:
    request_id = str(ULID())
    value = request_value(request_id, "ann", document(14))
    produce(stack, request_id, value, signed(value))
    assert result_of(stack, request_id)["status"] == "COMPLETED"
    worker = stack.workers[0]
    worker.stop()
    worker.start()
    worker.wait_for_log("inflight partitions assigned", timeout=120)
    forged = request_value(request_id, "ben", document(15))
    produce(stack, request_id, forged, signed(forged))
    assert dead_letters(stack, request_id) == ["duplicate_request_id"]
    response = httpx.get(
        f"{stack.gateway}/v1/summaries/{request_id}", headers=auth("key-ann"), timeout=30
    )
    assert response.status_code == 200
