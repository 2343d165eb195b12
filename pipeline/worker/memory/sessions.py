"""Conversations about a summary: the changelog-backed `sessions` table and what preprocess
does with a follow-up (docs/architecture.md, "Context and memory").

A follow-up is a request whose ``session_of`` names an earlier request of the same user (the
session id) and whose ``instructions`` are the question. The gateway mints its id into the
same `requests` partition as the session id, so the worker that reads the follow-up owns the
session's entry: the table is co-partitioned with `requests` like `request-ids`. The entry holds
the document, the original instructions and every turn; answers are read back from `results`
once and kept. Writes are acknowledged before the job is produced, so a SIGKILL loses no turn.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import faust

from pipeline.core import sealing
from pipeline.core.errors import SumstreamError
from pipeline.core.partitioning import partition_for
from pipeline.core.prompt import normalize_text
from pipeline.core.records import InferenceJob, SummarizeRequest, SummaryResult
from pipeline.core.sealing import KeyUnknownError
from pipeline.core.tiers import Tier
from pipeline.core.topics import TopicNames
from pipeline.kafka.connection import ConnectionConfig
from pipeline.kafka.tail import read_request_records
from pipeline.llm.extractive import count_tokens
from pipeline.worker.prepare import MAX_INSTRUCTIONS_CHARS, Rejection, rejected
from pipeline.worker.tables import add_table, delete, write

log = logging.getLogger("sumstream.preprocess")

# How long a changelog write may take before the record is retried.
CHANGELOG_WAIT_S = 10.0
# The TTL of a session whose tier is no longer in the tier file.
DEFAULT_TTL_S = 3600.0


class SessionUnavailableError(SumstreamError):
    """The log could not be read for a session's document or answers; the record is retried."""

    code = "session_unavailable"
    retriable = True


@dataclass(slots=True)
class Turn:
    """One follow-up: its request id, the question, and the answer once read from `results`."""

    request_id: str
    message: str
    answer: str | None = None


_TEXT = ("document", "instructions", "answer")


def _sealed(text: str | None, user_id: str) -> str | None:
    return None if text is None else sealing.seal_text(text, user_id)


def _opened(text: str | None) -> str | None:
    return None if text is None else sealing.keyring().open(text)


@dataclass(slots=True)
class Session:
    """What a conversation about one summary needs to build its next prompt."""

    user_id: str
    document: str
    instructions: str | None
    max_output_tokens: int | None
    model: str | None
    created_at: int
    tier: str = ""  # the tier of the follow-up that opened it: its TTL applies
    answer: str | None = None  # the summary itself: the first assistant turn
    turns: list[Turn] = field(default_factory=list)

    def encode(self) -> bytes:
        """The changelog record, its text sealed with the user's key like the topics' text
        (docs/architecture.md, "Forgetting")."""
        data = asdict(self)
        seal = functools.partial(_sealed, user_id=self.user_id)
        for name in _TEXT:
            data[name] = seal(data[name])
        for turn in data["turns"]:
            turn["message"], turn["answer"] = seal(turn["message"]), seal(turn["answer"])
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Session:
        """The entry, its text opened; raises KeyUnknownError for a key not read yet."""
        data = json.loads(raw)
        for name in _TEXT:
            data[name] = _opened(data.get(name))
        data["turns"] = [
            Turn(t["request_id"], _opened(t["message"]) or "", _opened(t.get("answer")))
            for t in data.get("turns", [])
        ]
        return cls(**data)

    def expires_at(self, tier: Tier) -> int:
        return self.created_at + int(tier.session_ttl_s * 1000)

    def conversation(self, upto: str) -> list[str]:
        """The turns after the first prompt up to follow-up ``upto``: assistant, user, ...,
        ``upto``'s question last. Earlier turns without an answer yet are left out."""
        out = [self.answer or ""]
        for turn in self.turns:
            if turn.request_id == upto:
                out.append(turn.message)
                break
            if turn.answer:
                out += [turn.message, turn.answer]
        return out


Reader = Callable[[str, str, str], Any]


