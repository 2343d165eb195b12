"""One request inside the inference engine: its job, its progress, and its lifecycle as enums.

A run moves QUEUED -> RUNNING -> FINISHING -> ENDED -> CLOSED; any state may go straight to
CLOSED (stopped without an end: another worker resumes it from the ``tokens`` topic).
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from pipeline.core import events
from pipeline.core.events import StreamMeta
from pipeline.core.longdoc import parent_of
from pipeline.core.records import InferenceJob, Trace, Usage


class RunState(enum.Enum):
    """Where a run is in its life."""

    QUEUED = "queued"  # submitted; its task has not run a step yet
    RUNNING = "running"  # its task runs: waiting for a grant, or calling the upstream
    FINISHING = "finishing"  # its terminal event is being published
    ENDED = "ended"  # its terminal event is out
    CLOSED = "closed"  # gone from the engine, ended or not


_NEXT: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset({RunState.RUNNING, RunState.CLOSED}),
    RunState.RUNNING: frozenset({RunState.FINISHING, RunState.CLOSED}),
    # A deadline that passes while a terminal event fails to publish tries again.
    RunState.FINISHING: frozenset({RunState.FINISHING, RunState.ENDED, RunState.CLOSED}),
    RunState.ENDED: frozenset({RunState.CLOSED}),
    RunState.CLOSED: frozenset({RunState.CLOSED}),
}


class Holding(enum.Enum):
    """What the dispatcher gave the run, which it must give back when it closes."""

    NOTHING = "nothing"
    SLOT = "slot"  # a running slot of the scheduler
    SLOT_AND_PERMIT = "slot_and_permit"  # and the breaker's consent to its next upstream call


class Interrupt(enum.Enum):
    """Why the run's task was (or will be) cancelled."""

    NONE = "none"
    CANCEL = "cancel"  # engine.cancel (a client, say): the run ends with CANCELLED
    SHUTDOWN = "shutdown"  # the engine stops: end silently, another worker resumes


class Continuation(enum.Enum):
    """How a broken stream is resumed: the text so far as an assistant prefill, or (for
    models that refuse a prefill) as an assistant turn plus a user turn asking for the rest."""

    PREFILL = "prefill"
    PROMPT = "prompt"


@dataclass
class Outbox:
    """A run's deltas not sent yet, which go out as one record once the send under way is
    acknowledged (docs/architecture.md, "Coalesced token records")."""

    pending: list[str] = field(default_factory=list)
    first_seq: int = 0  # the seq of pending[0]
    sending: asyncio.Task[None] | None = None
    failure: Exception | None = None
    closed: bool = False  # nothing more is sent after the send under way
    last_sent_at: float | None = None  # loop time of the last DELTA record's send
    # The run's usage as of an attempt's first token, for the next DELTA record: the next owner
    # bills the attempt's input from it (docs/architecture.md, "Billing a resumed stream").
    usage: Usage | None = None
    # What reached `tokens`: the seqs sent, and the last usage a DELTA carried out.
    sent_seqs: int = 0
    sent_usage: Usage | None = None

    def published(self, seqs: int, usage: Usage | None) -> None:
        """A DELTA record of ``seqs`` seqs (and ``usage``, if it carried one) is out."""
        self.sent_seqs += seqs
        if usage is not None:
            self.sent_usage = usage


@dataclass
class ResumeState:
    """What a previous worker already streamed for a request (built from the tokens topic)."""

    text: str
    last_seq: int
    attempts: int
    input_tokens: int
    output_tokens: int
    # The trace of the earlier events (inference_start, first_token...), when known.
    trace: Trace = field(default_factory=dict)
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


