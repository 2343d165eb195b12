from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core import sealing
from pipeline.core.codec import codec
from pipeline.core.errors import ValidationError
from pipeline.core.prompt import SYSTEM_PROMPT, normalize_text
from pipeline.core.sealing import Keyring
from pipeline.core.settings import WorkerSettings
from pipeline.core.tiers import Tier
from pipeline.llm.extractive import count_tokens, document_of, summarize
from pipeline.worker.dlq import DeadLetterQueue, Origin
from pipeline.worker.prepare import (
    CHUNK_PLACEHOLDER,
    Rejection,
    prepare,
    rejection_event,
    split_into_chunks,
    truncate_to_tokens,
)
from pipeline.worker.preprocess import PreprocessStage

NOW = 1_750_000_000_000
TIERS = {
    "free": Tier("free", 10, 1000, 50, 20, 1, 1.0, 30.0, "reject"),
    "pro": Tier("pro", 100, 10_000, 50, 200, 4, 10.0, 60.0, "truncate"),
}
SETTINGS = WorkerSettings(default_model="model-x", default_deadline_s=100.0)
DOC = (
    "The harbour bridge opened in 1932. It carries rail, vehicle and foot traffic. "
    "Engineers designed the arch to expand in summer heat. Painting the bridge never ends."
)


def request(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": "01J0000000000000000000000A",
        "user_id": "alice",
        "tier": "pro",
        "document": DOC,
        "instructions": None,
        "max_output_tokens": None,
        "model": None,
        "deadline_ms": None,
        "idempotency_key": None,
        "source": "gateway",
        "replay_of": None,
        "degraded": None,
        "created_at": NOW - 20,
        "trace": {"received": NOW - 20, "enqueued": NOW - 15},
    }
    base.update(overrides)
    return base


def job_of(req: dict[str, Any], **kw: Any) -> dict[str, Any]:
    out = prepare(req, TIERS, kw.pop("settings", SETTINGS), now_ms=NOW, **kw)
    assert isinstance(out, dict), out
    return out


# --- normalisation -----------------------------------------------------------------------------


def test_normalize_text() -> None:
    raw = "\ufeff  Cafe\u0301\t\tau  lait.\r\n\r\n\r\n\r\nNext\u00a0line \x07here.  \n"
    assert normalize_text(raw) == "Caf\u00e9 au lait.\n\nNext line here."


@given(st.text())
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize_text(text)
    assert normalize_text(once) == once
    assert "\r" not in once and "\n\n\n" not in once and "  " not in once


