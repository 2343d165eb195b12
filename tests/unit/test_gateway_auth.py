from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.http.auth import KeyStore, Principal, hash_key, load_keys_file
from gateway.http.errors import Unauthorized
from gateway.settings import GatewaySettings
from pipeline.core.settings import REPO_ROOT


def test_keys_files_in_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "keys.toml"
    toml.write_text(f'[[keys]]\nsha256 = "{hash_key("k1")}"\nuser = "alice"\ntier = "pro"\n')
    js = tmp_path / "keys.json"
    js.write_text(json.dumps({"keys": [{"sha256": hash_key("k2"), "user": "bob"}]}))
    assert load_keys_file(toml) == [(hash_key("k1"), Principal("alice", "pro"))]
    assert load_keys_file(js) == [(hash_key("k2"), Principal("bob", "free"))]


def test_the_example_keys_file_loads() -> None:
    store = KeyStore(load_keys_file(REPO_ROOT / "config" / "keys.example.toml"))
    assert store.authenticate("demo-pro-key") == Principal("bob", "pro")
    assert store.tiers == {"free", "pro", "enterprise"}


@pytest.mark.parametrize(
    "row",
    [{"user": "x"}, {"sha256": "abc", "user": "x"}, {"sha256": "z" * 64, "user": "x"}],
)
def test_malformed_rows_are_rejected(tmp_path: Path, row: dict[str, str]) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [row]}))
    with pytest.raises(ValueError):
        load_keys_file(path)


def test_settings_combine_the_file_and_the_dev_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nsha256 = "{hash_key("k1")}"\nuser = "alice"\n')
    store = KeyStore.from_settings(GatewaySettings(keys_file=path, dev_api_key="devkey"))
    assert store.authenticate("k1") == Principal("alice", "free")
    assert store.authenticate("devkey") == Principal("dev", "pro")
    assert store.authenticate("k2") is None
    missing = KeyStore.from_settings(GatewaySettings(keys_file=tmp_path / "none", dev_api_key=None))
    assert len(missing) == 0


def test_header_parsing() -> None:
    store = KeyStore([(hash_key("k1"), Principal("alice", "pro"))])
    assert store.authenticate_header("Bearer k1") == Principal("alice", "pro")
    assert store.authenticate_header("bearer   k1 ") == Principal("alice", "pro")
    for header in (None, "", "Bearer", "Token k1", "Bearer k2"):
        with pytest.raises(Unauthorized):
            store.authenticate_header(header)
