"""The simulator's admin guard (pipeline/llm/simulator/admin.py), without a server."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from pipeline.llm.simulator.admin import AdminGuard, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("sim.internal", False),
    ],
)
def test_only_loopback_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_loopback_without_a_token_lets_anyone_on_the_machine_in() -> None:
    assert AdminGuard("127.0.0.1").refusal({}) is None


def test_beyond_loopback_without_a_token_refuses_with_403() -> None:
    refusal = AdminGuard("0.0.0.0").refusal({b"authorization": b"Bearer anything"})
    assert refusal is not None and refusal.status == 403


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_configured_token_is_needed_wherever_the_simulator_listens(host: str) -> None:
    guard = AdminGuard(host, SecretStr("s3cret"))
    assert guard.refusal({b"authorization": b"Bearer s3cret"}) is None
    assert guard.refusal({b"authorization": b"bearer s3cret"}) is None
    for sent in (b"", b"Bearer", b"Bearer wrong", b"Basic s3cret", b"s3cret"):
        refusal = guard.refusal({b"authorization": sent})
        assert refusal is not None and refusal.status == 401, sent
