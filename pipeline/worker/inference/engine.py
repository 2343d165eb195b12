"""The inference engine: fair scheduling, bounded upstream streams, budgeted retries, a circuit
breaker, seamless resume, deadlines and cancellation (docs/architecture.md, "The inference engine").

The Faust agent submits jobs and publishes what the engine emits; the engine keeps nothing that
the ``tokens`` topic does not also hold, so another worker can resume any request from there.
Each job is one task that owns its whole life (queued, running, retrying, ending), so a cancel or
a deadline is a plain task cancellation that closes the upstream HTTP stream on its way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from pipeline.core.metrics import (
    INFLIGHT,
    INTER_TOKEN_SECONDS,
    RETRIES,
    RETRY_BUDGET_EXHAUSTED,
    STAGE_SECONDS,
    UPSTREAM_ATTEMPTS,
    UPSTREAM_ERRORS,
)
from pipeline.core.settings import WorkerSettings
from pipeline.llm.client import Finished, UpstreamAttemptError, UpstreamClient
from pipeline.worker.inference.breaker import BreakerState, CircuitBreaker
from pipeline.worker.inference.retry import RetryBudget, backoff_delay
from pipeline.worker.inference.scheduler import FairScheduler

logger = logging.getLogger("sumstream.inference")

Emit = Callable[[dict[str, Any]], Awaitable[None]]
OnFinished = Callable[[str], Awaitable[None]]

CHUNK_PLACEHOLDER = "{chunk_summaries}"
# For models that refuse an assistant prefill (400): the text so far stays as an assistant turn
# and this user turn asks for the rest.
CONTINUE_PROMPT = (
    "Your answer above was cut off. Continue it exactly where it stops, without repeating "
    "anything and without any preamble."
)
# Cancels that arrive before their job (control and preprocessed are different topics).
EARLY_CANCELS_KEPT = 10_000


@dataclass
class ResumeState:
    """What a previous worker already streamed for a request (built from the tokens topic)."""

    text: str
    last_seq: int
    attempts: int
    input_tokens: int
    output_tokens: int
    # The trace of the earlier events (inference_start, first_token...), when known.
    trace: dict[str, int] = field(default_factory=dict)


class _GiveUp(Exception):
    """The request ends with an ERROR event carrying this code."""

    def __init__(
        self, code: str, message: str, *, retriable: bool, partial: bool | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retriable = retriable
        self.partial = partial


class _PublishError(Exception):
    """``emit`` failed: the request cannot be ended here (the next owner resumes it)."""


@dataclass(eq=False)
class _Run:
    """One request inside the engine: its job, progress and lifecycle flags."""

    job: dict[str, Any]
    grant: asyncio.Future[None]
    resume: ResumeState | None
    deadline_ms: int
    seq: int = 0
    text: str = ""
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    streamed: int = 0  # output tokens behind the text so far (what max_tokens limits)
    trace: dict[str, int] = field(default_factory=dict)
    chunk_summaries: list[str] | None = None
    prefill_supported: bool = True
    task: asyncio.Task[None] | None = None
    started: bool = False  # its task runs (a task cancelled before it starts runs nothing)
    enqueued_at: float = field(default_factory=time.monotonic)
    slot_held: bool = False  # the scheduler counts it as running; done() must release it
    permit: bool = False  # the breaker let its next upstream call through already
    cancel_reason: str | None = None
    shutdown: bool = False  # the engine is stopping: end silently, another worker resumes
    finishing: bool = False  # the terminal event is being published
    terminal_sent: bool = False
    finished: bool = False

    @property
    def request_id(self) -> str:
        return str(self.job["request_id"])

    @property
    def user_id(self) -> str:
        return str(self.job.get("user_id", ""))

    @property
    def weight(self) -> int:
        return int(self.job.get("weight") or 1)

    @property
    def log(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "user_id": self.user_id}


class InferenceEngine:
    """Runs inference jobs against one upstream and emits their TokenEvents in seq order."""

    def __init__(
        self,
        settings: WorkerSettings,
        client: UpstreamClient,
        emit: Emit,
        on_finished: OnFinished | None = None,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self._emit = emit
        self._on_finished = on_finished
        self._clock = clock
        self._rng = rng or random.Random()
        self.breaker = CircuitBreaker(
            client.name,
            failure_threshold=settings.breaker_failure_threshold,
            reset_s=settings.breaker_reset_s,
        )
        self.scheduler: FairScheduler[_Run] = FairScheduler(
            max_running=settings.max_streams,
            max_per_user=settings.max_streams_per_user,
            max_queued=settings.max_queued,
        )
        self.budget = RetryBudget(
            settings.retry_budget_ratio,
            min_retries_per_window=settings.retry_budget_min,
            window_s=settings.retry_budget_window_s,
        )
        self._runs: dict[str, _Run] = {}
        self._early_cancels: OrderedDict[str, str] = OrderedDict()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start handing queued jobs to the upstream."""
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch(), name="inference-dispatch")

    async def stop(self) -> None:
        """Stop every job WITHOUT a terminal event: another worker resumes them from Kafka."""
        self._stopping = True
        tasks: list[asyncio.Task[None]] = []
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            tasks.append(self._dispatcher)
        for run in list(self._runs.values()):
            run.shutdown = True
            if run.task is not None:
                run.task.cancel()
                tasks.append(run.task)
        await asyncio.gather(*tasks, return_exceptions=True)
        # Tasks cancelled before their first step ran no cleanup of their own.
        for run in list(self._runs.values()):
            run.finished = True
            self.scheduler.remove(run.request_id)
        self._runs.clear()

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

    async def submit(self, job: dict[str, Any], resume: ResumeState | None = None) -> None:
        """Queue a job (an InferenceJob dict). Blocks while the scheduler is full or the
        breaker is open, so the agent stops pulling and the jobs wait in Kafka as lag."""
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
        if request_id in self._runs:
            logger.info("job already active, ignored", extra={"request_id": request_id})
            return
        run = self._new_run(job, resume)
        self._runs[request_id] = run
        self.budget.deposit()
        early = self._early_cancels.pop(request_id, None)
        if early is not None:
            run.cancel_reason = early
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
        if run is None or run.finished or run.terminal_sent:
            if run is None:
                # Its job may still be on its way through `preprocessed`.
                self._early_cancels[request_id] = reason
                while len(self._early_cancels) > EARLY_CANCELS_KEPT:
                    self._early_cancels.popitem(last=False)
            return False
        if run.finishing or run.cancel_reason is not None:
            return True
        run.cancel_reason = reason
        # A task that has not started yet sees cancel_reason when it does.
        if run.task is not None and run.started:
            run.task.cancel()
        logger.info("cancelling", extra={**run.log, "reason": reason})
        return True

    def is_active(self, request_id: str) -> bool:
        """Is the request queued or running here?"""
        run = self._runs.get(request_id)
        return run is not None and not run.finished

    @property
    def active(self) -> int:
        return sum(1 for run in self._runs.values() if not run.finished)

    # -- internals -------------------------------------------------------------------------

    def _new_run(self, job: dict[str, Any], resume: ResumeState | None) -> _Run:
        deadline_ms = int(job.get("deadline_ms") or 0)
        if deadline_ms <= 0:
            deadline_ms = int((self._clock() + self.settings.default_deadline_s) * 1000)
        run = _Run(
            job=job,
            grant=asyncio.get_running_loop().create_future(),
            resume=resume,
            deadline_ms=deadline_ms,
            trace={str(k): int(v) for k, v in (job.get("trace") or {}).items()},
        )
        if resume is not None:
            run.seq = resume.last_seq
            run.text = resume.text
            run.attempts = resume.attempts
            run.input_tokens = resume.input_tokens
            run.output_tokens = resume.output_tokens
            run.streamed = resume.output_tokens
            run.trace.update(resume.trace)
        return run

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
            run.slot_held = True
            await self.breaker.wait_closed_or_probe()
            if run.finished or run.grant.done():
                # It ended (cancel, deadline) while we waited: give back what we took for it.
                self.breaker.record_abandoned()
                continue
            run.permit = True
            run.grant.set_result(None)

    async def _run(self, run: _Run) -> None:
        run.started = True
        try:
            try:
                if run.cancel_reason is None:
                    await self._run_until_deadline(run)
                else:
                    await self._finish(run, "CANCELLED", error=self._cancel_error(run))
            except asyncio.CancelledError:
                if run.shutdown or run.cancel_reason is None or run.terminal_sent:
                    raise
                # Our own cancel (engine.cancel): the request ends here, with its usage.
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                await self._finish(run, "CANCELLED", error=self._cancel_error(run))
        except Exception:
            # Publishing failed: without a terminal event the request stays in the agent's
            # in-flight table and is resumed from the tokens topic by the next owner.
            logger.exception("inference job failed", extra=run.log)
        finally:
            run.finished = True
            if run.permit:
                # The breaker's consent (maybe the half-open probe) was never used.
                self.breaker.record_abandoned()
            if run.slot_held:
                self.scheduler.done(run)
            else:
                self.scheduler.remove(run.request_id)
            if self._runs.get(run.request_id) is run:
                del self._runs[run.request_id]
        if run.terminal_sent and self._on_finished is not None:
            try:
                await self._on_finished(run.request_id)
            except Exception:
                logger.exception("on_finished failed", extra=run.log)

    async def _run_until_deadline(self, run: _Run) -> None:
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
            if run.terminal_sent:
                return  # it ended just as the deadline passed
            logger.info("deadline exceeded", extra=run.log)
            await self._finish(
                run,
                "ERROR",
                error=_error_info(
                    "deadline_exceeded",
                    "the request's deadline passed; the text so far is kept",
                    retriable=False,
                    # A job whose deadline passed in the queue has no text: FAILED, not PARTIAL.
                    partial=bool(run.text),
                ),
            )

    async def _execute(self, run: _Run) -> None:
        now_ms = self._now_ms()
        if run.resume is None:
            run.trace["inference_start"] = now_ms
            await self._publish(run, self._event(run, "STARTED", trace=dict(run.trace)))
        else:
            run.trace.setdefault("inference_start", now_ms)
        try:
            prompt = await self._prompt(run)
            finished = await self._stream(run, prompt)
        except _GiveUp as give_up:
            partial = give_up.partial if give_up.partial is not None else bool(run.text)
            logger.warning(
                "request failed: %s", give_up.message, extra={**run.log, "code": give_up.code}
            )
            await self._finish(
                run,
                "ERROR",
                error=_error_info(
                    give_up.code, give_up.message, retriable=give_up.retriable, partial=partial
                ),
            )
            return
        except _PublishError:
            raise
        except Exception as exc:
            # A bug must not leave the client with a stream that just stops.
            logger.exception("inference failed unexpectedly", extra=run.log)
            await self._finish(
                run,
                "ERROR",
                error=_error_info(
                    "internal_error",
                    f"inference failed: {exc!r}",
                    retriable=True,
                    partial=bool(run.text),
                ),
            )
            return
        await self._finish(run, "DONE", stop_reason=finished.stop_reason)

    async def _prompt(self, run: _Run) -> str:
        """The final user message: map-reduce jobs first summarize their chunks."""
        prompt = str(run.job["prompt"])
        chunks = [str(c) for c in run.job.get("chunks") or []]
        if not chunks:
            return prompt
        if run.chunk_summaries is None:
            run.chunk_summaries = [await self._complete(run, chunk) for chunk in chunks]
        return prompt.replace(
            CHUNK_PLACEHOLDER, "\n\n".join(s.strip() for s in run.chunk_summaries)
        )

    async def _complete(self, run: _Run, chunk: str) -> str:
        failures = 0
        while True:
            await self._acquire(run)
            run.attempts += 1
            UPSTREAM_ATTEMPTS.labels(kind="complete").inc()
            INFLIGHT.inc()
            verdict = False
            try:
                text, finished = await self.client.complete(
                    request_id=run.request_id,
                    model=str(run.job["model"]),
                    system=str(run.job.get("system") or ""),
                    messages=[{"role": "user", "content": chunk}],
                    max_tokens=int(run.job["max_output_tokens"]),
                )
                self.breaker.record_success()
                verdict = True
                run.input_tokens += finished.input_tokens
                run.output_tokens += finished.output_tokens
                return text
            except UpstreamAttemptError as err:
                verdict = True
                self._record_failure(run, err)
                failures += 1
                await self._before_retry(run, err, failures)
            finally:
                INFLIGHT.dec()
                if not verdict:
                    self.breaker.record_abandoned()

    async def _stream(self, run: _Run, prompt: str) -> Finished:
        failures = 0  # attempts in a row that failed before their first token
        resumes = 0
        limit = int(run.job["max_output_tokens"])
        while True:
            # A continuation may only add what the first attempt had left of max_tokens.
            remaining = limit - run.streamed
            if remaining <= 0 and run.text:
                return Finished("max_tokens", 0, 0)
            # Resume with the text so far as an assistant prefill. The API rejects trailing
            # whitespace in a prefill, so it is held back and dropped from the continuation.
            prefill = run.text.rstrip()
            messages: list[dict[str, str]] = [{"role": "user", "content": prompt}]
            if prefill:
                messages.append({"role": "assistant", "content": prefill})
                if not run.prefill_supported:
                    messages.append({"role": "user", "content": CONTINUE_PROMPT})
            await self._acquire(run)
            run.attempts += 1
            UPSTREAM_ATTEMPTS.labels(kind="stream").inc()
            try:
                return await self._stream_attempt(
                    run, messages, run.text[len(prefill) :], max(1, remaining)
                )
            except UpstreamAttemptError as err:
                self._record_failure(run, err)
                if err.tokens_received > 0:
                    failures = 0
                    resumes += 1
                    if resumes > self.settings.max_resumes:
                        raise _GiveUp(
                            "upstream_unavailable",
                            f"the upstream stream broke {resumes} times: {err}",
                            retriable=True,
                        ) from err
                    RETRIES.labels(reason="resume").inc()
                    logger.info("resuming after a mid-stream failure: %s", err, extra=run.log)
                    await asyncio.sleep(self._backoff(resumes, None))
                    continue
                if prefill and run.prefill_supported and err.status == 400:
                    run.prefill_supported = False
                    logger.info("prefill refused, continuing by prompt", extra=run.log)
                    continue
                failures += 1
                await self._before_retry(run, err, failures)

    async def _stream_attempt(
        self, run: _Run, messages: list[dict[str, str]], overlap: str, max_tokens: int
    ) -> Finished:
        """One upstream stream; its deltas become DELTA events. Raises UpstreamAttemptError."""
        stream = self.client.stream(
            request_id=run.request_id,
            model=str(run.job["model"]),
            system=str(run.job.get("system") or ""),
            messages=messages,
            max_tokens=max_tokens,
        )
        # Leading whitespace of a continuation is held until its first visible character, then
        # the part the client already has (``overlap``) is dropped.
        held: str | None = "" if overlap else None
        verdict = False
        previous: float | None = None
        INFLIGHT.inc()
        try:
            async with stream:
                async for item in stream:
                    if not verdict:
                        self.breaker.record_success()
                        verdict = True
                    if isinstance(item, Finished):
                        return item
                    text = item.text
                    if held is not None:
                        held += text
                        visible = held.lstrip()
                        if not visible:
                            continue
                        space = held[: len(held) - len(visible)]
                        kept = space[len(overlap) :] if space.startswith(overlap) else ""
                        text = kept + visible
                        held = None
                    now = time.monotonic()
                    if previous is not None:
                        INTER_TOKEN_SECONDS.observe(now - previous)
                    previous = now
                    self._mark_token(run)
                    run.text += text
                    await self._publish(run, self._event(run, "DELTA", text=text))
            raise UpstreamAttemptError(
                "upstream stream ended without a result", retriable=True
            )  # pragma: no cover - UpstreamStream always ends with Finished or an error
        except UpstreamAttemptError:
            verdict = True
            raise
        finally:
            INFLIGHT.dec()
            if not verdict:
                self.breaker.record_abandoned()
            # Every attempt is billed, including failed and cancelled ones.
            run.input_tokens += stream.input_tokens
            run.output_tokens += stream.output_tokens
            run.streamed += stream.output_tokens

    def _mark_token(self, run: _Run) -> None:
        now_ms = self._now_ms()
        if "first_token" not in run.trace:
            run.trace["first_token"] = now_ms
            start = run.trace.get("inference_start", now_ms)
            STAGE_SECONDS.labels(stage="upstream_ttft").observe(max(0, now_ms - start) / 1000.0)
        run.trace["last_token"] = now_ms

    async def _acquire(self, run: _Run) -> None:
        """Wait for the breaker, unless the dispatcher already got its consent for this run."""
        if run.permit:
            run.permit = False
            return
        await self.breaker.wait_closed_or_probe()

    def _record_failure(self, run: _Run, err: UpstreamAttemptError) -> None:
        UPSTREAM_ERRORS.labels(error_type=err.error_type).inc()
        # A refusal (400, 401...) proves the upstream is up; only health failures trip it.
        if err.retriable:
            self.breaker.record_failure()
        else:
            self.breaker.record_success()
        logger.info(
            "upstream attempt failed: %s",
            err,
            extra={**run.log, "status": err.status, "error_type": err.error_type},
        )

    async def _before_retry(self, run: _Run, err: UpstreamAttemptError, failures: int) -> None:
        """Sleep before retrying a call that failed before its first token, or give up."""
        if not err.retriable:
            raise _GiveUp(
                "upstream_error", f"the upstream refused the request: {err}", retriable=False
            )
        if failures >= self.settings.max_attempts:
            raise _GiveUp(
                "upstream_unavailable",
                f"the upstream failed {failures} attempts: {err}",
                retriable=True,
            )
        delay = self._backoff(failures, err.retry_after_s)
        if self._clock() + delay >= run.deadline_ms / 1000.0:
            raise _GiveUp(
                "upstream_unavailable",
                f"the upstream asks to wait {delay:.1f}s, past the deadline: {err}",
                retriable=True,
            )
        if not self.budget.try_withdraw():
            RETRY_BUDGET_EXHAUSTED.inc()
            raise _GiveUp(
                "upstream_unavailable",
                f"retry budget exhausted (the upstream is failing broadly): {err}",
                retriable=True,
            )
        RETRIES.labels(reason=err.error_type).inc()
        await asyncio.sleep(delay)

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        return backoff_delay(
            attempt,
            base_s=self.settings.retry_base_s,
            cap_s=self.settings.retry_cap_s,
            retry_after_s=retry_after_s,
            rng=self._rng,
        )

    async def _finish(
        self,
        run: _Run,
        kind: str,
        *,
        stop_reason: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        run.finishing = True
        event = self._event(run, kind, stop_reason=stop_reason, error=error, trace=dict(run.trace))
        event["usage"] = {
            "input_tokens": run.input_tokens,
            "output_tokens": run.output_tokens,
            "attempts": run.attempts,
            "cost_micro_usd": 0,
        }
        await self._publish(run, event, terminal=True)
        logger.info(
            "request ended: %s",
            kind,
            extra={**run.log, "attempts": run.attempts, "output_tokens": run.output_tokens},
        )

    def _cancel_error(self, run: _Run) -> dict[str, Any]:
        return _error_info(
            "cancelled",
            f"cancelled ({run.cancel_reason})",
            retriable=False,
            partial=bool(run.text),
        )

    def _event(
        self,
        run: _Run,
        kind: str,
        *,
        text: str = "",
        stop_reason: str | None = None,
        error: dict[str, Any] | None = None,
        trace: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        run.seq += 1
        job = run.job
        return {
            "request_id": run.request_id,
            "seq": run.seq,
            "kind": kind,
            "text": text,
            "attempt": max(1, run.attempts),
            "user_id": run.user_id,
            "tier": str(job.get("tier", "")),
            "model": str(job.get("model", "")),
            "stop_reason": stop_reason,
            "usage": None,
            "error": error,
            "created_at": int(job.get("created_at") or 0),
            "source": str(job.get("source") or "external"),
            "replay_of": job.get("replay_of"),
            "degraded": job.get("degraded"),
            "trace": trace or {},
        }

    async def _publish(self, run: _Run, event: dict[str, Any], *, terminal: bool = False) -> None:
        # A cancel must not cut a send in half: finish the send under way (so no seq is
        # skipped and a terminal event is known to be out), then let the cancellation through.
        send = asyncio.ensure_future(self._emit(event))
        try:
            await asyncio.shield(send)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await send
                run.terminal_sent = run.terminal_sent or terminal
            raise
        except Exception as exc:
            raise _PublishError(f"publishing {event['kind']} seq {event['seq']} failed") from exc
        run.terminal_sent = run.terminal_sent or terminal

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


def _error_info(code: str, message: str, *, retriable: bool, partial: bool) -> dict[str, Any]:
    return {"code": code, "message": message, "retriable": retriable, "partial": partial}