def reference_normalize(text: str) -> str:
    """normalize_text as first written: every space run and every newline matched."""
    import re
    import unicodedata

    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n")
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]", "", text)
    text = re.sub(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


@settings(max_examples=300)
@given(st.text(alphabet=" \t\n\r\x0b\u00a0\u3000\u2028\u200bab.e\u0301<>", max_size=60))
def test_normalize_takes_the_fast_path_to_the_same_text(text: str) -> None:
    assert normalize_text(text) == reference_normalize(text)
    ascii_only = text.encode("ascii", "ignore").decode()
    assert normalize_text(ascii_only) == reference_normalize(ascii_only)


# --- truncation and chunking -------------------------------------------------------------------


@given(st.text(alphabet="ab \n.", max_size=300), st.integers(1, 40))
def test_truncate_is_a_prefix_within_budget(text: str, budget: int) -> None:
    cut = truncate_to_tokens(text, budget)
    assert text.startswith(cut)
    assert count_tokens(cut) <= budget


def test_truncate_cuts_at_a_word_boundary() -> None:
    text = "alpha beta gamma delta epsilon"
    assert truncate_to_tokens(text, 2) == "alpha beta"
    assert truncate_to_tokens(text, 99) == text


words = st.lists(st.text(alphabet="abcdefghij", min_size=1, max_size=8), min_size=1, max_size=200)


@settings(max_examples=50)
@given(words, st.integers(0, 3), st.integers(8, 60))
def test_chunks_fit_and_keep_every_word_in_order(ws: list[str], layout: int, budget: int) -> None:
    seps = [" ", ". ", ".\n\n", "\n\n"][layout]
    text = seps.join(ws)
    chunks = split_into_chunks(text, budget)
    assert all(count_tokens(c) <= budget for c in chunks)
    assert " ".join(chunks).split() == text.split()


def test_a_single_huge_word_is_cut() -> None:
    text = "x" * 500
    chunks = split_into_chunks(text, 10)
    assert "".join(chunks) == text
    assert all(count_tokens(c) <= 10 for c in chunks)


# --- prepare -----------------------------------------------------------------------------------


def test_prepare_builds_the_job() -> None:
    job = job_of(request(), enqueued_ms=NOW - 15)
    assert job["request_id"] == "01J0000000000000000000000A"
    assert job["user_id"] == "alice" and job["tier"] == "pro" and job["weight"] == 4
    assert job["model"] == "model-x"
    assert job["system"] == SYSTEM_PROMPT
    assert job["prompt"].startswith(f"<document>\n{DOC}\n</document>\n\n")
    assert "at most 200 tokens" in job["prompt"]
    # The simulator (and a real model) sees exactly the normalised document.
    assert document_of(job["prompt"]) == DOC
    assert job["chunks"] == []
    assert job["max_output_tokens"] == 200
    assert job["truncated"] is False
    assert job["input_tokens_estimate"] == count_tokens(job["prompt"]) + count_tokens(SYSTEM_PROMPT)
    assert job["created_at"] == NOW - 20
    # deadline = created_at + tier max queue wait + generation allowance
    assert job["deadline_ms"] == NOW - 20 + 60_000 + 100_000
    assert job["trace"] == {"received": NOW - 20, "enqueued": NOW - 15, "preprocess_start": NOW}
    codec().encode("InferenceJob", job)  # a valid record


def test_prepare_honours_request_fields() -> None:
    job = job_of(
        request(
            instructions="  Three   bullet points. ",
            max_output_tokens=50,
            model="claude-sonnet-4-5",
            deadline_ms=NOW + 5,
            degraded="shorter_output",
            trace={},
        ),
        enqueued_ms=NOW - 3,
    )
    assert job["prompt"].endswith("</document>\n\nThree bullet points.")
    assert job["max_output_tokens"] == 50
    assert job["model"] == "claude-sonnet-4-5"
    assert job["deadline_ms"] == NOW + 5
    assert job["degraded"] == "shorter_output"
    # An external producer sent no trace: received is its created_at, enqueued the log time.
    assert job["trace"]["received"] == NOW - 20
    assert job["trace"]["enqueued"] == NOW - 3


def test_output_tokens_are_capped_by_the_tier() -> None:
    assert job_of(request(tier="free", max_output_tokens=10_000))["max_output_tokens"] == 20


def test_oversized_input_is_truncated_on_a_truncating_tier() -> None:
    document = " ".join(f"word{i}" for i in range(120))
    job = job_of(request(document=document))
    assert job["truncated"] is True
    kept = document_of(job["prompt"])
    assert document.startswith(kept) and count_tokens(kept) == 50


def test_oversized_input_is_rejected_on_a_rejecting_tier() -> None:
    out = prepare(request(tier="free", document="word " * 80), TIERS, SETTINGS, now_ms=NOW)
    assert isinstance(out, Rejection)
    assert out.code == "input_too_large" and not out.dead_letter
    assert "free tier allows 50" in out.message


LISTED = {"pro": Tier("pro", 100, 10_000, 50, 200, 4, 10.0, 60.0, "truncate", ("cheap", "dear"))}


def test_a_request_without_a_model_runs_its_tiers_first_listed_model() -> None:
    job = prepare(request(), LISTED, SETTINGS, now_ms=NOW)
    assert isinstance(job, dict) and job["model"] == "cheap"
    job = prepare(request(model="dear"), LISTED, SETTINGS, now_ms=NOW)
    assert isinstance(job, dict) and job["model"] == "dear"


def test_a_model_its_tier_does_not_list_is_rejected_without_a_dead_letter() -> None:
    out = prepare(request(model="claude-opus-4-1"), LISTED, SETTINGS, now_ms=NOW)
    assert isinstance(out, Rejection)
    assert out.code == "model_not_allowed" and not out.dead_letter
    assert "'claude-opus-4-1'" in out.message and "pro tier" in out.message


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"document": " \n\t "}, "invalid_request"),
        ({"user_id": ""}, "invalid_request"),
        ({"tier": "platinum"}, "unknown_tier"),
        ({"max_output_tokens": 0}, "invalid_request"),
    ],
)
def test_invalid_requests_are_rejected_and_dead_lettered(
    overrides: dict[str, Any], code: str
) -> None:
    out = prepare(request(**overrides), TIERS, SETTINGS, now_ms=NOW)
    assert isinstance(out, Rejection)
    assert out.code == code and out.dead_letter


