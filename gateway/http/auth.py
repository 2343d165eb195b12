"""API keys: stored as SHA-256 hashes, each mapped to a user id and a tier.

Keys come from a TOML or JSON file (``[[keys]]`` tables with ``sha256``, ``user``, ``tier``)
and optionally one development key from the environment. Presented keys are hashed and
compared against every stored hash in constant time, so timing reveals nothing about them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.http.errors import Unauthorized
from gateway.settings import GatewaySettings

DEV_USER = "dev"
DEV_TIER = "pro"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user id every record carries and the tier that sets their limits."""

    user_id: str
    tier: str


def hash_key(key: str) -> str:
    """The hex SHA-256 of an API key, as stored in the keys file."""
    return hashlib.sha256(key.encode()).hexdigest()


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
        entries: list[tuple[str, Principal]] = []
        if settings.keys_file is not None and settings.keys_file.exists():
            entries.extend(load_keys_file(settings.keys_file))
        if settings.dev_api_key is not None and settings.dev_api_key.get_secret_value():
            entries.append(
                (hash_key(settings.dev_api_key.get_secret_value()), Principal(DEV_USER, DEV_TIER))
            )
        return cls(entries)


def load_keys_file(path: Path) -> list[tuple[str, Principal]]:
    """Parse a keys file (``.json`` or TOML) into (sha256 hex, principal) pairs."""
    text = path.read_text()
    data: dict[str, Any] = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    out: list[tuple[str, Principal]] = []
    for i, row in enumerate(data.get("keys", [])):
        try:
            digest = str(row["sha256"]).lower()
            user = str(row["user"])
            tier = str(row.get("tier", "free"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: keys[{i}] needs sha256 and user") from exc
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{path}: keys[{i}].sha256 is not a hex SHA-256")
        out.append((digest, Principal(user, tier)))
    return out