@dataclass(eq=False)
class Run:
    """One request inside the engine: its job, progress and lifecycle."""

    job: InferenceJob
    grant: asyncio.Future[None]
    resume: ResumeState | None
    deadline_ms: int
    seq: int = 0
    text: str = ""
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0  # prompt caching: not in input_tokens
    cache_read_input_tokens: int = 0
    streamed: int = 0  # output tokens behind the text so far (what max_tokens limits)
    trace: Trace = field(default_factory=dict)
    chunk_summaries: list[str] | None = None
    continuation: Continuation = Continuation.PREFILL
    task: asyncio.Task[None] | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    state: RunState = RunState.QUEUED
    holding: Holding = Holding.NOTHING
    interrupt: Interrupt = Interrupt.NONE
    cancel_reason: str = ""
    outbox: Outbox = field(default_factory=Outbox)
    # 0 for the sources served first (WorkerSettings.priority_sources), 1 for the others.
    priority: int = 1
    meta: StreamMeta = field(init=False)
    # Its terminal event (which bills the whole run) may be out: set as its send begins, and
    # cleared if the emit refused it before sending (docs/architecture.md, "Billing a resumed
    # stream"). A run that reached FINISHING but failed to flush its deltas sent no terminal.
    terminal_out: bool = False
    # The usage the run started from (inherited from `tokens`, or a long document's map calls):
    # what this run adds to it is its own upstream work.
    inherited: Usage = field(init=False)

    def __post_init__(self) -> None:
        self.meta = StreamMeta.of(self.job)
        if self.resume is not None:
            self.seq = self.resume.last_seq
            self.text = self.resume.text
            self.attempts = self.resume.attempts
            self.input_tokens = self.resume.input_tokens
            self.output_tokens = self.resume.output_tokens
            self.cache_creation_input_tokens = self.resume.cache_creation_input_tokens
            self.cache_read_input_tokens = self.resume.cache_read_input_tokens
            self.streamed = self.resume.output_tokens
            self.trace.update(self.resume.trace)
        # A long document's final reduce bills its map and collapse calls with it; a resumed
        # run counted them already (its usage came from an event that included them).
        base = self.job.get("base_usage")
        if base and (self.resume is None or not self.resume.input_tokens):
            self.input_tokens += base["input_tokens"]
            self.output_tokens += base["output_tokens"]
            self.attempts += base["attempts"]
        self.inherited = self.usage()

    def usage(self) -> Usage:
        """Every token the run's upstream calls used so far, with what it inherited."""
        return events.usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            attempts=self.attempts,
            cache_creation_input_tokens=self.cache_creation_input_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens,
        )

    def unpublished_usage(self) -> Usage | None:
        """What this run's upstream calls used that a next owner resuming it from `tokens` does
        not bill: the input of attempts no DELTA reported, and output never sent as a seq
        (docs/architecture.md, "Billing a resumed stream"). None when that is nothing."""
        used, base = self.usage(), self.inherited
        # A next owner bills input from the last usage out, else from what this run inherited.
        billed_input = self.outbox.sent_usage or base
        unbilled = {
            name: max(0, int(used[name]) - int(billed_input[name]))
            for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        }
        output = max(0, used["output_tokens"] - base["output_tokens"] - self.outbox.sent_seqs)
        if not output and not any(unbilled.values()):
            return None
        return events.usage(
            input_tokens=unbilled["input_tokens"],
            output_tokens=output,
            attempts=0,
            cache_creation_input_tokens=unbilled["cache_creation_input_tokens"],
            cache_read_input_tokens=unbilled["cache_read_input_tokens"],
        )

    def advance(self, state: RunState) -> None:
        """Move to ``state``; a transition the lifecycle does not have is a bug."""
        if state not in _NEXT[self.state]:
            raise RuntimeError(f"run {self.request_id}: {self.state.name} -> {state.name}")
        self.state = state

    @property
    def closed(self) -> bool:
        return self.state is RunState.CLOSED

    @property
    def ended(self) -> bool:
        """Is its terminal event out (so the request is over everywhere)?"""
        return self.state is RunState.ENDED

    @property
    def request_id(self) -> str:
        return self.meta.request_id

    @property
    def user_id(self) -> str:
        return self.meta.user_id

    @property
    def weight(self) -> int:
        return int(self.job.get("weight") or 1)

    @property
    def group(self) -> tuple[str, int] | None:
        """A long document's chunk call: (its parent, the parent's cap on calls at once)."""
        cap = int(self.job.get("group_concurrency") or 0)
        return (parent_of(self.request_id), cap) if cap > 0 else None

    @property
    def log(self) -> dict[str, str]:
        return {"request_id": self.request_id, "user_id": self.user_id}
