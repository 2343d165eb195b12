"""The gateway's error hierarchy, rendered as RFC 9457 ``application/problem+json``.

Every error knows its HTTP status, a stable machine ``code`` and whether the client may
retry (``retriable``, with ``retry_after_s`` when there is a sensible wait).
"""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from pipeline.core.errors import SumstreamError

PROBLEM_TYPE_BASE = "https://sumstream.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class GatewayError(SumstreamError):
    """Root of the errors the gateway answers with; ``status`` is the HTTP status."""

    status: int = 500
    title: str = "Internal error"
    code = "internal_error"

    def __init__(
        self,
        message: str = "",
        *,
        retriable: bool | None = None,
        retry_after_s: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message or self.title, retriable=retriable)
        self.retry_after_s = retry_after_s
        self.extra = extra or {}


class MalformedRequest(GatewayError):
    status = 400
    title = "Malformed request"
    code = "malformed_request"


class InvalidRequest(GatewayError):
    status = 422
    title = "Invalid request"
    code = "invalid_request"


class EmptyDocument(InvalidRequest):
    """The document holds nothing once normalised as preprocess does (only control,
    zero-width or space characters)."""

    title = "Empty document"
    code = "empty_document"


class IdempotencyKeyReused(InvalidRequest):
    """An Idempotency-Key already used by this user for a request with another body."""

    title = "Idempotency-Key reused"
    code = "idempotency_key_reused"


class ModelNotAllowed(InvalidRequest):
    """The request names a model its tier does not list; ``allowed_models`` says which it may."""

    title = "Model not allowed"
    code = "model_not_allowed"


class Unauthorized(GatewayError):
    status = 401
    title = "Missing or invalid API key"
    code = "unauthorized"


class NotFound(GatewayError):
    """Unknown id, or an id that belongs to somebody else (existence must not leak)."""

    status = 404
    title = "Not found"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    title = "Method not allowed"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    title = "Payload too large"
    code = "input_too_large"


class RateLimited(GatewayError):
    status = 429
    title = "Rate limit exceeded"
    code = "rate_limited"
    retriable = True


class BudgetExceeded(GatewayError):
    status = 429
    title = "Monthly budget spent"
    code = "budget_exceeded"


class Overloaded(GatewayError):
    status = 503
    title = "Overloaded"
    code = "overloaded"
    retriable = True


class BrokerUnavailable(GatewayError):
    status = 503
    title = "Event log unavailable"
    code = "broker_unavailable"
    retriable = True


class NotReady(GatewayError):
    status = 503
    title = "Gateway not ready"
    code = "not_ready"
    retriable = True


class SessionBusy(GatewayError):
    """A follow-up about a summary that has not finished yet."""

    status = 409
    title = "Summary not finished"
    code = "session_busy"
    retriable = True


class SessionExpired(GatewayError):
    """A follow-up after the tier's session TTL (docs/architecture.md, "Context and memory")."""

    status = 410
    title = "Session expired"
    code = "session_expired"


def problem_response(exc: GatewayError, instance: str | None = None) -> JSONResponse:
    """Render ``exc`` as problem+json, with Retry-After when the error has a wait."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + exc.code,
        "title": exc.title,
        "status": exc.status,
        "detail": str(exc),
        "code": exc.code,
        "retriable": exc.retriable,
    }
    if instance is not None:
        body["instance"] = instance
    body.update(exc.extra)
    headers: dict[str, str] = {}
    if exc.retry_after_s is not None:
        # Retry-After takes whole seconds; round up so a client never comes back too early.
        seconds = max(1, math.ceil(exc.retry_after_s))
        headers["Retry-After"] = str(seconds)
        body["retry_after_s"] = seconds
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        body, status_code=exc.status, headers=headers, media_type=PROBLEM_MEDIA_TYPE
    )


async def handle_gateway_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette exception handler for every GatewayError."""
    assert isinstance(exc, GatewayError)
    return problem_response(exc, instance=request.url.path)
