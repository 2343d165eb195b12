"""Records made from the Avro schemas themselves: hypothesis strategies and fixed samples.

Built from the .avsc files, so a new field or a new record type is covered without editing
this module. Used by the codec tests, the Kafka round-trip tests and
``scripts/gen_schema_fixtures.py``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from fastavro import parse_schema
from hypothesis import strategies as st

from pipeline.core.codec import RECORDS, SCHEMA_DIR, SHARED

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
# Avro strings are UTF-8: lone surrogates cannot be encoded by any writer.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


def load_schemas(directory: Path = SCHEMA_DIR) -> tuple[dict[str, Any], dict[str, Any]]:
    """(record name -> parsed schema, full name -> named schema) for one schema directory."""
    named: dict[str, Any] = {}
    records: dict[str, Any] = {}
    for name in (*SHARED, *RECORDS):
        path = directory / f"{name}.avsc"
        if path.exists():
            parsed = parse_schema(json.loads(path.read_text()), named_schemas=named)
            if name in RECORDS:
                records[name] = parsed
    return records, named


def record_names(directory: Path = SCHEMA_DIR) -> list[str]:
    """The top-level record types that have a schema file in ``directory``."""
    return sorted(load_schemas(directory)[0])


def strategy(name: str, directory: Path = SCHEMA_DIR) -> st.SearchStrategy[dict[str, Any]]:
    """Any valid record of type ``name``."""
    records, named = load_schemas(directory)
    out: st.SearchStrategy[dict[str, Any]] = _strategy(records[name], named)
    return out


def _strategy(schema: Any, named: dict[str, Any]) -> st.SearchStrategy[Any]:
    if isinstance(schema, list):
        return st.one_of([_strategy(branch, named) for branch in schema])
    if isinstance(schema, str):
        if schema in named:
            return _strategy(named[schema], named)
        return {
            "null": st.none(),
            "boolean": st.booleans(),
            "int": st.integers(INT_MIN, INT_MAX),
            "long": st.integers(LONG_MIN, LONG_MAX),
            "string": TEXT,
            "bytes": st.binary(max_size=64),
        }[schema]
    kind = schema["type"]
    if kind == "record":
        return st.fixed_dictionaries(
            {f["name"]: _strategy(f["type"], named) for f in schema["fields"]}
        )
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    if kind == "map":
        return st.dictionaries(TEXT, _strategy(schema["values"], named), max_size=5)
    if kind == "array":
        return st.lists(_strategy(schema["items"], named), max_size=5)
    return _strategy(kind, named)


def sample(name: str, directory: Path = SCHEMA_DIR) -> dict[str, Any]:
    """A fixed record of type ``name`` that takes every non-null branch and fills collections."""
    records, named = load_schemas(directory)
    value: dict[str, Any] = _sample(records[name], named, name)
    return value


def _sample(schema: Any, named: dict[str, Any], path: str) -> Any:
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"] or schema
        return _sample(branches[0], named, path)
    if isinstance(schema, str):
        if schema in named:
            return _sample(named[schema], named, path)
        seed = sum(ord(c) for c in path)
        return {
            "null": None,
            "boolean": True,
            "int": seed % 1000 + 1,
            "long": 1_767_225_600_000 + seed,  # epoch ms in 2026, like the real stamps
            "string": f"{path.rsplit('.', 1)[-1]} \u00e9t\u00e9 \u2713",
            "bytes": path.encode() + b"\x00\xff",
        }[schema]
    kind = schema["type"]
    if kind == "record":
        return {
            f["name"]: _sample(f["type"], named, f"{path}.{f['name']}") for f in schema["fields"]
        }
    if kind == "enum":
        return schema["symbols"][1 % len(schema["symbols"])]
    if kind == "map":
        return {"received": _sample(schema["values"], named, path + ".received")}
    if kind == "array":
        return [_sample(schema["items"], named, f"{path}[{i}]") for i in range(2)]
    return _sample(kind, named, path)


def sparse(name: str, directory: Path = SCHEMA_DIR) -> dict[str, Any]:
    """:func:`sample` with every nullable field null and every map and array empty."""
    records = load_schemas(directory)[0]
    full = sample(name, directory)
    out: dict[str, Any] = {}
    for field in records[name]["fields"]:
        kind = field["type"]
        if isinstance(kind, list) and "null" in kind:
            out[field["name"]] = None
        elif isinstance(kind, dict) and kind["type"] in ("map", "array"):
            out[field["name"]] = {} if kind["type"] == "map" else []
        else:
            out[field["name"]] = full[field["name"]]
    return out


def to_json(record: Any) -> str:
    """JSON for a record; bytes become ``{"$bytes": base64}``."""

    def default(value: Any) -> Any:
        if isinstance(value, bytes):
            return {"$bytes": base64.b64encode(value).decode()}
        raise TypeError(type(value).__name__)

    return json.dumps(record, default=default, indent=2, sort_keys=True, ensure_ascii=False)


def from_json(text: str) -> Any:
    def hook(obj: dict[str, Any]) -> Any:
        if set(obj) == {"$bytes"}:
            return base64.b64decode(obj["$bytes"])
        return obj

    return json.loads(text, object_hook=hook)
