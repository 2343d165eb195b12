"""Every use of a Kafka client library's private API, in one place.

Where neither aiokafka nor Faust offers a public way to do what sumstream needs, the private
access lives here, with why, and tests/unit/test_kafka_compat.py fails loudly when an upgrade
removes it.
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer


def set_fetch_max_wait(consumer: AIOKafkaConsumer, ms: int) -> None:
    """Set the fetch wait of a consumer that was built elsewhere (not yet started).

    Faust's aiokafka driver builds its worker consumer with ``fetch_max_wait_ms=1500`` and no
    setting to change it. aiokafka keeps the constructor argument in ``_fetch_max_wait_ms``
    and hands it to its fetcher in ``start()``, so setting it before the start takes effect.
    """
    consumer._fetch_max_wait_ms = ms
