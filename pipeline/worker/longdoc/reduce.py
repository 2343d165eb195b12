"""The reduce step of a long document, as pure state transitions (docs/architecture.md, "Long
documents").

``DocState`` is one parent request's progress: its plan, the summaries of the level under way,
the usage so far by phase. ``on_summary`` takes one SUMMARY or FAILED record and says what to
do: the progress event, and when the level is complete the next level's collapse jobs or the
final reduce job. A record seen before (a redelivery after a crash) changes nothing, so the
agent may replay its input freely.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, cast

from pipeline.core import events, longdoc
from pipeline.core.codec import codec
from pipeline.core.prompt import SYSTEM_PROMPT, user_message
from pipeline.core.records import ChunkSummary, InferenceJob, TokenEvent, Usage
from pipeline.llm.extractive import count_tokens
from pipeline.worker.prepare import CHUNK_PLACEHOLDER

COLLAPSE_INSTRUCTIONS = (
    "The document above consists of summaries of consecutive parts of one document. Combine "
    "them into one summary of at most {max_tokens} tokens, keeping their order; it will be "
    "combined with others."
)
PHASES = ("map", "collapse")


@dataclass
class DocState:
    """One long document's reduce progress (kept in the ``longdoc`` table as JSON)."""

    levels: list[int]
    group_size: int
    job: bytes  # the final reduce InferenceJob, encoded
    summary_tokens: int
    concurrency: int = 0  # the tier's map_concurrency, for the collapse calls
    reuse_key: str = ""  # where the map summaries are kept for reuse ("" : not kept)
    reused: int = 0  # map summaries taken from an earlier request, not called again
    level: int = 0
    summaries: dict[int, str] = field(default_factory=dict)  # index -> text, this level
    failed: list[int] = field(default_factory=list)  # indices of this level
    missing: list[int] = field(default_factory=list)  # map sections lost for good
    # phase -> [input, output, attempts, cost in micro-USD]
    usage: dict[str, list[int]] = field(default_factory=dict)
    done_calls: int = 0
    final_emitted: bool = False
    ended: bool = False

    def stored(self) -> bytes:
        """The table's value: once the final reduce is sent (or the request ended) only the
        marker that makes every later record a no-op, not the summaries and the job."""
        if self.final_emitted or self.ended:
            return replace(self, summaries={}, job=b"").encode()
        return self.encode()

    def encode(self) -> bytes:
        raw = {**self.__dict__, "job": base64.b64encode(self.job).decode()}
        raw["summaries"] = {str(k): v for k, v in self.summaries.items()}
        return json.dumps(raw, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> DocState:
        raw: dict[str, Any] = json.loads(value)
        raw["job"] = base64.b64decode(raw["job"])
        raw["summaries"] = {int(k): v for k, v in raw["summaries"].items()}
        return cls(**raw)

    @property
    def final(self) -> InferenceJob:
        return cast(InferenceJob, codec().decode_as(self.job, "InferenceJob"))

    @property
    def calls_before_final(self) -> int:
        return sum(self.levels[:-1])

    def total_usage(self) -> Usage:
        """The usage of every call so far (the cost is postprocess's price of each call)."""
        totals = [sum(u[i] for u in self.usage.values()) for i in range(4)]
        return events.usage(
            input_tokens=totals[0],
            output_tokens=totals[1],
            attempts=totals[2],
            cost_micro_usd=totals[3],
        )


@dataclass(frozen=True, slots=True)
class Step:
    """What one record makes the reduce step do."""

    jobs: list[InferenceJob] = field(default_factory=list)
    # Map summaries to keep for reuse (on the `reuse` topic, under the state's reuse_key).
    keep: list[ChunkSummary] = field(default_factory=list)
    progress: TokenEvent | None = None
    terminal: TokenEvent | None = None
    changed: bool = False


def on_plan(record: ChunkSummary, summary_tokens: int, concurrency: int = 0) -> DocState:
    """The state a PLAN record starts."""
    return DocState(
        levels=list(record["levels"]),
        group_size=max(2, record["group_size"]),
        job=record["job"],
        summary_tokens=summary_tokens,
        concurrency=concurrency,
        reuse_key=record.get("reuse_key") or "",
    )


def on_summary(state: DocState, record: ChunkSummary) -> Step:
    """Take one SUMMARY or FAILED record of the level under way."""
    level, index = record["level"], record["index"]
    seen = index in state.summaries or index in state.failed
    if state.ended or state.final_emitted or level != state.level or seen:
        return Step()  # a redelivery, or a record of a level already reduced
    usage = record.get("usage")
    if usage:
        phase = state.usage.setdefault(PHASES[min(level, 1)], [0, 0, 0, 0])
        phase[0] += usage["input_tokens"]
        phase[1] += usage["output_tokens"]
        phase[2] += usage["attempts"]
        phase[3] += usage["cost_micro_usd"]
    keep: list[ChunkSummary] = []
    if record["kind"] == "SUMMARY":
        state.summaries[index] = record["text"]
        called = bool(usage and usage["attempts"])
        if level == 0 and not called:
            state.reused += 1
        elif level == 0 and state.reuse_key:
            keep.append(record)
    else:
        state.failed.append(index)
    state.done_calls += 1
    if len(state.summaries) + len(state.failed) < state.levels[level]:
        stage = "map" if level == 0 else "collapse"
        return Step(keep=keep, progress=_progress(state, stage), changed=True)
    step = _level_complete(state)
    step.keep.extend(keep)
    return step


def _level_complete(state: DocState) -> Step:
    """Every call of the level answered: collapse again, reduce, or fail."""
    if state.level == 0:
        state.missing = sorted(state.failed)
    texts = [state.summaries[i] for i in sorted(state.summaries)]
    final = state.final
    meta = events.StreamMeta.of(final)
    if not texts:
        state.ended = True
        error = events.error_info(
            "chunks_failed",
            "no part of the document could be summarized",
            retriable=True,
            partial=False,
        )
        terminal = events.terminal(
            meta,
            "ERROR",
            seq=1,
            attempt=0,
            usage=state.total_usage(),
            error=error,
            trace=dict(final["trace"]),
        )
        return Step(terminal=terminal, changed=True)
    groups = [texts[i : i + state.group_size] for i in range(0, len(texts), state.group_size)]
    state.level += 1
    state.summaries, state.failed = {}, []
    if len(groups) == 1:
        state.final_emitted = True
        job = _final_job(state, final, texts)
        return Step(jobs=[job], progress=_progress(state, "reduce"), changed=True)
    # The level's real size (a failed call shrinks it), then the levels after it.
    rest = [len(groups)]
    while rest[-1] > state.group_size:
        rest.append(math.ceil(rest[-1] / state.group_size))
    state.levels = [*state.levels[: state.level], *rest, 1]
    jobs = [_collapse_job(state, final, i, group) for i, group in enumerate(groups)]
    return Step(jobs=jobs, progress=_progress(state, "collapse"), changed=True)


def _collapse_job(
    state: DocState, final: InferenceJob, index: int, texts: list[str]
) -> InferenceJob:
    prompt = user_message(
        "\n\n".join(t.strip() for t in texts),
        COLLAPSE_INSTRUCTIONS.format(max_tokens=state.summary_tokens),
    )
    return {
        **final,
        "request_id": longdoc.chunk_id(final["request_id"], state.level, index),
        "prompt": prompt,
        "max_output_tokens": state.summary_tokens,
        "group_concurrency": state.concurrency,
        "input_tokens_estimate": count_tokens(SYSTEM_PROMPT) + count_tokens(prompt),
        "trace": dict(final["trace"]),
    }


def _final_job(state: DocState, final: InferenceJob, texts: list[str]) -> InferenceJob:
    prompt = final["prompt"].replace(CHUNK_PLACEHOLDER, "\n\n".join(t.strip() for t in texts))
    return {
        **final,
        "prompt": prompt,
        "input_tokens_estimate": count_tokens(SYSTEM_PROMPT) + count_tokens(prompt),
        "missing_sections": [i + 1 for i in state.missing],
        "base_usage": state.total_usage(),
    }


def on_cancel(state: DocState, reason: str) -> tuple[list[str], TokenEvent | None]:
    """A cancel of the parent: the chunk calls to cancel, and its CANCELLED terminal (None
    once the final reduce runs: the engine ends it then)."""
    if state.ended or state.final_emitted:
        return [], None
    state.ended = True
    final = state.final
    parent = final["request_id"]
    calls = [
        longdoc.chunk_id(parent, state.level, i)
        for i in range(state.levels[state.level])
        if i not in state.summaries and i not in state.failed
    ]
    error = events.error_info("cancelled", f"cancelled ({reason})", retriable=False, partial=False)
    terminal = events.terminal(
        events.StreamMeta.of(final),
        "CANCELLED",
        seq=1,
        attempt=0,
        usage=state.total_usage(),
        error=error,
        trace=dict(final["trace"]),
    )
    return calls, terminal


def _progress(state: DocState, stage: str) -> TokenEvent:
    """The ``progress`` event after a call: done/total, tokens and cost so far."""
    usage = state.total_usage()
    payload: dict[str, object] = {
        "stage": stage,
        "done": state.done_calls,
        "total": state.calls_before_final,
        "level": state.level,
        "levels": len(state.levels),
        "input_tokens": usage["input_tokens"],
        "output_tokens": usage["output_tokens"],
        "cost_micro_usd": usage["cost_micro_usd"],
        "usage_by_phase": {
            phase: {"input_tokens": u[0], "output_tokens": u[1], "cost_micro_usd": u[3]}
            for phase, u in state.usage.items()
        },
        "missing_sections": [i + 1 for i in state.missing],
        "reused_chunks": state.reused,
    }
    return events.progress(events.StreamMeta.of(state.final), payload)
