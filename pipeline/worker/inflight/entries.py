"""The in-flight table's entries and the state machine they follow.

An accepted job is RUNNING (its bytes kept, so whoever owns its partition next can resume it)
until its terminal event is out, then DONE. A cancel for a job not running here makes it
CANCEL_REQUESTED, with or without the job: one whose job never came only ends that job when it
arrives. The functions here decide each transition; ``InflightWork`` carries them out.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

_HEADER = struct.Struct(">cq")


class EntryState(enum.Enum):
    """An entry's state; the value is the byte the changelog stores, so it never changes."""

    RUNNING = "R"
    CANCEL_REQUESTED = "C"
    DONE = "D"


@dataclass(frozen=True, slots=True)
class Entry:
    """One in-flight table value: its state, when it was written, and the job's bytes."""

    state: EntryState
    at_ms: int
    job: bytes = b""

    def encode(self) -> bytes:
        return _HEADER.pack(self.state.value.encode(), self.at_ms) + self.job

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        state, at_ms = _HEADER.unpack_from(raw)
        return cls(EntryState(state.decode()), at_ms, bytes(raw[_HEADER.size :]))

    @property
    def unfinished(self) -> bool:
        """Does the entry still need a run, a resume or an end?"""
        return self.state is not EntryState.DONE


def done(now_ms: int) -> Entry:
    """The marker of a request whose terminal event is out (its job bytes are dropped)."""
    return Entry(EntryState.DONE, now_ms)


class JobAction(enum.Enum):
    """What to do with a job record read from `preprocessed`."""

    ADMIT = "admit"  # new here: write RUNNING, then run it (or resume it, if maybe a replay)
    END_CANCELLED = "end_cancelled"  # its cancel came first: end it without a model call
    RESUME = "resume"  # in the table but running nowhere (an earlier attempt failed)
    SKIP = "skip"  # a replay of a job that is running, being resumed, or finished


def on_job(entry: Entry | None, *, handled_here: bool) -> JobAction:
    """The transition for a job record; ``handled_here``: running, waiting or resuming here."""
    if entry is None:
        return JobAction.ADMIT
    if entry.state is EntryState.CANCEL_REQUESTED and not entry.job:
        return JobAction.END_CANCELLED
    if entry.unfinished and not handled_here:
        return JobAction.RESUME
    return JobAction.SKIP


def on_cancel(entry: Entry | None, now_ms: int) -> Entry | None:
    """The entry a cancel writes for a job not running here, or None to write nothing."""
    if entry is None:
        # The job has not reached inference yet; it is ended when it does.
        return Entry(EntryState.CANCEL_REQUESTED, now_ms)
    if entry.state is EntryState.RUNNING:
        # Waiting to be resumed after a rebalance; the resume ends it instead.
        return Entry(EntryState.CANCEL_REQUESTED, entry.at_ms, entry.job)
    return None


class ResumeAction(enum.Enum):
    """What a resume does with an entry once it has read the request's stream in `tokens`."""

    SKIP = "skip"  # finished meanwhile (or gone): nothing to do
    MARK_DONE = "mark_done"  # its stream already ended: record that, do not run it again
    END_CANCELLED = "end_cancelled"  # cancelled while nobody ran it: end the stream here
    CONTINUE = "continue"  # run it, from where its stream stops (or from the start)


def on_resume(current: Entry | None, *, stream_ended: bool) -> ResumeAction:
    """The transition for an entry being resumed; ``stream_ended``: `tokens` has its end."""
    if current is None or current.state is EntryState.DONE:
        return ResumeAction.SKIP
    if stream_ended:
        return ResumeAction.MARK_DONE
    if current.state is EntryState.CANCEL_REQUESTED:
        return ResumeAction.END_CANCELLED
    return ResumeAction.CONTINUE


def is_stale(entry: Entry, horizon_ms: int) -> bool:
    """May the purge delete it? Old done markers, and old cancels whose job never came (both
    only serve to skip replays)."""
    marker = entry.state is EntryState.DONE or (
        entry.state is EntryState.CANCEL_REQUESTED and not entry.job
    )
    return marker and entry.at_ms < horizon_ms
