"""The HTTP API: submit, stream, fetch and cancel summaries; health, readiness, metrics."""

from __future__ import annotations

import hmac
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse
from starlette.responses import JSONResponse, Response

from gateway.admission.intake import Accepted
from gateway.http.auth import Principal
from gateway.http.errors import InvalidRequest, NotFound, NotReady, Unauthorized, problem_response
from gateway.http.models import AcceptedOut, RunningOut, SummaryIn, UsageOut, links, result_json
from gateway.http.sse import stream_response
from gateway.http.streamtoken import StreamTokens
from gateway.metrics import OVERHEAD_SECONDS, REQUESTS
from gateway.service import Gateway
from pipeline.core.clock import now_ms
from pipeline.kafka.tail import id_time_ms

router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")

MAX_ID_CHARS = 128
PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
SSE_DOC: dict[str, Any] = {
    "content": {"text/event-stream": {}},
    "description": "the summary as an SSE stream",
}


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller, from ``Authorization: Bearer <key>``; 401 problem otherwise."""
    gateway = get_gateway(request)
    header = f"Bearer {credentials.credentials}" if credentials is not None else None
    if header is None and request.headers.get("authorization"):
        header = request.headers["authorization"]  # a non-Bearer scheme: let it fail clearly
    principal = gateway.keys.authenticate_header(header)
    request.state.user_id = principal.user_id
    return principal


def authenticate_stream(
    request: Request,
    request_id: str,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    token: Annotated[str | None, Query(description="a stream token for this request")] = None,
) -> Principal:
    """The caller of an events route: a stream token bound to ``request_id`` (what a
    browser's EventSource can send) or the bearer key."""
    if token is None:
        return authenticate(request, credentials)
    tokens: StreamTokens = request.app.state.stream_tokens
    principal = tokens.verify(token, request_id)
    request.state.user_id = principal.user_id
    return principal


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
PrincipalDep = Annotated[Principal, Depends(authenticate)]
StreamPrincipalDep = Annotated[Principal, Depends(authenticate_stream)]


def _overhead_headers(request: Request) -> dict[str, str]:
    started = getattr(request.state, "t0", None)
    elapsed = time.perf_counter() - started if started is not None else 0.0
    OVERHEAD_SECONDS.observe(elapsed)
    ms = f"{elapsed * 1000:.2f}"
    return {"Server-Timing": f"gateway;dur={ms}", "X-Sumstream-Overhead-Ms": ms}


def wants_json(accept: str | None) -> bool:
    accept = (accept or "").lower()
    return "application/json" in accept and "text/event-stream" not in accept


async def owned_by(gateway: Gateway, request_id: str, principal: Principal) -> None:
    """404 unless ``principal`` sent ``request_id``: another user's id looks unknown."""
    if len(request_id) > MAX_ID_CHARS:
        raise NotFound(f"no summary {request_id[:MAX_ID_CHARS]}...")
    if not gateway.started:
        raise NotReady("the gateway is starting or stopping")
    owner = await gateway.lookup.owner_of(request_id)
    if owner is None or owner.user_id != principal.user_id:
        raise NotFound(f"no summary {request_id}")
    # A forgotten user's earlier requests are gone for them (docs/architecture.md, "Forgetting").
    forgotten_at = gateway.preferences.forgotten_at(principal.user_id)
    if forgotten_at and (id_time_ms(request_id) or 0) <= forgotten_at:
        raise NotFound(f"no summary {request_id}")


def _stream_response(
    gateway: Gateway,
    request_id: str,
    principal: Principal,
    *,
    after_seq: int,
    accepted: AcceptedOut | None,
    headers: dict[str, str],
    announce: bool,
) -> EventSourceResponse:
    return stream_response(
        gateway,
        request_id,
        principal.user_id,
        after_seq=after_seq,
        accepted=accepted,
        headers=headers,
        announce=announce,
    )


@router.post(
    "/v1/summaries",
    responses={
        200: SSE_DOC,
        202: {"model": AcceptedOut, "description": "with Accept: application/json"},
        400: PROBLEM,
        401: PROBLEM,
        413: PROBLEM,
        422: PROBLEM,
        429: {
            **PROBLEM,
            "description": "rate_limited (requests or tokens per minute) or budget_exceeded "
            "(the tier's monthly budget is spent), with Retry-After",
        },
        503: {
            **PROBLEM,
            "description": "overloaded (the estimated queue wait is above the tier's limit), "
            "quota_unavailable, broker_unavailable or not_ready, with Retry-After",
        },
    },
)
async def create_summary(
    request: Request,
    body: SummaryIn,
    gateway: GatewayDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """Accept a document and stream its summary (or answer 202 with links for JSON clients)."""
    received = getattr(request.state, "received_ms", now_ms())
    accepted = await gateway.intake.submit(
        principal, body, idempotency_key=idempotency_key, received_ms=received
    )
    REQUESTS.labels("idempotent_replay" if accepted.replay else "accepted").inc()
    out = accepted_out(accepted)
    headers = {
        **_overhead_headers(request),
        "Location": out.links.self,
        "X-Request-Id": accepted.request_id,
    }
    if accepted.replay:
        headers["Idempotent-Replayed"] = "true"
    if wants_json(accept):
        return JSONResponse(out.model_dump(), status_code=202, headers=headers)
    # A replayed POST is a client coming back, maybe to another gateway than it left.
    return _stream_response(
        gateway,
        accepted.request_id,
        principal,
        after_seq=0,
        accepted=out,
        headers=headers,
        announce=accepted.replay,
    )


@router.get(
    "/v1/summaries/{request_id}/events",
    responses={200: SSE_DOC, 401: PROBLEM, 404: PROBLEM, 422: PROBLEM},
)
async def summary_stream(
    request_id: str,
    gateway: GatewayDep,
    principal: StreamPrincipalDep,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    last_event_id: Annotated[str | None, Query()] = None,
) -> EventSourceResponse:
    """The request's events after Last-Event-ID (header or query), during or after generation."""
    raw = last_event_id_header if last_event_id_header is not None else last_event_id
    after = 0
    if raw not in (None, ""):
        try:
            after = max(0, int(raw))
        except ValueError:
            raise InvalidRequest("Last-Event-ID must be a token seq (an integer)") from None
    await owned_by(gateway, request_id, principal)
    return _stream_response(
        gateway, request_id, principal, after_seq=after, accepted=None, headers={}, announce=True
    )


@router.get(
    "/v1/summaries/{request_id}",
    responses={202: {"model": RunningOut}, 401: PROBLEM, 404: PROBLEM},
)
async def get_summary(
    request_id: str, gateway: GatewayDep, principal: PrincipalDep
) -> JSONResponse:
    """The SummaryResult, or 202 ``{status: running}`` while there is none."""
    await owned_by(gateway, request_id, principal)
    result = await gateway.lookup.result_of(request_id)
    if result is None:
        running = RunningOut(id=request_id, links=links(request_id))
        return JSONResponse(running.model_dump(), status_code=202)
    return JSONResponse(result_json(result))


@router.delete(
    "/v1/summaries/{request_id}",
    status_code=202,
    responses={401: PROBLEM, 404: PROBLEM, 503: PROBLEM},
)
async def cancel_summary(
    request_id: str, gateway: GatewayDep, principal: PrincipalDep
) -> JSONResponse:
    """Ask the pipeline to cancel: a ControlEvent CANCEL on ``control``."""
    await owned_by(gateway, request_id, principal)
    await gateway.intake.cancel(request_id, principal.user_id, "client")
    return JSONResponse({"id": request_id, "status": "cancelling"}, status_code=202)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


@router.get(
    "/v1/usage",
    response_model=UsageOut,
    responses={401: PROBLEM, 503: PROBLEM},
)
async def get_usage(gateway: GatewayDep, principal: PrincipalDep) -> UsageOut:
    """The caller's requests, tokens and cost this month, against the tier's budget and limits.

    Read from the quota ledger, which every gateway follows: results are settled there
    within about a second of their completion, at any instance.
    """
    u = gateway.usage(principal)
    return UsageOut(
        user=u.user_id,
        tier=u.tier,
        period_start=_iso(u.period_start_ms),
        period_end=_iso(u.period_end_ms),
        requests=u.requests,
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        tokens=u.tokens,
        cost_micro_usd=u.cost_micro_usd,
        cost_usd=u.cost_micro_usd / 1_000_000,
        budget_micro_usd=u.budget_micro_usd,
        remaining_micro_usd=u.remaining_micro_usd,
        limits={"rpm": u.rpm, "tpm": u.tpm},
        window={"requests": u.window_requests, "tokens": u.window_tokens},
        documents=tier.limits() if (tier := gateway.tiers.get(u.tier)) else {},
    )


@router.get("/healthz", tags=["operations"])
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], responses={503: PROBLEM})
async def readyz(gateway: GatewayDep) -> Response:
    """Broker reachable, topics present, idempotency index rebuilt."""
    checks = await gateway.readiness()
    if not checks["ready"]:
        return problem_response(NotReady("not ready", extra={"checks": checks}), "/readyz")
    return JSONResponse({"status": "ready", "checks": checks})


@router.get("/metrics", tags=["operations"], include_in_schema=False)
async def metrics(
    gateway: GatewayDep, authorization: Annotated[str | None, Header()] = None
) -> Response:
    """Prometheus metrics; behind a bearer token when ``metrics_token`` is set."""
    token = gateway.settings.metrics_token
    if token is not None:
        scheme, _, given = (authorization or "").partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise Unauthorized("GET /metrics needs Authorization: Bearer <metrics token>")
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def accepted_out(accepted: Accepted) -> AcceptedOut:
    """What a client is told of a request intake accepted (the 202 body, the ``accepted`` event)."""
    return AcceptedOut(
        id=accepted.request_id,
        queue_position=accepted.queue_position,
        estimated_wait_s=accepted.estimated_wait_s,
        max_output_tokens=accepted.max_output_tokens,
        degraded=accepted.degraded,
        links=links(accepted.request_id),
    )
