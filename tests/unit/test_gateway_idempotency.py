from __future__ import annotations

from typing import Any

import pytest

from gateway.admission.idempotency import RequestIndex, body_sha256
from gateway.http.errors import IdempotencyKeyReused


class ClockMs:
    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


def request(rid: str, user: str, key: str | None, created_at: int) -> dict[str, Any]:
    return {
        "request_id": rid,
        "user_id": user,
        "tier": "pro",
        "idempotency_key": key,
        "created_at": created_at,
    }


def test_the_first_request_under_a_key_holds_it_per_user() -> None:
    index = RequestIndex()
    assert index.reserve("alice", "k", "r1") == "r1"
    assert index.reserve("alice", "k", "r2") == "r1"
    assert index.reserve("bob", "k", "r3") == "r3"
    assert index.lookup("alice", "k") == "r1"


def test_a_failed_produce_releases_the_key() -> None:
    index = RequestIndex()
    index.reserve("alice", "k", "r1")
    index.release("alice", "k", "r2")  # not the holder: nothing happens
    assert index.lookup("alice", "k") == "r1"
    index.release("alice", "k", "r1")
    assert index.lookup("alice", "k") is None


def test_keys_expire_after_the_window() -> None:
    clock = ClockMs()
    index = RequestIndex(window_s=60, clock_ms=clock)
    index.reserve("alice", "k", "r1")
    clock.now += 59_000
    assert index.lookup("alice", "k") == "r1"
    clock.now += 2_000
    assert index.lookup("alice", "k") is None
    assert index.reserve("alice", "k", "r2") == "r2"


def test_rebuilding_from_the_log_restores_keys_and_owners() -> None:
    clock = ClockMs()
    index = RequestIndex(window_s=3600, clock_ms=clock)
    index.observe(request("r1", "alice", "k", clock.now - 10_000))
    index.observe(request("r2", "alice", "k", clock.now - 5_000))  # a later duplicate
    index.observe(request("r3", "bob", None, clock.now))
    index.observe(request("r0", "carol", "old", clock.now - 7_200_000))  # outside the window
    assert index.lookup("alice", "k") == "r1"
    assert index.lookup("carol", "old") is None
    owner = index.owner("r3")
    assert owner is not None and owner.user_id == "bob"
    assert index.owner("r0") is not None  # owners are kept regardless of the key window


def test_the_maps_are_bounded() -> None:
    index = RequestIndex(max_entries=100)
    for i in range(1_000):
        index.reserve("u", f"k{i}", f"r{i}")
        index.remember(f"r{i}", "u", "pro", 0)
    assert len(index.keys) == 100
    assert len(index.owners) == 100
    assert index.lookup("u", "k999") == "r999"
    assert index.lookup("u", "k0") is None


def test_a_key_reused_with_another_body_is_refused_and_the_same_body_finds_the_request() -> None:
    index = RequestIndex()
    first = body_sha256({"document": "one", "max_output_tokens": None})
    assert index.reserve("alice", "k", "r1", first) == "r1"
    assert index.lookup("alice", "k", body_sha256({"max_output_tokens": None, "document": "one"}))
    with pytest.raises(IdempotencyKeyReused):
        index.lookup("alice", "k", body_sha256({"document": "two", "max_output_tokens": None}))
    with pytest.raises(IdempotencyKeyReused):
        index.reserve("alice", "k", "r2", body_sha256({"document": "one", "max_output_tokens": 5}))
    assert index.lookup("bob", "k", body_sha256({"document": "two"})) is None


def test_rebuilt_keys_keep_their_body_and_unfingerprinted_records_match_any_body() -> None:
    clock = ClockMs()
    index = RequestIndex(clock_ms=clock)
    index.observe({**request("r1", "alice", "k", clock.now), "body_sha256": body_sha256({"d": 1})})
    index.observe(request("r2", "alice", "old", clock.now))  # written before the field existed
    with pytest.raises(IdempotencyKeyReused):
        index.lookup("alice", "k", body_sha256({"d": 2}))
    assert index.lookup("alice", "k", body_sha256({"d": 1})) == "r1"
    assert index.lookup("alice", "old", body_sha256({"d": 2})) == "r2"
