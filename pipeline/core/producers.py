"""Producing systems and their identity: who may write `requests` on behalf of which users.

A producer has a name and a secret and signs each record it writes: the Kafka headers
``sumstream-producer`` (its name) and ``sumstream-signature`` (hex HMAC-SHA256 of the record's
value bytes under its secret). Consumers cannot see a SASL principal, so the headers are what
carries the identity (docs/architecture.md, "Identity").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from pipeline.core.tiers import ConfigError

PRODUCER_HEADER = "sumstream-producer"
SIGNATURE_HEADER = "sumstream-signature"
ANY_USER = "*"

# Kafka headers as the clients hand them over: (name, value) pairs, or a mapping.
Headers = Sequence[tuple[str, bytes | None]] | Mapping[str, bytes | None]


def signature(secret: SecretStr, value: bytes) -> str:
    """The hex HMAC-SHA256 of ``value`` under ``secret``."""
    return hmac.new(secret.get_secret_value().encode(), value, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ProducerIdentity:
    """One producing system: what it may do, and the secret it signs with."""

    name: str
    secret: SecretStr
    # None: any user.
    users: frozenset[str] | None
    replay: bool = False
    reserves: bool = False
    tier: str | None = None

    def may_act_for(self, user_id: str) -> bool:
        return self.users is None or user_id in self.users

    def headers(self, value: bytes) -> list[tuple[str, str | bytes | None]]:
        """The headers that sign ``value`` as this producer's."""
        return [
            (PRODUCER_HEADER, self.name.encode()),
            (SIGNATURE_HEADER, signature(self.secret, value).encode()),
        ]


def _header(headers: Headers | None, name: str) -> bytes | None:
    if not headers:
        return None
    pairs: Iterable[tuple[str, bytes | None]] = (
        headers.items() if isinstance(headers, Mapping) else headers
    )
    found = [value for key, value in pairs if key == name]
    # Two copies of a header: which one counts would be the reader's guess. Refuse both.
    return found[0] if len(found) == 1 else None


class ProducerTable:
    """The known producers, by name."""

    def __init__(self, producers: Iterable[ProducerIdentity] = ()) -> None:
        self._by_name = {p.name: p for p in producers}

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> ProducerIdentity:
        """The producer ``name`` (to sign as); ConfigError when the file lacks it."""
        producer = self._by_name.get(name)
        if producer is None:
            raise ConfigError(f"producer {name!r} is not in the producers file")
        return producer

    def verify(self, headers: Headers | None, value: bytes) -> ProducerIdentity | None:
        """The producer whose valid signature ``headers`` carry for ``value``, or None."""
        name, sig = _header(headers, PRODUCER_HEADER), _header(headers, SIGNATURE_HEADER)
        if not name or not sig:
            return None
        producer = self._by_name.get(name.decode(errors="replace"))
        if producer is None:
            return None
        expected = signature(producer.secret, value).encode()
        return producer if hmac.compare_digest(expected, sig) else None

    @classmethod
    def load(cls, path: Path) -> ProducerTable:
        """Read a producers file (``.json`` or TOML, ``[[producers]]`` tables)."""
        try:
            text = Path(path).read_text()
            data: dict[str, Any] = (
                json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read producers from {path}: {exc}") from exc
        return cls(_producer(row, i, path) for i, row in enumerate(data.get("producers", [])))


def _producer(row: Any, index: int, path: Path) -> ProducerIdentity:
    where = f"{path}: producers[{index}]"
    if not isinstance(row, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(row) - {"name", "secret", "users", "replay", "reserves", "tier"}
    if unknown:
        raise ConfigError(f"{where} has unknown keys {sorted(unknown)}")
    name, secret, users = row.get("name"), row.get("secret"), row.get("users")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where} needs a name")
    if not isinstance(secret, str) or len(secret) < 16:
        raise ConfigError(f"{where} needs a secret of at least 16 characters")
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise ConfigError(f'{where} needs users: a list of user ids, or ["*"]')
    tier = row.get("tier")
    if tier is not None and not isinstance(tier, str):
        raise ConfigError(f"{where} tier must be a tier name")
    flags = {key: row.get(key, False) for key in ("replay", "reserves")}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise ConfigError(f"{where} replay and reserves must be true or false")
    return ProducerIdentity(
        name=name,
        secret=SecretStr(secret),
        users=None if ANY_USER in users else frozenset(users),
        replay=flags["replay"],
        reserves=flags["reserves"],
        tier=tier,
    )
