from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastavro.schema import expand_schema, to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.codec import HEADER_LEN, MARKER, RECORDS, SCHEMA_DIR, Codec, codec
from pipeline.core.errors import CodecError, UnknownSchemaError
from tests.avro_data import from_json, load_schemas, record_names, sample, strategy

NAMES = record_names()
STRATEGIES = {name: strategy(name) for name in NAMES}
SAMPLES = {name: sample(name) for name in NAMES}
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "history"
HISTORY = SCHEMA_DIR / "history"

# CRC-64-AVRO (Rabin), written from the Avro specification, independent of fastavro.
EMPTY64 = 0xC15D213AA4D7A795
_TABLE = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (EMPTY64 & -(_fp & 1))
    _TABLE.append(_fp)


def rabin64(data: bytes) -> int:
    fp = EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def test_every_declared_record_has_a_schema_with_a_trace_map() -> None:
    assert set(NAMES) == set(RECORDS)
    for name, schema in load_schemas()[0].items():
        fields = {f["name"]: f for f in schema["fields"]}
        assert fields["trace"]["type"] == {"type": "map", "values": "long"}, name
        assert fields["trace"]["default"] == {}, name


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_record_round_trips(name: str, data: st.DataObject) -> None:
    record = data.draw(STRATEGIES[name])
    encoded = codec().encode(name, record)
    assert codec().decode(encoded) == (name, record)
    assert codec().decode_as(encoded, name) == record


@pytest.mark.parametrize("name", NAMES)
def test_header_is_single_object_encoding(name: str) -> None:
    encoded = codec().encode(name, SAMPLES[name])
    assert encoded[:2] == MARKER == b"\xc3\x01"
    # The spec's canonical form: shared records (Usage, ErrorInfo) inlined where first used.
    canonical = to_parsing_canonical_form(expand_schema(codec().current[name].parsed))
    assert encoded[2:HEADER_LEN] == rabin64(canonical.encode()).to_bytes(8, "little")


@pytest.mark.parametrize(
    "data",
    [
        None,
        b"",
        b"\xc3",
        b"\xc3\x01\x00\x00",  # shorter than the header
        b"\xc3\x02" + bytes(20),  # wrong version byte
        b"\x00\x00\x00\x00\x07" + bytes(20),  # Confluent wire format (magic 0 + schema id)
        b'{"request_id": "x"}',
    ],
)
def test_not_single_object_encoded_raises_codec_error(data: bytes | None) -> None:
    with pytest.raises(CodecError):
        codec().decode(data)


def test_wrong_marker_on_a_valid_body_raises() -> None:
    encoded = codec().encode("TokenEvent", SAMPLES["TokenEvent"])
    with pytest.raises(CodecError):
        codec().decode(b"\xc3\x00" + encoded[2:])


@pytest.mark.parametrize("name", NAMES)
def test_trailing_bytes_after_a_valid_body_raise(name: str) -> None:
    encoded = codec().encode(name, SAMPLES[name])
    with pytest.raises(CodecError, match="trailing bytes"):
        codec().decode(encoded + b"\x00")


@pytest.mark.parametrize("name", NAMES)
def test_every_truncation_raises_codec_error(name: str) -> None:
    encoded = codec().encode(name, SAMPLES[name])
    for cut in range(HEADER_LEN, len(encoded)):
        with pytest.raises(CodecError):
            codec().decode(encoded[:cut])


def test_unknown_fingerprint_raises_unknown_schema_error() -> None:
    encoded = codec().encode("SummarizeRequest", SAMPLES["SummarizeRequest"])
    forged = MARKER + bytes(8) + encoded[HEADER_LEN:]
    with pytest.raises(UnknownSchemaError) as err:
        codec().decode(forged)
    assert isinstance(err.value, CodecError)  # stages catch one type for the dead-letter path
    assert err.value.code == "unknown_schema"


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_body_raises_codec_error(name: str) -> None:
    header = codec().encode(name, SAMPLES[name])[:HEADER_LEN]
    # An unterminated varint, then a string length past the end of the data.
    for body in (b"\xff" * 12, b"\x02\x61\x7f"):
        with pytest.raises(CodecError):
            codec().decode(header + body)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_corruption_decodes_or_raises_codec_error(name: str, data: st.DataObject) -> None:
    encoded = bytearray(codec().encode(name, SAMPLES[name]))
    flips = data.draw(
        st.lists(st.tuples(st.integers(HEADER_LEN, len(encoded) - 1), st.integers(0, 255)))
    )
    for pos, value in flips:
        encoded[pos] = value
    tail = data.draw(st.binary(max_size=16))
    try:
        decoded_name, record = codec().decode(bytes(encoded) + tail)
    except CodecError:
        return
    # Avro has no checksum: a flip may still be a valid record, but never of another type.
    assert decoded_name == name
    assert isinstance(record, dict)


def test_decode_as_another_type_raises() -> None:
    encoded = codec().encode("TokenEvent", SAMPLES["TokenEvent"])
    with pytest.raises(UnknownSchemaError, match="expected SummaryResult"):
        codec().decode_as(encoded, "SummaryResult")
    with pytest.raises(CodecError):
        codec().decode(encoded, expect="SummarizeRequest")


