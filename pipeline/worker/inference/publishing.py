"""A run's TokenEvents, built by pipeline/core/events.py and published in seq order.

Deltas are coalesced adaptively (docs/architecture.md, "Coalesced token records"): with no send
of the run under way a delta goes at once; while one is, further deltas wait and go out as one
record when it is acknowledged. The upstream reading loop never waits for an acknowledgement.
A cancel never cuts a send in half, so no seq is skipped; the terminal event goes after every
pending delta, and a terminal event that was sent is known to be out (the run is then ENDED).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from pipeline.core import events, longdoc
from pipeline.core.events import TerminalKind
from pipeline.core.records import ErrorInfo, TokenEvent
from pipeline.core.sealing import seal_text
from pipeline.worker.inference.runs import Run, RunState

logger = logging.getLogger("sumstream.inference")

Emit = Callable[[TokenEvent], Awaitable[None]]
# Seconds a run's next record waits after its previous one, given the load (0: none).
Hold = Callable[[Run], float]
Sleep = Callable[[float], Awaitable[None]]


def coalesce_hold_s(active_runs: int, light_runs: int, full_runs: int, max_hold_ms: float) -> float:
    """The hold between a run's records: none up to ``light_runs`` runs (a lone user's tokens
    go at once), rising linearly to ``max_hold_ms`` at ``full_runs``: under load each record
    carries more deltas, so the cost per token falls as the load grows."""
    if active_runs <= light_runs or max_hold_ms <= 0:
        return 0.0
    share = min(1.0, (active_runs - light_runs) / max(1, full_runs - light_runs))
    return share * max_hold_ms / 1000.0


# A long document's chunk calls stream to nobody (its client follows their progress, not their
# text), so each of their records waits at least this long after the previous one: a call of
# 400 tokens at 10 ms makes ~16 records instead of up to 400, and the worker, the broker and
# every gateway's tail handle that many fewer beside the short requests (docs/architecture.md,
# "Long documents", the bench). A crash loses at most this much of a call's text to redo.
CHUNK_HOLD_S = 0.25


def run_hold_s(request_id: str, load_hold_s: float) -> float:
    """The hold of a run: the load's, and at least ``CHUNK_HOLD_S`` for a chunk call."""
    if longdoc.parse_chunk_id(request_id) is None:
        return load_hold_s
    return max(load_hold_s, CHUNK_HOLD_S)


class EmitRefused(Exception):
    """The emit refused an event before sending it (its request's partition moved to another
    worker): nothing of it is out."""


class PublishError(Exception):
    """``emit`` failed: the request cannot be ended here (the next owner resumes it)."""


