"""The gateway on the real broker: produce, stream, resume, ownership, cancel, idempotency.

The workers are simulated: the tests write TokenEvents and SummaryResults themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from gateway.http.app import create_app
from gateway.http.auth import KeyStore, Principal, hash_key
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from pipeline.core import events as token_events
from pipeline.core.codec import codec
from pipeline.core.partitioning import partition_for
from pipeline.core.settings import KafkaSettings
from pipeline.core.tiers import Tier, load_tiers
from pipeline.core.topics import TopicNames
from pipeline.kafka.admin import create_topics, delete_topics
from tests.harness import BOOTSTRAP, eventually_async
from tests.harness import sse_events as harness_sse_events

KEYS = {"alice": "key-alice", "bob": "key-bob", "fred": "key-fred"}


def keystore() -> KeyStore:
    return KeyStore(
        [
            (hash_key(KEYS["alice"]), Principal("alice", "pro")),
            (hash_key(KEYS["bob"]), Principal("bob", "pro")),
            (hash_key(KEYS["fred"]), Principal("fred", "free")),
        ]
    )


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[user]}"}


def tiers(**overrides: Tier) -> dict[str, Tier]:
    table = dict(load_tiers())
    table.update(overrides)
    return table


@contextlib.asynccontextmanager
async def topics(stream_partitions: int = 4) -> AsyncIterator[KafkaSettings]:
    """Every declared topic under a fresh random prefix, deleted afterwards."""
    settings = KafkaSettings(
        bootstrap_servers=BOOTSTRAP,
        topic_prefix=f"t-{uuid.uuid4().hex[:8]}.",
        stream_partitions=stream_partitions,
        work_partitions=2,
    )
    await asyncio.to_thread(create_topics, settings)  # returns once every partition has a leader
    try:
        yield settings
    finally:
        await asyncio.to_thread(delete_topics, settings)


def gateway_settings(kafka: KafkaSettings, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "topic_prefix": kafka.topic_prefix,
        "stream_partitions": kafka.stream_partitions,
        "work_partitions": kafka.work_partitions,
        "keys_file": None,
        "dev_api_key": None,
        "result_grace_s": 0.5,
    }
    values.update(overrides)
    return GatewaySettings(**values)


@dataclass
class RunningGateway:
    url: str
    gateway: Gateway

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=20, **kwargs)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: GatewaySettings, *, tier_table: dict[str, Tier] | None = None
) -> AsyncIterator[RunningGateway]:
    """The gateway on uvicorn, in this process, on a free port."""
    app = create_app(settings, keys=keystore(), tiers=tier_table or tiers())
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())

    def started() -> bool:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped before it started")
        return bool(server.started)

    await eventually_async(started, timeout=10, interval=0.02, message="uvicorn started")
    port = server.servers[0].sockets[0].getsockname()[1]
    gateway: Gateway = app.state.gateway
    try:
        await asyncio.wait_for(gateway.index.ready.wait(), 10)
        yield RunningGateway(f"http://127.0.0.1:{port}", gateway)
    finally:
        server.should_exit = True
        await task


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The SSE body as {event, id, data} dicts (data JSON-decoded); pings are skipped."""
    async for event in harness_sse_events(response):
        yield {"event": event.event, "id": event.id, "data": event.data}


