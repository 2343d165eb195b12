"""The routes a browser client needs besides the summaries API: a stream token for one
request's events, and the caller's recent requests (docs/architecture.md, "The web app and
WebSocket API")."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from gateway.http.models import Links, links
from gateway.http.routes import PROBLEM, GatewayDep, PrincipalDep, owned_by
from gateway.http.streamtoken import StreamTokens
from gateway.service import Gateway

router = APIRouter()

MAX_RECENT = 100


class StreamTokenOut(BaseModel):
    """A token for ``EventSource``: put it in the events URL as ``?token=``."""

    token: str
    expires_at: int = Field(description="epoch seconds after which the token is refused")
    events_url: str = Field(description="the events URL with the token in it")


class RecentOut(BaseModel):
    id: str
    created_at: int = Field(description="epoch ms")
    status: str = Field(description="the result's status when this gateway holds it, else unknown")
    links: Links


class RecentList(BaseModel):
    """The caller's most recent requests, newest first."""

    items: list[RecentOut]


@router.post(
    "/v1/summaries/{request_id}/stream-token",
    response_model=StreamTokenOut,
    responses={401: PROBLEM, 404: PROBLEM},
)
async def stream_token(
    request_id: str, request: Request, gateway: GatewayDep, principal: PrincipalDep
) -> StreamTokenOut:
    """A short-lived token that lets a browser's EventSource follow this request's events
    (``GET /v1/summaries/{id}/events?token=``); it works for no other route or request."""
    await owned_by(gateway, request_id, principal)
    tokens: StreamTokens = request.app.state.stream_tokens
    minted = tokens.mint(principal, request_id)
    return StreamTokenOut(
        token=minted.token,
        expires_at=minted.expires_at,
        events_url=f"{links(request_id).events}?token={minted.token}",
    )


@router.get("/v1/summaries", response_model=RecentList, responses={401: PROBLEM})
async def recent_summaries(
    gateway: GatewayDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=MAX_RECENT)] = 20,
) -> RecentList:
    """The caller's requests of the last ``idempotency_window_s`` (24 h) that this gateway's
    request index holds (every instance follows all of ``requests``), newest first."""
    found: list[RecentOut] = []
    # The index is in log order: walk it from the end. Bounded by max_index_entries.
    # Requests before DELETE /v1/me/memory are forgotten (docs/architecture.md, "Forgetting").
    forgotten_at = gateway.preferences.forgotten_at(principal.user_id)
    for request_id, owner in reversed(gateway.index.owners.items()):
        if owner.user_id != principal.user_id or owner.created_at <= forgotten_at:
            continue
        found.append(
            RecentOut(
                id=request_id,
                created_at=owner.created_at,
                status=_status(gateway, request_id),
                links=links(request_id),
            )
        )
        if len(found) >= limit:
            break
    found.sort(key=lambda r: r.created_at, reverse=True)
    return RecentList(items=found)


def _status(gateway: Gateway, request_id: str) -> str:
    stream = gateway.hub.get(request_id)
    if stream is None:
        return "unknown"
    if stream.result is not None:
        return str(stream.result["status"])
    return "running"
