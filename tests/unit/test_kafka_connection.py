"""ConnectionConfig: each security setting reaches each client family under its own keys."""

from __future__ import annotations

import ssl
from pathlib import Path

import faust
import pytest
from aiokafka.abc import AbstractTokenProvider
from confluent_kafka import Producer
from pydantic import SecretStr

from pipeline.core.settings import KafkaSettings
from pipeline.kafka.connection import ConnectionConfig

SERVERS = "broker-a:9092,broker-b:9092"


def config(**fields: object) -> ConnectionConfig:
    settings = KafkaSettings(bootstrap_servers=SERVERS, **fields)  # type: ignore[arg-type]
    return ConnectionConfig.from_settings(settings)


@pytest.fixture(scope="module")
def ca_file() -> Path:
    """A real CA bundle, so the SSL contexts load it."""
    import certifi

    return Path(certifi.where())


def test_plaintext_defaults_build_exactly_the_configs_of_old() -> None:
    plain = ConnectionConfig.from_settings(KafkaSettings(bootstrap_servers=SERVERS))
    assert plain.aiokafka_options() == {"bootstrap_servers": SERVERS}
    assert plain.confluent_config(**{"log.connection.close": False}) == {
        "bootstrap.servers": SERVERS,
        "log.connection.close": False,
    }
    assert plain.faust_broker() == "kafka://broker-a:9092;kafka://broker-b:9092"
    assert plain.faust_credentials() is None
    assert plain.fetch_max_wait_ms == 50


def test_sasl_ssl_scram_maps_to_every_client_family(ca_file: Path) -> None:
    conn = config(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
        sasl_password=SecretStr("s3cret"),
        ssl_cafile=ca_file,
    )
    aio = conn.aiokafka_options()
    assert aio["security_protocol"] == "SASL_SSL"
    assert aio["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (aio["sasl_plain_username"], aio["sasl_plain_password"]) == ("svc", "s3cret")
    assert isinstance(aio["ssl_context"], ssl.SSLContext)
    assert conn.confluent_options() == {
        "bootstrap.servers": SERVERS,
        "security.protocol": "sasl_ssl",
        "ssl.ca.location": str(ca_file),
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "sasl.password": "s3cret",
    }
    credentials = conn.faust_credentials()
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert (credentials.username, credentials.password) == ("svc", "s3cret")
    assert isinstance(credentials.ssl_context, ssl.SSLContext)


def test_sasl_plaintext_plain_carries_no_tls() -> None:
    conn = config(
        security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password=SecretStr("p")
    )
    aio = conn.aiokafka_options()
    assert aio["security_protocol"] == "SASL_PLAINTEXT"
    assert aio["sasl_mechanism"] == "PLAIN"
    assert "ssl_context" not in aio
    confluent = conn.confluent_options()
    assert confluent["security.protocol"] == "sasl_plaintext"
    assert not any(key.startswith("ssl.") for key in confluent)
    credentials = conn.faust_credentials()
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_PLAINTEXT"
    assert credentials.ssl_context is None


def test_mutual_tls_passes_ca_certificate_and_key_to_every_family(tmp_path: Path) -> None:
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    conn = ConnectionConfig(
        SERVERS, security_protocol="SSL", ssl_cafile=None, ssl_certfile=cert, ssl_keyfile=key
    )
    assert conn.confluent_options() == {
        "bootstrap.servers": SERVERS,
        "security.protocol": "ssl",
        "ssl.certificate.location": str(cert),
        "ssl.key.location": str(key),
    }
    # The aiokafka and Faust contexts load the files: missing ones fail loudly, not silently.
    with pytest.raises(FileNotFoundError):
        conn.aiokafka_options()


def test_ssl_without_sasl_gives_faust_ssl_credentials(ca_file: Path) -> None:
    conn = config(security_protocol="SSL", ssl_cafile=ca_file)
    aio = conn.aiokafka_options()
    assert aio["security_protocol"] == "SSL"
    assert "sasl_mechanism" not in aio
    credentials = conn.faust_credentials()
    assert isinstance(credentials, faust.SSLCredentials)
    assert credentials.protocol.value == "SSL"


async def test_oauthbearer_sends_the_configured_token_to_every_family() -> None:
    conn = config(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="OAUTHBEARER",
        sasl_password=SecretStr("token-1"),
    )
    provider = conn.aiokafka_options()["sasl_oauth_token_provider"]
    assert isinstance(provider, AbstractTokenProvider)
    assert await provider.token() == "token-1"
    confluent = conn.confluent_options()
    assert confluent["sasl.mechanism"] == "OAUTHBEARER"
    token, _expiry = confluent["oauth_cb"]("")
    assert token == "token-1"
    credentials = conn.faust_credentials()
    assert isinstance(credentials, faust.OAuthCredentials)
    assert await credentials.oauth_cb.token() == "token-1"


def test_librdkafka_accepts_the_sasl_configuration() -> None:
    # librdkafka validates every key and value when the client is built (no connection yet).
    conn = config(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="u",
        sasl_password=SecretStr("p"),
    )
    producer = conn.confluent_producer({"acks": "all"})
    assert isinstance(producer, Producer)
    producer.flush(0)


def test_the_password_never_shows_in_the_settings_repr() -> None:
    settings = KafkaSettings(sasl_password=SecretStr("hunter2"))
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in repr(ConnectionConfig.from_settings(settings))
