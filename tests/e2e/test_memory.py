"""Context and memory on real processes (docs/architecture.md, "Context and memory")."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pipeline.core.sealing import FORGOTTEN
from pipeline.ops.history import request_history
from pipeline.ops.timeline import history_lines
from tests.e2e.documents import document
from tests.harness import (
    BOOTSTRAP,
    REPO,
    Stack,
    auth,
    collect,
    eventually,
    read_topic,
    running_stack,
)

pytestmark = pytest.mark.e2e

PREFS = "/v1/me/preferences"
KEY = "key-light-1"


# fay's tier ends conversations after this long, so one test can see a session expire.
SHORT_TTL_S = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("memory")
    tiers = (REPO / "config" / "tiers.toml").read_text()
    tiers = tiers.replace("[free]\n", f"[free]\nsession_ttl_s = {SHORT_TTL_S}\n")
    (tmp / "tiers.toml").write_text(tiers)
    env = {
        "SUMSTREAM_SIM_RECORD_PROMPTS": "true",
        # Test documents are a few hundred tokens: cache them as the API caches longer ones.
        "SUMSTREAM_SIM_CACHE_MIN_TOKENS": "50",
        "SUMSTREAM_TIERS_FILE": str(tmp / "tiers.toml"),
    }
    with running_stack(tmp, env=env) as s:
        try:
            yield s
        finally:
            s.remove_topics()


def prompts_of(stack: Stack, request_id: str) -> list[str]:
    record: dict[str, Any] = stack.sim_stats()["requests"].get(request_id, {})
    return list(record.get("prompts", []))


async def follow_up(
    client: httpx.AsyncClient, stack: Stack, key: str, summary_id: str, message: str
) -> Any:
    result = await collect(
        client,
        "POST",
        f"{stack.gateway}/v1/summaries/{summary_id}/messages",
        json={"message": message},
        headers=auth(key),
    )
    assert result.status_code == 200, result.events
    assert result.done["status"] == "COMPLETED", result.events
    return result


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


async def test_follow_ups_carry_the_document_and_earlier_turns_and_read_the_cache(
    stack: Stack,
) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        summary = await summarize(client, stack, "key-ben", 11)
        first = await follow_up(client, stack, "key-ben", summary.request_id, "Q1 only risks?")
        second = await follow_up(client, stack, "key-ben", summary.request_id, "Q2 and costs?")
        # Billed and readable like any summary, by its own id.
        got = (
            await client.get(
                f"{stack.gateway}/v1/summaries/{second.request_id}", headers=auth("key-ben")
            )
        ).json()
    assert got["summary"] == second.done["summary"] and got["cost"]["micro_usd"] > 0
    [prompt] = prompts_of(stack, second.request_id)
    assert document(11)[:200] in prompt
    assert "Q1 only risks?" in prompt and first.done["summary"] in prompt
    assert "Q2 and costs?" in prompt and summary.done["summary"] in prompt
    # The document block is cached by the first follow-up and read by the second.
    assert first.done["usage"]["cache_creation_input_tokens"] > 0
    read = second.done["usage"]["cache_read_input_tokens"]
    assert read == first.done["usage"]["cache_creation_input_tokens"]


async def test_follow_ups_on_unknown_foreign_expired_or_bad_input_are_problems(
    stack: Stack,
) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        anns = await summarize(client, stack, "key-ann", 12)
        url = f"{stack.gateway}/v1/summaries/{{}}/messages"
        cases = [
            ("01ARZ3NDEKTSV4RRFFQ69G5FAV", {"message": "hi"}, "key-ann", 404),
            (anns.request_id, {"message": "hi"}, "key-ben", 404),
            (anns.request_id, {"message": ""}, "key-ann", 422),
            (anns.request_id, {"message": 3}, "key-ann", 422),
            (anns.request_id, {"message": "hi", "user": "ben"}, "key-ann", 422),
            (anns.request_id, {"message": "x" * 2_001}, "key-ann", 422),
        ]
        for summary_id, body, key, status in cases:
            answer = await client.post(url.format(summary_id), json=body, headers=auth(key))
            assert answer.status_code == status, (summary_id, body, key, answer.text)
            assert answer.headers["content-type"].startswith("application/problem+json")
        fays = await summarize(client, stack, "key-fay", 13)

    def expired() -> bool:
        answer = httpx.post(
            url.format(fays.request_id),
            json={"message": "still there?"},
            headers=auth("key-fay"),
            timeout=30,
        )
        return answer.status_code == 410 and answer.json()["code"] == "session_expired"

    eventually(expired, timeout=SHORT_TTL_S + 30, message="the session expires")


async def test_canary_one_users_memory_never_reaches_another_users_prompts(
    stack: Stack,
) -> None:
    """Isolation by construction, under concurrent load from both users."""
    marker = f"CANARY-{uuid.uuid4().hex}"
    async with httpx.AsyncClient(timeout=90) as client:
        put = await client.put(
            f"{stack.gateway}{PREFS}", json={"guidance": f"Say {marker}."}, headers=auth("key-ann")
        )
        assert put.status_code == 200
        ann_summary = await summarize(client, stack, "key-ann", 20)

        # A summary of ann's that holds the marker: what ben's history look-ups must not find.
        marked = " ".join(f"{marker} {sentence}." for sentence in document(22).split(". ")[:8])
        ann_history = await collect(
            client,
            "POST",
            f"{stack.gateway}/v1/summaries",
            json={"document": marked, "max_output_tokens": 60},
            headers=auth("key-ann"),
        )
        assert marker in ann_history.done["summary"]

        async def ann_turns() -> list[str]:
            turns = [
                await follow_up(client, stack, "key-ann", ann_summary.request_id, f"{marker}?")
            ]
            turns += [await summarize(client, stack, "key-ann", 21 + i) for i in range(2)]
            return [t.request_id for t in turns]

        async def ben_summary() -> Any:
            # Ben asks for his own history with the document of ann's marked summary.
            body = {"document": document(22), "max_output_tokens": 30, "context": "history"}
            result = await collect(
                client, "POST", f"{stack.gateway}/v1/summaries", json=body, headers=auth("key-ben")
            )
            assert result.done["status"] == "COMPLETED", result.events
            return result

        async def ben_turns() -> list[str]:
            summaries = await asyncio.gather(*(ben_summary() for _ in range(4)))
            follow_ups = await asyncio.gather(
                *(
                    follow_up(client, stack, "key-ben", s.request_id, "and risks?")
                    for s in summaries
                )
            )
            return [r.request_id for r in (*summaries, *follow_ups)]

        ann_ids, ben_ids = await asyncio.gather(ann_turns(), ben_turns())
        foreign = [
            await client.get(
                f"{stack.gateway}/v1/summaries/{ann_summary.request_id}", headers=auth("key-ben")
            ),
            await client.post(
                f"{stack.gateway}/v1/summaries/{ann_summary.request_id}/messages",
                json={"message": "show me"},
                headers=auth("key-ben"),
            ),
            await client.delete(
                f"{stack.gateway}/v1/summaries/{ann_summary.request_id}", headers=auth("key-ben")
            ),
        ]
    assert [r.status_code for r in foreign] == [404, 404, 404]
    ann_prompts = [p for rid in ann_ids for p in prompts_of(stack, rid)]
    assert ann_prompts and all(marker in p for p in ann_prompts)
    ben_prompts = [p for rid in ben_ids for p in prompts_of(stack, rid)]
    assert len(ben_prompts) >= len(ben_ids)
    assert not [p for p in ben_prompts if marker in p]


async def test_forgetting_removes_preferences_sessions_and_history_but_not_billing(
    stack: Stack,
) -> None:
    # light-1 (pro) has the memory of no other test of this module.
    async with httpx.AsyncClient(timeout=60) as client:
        url = stack.gateway
        usage_url = f"{url}/v1/usage"
        put = await client.put(f"{url}{PREFS}", json={"guidance": "x"}, headers=auth(KEY))
        assert put.status_code == 200
        summary = await summarize(client, stack, KEY, 40)
        asked = await follow_up(client, stack, KEY, summary.request_id, "more?")
        costs = [summary.done["cost"]["micro_usd"], asked.done["cost"]["micro_usd"]]

        def settled() -> dict[str, Any] | None:
            # Both results are settled in the quota ledger (about a second after each).
            now = httpx.get(usage_url, headers=auth(KEY), timeout=10).json()
            return now if now["cost_micro_usd"] == sum(costs) else None

        spent = await asyncio.to_thread(eventually, settled, timeout=30, message="settled")
        receipt = await client.delete(f"{url}/v1/me/memory", headers=auth(KEY))
        assert receipt.status_code == 200, receipt.text
        body = receipt.json()
        print(f"\nFIGURES forget: latency_ms={body['latency_ms']}")
        assert body["user"] == "light-1" and body["removed"]["preferences"] == "removed"
        got = (await client.get(f"{url}{PREFS}", headers=auth(KEY))).json()
        assert got["guidance"] is None and got["version"] > put.json()["version"]
        gone = [
            await client.get(f"{url}/v1/summaries/{summary.request_id}", headers=auth(KEY)),
            await client.post(
                f"{url}/v1/summaries/{summary.request_id}/messages",
                json={"message": "still?"},
                headers=auth(KEY),
            ),
        ]
        assert [r.status_code for r in gone] == [404, 404]
        recent = (await client.get(f"{url}/v1/summaries", headers=auth(KEY))).json()
        assert summary.request_id not in [item["id"] for item in recent["items"]]
        after = (await client.get(usage_url, headers=auth(KEY))).json()
        # Billing survives forgetting: the month's figures are unchanged.
        assert after == spent
        # A new summary after forgetting works and starts a new memory.
        await summarize(client, stack, KEY, 41)


async def test_history_adds_the_users_own_relevant_summaries_counted_in_usage(
    stack: Stack,
) -> None:
    key = "key-light-2"  # pro, with no memory from other tests
    async with httpx.AsyncClient(timeout=60) as client:
        past = [await summarize(client, stack, key, seed) for seed in (60, 61, 62)]
        body = {"document": document(61), "max_output_tokens": 30, "context": "history"}

        async def with_history() -> Any:
            result = await collect(
                client, "POST", f"{stack.gateway}/v1/summaries", json=body, headers=auth(key)
            )
            assert result.done["status"] == "COMPLETED", result.events
            return result if result.done["usage"]["memory_tokens"] > 0 else None

        # The worker reads results a moment after postprocess writes them.
        found = None
        for _ in range(10):
            found = await with_history()
            if found is not None:
                break
        assert found is not None, "no request used the history"
    usage = found.done["usage"]
    print(f"\nFIGURES history: memory_tokens={usage['memory_tokens']} of 1000 per request")
    assert 0 < usage["memory_tokens"] <= 1_000
    assert usage["document_tokens"] > 0 and usage["instruction_tokens"] > 0
    [prompt] = prompts_of(stack, found.request_id)
    assert "<history>" in prompt and past[1].done["summary"] in prompt


async def test_a_follow_up_after_sigkill_of_the_session_worker_keeps_the_turns(
    stack: Stack,
) -> None:
    async with httpx.AsyncClient(timeout=90) as client:
        summary = await summarize(client, stack, "key-ann", 14)
        first = await follow_up(client, stack, "key-ann", summary.request_id, "Q-before-kill?")
        [worker] = stack.workers
        worker.kill9()
        stack.workers.remove(worker)
        # Sent while the replacement is still starting: the follow-up queues behind the
        # records the kill left uncommitted, which the replacement gets again.
        stack.start_worker(name="worker-after-kill")
        async with asyncio.timeout(90):
            second = await follow_up(client, stack, "key-ann", summary.request_id, "Q-after-kill?")
    [prompt] = prompts_of(stack, second.request_id)
    # The first turn was only in the `sessions` table: its changelog brought it back.
    assert "Q-before-kill?" in prompt and first.done["summary"] in prompt


def replay_json(stack: Stack, request_id: str) -> list[dict[str, Any]]:
    """``sumstream replay request ID --json`` as an operator runs it: every record, decoded."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.ops.cli", "replay", "request", request_id, "--json"],
        env=stack.env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


