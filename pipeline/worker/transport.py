"""sumstream's Faust transport: Faust's aiokafka driver with an idempotent producer, a
configurable fetch wait, and acks and gaps that cannot commit past a record nobody processed.
``StageApp`` (pipeline/worker/app.py) creates it instead of Faust's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Set
from typing import Any

from aiokafka import AIOKafkaClient
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from mode import Service
from mode.utils.queues import FlowControlEvent

from pipeline.core.errors import BrokerUnavailableError
from pipeline.kafka.compat import set_fetch_max_wait, topic_served_by_every_broker

log = logging.getLogger("sumstream.worker.transport")
# How often a new topic's metadata is asked for again while a broker has not learnt it.
TOPIC_POLL_S = 0.05


class Producer(faust_aiokafka.Producer):
    def _settings_extra(self) -> dict[str, Any]:
        # acks=all + idempotence: a retried send is never duplicated or reordered, which is
        # what keeps a request's token seq order intact across broker hiccups.
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Faust passes fetch_max_wait_ms=1500 with no setting to change it. A long wait delays
        # records that arrive while a fetch for other partitions is parked at the broker.
        set_fetch_max_wait(consumer, getattr(self.app, "fetch_max_wait_ms", 1500))
        return consumer


def ack_counts(
    tp: TP,
    generation: int | None,
    current_generation: int,
    unsettled: Set[TP],
) -> bool:
    """May an ack of a record of ``tp`` fetched in ``generation`` move the committed offset?

    Not when it was fetched before the current generation, nor while ``tp`` is revoked and not
    yet sought back to its committed offset: Faust's streams ack the events they *skip* around
    a rebalance (a stale generation, a suspended flow) as if processed, and such an ack, made
    after the revoke cleared the partition's committed offset, let the next commit jump over
    records cleared from the agents' buffers. They were never processed and never came back
    (docs/architecture.md, "Rebalances"). Refused acks only mean a redelivery after the seek.
    """
    if tp in unsettled:
        return False
    return generation is None or generation == current_generation


class Consumer(faust_aiokafka.Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Partitions revoked and not yet sought back to their committed offsets.
        self._unsettled: set[TP] = set()
        # Partitions to re-read from an offset the fetcher skipped, at the next fetch; and the
        # last offset each was re-read from (a skip that comes back is a real hole).
        self._rewind: dict[TP, int] = {}
        self._rewound: dict[TP, int] = {}

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def on_partitions_revoked(self, revoked: Set[TP]) -> None:
        self._unsettled.update(revoked)
        await super().on_partitions_revoked(revoked)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        offsets = await super().seek_to_committed()
        self._unsettled.difference_update(offsets)
        return offsets

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        """Offsets the fetcher skipped: re-read them rather than commit over them.

        Faust's drain loop takes the offsets between the last record it read and the next one
        as absent (a compacted topic, transaction markers) and lets the commit pass over them.
        The worker's input topics are neither compacted nor transactional, so every offset is a
        record, and a skip there means a fetch raced a seek around a rebalance. Committing over
        it lost records no handler had seen (docs/architecture.md, "Rebalances": the chaos
        run's two DONE events whose results were never written). The partition is re-read
        from just before the skip at the next fetch; a record delivered twice is handled
        idempotently. The same skip seen again after a re-read is a real hole: Faust's rule.
        """
        start = max(0, offset_from - 1)  # Faust's read offset after a seek is off by one
        if self._rewound.get(tp) == start:
            await super()._add_gap(tp, offset_from, offset_to)
            return
        log.warning(
            "fetch skipped offsets; re-reading them",
            extra={"topic": tp.topic, "partition": tp.partition, "from": start, "to": offset_to},
        )
        self._rewind[tp] = min(start, self._rewind.get(tp, start))

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:  # noqa: ASYNC109 (Faust's signature)
        """Faust's fetch, after re-seeking the partitions whose fetch skipped offsets."""
        while self._rewind:
            tp, offset = self._rewind.popitem()
            self._rewound[tp] = offset
            try:
                await self.seek(tp, offset)
            except Exception as exc:  # revoked meanwhile: its next owner reads from the commit
                log.warning("re-read not possible: %r", exc, extra={"partition": tp.partition})
        async for item in super().getmany(timeout):
            yield item

    def ack(self, message: Message) -> bool:
        generation = getattr(message, "generation_id", None)
        if not ack_counts(message.tp, generation, self.app.consumer_generation_id, self._unsettled):
            message.acked = True  # acked once: the stream's later acks are no-ops
            self._unacked_messages.discard(message)  # nothing for a shutdown to wait for
            return False
        return bool(super().ack(message))


class FlowControl(FlowControlEvent):
    """Faust's flow control of the agents' buffers, clearing them on a resume only when the
    flow was suspended.

    Faust's recovery resumes the flow twice after a rebalance: to read the changelogs, then
    once the stream partitions are sought back to their committed offsets. By the second
    resume the fetcher has been running again: records it fetched after the seek sit in the
    agents' buffers, already past the consumer's position, and a clear there dropped them for
    good (a follow-up queued behind a record the agent was busy with was never prepared;
    docs/architecture.md, "Rebalances"). A buffer filled while the flow runs holds fresh
    records, so only a resume from a suspension clears.
    """

    def resume(self) -> None:
        if self.is_active():
            return
        super().resume()


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
    Producer = Producer

    async def _create_topic(
        self,
        owner: Service,
        client: AIOKafkaClient,
        topic: str,
        partitions: int,
        replication: int,
        **kwargs: Any,
    ) -> None:
        """Create ``topic`` (Faust's way) and return once every broker serves it.

        Faust returns when the controller has the topic. On a cluster of several brokers the
        consumer's metadata may then come from a broker that has not learnt it yet: the group
        leader's assignor leaves the missing changelog out, and nothing assigns its partitions
        for five minutes (a chaos run's workers both came up holding no `inflight` partition).
        """
        await super()._create_topic(owner, client, topic, partitions, replication, **kwargs)
        timeout_s = kwargs.get("timeout", 30000) / 1000
        deadline = time.monotonic() + timeout_s
        while not await topic_served_by_every_broker(client, topic, partitions):
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(
                    f"topic {topic} is not served by every broker after {timeout_s:g} s"
                )
            await asyncio.sleep(TOPIC_POLL_S)
