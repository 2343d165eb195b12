"""Nothing accepted may hang (issue 17, item 1), on real processes with a 64 KiB record limit.

Before these limits were derived from one setting, a document the gateway accepted could make
a job over the producer's limit: the record was dropped ("even the dead-letter topic failed")
or dead-lettered without an end, and the client received pings for ever. Each case here now
ends with a 413 up front, or ``error`` + ``done``; a record dead-lettered stays in `dlq`.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import ConfigResource, ResourceType
from ulid import ULID

from pipeline.core.codec import codec
from pipeline.core.records import DeadLetter, SummaryResult
from pipeline.core.settings import KafkaSettings
from pipeline.core.sizes import RecordSizes
from pipeline.kafka.admin import admin_client, create_topics, describe_topics
from tests.harness import (
    BOOTSTRAP,
    Stack,
    StreamResult,
    auth,
    collect,
    eventually,
    produce_raw,
    read_topic,
    signed,
)

pytestmark = pytest.mark.e2e

MAX_RECORD_BYTES = 64 * 1024
SIZES = RecordSizes(MAX_RECORD_BYTES)
# A character NFC does not compose back: 4 UTF-8 bytes become 12 (U+1D158 U+1D165 U+1D16E).
GROWS_UNDER_NFC = "\U0001d160"
# A stream with no worker to finish it reaches this lifetime (the second gateway's).
LIFETIME_S = 2.0


def _stack(tmp: Path, **env: str) -> Stack:
    stack = Stack(tmp, extra_env={"SUMSTREAM_MAX_RECORD_BYTES": str(MAX_RECORD_BYTES), **env})
    create_topics(
        KafkaSettings(
            bootstrap_servers=BOOTSTRAP,
            topic_prefix=stack.prefix,
            max_record_bytes=MAX_RECORD_BYTES,
        )
    )
    return stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Simulator, one worker, one gateway: every process with the 64 KiB record limit."""
    stack = _stack(tmp_path_factory.mktemp("hardening-size"))
    try:
        stack.start_simulator()
        stack.start_worker()
        stack.start_gateway()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def idle_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway whose requests no worker takes, with a short maximum stream lifetime."""
    stack = _stack(
        tmp_path_factory.mktemp("hardening-size-idle"),
        SUMSTREAM_MAX_STREAM_LIFETIME_S=str(LIFETIME_S),
    )
    try:
        stack.start_gateway()
        yield stack
    finally:
        stack.stop()


async def stream(stack: Stack, document: str) -> StreamResult:
    """POST ``document`` as raw UTF-8 JSON and read its SSE stream to ``done``."""
    body = json.dumps({"document": document}, ensure_ascii=False).encode()
    headers = {**auth(), "Content-Type": "application/json", "Accept": "text/event-stream"}
    async with httpx.AsyncClient(timeout=120) as client:
        # A guard only: a stream that hangs fails here instead of stalling the suite.
        async with asyncio.timeout(180):
            return await collect(
                client, "POST", f"{stack.gateway}/v1/summaries", content=body, headers=headers
            )


def result_of(stack: Stack, request_id: str) -> SummaryResult:
    """The SummaryResult of ``request_id`` on `results`, once postprocess wrote it."""
    key = request_id.encode()
    records = read_topic(BOOTSTRAP, stack.topics.results, lambda rs: any(r.key == key for r in rs))
    value = next(r.value for r in records if r.key == key)
    return cast(SummaryResult, codec().decode_as(value, "SummaryResult"))


def oversized_request(request_id: str, **fields: Any) -> bytes:
    """A SummarizeRequest just over the record limit (the topic still takes it)."""
    record: dict[str, Any] = {
        "request_id": request_id,
        "user_id": "ann",
        "tier": "enterprise",
        "document": "",
        "source": "external",
        "created_at": ULID.from_str(request_id).milliseconds,
        **fields,
    }
    base = len(codec().encode("SummarizeRequest", record))
    # Random printable text: it does not compress, so its sealed job (docs/architecture.md,
    # "Forgetting") is larger than the record, as a plain one would be.
    rng = random.Random(request_id)
    text = "".join(
        rng.choices(
            string.ascii_letters + string.digits + "!?.,;:", k=MAX_RECORD_BYTES - base + 500
        )
    )
    value = codec().encode("SummarizeRequest", {**record, "document": text})
    assert MAX_RECORD_BYTES < len(value) < SIZES.topic_message_bytes - 64
    return value


def test_every_topic_and_the_inflight_changelog_take_the_largest_record(stack: Stack) -> None:
    settings = KafkaSettings(
        bootstrap_servers=BOOTSTRAP, topic_prefix=stack.prefix, max_record_bytes=MAX_RECORD_BYTES
    )
    largest = str(SIZES.topic_message_bytes)
    for topic in describe_topics(settings):
        assert topic["config"]["max.message.bytes"] == largest, topic
    changelog = ConfigResource(ResourceType.TOPIC, f"{stack.app_id}-inflight-changelog")
    admin = admin_client(settings)  # kept: its futures never complete once it is freed

    def changelog_limit() -> str | None:
        # The worker's Faust app creates its changelog once it has joined the group.
        stack.workers[0].check_alive()
        [future] = admin.describe_configs([changelog]).values()
        try:
            return str(future.result(timeout=10)["max.message.bytes"].value)
        except KafkaException:
            return None

    assert eventually(changelog_limit, message="the inflight changelog") == largest


async def test_a_document_over_the_derived_limit_is_413_and_one_at_it_completes(
    stack: Stack,
) -> None:
    over = await stream(stack, "a" * (SIZES.document_bytes + 1))
    assert over.status_code == 413
    assert over.events[0].data["code"] == "input_too_large"
    # The largest accepted document that does not grow fits its job: it runs to the end.
    words = ("Sentence number one is here. " * (SIZES.document_bytes // 29 + 1))[
        : SIZES.document_bytes
    ]
    at = await stream(stack, words)
    assert at.status_code == 200, at.events
    assert at.done["status"] == "COMPLETED", at.events[-3:]


async def test_a_document_that_nfc_triples_past_the_limit_still_fits_its_sealed_job(
    stack: Stack,
) -> None:
    # Sealed text is compressed first (docs/architecture.md, "Forgetting"): NFC's growth is
    # repetitive, so the job fits. A job that does not fit ends with `input_too_large`
    # (test_oversized_records_on_requests_end_their_requests_and_keep_a_dead_letter).
    document = GROWS_UNDER_NFC * (SIZES.document_bytes // 4)
    assert len(document.encode()) <= SIZES.document_bytes
    assert len(document.encode()) * 3 > MAX_RECORD_BYTES
    result = await stream(stack, document)
    assert result.done["status"] == "COMPLETED", result.events[-3:]


def test_oversized_records_on_requests_end_their_requests_and_keep_a_dead_letter(
    stack: Stack,
) -> None:
    too_large, unsigned = str(ULID()), str(ULID())
    valid = oversized_request(too_large)
    produce_raw(BOOTSTRAP, stack.topics.requests, too_large.encode(), valid, headers=signed(valid))
    # Not signed: refused for its identity, dead-lettered, and its request still ends.
    value = oversized_request(unsigned)
    produce_raw(BOOTSTRAP, stack.topics.requests, unsigned.encode(), value)

    # A valid request whose job cannot fit a record ends REJECTED instead of being dropped.
    rejected = result_of(stack, too_large)
    assert rejected["status"] == "REJECTED"
    assert rejected["error"] is not None and rejected["error"]["code"] == "input_too_large"
    # A record the stage dead-letters is kept, truncated to fit `dlq`, and its request ends.
    dead = result_of(stack, unsigned)
    assert dead["status"] == "REJECTED"
    assert dead["error"] is not None and dead["error"]["code"] == "unauthenticated_producer"
    key = unsigned.encode()
    records = read_topic(BOOTSTRAP, stack.topics.dlq, lambda rs: any(r.key == key for r in rs))
    [raw] = [r.value for r in records if r.key == key]
    assert len(raw) <= MAX_RECORD_BYTES
    letter = cast(DeadLetter, codec().decode_as(raw, "DeadLetter"))
    assert letter["value"] is not None and value.startswith(letter["value"])
    assert len(letter["value"]) < len(value)
    assert f"were {len(key)} and {len(value)} bytes" in letter["error"]


async def test_a_stream_nobody_finishes_ends_at_its_maximum_lifetime(idle_gateway: Stack) -> None:
    result = await stream(idle_gateway, "A short document that no worker will ever take.")
    assert [e.event for e in result.events] == ["accepted", "error", "done"]
    error = result.of("error")[0].data
    assert (error["code"], error["retriable"], error["last_seq"]) == ("stream_timeout", True, 0)
    assert result.done == {"id": result.request_id, "status": "running", "last_seq": 0}