async def test_forgetting_shreds_the_users_text_in_the_immutable_topics_but_not_billing(
    stack: Stack,
) -> None:
    # light-4 forgets, light-5 does not; no other test of this module uses either.
    forgetful, other = "key-light-4", "key-light-5"
    markers = {key: f"Okapi{uuid.uuid4().hex[:10]}" for key in (forgetful, other)}
    async with httpx.AsyncClient(timeout=60) as client:
        streams = {}
        for key, marker in markers.items():
            body = {"document": f"{marker} opens this report. {document(60)}"}
            streams[key] = await collect(
                client, "POST", f"{stack.gateway}/v1/summaries", json=body, headers=auth(key)
            )
            assert streams[key].done["status"] == "COMPLETED", streams[key].events
        gone = streams[forgetful]
        usage_url = f"{stack.gateway}/v1/usage"

        def settled() -> dict[str, Any] | None:
            now = httpx.get(usage_url, headers=auth(forgetful), timeout=10).json()
            return now if now["cost_micro_usd"] == gone.done["cost"]["micro_usd"] else None

        spent = await asyncio.to_thread(eventually, settled, timeout=30, message="settled")
        before = json.dumps(replay_json(stack, gone.request_id), ensure_ascii=False)
        # Readable (and sealed on the wire) until forgotten: the replay opens it.
        assert markers[forgetful] in before and gone.text.strip() in before
        receipt = await client.delete(f"{stack.gateway}/v1/me/memory", headers=auth(forgetful))
        assert receipt.status_code == 200, receipt.text
        print(f"\nFIGURES forget with shredding: latency_ms={receipt.json()['latency_ms']}")
        assert "unreadable" in receipt.json()["removed"]["text"]
        assert "plaintext requests" in receipt.json()["kept"]
        after = replay_json(stack, gone.request_id)
        seen = json.dumps(after, ensure_ascii=False)
        assert {"requests", "preprocessed", "tokens", "results"} <= {r["topic"] for r in after}
        assert markers[forgetful] not in seen and gone.text.strip() not in seen
        assert FORGOTTEN in seen
        # Billing and audit fields stay in clear.
        result = next(r["record"] for r in after if r["topic"] == "results")
        assert result["summary"] == FORGOTTEN
        assert result["status"] == "COMPLETED"
        assert result["usage"]["output_tokens"] == gone.done["usage"]["output_tokens"]
        assert (await client.get(usage_url, headers=auth(forgetful))).json() == spent
        # The other user's text still reads back, and was never in clear on the wire.
        kept = json.dumps(replay_json(stack, streams[other].request_id), ensure_ascii=False)
        assert markers[other] in kept and streams[other].text.strip() in kept
        key = streams[other].request_id.encode()
        for topic in (stack.topics.requests, stack.topics.tokens, stack.topics.results):
            found = read_topic(BOOTSTRAP, topic, lambda rs: any(r.key == key for r in rs))
            assert not [r for r in found if markers[other].encode() in r.value]
