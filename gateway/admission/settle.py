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
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from gateway.admission.quota import month_start_ms
from gateway.metrics import SETTLED
from pipeline.core.codec import codec
from pipeline.core.errors import CodecError

log = logging.getLogger("sumstream.gateway.settle")

RETRY_S = 1.0


class Settler(Protocol):
    """What settling needs of the quota ledger (gateway/admission/quota.py ``QuotaLedger``)."""

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


class _StartPositions(ConsumerRebalanceListener):  # type: ignore[misc]
    """A partition the group never committed starts ``backfill_s`` back (within the month)."""

    def __init__(self, consumer: AIOKafkaConsumer, backfill_s: float) -> None:
        self.consumer = consumer
        self.backfill_s = backfill_s

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        fresh = [tp for tp in assigned if await self.consumer.committed(tp) is None]
        if not fresh:
            return
        now_ms = int(time.time() * 1000)
        since = max(month_start_ms(now_ms), now_ms - int(self.backfill_s * 1000))
        # Ends first: a result written between the two calls is then either found by time or
        # lies after the end we fall back to, never skipped.
        ends = await self.consumer.end_offsets(fresh)
        found = await self.consumer.offsets_for_times(dict.fromkeys(fresh, since))
        for tp in fresh:
            hit = found.get(tp)
            self.consumer.seek(tp, hit.offset if hit is not None else ends[tp])


class ResultSettler:
    """Reads `results` in the settle group and SETTLEs each one in the ledger."""

    def __init__(
        self,
        bootstrap_servers: str,
        results_topic: str,
        group_id: str,
        ledger: Settler,
        *,
        backfill_s: float = 3_600.0,
        on_settled: Callable[[str], None] | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = results_topic
        self.group_id = group_id
        self.ledger = ledger
        self.backfill_s = backfill_s
        self._on_settled = on_settled
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=200,
        )
        await consumer.start()
        consumer.subscribe([self.topic], listener=_StartPositions(consumer, self.backfill_s))
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(consumer), name="gateway-settle")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            with contextlib.suppress(KafkaError):
                await self._consumer.stop()
            self._consumer = None

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1_000, max_records=500)
            except KafkaError as exc:
                log.warning("settle fetch failed: %s", exc)
                await asyncio.sleep(RETRY_S)
                continue
            for tp, messages in batches.items():
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
                results.append(codec().decode_as(message.value, "SummaryResult"))
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
