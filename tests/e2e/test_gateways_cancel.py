"""What two gateways must agree on: the disconnect cancel (a client that comes back at another
gateway within the grace keeps its request; the gateway it came back to owns the cancel from then
on) and an Idempotency-Key POSTed at both at once (one request).

docs/architecture.md, "Cancel on disconnect across gateways" and "Idempotency across gateways".
Two gateways on real processes, a short grace (SUMSTREAM_CANCEL_GRACE_S) and a stream that lasts
several graces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.documents import document
from tests.harness import Stack, StreamResult, auth, collect, running_stack, summary_result

GRACE_S = 1.5
# 60 tokens 80 ms apart: ~5 s of text, more than three graces.
OUTPUT_TOKENS = 60
KEY = "key-ben"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"SUMSTREAM_CANCEL_GRACE_S": str(GRACE_S)}
    with running_stack(
        tmp_path_factory.mktemp("gateways-cancel"),
        gateways=2,
        env=env,
        ttft_ms=100,
        token_delay_ms=80,
    ) as s:
        yield s


async def _result(client: httpx.AsyncClient, url: str, request_id: str) -> dict[str, Any]:
    return await summary_result(client, url, auth(KEY), request_id)


async def _start_and_leave(client: httpx.AsyncClient, url: str, n: int) -> tuple[str, int]:
    """POST at ``url``, read three tokens, disconnect; returns the id and the last seq read."""
    first = await collect(
        client,
        "POST",
        f"{url}/v1/summaries",
        json={"document": document(n), "max_output_tokens": OUTPUT_TOKENS},
        headers=auth(KEY),
        stop_after_tokens=3,
    )
    assert first.status_code == 200, first.events
    request_id = str(first.of("accepted")[0].data["id"])
    return request_id, int(first.of("token")[-1].id or 0)


async def _resume(
    client: httpx.AsyncClient, url: str, request_id: str, after: int, **kw: Any
) -> StreamResult:
    return await collect(
        client,
        "GET",
        f"{url}/v1/summaries/{request_id}/events",
        headers={**auth(KEY), "Last-Event-ID": str(after)},
        **kw,
    )


def test_a_client_back_at_another_gateway_within_the_grace_keeps_its_request(
    stack: Stack,
) -> None:
    first_gw, second_gw = stack.gateways

    async def run() -> tuple[StreamResult, dict[str, Any], int]:
        async with httpx.AsyncClient(timeout=120) as client:
            request_id, last = await _start_and_leave(client, first_gw, 7100)
            # Back at once, at the other gateway, and there to the end: several graces long.
            resumed = await _resume(client, second_gw, request_id, last)
            return resumed, await _result(client, first_gw, request_id), last

    resumed, result, last = asyncio.run(run())
    assert resumed.done is not None, resumed.events
    assert resumed.done["status"] == "COMPLETED", resumed.done
    assert result["status"] == "COMPLETED", result
    seqs = [int(e.id or 0) for e in resumed.of("token")]
    assert seqs == list(range(last + 1, last + 1 + len(seqs))), seqs


def test_the_gateway_a_client_came_back_to_cancels_when_it_leaves_for_good(stack: Stack) -> None:
    first_gw, second_gw = stack.gateways

    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=120) as client:
            request_id, last = await _start_and_leave(client, first_gw, 7200)
            again = await _resume(client, second_gw, request_id, last, stop_after_tokens=2)
            assert len(again.of("token")) == 2, again.events
            # Gone for good: the second gateway's grace runs out and it cancels.
            return await _result(client, first_gw, request_id)

    result = asyncio.run(run())
    assert result["status"] == "CANCELLED", result
    assert result["usage"]["output_tokens"] < OUTPUT_TOKENS, result["usage"]


def test_one_idempotency_key_posted_at_both_gateways_at_once_is_one_request(
    stack: Stack,
) -> None:
    """docs/architecture.md, "Idempotency across gateways": the RESERVE on the user's `quota`
    partition carries the key, so the second POST in log order is a replay of the first.

    Pairs go one after another on warm connections, so both POSTs of a pair reach their
    gateways together (concurrent pairs queue behind each other and hide the race): without
    the key in the RESERVE, 13 of 20 such pairs made two requests.
    """
    first_gw, second_gw = stack.gateways
    pairs = 12

    async def post(client: httpx.AsyncClient, url: str, n: int, key: str) -> httpx.Response:
        return await client.post(
            f"{url}/v1/summaries",
            json={"document": document(n), "max_output_tokens": 8},
            headers={**auth("key-ann"), "Accept": "application/json", "Idempotency-Key": key},
        )

    async def run() -> list[tuple[httpx.Response, httpx.Response]]:
        async with httpx.AsyncClient(timeout=60) as client:
            for url in (first_gw, second_gw):
                (await client.get(f"{url}/healthz")).raise_for_status()
            answers = []
            for n in range(pairs + 1):
                # The last pair sends another document under the same key.
                other = 7200 + n + (n == pairs)
                a, b = await asyncio.gather(
                    post(client, first_gw, 7200 + n, f"twice-{n}"),
                    post(client, second_gw, other, f"twice-{n}"),
                )
                answers.append((a, b))
            for a, b in answers:
                for created in (r for r in (a, b) if r.status_code == 202):
                    result = await summary_result(
                        client, second_gw, auth("key-ann"), created.json()["id"]
                    )
                    assert result["status"] == "COMPLETED", result
            return answers

    *same_body, other_body = asyncio.run(run())
    for a, b in same_body:
        assert a.status_code == b.status_code == 202, (a.text, b.text)
        assert a.json()["id"] == b.json()["id"], (a.json(), b.json())
        replayed = sorted(r.headers.get("Idempotent-Replayed", "false") for r in (a, b))
        assert replayed == ["false", "true"], replayed
    # The last key went with two different bodies: the POST that came second is refused.
    statuses = sorted(r.status_code for r in other_body)
    assert statuses == [202, 422], [r.text for r in other_body]
    assert any("idempotency_key_reused" in r.text for r in other_body)
