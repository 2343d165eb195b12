"""The caller's memory over HTTP: ``GET/PUT /v1/me/preferences`` (docs/architecture.md,
"Context and memory").

Every namespace is the authenticated principal's user id: no body field or path names a user,
so a caller can only ever read or change their own memory.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from gateway.http.errors import BrokerUnavailable, NotReady
from gateway.http.routes import PROBLEM, GatewayDep, PrincipalDep
from gateway.service import Gateway
from pipeline.core.clock import now_ms
from pipeline.core.records import UserPreferences
from pipeline.memory import preferences as prefs
from pipeline.memory.store import MemoryUnavailableError, PreferencesTable

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
    record = prefs.stored(user, body.model_dump(), version=version, now_ms=now)
    try:
        await table.put(record)
    except MemoryUnavailableError as exc:
        raise BrokerUnavailable("could not store the preferences", retry_after_s=1) from exc
    return _out(record)
