"""Settling: every result's real usage and cost go into the quota ledger.

The gateways form one consumer group on `results` (``GatewaySettings.settle_group``): each
partition has one settler at a time, and the partitions of a gateway that dies move to the
others, which go on from the committed offsets. So a request is settled even when the gateway
that accepted it is gone before its result (H8's open point: the ledger must not depend on
one process's memory). An offset is committed only once its SETTLEs are in the ledger: each
result is settled at least once, and a second SETTLE of a request replaces the first.

A result of a request no gateway reserved (produced straight onto `requests` by another
system) is billed to its user all the same: the ledger counts it at the SETTLE's time.
Replays (``replay_of`` set) are not billed to the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from gateway.metrics import SETTLED
from pipeline.core.clock import now_ms
from pipeline.core.codec import codec
from pipeline.core.errors import CodecError
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.partition_tail import PartitionTail
from pipeline.quota.state import month_start_ms

log = logging.getLogger("sumstream.gateway.settle")

RETRY_S = 1.0


class Settler(Protocol):
    """What settling needs of the quota ledger (pipeline/quota/ledger.py ``QuotaLedger``)."""

    async def settle(
        self,
        user_id: str,
        tier: str,
        request_id: str,
        actual_tokens: int,
        cost_micro_usd: int,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> None: ...


async def settle_result(ledger: Settler, result: Mapping[str, Any]) -> bool:
    """SETTLE one SummaryResult; False when there is nobody to bill: no user, or a replay
    (`sumstream replay rerun` is an operator's shadow test, not the user's spending)."""
    user_id = str(result.get("user_id") or "")
    if not user_id or result.get("replay_of") or result.get("source") == "replay":
        return False
    usage = result.get("usage") or {}
    input_tokens = int(usage.get("input_tokens") or 0)
    output_tokens = int(usage.get("output_tokens") or 0)
    await ledger.settle(
        user_id,
        str(result.get("tier") or ""),
        str(result["request_id"]),
        input_tokens + output_tokens,
        int(usage.get("cost_micro_usd") or 0),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )
    return True


class ResultSettler:
    """Reads `results` in the settle group and SETTLEs each one in the ledger."""

    def __init__(
        self,
        connection: ConnectionConfig,
        results_topic: str,
        group_id: str,
        ledger: Settler,
        *,
        backfill_s: float = 3_600.0,
        on_settled: Callable[[str], None] | None = None,
    ) -> None:
        self.connection = connection
        self.topic = results_topic
        self.group_id = group_id
        self.ledger = ledger
        self.backfill_s = backfill_s
        self._on_settled = on_settled
        self._tail: PartitionTail | None = None

    async def start(self) -> None:
        tail = PartitionTail(
            self.connection,
            name="gateway-settle",
            group_id=self.group_id,
            max_records=500,
            retry_s=RETRY_S,
        )
        # A partition the group never committed starts ``backfill_s`` back (within the month).
        await tail.subscribe([self.topic], since_ms=self._backfill_start)
        self._tail = tail
        tail.run(self._settle_or_retry)

    async def stop(self) -> None:
        if self._tail is not None:
            await self._tail.stop()
            self._tail = None

    def _backfill_start(self) -> int:
        now = now_ms()
        return max(month_start_ms(now), now - int(self.backfill_s * 1000))

    async def _settle_or_retry(self, tp: TopicPartition, messages: list[Any]) -> None:
        assert self._tail is not None
        consumer = self._tail.consumer
        try:
            await self._settle_batch(consumer, tp, messages)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not committed: read again from the batch's first record and retry.
            log.warning(
                "settle failed; retrying",
                extra={"partition": tp.partition, "error": repr(exc)},
            )
            SETTLED.labels("retry").inc()
            with contextlib.suppress(KafkaError, AssertionError, ValueError):
                consumer.seek(tp, messages[0].offset)
            await asyncio.sleep(RETRY_S)

    async def _settle_batch(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, messages: list[Any]
    ) -> None:
        results: list[dict[str, Any]] = []
        for message in messages:
            try:
                results.append(codec().decode_as(message.value, "SummaryResult", opened=False))
            except CodecError:
                SETTLED.labels("undecodable").inc()  # postprocess is the only writer; skip
        outcomes = await asyncio.gather(
            *(settle_result(self.ledger, r) for r in results), return_exceptions=True
        )
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            raise failed[0]
        for result, settled in zip(results, outcomes, strict=True):
            SETTLED.labels("settled" if settled else "not_billed").inc()
            if self._on_settled is not None:
                self._on_settled(str(result["request_id"]))
        try:
            await consumer.commit({tp: messages[-1].offset + 1})
        except KafkaError as exc:
            # A rebalance moved the partition: its new settler settles these again, which
            # replaces the same figures.
            log.info("settle commit failed: %s", exc, extra={"partition": tp.partition})
