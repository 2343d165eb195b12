"""The gateway's moving parts in one place: producer, hub, request index, admission.

Routes call this object; it owns every Kafka client and background task of the process
(producer, stream hub, request index, quota ledger, result settler, lag monitor) and closes
them in ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncGenerator, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, cast

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from gateway.admission.backpressure import LagMonitor, QueueWaitEstimator
from gateway.admission.controller import Admission, Degradation, prompt_overhead_tokens
from gateway.admission.idempotency import RequestIndex, RequestOwner
from gateway.admission.quota import QuotaLedger
from gateway.admission.quota_state import UsageSummary
from gateway.admission.settle import ResultSettler
from gateway.http.auth import KeyStore, Principal
from gateway.http.errors import BrokerUnavailable, NotReady, PayloadTooLarge, Unauthorized
from gateway.http.models import SummaryIn
from gateway.metrics import CANCELS
from gateway.settings import GatewaySettings
from gateway.streams.hub import TERMINAL_KINDS, StreamHub, Subscriber
from gateway.streams.ids import mint_request_id, owned_partitions
from pipeline.core.codec import codec
from pipeline.core.errors import TopicMissingError
from pipeline.core.tiers import Tier
from pipeline.core.topics import TopicNames, declared_topics
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.lag import STAGE_TOPICS
from pipeline.kafka.tail import id_time_ms, read_request_records
from pipeline.llm.extractive import count_tokens

log = logging.getLogger("sumstream.gateway")

# Counting tokens is linear in the document; past this size it leaves the event loop.
COUNT_IN_THREAD_BYTES = 256 * 1024


async def _log_reader(*args: Any, **kwargs: Any) -> AsyncGenerator[dict[str, Any], None]:
    """pipeline.kafka.tail's reader; a broker that cannot be read is a retriable 503."""
    records = cast(AsyncGenerator[dict[str, Any], None], read_request_records(*args, **kwargs))
    async with contextlib.aclosing(records):
        try:
            async for record in records:
                yield record
        except (KafkaError, TopicMissingError) as exc:
            raise BrokerUnavailable("could not read the log", retry_after_s=1) from exc


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Accepted:
    """A request this gateway accepted, or found again by its Idempotency-Key."""

    request_id: str
    replay: bool
    queue_position: int
    estimated_wait_s: float
    degraded: str | None = None


@dataclass
class StreamSource:
    """Where one SSE stream reads from: the hub's memory or a reader of the log."""

    subscriber: Subscriber
    kind: str  # "memory" | "log"
    task: asyncio.Task[None] | None = None

    def close(self, hub: StreamHub) -> None:
        if self.task is not None:
            self.task.cancel()
        else:
            hub.unsubscribe(self.subscriber)
        self.subscriber.close("closed")


