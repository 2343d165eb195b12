"""Record sizes (pipeline/core/sizes.py): every limit follows from ``max_record_bytes`` and
agrees with the others; the records each part builds are measured against it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError as SettingsError

from gateway.settings import GatewaySettings
from pipeline.core.codec import codec
from pipeline.core.records import DeadLetter
from pipeline.core.settings import KafkaSettings, WorkerSettings
from pipeline.core.sizes import JOB_OVERHEAD_BYTES, MIN_RECORD_BYTES, RecordSizes
from pipeline.core.tiers import Tier
from pipeline.core.topics import declared_topics
from pipeline.kafka.connection import ConnectionConfig
from pipeline.worker.agents import process
from pipeline.worker.dlq import DeadLetterQueue, Origin, encode_within
from pipeline.worker.prepare import MAX_INSTRUCTIONS_CHARS
from pipeline.worker.preprocess import PreprocessStage

NOW = 1_750_000_000_000
RECORD_LIMITS = st.integers(min_value=MIN_RECORD_BYTES, max_value=64 * 1024 * 1024)
ORIGIN = Origin("t.requests", 0, 7)
TIERS = {"big": Tier("big", 100, 10**9, 10**7, 200, 1, 10.0, 60.0, "reject")}
REQUEST_ID = "01J0000000000000000000000A"


@given(RECORD_LIMITS)
def test_every_derived_limit_is_consistent(max_record_bytes: int) -> None:
    sizes = RecordSizes(max_record_bytes)
    # Whatever a producer sends, the topic takes, and a consumer fetches whole.
    assert sizes.max_record_bytes < sizes.producer_request_bytes
    assert sizes.producer_request_bytes <= sizes.topic_message_bytes <= sizes.fetch_bytes
    # The gateway's limits sit below the record its request becomes, with room for the job.
    assert sizes.body_bytes <= sizes.max_record_bytes
    assert sizes.document_bytes + JOB_OVERHEAD_BYTES <= sizes.max_record_bytes
    assert sizes.document_bytes > 0
    assert sizes.dead_letter_value_bytes <= sizes.max_record_bytes


@given(RECORD_LIMITS)
def test_topics_clients_and_the_gateway_are_built_from_the_one_setting(
    max_record_bytes: int,
) -> None:
    settings = KafkaSettings(max_record_bytes=max_record_bytes)
    sizes = settings.sizes
    for spec in declared_topics(settings):
        assert spec.config["max.message.bytes"] == str(sizes.topic_message_bytes)
    conn = ConnectionConfig.from_settings(settings)
    assert conn.sizes == sizes
    gateway = GatewaySettings(keys_file=None, max_record_bytes=max_record_bytes)
    assert gateway.document_limit_bytes == sizes.document_bytes
    assert gateway.max_body_bytes <= sizes.max_record_bytes


def test_every_client_family_carries_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    built: dict[str, dict[str, Any]] = {}
    for family in ("AIOKafkaProducer", "AIOKafkaConsumer", "Producer", "Consumer"):

        def record(*args: Any, _family: str = family, **options: Any) -> None:
            built[_family] = {**(args[0] if args else {}), **options}

        monkeypatch.setattr(f"pipeline.kafka.connection.{family}", record)
    conn = ConnectionConfig.from_settings(KafkaSettings(max_record_bytes=MIN_RECORD_BYTES * 3))
    sizes = conn.sizes
    conn.producer(acks="all")
    conn.consumer()
    conn.confluent_producer()
    conn.confluent_consumer({"group.id": "g"})
    assert built["AIOKafkaProducer"]["max_request_size"] == sizes.producer_request_bytes
    assert built["AIOKafkaConsumer"]["max_partition_fetch_bytes"] == sizes.fetch_bytes
    assert built["Producer"]["message.max.bytes"] == sizes.producer_request_bytes
    assert built["Consumer"]["max.partition.fetch.bytes"] == sizes.fetch_bytes


def test_a_document_limit_above_what_a_record_holds_is_refused() -> None:
    with pytest.raises(SettingsError, match="max_document_bytes"):
        GatewaySettings(keys_file=None, max_record_bytes=MIN_RECORD_BYTES, max_document_bytes=10**6)
    lower = GatewaySettings(keys_file=None, max_document_bytes=1_000)
    assert lower.document_limit_bytes == 1_000


def letter(value: bytes | None, key: bytes | None = b"k") -> DeadLetter:
    return {
        "key": key,
        "value": value,
        "error_type": "invalid_record",
        "error": "bad",
        "stage": "preprocess",
        "origin_topic": "t",
        "origin_partition": 0,
        "origin_offset": 1,
        "created_at": NOW,
        "trace": {},
    }


@given(st.integers(min_value=0, max_value=3 * MIN_RECORD_BYTES), st.integers(0, 4_000))
def test_a_dead_letter_always_fits_and_keeps_what_it_can(value_size: int, key_size: int) -> None:
    value, key = b"v" * value_size, b"k" * key_size
    encoded = encode_within(letter(value, key), MIN_RECORD_BYTES)
    assert len(encoded) <= MIN_RECORD_BYTES
    kept = codec().decode_as(encoded, "DeadLetter")
    assert value.startswith(kept["value"]) and key.startswith(kept["key"])
    if kept["value"] != value:
        assert f"were {key_size} and {value_size} bytes" in kept["error"]
        # Truncated, not emptied: nearly the whole limit goes to the original bytes.
        assert len(kept["value"]) > MIN_RECORD_BYTES - 4_000


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, bytes]] = []

    async def __call__(self, key: bytes | None, value: bytes) -> None:
        self.sent.append((key, value))


def stage(max_record_bytes: int = MIN_RECORD_BYTES) -> tuple[PreprocessStage, Sink, Sink, Sink]:
    jobs, tokens, dead = Sink(), Sink(), Sink()
    settings = WorkerSettings(max_record_bytes=max_record_bytes, default_model="m")
    dlq = DeadLetterQueue(dead, max_record_bytes=max_record_bytes)
    s = PreprocessStage(settings, TIERS, send_job=jobs, send_token=tokens, dlq=dlq)
    return s, jobs, tokens, dead


def request(document: str, **fields: Any) -> bytes:
    record = {"request_id": REQUEST_ID, "user_id": "u", "tier": "big", "document": document}
    return codec().encode("SummarizeRequest", {**record, "created_at": NOW, **fields})


async def test_a_job_that_normalisation_grows_past_the_limit_is_rejected_not_produced() -> None:
    s, jobs, tokens, dead = stage()
    document = "\U0001d160" * (RecordSizes(MIN_RECORD_BYTES).document_bytes // 4)
    await s.handle(REQUEST_ID.encode(), request(document), ORIGIN, NOW)
    assert jobs.sent == [] and dead.sent == []
    [(key, raw)] = tokens.sent
    event = codec().decode_as(raw, "TokenEvent")
    assert (key, event["kind"], event["seq"]) == (REQUEST_ID.encode(), "ERROR", 1)
    assert event["error"]["code"] == "input_too_large"


async def test_a_job_at_the_document_limit_that_does_not_grow_is_produced() -> None:
    s, jobs, tokens, _ = stage()
    document = ("Plain words. " * MIN_RECORD_BYTES)[: RecordSizes(MIN_RECORD_BYTES).document_bytes]
    # The widest instructions the job can carry: 4-byte characters that NFC triples, cut after.
    widest = "\U0001d160" * MAX_INSTRUCTIONS_CHARS
    value = request(document, instructions=widest)
    assert len(value) <= MIN_RECORD_BYTES
    await s.handle(REQUEST_ID.encode(), value, ORIGIN, NOW)
    assert tokens.sent == []
    [(_key, raw)] = jobs.sent
    assert len(raw) <= MIN_RECORD_BYTES


@dataclass
class FakeMessage:
    value: bytes | None
    key: bytes | None = REQUEST_ID.encode()
    topic: str = "t.requests"
    partition: int = 0
    offset: int = 7
    timestamp: float = 1.5


@dataclass
class FakeEvent:
    message: FakeMessage


async def test_a_request_preprocess_gives_up_on_is_dead_lettered_and_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pipeline.worker.agents.PROCESS_BACKOFF_S", 0.0)
    s, _, tokens, dead = stage()

    async def broken(event: object) -> None:
        raise RuntimeError("producer refused the job")

    event = FakeEvent(FakeMessage(request("A document.")))
    await process("preprocess", broken, event, s._dlq, s.abandon)  # type: ignore[arg-type]
    [(_, raw_letter)] = dead.sent
    assert codec().decode_as(raw_letter, "DeadLetter")["error_type"] == "RuntimeError"
    [(key, raw)] = tokens.sent
    ended = codec().decode_as(raw, "TokenEvent")
    assert (key, ended["kind"], ended["seq"]) == (REQUEST_ID.encode(), "ERROR", 1)
    assert ended["error"]["code"] == "preprocess_failed"
    assert "RuntimeError" in ended["error"]["message"]
    assert "producer refused" not in ended["error"]["message"]  # internals stay in the dlq


async def test_a_record_without_a_request_id_is_dead_lettered_with_no_stream_to_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pipeline.worker.agents.PROCESS_BACKOFF_S", 0.0)
    s, _, tokens, dead = stage()

    async def broken(event: object) -> None:
        raise RuntimeError("bug")

    event = FakeEvent(FakeMessage(b"\x00garbage"))
    await process("preprocess", broken, event, s._dlq, s.abandon)  # type: ignore[arg-type]
    assert len(dead.sent) == 1 and tokens.sent == []