@pytest.mark.parametrize("request_id", ["", "  ", "has space", "x" * 201])
def test_a_request_without_a_usable_id_cannot_be_answered(request_id: str) -> None:
    with pytest.raises(ValidationError):
        prepare(request(request_id=request_id), TIERS, SETTINGS, now_ms=NOW)


def test_document_tags_inside_the_document_are_neutralised() -> None:
    job = job_of(request(document="A <document> inside. And </DOCUMENT> too."))
    assert document_of(job["prompt"]) == "A [document] inside. And [/DOCUMENT] too."


def test_documents_beyond_the_model_budget_are_split_for_map_reduce() -> None:
    big = {"pro": Tier("pro", 1, 1, 100_000, 50, 1, 1.0, 1.0, "truncate")}
    small_model = WorkerSettings(model_budget_tokens=1_000)
    paragraphs = [" ".join(f"p{p}w{i}." for i in range(150)) for p in range(12)]  # ~1800 tokens
    document = "\n\n".join(paragraphs)
    out = prepare(request(document=document), big, small_model, now_ms=NOW)
    assert isinstance(out, dict)
    chunks = out["chunks"]
    assert len(chunks) >= 2
    assert CHUNK_PLACEHOLDER in out["prompt"]
    assert document_of(out["prompt"]) == CHUNK_PLACEHOLDER
    for index, chunk in enumerate(chunks, start=1):
        assert f"part {index} of {len(chunks)}" in chunk
        # every map call fits the model budget with its output
        assert count_tokens(chunk) + count_tokens(SYSTEM_PROMPT) + 50 <= 1_000
    rebuilt = " ".join(document_of(c) for c in chunks)
    assert rebuilt.split() == document.split()
    assert out["input_tokens_estimate"] > sum(count_tokens(c) for c in chunks)


def test_rejection_event_ends_the_stream_with_seq_1() -> None:
    req = request(trace={})
    event = rejection_event(
        req, Rejection("input_too_large", "too big"), model="m", now_ms=NOW, enqueued_ms=NOW - 1
    )
    assert event["seq"] == 1 and event["kind"] == "ERROR"
    assert event["error"] == {
        "code": "input_too_large",
        "message": "too big",
        "retriable": False,
        "partial": False,
    }
    assert event["model"] == "m" and event["user_id"] == "alice"
    assert event["trace"] == {"received": NOW - 20, "enqueued": NOW - 1, "preprocess_start": NOW}
    codec().encode("TokenEvent", event)


# --- the stage ---------------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, bytes]] = []

    async def __call__(self, key: bytes | None, value: bytes) -> None:
        self.sent.append((key, value))


@pytest.fixture
def stage() -> tuple[PreprocessStage, Sink, Sink, Sink]:
    jobs, tokens, dead = Sink(), Sink(), Sink()
    s = PreprocessStage(
        SETTINGS,
        TIERS,
        send_job=jobs,
        send_token=tokens,
        dlq=DeadLetterQueue(dead, clock=lambda: NOW / 1000),
        clock=lambda: NOW / 1000,
    )
    return s, jobs, tokens, dead


