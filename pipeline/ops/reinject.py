"""Re-running past requests (`sumstream replay rerun`): the same documents under new ids.

Only new records are produced, with ``source=replay`` and ``replay_of`` naming the original;
the originals are never touched (docs/architecture.md, "Replay and audit").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.core import sealing
from pipeline.core.codec import codec
from pipeline.core.errors import CodecError
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.ops.history import Progress, scan
from pipeline.ops.submit import build_request, request_producer, signer

# The producer name a rerun signs as: the one whose `replay_of` is honoured (and not billed).
REPLAY_PRODUCER = "replay"

# Request fields a replay takes from its original; the rest are minted afresh.
_CARRIED = ("instructions", "max_output_tokens", "model", "degraded")


@dataclass
class RerunReport:
    """What a rerun did: old id -> new id for every request it re-injected (or would have)."""

    mapping: dict[str, str] = field(default_factory=dict)
    skipped_replays: int = 0
    skipped_users: int = 0
    undecodable: int = 0
    # Requests whose user was forgotten (their key shredded): their text is gone.
    forgotten: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def replay_request(original: dict[str, Any], *, model: str | None = None) -> dict[str, Any]:
    """A new SummarizeRequest for the same document: new id and times, ``replay_of`` the original.

    A relative deadline is kept (the original's absolute one has passed); an idempotency key
    is not, so the replay is never folded into its original.
    """
    fields = {name: original.get(name) for name in _CARRIED}
    if model is not None:
        fields["model"] = model
        fields["degraded"] = None
    request = build_request(
        original["document"],
        user=original["user_id"],
        tier=original["tier"],
        source="replay",
        replay_of=original["request_id"],
        idempotency_key=None,
        **fields,
    )
    deadline = original.get("deadline_ms")
    request["deadline_ms"] = (
        None
        if deadline is None
        else request["created_at"] + max(0, deadline - original["created_at"])
    )
    return request


async def rerun(
    settings: KafkaSettings,
    since_ms: int,
    until_ms: int,
    *,
    model: str | None = None,
    user: str | None = None,
    include_replays: bool = False,
    dry_run: bool = False,
    rate: float = 0.0,
    on_mapped: Callable[[str, str, dict[str, Any]], None] | None = None,
    progress: Progress | None = None,
) -> RerunReport:
    """Re-inject the SummarizeRequests stamped within the window under new ids.

    ``on_mapped(old, new, replay)`` is called once the replay is delivered (at once when
    ``dry_run``, in which case nothing is produced).
    """
    # Past ~60 lines: the delivery callbacks and the pacing share the report and the producer.
    topics = TopicNames.from_settings(settings)
    report = RerunReport()
    producer = None if dry_run else request_producer(settings)
    identity = signer(settings, REPLAY_PRODUCER)
    pace = 1.0 / rate if rate > 0 else 0.0
    next_at = time.monotonic()

    def delivered(old: str, new: str, replay: dict[str, Any]) -> Callable[[Any, Any], None]:
        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                report.failed[old] = str(err)
                return
            report.mapping[old] = new
            if on_mapped is not None:
                on_mapped(old, new, replay)

        return on_delivery

    try:
        async for logged in scan(
            ConnectionConfig.from_settings(settings),
            [topics.requests],
            since_ms=since_ms,
            until_ms=until_ms,
            on_progress=progress.update if progress else None,
        ):
            try:
                original = codec().decode_as(logged.value, "SummarizeRequest")
            except CodecError:
                report.undecodable += 1  # preprocess sent it to the dlq already
                continue
            if not include_replays and (original["source"] == "replay" or original["replay_of"]):
                report.skipped_replays += 1
                continue
            if user is not None and original["user_id"] != user:
                report.skipped_users += 1
                continue
            if sealing.is_forgotten(original, "SummarizeRequest"):
                report.forgotten += 1
                continue
            replay = replay_request(original, model=model)
            old, new = original["request_id"], replay["request_id"]
            if producer is None:
                report.mapping[old] = new
                if on_mapped is not None:
                    on_mapped(old, new, replay)
                continue
            if pace:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at, time.monotonic()) + pace
            # Sealed again with the user's key: a replay never puts opened text in clear.
            value = codec().encode("SummarizeRequest", replay, sealed_for=replay["user_id"])
            while True:
                try:
                    producer.produce(
                        topics.requests,
                        key=new.encode(),
                        value=value,
                        headers=identity.headers(value),
                        on_delivery=delivered(old, new, replay),
                    )
                    break
                except BufferError:  # local queue full: let deliveries drain
                    await asyncio.to_thread(producer.poll, 0.5)
            producer.poll(0)
    finally:
        if producer is not None:
            remaining = await asyncio.to_thread(producer.flush, 30)
            if remaining:
                report.failed["*"] = f"{remaining} replays not confirmed by the broker"
    return report
