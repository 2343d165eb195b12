"""Avro single-object encoding (C3 01 + CRC-64-AVRO fingerprint + body) for every record.

Each record names its writer schema by fingerprint, so readers need no registry. Readers
also know every schema kept in ``schemas/history/`` and resolve old records to the current one.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from pipeline.core.errors import CodecError, UnknownSchemaError
from pipeline.core.resources import SCHEMA_DIR as SCHEMA_DIR
from pipeline.core.sealing import open_fields, seal_fields

MARKER = b"\xc3\x01"
HEADER_LEN = 10
# Records referenced by others come first so their names resolve.
SHARED = ("Usage", "ErrorInfo")
RECORDS = (
    "SummarizeRequest",
    "InferenceJob",
    "TokenEvent",
    "SummaryResult",
    "ControlEvent",
    "DeadLetter",
    "QuotaEvent",
    "ChunkSummary",
    "UserPreferences",
    "DataKey",
)


@dataclass(frozen=True)
class Schema:
    name: str
    parsed: Any
    fingerprint: bytes
    # The fingerprint earlier releases wrote: of a canonical form that named a shared record
    # (Usage, ErrorInfo) instead of inlining it, so two versions of Usage gave one fingerprint.
    legacy_fingerprint: bytes = b""


def _parse_dir(directory: Path, names: tuple[str, ...]) -> dict[str, Schema]:
    named: dict[str, Any] = {}
    out: dict[str, Schema] = {}
    for name in (*SHARED, *names):
        path = directory / f"{name}.avsc"
        if not path.exists():
            continue
        raw = json.loads(path.read_text())
        expanded = parse_schema(raw, named_schemas=dict(named), expand=True)
        parsed = parse_schema(raw, named_schemas=named)
        # The Avro spec's canonical form inlines a named type where it is first used.
        out[name] = Schema(name, parsed, _fingerprint(expanded), _fingerprint(parsed))
    return out


def _fingerprint(parsed: Any) -> bytes:
    # fastavro gives the bytes little-endian, as single-object encoding stores them.
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


class Codec:
    """Encodes current-schema records and decodes any known (current or historical) writer."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        self.current = _parse_dir(schema_dir, RECORDS)
        self._writers: dict[bytes, Schema] = {}
        history = schema_dir / "history"
        if history.is_dir():
            for version in sorted(p for p in history.iterdir() if p.is_dir()):
                for schema in _parse_dir(version, RECORDS).values():
                    self._writers[schema.legacy_fingerprint] = schema
                    self._writers[schema.fingerprint] = schema
        for schema in self.current.values():
            self._writers[schema.fingerprint] = schema

    def encode(
        self, name: str, record: Mapping[str, Any], *, sealed_for: str | None = None
    ) -> bytes:
        """Encode ``record``; with ``sealed_for``, its text fields are sealed with that user's
        data key when the process has one (docs/architecture.md, "Forgetting")."""
        schema = self.current.get(name)
        if schema is None:
            raise UnknownSchemaError(f"no schema named {name!r}")
        buf = io.BytesIO()
        buf.write(MARKER)
        buf.write(schema.fingerprint)
        copy = dict(record)
        if sealed_for:
            seal_fields(name, copy, sealed_for)
        try:
            schemaless_writer(buf, schema.parsed, copy)
        except (ValueError, TypeError, KeyError, AttributeError, struct.error) as exc:
            raise CodecError(f"{name}: {exc}") from exc
        return buf.getvalue()

    def decode(
        self, data: bytes | None, expect: str | None = None, *, opened: bool = True
    ) -> tuple[str, dict[str, Any]]:
        """Return (record name, record), sealed text opened unless ``opened`` is False (a
        billing reader, which needs no key). ``expect`` rejects records of another type; a
        sealed field whose key is not read yet raises KeyUnknownError."""
        if not data or len(data) < HEADER_LEN or data[:2] != MARKER:
            raise CodecError("not an Avro single-object encoded record")
        writer = self._writers.get(data[2:HEADER_LEN])
        if writer is None:
            raise UnknownSchemaError(f"unknown schema fingerprint {data[2:HEADER_LEN].hex()}")
        if expect is not None and writer.name != expect:
            raise UnknownSchemaError(f"expected {expect}, got {writer.name}")
        reader = self.current[writer.name]
        body = io.BytesIO(data[HEADER_LEN:])
        try:
            record = schemaless_reader(body, writer.parsed, reader.parsed)
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise CodecError(f"{writer.name}: corrupt body: {exc}") from exc
        if not isinstance(record, dict):
            raise CodecError(f"{writer.name}: body is not a record")
        # A record is exactly its body: trailing bytes mean the value is not what it claims.
        extra = len(data) - HEADER_LEN - body.tell()
        if extra:
            raise CodecError(f"{writer.name}: {extra} trailing bytes")
        if opened:
            open_fields(writer.name, record)
        return writer.name, record

    def decode_as(self, data: bytes | None, name: str, *, opened: bool = True) -> dict[str, Any]:
        return self.decode(data, expect=name, opened=opened)[1]


@lru_cache(maxsize=1)
def codec() -> Codec:
    """The process-wide codec (schemas are read once)."""
    return Codec()
