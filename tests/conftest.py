"""Fixtures shared by every test directory: the broker, private topic names, group ids.

Integration tests run in parallel with other runs against one broker, so each test gets its
own topic prefix (``t-<8 hex>.``) and consumer group, and its topics are deleted afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.admin import create_topics, delete_topics
from pipeline.ops.broker import is_reachable
from tests.harness.keys import BrokerKeyring
from tests.harness.keys import install as install_keyring


def unique(prefix: str) -> str:
    """A name no other test or run uses: ``<prefix>-<8 hex>``."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def bootstrap() -> str:
    """The broker address (SUMSTREAM_BOOTSTRAP_SERVERS); fails when no broker answers."""
    servers = KafkaSettings().bootstrap_servers
    if not is_reachable(servers, timeout_s=5.0):
        pytest.fail(
            f"no Kafka broker answers at {servers}: run ./scripts/test (it starts one) "
            "or `.venv/bin/sumstream broker start`"
        )
    return servers


@pytest.fixture(scope="session", autouse=True)
def broker_keyring() -> BrokerKeyring:
    """Records real processes sealed decode here too (tests/harness/keys.py)."""
    return install_keyring(KafkaSettings().bootstrap_servers)


@pytest.fixture(autouse=True)
def keys_of_this_test_only(broker_keyring: BrokerKeyring) -> Iterator[None]:
    """Keys made by a test's in-process parts seal that test's text only."""
    yield
    broker_keyring.end_of_test()


@pytest.fixture
def kafka_settings(bootstrap: str) -> KafkaSettings:
    """Settings with a topic prefix of this test's own."""
    return KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=unique("t") + ".")


@pytest.fixture
def group_id() -> str:
    """A consumer group id of this test's own."""
    return unique("g")


@pytest.fixture
def make_topics(kafka_settings: KafkaSettings) -> Iterator[Callable[..., TopicNames]]:
    """Create the declared topics (for ``kafka_settings`` or given settings); delete them after.

    ``make_topics(stream_partitions=2)`` overrides settings fields for smaller topics.
    """
    made: list[KafkaSettings] = []

    def make(settings: KafkaSettings | None = None, **overrides: Any) -> TopicNames:
        chosen = settings if settings is not None else kafka_settings
        if overrides:
            chosen = chosen.model_copy(update=overrides)
        made.append(chosen)
        create_topics(chosen)
        return TopicNames.from_settings(chosen)

    yield make
    for settings in made:
        delete_topics(settings)
