"""The TypedDicts of pipeline/core/records.py against the Avro schemas they describe."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, get_args, get_origin, get_type_hints

import pytest

import pipeline.core.records as records
from pipeline.core import events
from pipeline.core.codec import SCHEMA_DIR, Codec, codec
from pipeline.core.records import RECORD_TYPES, TERMINAL_KINDS
from tests.avro_data import sample

PRIMITIVES: dict[str, type] = {
    "string": str,
    "bytes": bytes,
    "boolean": bool,
    "int": int,
    "long": int,
    "float": float,
    "double": float,
}


def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
    return loaded


def python_type(avro: Any) -> Any:
    """The Python annotation an Avro type reads as (None for null)."""
    if isinstance(avro, list):
        members = [python_type(member) for member in avro]
        return typing.Union[tuple(members)]  # noqa: UP007 - built from a runtime list
    if isinstance(avro, dict):
        kind = avro["type"]
        if kind == "map":
            return dict[str, python_type(avro["values"])]
        if kind == "array":
            return list[python_type(avro["items"])]
        if kind == "enum":
            return typing.Literal[tuple(avro["symbols"])]
        if kind == "record":
            return RECORD_TYPES[avro["name"]]
        return python_type(kind)
    if avro == "null":
        return type(None)
    if avro in PRIMITIVES:
        return PRIMITIVES[avro]
    return RECORD_TYPES[avro.rsplit(".", 1)[-1]]


def normalise(annotation: Any) -> Any:
    """Unions as frozensets of members, so `X | None` and `Union[X, None]` compare equal."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return frozenset(normalise(arg) for arg in get_args(annotation))
    if origin is typing.Literal:
        return ("Literal", frozenset(get_args(annotation)))
    if origin in (dict, list):
        return (origin, tuple(normalise(arg) for arg in get_args(annotation)))
    return annotation


@pytest.mark.parametrize("name", sorted(RECORD_TYPES))
def test_typed_dict_has_exactly_the_schema_fields_with_matching_types(name: str) -> None:
    hints = get_type_hints(RECORD_TYPES[name])
    fields = {field["name"]: field["type"] for field in schema(name)["fields"]}
    assert set(hints) == set(fields)
    for field, avro in fields.items():
        assert normalise(hints[field]) == normalise(python_type(avro)), f"{name}.{field}"


def test_every_schema_in_the_schema_dir_has_a_typed_dict() -> None:
    names = {path.stem for path in SCHEMA_DIR.glob("*.avsc")}
    assert names == set(RECORD_TYPES)


@pytest.mark.parametrize("name", ["SummarizeRequest", "InferenceJob", "TokenEvent"])
def test_decoded_record_has_the_typed_dict_keys(name: str) -> None:
    encoded = codec().encode(name, sample(name))
    _, decoded = codec().decode(encoded)
    assert set(decoded) == set(get_type_hints(RECORD_TYPES[name]))


def test_terminal_kinds_are_token_kinds_and_exclude_started_delta_progress_and_usage() -> None:
    kinds = set(get_args(records.TokenKind))
    assert kinds > TERMINAL_KINDS
    assert kinds - TERMINAL_KINDS == {"STARTED", "DELTA", "PROGRESS", "USAGE"}


def test_a_token_event_of_the_previous_schema_reads_as_a_one_seq_delta() -> None:
    old = Codec(SCHEMA_DIR / "history" / "v2")
    record = {**sample("TokenEvent"), "kind": "DELTA", "seq": 9, "text": "abc"}
    for field in ("first_seq", "cuts"):
        record.pop(field, None)
    decoded = codec().decode_as(old.encode("TokenEvent", record), "TokenEvent")
    assert (decoded["first_seq"], decoded["cuts"]) == (0, [])
    assert events.pieces(decoded) == [(9, "abc")]
