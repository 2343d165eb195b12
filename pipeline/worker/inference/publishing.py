"""A run's TokenEvents, built by pipeline/core/events.py and published in seq order.

A cancel never cuts a send in half, so no seq is skipped and a terminal event that was sent is
known to be out (the run is then ENDED).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from pipeline.core import events
from pipeline.core.events import TerminalKind
from pipeline.core.records import ErrorInfo, TokenEvent
from pipeline.worker.inference.runs import Run, RunState

logger = logging.getLogger("sumstream.inference")

Emit = Callable[[TokenEvent], Awaitable[None]]


class PublishError(Exception):
    """``emit`` failed: the request cannot be ended here (the next owner resumes it)."""


class RunPublisher:
    """Numbers a run's events and hands them to ``emit``."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit

    async def started(self, run: Run) -> None:
        """The STARTED event, with the run's trace so far."""
        run.seq += 1
        await self._publish(
            run, events.started(run.meta, seq=run.seq, attempt=_attempt(run), trace=run.trace)
        )

    async def delta(self, run: Run, text: str) -> None:
        """A DELTA event with the next piece of text."""
        run.seq += 1
        await self._publish(
            run, events.delta(run.meta, seq=run.seq, attempt=_attempt(run), text=text)
        )

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
        run.seq += 1
        usage = events.usage(
            input_tokens=run.input_tokens, output_tokens=run.output_tokens, attempts=run.attempts
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
        send = asyncio.ensure_future(self._emit(event))
        try:
            await asyncio.shield(send)
        except asyncio.CancelledError:
            # Finish the send under way, then let the cancellation through.
            with contextlib.suppress(Exception):
                await send
                if terminal:
                    run.advance(RunState.ENDED)
            raise
        except Exception as exc:
            raise PublishError(f"publishing {event['kind']} seq {event['seq']} failed") from exc
        if terminal:
            run.advance(RunState.ENDED)


def _attempt(run: Run) -> int:
    # Events before the first upstream call still name attempt 1.
    return max(1, run.attempts)
