"""Who may use the simulator's operator endpoints (``/_sim/*``), which can make every call fail.

Bound to a loopback address without a token, anyone on the machine may (tests, benchmarks). With
``SUMSTREAM_SIM_ADMIN_TOKEN`` set, or bound to any other address, a request needs
``Authorization: Bearer <token>``; bound elsewhere without a token, the endpoints are off.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import SecretStr

PREFIX = "/_sim/"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@dataclass(frozen=True)
class Refusal:
    """Why an operator request is refused: its HTTP status and message."""

    status: int
    message: str


@dataclass(frozen=True)
class AdminGuard:
    """Checks requests to ``/_sim/*`` against the bind address and the admin token."""

    host: str
    token: SecretStr | None = None

    def refusal(self, headers: Mapping[bytes, bytes]) -> Refusal | None:
        """None when the request may proceed, else what to answer."""
        if self.token is None or not self.token.get_secret_value():
            if is_loopback(self.host):
                return None
            return Refusal(
                403,
                "operator endpoints are off on a non-loopback address without "
                "SUMSTREAM_SIM_ADMIN_TOKEN",
            )
        sent = headers.get(b"authorization", b"")
        scheme, _, given = sent.partition(b" ")
        expected = self.token.get_secret_value().encode()
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), expected):
            return Refusal(401, "operator endpoints need Authorization: Bearer <admin token>")
        return None
