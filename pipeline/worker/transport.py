"""sumstream's Faust transport: Faust's aiokafka driver with an idempotent producer and a
configurable fetch wait. ``StageApp`` (pipeline/worker/app.py) creates it instead of Faust's own.
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

from pipeline.kafka.compat import set_fetch_max_wait


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


class Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
    Producer = Producer
