"""The ASGI application: ``create_app(settings)`` wires routes, errors and the lifecycle."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.http.auth import KeyStore
from gateway.http.documents import router as documents_router
from gateway.http.errors import (
    GatewayError,
    InvalidRequest,
    MalformedRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    problem_response,
)
from gateway.http.memory import router as memory_router
from gateway.http.page import router as page_router
from gateway.http.routes import router
from gateway.http.sse import ClientTooSlow
from gateway.http.streamtoken import StreamTokens
from gateway.http.webapi import router as webapi_router
from gateway.http.ws import router as ws_router
from gateway.metrics import REQUESTS
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from pipeline.core.clock import now_ms
from pipeline.core.tiers import Tier, load_tiers

log = logging.getLogger("sumstream.gateway")

SUBMIT_PATH = "/v1/summaries"


class SlowClientFilter(logging.Filter):
    """Keeps a slow SSE client out of uvicorn's error log.

    uvicorn logs any exception that ends a response as an error with its traceback; a client
    let go for being too slow is a normal close, which the stream has logged once.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ClientTooSlow))


SLOW_CLIENT_FILTER = SlowClientFilter()


class BodyLimit:
    """Rejects bodies over ``max_bytes`` with 413 before the app reads them.

    Checks Content-Length first, then counts while reading (chunked bodies have none),
    buffering at most ``max_bytes``. Also stamps the arrival time for the overhead header.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["t0"] = time.perf_counter()
        state["received_ms"] = now_ms()
        if scope["method"] not in {"POST", "PUT", "PATCH"}:
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await self._reject(scope, receive, send, MalformedRequest("bad Content-Length"))
                return
            if declared > self.max_bytes:
                await self._reject(scope, receive, send, self._too_large(declared))
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send, self._too_large(size))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body of {size}+ bytes is over {self.max_bytes}")

    async def _reject(self, scope: Scope, receive: Receive, send: Send, exc: GatewayError) -> None:
        if scope["method"] == "POST" and scope["path"] == SUBMIT_PATH:
            REQUESTS.labels(exc.code).inc()
        await problem_response(exc, instance=scope["path"])(scope, receive, send)


def _count_rejection(request: Request, exc: GatewayError) -> None:
    if request.method == "POST" and request.url.path == SUBMIT_PATH:
        REQUESTS.labels(exc.code).inc()


async def _gateway_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    _count_rejection(request, exc)
    if exc.status >= 500:
        log.warning("answered %s %s", exc.status, exc.code, extra={"path": request.url.path})
    return problem_response(exc, instance=request.url.path)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    problem: GatewayError
    if any(e.get("type") == "json_invalid" for e in errors):
        problem = MalformedRequest("the body is not valid JSON")
    else:
        # Never echo the input back: it may be a whole document.
        details = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in errors
        ]
        problem = InvalidRequest(
            "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details),
            extra={"errors": details},
        )
    return await _gateway_error(request, problem)


def _parse_failure(cause: BaseException | None) -> str:
    """What is wrong with a body FastAPI could not parse, without echoing it."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 (byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the body's JSON is nested too deeply"
    return "the body could not be parsed as JSON"


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    problem: GatewayError
    if exc.status_code == 400:
        # FastAPI's body parsing failed for a reason other than a JSON syntax error.
        problem = MalformedRequest(_parse_failure(exc.__cause__))
    elif exc.status_code == 404:
        problem = NotFound(f"no route {request.url.path}")
    elif exc.status_code == 405:
        problem = MethodNotAllowed(f"{request.method} is not allowed here")
    else:
        problem = GatewayError(str(exc.detail))
        problem.status = exc.status_code
    return await _gateway_error(request, problem)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # A slow client's stream has started: nothing is sent, and it is no error.
    if not isinstance(exc, ClientTooSlow):
        log.exception("unhandled error", extra={"path": request.url.path})
    return problem_response(GatewayError("internal error"), instance=request.url.path)


def create_app(
    settings: GatewaySettings | None = None,
    *,
    keys: KeyStore | None = None,
    tiers: Mapping[str, Tier] | None = None,
) -> FastAPI:
    """The gateway app. Kafka clients start with the ASGI lifespan and stop with it."""
    settings = settings or GatewaySettings()
    keys = keys if keys is not None else KeyStore.from_settings(settings)
    tiers = tiers if tiers is not None else load_tiers(settings.tiers_file)
    unknown = keys.tiers - set(tiers)
    if unknown:
        log.warning("API keys name tiers the tier file lacks: %s", sorted(unknown))
    gateway = Gateway(settings, keys, tiers)
    logging.getLogger("uvicorn.error").addFilter(SLOW_CLIENT_FILTER)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(
        title="sumstream",
        version="1",
        summary="Streaming document summaries over an event log",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.state.stream_tokens = StreamTokens.from_settings(settings)
    app.include_router(router)
    # The web app and the WebSocket API (docs/architecture.md, "The web app and WebSocket API").
    for extra in (webapi_router, documents_router, memory_router, ws_router, page_router):
        app.include_router(extra)
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app
