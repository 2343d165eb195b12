"""The WebSocket API (/v1/ws) and stream tokens on real processes: the same streams as SSE,
resume, cancel, isolation between users and bad input on a socket that stays usable."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from pipeline.llm.extractive import summarize
from tests.e2e.documents import document
from tests.e2e.faults import sim_knobs
from tests.harness import Stack, auth, collect, eventually, running_stack

pytestmark = pytest.mark.e2e

MAX_TOKENS = 60
SECRET = "e2e-stream-token-secret"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        "SUMSTREAM_STREAM_TOKEN_SECRET": SECRET,
        "SUMSTREAM_CANCEL_GRACE_S": "1",
        # An unauthenticated socket gets as long as a connection's head: 2 s here.
        "SUMSTREAM_HEADER_TIMEOUT_S": "2",
    }
    with running_stack(tmp_path_factory.mktemp("websocket"), env=env) as s:
        yield s


def expected(doc: str) -> str:
    return summarize(doc, MAX_TOKENS).strip()


def ws_url(stack: Stack) -> str:
    return stack.gateway.replace("http://", "ws://") + "/v1/ws"


class Socket:
    """A test's side of one socket: frames sent as dicts, frames received decoded."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn

    async def send(self, **frame: Any) -> None:
        await self.conn.send(json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await self.conn.recv(decode=True))
        return frame

    async def auth(self, key: str = "key-ann") -> None:
        await self.send(type="auth", key=key)
        assert (await self.recv())["type"] == "authenticated"

    async def until(self, kind: str, request_id: str | None = None) -> list[dict[str, Any]]:
        """Frames up to and including the next one of ``kind`` (for ``request_id``)."""
        frames = []
        while True:
            frame = await self.recv()
            frames.append(frame)
            if frame["type"] == kind and (request_id is None or frame.get("id") == request_id):
                return frames


@asynccontextmanager
async def socket(stack: Stack, key: str | None = "key-ann") -> AsyncIterator[Socket]:
    async with connect(ws_url(stack), open_timeout=10, close_timeout=2) as conn:
        sock = Socket(conn)
        if key is not None:
            await sock.auth(key)
        yield sock


def tokens(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f["data"] for f in frames if f["type"] == "token"]


def assert_contiguous(toks: list[dict[str, Any]]) -> None:
    """Each token event covers the seqs right after the previous one's (a coalesced record
    covers several): no gap, no repeat."""
    assert toks, "no tokens"
    for prev, cur in itertools.pairwise(toks):
        assert cur["first_seq"] == prev["seq"] + 1 <= cur["seq"], f"gap or repeat: {prev} {cur}"


async def test_a_submit_streams_the_same_events_and_seqs_as_sse(stack: Stack) -> None:
    doc = document(8100)
    async with socket(stack) as ws:
        await ws.send(type="submit", ref="s1", document=doc, max_output_tokens=MAX_TOKENS)
        frames = await ws.until("done")
    accepted = frames[0]
    assert accepted["type"] == "accepted" and accepted["ref"] == "s1"
    request_id = accepted["id"]
    got = tokens(frames)
    assert_contiguous(got)
    done = frames[-1]["data"]
    assert done["status"] == "COMPLETED"
    assert "".join(t["text"] for t in got).strip() == done["summary"] == expected(doc)
    async with httpx.AsyncClient(timeout=60) as client:
        sse = await collect(
            client, "GET", f"{stack.gateway}/v1/summaries/{request_id}/events", headers=auth()
        )
    assert [(e.data["seq"], e.data["text"]) for e in sse.of("token")] == [
        (t["seq"], t["text"]) for t in got
    ]
    assert sse.done == done


async def test_resume_on_a_new_socket_continues_after_the_last_seq_without_gap_or_repeat(
    stack: Stack,
) -> None:
    doc = document(8200)
    with sim_knobs(stack, token_delay_ms=30):
        async with socket(stack) as ws:
            await ws.send(type="submit", document=doc, max_output_tokens=MAX_TOKENS)
            first: list[dict[str, Any]] = []
            while len(tokens(first)) < 5:
                first.append(await ws.recv())
        request_id = first[0]["id"]
        last_seq = tokens(first)[-1]["seq"]
        async with socket(stack) as ws:
            await ws.send(type="resume", id=request_id, last_seq=last_seq)
            rest = await ws.until("done", request_id)
    assert_contiguous(tokens(first) + tokens(rest))
    text = "".join(t["text"] for t in tokens(first) + tokens(rest))
    assert text.strip() == rest[-1]["data"]["summary"] == expected(doc)


async def test_cancel_on_the_socket_closes_the_upstream_and_ends_cancelled(stack: Stack) -> None:
    doc = document(8300)
    with sim_knobs(stack, token_delay_ms=60):
        async with socket(stack) as ws:
            await ws.send(type="submit", document=doc, max_output_tokens=MAX_TOKENS)
            frames: list[dict[str, Any]] = []
            while len(tokens(frames)) < 5:
                frames.append(await ws.recv())
            request_id = frames[0]["id"]
            await ws.send(type="cancel", id=request_id, ref="c1")
            rest = await ws.until("done", request_id)
    assert {"type": "cancelling", "id": request_id, "ref": "c1"} in rest
    errors = [f["data"] for f in rest if f["type"] == "error"]
    assert errors and errors[0]["code"] == "cancelled"
    assert rest[-1]["data"]["status"] == "CANCELLED"
    [upstream] = stack.sim_stats()["requests"][request_id]["streams"]
    assert upstream["ended"] == "client_closed"
    assert upstream["tokens"] < MAX_TOKENS


