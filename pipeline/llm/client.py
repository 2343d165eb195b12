"""The model API client: the official ``anthropic`` SDK, with its retries off (retries are ours).

Every failure leaves here as an :class:`UpstreamAttemptError` that says whether a retry may help,
the HTTP status, the server's retry-after, how many tokens had arrived, and the usage of the
failed attempt (every attempt is billed). The same code talks to the real API and the simulator.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import anthropic
import httpx2
from anthropic import AsyncAnthropic

from pipeline.core.errors import UpstreamError
from pipeline.core.settings import WorkerSettings
from pipeline.llm.sse import Frame, SseDecoder

logger = logging.getLogger("sumstream.upstream")

REQUEST_ID_HEADER = "x-sumstream-request-id"
# The simulator ignores the key, but the SDK refuses to send a request without one.
SIMULATOR_API_KEY = "sumstream-simulator"

# Error types of the Anthropic API (the `error.type` of a JSON error body or an `event: error`)
# and the HTTP status each one stands for; a mid-stream error arrives inside a 200 response.
ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
RETRIABLE_STATUSES = frozenset({408, 409, 429})

# Receives the headers of every answer to a call (its rate-limit report; pipeline/llm/ratelimit.py).
OnHeaders = Callable[[Mapping[str, str]], None]


def _report_headers(on_headers: OnHeaders | None, exc: BaseException | None = None) -> None:
    """Hand an error answer's headers over (the limiter reads them); others have none."""
    if on_headers is not None and isinstance(exc, anthropic.APIStatusError):
        on_headers(exc.response.headers)


