"""Accepting a request and its cancel: the gateway's writes to ``requests`` and ``control``.

``submit`` checks the document against the caller's tier, asks admission for a reservation,
mints an id on one of this instance's partitions, registers its stream and produces the
SummarizeRequest; ``cancel`` produces a ControlEvent CANCEL. A produce that fails answers
503 ``broker_unavailable`` and gives back what it had taken.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from gateway.admission.backpressure import QueueWaitEstimator
from gateway.admission.controller import Admission, Admitted, prompt_overhead_tokens
from gateway.admission.idempotency import RequestIndex, body_sha256
from gateway.admission.quota import KeyHeld
from gateway.http.auth import Principal
from gateway.http.errors import (
    BrokerUnavailable,
    BudgetExceeded,
    EmptyDocument,
    IdempotencyKeyReused,
    ModelNotAllowed,
    NotReady,
    PayloadTooLarge,
    Unauthorized,
)
from gateway.http.models import SummaryIn
from gateway.metrics import CANCELS
from gateway.settings import GatewaySettings
from gateway.streams.clients import Spawn
from gateway.streams.hub import StreamHub
from gateway.streams.ids import mint_follow_up_id, mint_request_id
from pipeline.core import longdoc
from pipeline.core.clock import now_ms
from pipeline.core.codec import codec
from pipeline.core.partitioning import partition_for
from pipeline.core.pricing import price_table
from pipeline.core.producers import ProducerTable
from pipeline.core.prompt import normalize_document
from pipeline.core.records import ControlEvent, SummarizeRequest
from pipeline.core.tiers import Tier
from pipeline.core.topics import TopicNames
from pipeline.llm.extractive import count_tokens
from pipeline.memory.compacted import MemoryUnavailableError
from pipeline.memory.keystore import DataKeyTable
from pipeline.memory.preferences import PREFERENCES_VERSION_HEADER
from pipeline.memory.store import PreferencesTable

log = logging.getLogger("sumstream.gateway")

# Counting tokens is linear in the document; past this size it leaves the event loop.
COUNT_IN_THREAD_BYTES = 256 * 1024
# Sealing costs about 10 µs per KiB (bench/sealing.py): from here, off the event loop.
SEAL_IN_THREAD_BYTES = 64 * 1024
# Characters of a document's start normalised first: enough to find a visible one at once.
EMPTY_CHECK_PREFIX = 256
# The producer name the gateway signs as unless SUMSTREAM_PRODUCER names another.
GATEWAY_PRODUCER = "gateway"


@dataclass(frozen=True)
class Accepted:
    """A request this gateway accepted, or found again by its Idempotency-Key."""

    request_id: str
    replay: bool
    queue_position: int
    estimated_wait_s: float
    # The output cap that applies: the client's, clamped to the tier's, or the degraded one.
    max_output_tokens: int
    degraded: str | None = None


class Intake:
    """Turns a client's POST into a SummarizeRequest on ``requests``, and a DELETE into a CANCEL.

    It writes through the gateway's producer, handed over by ``open`` once the gateway knows
    its partitions and taken back by ``close`` before the producer stops.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        tiers: Mapping[str, Tier],
        topics: TopicNames,
        *,
        index: RequestIndex,
        admission: Admission,
        estimator: QueueWaitEstimator,
        hub: StreamHub,
        spawn: Spawn,
        running: Callable[[], bool],
        budget_left: Callable[[str, str], int | None] | None = None,
        preferences: PreferencesTable | None = None,
        keys: DataKeyTable | None = None,
    ) -> None:
        self.settings = settings
        # (user, tier) -> micro-USD left this month (None: not known yet), for a long
        # document's plan (docs/architecture.md, "Long documents").
        self._budget_left = budget_left
        self.preferences = preferences
        # The users' data keys: the request's text is sealed (docs/architecture.md,
        # "Forgetting"); None (a test's intake) writes it plain.
        self.keys = keys
        self.tiers = tiers
        self.topics = topics
        self.index = index
        self.admission = admission
        self.estimator = estimator
        self.hub = hub
        self._spawn = spawn
        self._running = running
        self._producer: AIOKafkaProducer | None = None
        self._owned: frozenset[int] = frozenset()
        self._partitions = 0
        self._requests_partitions = 0
        # The identity this gateway signs its requests with (docs/architecture.md, "Identity").
        self._signer = ProducerTable.load(settings.producers_file).get(
            settings.producer or GATEWAY_PRODUCER
        )

    def open(
        self,
        producer: AIOKafkaProducer,
        owned: frozenset[int],
        partitions: int,
        *,
        requests_partitions: int = 0,
    ) -> None:
        """Write through ``producer``, minting ids on ``owned`` of ``partitions``."""
        self._producer, self._owned, self._partitions = producer, owned, partitions
        self._requests_partitions = requests_partitions or partitions

    def close(self) -> None:
        """Refuse further writes (503 not_ready): the producer is about to stop."""
        self._producer = None

    def tier_of(self, principal: Principal) -> Tier:
        """The caller's tier; a key naming a tier the tier file lacks is refused (401)."""
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
        tier = self.tier_of(principal)
        _check_model(tier, body.model)
        output_tokens = min(
            body.max_output_tokens or tier.max_output_tokens, tier.max_output_tokens
        )
        fingerprint = body_sha256(body.model_dump()) if idempotency_key else None
        if idempotency_key:
            existing = self.index.lookup(principal.user_id, idempotency_key, fingerprint)
            if existing is not None:
                return self._found_again(existing, output_tokens)
        input_tokens = await self._input_tokens(principal, tier, body.document)
        if longdoc.is_long(input_tokens, tier):
            # Reserve the whole plan, and refuse up front what the budget cannot pay for.
            input_tokens = self._plan_tokens(principal, tier, body, input_tokens, output_tokens)
        input_tokens += prompt_overhead_tokens(body.instructions, output_tokens)
        if body.context == "history":
            # Memory counts toward the tier's tokens per minute (settled with the real figure).
            input_tokens += tier.memory_tokens
        producer = self._producer
        if not self._running() or producer is None:
            raise NotReady("the gateway is starting or stopping")
        request_id = mint_request_id(self._owned, self._partitions)
        try:
            admitted = await self.admission.admit(
                principal.user_id,
                principal.tier,
                request_id,
                input_tokens=input_tokens,
                max_output_tokens=output_tokens,
                model=body.model,
                idempotency_key=idempotency_key,
                body_sha256=fingerprint,
            )
        except KeyHeld as held:
            # Another POST with this key (maybe at another gateway) reserved first, in log order.
            return self._held_elsewhere(
                principal, idempotency_key or "", held, fingerprint, output_tokens
            )
        if idempotency_key:
            try:
                holder = self.index.reserve(
                    principal.user_id, idempotency_key, request_id, fingerprint
                )
            except IdempotencyKeyReused:
                self._spawn(self.admission.release(admitted), f"release-{request_id}")
                raise
            if holder != request_id:
                self._spawn(self.admission.release(admitted), f"release-{request_id}")
                return self._found_again(holder, output_tokens)
        self.hub.register(request_id)
        created = now_ms()
        self.index.remember(request_id, principal.user_id, principal.tier, created)
        record = _request_record(
            request_id, principal, body, admitted, idempotency_key, created, received_ms
        )
        record["body_sha256"] = fingerprint  # the body the key was first used with
        return await self._accept(producer, record, admitted, input_tokens)

    async def _accept(
        self,
        producer: AIOKafkaProducer,
        record: SummarizeRequest,
        admitted: Admitted,
        input_tokens: int,
    ) -> Accepted:
        """Write the request to the log; once it is there, it is accepted."""
        await self._produce_request(producer, record, admitted)
        self.admission.accepted(admitted)
        _log_accepted(admitted, input_tokens)
        return Accepted(
            record["request_id"],
            False,
            admitted.queue_position,
            admitted.estimated_wait_s,
            admitted.max_output_tokens,
            admitted.degraded,
        )

    def _plan_tokens(
        self, principal: Principal, tier: Tier, body: SummaryIn, document_tokens: int, output: int
    ) -> int:
        """The input tokens of a long document's whole plan; 429 ``budget_exceeded`` when its
        estimated cost is above what the month's budget has left."""
        model = body.model or tier.default_model or ""
        plan = longdoc.plan(
            document_tokens,
            tier,
            max_output_tokens=output,
            overhead_tokens=prompt_overhead_tokens(body.instructions, output),
            price=price_table().price_for(model),
        )
        left = self._budget_left(principal.user_id, principal.tier) if self._budget_left else None
        if left is not None and plan.cost_micro_usd > left:
            raise BudgetExceeded(
                f"the document's plan ({plan.calls} calls, ~{plan.tokens} tokens) is estimated "
                f"at {plan.cost_micro_usd} micro-USD; the month's budget has {left} left",
                retriable=False,
                extra={"plan": plan.as_json(), "remaining_micro_usd": left},
            )
        return plan.input_tokens - prompt_overhead_tokens(body.instructions, output)

    async def submit_follow_up(
        self,
        principal: Principal,
        session_id: str,
        message: str,
        *,
        input_tokens: int,
        received_ms: int,
    ) -> Accepted:
        """Accept a follow-up question about ``session_id`` (already checked to be the caller's):
        admitted like a summary, its id on the session's partition of `requests`."""
        tier = self.tier_of(principal)
        producer = self._producer
        if not self._running() or producer is None:
            raise NotReady("the gateway is starting or stopping")
        request_id = mint_follow_up_id(
            self._owned, self._partitions, session_id, self._requests_partitions
        )
        admitted = await self.admission.admit(
            principal.user_id,
            principal.tier,
            request_id,
            input_tokens=input_tokens,
            max_output_tokens=tier.max_output_tokens,
            model=None,
        )
        if partition_for(request_id, self._partitions) in self._owned:
            self.hub.register(request_id)  # else its stream is read from the log
        created = now_ms()
        self.index.remember(request_id, principal.user_id, principal.tier, created)
        body = SummaryIn.model_construct(
            document="", instructions=message, max_output_tokens=None, model=None
        )
        record = _request_record(request_id, principal, body, admitted, None, created, received_ms)
        record["session_of"] = session_id
        return await self._accept(producer, record, admitted, input_tokens)

    async def _input_tokens(self, principal: Principal, tier: Tier, document: str) -> int:
        """The document's tokens as the tier bills them; 413 when the tier refuses its size,
        422 ``empty_document`` when it normalises to nothing."""
        size = len(document.encode())
        if size > self.settings.document_limit_bytes:
            raise PayloadTooLarge(
                f"document is {size} bytes; the limit is {self.settings.document_limit_bytes}"
            )
        if size > COUNT_IN_THREAD_BYTES:
            measured = await asyncio.to_thread(_measure, document)
        else:
            measured = _measure(document)
        if measured is None:
            raise EmptyDocument(
                "the document holds no text once control, zero-width and space characters "
                "are removed"
            )
        input_tokens = measured
        limit = tier.document_limit
        if input_tokens > limit:
            if tier.on_input_too_large == "reject":
                raise PayloadTooLarge(
                    f"document is ~{input_tokens} tokens; the {principal.tier} tier allows {limit}"
                )
            input_tokens = limit  # preprocess truncates it
        return input_tokens

    async def _produce_request(
        self, producer: AIOKafkaProducer, record: SummarizeRequest, admitted: Admitted
    ) -> None:
        request_id = record["request_id"]
        user_id = record["user_id"]
        if self.keys is not None:
            try:
                await self.keys.key_for(user_id)
            except MemoryUnavailableError as exc:
                self._give_back(record, admitted)
                raise BrokerUnavailable("could not create the data key", retry_after_s=1) from exc
        if len(record["document"]) > SEAL_IN_THREAD_BYTES:
            # Sealing a big document costs milliseconds: not on the event loop.
            value = await asyncio.to_thread(
                codec().encode, "SummarizeRequest", record, sealed_for=user_id
            )
        else:
            value = codec().encode("SummarizeRequest", record, sealed_for=user_id)
        if len(value) > self.settings.max_record_bytes:
            # Measured, as the producer would: a record it refuses must not be accepted.
            self._give_back(record, admitted)
            raise PayloadTooLarge(
                f"the request is {len(value)} bytes encoded; the limit is "
                f"{self.settings.max_record_bytes}"
            )
        try:
            await producer.send_and_wait(
                self.topics.requests,
                key=request_id.encode(),
                value=value,
                headers=self._signer.headers(value) + self._memory_headers(record),
            )
        except KafkaError as exc:
            # The broker is likely gone: the reservation goes back in the background.
            self._give_back(record, admitted)
            log.warning("produce failed", extra={"request_id": request_id, "error": repr(exc)})
            raise BrokerUnavailable(
                "could not write the request to the log", retry_after_s=1
            ) from exc

    def _memory_headers(self, record: SummarizeRequest) -> list[tuple[str, bytes]]:
        # Which preferences version this gateway knows the caller has: preprocess waits
        # (briefly) for at least that one, so a PUT is seen by the next request. A hint
        # about freshness only: the preferences themselves are looked up by the record's user.
        version = self.preferences.version(record["user_id"]) if self.preferences else 0
        return [(PREFERENCES_VERSION_HEADER, str(version).encode())] if version else []

    def _give_back(self, record: SummarizeRequest, admitted: Admitted) -> None:
        """Undo what ``submit`` took for a request that was not produced."""
        request_id = record["request_id"]
        self.hub.forget(request_id)
        key = record["idempotency_key"]
        if key:
            self.index.release(record["user_id"], key, request_id)
        self._spawn(self.admission.release(admitted), f"release-{request_id}")

    def _held_elsewhere(
        self, principal: Principal, key: str, held: KeyHeld, fingerprint: str | None, output: int
    ) -> Accepted:
        """Answer a POST whose key the ledger gave to ``held.request_id``: a replay of that
        request (its record may not have reached `requests` yet), or 422 for another body."""
        # The ledger's partition is the user's own, written by gateways only: the holder is
        # this user's, so its stream may be served before the index reads its record.
        self.index.remember(held.request_id, principal.user_id, principal.tier, now_ms())
        holder = self.index.reserve(principal.user_id, key, held.request_id, held.body_sha256)
        self.index.lookup(principal.user_id, key, fingerprint)  # 422 for another body
        return self._found_again(holder, output)

    def _found_again(self, request_id: str, max_output_tokens: int) -> Accepted:
        # Found again by its Idempotency-Key: the queue as it is now, from lag.
        return Accepted(
            request_id,
            True,
            self.estimator.queue_position(),
            round(self.estimator.estimate_s(), 3),
            max_output_tokens,
        )

    async def cancel(self, request_id: str, user_id: str, reason: str) -> None:
        """Produce a ControlEvent CANCEL for ``request_id`` to ``control``."""
        producer = self._producer
        if producer is None:
            raise NotReady("the gateway is starting or stopping")
        event: ControlEvent = {
            "request_id": request_id,
            "action": "CANCEL",
            "reason": reason,
            "user_id": user_id,
            "created_at": now_ms(),
            "trace": {"cancel_requested": now_ms()},
        }
        try:
            await producer.send_and_wait(
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


def normalises_to_nothing(document: str) -> bool:
    """Whether preprocess would find the document empty (and reject it after admission had
    reserved quota for it)."""
    # A visible character survives normalisation wherever it stands, so a start that keeps one
    # decides at once; only a document that starts with nothing visible is normalised whole
    # (normalising costs ~3x counting).
    return not normalize_document(document[:EMPTY_CHECK_PREFIX]) and not normalize_document(
        document
    )


def _measure(document: str) -> int | None:
    """The document's tokens, or None when it normalises to nothing."""
    return None if normalises_to_nothing(document) else count_tokens(document)


def _check_model(tier: Tier, model: str | None) -> None:
    """422 ``model_not_allowed`` for a model the tier does not list (none: the tier's default)."""
    if model is not None and not tier.allows(model):
        raise ModelNotAllowed(
            f"model {model[:64]!r} is not available on the {tier.name} tier",
            extra={"allowed_models": list(tier.models)},
        )


def _request_record(
    request_id: str,
    principal: Principal,
    body: SummaryIn,
    admitted: Admitted,
    idempotency_key: str | None,
    created: int,
    received_ms: int,
) -> SummarizeRequest:
    return {
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
        "body_sha256": None,
        "source": "gateway",
        "context": body.context,
        "replay_of": None,
        "degraded": admitted.degraded,
        "created_at": created,
        "trace": {"received": received_ms, "enqueued": now_ms()},
    }


def _log_accepted(admitted: Admitted, input_tokens: int) -> None:
    log.info(
        "accepted",
        extra={
            "request_id": admitted.request_id,
            "user_id": admitted.user_id,
            "tier": admitted.tier,
            "input_tokens": input_tokens,
            "reserved_tokens": admitted.reserved_tokens,
            "degraded": admitted.degraded,
            "queue_position": admitted.queue_position,
            "estimated_wait_s": admitted.estimated_wait_s,
        },
    )
