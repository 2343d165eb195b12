"""The keys table: API keys stored as SHA-256 hashes, each mapped to a user id and a tier.

Keys come from a TOML or JSON file (``[[keys]]`` tables with ``sha256``, ``user``, ``tier``)
and optionally one development key (user ``dev``, tier ``pro``). The gateway authenticates
keys against it; the preprocess stage reads the same file for each user's tier, so the tier a
request runs and is billed at is the server's, never the record's (docs/architecture.md,
"Identity").
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

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


def load_keys(keys_file: Path | None, dev_api_key: SecretStr | None) -> list[tuple[str, Principal]]:
    """The keys of ``keys_file`` (when it exists) plus the development key, if one is set."""
    entries: list[tuple[str, Principal]] = []
    if keys_file is not None and keys_file.exists():
        entries.extend(load_keys_file(keys_file))
    if dev_api_key is not None and dev_api_key.get_secret_value():
        entries.append((hash_key(dev_api_key.get_secret_value()), Principal(DEV_USER, DEV_TIER)))
    return entries


def user_tiers(entries: list[tuple[str, Principal]]) -> dict[str, str]:
    """user id -> tier. A user with keys in several tiers gets the first key's tier."""
    tiers: dict[str, str] = {}
    for _digest, principal in entries:
        tiers.setdefault(principal.user_id, principal.tier)
    return tiers
