"""Sealed text: a user's document and summary text encrypted with their data key.

A sealed field is a string ``ss1:<key_id>:<base64 of nonce + AES-256-GCM ciphertext>``, so the
Avro schemas stay as they are and a plain string (an old record, another system's request)
passes through unchanged. The keys live in the compacted ``keys`` topic; this module holds the
process's copy of them (fed by ``pipeline/memory/keystore.py``) and nothing else of Kafka.
Shredding a user's keys makes every sealed copy unreadable: it then opens as ``FORGOTTEN``.
See docs/architecture.md, "Forgetting".
"""

from __future__ import annotations

import binascii
import os
import zlib
from collections.abc import Mapping, MutableMapping
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.core.errors import CodecError

PREFIX = "ss1:"
FORGOTTEN = "[forgotten]"
KEY_BYTES = 32
_NONCE_BYTES = 12
# Texts from this size are compressed before sealing when that makes them smaller ("~" marks
# it: not a base64 character). Token deltas are shorter and skip the attempt.
_COMPRESS_FROM_BYTES = 256
_ZLIB_MARK = "~"

# The text fields of each record that carry a user's words; usage, cost, status and trace
# stay in clear for billing and audit.
SEALED_FIELDS: dict[str, tuple[str, ...]] = {
    "SummarizeRequest": ("document", "instructions"),
    "InferenceJob": ("system", "prompt", "chunks", "turns"),
    "TokenEvent": ("text",),
    "SummaryResult": ("summary",),
}


class KeyUnknownError(CodecError):
    """A sealed field names a key this process has not read (yet): wait for ``keys``, retry."""

    retriable = True

    def __init__(self, key_id: str) -> None:
        super().__init__(f"data key {key_id} not known here")
        self.key_id = key_id


class Keyring:
    """The data keys this process has read: key id -> cipher, user -> key ids."""

    def __init__(self) -> None:
        self._ciphers: dict[str, AESGCM] = {}
        self._by_user: dict[str, list[str]] = {}
        self._shredded: set[str] = set()
        # A reader that has read all of ``keys`` (replay) sets this: a key it does not know
        # was shredded and compacted away, not late.
        self.settled = False

    def add(self, user_id: str, key_id: str, key: bytes) -> None:
        """Learn a key (a record of ``keys``); the user's newest key seals from now on."""
        self._ciphers[key_id] = AESGCM(key)
        self._shredded.discard(key_id)
        ids = self._by_user.setdefault(user_id, [])
        if key_id in ids:
            ids.remove(key_id)
        ids.append(key_id)

    def shred(self, user_id: str, key_id: str) -> None:
        """Forget a key (its tombstone): text sealed with it opens as ``FORGOTTEN``."""
        self._ciphers.pop(key_id, None)
        self._shredded.add(key_id)
        ids = self._by_user.get(user_id)
        if ids is not None and key_id in ids:
            ids.remove(key_id)
            if not ids:
                del self._by_user[user_id]

    def give_up(self, key_id: str) -> None:
        """Treat a key that did not arrive in time as shredded (until it does arrive)."""
        if key_id not in self._ciphers:
            self._shredded.add(key_id)

    def knows(self, key_id: str) -> bool:
        """True once ``key_id`` was read, or shredded."""
        return key_id in self._ciphers or key_id in self._shredded

    def key_ids(self, user_id: str) -> list[str]:
        return list(self._by_user.get(user_id, ()))

    def current(self, user_id: str) -> str | None:
        """The key id new text of ``user_id`` is sealed with (None: the user has no key)."""
        ids = self._by_user.get(user_id)
        return ids[-1] if ids else None

    def seal(self, text: str, key_id: str) -> str:
        """``text`` sealed with ``key_id`` (an empty or already sealed text is kept)."""
        if not text or text.startswith(PREFIX):
            return text
        raw = text.encode()
        mark = ""
        if len(raw) >= _COMPRESS_FROM_BYTES:
            # Base64 costs a third more: compressed, a document's record is smaller than its
            # plain text, so the record limits (docs/architecture.md, "Record sizes") hold.
            packed = zlib.compress(raw, 1)
            if len(packed) < len(raw):
                raw, mark = packed, _ZLIB_MARK
        nonce = os.urandom(_NONCE_BYTES)
        body = self._ciphers[key_id].encrypt(nonce, raw, None)
        encoded = binascii.b2a_base64(nonce + body, newline=False).decode()
        return f"{PREFIX}{key_id}:{mark}{encoded}"

    def open(self, text: str) -> str:
        """The plain text of a sealed ``text`` (a plain one as it is); ``FORGOTTEN`` when its
        key was shredded or does not open it. Raises KeyUnknownError for a key not read yet."""
        if not text.startswith(PREFIX):
            return text
        key_id, _, body = text[len(PREFIX) :].partition(":")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            if key_id in self._shredded or self.settled:
                return FORGOTTEN
            raise KeyUnknownError(key_id)
        packed = body.startswith(_ZLIB_MARK)
        try:
            raw = binascii.a2b_base64(body[1:] if packed else body)
            plain = cipher.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], None)
            return (zlib.decompress(plain) if packed else plain).decode()
        except (InvalidTag, ValueError, binascii.Error, zlib.error):
            return FORGOTTEN


@lru_cache(maxsize=1)
def keyring() -> Keyring:
    """The process's keyring (empty until a keystore feeds it: then nothing is sealed)."""
    return Keyring()


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def seal_text(text: str, user_id: str) -> str:
    """``text`` sealed with ``user_id``'s current key; as it is when the user has none."""
    ring = keyring()
    key_id = ring.current(user_id)
    return text if key_id is None else ring.seal(text, key_id)


def seal_fields(name: str, record: MutableMapping[str, Any], user_id: str) -> None:
    """Seal ``record``'s text fields in place with ``user_id``'s current key, if it has one."""
    ring = keyring()
    key_id = ring.current(user_id)
    if key_id is None:
        return
    for field in SEALED_FIELDS.get(name, ()):
        value = record.get(field)
        if isinstance(value, str):
            record[field] = ring.seal(value, key_id)
        elif isinstance(value, list):
            record[field] = [ring.seal(v, key_id) for v in value]


def open_fields(name: str, record: MutableMapping[str, Any]) -> None:
    """Open ``record``'s sealed text fields in place (see ``Keyring.open``)."""
    ring = keyring()
    for field in SEALED_FIELDS.get(name, ()):
        value = record.get(field)
        if isinstance(value, str):
            if value.startswith(PREFIX):
                record[field] = ring.open(value)
        elif isinstance(value, list) and value:
            record[field] = [ring.open(v) for v in value]


def is_forgotten(record: Mapping[str, Any], name: str) -> bool:
    """True when one of ``record``'s opened text fields was shredded."""
    for field in SEALED_FIELDS.get(name, ()):
        value = record.get(field)
        if value == FORGOTTEN or (isinstance(value, list) and FORGOTTEN in value):
            return True
    return False
