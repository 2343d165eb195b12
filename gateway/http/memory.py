"""The caller's memory over HTTP: ``GET/PUT /v1/me/preferences`` and follow-up questions about
a summary, ``POST /v1/summaries/{id}/messages`` (docs/architecture.md, "Context and memory").

Every namespace is the authenticated principal's user id: no body field or path names a user,
so a caller can only ever read or change their own memory.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.http.errors import BrokerUnavailable, NotReady, SessionBusy, SessionExpired
from gateway.http.routes import (
    PROBLEM,
    SSE_DOC,
    GatewayDep,
    PrincipalDep,
    accepted_out,
    owned_by,
    wants_json,
)
from gateway.http.sse import stream_response
from gateway.service import Gateway
from pipeline.core.clock import now_ms
from pipeline.core.records import UserPreferences
from pipeline.kafka.tail import id_time_ms
from pipeline.llm.extractive import count_tokens
from pipeline.memory import preferences as prefs
from pipeline.memory.compacted import MemoryUnavailableError
from pipeline.memory.store import PreferencesTable

router = APIRouter()

Length = Literal["short", "medium", "long"]
Style = Literal["bullets", "prose"]


class PreferencesIn(BaseModel):
    """How you like your summaries; every field optional, a PUT replaces them all."""

    model_config = ConfigDict(extra="forbid", strict=True)

    length: Length | None = None
    style: Style | None = Field(default=None, description="bullets or prose")
    language: str | None = Field(default=None, max_length=prefs.MAX_FIELD_CHARS)
    audience: str | None = Field(default=None, max_length=prefs.MAX_FIELD_CHARS)
    guidance: str | None = Field(
        default=None,
        max_length=prefs.MAX_GUIDANCE_CHARS,
        description=f"free text, at most {prefs.MAX_GUIDANCE_CHARS} characters",
    )


class PreferencesOut(BaseModel):
    """Your preferences; ``version`` 0 means none are set."""

    length: Length | None
    style: Style | None
    language: str | None
    audience: str | None
    guidance: str | None
    version: int = Field(description="recorded on every request that used these preferences")
    updated_at: int = Field(description="epoch ms; 0 when none are set")


def _table(gateway: Gateway) -> PreferencesTable:
    if not gateway.preferences.ready:
        raise NotReady("the preferences are not loaded yet")
    return gateway.preferences


def _out(record: UserPreferences) -> PreferencesOut:
    return PreferencesOut.model_validate(
        {name: record[name] for name in (*prefs.FIELDS, "version", "updated_at")}  # type: ignore[literal-required]
    )


@router.get(
    "/v1/me/preferences", response_model=PreferencesOut, responses={401: PROBLEM, 503: PROBLEM}
)
async def get_preferences(gateway: GatewayDep, principal: PrincipalDep) -> PreferencesOut:
    """Your preferences, applied to every request you make."""
    user = principal.user_id
    return _out(_table(gateway).get(user) or prefs.empty(user))


@router.put(
    "/v1/me/preferences",
    response_model=PreferencesOut,
    responses={401: PROBLEM, 422: PROBLEM, 503: PROBLEM},
)
async def put_preferences(
    body: PreferencesIn, gateway: GatewayDep, principal: PrincipalDep
) -> PreferencesOut:
    """Replace your preferences; later requests use them (their history records the version).
    Bad input (unknown fields, wrong types, guidance over the limit) is 422 and changes nothing."""
    user = principal.user_id
    table = _table(gateway)
    now = now_ms()
    version = prefs.next_version(table.version(user), now)
    record = prefs.stored(
        user, body.model_dump(), version=version, now_ms=now, forgotten_at=table.forgotten_at(user)
    )
    try:
        await table.put(record)
    except MemoryUnavailableError as exc:
        raise BrokerUnavailable("could not store the preferences", retry_after_s=1) from exc
    return _out(record)


MAX_MESSAGE_CHARS = 2_000


class MessageIn(BaseModel):
    """A follow-up question about a summary."""

    model_config = ConfigDict(extra="forbid", strict=True)

    message: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)


@router.post(
    "/v1/summaries/{request_id}/messages",
    responses={
        200: SSE_DOC,
        202: {"description": "with Accept: application/json: the follow-up's id and links"},
        401: PROBLEM,
        404: {**PROBLEM, "description": "no such summary, or not yours"},
        409: {**PROBLEM, "description": "session_busy: the summary has not finished yet"},
        410: {**PROBLEM, "description": "session_expired: past the tier's session_ttl_s"},
        422: PROBLEM,
        429: PROBLEM,
        503: PROBLEM,
    },
)
async def post_message(
    request_id: str,
    body: MessageIn,
    request: Request,
    gateway: GatewayDep,
    principal: PrincipalDep,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """Ask a follow-up about summary ``request_id``: streamed like a summary (same events,
    resumable, cancellable, billed), with the document and the earlier turns as context."""
    await owned_by(gateway, request_id, principal)
    tier = gateway.intake.tier_of(principal)
    born = id_time_ms(request_id) or 0
    if now_ms() > born + int(tier.session_ttl_s * 1000):
        raise SessionExpired(f"the conversation about {request_id} has expired")
    result = await gateway.lookup.result_of(request_id)
    if result is None:
        raise SessionBusy("the summary has not finished yet", retry_after_s=1)
    usage = result["usage"]
    # The document, the answers so far and the question; settled with what it really used.
    estimate = (
        int(usage["input_tokens"])
        + int(usage.get("cache_creation_input_tokens") or 0)
        + int(usage.get("cache_read_input_tokens") or 0)
        + 2 * int(usage["output_tokens"])
        + count_tokens(body.message)
    )
    received = getattr(request.state, "received_ms", now_ms())
    accepted = await gateway.intake.submit_follow_up(
        principal, request_id, body.message, input_tokens=estimate, received_ms=received
    )
    out = accepted_out(accepted)
    headers = {"Location": out.links.self, "X-Request-Id": accepted.request_id}
    if wants_json(accept):
        return JSONResponse(out.model_dump(), status_code=202, headers=headers)
    return stream_response(
        gateway,
        accepted.request_id,
        principal.user_id,
        after_seq=0,
        accepted=out,
        headers=headers,
    )


class ForgetReceipt(BaseModel):
    """What ``DELETE /v1/me/memory`` removed, and when."""

    user: str
    forgotten_at: int = Field(description="epoch ms: memory from before this moment is gone")
    removed: dict[str, str]
    kept: dict[str, str]
    latency_ms: int = Field(description="from the request to the acknowledged write")


@router.delete(
    "/v1/me/memory", response_model=ForgetReceipt, responses={401: PROBLEM, 503: PROBLEM}
)
async def forget_memory(gateway: GatewayDep, principal: PrincipalDep) -> ForgetReceipt:
    """Forget your preferences, your conversations and your past summaries (docs/architecture.md,
    "Forgetting"); billing and audit figures stay."""
    started = now_ms()
    user = principal.user_id
    table = _table(gateway)
    had = prefs.has_preferences(table.get(user))
    record = prefs.forgotten(
        user, version=prefs.next_version(table.version(user), started), now_ms=started
    )
    try:
        await table.put(record)
        # Shredding the data keys makes the text on the immutable topics unreadable.
        shredded = await gateway.data_keys.shred(user)
    except MemoryUnavailableError as exc:
        raise BrokerUnavailable("could not record the forgetting", retry_after_s=1) from exc
    return ForgetReceipt(
        user=user,
        forgotten_at=record["forgotten_at"],
        removed={
            "preferences": "removed" if had else "none were set",
            "sessions": "every conversation about a summary requested before forgotten_at",
            "history": "summaries requested before forgotten_at: no longer served (404) "
            "nor used as context",
            "text": f"{len(shredded)} data key(s) shredded: the documents, prompts, tokens "
            "and summaries sealed with them in requests, preprocessed, tokens and results "
            "are now unreadable everywhere",
        },
        kept={
            "billing": "usage and cost per request (results, quota ledger) for invoices",
            "audit": "status, usage, cost, latency and trace of every record, in clear",
            "plaintext requests": "a request another system put on requests unsealed stays "
            "readable there until its retention (7 days); its copies downstream were sealed",
            "long documents": "chunk summaries on chunks and reuse (unsealed) until their "
            "retention (1 day)",
        },
        latency_ms=now_ms() - started,
    )