class Sessions:
    """session id -> Session, for the partitions of `requests` this worker reads."""

    def __init__(
        self,
        app: faust.App,
        partitions: int,
        connection: ConnectionConfig,
        topics: TopicNames,
        *,
        max_message_bytes: int,
    ) -> None:
        self.partitions = partitions
        self.owned: set[int] = set()
        # preprocess handles several records at once; two follow-ups of one session must not
        # both read the entry, add their turn and write it back (the second write would drop
        # the first turn). Follow-ups are few, so one at a time in all.
        self._one_at_a_time = asyncio.Lock()
        self._connection = connection
        self._topics = topics
        self.table = add_table(
            app,
            "sessions",
            partitions=partitions,
            help="session id -> conversation (pipeline/worker/memory/sessions.py)",
            max_message_bytes=max_message_bytes,
        )
        self.table.on_assigned = self._assigned

    def _assigned(self, partitions: set[int]) -> None:
        self.owned = partitions

    def get(self, session_id: str) -> Session | None:
        raw = self.table.get(session_id.encode())
        try:
            return Session.decode(raw) if raw else None
        except KeyUnknownError as exc:
            # The key reaches this worker on `keys` shortly: the stage retries the record.
            raise SessionUnavailableError(f"session {session_id[:64]}: {exc}") from exc

    async def put(self, session_id: str, session: Session) -> None:
        """Store and wait for the broker's acknowledgement of the changelog record."""
        key, raw = session_id.encode(), session.encode()
        written = write(self.table, self.partitions, key, raw)
        try:
            # Bounded: a send that never completes must not stall the stage (it is retried).
            await asyncio.wait_for(written, CHANGELOG_WAIT_S)
        except TimeoutError as exc:
            log.warning("session changelog write timed out", extra={"session_id": session_id})
            raise SessionUnavailableError("the sessions changelog did not acknowledge") from exc

    async def forget(self, session_id: str) -> None:
        delete(self.table, self.partitions, session_id.encode())

    def expired(
        self,
        tiers: Mapping[str, Tier],
        now_ms: int,
        forgotten_at: Callable[[str], int] = lambda user: 0,
    ) -> list[str]:
        """The owned sessions past their tier's TTL (an unknown tier keeps the default) or
        opened before their user asked to be forgotten."""
        found = []
        for key, raw in list(self.table.items()):
            if partition_for(bytes(key), self.partitions) not in self.owned:
                continue
            try:
                session = Session.decode(raw)
            except KeyUnknownError:
                continue  # its key is not read yet: the next purge sees it
            tier = tiers.get(session.tier)
            ttl_s = tier.session_ttl_s if tier is not None else DEFAULT_TTL_S
            gone = session.created_at <= forgotten_at(session.user_id)
            if gone or now_ms > session.created_at + int(ttl_s * 1000):
                found.append(bytes(key).decode())
        return found

    async def follow_up(
        self, request: SummarizeRequest, tier: Tier, now_ms: int, *, forgotten_at: int = 0
    ) -> tuple[SummarizeRequest, Session] | Rejection:
        """The request to prepare for a follow-up (the session's document and instructions
        under the follow-up's id) and its session, with this turn recorded; or why not."""
        async with self._one_at_a_time:
            return await self._follow_up(request, tier, now_ms, forgotten_at=forgotten_at)

    async def _follow_up(
        self, request: SummarizeRequest, tier: Tier, now_ms: int, *, forgotten_at: int
    ) -> tuple[SummarizeRequest, Session] | Rejection:
        session_id = str(request.get("session_of") or "")
        request_id = request["request_id"]
        session = self.get(session_id) or await self._open(session_id, tier.name)
        # Another user's session looks like none at all (the gateway answers 404 the same way).
        if session is None or session.user_id != request["user_id"]:
            return rejected("session_not_found", f"no session {session_id[:64]}")
        if session.created_at <= forgotten_at:
            await self.forget(session_id)  # the user asked to be forgotten since
            return rejected("session_not_found", f"no session {session_id[:64]}")
        if now_ms > session.expires_at(tier):
            return rejected("session_expired", f"session {session_id} has expired")
        changed = await self._read_answers(session_id, session)
        if session.answer is None:
            return rejected("session_busy", "the summary has not finished yet")
        message = normalize_text(request.get("instructions") or "")[:MAX_INSTRUCTIONS_CHARS]
        if not message:
            return rejected("invalid_request", "the follow-up message is empty")
        if all(turn.request_id != request_id for turn in session.turns):
            session.turns.append(Turn(request_id, message))
            changed = True
        if changed:
            await self.put(session_id, session)
        log.info(
            "follow-up",
            extra={"request_id": request_id, "session_id": session_id, "turns": len(session.turns)},
        )
        expanded = cast(SummarizeRequest, dict(request))
        expanded["document"] = session.document
        expanded["instructions"] = session.instructions
        # The first prompt must be the same bytes in every turn, or the cache misses.
        expanded["max_output_tokens"] = session.max_output_tokens
        expanded["model"] = session.model
        return expanded, session

    async def _open(self, session_id: str, tier: str) -> Session | None:
        """A session's entry from its first request (None: no such request)."""
        first = await self._first(self._topics.requests, session_id, "SummarizeRequest")
        if first is None or first.get("session_of"):
            return None
        request = cast(SummarizeRequest, first)
        return Session(
            user_id=request["user_id"],
            document=request["document"],
            instructions=request.get("instructions"),
            max_output_tokens=request.get("max_output_tokens"),
            model=request.get("model"),
            created_at=int(request.get("created_at") or 0),
            tier=tier,
        )

    async def _read_answers(self, session_id: str, session: Session) -> bool:
        """Fill in answers now in `results`; True when any was found."""
        changed = False
        if session.answer is None:
            session.answer = await self._answer(session_id)
            changed = session.answer is not None
        for turn in session.turns:
            if turn.answer is None:
                turn.answer = await self._answer(turn.request_id)
                changed = changed or turn.answer is not None
        return changed

    async def _answer(self, request_id: str) -> str | None:
        record = await self._last(self._topics.results, request_id, "SummaryResult")
        result = cast(SummaryResult | None, record)
        if result is None or result["status"] not in ("COMPLETED", "PARTIAL"):
            return None
        return result["summary"] or None

    async def _first(self, topic: str, key: str, schema: str) -> dict[str, Any] | None:
        try:
            async for record in read_request_records(
                self._connection, topic, key, schema=schema, stop_at_terminal=False
            ):
                return record
        except Exception as exc:  # broker trouble: the agent retries the record
            raise SessionUnavailableError(f"cannot read {topic}: {exc!r}") from exc
        return None

    async def _last(self, topic: str, key: str, schema: str) -> dict[str, Any] | None:
        found = None
        try:
            async for record in read_request_records(
                self._connection, topic, key, schema=schema, stop_at_terminal=False
            ):
                found = record
        except Exception as exc:
            raise SessionUnavailableError(f"cannot read {topic}: {exc!r}") from exc
        return found


def conversation(job: InferenceJob, session: Session, session_id: str) -> InferenceJob:
    """A prepared follow-up job: its earlier turns, the document marked for caching."""
    turns = session.conversation(job["request_id"])
    job["session_id"] = session_id
    job["turns"] = turns
    job["cache_prompt"] = True
    memory = sum(count_tokens(t) for t in turns)
    job["memory_tokens"] = int(job.get("memory_tokens") or 0) + memory
    job["input_tokens_estimate"] += memory
    return job