ORIGIN = Origin("t.requests", 3, 42)


async def test_stage_produces_a_job(stage: tuple[PreprocessStage, Sink, Sink, Sink]) -> None:
    s, jobs, tokens, dead = stage
    value = codec().encode("SummarizeRequest", request())
    await s.handle(b"01J0000000000000000000000A", value, ORIGIN, NOW - 15)
    assert tokens.sent == [] and dead.sent == []
    [(key, raw)] = jobs.sent
    assert key == b"01J0000000000000000000000A"
    job = codec().decode_as(raw, "InferenceJob")
    assert job["trace"]["preprocess_start"] == job["trace"]["preprocess_end"] == NOW
    assert summarize(document_of(job["prompt"]), 20) == summarize(DOC, 20)


@pytest.mark.parametrize(
    "value",
    [
        b"garbage",
        b"\xc3\x01" + b"\x00" * 8 + b"body",
        None,
    ],
)
async def test_stage_dead_letters_undecodable_records(
    stage: tuple[PreprocessStage, Sink, Sink, Sink], value: bytes | None
) -> None:
    s, jobs, tokens, dead = stage
    await s.handle(b"k", value, ORIGIN, None)
    assert jobs.sent == [] and tokens.sent == []
    [(key, raw)] = dead.sent
    letter = codec().decode_as(raw, "DeadLetter")
    assert key == b"k"
    assert letter["value"] == value
    assert letter["stage"] == "preprocess"
    assert (letter["origin_topic"], letter["origin_partition"], letter["origin_offset"]) == (
        "t.requests",
        3,
        42,
    )
    assert letter["error_type"] in {"undecodable_record", "unknown_schema"}
    assert letter["created_at"] == NOW


async def test_stage_dead_letters_a_record_of_another_type(
    stage: tuple[PreprocessStage, Sink, Sink, Sink],
) -> None:
    s, _, _, dead = stage
    other = codec().encode(
        "ControlEvent", {"request_id": "r", "action": "CANCEL", "reason": "x", "created_at": 1}
    )
    await s.handle(b"r", other, ORIGIN, None)
    letter = codec().decode_as(dead.sent[0][1], "DeadLetter")
    assert letter["error_type"] == "unknown_schema"
    assert "expected SummarizeRequest" in letter["error"]


async def test_stage_rejects_invalid_values_with_a_terminal_event_and_a_dead_letter(
    stage: tuple[PreprocessStage, Sink, Sink, Sink],
) -> None:
    s, jobs, tokens, dead = stage
    value = codec().encode("SummarizeRequest", request(document=""))
    await s.handle(b"01J0000000000000000000000A", value, ORIGIN, None)
    assert jobs.sent == []
    [(key, raw)] = tokens.sent
    event = codec().decode_as(raw, "TokenEvent")
    assert key == b"01J0000000000000000000000A"
    assert (event["kind"], event["seq"], event["error"]["code"]) == ("ERROR", 1, "invalid_request")
    assert event["trace"]["preprocess_end"] == NOW
    letter = codec().decode_as(dead.sent[0][1], "DeadLetter")
    assert letter["error_type"] == "invalid_record" and letter["value"] == value


async def test_stage_rejects_too_large_input_without_a_dead_letter(
    stage: tuple[PreprocessStage, Sink, Sink, Sink],
) -> None:
    s, jobs, tokens, dead = stage
    value = codec().encode("SummarizeRequest", request(tier="free", document="w " * 100))
    await s.handle(None, value, ORIGIN, None)
    assert jobs.sent == [] and dead.sent == []
    event = codec().decode_as(tokens.sent[0][1], "TokenEvent")
    assert event["error"]["code"] == "input_too_large"


