"""The test process's keyring: it reads every ``keys`` topic on the broker when a record names
a data key it does not know, so tests decode the sealed records real processes wrote
(docs/architecture.md, "Forgetting")."""

from __future__ import annotations

import uuid
from typing import cast

from confluent_kafka import Consumer, TopicPartition

from pipeline.core import sealing
from pipeline.core.codec import codec
from pipeline.core.records import DataKey
from pipeline.core.sealing import Keyring, KeyUnknownError


class BrokerKeyring(Keyring):
    """A keyring that fetches every key (and tombstone) of every ``*keys`` topic on a miss."""

    def __init__(self, bootstrap: str) -> None:
        super().__init__()
        self.bootstrap = bootstrap

    def open(self, text: str) -> str:
        try:
            return super().open(text)
        except KeyUnknownError:
            self.fetch()
            return super().open(text)

    def fetch(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"keys-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
            }
        )
        try:
            names = [t for t in consumer.list_topics(timeout=10).topics if t.endswith("keys")]
            for topic in names:
                self._read(consumer, topic)
        finally:
            consumer.close()

    def _read(self, consumer: Consumer, topic: str) -> None:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        wanted = {p for p, end in ends.items() if end > 0}
        if not wanted:
            return
        consumer.assign([TopicPartition(topic, p, 0) for p in wanted])
        while wanted:
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                partition, offset = msg.partition(), msg.offset()
                if msg.error() or partition is None or offset is None:
                    continue
                user_id, _, key_id = (msg.key() or b"").decode().rpartition("/")
                value = msg.value()
                if value is None:
                    self.shred(user_id, key_id)
                else:
                    record = cast(DataKey, codec().decode_as(value, "DataKey"))
                    self.add(record["user_id"], record["key_id"], record["key"])
                if offset + 1 >= ends[partition]:
                    wanted.discard(partition)


def install(bootstrap: str) -> BrokerKeyring:
    """Make ``BrokerKeyring`` the process keyring (codec, stages and gateways run in-process)."""
    ring = BrokerKeyring(bootstrap)
    sealing.keyring = lambda: ring  # type: ignore[assignment]
    return ring
