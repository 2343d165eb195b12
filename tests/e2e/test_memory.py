"""Context and memory on real processes (docs/architecture.md, "Context and memory")."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pipeline.ops.history import request_history
from pipeline.ops.timeline import history_lines
from tests.e2e.documents import document
from tests.harness import Stack, auth, collect, running_stack

pytestmark = pytest.mark.e2e

PREFS = "/v1/me/preferences"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"SUMSTREAM_SIM_RECORD_PROMPTS": "true"}
    with running_stack(tmp_path_factory.mktemp("memory"), env=env) as s:
        try:
            yield s
        finally:
            s.remove_topics()


def prompts_of(stack: Stack, request_id: str) -> list[str]:
    record: dict[str, Any] = stack.sim_stats()["requests"].get(request_id, {})
    return list(record.get("prompts", []))


async def summarize(client: httpx.AsyncClient, stack: Stack, key: str, seed: int) -> Any:
    result = await collect(
        client,
        "POST",
        f"{stack.gateway}/v1/summaries",
        json={"document": document(seed), "max_output_tokens": 30},
        headers=auth(key),
    )
    assert result.done["status"] == "COMPLETED", result.events
    return result


async def test_bad_preferences_are_422_problems_and_change_nothing(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        url = f"{stack.gateway}{PREFS}"
        empty = (await client.get(url, headers=auth("key-fay"))).json()
        assert empty["version"] == 0 and empty["guidance"] is None
        good = await client.put(url, json={"style": "prose"}, headers=auth("key-fay"))
        assert good.status_code == 200, good.text
        before = (await client.get(url, headers=auth("key-fay"))).json()
        for bad in (
            {"guidance": "x" * 501},
            {"style": "haiku"},
            {"length": 3},
            {"language": ["fr"]},
            {"user_id": "ann"},
        ):
            answer = await client.put(url, json=bad, headers=auth("key-fay"))
            assert answer.status_code == 422, (bad, answer.text)
            assert answer.headers["content-type"].startswith("application/problem+json")
        assert (await client.get(url, headers=auth("key-fay"))).json() == before
        assert (await client.get(url)).status_code == 401


async def test_preferences_reach_the_owners_prompts_only_and_history_shows_the_version(
    stack: Stack,
) -> None:
    marker = f"ANN-MARKER-{uuid.uuid4().hex}"
    async with httpx.AsyncClient(timeout=60) as client:
        put = await client.put(
            f"{stack.gateway}{PREFS}",
            json={"length": "short", "style": "bullets", "guidance": f"Mention {marker}."},
            headers=auth("key-ann"),
        )
        assert put.status_code == 200, put.text
        version = put.json()["version"]
        got = (await client.get(f"{stack.gateway}{PREFS}", headers=auth("key-ann"))).json()
        assert got == put.json() and got["guidance"] == f"Mention {marker}."
        # The very next request uses them: preprocess waits for the version the gateway knows.
        ann = await summarize(client, stack, "key-ann", 1)
        ben = await summarize(client, stack, "key-ben", 2)
    ann_prompts = prompts_of(stack, ann.request_id)
    assert ann_prompts and all(marker in p and "bulleted list" in p for p in ann_prompts)
    ben_prompts = prompts_of(stack, ben.request_id)
    assert ben_prompts and not any(marker in p for p in ben_prompts)
    records = await request_history(stack.settings, ann.request_id)
    lines = "\n".join(history_lines(records, stack.settings))
    assert f"preferences=v{version}" in lines
