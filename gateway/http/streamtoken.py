"""Stream tokens: short-lived, signed, bound to one user and one request, for ``EventSource``.

A browser's ``EventSource`` cannot send ``Authorization``, so a page asks for a token (with its
API key) and puts it in the events URL. The token is ``<payload>.<signature>``: the payload is
base64url JSON (purpose, request id, user, tier, expiry), the signature HMAC-SHA256 under the
gateway's ``stream_token_secret``. Only ``GET /v1/summaries/{id}/events?token=`` accepts it,
and only for the request it names (docs/architecture.md, "The web app and WebSocket API").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.http.errors import Unauthorized
from gateway.settings import GatewaySettings
from pipeline.core.keys import Principal

log = logging.getLogger("sumstream.gateway")

PURPOSE = "events"
# Longer than any signature of a real token: a bigger one is refused before any decoding.
MAX_TOKEN_CHARS = 1_024


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class StreamToken:
    """A minted token and when it stops being accepted (epoch seconds)."""

    token: str
    expires_at: int


class StreamTokens:
    """Mints and checks stream tokens under one secret."""

    def __init__(self, secret: bytes, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> StreamTokens:
        """The settings' secret; without one, a random secret of this process (tokens then
        fail at another instance or after a restart, and the page mints a new one)."""
        if settings.stream_token_secret is None:
            # One gateway: a page whose token fails after a restart just mints a new one.
            # Several: a token minted at one fails at the others, which deserves a warning.
            level = logging.WARNING if settings.instance_count > 1 else logging.INFO
            log.log(level, "no SUMSTREAM_STREAM_TOKEN_SECRET: stream tokens hold for this process")
            secret = secrets.token_bytes(32)
        else:
            secret = settings.stream_token_secret.get_secret_value().encode()
        return cls(secret, settings.stream_token_ttl_s)

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())

    def mint(self, principal: Principal, request_id: str) -> StreamToken:
        """A token that lets ``principal`` follow ``request_id``'s events until it expires."""
        expires_at = int(self._clock() + self.ttl_s)
        body = {
            "p": PURPOSE,
            "r": request_id,
            "u": principal.user_id,
            "t": principal.tier,
            "e": expires_at,
        }
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return StreamToken(f"{payload}.{self._sign(payload)}", expires_at)

    def verify(self, token: str, request_id: str) -> Principal:
        """The principal a token was minted for; Unauthorized when it is forged, expired,
        or minted for another request or purpose."""
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise Unauthorized("malformed stream token")
        payload, signature = token.split(".")
        if not hmac.compare_digest(self._sign(payload).encode(), signature.encode()):
            raise Unauthorized("invalid stream token")
        try:
            body = json.loads(_unb64(payload))
            purpose, rid, user, tier, expires_at = (
                body["p"],
                body["r"],
                body["u"],
                body["t"],
                int(body["e"]),
            )
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise Unauthorized("malformed stream token") from None
        if purpose != PURPOSE or rid != request_id:
            raise Unauthorized("this stream token is for another request")
        if self._clock() >= expires_at:
            raise Unauthorized("the stream token has expired; ask for a new one")
        return Principal(str(user), str(tier))