class Gateway:
    """One gateway instance: instance ``settings.instance_index`` of ``instance_count``."""

    def __init__(
        self, settings: GatewaySettings, keys: KeyStore, tiers: Mapping[str, Tier]
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.tiers = tiers
        self.topics = TopicNames.from_settings(settings)
        degradation = Degradation(settings.degrade_model, settings.degrade_output_ratio)
        self.estimator = QueueWaitEstimator(
            min_rate_per_s=settings.min_throughput_per_s,
            stale_after_s=settings.lag_stale_after_s,
            degrade_policy="degrade" if degradation.enabled else None,
            degrade_ratio=settings.degrade_at,
        )
        self.ledger = QuotaLedger(
            settings,
            tiers,
            gateway_id=f"{socket.gethostname()}/{settings.instance_index}/{os.getpid()}",
            timeout_s=settings.quota_timeout_s,
            start_timeout_s=settings.quota_start_timeout_s,
        )
        self.admission = Admission(
            tiers,
            self.estimator,
            self.ledger,
            max_inflight=settings.max_inflight,
            degradation=degradation,
        )
        self.connection = ConnectionConfig.from_settings(settings)
        self.settler = ResultSettler(
            self.connection,
            self.topics.results,
            settings.settle_group,
            self.ledger,
            backfill_s=settings.settle_backfill_s,
            on_settled=self.admission.finished,
        )
        self.monitor: LagMonitor | None = None
        self.hub = StreamHub(
            buffer_events=settings.stream_buffer_events,
            client_queue_events=settings.client_queue_events,
            max_streams=settings.max_tracked_streams,
            finished_retention_s=settings.finished_retention_s,
            on_result=self._on_result,
        )
        self.index = RequestIndex(
            window_s=settings.idempotency_window_s, max_entries=settings.max_index_entries
        )
        self.producer: AIOKafkaProducer | None = None
        self.partitions = 0
        self.owned: frozenset[int] = frozenset()
        self.started = False
        self._open_streams: Counter[str] = Counter()
        self._cancel_timers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, read the stream partition count, and start the hub and the index."""
        s = self.settings
        producer = self.connection.producer(
            acks="all", enable_idempotence=True, linger_ms=s.producer_linger_ms
        )
        await producer.start()
        self.producer = producer
        try:
            counts = await self._partition_counts(producer)
            if not all(counts.values()):
                missing = [t for t, n in counts.items() if not n]
                raise TopicMissingError(f"missing topics {missing}: run `sumstream topics create`")
            requests_partitions = counts.pop(self.topics.requests)
            if len(set(counts.values())) != 1:
                raise TopicMissingError(
                    f"tokens and results must share a partition count: {counts}"
                )
            # Metadata for the topics it writes, and the schemas, now: not on the first POST.
            for topic in (self.topics.requests, self.topics.control):
                await producer.partitions_for(topic)
            codec()
            self.partitions = counts[self.topics.tokens]
            self.owned = owned_partitions(s.instance_index, s.instance_count, self.partitions)
            await self.hub.start(
                self.connection, self.topics.tokens, self.topics.results, self.owned
            )
            await self.index.start(self.connection, self.topics.requests, requests_partitions)
            # The month so far is replayed from `quota` before the first admission.
            await self.ledger.start()
            await self.settler.start()
            groups = dict.fromkeys(STAGE_TOPICS, s.app_id)
            self.monitor = LagMonitor.from_settings(
                s, self.estimator, groups, interval_s=s.lag_interval_s
            )
            await self.monitor.start()
        except BaseException:
            await self.stop()
            raise
        self.started = True
        log.info(
            "gateway started",
            extra={
                "instance": s.instance_index,
                "instances": s.instance_count,
                "owned_partitions": sorted(self.owned),
            },
        )

    async def _partition_counts(self, producer: AIOKafkaProducer) -> dict[str, int]:
        # Topics created a moment ago (by `sumstream up` or a test) take a little while to
        # show up in metadata with leaders; wait for them rather than fail at once.
        deadline = time.monotonic() + self.settings.startup_wait_s
        while True:
            cluster = await producer.client.fetch_all_metadata()
            counts: dict[str, int] = {}
            for topic in (self.topics.tokens, self.topics.results, self.topics.requests):
                partitions = cluster.partitions_for_topic(topic) or set()
                led = [
                    p
                    for p in partitions
                    if cluster.leader_for_partition(TopicPartition(topic, p)) not in (None, -1)
                ]
                counts[topic] = len(partitions) if len(led) == len(partitions) else 0
            if all(counts.values()) or time.monotonic() > deadline:
                return counts
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        self.started = False
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.monitor is not None:
            await self.monitor.stop()
            self.monitor = None
        await self.settler.stop()
        await self.ledger.stop()
        await self.hub.stop()
        await self.index.stop()
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background task the gateway cancels and awaits on stop."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def readiness(self) -> dict[str, Any]:
        """Broker reachable, every declared topic present, request index and ledger rebuilt."""
        checks: dict[str, Any] = {
            "started": self.started,
            "index_ready": self.index.ready.is_set(),
            "quota_ready": self.ledger.ready,
            # Informational: without lag figures admission fails open, it does not stop.
            "lag_sampled": self.monitor is not None and self.monitor.last_error is None,
        }
        if self.producer is None:
            return {"ready": False, **checks, "broker": False}
        try:
            cluster = await asyncio.wait_for(self.producer.client.fetch_all_metadata(), 2.0)
        except (KafkaError, TimeoutError) as exc:
            return {"ready": False, **checks, "broker": False, "error": type(exc).__name__}
        present = cluster.topics()
        missing = [
            spec.name(self.settings.topic_prefix)
            for spec in declared_topics(self.settings)
            if spec.name(self.settings.topic_prefix) not in present
        ]
        ready = self.started and checks["index_ready"] and checks["quota_ready"] and not missing
        return {"ready": ready, **checks, "broker": True, "missing_topics": missing}

    # -- accepting a request --------------------------------------------------------------------

    def tier_of(self, principal: Principal) -> Tier:
        tier = self.tiers.get(principal.tier)
        if tier is None:
            # A key mapped to a tier the tier file does not define: a configuration error
            # that must not look like a bad key to the client, nor leak the tier names.
            log.error("key of user %s names unknown tier %s", principal.user_id, principal.tier)
            raise Unauthorized("this API key is not usable: its tier is not configured")
        return tier

    async def submit(
        self,
        principal: Principal,
        body: SummaryIn,
        *,
        idempotency_key: str | None,
        received_ms: int,
    ) -> Accepted:
        """Check limits, mint an id, register its stream and produce the SummarizeRequest."""
        if idempotency_key:
            existing = self.index.lookup(principal.user_id, idempotency_key)
            if existing is not None:
                return self._accepted(existing, replay=True)
        tier = self.tier_of(principal)
        size = len(body.document.encode())
        if size > self.settings.max_document_bytes:
            raise PayloadTooLarge(
                f"document is {size} bytes; the limit is {self.settings.max_document_bytes}"
            )
        if size > COUNT_IN_THREAD_BYTES:
            input_tokens = await asyncio.to_thread(count_tokens, body.document)
        else:
            input_tokens = count_tokens(body.document)
        if input_tokens > tier.max_input_tokens:
            if tier.on_input_too_large == "reject":
                raise PayloadTooLarge(
                    f"document is ~{input_tokens} tokens; the {principal.tier} tier allows "
                    f"{tier.max_input_tokens}"
                )
            input_tokens = tier.max_input_tokens  # preprocess truncates it
        output_tokens = min(
            body.max_output_tokens or tier.max_output_tokens, tier.max_output_tokens
        )
        input_tokens += prompt_overhead_tokens(body.instructions, output_tokens)
        if not self.started or self.producer is None:
            raise NotReady("the gateway is starting or stopping")
        request_id = mint_request_id(self.owned, self.partitions)
        admitted = await self.admission.admit(
            principal.user_id,
            principal.tier,
            request_id,
            input_tokens=input_tokens,
            max_output_tokens=output_tokens,
            model=body.model,
        )
        if idempotency_key:
            holder = self.index.reserve(principal.user_id, idempotency_key, request_id)
            if holder != request_id:
                self.spawn(self.admission.release(admitted), name=f"release-{request_id}")
                return self._accepted(holder, replay=True)
        self.hub.register(request_id)
        created = now_ms()
        self.index.remember(request_id, principal.user_id, principal.tier, created)
        record = {
            "request_id": request_id,
            "user_id": principal.user_id,
            "tier": principal.tier,
            "document": body.document,
            "instructions": body.instructions,
            # A degraded request names its shorter output; else the client's choice stands.
            "max_output_tokens": (
                admitted.max_output_tokens if admitted.degraded else body.max_output_tokens
            ),
            "model": admitted.model,
            "deadline_ms": None,
            "idempotency_key": idempotency_key,
            "source": "gateway",
            "replay_of": None,
            "degraded": admitted.degraded,
            "created_at": created,
            "trace": {"received": received_ms, "enqueued": now_ms()},
        }
        try:
            await self.producer.send_and_wait(
                self.topics.requests,
                key=request_id.encode(),
                value=codec().encode("SummarizeRequest", record),
            )
        except KafkaError as exc:
            self.hub.forget(request_id)
            if idempotency_key:
                self.index.release(principal.user_id, idempotency_key, request_id)
            # The broker is likely gone: give the reservation back in the background.
            self.spawn(self.admission.release(admitted), name=f"release-{request_id}")
            log.warning("produce failed", extra={"request_id": request_id, "error": repr(exc)})
            raise BrokerUnavailable(
                "could not write the request to the log", retry_after_s=1
            ) from exc
        self.admission.accepted(admitted)
        log.info(
            "accepted",
            extra={
                "request_id": request_id,
                "user_id": principal.user_id,
                "tier": principal.tier,
                "input_tokens": input_tokens,
                "reserved_tokens": admitted.reserved_tokens,
                "degraded": admitted.degraded,
                "queue_position": admitted.queue_position,
                "estimated_wait_s": admitted.estimated_wait_s,
            },
        )
        return Accepted(
            request_id,
            False,
            admitted.queue_position,
            admitted.estimated_wait_s,
            admitted.degraded,
        )

    def _accepted(self, request_id: str, *, replay: bool) -> Accepted:
        # Found again by its Idempotency-Key: the queue as it is now, from lag.
        return Accepted(
            request_id,
            replay,
            self.estimator.queue_position(),
            round(self.estimator.estimate_s(), 3),
        )

    def _on_result(self, result: dict[str, Any]) -> None:
        self.admission.finished(result["request_id"])

    def usage(self, principal: Principal) -> UsageSummary:
        """The caller's tokens, cost and limits for this month, from the quota ledger."""
        if not self.ledger.ready:
            raise NotReady("the quota ledger is not ready")
        return self.ledger.usage(principal.user_id, principal.tier)

    # -- owners, results, cancels ---------------------------------------------------------------

    async def owner_of(self, request_id: str) -> RequestOwner | None:
        """Who sent ``request_id``: from memory, else from the log (requests, then results)."""
        owner = self.index.owner(request_id)
        if owner is not None or id_time_ms(request_id) is None:
            # Ids that are not ULIDs cannot be positioned in the log; the index has every
            # request of the last window, so those older than it are not found.
            return owner
        reader = _log_reader(
            self.connection,
            self.topics.requests,
            request_id,
            schema="SummarizeRequest",
        )
        async with contextlib.aclosing(reader):
            async for record in reader:
                self.index.observe(record)
                return self.index.owner(request_id)
        result = await self.result_of(request_id)
        if result is not None:
            self.index.remember(
                request_id, result["user_id"], result["tier"], int(result["created_at"])
            )
            return self.index.owner(request_id)
        return None

    async def result_of(self, request_id: str, *, follow: bool = False) -> dict[str, Any] | None:
        """The SummaryResult of ``request_id``, or None when it has none (yet)."""
        stream = self.hub.get(request_id)
        if stream is not None and (stream.result is not None or not follow):
            # Registered here before it was produced: the hub has seen every result of its
            # partition since, so no result in memory means none in the log either.
            return stream.result
        reader = _log_reader(
            self.connection,
            self.topics.results,
            request_id,
            schema="SummaryResult",
            follow=follow,
            idle_timeout_s=self.settings.result_timeout_s,
            stop_at_terminal=False,
        )
        async with contextlib.aclosing(reader):
            async for record in reader:
                return record
        return None

    async def cancel(self, request_id: str, user_id: str, reason: str) -> None:
        """Produce a ControlEvent CANCEL for ``request_id`` to ``control``."""
        if self.producer is None:
            raise NotReady("the gateway is starting or stopping")
        event = {
            "request_id": request_id,
            "action": "CANCEL",
            "reason": reason,
            "user_id": user_id,
            "created_at": now_ms(),
            "trace": {"cancel_requested": now_ms()},
        }
        try:
            await self.producer.send_and_wait(
                self.topics.control,
                key=request_id.encode(),
                value=codec().encode("ControlEvent", event),
            )
        except KafkaError as exc:
            raise BrokerUnavailable(
                "could not write the cancel to the log", retry_after_s=1
            ) from exc
        CANCELS.labels(reason).inc()
        log.info("cancel sent", extra={"request_id": request_id, "reason": reason})

    # -- streams --------------------------------------------------------------------------------

    def open_stream(self, request_id: str, after_seq: int) -> StreamSource:
        """Events after ``after_seq``: from memory when it covers them, else from the log."""
        self._open_streams[request_id] += 1
        timer = self._cancel_timers.pop(request_id, None)
        if timer is not None:
            timer.cancel()
        sub = self.hub.subscribe(request_id, after_seq)
        if sub is not None:
            return StreamSource(sub, "memory")
        return self.read_from_log(request_id, after_seq)

    def read_from_log(
        self, request_id: str, after_seq: int, *, result: dict[str, Any] | None = None
    ) -> StreamSource:
        """A short-lived reader of the request's partitions feeding a subscriber.

        With ``result`` known, it reads the tokens written so far and stops; else it follows
        them to the terminal event and then waits for the result.
        """
        sub = Subscriber(request_id, self.settings.client_queue_events)
        task = self.spawn(
            self._feed_from_log(sub, after_seq, result), name=f"log-reader-{request_id}"
        )
        return StreamSource(sub, "log", task)

    async def _feed_from_log(
        self, sub: Subscriber, after_seq: int, result: dict[str, Any] | None
    ) -> None:
        request_id = sub.request_id
        reason = "finished"
        try:
            terminal = False
            reader = _log_reader(
                self.connection,
                self.topics.tokens,
                request_id,
                schema="TokenEvent",
                follow=result is None,
                idle_timeout_s=self.settings.reader_idle_timeout_s,
            )
            async with contextlib.aclosing(reader):
                async for event in reader:
                    if event["seq"] > after_seq or event["kind"] in TERMINAL_KINDS:
                        await sub.put(("token", event))
                    terminal = event["kind"] in TERMINAL_KINDS
            if result is None:
                result = await self.result_of(request_id, follow=terminal)
            if result is not None:
                await sub.put(("result", result))
            else:
                reason = "stream_idle"
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("log reader failed", extra={"request_id": request_id})
            reason = "reader_failed"
        finally:
            sub.close(reason)

    def stream_closed(self, request_id: str, user_id: str, *, finished: bool) -> None:
        """An SSE stream ended; unfinished ones are cancelled unless a client comes back."""
        self._open_streams[request_id] -= 1
        if self._open_streams[request_id] <= 0:
            del self._open_streams[request_id]
        if finished or not self.started or request_id in self._cancel_timers:
            return
        self._cancel_timers[request_id] = self.spawn(
            self._cancel_unless_back(request_id, user_id), name=f"cancel-grace-{request_id}"
        )

    async def _cancel_unless_back(self, request_id: str, user_id: str) -> None:
        try:
            await asyncio.sleep(self.settings.cancel_grace_s)
            stream = self.hub.get(request_id)
            if self._open_streams[request_id] > 0 or (stream is not None and stream.result):
                return
            await self.cancel(request_id, user_id, "disconnect")
        except (BrokerUnavailable, NotReady) as exc:
            log.warning("disconnect cancel failed: %s", exc, extra={"request_id": request_id})
        finally:
            if self._cancel_timers.get(request_id) is asyncio.current_task():
                del self._cancel_timers[request_id]
