"""Producer identity (pipeline/core/producers.py): the producers file and record signatures."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from pipeline.core.producers import ProducerTable
from pipeline.core.resources import DEFAULT_PRODUCERS_FILE
from pipeline.core.tiers import ConfigError

FILE = """
[[producers]]
name = "crm"
secret = "crm-secret-0123456789"
users = ["ann", "ben"]
tier = "free"

[[producers]]
name = "replay"
secret = "replay-secret-0123456789"
users = ["*"]
replay = true
"""


@pytest.fixture
def table(tmp_path: Path) -> ProducerTable:
    path = tmp_path / "producers.toml"
    path.write_text(FILE)
    return ProducerTable.load(path)


def sig(secret: str, value: bytes) -> bytes:
    return hmac.new(secret.encode(), value, hashlib.sha256).hexdigest().encode()


def test_a_record_signed_with_the_producers_secret_is_its(table: ProducerTable) -> None:
    headers = [
        ("sumstream-producer", b"crm"),
        ("sumstream-signature", sig("crm-secret-0123456789", b"v")),
    ]
    producer = table.verify(headers, b"v")
    assert producer is not None and producer.name == "crm"
    assert table.get("crm").headers(b"v") == headers
    # As a mapping too (Faust hands either).
    assert table.verify(dict(headers), b"v") is producer


@pytest.mark.parametrize(
    "headers",
    [
        None,
        [],
        [("sumstream-producer", b"crm")],
        [("sumstream-producer", b"crm"), ("sumstream-signature", b"00" * 32)],
        [("sumstream-producer", b"nobody"), ("sumstream-signature", sig("x" * 20, b"v"))],
        # Another producer's valid signature under this name.
        [
            ("sumstream-producer", b"crm"),
            ("sumstream-signature", sig("replay-secret-0123456789", b"v")),
        ],
        # Two signatures: which one counts would be a guess.
        [
            ("sumstream-producer", b"crm"),
            ("sumstream-signature", sig("crm-secret-0123456789", b"v")),
            ("sumstream-signature", b"00"),
        ],
    ],
    ids=["none", "empty", "unsigned", "wrong", "unknown", "other-secret", "two-signatures"],
)
def test_records_without_one_valid_signature_have_no_producer(
    table: ProducerTable, headers: list[tuple[str, bytes]] | None
) -> None:
    assert table.verify(headers, b"v") is None


def test_a_signature_covers_the_value(table: ProducerTable) -> None:
    headers = table.get("crm").headers(b"value")
    assert table.verify(headers, b"value!") is None


def test_users_replay_and_tier_come_from_the_file(table: ProducerTable) -> None:
    crm, replay = table.get("crm"), table.get("replay")
    assert crm.may_act_for("ann") and not crm.may_act_for("carol")
    assert replay.may_act_for("anyone")
    assert (crm.replay, crm.reserves, crm.tier) == (False, False, "free")
    assert (replay.replay, replay.tier) == (True, None)
    assert "crm-secret" not in repr(crm)  # a SecretStr


def test_the_default_file_has_the_gateway_the_replay_tool_and_a_demo_producer() -> None:
    table = ProducerTable.load(DEFAULT_PRODUCERS_FILE)
    assert table.get("gateway").reserves and not table.get("gateway").replay
    assert table.get("replay").replay
    assert not table.get("demo").replay and not table.get("demo").reserves


@pytest.mark.parametrize(
    "row",
    [
        'name = "a"\nsecret = "short"\nusers = ["*"]',
        'secret = "0123456789abcdef"\nusers = ["*"]',
        'name = "a"\nsecret = "0123456789abcdef"',
        'name = "a"\nsecret = "0123456789abcdef"\nusers = ["*"]\nreplay = "yes"',
        'name = "a"\nsecret = "0123456789abcdef"\nusers = ["*"]\nadmin = true',
    ],
    ids=["short-secret", "no-name", "no-users", "replay-not-bool", "unknown-key"],
)
def test_a_malformed_producers_file_is_a_config_error(tmp_path: Path, row: str) -> None:
    path = tmp_path / "producers.toml"
    path.write_text(f"[[producers]]\n{row}\n")
    with pytest.raises(ConfigError):
        ProducerTable.load(path)


def test_signing_as_an_unknown_producer_is_a_config_error(table: ProducerTable) -> None:
    with pytest.raises(ConfigError, match="nobody"):
        table.get("nobody")
