"""Stream tokens: bound to one user, one request and one purpose, signed, short-lived."""

from __future__ import annotations

import base64
import json

import pytest

from gateway.http.errors import Unauthorized
from gateway.http.streamtoken import StreamTokens
from pipeline.core.keys import Principal

ANN = Principal("ann", "pro")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def tokens(clock: Clock, secret: bytes = b"s" * 32) -> StreamTokens:
    return StreamTokens(secret, ttl_s=300, clock=clock)


def test_a_token_gives_back_its_user_and_tier_for_its_request() -> None:
    t = tokens(Clock())
    minted = t.mint(ANN, "01REQ")
    assert t.verify(minted.token, "01REQ") == ANN
    assert minted.expires_at == 1_000_300


def test_a_token_for_one_request_is_refused_for_another() -> None:
    t = tokens(Clock())
    with pytest.raises(Unauthorized, match="another request"):
        t.verify(t.mint(ANN, "01REQ").token, "01OTHER")


def test_a_token_is_refused_once_expired() -> None:
    clock = Clock()
    t = tokens(clock)
    token = t.mint(ANN, "01REQ").token
    clock.now += 299
    assert t.verify(token, "01REQ") == ANN
    clock.now += 1
    with pytest.raises(Unauthorized, match="expired"):
        t.verify(token, "01REQ")


def test_a_token_signed_under_another_secret_is_refused() -> None:
    clock = Clock()
    token = tokens(clock, b"other").mint(ANN, "01REQ").token
    with pytest.raises(Unauthorized, match="invalid"):
        tokens(clock).verify(token, "01REQ")


def test_a_payload_changed_to_another_user_breaks_the_signature() -> None:
    t = tokens(Clock())
    payload, signature = t.mint(ANN, "01REQ").token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["u"] = "ben"
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    with pytest.raises(Unauthorized, match="invalid"):
        t.verify(f"{forged}.{signature}", "01REQ")


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "x" * 2000, "key-ann"])
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(Unauthorized):
        tokens(Clock()).verify(token, "01REQ")
