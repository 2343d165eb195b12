"""The test process's keyring: it reads every ``keys`` topic on the broker when a record names
a data key it does not know, so tests decode the sealed records real processes wrote
(docs/architecture.md, "Forgetting")."""

from __future__ import annotations

import time
import uuid
from typing import cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

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

    def end_of_test(self) -> None:
        """No user has a current key any more (each still opens): a key an in-process
        gateway of one test made for "alice" must not seal the text of the next test's
        "alice", whose stages run without keys."""
        self._by_user.clear()

    def fetch(self) -> None:
        """Read every ``*keys`` topic to its end, all partitions at once."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"keys-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
            }
        )
        try:
            topics = consumer.list_topics(timeout=10).topics
            ends: dict[tuple[str, int], int] = {}
            for name, meta in topics.items():
                if not name.endswith("keys"):
                    continue
                for p in meta.partitions:
                    low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)
                    if high > low:
                        ends[(name, p)] = high
            if ends:
                consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in ends])
                self._read(consumer, ends)
        finally:
            consumer.close()

    def _read(self, consumer: Consumer, ends: dict[tuple[str, int], int]) -> None:
        wanted = set(ends)
        deadline = time.monotonic() + 30
        while wanted and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.2):
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                if msg.error() or topic is None or partition is None or offset is None:
                    continue
                user_id, _, key_id = (msg.key() or b"").decode().rpartition("/")
                value = msg.value()
                if value is None:
                    self.shred(user_id, key_id)
                else:
                    record = cast(DataKey, codec().decode_as(value, "DataKey"))
                    self.add(record["user_id"], record["key_id"], record["key"])
                if offset + 1 >= ends[(topic, partition)]:
                    wanted.discard((topic, partition))


def install(bootstrap: str) -> BrokerKeyring:
    """Make ``BrokerKeyring`` the process keyring (codec, stages and gateways run in-process)."""
    ring = BrokerKeyring(bootstrap)
    sealing.keyring = lambda: ring  # type: ignore[assignment]
    return ring