class Worker:
    """Writes TokenEvents and SummaryResults as inference and postprocess would."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.topics = TopicNames.from_settings(settings)
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")

    async def __aenter__(self) -> Worker:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def tokens(self, request_id: str, texts: list[str], *, first_seq: int = 1) -> None:
        for i, text in enumerate(texts):
            await self.token(request_id, first_seq + i, "DELTA", text)

    async def coalesced(self, request_id: str, first_seq: int, pieces: list[str]) -> None:
        """One DELTA record covering a seq per piece, as the worker writes under load."""
        event = token_events.delta(request_id, first_seq=first_seq, pieces=pieces, attempt=1)
        await self.producer.send_and_wait(
            self.topics.tokens, key=request_id.encode(), value=codec().encode("TokenEvent", event)
        )

    async def token(self, request_id: str, seq: int, kind: str, text: str = "") -> None:
        event = {
            "request_id": request_id,
            "seq": seq,
            "kind": kind,
            "text": text,
            "user_id": "alice",
            "tier": "pro",
            "model": "sim",
            "created_at": int(time.time() * 1000),
            "trace": {},
        }
        if kind == "DONE":
            event["usage"] = {"input_tokens": 10, "output_tokens": seq, "attempts": 1}
            event["stop_reason"] = "end_turn"
        await self.producer.send_and_wait(
            self.topics.tokens, key=request_id.encode(), value=codec().encode("TokenEvent", event)
        )

    async def result(
        self,
        request_id: str,
        summary: str,
        last_seq: int,
        *,
        user: str = "alice",
        tier: str = "pro",
        status: str = "COMPLETED",
        error: dict[str, Any] | None = None,
        cost_micro_usd: int = 42,
    ) -> None:
        now = int(time.time() * 1000)
        record = {
            "request_id": request_id,
            "user_id": user,
            "tier": tier,
            "model": "sim",
            "status": status,
            "summary": summary,
            "usage": {
                "input_tokens": 10,
                "output_tokens": last_seq,
                "attempts": 1,
                "cost_micro_usd": cost_micro_usd,
            },
            "error": error,
            "stop_reason": "end_turn",
            "last_seq": last_seq,
            "latency_ms": {"total": 5, "ttft": 1},
            "created_at": now,
            "completed_at": now,
            "trace": {"received": now - 5, "first_token": now - 4},
        }
        await self.producer.send_and_wait(
            self.topics.results,
            key=request_id.encode(),
            value=codec().encode("SummaryResult", record),
        )


async def read_topic(settings: KafkaSettings, topic: str, schema: str) -> list[dict[str, Any]]:
    """Every record now in ``topic`` (all partitions), decoded."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        partitions = cluster.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[dict[str, Any]] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                out.extend(codec().decode_as(m.value, schema) for m in messages)
        return out
    finally:
        await consumer.stop()


# -- the tests ----------------------------------------------------------------------------------

pytestmark = pytest.mark.integration

DOC = "Kafka keeps an ordered log. Consumers read it at their own pace. " * 20


async def post_json(client: httpx.AsyncClient, user: str = "alice", **body: Any) -> httpx.Response:
    headers = {**auth(user), "Accept": "application/json"}
    return await client.post("/v1/summaries", json={"document": DOC, **body}, headers=headers)