def test_encode_rejects_unknown_names_and_invalid_records() -> None:
    with pytest.raises(UnknownSchemaError):
        codec().encode("NoSuchRecord", {})
    record = SAMPLES["SummarizeRequest"]
    with pytest.raises(CodecError):
        codec().encode("SummarizeRequest", {**record, "created_at": "yesterday"})
    with pytest.raises(CodecError):
        codec().encode("SummarizeRequest", {k: v for k, v in record.items() if k != "document"})


def test_encode_fills_defaults() -> None:
    minimal = {"request_id": "r1", "user_id": "u1", "document": "text", "created_at": 1}
    decoded = codec().decode_as(codec().encode("SummarizeRequest", minimal), "SummarizeRequest")
    assert decoded["tier"] == "free"
    assert decoded["trace"] == {}
    assert decoded["instructions"] is None


# Fixtures written by scripts/gen_schema_fixtures.py with each released schema version.


def _versions() -> list[Path]:
    return sorted(p for p in HISTORY.iterdir() if p.is_dir())


def test_history_has_a_fixture_for_every_record_of_every_version() -> None:
    versions = _versions()
    assert versions, "schemas/history/ has no released version"
    for version in versions:
        for name in record_names(version):
            assert (FIXTURES / version.name / f"{name}.bin").exists(), f"{version.name}/{name}"


@pytest.mark.parametrize("fixture", sorted(FIXTURES.glob("*/*.bin")), ids=lambda p: p.stem)
def test_fixtures_of_every_version_decode_with_the_current_codec(fixture: Path) -> None:
    version, name = fixture.parent.name, fixture.stem
    data = fixture.read_bytes()
    # The fixture names the released writer schema, not today's one.
    released = Codec(HISTORY / version).current[name]
    assert data[2:HEADER_LEN] in (released.fingerprint, released.legacy_fingerprint)
    decoded_name, record = codec().decode(data)
    assert decoded_name == name
    written: dict[str, Any] = from_json((fixture.with_suffix(".json")).read_text())
    current = {f["name"]: f for f in load_schemas()[0][name]["fields"]}
    for field, value in record.items():
        if field in written and isinstance(value, dict) and field == "usage":
            # A shared record that gained fields since: the written ones, then the defaults.
            assert {k: v for k, v in value.items() if k in written[field]} == written[field]
        elif field in written:
            assert value == written[field], field
        else:  # added after that version: the reader's default
            assert value == current[field]["default"], field


# Evolution: a "future" schema adds a field with a default and an enum symbol; old and new
# codecs must read each other's records (readers learn a schema before writers use it).

FUTURE_FIELD = {"name": "future_note", "type": "string", "default": "from-default"}


def _write_dir(directory: Path, change: bool) -> Path:
    directory.mkdir(parents=True)
    for avsc in SCHEMA_DIR.glob("*.avsc"):
        schema = json.loads(avsc.read_text())
        if change and schema["name"] in RECORDS:
            schema["fields"].append(FUTURE_FIELD)
        if change and schema["name"] == "TokenEvent":
            kind = next(f for f in schema["fields"] if f["name"] == "kind")
            kind["type"]["symbols"].append("PAUSED")
        (directory / avsc.name).write_text(json.dumps(schema))
    return directory


@pytest.fixture
def old_and_future(tmp_path: Path) -> tuple[Codec, Codec]:
    old = _write_dir(tmp_path / "old", change=False)
    shutil.copytree(_write_dir(tmp_path / "future", change=True), old / "history" / "v2")
    future = tmp_path / "future"
    shutil.copytree(_write_dir(tmp_path / "released", change=False), future / "history" / "v1")
    return Codec(old), Codec(future)


@pytest.mark.parametrize("name", NAMES)
def test_new_reader_reads_old_records_with_defaults(
    name: str, old_and_future: tuple[Codec, Codec]
) -> None:
    old, future = old_and_future
    record = SAMPLES[name]
    assert future.decode_as(old.encode(name, record), name) == {
        **record,
        "future_note": "from-default",
    }


@pytest.mark.parametrize("name", NAMES)
def test_old_reader_reads_new_records_without_the_new_field(
    name: str, old_and_future: tuple[Codec, Codec]
) -> None:
    old, future = old_and_future
    record = SAMPLES[name]
    assert old.decode_as(future.encode(name, {**record, "future_note": "set"}), name) == record


def test_old_reader_maps_a_new_enum_symbol_to_the_enum_default(
    old_and_future: tuple[Codec, Codec],
) -> None:
    old, future = old_and_future
    record = {**SAMPLES["TokenEvent"], "kind": "PAUSED"}
    assert old.decode_as(future.encode("TokenEvent", record), "TokenEvent")["kind"] == "ERROR"


def test_a_reader_that_never_learned_the_schema_refuses_the_record(tmp_path: Path) -> None:
    future = Codec(_write_dir(tmp_path / "future", change=True))
    encoded = future.encode("TokenEvent", SAMPLES["TokenEvent"])
    with pytest.raises(UnknownSchemaError):
        codec().decode(encoded)
