"""One connection config from which every Kafka client of the project is built.

aiokafka producers and consumers, confluent-kafka producers, consumers and admin clients, and
the Faust app all take their address and security options (TLS, SASL) from ``ConnectionConfig``,
so pointing sumstream at a managed cluster is a matter of ``SUMSTREAM_*`` settings. With the
plaintext defaults each factory produces exactly the client configuration the project always had.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider
from aiokafka.helpers import create_ssl_context
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from faust.types.auth import CredentialsT
from pydantic import SecretStr

from pipeline.core.settings import KafkaSettings
from pipeline.core.sizes import DEFAULT_MAX_RECORD_BYTES, RecordSizes

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
# librdkafka asks for a fresh token this long after handing one out; a static one is reused.
_TOKEN_LIFETIME_S = 3_600.0


class StaticTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """An OAUTHBEARER token provider for aiokafka and Faust that returns one configured token."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token


@dataclass(frozen=True)
class ConnectionConfig:
    """Where the cluster is and how to authenticate to it; builds every client family."""

    bootstrap_servers: str
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    fetch_max_wait_ms: int = 50
    # Producers' request size and consumers' fetch size derive from it (pipeline/core/sizes.py).
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES

    @classmethod
    def from_settings(cls, settings: KafkaSettings) -> ConnectionConfig:
        return cls(
            bootstrap_servers=settings.bootstrap_servers,
            security_protocol=settings.security_protocol,
            sasl_mechanism=settings.sasl_mechanism,
            sasl_username=settings.sasl_username,
            sasl_password=settings.sasl_password,
            ssl_cafile=settings.ssl_cafile,
            ssl_certfile=settings.ssl_certfile,
            ssl_keyfile=settings.ssl_keyfile,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            max_record_bytes=settings.max_record_bytes,
        )

    @property
    def sizes(self) -> RecordSizes:
        """The size limits every client is built with."""
        return RecordSizes(self.max_record_bytes)

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def _password(self) -> str:
        return self.sasl_password.get_secret_value() if self.sasl_password is not None else ""

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of aiokafka and Faust clients; None without TLS."""
        if not self.uses_tls:
            return None
        context: ssl.SSLContext = create_ssl_context(
            cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
        )
        return context

    # -- aiokafka -------------------------------------------------------------------------------

    def aiokafka_options(self) -> dict[str, Any]:
        """Address and security keyword arguments of an aiokafka client."""
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers}
        if self.security_protocol == "PLAINTEXT":
            return options  # aiokafka's defaults: the exact configuration of old
        options["security_protocol"] = self.security_protocol
        if self.uses_tls:
            options["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            options["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_mechanism == "OAUTHBEARER":
                options["sasl_oauth_token_provider"] = StaticTokenProvider(self._password())
            else:
                options["sasl_plain_username"] = self.sasl_username
                options["sasl_plain_password"] = self._password()
        return options

    def consumer(self, **options: Any) -> AIOKafkaConsumer:
        """An aiokafka consumer (not started); ``options`` are its other keyword arguments."""
        options.setdefault("max_partition_fetch_bytes", self.sizes.fetch_bytes)
        return AIOKafkaConsumer(**self.aiokafka_options(), **options)

    def producer(self, **options: Any) -> AIOKafkaProducer:
        """An aiokafka producer (not started); ``options`` are its other keyword arguments."""
        options.setdefault("max_request_size", self.sizes.producer_request_bytes)
        return AIOKafkaProducer(**self.aiokafka_options(), **options)

    # -- confluent-kafka ------------------------------------------------------------------------

    def confluent_options(self) -> dict[str, Any]:
        """Address and security keys of a librdkafka (confluent-kafka) client configuration."""
        options: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        if self.security_protocol == "PLAINTEXT":
            return options
        options["security.protocol"] = self.security_protocol.lower()
        if self.uses_tls:
            for key, path in (
                ("ssl.ca.location", self.ssl_cafile),
                ("ssl.certificate.location", self.ssl_certfile),
                ("ssl.key.location", self.ssl_keyfile),
            ):
                if path is not None:
                    options[key] = str(path)
        if self.uses_sasl:
            options["sasl.mechanism"] = self.sasl_mechanism
            if self.sasl_mechanism == "OAUTHBEARER":
                token = self._password()
                options["oauth_cb"] = lambda _config: (token, time.time() + _TOKEN_LIFETIME_S)
            else:
                options["sasl.username"] = self.sasl_username or ""
                options["sasl.password"] = self._password()
        return options

    def confluent_config(self, **options: Any) -> dict[str, Any]:
        """A full confluent-kafka configuration: ours plus ``options`` (dotted keys)."""
        return {**self.confluent_options(), **options}

    def confluent_producer(self, options: dict[str, Any] | None = None) -> Producer:
        """A librdkafka producer whose largest message is the deployment's record limit."""
        limits = {"message.max.bytes": self.sizes.producer_request_bytes}
        return Producer(self.confluent_config(**{**limits, **(options or {})}))

    def confluent_consumer(self, options: dict[str, Any] | None = None) -> Consumer:
        """A librdkafka consumer that fetches at least one whole record of any topic."""
        limits = {"max.partition.fetch.bytes": self.sizes.fetch_bytes}
        return Consumer(self.confluent_config(**{**limits, **(options or {})}))

    def admin_client(self, options: dict[str, Any] | None = None) -> AdminClient:
        """An AdminClient (no close needed: librdkafka frees it on GC)."""
        return AdminClient(self.confluent_config(**(options or {})))

    # -- Faust ----------------------------------------------------------------------------------

    def faust_broker(self) -> str:
        """The ``broker`` argument of a Faust app: one ``kafka://`` URL per bootstrap server."""
        return ";".join(f"kafka://{b.strip()}" for b in self.bootstrap_servers.split(","))

    def faust_credentials(self) -> CredentialsT | None:
        """The Faust app's ``broker_credentials``; None (Faust's default) for plaintext."""
        context = self.ssl_context()
        if not self.uses_sasl:
            return faust.SSLCredentials(context) if context is not None else None
        if self.sasl_mechanism == "OAUTHBEARER":
            return faust.OAuthCredentials(
                oauth_cb=StaticTokenProvider(self._password()), ssl_context=context
            )
        return faust.SASLCredentials(
            username=self.sasl_username,
            password=self._password(),
            ssl_context=context,
            mechanism=self.sasl_mechanism,
        )