async def next_event(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    return await asyncio.wait_for(anext(events), 15)


async def test_post_produces_exactly_one_request_with_the_right_fields() -> None:
    async with topics() as kafka, running_gateway(gateway_settings(kafka)) as gw:
        async with gw.client() as client:
            response = await post_json(
                client,
                instructions="bullet points",
                max_output_tokens=50,
                model="claude-sonnet-4-5",
            )
            assert response.status_code == 202
            body = response.json()
            rid = body["id"]
            assert body["links"] == {
                "self": f"/v1/summaries/{rid}",
                "events": f"/v1/summaries/{rid}/events",
            }
            assert float(response.headers["X-Sumstream-Overhead-Ms"]) >= 0
            assert response.headers["Server-Timing"].startswith("gateway;dur=")
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
        records = await read_topic(kafka, gw.gateway.topics.requests, "SummarizeRequest")
    assert len(records) == 1
    record = records[0]
    assert record["request_id"] == rid
    assert record["user_id"] == "alice"
    assert record["tier"] == "pro"
    assert record["document"] == DOC
    assert record["instructions"] == "bullet points"
    assert record["max_output_tokens"] == 50
    assert record["model"] == "claude-sonnet-4-5"
    assert record["source"] == "gateway"
    assert set(record["trace"]) == {"received", "enqueued"}
    assert record["trace"]["received"] <= record["trace"]["enqueued"]
    assert partition_for(rid, kafka.stream_partitions) in gw.gateway.owned


async def test_rejected_posts_produce_nothing() -> None:
    limited = Tier("pro", 2, 100_000, 100_000, 1_024, 4, 100.0, 60.0, "truncate")
    async with topics() as kafka:
        settings = gateway_settings(kafka, max_document_bytes=2_000)
        async with (
            running_gateway(settings, tier_table=tiers(pro=limited)) as gw,
            gw.client() as client,
        ):
            if True:
                url = "/v1/summaries"
                no_key = await client.post(url, json={"document": "x"})
                bad_key = await client.post(
                    url, json={"document": "x"}, headers={"Authorization": "Bearer nope"}
                )
                malformed = await client.post(
                    url,
                    content=b"{not json",
                    headers={**auth("alice"), "Content-Type": "application/json"},
                )
                wrong_type = await client.post(url, json={"document": 12}, headers=auth("alice"))
                empty = await client.post(url, json={"document": ""}, headers=auth("alice"))
                too_big = await client.post(
                    url, json={"document": "y" * 3_000}, headers=auth("alice")
                )
                statuses = [
                    r.status_code for r in (no_key, bad_key, malformed, wrong_type, empty, too_big)
                ]
                assert statuses == [401, 401, 400, 422, 422, 413]
                for r in (no_key, bad_key, malformed, wrong_type, empty, too_big):
                    assert r.headers["content-type"] == "application/problem+json"
                    assert r.json()["status"] == r.status_code
                # The tier allows 2 requests a minute: the third is refused with Retry-After.
                assert (await post_json(client)).status_code == 202
                assert (await post_json(client)).status_code == 202
                limited_response = await post_json(client)
                assert limited_response.status_code == 429
                assert int(limited_response.headers["Retry-After"]) >= 1
                assert limited_response.json()["code"] == "rate_limited"
        records = await read_topic(kafka, settings.topic_prefix + "requests", "SummarizeRequest")
    assert len(records) == 2  # only the two accepted requests


async def test_sse_stream_gives_accepted_tokens_in_order_and_done() -> None:
    async with (
        topics() as kafka,
        running_gateway(gateway_settings(kafka)) as gw,
        Worker(kafka) as worker,
        gw.client() as client,
        client.stream(
            "POST", "/v1/summaries", json={"document": DOC}, headers=auth("alice")
        ) as response,
    ):
        assert response.status_code == 200
        assert "X-Sumstream-Overhead-Ms" in response.headers
        events = sse_events(response)
        accepted = await next_event(events)
        assert accepted["event"] == "accepted"
        rid = accepted["data"]["id"]
        assert accepted["data"]["links"]["events"] == f"/v1/summaries/{rid}/events"
        assert "queue_position" in accepted["data"]
        assert "estimated_wait_s" in accepted["data"]
        texts = ["Kafka", " keeps", " an", " ordered", " log."]
        await worker.token(rid, 1, "STARTED")
        await worker.tokens(rid, texts, first_seq=2)
        await worker.token(rid, 7, "DONE")
        await worker.result(rid, "".join(texts), 7)
        received = [event async for event in events]
    tokens = [e for e in received if e["event"] == "token"]
    assert [e["data"]["seq"] for e in tokens] == [2, 3, 4, 5, 6]
    assert [e["id"] for e in tokens] == ["2", "3", "4", "5", "6"]
    assert "".join(e["data"]["text"] for e in tokens) == "".join(texts)
    assert [e["event"] for e in received][-1] == "done"
    done = received[-1]["data"]
    assert done["status"] == "COMPLETED"
    assert done["summary"] == "".join(texts)
    assert done["usage"]["output_tokens"] == 7
    assert done["cost"]["micro_usd"] == 42
    assert done["latency_ms"] == {"total": 5, "ttft": 1}


async def test_failed_result_sends_error_then_done() -> None:
    async with (
        topics() as kafka,
        running_gateway(gateway_settings(kafka)) as gw,
        Worker(kafka) as worker,
        gw.client() as client,
    ):
        rid = (await post_json(client)).json()["id"]
        await worker.tokens(rid, ["partial", " text"])
        error = {
            "code": "deadline_exceeded",
            "message": "too slow",
            "retriable": False,
            "partial": True,
        }
        await worker.token(rid, 3, "ERROR")
        await worker.result(rid, "partial text", 3, status="PARTIAL", error=error)
        async with client.stream(
            "GET", f"/v1/summaries/{rid}/events", headers=auth("alice")
        ) as response:
            received = [event async for event in sse_events(response)]
    assert [e["event"] for e in received] == ["token", "token", "error", "done"]
    assert received[2]["data"]["code"] == "deadline_exceeded"
    assert received[2]["data"]["partial"] is True
    assert received[3]["data"]["status"] == "PARTIAL"


async def test_last_event_id_resume_has_no_duplicate_and_no_gap() -> None:
    async with (
        topics() as kafka,
        running_gateway(gateway_settings(kafka)) as gw,
        Worker(kafka) as worker,
        gw.client() as client,
    ):
        rid = (await post_json(client)).json()["id"]
        url = f"/v1/summaries/{rid}/events"
        await worker.tokens(rid, [f"t{i} " for i in range(1, 6)])
        # First connection: read three tokens, then drop the connection.
        async with client.stream("GET", url, headers=auth("alice")) as response:
            events = sse_events(response)
            first = [await next_event(events) for _ in range(3)]
            await events.aclose()
        assert [e["id"] for e in first] == ["1", "2", "3"]
        # Reconnect (from memory, this instance owns the stream) while generation goes on.
        async with client.stream(
            "GET", url, headers={**auth("alice"), "Last-Event-ID": first[-1]["id"]}
        ) as response:
            events = sse_events(response)
            second = [await next_event(events) for _ in range(2)]
            await worker.tokens(rid, [f"t{i} " for i in range(6, 9)], first_seq=6)
            await worker.token(rid, 9, "DONE")
            await worker.result(rid, "".join(f"t{i} " for i in range(1, 9)), 9)
            second += [event async for event in events]
        seqs = [int(e["id"]) for e in first + second if e["event"] == "token"]
        assert seqs == list(range(1, 9))
        assert second[-1]["event"] == "done"
        # After the end, from the log (query parameter form): a replay from seq 5, then done.
        gw.gateway.hub.forget(rid)
        async with client.stream(
            "GET", f"{url}?last_event_id=5", headers=auth("alice")
        ) as response:
            replay = [event async for event in sse_events(response)]
        assert [e.get("id") for e in replay if e["event"] == "token"] == ["6", "7", "8"]
        assert replay[-1]["event"] == "done"
        assert replay[-1]["data"]["summary"] == "".join(f"t{i} " for i in range(1, 9))


async def test_last_event_id_inside_a_coalesced_record_resumes_exactly_after_it() -> None:
    pieces = [f"t{i} " for i in range(1, 9)]
    async with (
        topics() as kafka,
        running_gateway(gateway_settings(kafka)) as gw,
        Worker(kafka) as worker,
        gw.client() as client,
    ):
        rid = (await post_json(client)).json()["id"]
        url = f"/v1/summaries/{rid}/events"
        await worker.coalesced(rid, 1, pieces[:3])  # seqs 1-3 in one record
        await worker.coalesced(rid, 4, pieces[3:8])  # seqs 4-8 in one record
        await worker.token(rid, 9, "DONE")
        await worker.result(rid, "".join(pieces), 9)
        async with client.stream("GET", url, headers=auth("alice")) as response:
            whole = [event async for event in sse_events(response)]
        tokens = [e for e in whole if e["event"] == "token"]
        assert [(e["data"]["first_seq"], e["id"]) for e in tokens] == [(1, "3"), (4, "8")]
        assert "".join(e["data"]["text"] for e in tokens) == "".join(pieces)
        # Resume after seq 5, inside the second record: from memory, then from the log.
        for forget in (False, True):
            if forget:
                gw.gateway.hub.forget(rid)
            headers = {**auth("alice"), "Last-Event-ID": "5"}
            async with client.stream("GET", url, headers=headers) as response:
                rest = [event async for event in sse_events(response)]
            tokens = [e for e in rest if e["event"] == "token"]
            assert [(e["data"]["first_seq"], e["id"]) for e in tokens] == [(6, "8")]
            assert tokens[0]["data"]["text"] == "t6 t7 t8 "
            assert rest[-1]["event"] == "done"


async def test_second_instance_serves_a_stream_it_does_not_own() -> None:
    async with topics(stream_partitions=4) as kafka, Worker(kafka) as worker:
        first = gateway_settings(kafka, instance_index=0, instance_count=2)
        second = gateway_settings(kafka, instance_index=1, instance_count=2)
        async with running_gateway(first) as gw0, running_gateway(second) as gw1:
            assert gw0.gateway.owned == {0, 2}
            assert gw1.gateway.owned == {1, 3}
            async with gw0.client() as c0, gw1.client() as c1:
                rid = (await post_json(c0)).json()["id"]
                assert partition_for(rid, 4) % 2 == 0
                await worker.tokens(rid, ["one", " two"])
                async with c1.stream(
                    "GET", f"/v1/summaries/{rid}/events", headers=auth("alice")
                ) as response:
                    assert response.status_code == 200
                    events = sse_events(response)
                    got = [await next_event(events) for _ in range(2)]
                    await worker.tokens(rid, [" three"], first_seq=3)
                    await worker.token(rid, 4, "DONE")
                    await worker.result(rid, "one two three", 4)
                    got += [event async for event in events]
                # A resume at the instance that does not own the stream reads the log too.
                async with c1.stream(
                    "GET",
                    f"/v1/summaries/{rid}/events",
                    headers={**auth("alice"), "Last-Event-ID": "2"},
                ) as response:
                    resumed = [event async for event in sse_events(response)]
                assert [e["event"] for e in resumed] == ["token", "done"]
                assert resumed[0]["id"] == "3"
                # The result is visible from both instances.
                for client in (c0, c1):
                    result = await client.get(f"/v1/summaries/{rid}", headers=auth("alice"))
                    assert result.status_code == 200
                    assert result.json()["summary"] == "one two three"
    assert [e["data"]["text"] for e in got if e["event"] == "token"] == ["one", " two", " three"]
    assert got[-1]["event"] == "done"
    assert got[-1]["data"]["status"] == "COMPLETED"


async def test_delete_produces_a_cancel_and_other_users_get_404() -> None:
    async with topics() as kafka, running_gateway(gateway_settings(kafka)) as gw:
        async with gw.client() as client:
            rid = (await post_json(client)).json()["id"]
            running = await client.get(f"/v1/summaries/{rid}", headers=auth("alice"))
            assert running.status_code == 202
            assert running.json()["status"] == "running"
            for method, path in (
                ("GET", f"/v1/summaries/{rid}"),
                ("GET", f"/v1/summaries/{rid}/events"),
                ("DELETE", f"/v1/summaries/{rid}"),
            ):
                other = await client.request(method, path, headers=auth("bob"))
                assert other.status_code == 404, (method, path)
                assert other.json()["code"] == "not_found"
            # Unknown ids look exactly the same.
            unknown = await client.get(
                "/v1/summaries/01J00000000000000000000000", headers=auth("bob")
            )
            assert unknown.status_code == 404
            assert unknown.json()["detail"].startswith("no summary")
            deleted = await client.delete(f"/v1/summaries/{rid}", headers=auth("alice"))
            assert deleted.status_code == 202
        controls = await read_topic(kafka, gw.gateway.topics.control, "ControlEvent")
    assert len(controls) == 1
    assert controls[0]["request_id"] == rid
    assert controls[0]["action"] == "CANCEL"
    assert controls[0]["user_id"] == "alice"
    assert controls[0]["reason"] == "client"


async def test_owner_is_found_in_the_log_by_a_fresh_instance() -> None:
    async with topics() as kafka:
        settings = gateway_settings(kafka)
        async with running_gateway(settings) as gw, gw.client() as client:
            rid = (await post_json(client)).json()["id"]
        async with running_gateway(settings) as gw, gw.client() as client:
            gw.gateway.index.owners.clear()  # force the read from `requests`
            mine = await client.get(f"/v1/summaries/{rid}", headers=auth("alice"))
            theirs = await client.get(f"/v1/summaries/{rid}", headers=auth("bob"))
    assert mine.status_code == 202
    assert theirs.status_code == 404


async def test_disconnect_without_reconnect_cancels_after_the_grace_period() -> None:
    async with topics() as kafka:
        settings = gateway_settings(kafka, cancel_grace_s=0.3)
        async with running_gateway(settings) as gw, gw.client() as client:
            async with client.stream(
                "POST", "/v1/summaries", json={"document": DOC}, headers=auth("alice")
            ) as response:
                accepted = await next_event(sse_events(response))
            rid = accepted["data"]["id"]

            async def cancelled() -> list[dict[str, Any]]:
                controls = await read_topic(kafka, gw.gateway.topics.control, "ControlEvent")
                assert controls, "no control event yet"
                return controls

            controls = await eventually_async(cancelled, timeout=10, message="the cancel")
    assert [(c["request_id"], c["reason"]) for c in controls] == [(rid, "disconnect")]


async def test_idempotency_key_returns_the_same_request_even_after_a_restart() -> None:
    async with topics() as kafka:
        settings = gateway_settings(kafka)
        headers = {**auth("alice"), "Accept": "application/json", "Idempotency-Key": "k-1"}
        body = {"document": DOC}
        async with running_gateway(settings) as gw, gw.client() as client:
            first = await client.post("/v1/summaries", json=body, headers=headers)
            again = await client.post("/v1/summaries", json=body, headers=headers)
            other_user = await client.post(
                "/v1/summaries", json=body, headers={**headers, **auth("bob")}
            )
        async with running_gateway(settings) as gw, gw.client() as client:
            after_restart = await client.post("/v1/summaries", json=body, headers=headers)
        records = await read_topic(kafka, settings.topic_prefix + "requests", "SummarizeRequest")
    assert first.json()["id"] == again.json()["id"] == after_restart.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other_user.json()["id"] != first.json()["id"]
    assert sorted(r["user_id"] for r in records) == ["alice", "bob"]