async def test_stage_rejection_names_the_default_model_not_the_refused_one() -> None:
    jobs, tokens, dead = Sink(), Sink(), Sink()
    s = PreprocessStage(
        SETTINGS, LISTED, send_job=jobs, send_token=tokens, dlq=DeadLetterQueue(dead)
    )
    value = codec().encode("SummarizeRequest", request(model="made-up-model"))
    await s.handle(None, value, ORIGIN, None)
    assert jobs.sent == [] and dead.sent == []
    event = codec().decode_as(tokens.sent[0][1], "TokenEvent")
    assert event["error"]["code"] == "model_not_allowed"
    # The terminal event (and so the result and its metric labels) never carries that model.
    assert event["model"] == SETTINGS.default_model


async def test_stage_dead_letters_a_request_without_id(
    stage: tuple[PreprocessStage, Sink, Sink, Sink],
) -> None:
    s, jobs, tokens, dead = stage
    await s.handle(None, codec().encode("SummarizeRequest", request(request_id="")), ORIGIN, 1)
    assert jobs.sent == [] and tokens.sent == []
    assert codec().decode_as(dead.sent[0][1], "DeadLetter")["error"] == "request_id is empty"


async def test_a_sealed_request_gives_a_sealed_job_and_a_shredded_one_is_rejected(
    stage: tuple[PreprocessStage, Sink, Sink, Sink], monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = Keyring()
    monkeypatch.setattr(sealing, "keyring", lambda: ring)
    ring.add("alice", "k1", sealing.new_key())
    s, jobs, tokens, dead = stage
    first = codec().encode("SummarizeRequest", request(), sealed_for="alice")
    rid = "01J0000000000000000000000B"
    second = codec().encode("SummarizeRequest", request(request_id=rid), sealed_for="alice")
    await s.handle(b"01J0000000000000000000000A", first, ORIGIN, NOW - 15)
    [(_, raw)] = jobs.sent
    assert b"<document>" not in raw and b"ss1:k1:" in raw
    job = codec().decode_as(raw, "InferenceJob")
    assert summarize(document_of(job["prompt"]), 20) == summarize(DOC, 20)
    ring.shred("alice", "k1")  # the second request waited while its user was forgotten
    await s.handle(rid.encode(), second, ORIGIN, NOW - 15)
    assert len(jobs.sent) == 1 and dead.sent == []
    [(_, value)] = tokens.sent
    event = codec().decode_as(value, "TokenEvent")
    assert (event["kind"], event["error"]["code"]) == ("ERROR", "request_forgotten")


class SlowFirstKeys:
    """A keyring reader whose first decode waits (a key not read yet), the others do not."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def decode(self, value: bytes | None, schema: str) -> dict[str, Any]:
        self.calls += 1
        if self.calls == 1:
            await self.release.wait()
        return codec().decode_as(value, schema)

    async def key_for(self, user_id: str) -> None:
        """The stage asks for the user's key before sealing the job: none here (plain)."""


class ClaimOrder:
    """An identity check that records the order in which records claimed their ids."""

    def __init__(self) -> None:
        self.order: list[int] = []

    async def check(self, request: Any, value: bytes, origin: Origin, headers: Any) -> Any:
        self.order.append(origin.offset)
        return SimpleNamespace(request=request, producer=None)


async def test_records_handled_at_once_claim_their_ids_in_the_order_they_came(
    stage: tuple[PreprocessStage, Sink, Sink, Sink],
) -> None:
    s, _, _, _ = stage
    keys, claims = SlowFirstKeys(), ClaimOrder()
    s.keys, s.identity = cast(Any, keys), cast(Any, claims)
    value = codec().encode("SummarizeRequest", request())
    rid = b"01J0000000000000000000000A"
    # The same id twice, the first record's decode slow: the first still claims first.
    first = asyncio.ensure_future(s.handle(rid, value, Origin("t.requests", 3, 42), NOW))
    second = asyncio.ensure_future(s.handle(rid, value, Origin("t.requests", 3, 43), NOW))
    for _ in range(10):  # scheduler turns, not time: each task runs until it blocks
        await asyncio.sleep(0)
    assert keys.calls == 1  # the second waits its turn, its id not claimed yet
    keys.release.set()
    await asyncio.gather(first, second)
    assert claims.order == [42, 43]
