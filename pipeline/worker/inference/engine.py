"""The inference engine: scheduling, concurrency, deadlines and cancellation of runs against one
upstream (docs/architecture.md, "The inference engine").

The Faust agent submits jobs and publishes what the engine emits; the engine keeps nothing that
the ``tokens`` topic does not also hold, so another worker can resume any request from there.
Each job is one task that owns its whole life (queued, running, retrying, ending), so a cancel or
a deadline is a plain task cancellation that closes the upstream HTTP stream on its way out.
An engine lives as long as the worker: a rebalance releases only the runs whose partitions moved
(docs/architecture.md, "Rebalances"); the upstream's health (``Upstream``) is shared as well.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from pipeline.core import events
from pipeline.core.longdoc import parse_chunk_id
from pipeline.core.metrics import STAGE_SECONDS
from pipeline.core.records import ErrorInfo, InferenceJob, TokenEvent
from pipeline.core.settings import WorkerSettings
from pipeline.worker.inference.attempts import Attempts, GiveUp
from pipeline.worker.inference.breaker import BreakerState, CircuitBreaker
from pipeline.worker.inference.publishing import (
    Emit,
    EmitRefused,
    PublishError,
    RunPublisher,
    coalesce_hold_s,
    run_hold_s,
)
from pipeline.worker.inference.retry import RetryBudget
from pipeline.worker.inference.runs import Holding, Interrupt, ResumeState, Run, RunState
from pipeline.worker.inference.scheduler import FairScheduler
from pipeline.worker.inference.upstream import Upstream

__all__ = ["Emit", "InferenceEngine", "OnFinished", "ResumeState", "Upstream"]

logger = logging.getLogger("sumstream.inference")

OnFinished = Callable[[str], Awaitable[None]]

# The scheduler's class of work that waits behind interactive requests (upstream.py).
BATCH_PRIORITY = 1
# Cancels that arrive before their job (control and preprocessed are different topics).
EARLY_CANCELS_KEPT = 10_000


class InferenceEngine:
    """Runs inference jobs against one upstream and emits their TokenEvents in seq order."""

    def __init__(
        self,
        settings: WorkerSettings,
        upstream: Upstream,
        emit: Emit,
        on_finished: OnFinished | None = None,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self._on_finished = on_finished
        self._clock = clock
        self._publisher = RunPublisher(emit, hold=self._coalesce_hold)
        self._attempts = Attempts(
            settings, upstream, self._publisher.delta, clock=clock, rng=rng or random.Random()
        )
        self._runs: dict[str, Run] = {}
        # Runs that stopped on an emit the gate refused (their partition moved) before the
        # release that follows every such refusal took them: that release bills their work.
        self._refused: list[Run] = []
        self._early_cancels: OrderedDict[str, str] = OrderedDict()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def breaker(self) -> CircuitBreaker:
        return self.upstream.breaker

    @property
    def budget(self) -> RetryBudget:
        return self.upstream.budget

    @property
    def scheduler(self) -> FairScheduler[Run]:
        return self.upstream.scheduler

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start handing queued jobs to the upstream."""
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch(), name="inference-dispatch")

    async def stop(self) -> list[TokenEvent]:
        """Stop every job WITHOUT a terminal event: another worker resumes them from Kafka.

        Returns the USAGE events of the work they received but could not publish.
        """
        self._stopping = True
        tasks: list[asyncio.Task[None]] = []
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            tasks.append(self._dispatcher)
        runs = list(self._runs.values())
        for run in runs:
            run.interrupt = Interrupt.SHUTDOWN
            if run.task is not None:
                run.task.cancel()
                tasks.append(run.task)
        await asyncio.gather(*tasks, return_exceptions=True)
        # Tasks cancelled before their first step ran no cleanup of their own; the scheduler
        # outlives this engine, so every slot and queue place they took is given back.
        for run in list(self._runs.values()):
            self._release(run)
        self._runs.clear()
        return _unpublished(self._with_refused(runs))

    async def release(self, request_ids: set[str]) -> list[TokenEvent]:
        """Stop these runs WITHOUT a terminal event (their partitions moved to another worker,
        which resumes them from Kafka); every other run goes on untouched.

        Returns the USAGE events of the work they received but could not publish.
        """
        runs = [run for rid, run in list(self._runs.items()) if rid in request_ids]
        tasks: list[asyncio.Task[None]] = []
        for run in runs:
            run.interrupt = Interrupt.SHUTDOWN
            if run.task is not None:
                run.task.cancel()
                tasks.append(run.task)
        await asyncio.gather(*tasks, return_exceptions=True)
        for run in runs:
            self._release(run)
        return _unpublished(self._with_refused(runs))

    def _with_refused(self, runs: list[Run]) -> list[Run]:
        """``runs`` and the runs stopped by a refused emit since the last release."""
        refused, self._refused = self._refused, []
        taken = {id(run) for run in runs}
        return runs + [run for run in refused if id(run) not in taken]

    def request_ids(self) -> set[str]:
        """The requests queued or running here."""
        return {rid for rid, run in self._runs.items() if not run.closed}

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- the agent's API -------------------------------------------------------------------

    async def submit(self, job: InferenceJob, resume: ResumeState | None = None) -> None:
        """Queue a job. Blocks while the scheduler is full or the breaker is open, so the
        agent stops pulling and the jobs wait in Kafka as lag."""
        if self._stopping:
            raise RuntimeError("the inference engine is stopping")
        request_id = str(job["request_id"])
        if self.breaker.state is BreakerState.OPEN:
            # Jobs taken now could only wait in memory, invisible to the gateway's lag-based
            # admission; left in Kafka they show up as lag and it sheds new load instead.
            logger.info("circuit open: not taking jobs", extra={"request_id": request_id})
            await self.breaker.wait_not_open()
            if self._stopping:
                raise RuntimeError("the inference engine is stopping")
        if self.upstream.limiter.paused_until > time.time():
            # A retry-after paused every call: the same, for the same reason.
            logger.info("upstream paused: not taking jobs", extra={"request_id": request_id})
            await self.upstream.limiter.wait_unpaused()
            if self._stopping:
                raise RuntimeError("the inference engine is stopping")
        if request_id in self._runs:
            logger.info("job already active, ignored", extra={"request_id": request_id})
            return
        run = self._new_run(job, resume)
        self._runs[request_id] = run
        self.budget.deposit()
        early = self._early_cancels.pop(request_id, None)
        if early is not None:
            run.interrupt, run.cancel_reason = Interrupt.CANCEL, early
        else:
            try:
                await self.scheduler.put(run)
            except BaseException:
                self._runs.pop(request_id, None)
                raise
            if self._stopping:
                self.scheduler.remove(request_id)
                self._runs.pop(request_id, None)
                return
        run.task = asyncio.create_task(self._run(run), name=f"inference:{request_id}")

    async def cancel(self, request_id: str, reason: str = "client") -> bool:
        """Cancel a queued or running request: True if it was; it then ends with CANCELLED."""
        run = self._runs.get(request_id)
        if run is None:
            # Its job may still be on its way through `preprocessed`.
            self._early_cancels[request_id] = reason
            while len(self._early_cancels) > EARLY_CANCELS_KEPT:
                self._early_cancels.popitem(last=False)
            return False
        if run.state in (RunState.ENDED, RunState.CLOSED):
            return False
        if run.state is RunState.FINISHING or run.interrupt is not Interrupt.NONE:
            return True
        run.interrupt, run.cancel_reason = Interrupt.CANCEL, reason
        # A task that has not started yet sees the interrupt when it does.
        if run.task is not None and run.state is not RunState.QUEUED:
            run.task.cancel()
        logger.info("cancelling", extra={**run.log, "reason": reason})
        return True

    def is_active(self, request_id: str) -> bool:
        """Is the request queued or running here?"""
        run = self._runs.get(request_id)
        return run is not None and not run.closed

    @property
    def active(self) -> int:
        return sum(1 for run in self._runs.values() if not run.closed)

    # -- internals -------------------------------------------------------------------------

    def _coalesce_hold(self, run: Run) -> float:
        s = self.settings
        load = coalesce_hold_s(
            len(self._runs), s.coalesce_light_runs, s.coalesce_full_runs, s.coalesce_max_hold_ms
        )
        return run_hold_s(run.request_id, load)

    def _new_run(self, job: InferenceJob, resume: ResumeState | None) -> Run:
        deadline_ms = int(job.get("deadline_ms") or 0)
        if deadline_ms <= 0:
            deadline_ms = int((self._clock() + self.settings.default_deadline_s) * 1000)
        return Run(
            job=job,
            grant=asyncio.get_running_loop().create_future(),
            resume=resume,
            deadline_ms=deadline_ms,
            trace={str(k): int(v) for k, v in (job.get("trace") or {}).items()},
            priority=self._priority(job),
        )

    def _priority(self, job: InferenceJob) -> int:
        """The scheduler's class of a job: a long document's chunk calls are batch work and
        wait behind interactive requests (docs/architecture.md, "Long documents")."""
        if parse_chunk_id(str(job["request_id"])) is not None:
            return BATCH_PRIORITY
        return self.upstream.priority_of(str(job.get("source") or ""))

    async def _dispatch(self) -> None:
        try:
            await self._dispatch_forever()
        except Exception:
            logger.critical("the inference dispatcher crashed; no job will start", exc_info=True)
            raise

    async def _dispatch_forever(self) -> None:
        # One job at a time: a free slot and a fair turn (scheduler), then the breaker's consent.
        while True:
            run = await self.scheduler.next()
            run.holding = Holding.SLOT
            await self.breaker.wait_closed_or_probe()
            if run.closed or run.grant.done():
                # It ended (cancel, deadline) while we waited: give back what we took for it.
                self.breaker.record_abandoned()
                continue
            run.holding = Holding.SLOT_AND_PERMIT
            run.grant.set_result(None)

    async def _run(self, run: Run) -> None:
        run.advance(RunState.RUNNING)
        try:
            try:
                if run.interrupt is Interrupt.NONE:
                    await self._run_until_deadline(run)
                else:
                    await self._publisher.finish(run, "CANCELLED", error=self._cancel_error(run))
            except asyncio.CancelledError:
                if run.interrupt is not Interrupt.CANCEL or run.ended:
                    raise
                # Our own cancel (engine.cancel): the request ends here, with its usage.
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                await self._publisher.finish(run, "CANCELLED", error=self._cancel_error(run))
        except PublishError as exc:
            # Without a terminal event the request stays in the agent's in-flight table and is
            # resumed from the tokens topic by the next owner.
            if isinstance(exc.__cause__, EmitRefused):
                logger.info("run stopped: its partition moved", extra=run.log)
                self._refused.append(run)
            else:
                logger.exception("inference job failed", extra=run.log)
        except Exception:
            logger.exception("inference job failed", extra=run.log)
        finally:
            try:
                # A stopped run sends no more deltas: the next owner resumes from what is out.
                await self._publisher.close(run)
            finally:
                ended = run.ended
                self._release(run)
        if ended and self._on_finished is not None:
            try:
                await self._on_finished(run.request_id)
            except Exception:
                logger.exception("on_finished failed", extra=run.log)

    def _release(self, run: Run) -> None:
        """Close the run and give back its scheduler place and the breaker's unused consent."""
        if run.closed:
            return
        run.advance(RunState.CLOSED)
        if run.holding is Holding.SLOT_AND_PERMIT:
            # The breaker's consent (maybe the half-open probe) was never used.
            self.breaker.record_abandoned()
        if run.holding is Holding.NOTHING:
            self.scheduler.remove(run.request_id)
        else:
            self.scheduler.done(run)
        run.holding = Holding.NOTHING
        if self._runs.get(run.request_id) is run:
            del self._runs[run.request_id]

    async def _run_until_deadline(self, run: Run) -> None:
        loop = asyncio.get_running_loop()
        deadline = asyncio.timeout_at(loop.time() + run.deadline_ms / 1000.0 - self._clock())
        try:
            async with deadline:
                await run.grant
                STAGE_SECONDS.labels(stage="engine_queue").observe(
                    time.monotonic() - run.enqueued_at
                )
                await self._execute(run)
        except TimeoutError:
            if not deadline.expired():
                raise
            if run.ended:
                return  # it ended just as the deadline passed
            logger.info("deadline exceeded", extra=run.log)
            await self._publisher.finish(
                run,
                "ERROR",
                error=events.error_info(
                    "deadline_exceeded",
                    "the request's deadline passed; the text so far is kept",
                    retriable=False,
                    # A job whose deadline passed in the queue has no text: FAILED, not PARTIAL.
                    partial=bool(run.text),
                ),
            )

    async def _execute(self, run: Run) -> None:
        now_ms = int(self._clock() * 1000)
        if run.resume is None:
            run.trace["inference_start"] = now_ms
            await self._publisher.started(run)
        else:
            run.trace.setdefault("inference_start", now_ms)
        try:
            prompt = await self._attempts.prompt(run)
            finished = await self._attempts.stream(run, prompt)
        except GiveUp as give_up:
            partial = give_up.partial if give_up.partial is not None else bool(run.text)
            logger.warning(
                "request failed: %s", give_up.message, extra={**run.log, "code": give_up.code}
            )
            error = events.error_info(
                give_up.code, give_up.message, retriable=give_up.retriable, partial=partial
            )
            await self._publisher.finish(run, "ERROR", error=error)
            return
        except PublishError:
            raise
        except Exception as exc:
            # A bug must not leave the client with a stream that just stops.
            logger.exception("inference failed unexpectedly", extra=run.log)
            error = events.error_info(
                "internal_error",
                f"inference failed: {exc!r}",
                retriable=True,
                partial=bool(run.text),
            )
            await self._publisher.finish(run, "ERROR", error=error)
            return
        missing = [int(n) for n in run.job.get("missing_sections") or []]
        if missing:
            # A long document some of whose parts no summary covers: the summary of the rest,
            # as PARTIAL, naming what is missing (docs/architecture.md, "Long documents").
            names = ", ".join(str(n) for n in missing)
            error = events.error_info(
                "sections_missing",
                f"parts {names} of the document could not be summarized; the summary covers "
                "the rest",
                retriable=False,
                partial=True,
            )
            await self._publisher.finish(run, "ERROR", error=error)
            return
        await self._publisher.finish(run, "DONE", stop_reason=finished.stop_reason)

    def _cancel_error(self, run: Run) -> ErrorInfo:
        return events.error_info(
            "cancelled",
            f"cancelled ({run.cancel_reason})",
            retriable=False,
            partial=bool(run.text),
        )


def _unpublished(runs: list[Run]) -> list[TokenEvent]:
    """USAGE events for the upstream work of stopped runs that `tokens` does not show
    (docs/architecture.md, "Billing a resumed stream")."""
    out = []
    for run in runs:
        # A terminal event may be out (it bills the whole run); a long document's chunk call
        # bills through its ChunkSummary: neither is covered here.
        if run.terminal_out or parse_chunk_id(run.request_id) is not None:
            continue
        used = run.unpublished_usage()
        if used is not None:
            out.append(events.unpublished_usage(run.meta, used))
    return out