@dataclass(frozen=True)
class Delta:
    """A piece of generated text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of a successful call, with the usage the API reported."""

    stop_reason: str | None
    input_tokens: int
    output_tokens: int
    # Prompt caching: input tokens written to and read from the cache, not in input_tokens.
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class UpstreamAttemptError(UpstreamError):
    """One failed upstream call, with what it had produced before failing."""

    def __init__(
        self,
        message: str = "",
        *,
        retriable: bool,
        status: int | None = None,
        retry_after_s: float | None = None,
        error_type: str = "api_error",
        tokens_received: int = 0,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> None:
        super().__init__(message, retriable=retriable, status=status, retry_after_s=retry_after_s)
        self.error_type = error_type
        self.tokens_received = tokens_received
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens


def retriable_status(status: int) -> bool:
    """The statuses worth retrying: timeouts, conflicts, rate limits, server errors, overload."""
    return status in RETRIABLE_STATUSES or status >= 500


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def map_error(
    exc: BaseException, *, tokens_received: int = 0, input_tokens: int = 0, output_tokens: int = 0
) -> UpstreamAttemptError:
    """Translate an SDK or transport exception into an :class:`UpstreamAttemptError`."""
    usage = {
        "tokens_received": tokens_received,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
    }
    if isinstance(exc, anthropic.APIStatusError):
        body_type = exc.type if isinstance(exc.type, str) else None
        error_type = body_type if body_type in ERROR_TYPE_STATUS else None
        status = exc.status_code
        retry_after: float | None = None
        if status < 400:
            # An `event: error` inside a 200 stream: its type says what the status would be.
            status = ERROR_TYPE_STATUS.get(error_type or "api_error", 500)
        else:
            retry_after = parse_retry_after(exc.response.headers)
        return UpstreamAttemptError(
            exc.api_message or str(exc),
            retriable=retriable_status(status),
            status=status,
            retry_after_s=retry_after,
            error_type=error_type or f"http_{status}",
            **usage,
        )
    if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
        return UpstreamAttemptError(
            "upstream timed out", retriable=True, error_type="timeout", **usage
        )
    if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
        return UpstreamAttemptError(
            f"upstream connection failed: {exc}",
            retriable=True,
            error_type="connection_error",
            **usage,
        )
    # Anything else the SDK raises (an unparseable response...) will not get better by retrying.
    return UpstreamAttemptError(
        f"upstream response not understood: {exc}",
        retriable=False,
        error_type="invalid_response",
        **usage,
    )


def _request(
    *, model: str, system: str, messages: Iterable[Mapping[str, Any]], max_tokens: int
) -> dict[str, Any]:
    params: dict[str, Any] = {"model": model, "messages": list(messages), "max_tokens": max_tokens}
    if system:
        params["system"] = system
    return params


class UpstreamStream:
    """One streamed call: ``async with client.stream(...) as s: async for event in s``.

    Yields :class:`Delta` per text delta, then one :class:`Finished`. Leaving the ``async with``
    early (break, cancellation, deadline) closes the HTTP stream at once, so the upstream stops
    generating (and billing). ``input_tokens``/``output_tokens`` are live, for usage of calls
    that end early. The SDK sends the request and raises its status errors; the body is read
    raw and decoded by pipeline/llm/sse.py (docs/architecture.md, "The lean upstream path").
    """

    def __init__(
        self,
        client: AsyncAnthropic,
        params: dict[str, Any],
        request_id: str,
        on_headers: OnHeaders | None = None,
    ) -> None:
        self._client = client
        self._params = params
        self._request_id = request_id
        self._response: AbstractAsyncContextManager[Any] | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._decoder = SseDecoder()
        self._pending: list[Frame] = []
        self._on_headers = on_headers
        self._finished = False
        self._stop_reason: str | None = None
        self.tokens_received = 0
        self.input_tokens = 0
        self.cache_creation_input_tokens = 0
        self.cache_read_input_tokens = 0
        self._reported_output = 0
        # The response's headers (rate-limit figures, request id), once the call is answered.
        self.headers: Mapping[str, str] = {}

    @property
    def output_tokens(self) -> int:
        # The API's cumulative count once it sent one; until then one per delta received.
        return max(self._reported_output, self.tokens_received)

    async def __aenter__(self) -> Self:
        response = self._client.messages.with_streaming_response.create(
            **self._params,
            stream=True,
            extra_headers={REQUEST_ID_HEADER: self._request_id},
        )
        try:
            raw = await response.__aenter__()
        except (anthropic.AnthropicError, httpx2.HTTPError) as exc:
            _report_headers(self._on_headers, exc)
            raise map_error(exc) from exc
        self._response = response
        self.headers = raw.headers
        self._chunks = raw.http_response.aiter_raw()
        if self._on_headers is not None:
            self._on_headers(raw.headers)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP stream (idempotent)."""
        response, self._response = self._response, None
        self._chunks = None
        if response is not None:
            try:
                await response.__aexit__(None, None, None)
            except (anthropic.AnthropicError, httpx2.HTTPError):
                # Closing a broken connection may fail; it is closed either way.
                logger.debug("closing the upstream stream failed", exc_info=True)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Delta | Finished:
        if self._finished:
            raise StopAsyncIteration
        if self._chunks is None:
            raise RuntimeError("use the stream inside `async with`")
        while True:
            while self._pending:
                item = self._on_frame(self._pending.pop(0))
                if item is not None:
                    return item
            try:
                chunk = await self._chunks.__anext__()
                # ValueError: an SSE frame whose data is not JSON.
                self._pending = self._decoder.feed(chunk)
            except StopAsyncIteration:
                # The body ended without message_stop: the connection was cut.
                raise self._error(
                    UpstreamAttemptError(
                        "upstream stream ended before message_stop",
                        retriable=True,
                        error_type="incomplete_stream",
                    )
                ) from None
            except (anthropic.AnthropicError, httpx2.HTTPError, ValueError) as exc:
                raise self._error(exc) from exc

    def _on_frame(self, frame: Frame) -> Delta | Finished | None:
        """What one event means for the caller (None: nothing to hand on)."""
        data = frame.data if isinstance(frame.data, dict) else {}
        kind = frame.event
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            text = delta.get("text")
            if delta.get("type") == "text_delta" and text:
                self.tokens_received += 1
                return Delta(text)
        elif kind == "message_start":
            usage = (data.get("message") or {}).get("usage") or {}
            self.input_tokens = int(usage.get("input_tokens") or 0)
            self._reported_output = int(usage.get("output_tokens") or 0)
            self._cache_usage(usage)
        elif kind == "message_delta":
            self._stop_reason = (data.get("delta") or {}).get("stop_reason")
            usage = data.get("usage") or {}
            self._reported_output = int(usage.get("output_tokens") or 0)
            if usage.get("input_tokens") is not None:
                self.input_tokens = int(usage["input_tokens"])
            self._cache_usage(usage)
        elif kind == "message_stop":
            self._finished = True
            return Finished(
                self._stop_reason,
                self.input_tokens,
                self.output_tokens,
                self.cache_creation_input_tokens,
                self.cache_read_input_tokens,
            )
        elif kind == "error":
            raise self._error(_stream_error(data))
        return None

    def _cache_usage(self, usage: Mapping[str, Any]) -> None:
        # message_delta repeats the cumulative figures in newer API versions; absent: unchanged.
        if usage.get("cache_creation_input_tokens") is not None:
            self.cache_creation_input_tokens = int(usage["cache_creation_input_tokens"])
        if usage.get("cache_read_input_tokens") is not None:
            self.cache_read_input_tokens = int(usage["cache_read_input_tokens"])

    def _error(self, exc: BaseException) -> UpstreamAttemptError:
        if isinstance(exc, UpstreamAttemptError):
            exc.tokens_received = self.tokens_received
            exc.input_tokens = self.input_tokens
            exc.output_tokens = self.output_tokens
            return exc
        return map_error(
            exc,
            tokens_received=self.tokens_received,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
        )


def _stream_error(data: Mapping[str, Any]) -> UpstreamAttemptError:
    """An ``event: error`` inside a 200 stream: its type says what the status would be."""
    error = data.get("error") or {}
    body_type = error.get("type")
    error_type = body_type if body_type in ERROR_TYPE_STATUS else "api_error"
    status = ERROR_TYPE_STATUS[error_type]
    return UpstreamAttemptError(
        str(error.get("message") or error_type),
        retriable=retriable_status(status),
        status=status,
        error_type=error_type,
    )


class UpstreamClient:
    """The model API: the real one when an API key is set, else the simulator."""

    @staticmethod
    def has_real_key(settings: WorkerSettings) -> bool:
        """Whether the settings name the real API (a key is set) rather than the simulator."""
        key = settings.anthropic_api_key
        return key is not None and bool(key.get_secret_value())

    def __init__(self, settings: WorkerSettings) -> None:
        timeout = httpx2.Timeout(
            settings.upstream_read_timeout_s, connect=settings.upstream_connect_timeout_s
        )
        key = settings.anthropic_api_key
        if key is not None and self.has_real_key(settings):
            self.name = "anthropic"
            self._client = AsyncAnthropic(
                api_key=key.get_secret_value(),
                base_url=settings.anthropic_base_url,
                max_retries=0,
                timeout=timeout,
            )
        else:
            self.name = "llm-sim"
            self._client = AsyncAnthropic(
                api_key=SIMULATOR_API_KEY,
                base_url=settings.llm_sim_url,
                max_retries=0,
                timeout=timeout,
            )

    def stream(
        self,
        *,
        request_id: str,
        model: str,
        system: str,
        messages: Iterable[Mapping[str, Any]],
        max_tokens: int,
        on_headers: OnHeaders | None = None,
    ) -> UpstreamStream:
        """A streamed call; use it as ``async with`` (see :class:`UpstreamStream`)."""
        params = _request(model=model, system=system, messages=messages, max_tokens=max_tokens)
        return UpstreamStream(self._client, params, request_id, on_headers)

    async def complete(
        self,
        *,
        request_id: str,
        model: str,
        system: str,
        messages: Iterable[Mapping[str, Any]],
        max_tokens: int,
        on_headers: OnHeaders | None = None,
    ) -> tuple[str, Finished]:
        """A non-streamed call (a map step of map-reduce): its whole text and usage."""
        params = _request(model=model, system=system, messages=messages, max_tokens=max_tokens)
        try:
            raw = await self._client.messages.with_raw_response.create(
                **params, extra_headers={REQUEST_ID_HEADER: request_id}
            )
            if on_headers is not None:
                on_headers(raw.headers)
            message = await raw.parse()
        except (anthropic.AnthropicError, httpx2.HTTPError) as exc:
            _report_headers(on_headers, exc)
            raise map_error(exc) from exc
        text = "".join(block.text for block in message.content if block.type == "text")
        usage = message.usage
        return text, Finished(
            message.stop_reason,
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_creation_input_tokens or 0,
            usage.cache_read_input_tokens or 0,
        )

    async def count_tokens(
        self, *, model: str, system: str, messages: Iterable[Mapping[str, Any]]
    ) -> int:
        """The upstream's own count of a prompt's input tokens (``/v1/messages/count_tokens``)."""
        try:
            result = await self._client.messages.count_tokens(
                model=model,
                system=system,
                messages=list(messages),  # type: ignore[arg-type]
            )
        except (anthropic.AnthropicError, httpx2.HTTPError) as exc:
            raise map_error(exc) from exc
        return result.input_tokens

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.close()
