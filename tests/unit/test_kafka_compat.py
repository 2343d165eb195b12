"""The private client APIs pipeline/kafka/compat.py and the Faust transport rely on still exist.

Each test fails loudly on a library upgrade that removes or renames what we reach into.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

from aiokafka import AIOKafkaClient, AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError
from aiokafka.protocol.metadata import MetadataRequest
from faust.transport.drivers import aiokafka as faust_aiokafka

from pipeline.kafka.compat import set_fetch_max_wait, topic_served_by_every_broker
from pipeline.worker import transport


async def test_aiokafka_keeps_the_fetch_wait_in_the_attribute_compat_sets() -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=1500)
    try:
        assert consumer._fetch_max_wait_ms == 1500
        set_fetch_max_wait(consumer, 50)
        assert consumer._fetch_max_wait_ms == 50
    finally:
        await consumer.stop()  # never started: only marks it closed


def test_aiokafka_hands_the_attribute_to_its_fetcher_at_start() -> None:
    # The value only matters if start() still builds the fetcher from it.
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in inspect.getsource(AIOKafkaConsumer.start)


def test_faust_still_has_the_hooks_the_transport_overrides() -> None:
    for cls, name in (
        (faust_aiokafka.AIOKafkaConsumerThread, "_create_worker_consumer"),
        (faust_aiokafka.Consumer, "_new_consumer_thread"),
        (faust_aiokafka.Producer, "_settings_extra"),
    ):
        assert callable(getattr(cls, name, None)), f"faust {cls.__name__}.{name} is gone"
    assert issubclass(transport.Transport, faust_aiokafka.Transport)


def test_faust_still_hard_codes_the_wait_compat_overrides() -> None:
    # If Faust gains a setting for it, use that and drop set_fetch_max_wait.
    source = inspect.getsource(faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer)
    assert "fetch_max_wait_ms=1500" in source


def test_aiokafka_and_faust_keep_what_the_topic_wait_uses() -> None:
    # topic_served_by_every_broker sends aiokafka's own Metadata request to each broker, and
    # the transport wraps Faust's _create_topic with the arguments it has today.
    assert "allow_auto_topic_creation" in inspect.signature(MetadataRequest).parameters
    assert callable(getattr(AIOKafkaClient, "send", None))
    params = list(inspect.signature(faust_aiokafka.Transport._create_topic).parameters)
    assert params[:6] == ["self", "owner", "client", "topic", "partitions", "replication"]


async def test_a_broker_that_does_not_answer_counts_as_not_serving_and_refreshes_metadata() -> None:
    class DeadBrokerClient:
        """A client whose metadata still names a broker that has died."""

        def __init__(self) -> None:
            self.cluster = SimpleNamespace(brokers=lambda: [SimpleNamespace(nodeId=3)])
            self.refreshed = 0

        async def send(self, node_id: int, request: object) -> object:
            raise KafkaConnectionError(f"node {node_id}: connection refused")

        async def force_metadata_update(self) -> bool:
            self.refreshed += 1
            return True

    client = DeadBrokerClient()
    served = await topic_served_by_every_broker(client, "t", 6)  # type: ignore[arg-type]
    assert served is False
    assert client.refreshed == 1  # the next look no longer lists a fenced broker
