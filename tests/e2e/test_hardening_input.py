"""Input hardening on real processes (issue 17, item 8): what a hostile or careless client sends
is refused with a clear problem, ids are not guessable, a slow SSE client is a normal close and
the worker's /metrics stays on loopback. Each test failed before its fix: documents of only NUL
or zero-width characters were accepted, ids of one millisecond were consecutive, undecodable
bodies answered ``internal_error``, a reused Idempotency-Key returned the first request, the
tier's output cap was applied silently, slow clients left tracebacks and /metrics bound 0.0.0.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ulid import ULID

from pipeline.core.partitioning import partition_for
from pipeline.core.settings import KafkaSettings
from pipeline.kafka.admin import create_topics
from tests.e2e.documents import OBJECTS, SUBJECTS, VERBS
from tests.harness import BOOTSTRAP, Stack, auth, collect, eventually, write_tiers

pytestmark = pytest.mark.e2e

# ann and ben (enterprise) get a small output cap, fay (free) a long one for the slow client.
ENTERPRISE_CAP = 64
FREE_CAP = 12_000
PARTITIONS = KafkaSettings().stream_partitions
JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("hardening-input")
    # Limits far above what the tests send: only the output caps matter here.
    tiers = write_tiers(
        tmp / "tiers.toml",
        {
            "enterprise": (100_000, 10**9, 200_000, ENTERPRISE_CAP, 8, 10**6, 10**6),
            "free": (100_000, 10**9, 200_000, FREE_CAP, 1, 10**6, 10**6),
        },
    )
    env = {
        "SUMSTREAM_TIERS_FILE": str(tiers),
        # A client that stops reading is let go after 1 s; the per-client queue is large enough
        # that the send timeout, not the queue bound, ends its stream.
        "SUMSTREAM_SEND_TIMEOUT_S": "1",
        "SUMSTREAM_SOCKET_SEND_BUFFER_BYTES": "4096",
        "SUMSTREAM_CLIENT_QUEUE_EVENTS": "100000",
    }
    stack = Stack(tmp, extra_env=env)
    create_topics(KafkaSettings(bootstrap_servers=BOOTSTRAP, topic_prefix=stack.prefix))
    try:
        stack.start_simulator(ttft_ms=1, token_delay_ms=1)
        stack.start_worker()
        # Instance 1 of 2: it owns the odd partitions only, so minted ids have a choice to fail.
        stack.start_gateway(1, 2)
        yield stack
    finally:
        stack.stop()


def post(url: str, key: str, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/summaries", json=body, headers={**auth(key), **JSON, **headers}, timeout=60
    )


def usage_requests(url: str, key: str) -> int:
    response = httpx.get(f"{url}/v1/usage", headers=auth(key), timeout=10)
    response.raise_for_status()
    return int(response.json()["requests"])


def counter(url: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{name}{{{wanted}}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def long_document(seed: int, sentences: int = 24, words: int = 2000) -> str:
    """Few, very long sentences: the simulator's summary of it runs to ~10,000 tokens (68 kB of
    text, sent twice: as tokens and in ``done``), far more than the socket buffers and the
    transport's 64 kB write buffer hold, so a client that stops reading blocks a send whatever
    the token batching."""
    rng = random.Random(seed)
    vocabulary = [w.lower() for phrase in SUBJECTS + VERBS + OBJECTS for w in phrase.split()]
    return " ".join(
        f"Item {seed}-{i} " + " ".join(rng.choice(vocabulary) for _ in range(words)) + "."
        for i in range(sentences)
    )


def test_documents_of_only_nul_control_or_zero_width_characters_are_422_before_admission(
    stack: Stack,
) -> None:
    url = stack.gateway
    before = usage_requests(url, "key-fay")
    for document in (
        "\x00" * 200,
        "\u200b\u200c\u200d\u2060\ufeff" * 40,
        "\x01\x7f\x85\t\r\n" * 30,
    ):
        response = post(url, "key-fay", {"document": document})
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "empty_document"
    # One real request: once the ledger shows it, it shows that the refused ones reserved nothing.
    assert post(url, "key-fay", {"document": "A real sentence."}).status_code == 202
    eventually(
        lambda: usage_requests(url, "key-fay") >= before + 1, message="the valid request counted"
    )
    assert usage_requests(url, "key-fay") == before + 1


def test_ids_minted_in_one_millisecond_are_not_consecutive_and_hash_into_owned_partitions(
    stack: Stack,
) -> None:
    url = stack.gateway

    async def burst(round_: int) -> list[str]:
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"{url}/v1/summaries",
                        json={"document": f"Burst {round_}-{i}.", "max_output_tokens": 1},
                        headers={**auth(key), **JSON},
                    )
                    for i, key in enumerate(["key-ann", "key-ben"] * 20)
                )
            )
        assert {r.status_code for r in responses} == {202}, [r.text for r in responses]
        return [r.json()["id"] for r in responses]

    by_ms: dict[int, list[int]] = defaultdict(list)
    pairs = 0
    for round_ in range(20):  # until enough ids share a millisecond to judge them
        for request_id in asyncio.run(burst(round_)):
            assert partition_for(request_id, PARTITIONS) % 2 == 1, request_id
            ulid = ULID.from_str(request_id)
            by_ms[ulid.milliseconds].append(int.from_bytes(ulid.bytes[6:], "big"))
        pairs = sum(len(v) - 1 for v in by_ms.values())
        if pairs >= 5:
            break
    assert pairs >= 1, "no two ids were minted in one millisecond"
    for bits in by_ms.values():
        ordered = sorted(bits)
        # Fresh 80-bit randomness: ids of one millisecond are nowhere near each other (a
        # monotonic generator makes them differ by a few units).
        assert all(b - a > 2**40 for a, b in itertools.pairwise(ordered)), ordered


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b'{"document": "caf\xe9 \xff\xfe"}', "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
    ids=["invalid-utf8", "100k-deep-json"],
)
def test_undecodable_bodies_are_400_malformed_request_saying_what_is_wrong(
    stack: Stack, content: bytes, detail: str
) -> None:
    response = httpx.post(
        f"{stack.gateway}/v1/summaries",
        content=content,
        headers={**auth("key-ann"), **JSON, "Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "malformed_request"
    assert detail in body["detail"]


def test_an_idempotency_key_reused_with_another_body_is_422_here_and_at_a_restarted_index(
    stack: Stack,
) -> None:
    url = stack.gateway
    key = {"Idempotency-Key": f"order-{time.time_ns()}"}
    first = post(url, "key-ben", {"document": "The first body."}, **key)
    assert first.status_code == 202, first.text
    again = post(url, "key-ben", {"document": "The first body."}, **key)
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    for other in (
        {"document": "Another body."},
        {"document": "The first body.", "model": "claude-3-5-haiku-latest"},
    ):
        reused = post(url, "key-ben", other, **key)
        assert reused.status_code == 422, reused.text
        assert reused.json()["code"] == "idempotency_key_reused"
    # A gateway started now rebuilds its index from `requests`: the body travels in the record.
    stack.start_gateway(0, 2)
    other_gateway = stack.gateways[-1]
    reused = post(other_gateway, "key-ben", {"document": "Another body."}, **key)
    assert reused.status_code == 422, reused.text
    assert reused.json()["code"] == "idempotency_key_reused"
    same = post(other_gateway, "key-ben", {"document": "The first body."}, **key)
    assert same.status_code == 202
    assert same.json()["id"] == first.json()["id"]


def test_the_effective_max_output_tokens_is_told_in_the_202_body_and_the_accepted_event(
    stack: Stack,
) -> None:
    url = stack.gateway
    document = {"document": "One sentence to summarize. And a second one."}
    asked = {None: ENTERPRISE_CAP, 10_000: ENTERPRISE_CAP, 5: 5}
    for requested, effective in asked.items():
        body = document if requested is None else {**document, "max_output_tokens": requested}
        response = post(url, "key-ann", body)
        assert response.status_code == 202, response.text
        assert response.json()["max_output_tokens"] == effective

    async def streamed() -> Any:
        async with httpx.AsyncClient(timeout=60) as client:
            return await collect(
                client,
                "POST",
                f"{url}/v1/summaries",
                json={**document, "max_output_tokens": 10_000},
                headers=auth("key-ann"),
            )

    result = asyncio.run(streamed())
    assert result.of("accepted")[0].data["max_output_tokens"] == ENTERPRISE_CAP
    assert result.done["usage"]["output_tokens"] <= ENTERPRISE_CAP


def test_a_client_that_stops_reading_is_let_go_as_a_normal_close_without_traceback(
    stack: Stack,
) -> None:
    url = stack.gateway
    gateway = next(p for p in stack.procs if p.name.startswith("gateway-1-of-2"))
    before = counter(url, "sumstream_gateway_stream_ends_total", reason="send_timeout")
    response = post(url, "key-fay", {"document": long_document(1), "max_output_tokens": FREE_CAP})
    assert response.status_code == 202, response.text
    request_id = response.json()["id"]
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect((host, int(port)))
        sock.sendall(
            f"GET /v1/summaries/{request_id}/events HTTP/1.1\r\nHost: {host}\r\n"
            "Authorization: Bearer key-fay\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        # Never read: the gateway's sends back up until one times out.
        eventually(
            lambda: (
                counter(url, "sumstream_gateway_stream_ends_total", reason="send_timeout")
                >= before + 1
            )
        )
    finally:
        sock.close()
    lines = gateway.log_lines()
    closes = [
        record
        for record in map(_json_or_none, lines)
        if record
        and record.get("msg") == "stream closed"
        and record.get("request_id") == request_id
    ]
    assert [(c["level"], c["reason"]) for c in closes] == [("info", "send_timeout")], closes
    noisy = [line for line in lines if "Traceback" in line or "Exception in ASGI" in line]
    assert not noisy, noisy[:3]
    assert not [line for line in lines if "unhandled error" in line]


def _json_or_none(line: str) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError):
        record = json.loads(line)
        if isinstance(record, dict):
            return record
    return None


def listening_addresses(port: int) -> set[str]:
    """The local addresses (as /proc/net/tcp* spells them) listening on ``port``."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].rpartition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_the_worker_serves_metrics_on_loopback_only_by_default(stack: Stack) -> None:
    worker = stack.workers[0]
    port = worker.metrics_port()
    assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200
