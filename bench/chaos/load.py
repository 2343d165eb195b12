"""The chaos run's load: SSE clients of several users and tiers across both gateways (some
disconnect and resume with Last-Event-ID), and "another system" producing straight onto
`requests`."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from bench.chaos.checks import ClientStream
from bench.sse import SSEParser

# (key, user, tier): several users per tier, so the fair scheduler and the quota see a mix.
USERS: list[tuple[str, str, str]] = [
    ("chaos-key-ent-1", "ent-1", "enterprise"),
    ("chaos-key-ent-2", "ent-2", "enterprise"),
    ("chaos-key-pro-1", "pro-1", "pro"),
    ("chaos-key-pro-2", "pro-2", "pro"),
    ("chaos-key-free-1", "free-1", "free"),
    ("chaos-key-ops", "ops", "enterprise"),  # the user of the records produced straight
]
WORDS = [
    "kafka",
    "broker",
    "partition",
    "replica",
    "leader",
    "follower",
    "stream",
    "token",
    "summary",
    "request",
    "worker",
    "gateway",
    "quota",
    "ledger",
    "billing",
    "cluster",
    "failover",
    "offset",
    "commit",
    "record",
    "topic",
]


def document(rng: random.Random, sentences: int = 12) -> str:
    """A small plain-prose document, different per draw."""
    return " ".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
        for _ in range(sentences)
    )


@dataclass
class Segment:
    """How one connection of a stream ended."""

    done: bool
    broken: bool


class Client:
    """One user's sequential requests until ``stop`` is set."""

    def __init__(
        self,
        rng: random.Random,
        gateways: Callable[[], list[str]],
        user: tuple[str, str, str],
        out: list[ClientStream],
    ) -> None:
        self.rng = rng
        self.gateways = gateways
        self.key, self.user, _tier = user
        self.out = out

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def run(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            stream = ClientStream(user=self.user)
            self.out.append(stream)
            await self.one(client, stream)
            if stream.request_id is None:
                await asyncio.sleep(0.5)  # refused or the gateway is down: back off a little

    async def one(self, client: httpx.AsyncClient, stream: ClientStream) -> None:
        body = {"document": document(self.rng), "max_output_tokens": self.rng.choice([30, 60])}
        # A third of the clients hang up after a few tokens and come back with Last-Event-ID.
        hang_up_after = self.rng.randint(2, 8) if self.rng.random() < 0.33 else None
        url = f"{self.rng.choice(self.gateways())}/v1/summaries"
        segment = await self.segment(client, "POST", url, stream, hang_up_after, json=body)
        tries = 0
        while stream.request_id is not None and not segment.done and tries < 60:
            tries += 1
            stream.resumes += 1
            await asyncio.sleep(0.3 if not segment.broken else 1.0)
            gateway = self.rng.choice(self.gateways())
            url = f"{gateway}/v1/summaries/{stream.request_id}/events"
            after = max(stream.seqs, default=0)
            segment = await self.segment(
                client, "GET", url, stream, None, headers={"Last-Event-ID": str(after)}
            )

    async def segment(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        stream: ClientStream,
        hang_up_after: int | None,
        **kwargs: object,
    ) -> Segment:
        headers = {**self.headers, **dict(kwargs.pop("headers", {}) or {})}  # type: ignore[call-overload]
        last = time.monotonic()
        tokens = 0
        try:
            async with client.stream(method, url, headers=headers, **kwargs) as response:  # type: ignore[arg-type]
                if response.status_code >= 300:
                    await response.aread()
                    if stream.request_id is None:
                        stream.http_status = response.status_code
                    return Segment(done=stream.request_id is None, broken=True)
                parser = SSEParser()
                async for chunk in response.aiter_bytes():
                    for event in parser.feed(chunk):
                        now = time.monotonic()
                        if stream.request_id is not None:
                            stream.longest_stall_s = max(stream.longest_stall_s, now - last)
                        last = now
                        data = _json(event.data)
                        if event.event == "accepted":
                            stream.request_id = str(data["id"])
                            stream.http_status = response.status_code
                        elif event.event == "token" and event.id is not None:
                            first = int(data.get("first_seq") or event.id)
                            stream.seqs.extend(range(first, int(event.id) + 1))
                            stream.text += data.get("text", "")
                            tokens += 1
                            if hang_up_after is not None and tokens >= hang_up_after:
                                return Segment(done=False, broken=False)
                        elif event.id is not None and event.id.isdigit():
                            stream.other_seqs.append(int(event.id))
                        if event.event == "done" and data.get("status") != "running":
                            stream.done = data
                            return Segment(done=True, broken=False)
        except httpx.ConnectError:
            if stream.request_id is None and method == "POST":
                return Segment(done=True, broken=True)  # nothing was sent
        except (httpx.HTTPError, OSError):
            if stream.request_id is None and method == "POST":
                stream.in_doubt = True
                return Segment(done=True, broken=True)
        return Segment(done=False, broken=True)


def _json(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