async def test_another_user_can_neither_follow_nor_cancel_a_request(stack: Stack) -> None:
    doc = document(8400)
    with sim_knobs(stack, token_delay_ms=20):
        async with socket(stack) as ann, socket(stack, "key-ben") as ben:
            await ann.send(type="submit", document=doc, max_output_tokens=MAX_TOKENS)
            request_id = (await ann.until("accepted"))[-1]["id"]
            await ben.send(type="resume", id=request_id, last_seq=0, ref="r")
            await ben.send(type="cancel", id=request_id, ref="c")
            refused = [await ben.recv(), await ben.recv()]
            frames = await ann.until("done", request_id)
    # Another user's id looks unknown, exactly like an id that does not exist.
    assert [(f["type"], f["ref"], f["status"], f["code"]) for f in refused] == [
        ("problem", "r", 404, "not_found"),
        ("problem", "c", 404, "not_found"),
    ]
    assert frames[-1]["data"]["status"] == "COMPLETED"
    assert frames[-1]["data"]["summary"] == expected(doc)


async def test_bad_frames_answer_problems_and_a_running_stream_loses_nothing(
    stack: Stack,
) -> None:
    doc = document(8500)
    async with socket(stack, key=None) as ws:
        await ws.send(type="submit", document=doc)
        assert (await ws.recv())["code"] == "unauthorized"
        await ws.send(type="auth", key="not-a-key")
        assert (await ws.recv())["code"] == "unauthorized"
        await ws.auth()
        with sim_knobs(stack, token_delay_ms=20):
            await ws.send(type="submit", ref="good", document=doc, max_output_tokens=MAX_TOKENS)
            await ws.conn.send("{not json")
            await ws.conn.send(b"\x00binary")
            await ws.send(type="summon", ref=1)
            await ws.send(type="submit", ref=2, document="   ")
            await ws.send(type="submit", ref=3, document=doc, max_output_tokens="many")
            await ws.send(type="resume", ref=4, id="01NOTANID", last_seq=-1)
            await ws.send(type="resume", ref=5, id="x" * 500)
            frames = await ws.until("done")
    problems = [(f.get("ref"), f["status"], f["code"]) for f in frames if f["type"] == "problem"]
    assert problems == [
        (None, 400, "malformed_request"),
        (None, 400, "malformed_request"),
        (1, 422, "invalid_request"),
        (2, 422, "empty_document"),
        (3, 422, "invalid_request"),
        (4, 422, "invalid_request"),
        (5, 404, "not_found"),
    ]
    # The document is never echoed back in a problem.
    assert not any(doc[:40] in json.dumps(f) for f in frames if f["type"] == "problem")
    got = tokens(frames)
    assert_contiguous(got)
    assert "".join(t["text"] for t in got).strip() == frames[-1]["data"]["summary"]
    assert frames[-1]["data"]["summary"] == expected(doc)


async def test_a_stream_token_follows_its_own_request_only(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway, timeout=60) as client:
        ids = []
        for seed in (8600, 8601):
            r = await client.post(
                "/v1/summaries",
                json={"document": document(seed), "max_output_tokens": MAX_TOKENS},
                headers={**auth(), "Accept": "application/json"},
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        mine, other = ids
        minted = await client.post(f"/v1/summaries/{mine}/stream-token", headers=auth())
        assert minted.status_code == 200, minted.text
        token = minted.json()["token"]
        # Another user cannot mint one for it.
        assert (
            await client.post(f"/v1/summaries/{mine}/stream-token", headers=auth("key-ben"))
        ).status_code == 404
        followed = await collect(client, "GET", minted.json()["events_url"])
        assert followed.done["summary"] == expected(document(8600))
        # Useless for another request, and for any route but the events.
        wrong = await client.get(f"/v1/summaries/{other}/events", params={"token": token})
        assert wrong.status_code == 401
        as_key = {"Authorization": f"Bearer {token}"}
        assert (await client.get(f"/v1/summaries/{mine}", headers=as_key)).status_code == 401
        assert (await client.delete(f"/v1/summaries/{mine}", headers=as_key)).status_code == 401
        assert (
            await client.get(f"/v1/summaries/{mine}", params={"token": token})
        ).status_code == 401
        # On a socket it resumes its request and nothing else.
        async with socket(stack, key=None) as ws:
            await ws.send(type="auth", token=token, id=mine)
            assert (await ws.recv())["type"] == "authenticated"
            await ws.send(type="resume", id=other, ref="o")
            await ws.send(type="cancel", id=mine, ref="c")
            await ws.send(type="resume", id=mine, ref="m")
            frames = await ws.until("done", mine)
    problems = [(f["ref"], f["code"]) for f in frames if f["type"] == "problem"]
    assert problems == [("o", "not_found"), ("c", "unauthorized")]
    assert frames[-1]["data"]["summary"] == expected(document(8600))


def test_recent_requests_list_the_callers_own_newest_first(stack: Stack) -> None:
    def listed() -> list[dict[str, Any]] | None:
        r = httpx.get(f"{stack.gateway}/v1/summaries", params={"limit": 3}, headers=auth())
        items: list[dict[str, Any]] = r.json()["items"]
        return items if len(items) == 3 else None

    items = eventually(listed, timeout=30, message="three recent requests")
    stamps = [i["created_at"] for i in items]
    assert stamps == sorted(stamps, reverse=True)
    ben = httpx.get(f"{stack.gateway}/v1/summaries", headers=auth("key-ben")).json()["items"]
    assert not {i["id"] for i in ben} & {i["id"] for i in items}


async def test_a_socket_that_never_authenticates_is_closed_with_1008(stack: Stack) -> None:
    async with socket(stack, key=None) as ws:
        await ws.send(type="resume", id="01ANY", last_seq=0)
        assert (await ws.recv())["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
