"""Every use of a Kafka client library's private API, in one place.

Where neither aiokafka nor Faust offers a public way to do what sumstream needs, the private
access lives here, with why, and tests/unit/test_kafka_compat.py fails loudly when an upgrade
removes it.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaClient, AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest

# How long one broker may take to answer a Metadata request before it counts as not serving.
ANSWER_S = 5.0


def set_fetch_max_wait(consumer: AIOKafkaConsumer, ms: int) -> None:
    """Set the fetch wait of a consumer that was built elsewhere (not yet started).

    Faust's aiokafka driver builds its worker consumer with ``fetch_max_wait_ms=1500`` and no
    setting to change it. aiokafka keeps the constructor argument in ``_fetch_max_wait_ms``
    and hands it to its fetcher in ``start()``, so setting it before the start takes effect.
    """
    consumer._fetch_max_wait_ms = ms


async def topic_served_by_every_broker(client: AIOKafkaClient, topic: str, partitions: int) -> bool:
    """True when each broker's own metadata has ``topic`` with ``partitions`` partitions, each
    with a leader.

    A CreateTopics answer means the controller has the topic; each broker learns it from the
    metadata log a moment later. A consumer that asks a broker which has not yet learnt it
    takes the topic as missing until its next refresh (``metadata_max_age_ms``, 5 minutes),
    and Faust's assignor leaves such a topic out of every assignment until then. aiokafka's
    client asks one broker at a time, so this sends the Metadata request to each broker itself
    (``client.send`` with aiokafka's protocol classes, which are not a public API).
    """
    request = MetadataRequest([topic], allow_auto_topic_creation=False)
    for broker in client.cluster.brokers():
        try:
            response = await asyncio.wait_for(client.send(broker.nodeId, request), ANSWER_S)
        except (KafkaError, TimeoutError):
            # A broker that died after the client's metadata named it: the cluster fences it
            # within its session timeout, and a fresh metadata no longer lists it.
            await client.force_metadata_update()
            return False
        found = [entry for entry in response.topics if entry[1] == topic]
        if not found or found[0][0] != 0:  # the topic's error code
            return False
        served = [p for p in found[0][-1] if p[0] == 0 and p[2] >= 0]  # no error, a leader
        if len(served) != partitions:
            return False
    return True
