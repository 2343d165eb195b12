"""API keys: a presented key checked against the keys table (pipeline/core/keys.py).

Presented keys are hashed and compared against every stored hash in constant time, so timing
reveals nothing about them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from gateway.http.errors import Unauthorized
from gateway.settings import GatewaySettings
from pipeline.core.keys import Principal, hash_key, load_keys, load_keys_file

__all__ = ["KeyStore", "Principal", "hash_key", "load_keys_file"]


class KeyStore:
    """The known API keys, by hash."""

    def __init__(self, entries: Iterable[tuple[str, Principal]] = ()) -> None:
        self._entries: list[tuple[bytes, Principal]] = [
            (bytes.fromhex(digest), principal) for digest, principal in entries
        ]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tiers(self) -> set[str]:
        return {principal.tier for _, principal in self._entries}

    def authenticate(self, key: str) -> Principal | None:
        """The principal of ``key``, or None. Visits every entry: no early exit."""
        digest = hashlib.sha256(key.encode()).digest()
        found: Principal | None = None
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest) and found is None:
                found = principal
        return found

    def authenticate_header(self, authorization: str | None) -> Principal:
        """Check an ``Authorization: Bearer <key>`` header; raise Unauthorized when it fails."""
        if not authorization:
            raise Unauthorized("missing Authorization: Bearer <key> header")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("expected Authorization: Bearer <key>")
        principal = self.authenticate(key)
        if principal is None:
            raise Unauthorized("unknown API key")
        return principal

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> KeyStore:
        """Keys from ``settings.keys_file`` (when it exists) plus ``settings.dev_api_key``."""
        return cls(load_keys(settings.keys_file, settings.dev_api_key))