class RunPublisher:
    """Numbers a run's events and hands them to ``emit``."""

    def __init__(self, emit: Emit, hold: Hold | None = None, sleep: Sleep = asyncio.sleep) -> None:
        self._emit = emit
        self._hold = hold
        self._sleep = sleep

    async def started(self, run: Run) -> None:
        """The STARTED event, with the run's trace so far."""
        run.seq += 1
        await self._publish(
            run, events.started(run.meta, seq=run.seq, attempt=_attempt(run), trace=run.trace)
        )

    async def delta(self, run: Run, text: str) -> None:
        """The next piece of text as the next seq: sent now, or with the next record when a
        send of the run is under way. Raises PublishError if an earlier send failed."""
        box = run.outbox
        if box.failure is not None:
            raise PublishError(f"publishing a DELTA of {run.request_id} failed") from box.failure
        run.seq += 1
        if not box.pending:
            box.first_seq = run.seq
        box.pending.append(text)
        if box.sending is None and not box.closed:
            box.sending = asyncio.ensure_future(self._drain(run))

    async def close(self, run: Run) -> None:
        """Send nothing more for ``run`` but the record under way, and wait for that one
        (a run stopped without an end: the next owner resumes from what is out)."""
        box = run.outbox
        box.closed = True
        while box.sending is not None:
            await asyncio.shield(box.sending)

    async def _drain(self, run: Run) -> None:
        # One task per burst of deltas; the run's task never waits for it except to finish.
        box = run.outbox
        try:
            loop = asyncio.get_running_loop()
            while box.pending and not box.closed:
                if self._hold is not None and box.last_sent_at is not None:
                    wait = box.last_sent_at + self._hold(run) - loop.time()
                    if wait > 0:
                        # Under load the next record waits a little: more deltas join it.
                        await self._sleep(wait)
                        if box.closed:
                            break
                box.last_sent_at = loop.time()
                pieces, box.pending = box.pending, []
                usage, box.usage = box.usage, None
                event = events.delta(
                    run.request_id,
                    first_seq=box.first_seq,
                    pieces=pieces,
                    attempt=_attempt(run),
                    usage=usage,
                )
                # One seal per record, not per piece: its cuts index the plain text.
                event["text"] = seal_text(event["text"], run.job["user_id"])
                try:
                    await self._emit(event)
                except asyncio.CancelledError as exc:
                    # Only a stopping loop cancels a send: its seqs may not be out, so nothing
                    # may follow them (the terminal event either).
                    box.failure = RuntimeError(
                        f"the send of seqs up to {event['seq']} was cancelled"
                    )
                    box.failure.__cause__ = exc
                    raise
                except Exception as exc:
                    box.failure = exc
                    logger.warning(
                        "publishing seqs %d-%d failed: %r",
                        events.first_seq(event),
                        event["seq"],
                        exc,
                        extra=run.log,
                    )
                    return
                box.published(len(pieces), usage)
        finally:
            box.sending = None

    async def _flush(self, run: Run) -> None:
        """Wait until every pending delta is out; PublishError if one could not be sent."""
        box = run.outbox
        while box.sending is not None:
            await asyncio.shield(box.sending)
        if box.failure is not None:
            raise PublishError(f"publishing a DELTA of {run.request_id} failed") from box.failure

    async def finish(
        self,
        run: Run,
        kind: TerminalKind,
        *,
        stop_reason: str | None = None,
        error: ErrorInfo | None = None,
    ) -> None:
        """The terminal event, with the run's usage over all its attempts."""
        run.advance(RunState.FINISHING)
        await self._flush(run)
        run.seq += 1
        usage = events.usage(
            input_tokens=run.input_tokens,
            output_tokens=run.output_tokens,
            attempts=run.attempts,
            cache_creation_input_tokens=run.cache_creation_input_tokens,
            cache_read_input_tokens=run.cache_read_input_tokens,
            document_tokens=int(run.job.get("document_tokens") or 0),
            memory_tokens=int(run.job.get("memory_tokens") or 0),
            instruction_tokens=int(run.job.get("instruction_tokens") or 0),
        )
        event = events.terminal(
            run.meta,
            kind,
            seq=run.seq,
            attempt=_attempt(run),
            usage=usage,
            error=error,
            stop_reason=stop_reason,
            trace=run.trace,
        )
        await self._publish(run, event)
        logger.info(
            "request ended: %s",
            kind,
            extra={**run.log, "attempts": run.attempts, "output_tokens": run.output_tokens},
        )

    async def _publish(self, run: Run, event: TokenEvent) -> None:
        terminal = run.state is RunState.FINISHING
        if terminal:
            run.terminal_out = True
        send = asyncio.ensure_future(self._send(run, event, terminal))
        try:
            await asyncio.shield(send)
        except asyncio.CancelledError:
            # Finish the send under way, then let the cancellation through.
            with contextlib.suppress(Exception):
                await send
            raise
        except Exception as exc:
            raise PublishError(f"publishing {event['kind']} seq {event['seq']} failed") from exc

    async def _send(self, run: Run, event: TokenEvent, terminal: bool) -> None:
        """Emit ``event``; a terminal sent ends the run, one the emit refused is not out."""
        try:
            await self._emit(event)
        except EmitRefused:
            run.terminal_out = False
            raise
        if terminal:
            run.advance(RunState.ENDED)


def _attempt(run: Run) -> int:
    # Events before the first upstream call still name attempt 1.
    return max(1, run.attempts)
