"""Upstream attempts for one run: the map-reduce chunk calls, the stream, retries before the
first token, and resuming a broken stream by prefill or, for models that refuse one, by prompt.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pipeline.core import events
from pipeline.core.metrics import (
    INFLIGHT,
    INTER_TOKEN_SECONDS,
    RETRIES,
    RETRY_BUDGET_EXHAUSTED,
    STAGE_SECONDS,
    UPSTREAM_ATTEMPTS,
    UPSTREAM_ERRORS,
    UPSTREAM_PACED,
    UPSTREAM_PAUSED_SECONDS,
    UPSTREAM_PAUSES,
    UPSTREAM_RATE_LIMITED,
)
from pipeline.core.records import Usage
from pipeline.core.settings import WorkerSettings
from pipeline.llm import ratelimit
from pipeline.llm.client import Finished, OnHeaders, UpstreamAttemptError, UpstreamStream
from pipeline.worker.inference.limiter import Cost
from pipeline.worker.inference.retry import backoff_delay
from pipeline.worker.inference.runs import Continuation, Holding, Run
from pipeline.worker.inference.upstream import Upstream
from pipeline.worker.prepare import CHUNK_PLACEHOLDER

logger = logging.getLogger("sumstream.inference")

# Publishes one piece of streamed text as the run's next DELTA event.
OnText = Callable[[Run, str], Awaitable[None]]

# Statuses that say "too much load from you" (rate limit, overload): the limiter backs off.
LOAD_STATUSES = frozenset({429, 529})
# Rough characters per token, to weigh a map step's chunk before the API counts it.
CHARS_PER_TOKEN = 4

# For models that refuse an assistant prefill (400): the text so far stays as an assistant turn
# and this user turn asks for the rest.
CONTINUE_PROMPT = (
    "Your answer above was cut off. Continue it exactly where it stops, without repeating "
    "anything and without any preamble."
)


class GiveUp(Exception):
    """The request ends with an ERROR event carrying this code."""

    def __init__(
        self, code: str, message: str, *, retriable: bool, partial: bool | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retriable = retriable
        self.partial = partial


class Attempts:
    """Calls the upstream for runs, through its breaker and retry budget."""

    def __init__(
        self,
        settings: WorkerSettings,
        upstream: Upstream,
        on_text: OnText,
        *,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self._on_text = on_text
        self._clock = clock
        self._rng = rng

    async def prompt(self, run: Run) -> str:
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

    async def _complete(self, run: Run, chunk: str) -> str:
        breaker = self.upstream.breaker
        limiter = self.upstream.limiter
        failures = 0
        max_tokens = int(run.job["max_output_tokens"])
        while True:
            cost = Cost(len(chunk) // CHARS_PER_TOKEN + 1, limiter.expected_output(max_tokens))
            await self._acquire(run, cost)
            run.attempts += 1
            UPSTREAM_ATTEMPTS.labels(kind="complete").inc()
            INFLIGHT.inc()
            verdict = False
            started = limiter.started(cost)
            try:
                text, finished = await self.upstream.client.complete(
                    request_id=run.request_id,
                    model=str(run.job["model"]),
                    system=str(run.job.get("system") or ""),
                    messages=[{"role": "user", "content": chunk}],
                    max_tokens=max_tokens,
                    on_headers=self._reporter(started),
                )
                breaker.record_success()
                limiter.succeeded(started, None)
                limiter.observe_output(finished.output_tokens)
                verdict = True
                run.input_tokens += finished.input_tokens
                run.output_tokens += finished.output_tokens
                run.cache_creation_input_tokens += finished.cache_creation_input_tokens
                run.cache_read_input_tokens += finished.cache_read_input_tokens
                return text
            except UpstreamAttemptError as err:
                verdict = True
                self._record_failure(run, err, started)
                failures = await self._before_retry(run, err, failures)
            finally:
                INFLIGHT.dec()
                limiter.ended()
                if not verdict:
                    breaker.record_abandoned()

    async def stream(self, run: Run, prompt: str) -> Finished:
        """Stream the summary as DELTA events, retrying and resuming until it finishes."""
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
            limiter = self.upstream.limiter
            estimate = int(run.job.get("input_tokens_estimate") or 0)
            input_tokens = estimate + len(prefill) // CHARS_PER_TOKEN
            cost = Cost(input_tokens, limiter.expected_output(max(1, remaining)))
            await self._acquire(run, cost)
            run.attempts += 1
            UPSTREAM_ATTEMPTS.labels(kind="stream").inc()
            started = limiter.started(cost)
            try:
                return await self._stream_attempt(
                    run,
                    _messages(run, prompt, prefill),
                    run.text[len(prefill) :],
                    remaining,
                    started,
                )
            except UpstreamAttemptError as err:
                self._record_failure(run, err, started)
                if err.tokens_received > 0:
                    failures = 0
                    resumes += 1
                    await self._before_resume(run, err, resumes)
                    continue
                if prefill and run.continuation is Continuation.PREFILL and err.status == 400:
                    run.continuation = Continuation.PROMPT
                    logger.info("prefill refused, continuing by prompt", extra=run.log)
                    continue
                failures = await self._before_retry(run, err, failures)

    async def _stream_attempt(
        self,
        run: Run,
        messages: list[dict[str, Any]],
        overlap: str,
        remaining: int,
        started: float,
    ) -> Finished:
        """One upstream stream; its deltas become DELTA events. Raises UpstreamAttemptError."""
        breaker = self.upstream.breaker
        stream = self.upstream.client.stream(
            request_id=run.request_id,
            model=str(run.job["model"]),
            system=str(run.job.get("system") or ""),
            messages=messages,
            max_tokens=max(1, remaining),
            on_headers=self._reporter(started),
        )
        # Leading whitespace of a continuation is held until its first visible character, then
        # the part the client already has (``overlap``) is dropped.
        held: str | None = "" if overlap else None
        limiter = self.upstream.limiter
        sent_at = time.monotonic()
        verdict = False
        announced = False
        previous: float | None = None
        INFLIGHT.inc()
        entered = False
        try:
            async with stream:
                entered = True
                limiter.accepted()
                async for item in stream:
                    if not verdict:
                        breaker.record_success()
                        # The latency signal: time to first token, not total time.
                        limiter.succeeded(started, time.monotonic() - sent_at)
                        verdict = True
                    if isinstance(item, Finished):
                        limiter.observe_output(item.output_tokens)
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
                    if not announced:
                        announced = True
                        run.outbox.usage = _usage_so_far(run, stream)
                    run.text += text
                    await self._on_text(run, text)
            raise UpstreamAttemptError(
                "upstream stream ended without a result", retriable=True
            )  # pragma: no cover - UpstreamStream always ends with Finished or an error
        except UpstreamAttemptError:
            verdict = True
            raise
        finally:
            INFLIGHT.dec()
            limiter.ended(accepted=entered)
            if not verdict:
                breaker.record_abandoned()
            # Every attempt is billed, including failed and cancelled ones.
            run.input_tokens += stream.input_tokens
            run.output_tokens += stream.output_tokens
            run.cache_creation_input_tokens += stream.cache_creation_input_tokens
            run.cache_read_input_tokens += stream.cache_read_input_tokens
            run.streamed += stream.output_tokens

    def _mark_token(self, run: Run) -> None:
        now_ms = int(self._clock() * 1000)
        if "first_token" not in run.trace:
            run.trace["first_token"] = now_ms
            start = run.trace.get("inference_start", now_ms)
            STAGE_SECONDS.labels(stage="upstream_ttft").observe(max(0, now_ms - start) / 1000.0)
        run.trace["last_token"] = now_ms

    async def _acquire(self, run: Run, cost: Cost) -> None:
        """Wait for room at the upstream (pause, buckets), then for the breaker unless the
        dispatcher already got its consent for this run."""
        limiter = self.upstream.limiter
        name = self.upstream.client.name
        reason = (
            "pause" if limiter.paused_until > time.time() else "limit" if limiter.full else "bucket"
        )
        if await limiter.wait_for_room(cost):
            UPSTREAM_PACED.labels(upstream=name, reason=reason).inc()
        if run.holding is Holding.SLOT_AND_PERMIT:
            run.holding = Holding.SLOT
            return
        await self.upstream.breaker.wait_closed_or_probe()

    def _reporter(self, started: float) -> OnHeaders:
        """Hands the rate-limit report of the call started at ``started`` to the limiter."""
        limiter = self.upstream.limiter

        def report(headers: Mapping[str, str]) -> None:
            limiter.reported(ratelimit.parse(headers, time.time()), started)

        return report

    def _record_failure(self, run: Run, err: UpstreamAttemptError, started: float) -> None:
        UPSTREAM_ERRORS.labels(error_type=err.error_type).inc()
        if err.status in LOAD_STATUSES and err.tokens_received == 0:
            limiter = self.upstream.limiter
            before = limiter.paused_until
            limiter.refused(started, err.retry_after_s)
            if limiter.paused_until > max(before, time.time()):
                name = self.upstream.client.name
                UPSTREAM_PAUSES.labels(upstream=name).inc()
                UPSTREAM_PAUSED_SECONDS.labels(upstream=name).inc(
                    limiter.paused_until - max(before, time.time())
                )
        # A refusal (400, 401...) and a rate limit (429: the limiter's business) prove the
        # upstream is up; only health failures (5xx, overload, connection) trip the breaker.
        if err.retriable and err.status != 429:
            self.upstream.breaker.record_failure()
        else:
            self.upstream.breaker.record_success()
        logger.info(
            "upstream attempt failed: %s",
            err,
            extra={**run.log, "status": err.status, "error_type": err.error_type},
        )

    async def _before_resume(self, run: Run, err: UpstreamAttemptError, resumes: int) -> None:
        """Sleep before resuming a stream that broke after its first token, or give up."""
        if resumes > self.settings.max_resumes:
            raise GiveUp(
                "upstream_unavailable",
                f"the upstream stream broke {resumes} times: {err}",
                retriable=True,
            ) from err
        RETRIES.labels(reason="resume").inc()
        logger.info("resuming after a mid-stream failure: %s", err, extra=run.log)
        await asyncio.sleep(self._backoff(resumes, None))

    async def _before_retry(self, run: Run, err: UpstreamAttemptError, failures: int) -> int:
        """Sleep before retrying a call that failed before its first token, or give up.

        Returns the failures that count towards ``max_attempts`` and the retry budget: a 429
        is not one of them (the limiter paused and slowed every call instead, and the retry
        adds no load beyond what the upstream lets through), so only the deadline bounds it.
        """
        if not err.retriable:
            raise GiveUp(
                "upstream_error", f"the upstream refused the request: {err}", retriable=False
            )
        rate_limited = err.status == 429
        if not rate_limited:
            failures += 1
        if failures >= self.settings.max_attempts:
            raise GiveUp(
                "upstream_unavailable",
                f"the upstream failed {failures} attempts: {err}",
                retriable=True,
            )
        delay = self._backoff(max(1, failures), err.retry_after_s)
        if self._clock() + delay >= run.deadline_ms / 1000.0:
            raise GiveUp(
                "upstream_unavailable",
                f"the upstream asks to wait {delay:.1f}s, past the deadline: {err}",
                retriable=True,
            )
        if rate_limited:
            UPSTREAM_RATE_LIMITED.labels(upstream=self.upstream.client.name).inc()
            RETRIES.labels(reason=err.error_type).inc()
            # With a retry-after the limiter's pause is the wait (shared, in _acquire).
            if err.retry_after_s is None:
                await asyncio.sleep(delay)
            return failures
        if not self.upstream.budget.try_withdraw():
            RETRY_BUDGET_EXHAUSTED.inc()
            raise GiveUp(
                "upstream_unavailable",
                f"retry budget exhausted (the upstream is failing broadly): {err}",
                retriable=True,
            )
        RETRIES.labels(reason=err.error_type).inc()
        await asyncio.sleep(delay)
        return failures

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        return backoff_delay(
            attempt,
            base_s=self.settings.retry_base_s,
            cap_s=self.settings.retry_cap_s,
            retry_after_s=retry_after_s,
            rng=self._rng,
        )


def _messages(run: Run, prompt: str, prefill: str) -> list[dict[str, Any]]:
    """The conversation of the next attempt: the prompt, a follow-up's earlier turns, then the
    text so far if any."""
    first: Any = prompt
    if run.job.get("cache_prompt"):
        # The document is the same in every turn of a conversation: the API caches it
        # (docs/architecture.md, "Prompt caching").
        first = [{"type": "text", "text": prompt, "cache_control": {"type": "ephemeral"}}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
    for i, text in enumerate(run.job.get("turns") or []):
        messages.append({"role": "assistant" if i % 2 == 0 else "user", "content": text})
    if prefill:
        messages.append({"role": "assistant", "content": prefill})
        if run.continuation is Continuation.PROMPT:
            messages.append({"role": "user", "content": CONTINUE_PROMPT})
    return messages


def _usage_so_far(run: Run, stream: UpstreamStream) -> Usage:
    """The run's usage counting the input of the attempt now streaming (its first DELTA
    carries it): a next owner resuming the run bills every attempt's input from it, even one
    whose worker died mid-stream (docs/architecture.md, "Billing a resumed stream")."""
    return events.usage(
        input_tokens=run.input_tokens + stream.input_tokens,
        output_tokens=run.output_tokens,
        attempts=run.attempts,
        cache_creation_input_tokens=run.cache_creation_input_tokens
        + stream.cache_creation_input_tokens,
        cache_read_input_tokens=run.cache_read_input_tokens + stream.cache_read_input_tokens,
    )
