"""Per-user limits (requests/min, tokens/min, monthly budget) whose state lives in Kafka.

The `quota` topic is the ledger: RESERVE, SETTLE and RELEASE records keyed by user id. Every
process that reserves (each gateway, and each worker running preprocess for requests other
systems produce) reads every partition of it (no consumer group) and applies the records in
log order to a pure ``QuotaState`` (pipeline/quota/state.py, which states the rules), which
decides each RESERVE from the records before it in its partition. All of them read the same
log with the same tier table, so they reach the same verdicts and two processes reserving for
one user never exceed the limits together.

The gateways also share one fact that is not a ledger entry on it, because the `quota` topic is
the one every gateway reads whole: ATTACHED, a client attached to a request's stream at a
gateway (a resume, a replayed POST), which makes that gateway the owner of the request's
disconnect cancel (docs/architecture.md, "Cancel on disconnect across gateways").

Who settles: the gateways, in one consumer group on `results` (gateway/admission/settle.py), so each
result is settled once its partition's settler reads it, even when the gateway that accepted
the request is gone; with the result's total tokens and cost. A gateway that fails to
produce a request releases its reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError

from pipeline.core.clock import now_ms
from pipeline.core.codec import codec
from pipeline.core.errors import (
    BrokerUnavailableError,
    CodecError,
    TopicMissingError,
    ValidationError,
)
from pipeline.core.partitioning import partition_for
from pipeline.core.settings import KafkaSettings
from pipeline.core.tiers import Tier
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.partition_tail import PartitionTail
from pipeline.quota.state import (
    Kind,
    QuotaEvent,
    QuotaState,
    UsageSummary,
    Verdict,
    month_start_ms,
)

log = logging.getLogger("sumstream.quota")


class QuotaUnavailableError(BrokerUnavailableError):
    """The ledger could not write or read its record in time (broker gone, ledger stopped)."""

    code = "quota_unavailable"


class QuotaLedger:
    """The per-user limits of every process that reserves, shared through the `quota` topic.

    Its failures are ``unavailable`` (a subclass of QuotaUnavailableError): the gateway's
    ledger raises its HTTP 503 error instead (gateway/admission/quota.py).
    """

    unavailable: type[QuotaUnavailableError] = QuotaUnavailableError

    def __init__(
        self,
        settings: KafkaSettings,
        tiers: Mapping[str, Tier],
        *,
        gateway_id: str,
        window_s: float = 60.0,
        timeout_s: float = 5.0,
        horizon_s: float = 3600.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.settings = settings
        self.tiers = tiers
        self.gateway_id = gateway_id
        self.topic = f"{settings.topic_prefix}quota"
        self._window_ms = round(window_s * 1000)
        self._horizon_ms = round(horizon_s * 1000)
        self._timeout_s = timeout_s
        self._start_timeout_s = start_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._tail: PartitionTail | None = None
        self._states: dict[int, QuotaState] = {}
        self._waiters: dict[str, asyncio.Future[Verdict | None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._ready: asyncio.Future[None] | None = None
        self._stopping = False
        # Called with (request_id, gateway id) for every ATTACHED record, in log order.
        self.on_attached: Callable[[str, str], None] | None = None

    async def __aenter__(self) -> QuotaLedger:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def ready(self) -> bool:
        return self._ready is not None and self._ready.done() and not self._ready.exception()

    async def start(self) -> None:
        """Connect, replay the month so far from every partition, then serve."""
        connection = ConnectionConfig.from_settings(self.settings)
        self._producer = connection.producer(acks="all", enable_idempotence=True, linger_ms=0)
        self._tail = PartitionTail(
            connection, name="quota-ledger", poll_timeout_ms=500, max_records=2_000
        )
        self._ready = asyncio.get_running_loop().create_future()
        try:
            await self._producer.start()
            tps = [TopicPartition(self.topic, p) for p in await self._partitions()]
            self._states = {
                tp.partition: QuotaState(
                    self.tiers, window_ms=self._window_ms, horizon_ms=self._horizon_ms
                )
                for tp in tps
            }
            # Each month of a partition starts empty (see QuotaState): replaying from the
            # month's first record reaches the state of an instance that ran all month.
            # seek_to_time reads the ends first, so a record written meanwhile is not skipped.
            await self._tail.assign(tps, since_ms=month_start_ms(now_ms()))
            self._tail.run(self._apply_batch, on_crash=self._crashed)
            self._spawn(self._announce_ready(self._tail))
            async with asyncio.timeout(self._start_timeout_s):
                await asyncio.shield(self._ready)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, KafkaError | TimeoutError):
                raise self.unavailable(f"quota ledger cannot start: {exc!r}") from exc
            raise
        log.info("quota ledger ready", extra={"topic": self.topic, "partitions": len(tps)})

    async def stop(self) -> None:
        """Stop reading and writing; callers still waiting get ``unavailable``."""
        self._stopping = True
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        # return_exceptions: a crashed task was logged already; collect it, do not re-raise.
        await asyncio.gather(*tasks, return_exceptions=True)
        self._background.clear()
        if self._tail is not None:
            await self._tail.stop()
            self._tail = None
        self._fail_waiters(self.unavailable("quota ledger stopped"))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(self.unavailable("quota ledger stopped"))
        if self._ready is not None and self._ready.done():
            self._ready.exception()  # retrieved, so asyncio does not warn about it
        if self._producer is not None:
            with contextlib.suppress(KafkaError):
                await self._producer.stop()
        self._producer = None
        self._stopping = False

    async def reserve(
        self,
        user_id: str,
        tier: str,
        request_id: str,
        tokens: int,
        *,
        idempotency_key: str | None = None,
        body_sha256: str | None = None,
    ) -> Verdict:
        """Reserve one request and ``tokens`` tokens; the log decides (see QuotaState).

        With ``idempotency_key``, a RESERVE after another live one of the user's key is refused
        as ``duplicate``, naming the request that holds it.
        """
        if tier not in self.tiers:
            raise ValidationError(f"unknown tier {tier!r}")
        if tokens < 0:
            raise ValidationError("tokens must not be negative")
        self._check_running()
        event = dataclasses.replace(
            self._event("RESERVE", user_id, tier, request_id, tokens=tokens),
            idempotency_key=idempotency_key,
            body_sha256=body_sha256,
        )
        try:
            verdict = await self._append(event)
        except QuotaUnavailableError:
            if not self._stopping:
                # The RESERVE may still land and be granted: give it back once the log is back.
                self._spawn(self._release_quietly(user_id, tier, request_id))
            raise
        assert verdict is not None
        return verdict

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
    ) -> None:
        """Replace the request's reservation by what it really used and cost."""
        await self._append(
            self._event(
                "SETTLE",
                user_id,
                tier,
                request_id,
                tokens=actual_tokens,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost_micro_usd=cost_micro_usd,
            )
        )

    async def release(self, user_id: str, tier: str, request_id: str) -> None:
        """Give back a reservation whose request never ran (e.g. producing it failed)."""
        await self._append(self._event("RELEASE", user_id, tier, request_id, requests=0))

    def attach(self, user_id: str, request_id: str) -> None:
        """Announce that a client attached to ``request_id``'s stream here (not waited for).

        Best effort: if the record is lost, the gateway a client left earlier may still cancel
        the request at the end of its grace (the window this closes).
        """
        if self._producer is None or self._stopping or not self.ready:
            return
        event = self._event("ATTACHED", user_id, "", request_id, requests=0)
        value = codec().encode("QuotaEvent", event.to_record())
        producer = self._producer

        async def send() -> None:
            try:
                async with asyncio.timeout(self._timeout_s):
                    await producer.send_and_wait(
                        self.topic, value, key=user_id.encode(), timestamp_ms=event.at
                    )
            except (KafkaError, TimeoutError) as exc:
                log.warning("attach not announced: %r", exc, extra={"request_id": request_id})

        self._spawn(send())

    def usage(self, user_id: str, tier: str | None = None) -> UsageSummary:
        """The user's figures for this month, as this instance has read them (GET /v1/usage)."""
        partition = partition_for(user_id, len(self._states)) if self._states else 0
        state = self._states.get(partition) or QuotaState(self.tiers, window_ms=self._window_ms)
        return state.usage(user_id, tier, now_ms())

    # -- internals -----------------------------------------------------------------------------

    def _event(
        self,
        kind: Kind,
        user_id: str,
        tier: str,
        request_id: str,
        *,
        tokens: int = 0,
        input_tokens: int = 0,
        output_tokens: int = 0,
        requests: int = 1,
        cost_micro_usd: int = 0,
    ) -> QuotaEvent:
        return QuotaEvent(
            event_id=uuid.uuid4().hex,
            user_id=user_id,
            kind=kind,
            request_id=request_id,
            at=now_ms(),
            tier=tier,
            tokens=tokens,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            requests=requests,
            cost_micro_usd=cost_micro_usd,
            gateway=self.gateway_id,
        )

    async def _append(self, event: QuotaEvent) -> Verdict | None:
        """Write ``event`` and wait until this instance has applied it: the log's answer."""
        self._check_running()
        assert self._producer is not None
        future: asyncio.Future[Verdict | None] = asyncio.get_running_loop().create_future()
        self._waiters[event.event_id] = future
        value = codec().encode("QuotaEvent", event.to_record())
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._producer.send_and_wait(
                    self.topic, value, key=event.user_id.encode(), timestamp_ms=event.at
                )
                return await future
        except (KafkaError, TimeoutError) as exc:
            raise self.unavailable(f"quota {event.kind} not confirmed: {exc!r}") from exc
        finally:
            self._waiters.pop(event.event_id, None)

    def _check_running(self) -> None:
        if self._producer is None or self._stopping or not self.ready:
            raise self.unavailable("quota ledger not running")

    async def _release_quietly(self, user_id: str, tier: str, request_id: str) -> None:
        event = self._event("RELEASE", user_id, tier, request_id, requests=0)
        value = codec().encode("QuotaEvent", event.to_record())
        producer = self._producer
        with contextlib.suppress(KafkaError, TimeoutError):
            async with asyncio.timeout(self._timeout_s * 6):
                if producer is not None:
                    await producer.send_and_wait(
                        self.topic, value, key=user_id.encode(), timestamp_ms=event.at
                    )

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _partitions(self) -> list[int]:
        assert self._producer is not None
        try:
            # Waits for metadata that names the topic (it may have been created a moment ago).
            async with asyncio.timeout(10):
                return sorted(await self._producer.partitions_for(self.topic))
        except (UnknownTopicOrPartitionError, TimeoutError) as exc:
            raise TopicMissingError(
                f"topic {self.topic} missing: run `sumstream topics create`"
            ) from exc

    async def _announce_ready(self, tail: PartitionTail) -> None:
        await tail.caught_up.wait()
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def _crashed(self, exc: Exception) -> None:
        # A bug, not the broker (the tail rides out broker errors): every reserve now answers 503.
        error = self.unavailable(f"quota ledger reader crashed: {exc!r}")
        self._fail_waiters(error)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)

    async def _apply_batch(self, tp: TopicPartition, messages: list[Any]) -> None:
        state = self._states[tp.partition]
        for message in messages:
            self._apply(state, message)

    def _apply(self, state: QuotaState, message: Any) -> None:
        try:
            record = codec().decode_as(message.value, "QuotaEvent")
        except CodecError as exc:
            # Every instance skips the same record, so verdicts still agree.
            log.warning(
                "undecodable quota record skipped",
                extra={"partition": message.partition, "offset": message.offset, "error": str(exc)},
            )
            return
        event = QuotaEvent.from_record(record, at=message.timestamp)
        if event.kind == "ATTACHED":
            if self.on_attached is not None:
                self.on_attached(event.request_id, event.gateway)
            return
        verdict = state.apply(event)
        future = self._waiters.get(event.event_id)
        if future is not None and not future.done():
            future.set_result(verdict)

    def _fail_waiters(self, exc: Exception) -> None:
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(exc)
        self._waiters.clear()
