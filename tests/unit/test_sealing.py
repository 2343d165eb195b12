"""Sealed text (pipeline/core/sealing.py): round trips, shredded and unknown keys, plain text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core import sealing
from pipeline.core.codec import codec
from pipeline.core.sealing import FORGOTTEN, PREFIX, Keyring, KeyUnknownError


def ring_with(*keys: tuple[str, str]) -> Keyring:
    ring = Keyring()
    for user, key_id in keys:
        ring.add(user, key_id, sealing.new_key())
    return ring


@pytest.fixture
def process_ring(monkeypatch: pytest.MonkeyPatch) -> Keyring:
    ring = Keyring()
    monkeypatch.setattr(sealing, "keyring", lambda: ring)
    return ring


@given(st.text())
def test_sealed_text_opens_to_itself_and_hides_it(text: str) -> None:
    ring = ring_with(("ann", "k1"))
    sealed = ring.seal(text, "k1")
    assert ring.open(sealed) == text
    if text:
        assert sealed.startswith(f"{PREFIX}k1:")


def test_a_long_repetitive_text_seals_smaller_than_it_is() -> None:
    ring = ring_with(("ann", "k1"))
    text = "The board approved the budget. " * 2_000
    sealed = ring.seal(text, "k1")
    assert len(sealed) < len(text) / 10
    assert "board" not in sealed
    assert ring.open(sealed) == text


def test_plain_text_passes_through_and_empty_text_stays_empty() -> None:
    ring = Keyring()
    assert ring.open("a plain request from another system") == "a plain request from another system"
    assert ring_with(("ann", "k1")).seal("", "k1") == ""


def test_a_shredded_key_opens_as_forgotten() -> None:
    ring = ring_with(("ann", "k1"))
    sealed = ring.seal("ann's secret", "k1")
    ring.shred("ann", "k1")
    assert ring.open(sealed) == FORGOTTEN
    assert ring.current("ann") is None


def test_a_wrong_key_opens_as_forgotten_not_as_garbage() -> None:
    writer = ring_with(("ann", "k1"))
    reader = ring_with(("ann", "k1"))  # same id, another key
    assert reader.open(writer.seal("ann's secret", "k1")) == FORGOTTEN


def test_an_unknown_key_raises_until_the_reader_has_read_every_key() -> None:
    sealed = ring_with(("ann", "k1")).seal("ann's secret", "k1")
    reader = Keyring()
    with pytest.raises(KeyUnknownError) as raised:
        reader.open(sealed)
    assert raised.value.key_id == "k1"
    assert raised.value.retriable
    reader.give_up("k1")
    assert reader.open(sealed) == FORGOTTEN
    settled = Keyring()
    settled.settled = True  # a replay that read all of `keys`: unknown means compacted away
    assert settled.open(sealed) == FORGOTTEN


def test_two_keys_of_one_user_both_open_and_shredding_one_keeps_the_other() -> None:
    ring = ring_with(("ann", "k1"), ("ann", "k2"))
    assert ring.current("ann") == "k2"
    first, second = ring.seal("one", "k1"), ring.seal("two", "k2")
    assert (ring.open(first), ring.open(second)) == ("one", "two")
    ring.shred("ann", "k2")
    assert ring.current("ann") == "k1"
    assert (ring.open(first), ring.open(second)) == ("one", FORGOTTEN)


def test_the_codec_seals_text_fields_and_keeps_billing_fields_in_clear(
    process_ring: Keyring,
) -> None:
    process_ring.add("ann", "k1", sealing.new_key())
    result = {
        "request_id": "r1",
        "user_id": "ann",
        "tier": "free",
        "model": "m",
        "status": "COMPLETED",
        "summary": "ann-marker-summary",
        "usage": {"input_tokens": 17, "output_tokens": 4},
        "error": None,
        "stop_reason": "end_turn",
        "last_seq": 3,
        "degraded": None,
        "source": "api",
        "replay_of": None,
        "latency_ms": {},
        "created_at": 1,
        "completed_at": 2,
        "trace": {},
    }
    value = codec().encode("SummaryResult", result, sealed_for="ann")
    assert b"ann-marker-summary" not in value
    assert codec().decode_as(value, "SummaryResult")["summary"] == "ann-marker-summary"
    process_ring.shred("ann", "k1")
    decoded = codec().decode_as(value, "SummaryResult")
    assert decoded["summary"] == FORGOTTEN
    assert decoded["usage"]["input_tokens"] == 17
    assert decoded["status"] == "COMPLETED"
    # A user without a key (no keystore in this process) is written as before.
    assert b"ben-text" in codec().encode(
        "SummaryResult", {**result, "user_id": "ben", "summary": "ben-text"}, sealed_for="ben"
    )
