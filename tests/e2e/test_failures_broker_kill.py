"""Issue 17 item 5: after ``kill -9`` of the broker, the gateway's lag sampling recovers and
admission sheds again on a long queue.

The test runs its own single-node broker (tests/e2e/faults.py ``fresh_broker``: the shared
broker is never touched) and a stack on it. The broker is killed with SIGKILL and started again
on the same data; a restarted broker fences the leader epochs the gateway's long-lived admin
clients cached, which they never recovered from. Assertions are on state (``/readyz``) and
verdicts (202 or 503), never on timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.core.settings import BrokerSettings
from pipeline.kafka.admin import create_topics
from pipeline.ops import broker
from pipeline.ops.broker_install import BrokerPaths
from tests.e2e.documents import document
from tests.e2e.test_backpressure import tiers_file
from tests.harness import Stack, auth, eventually_async

pytestmark = pytest.mark.e2e

SHORT = 30  # output tokens per request


@contextlib.contextmanager
def stack_on(tmp: Path, bootstrap: str) -> Iterator[Stack]:
    """Simulator, worker and gateway on ``bootstrap``, the worker keeping at most 4 streams and
    4 queued jobs in memory so that a stalled upstream shows up as lag.

    As in test_failures_broker.py, the worker runs without its metrics server (its lag sampler)
    and the gateway starts once the worker holds its partitions: reading a group's offsets
    while its coordinator is still loading on a new cluster crashes librdkafka (reported).
    """
    env = {
        "SUMSTREAM_TIERS_FILE": str(tiers_file(tmp / "tiers.toml")),
        "SUMSTREAM_MAX_STREAMS": "4",
        "SUMSTREAM_MAX_QUEUED": "4",
        "SUMSTREAM_MAX_STREAMS_PER_USER": "64",
        "SUMSTREAM_LAG_INTERVAL_S": "0.5",
    }
    stack = Stack(tmp, bootstrap=bootstrap, extra_env=env)
    try:
        create_topics(stack.settings)
        stack.start_simulator(ttft_ms=20, token_delay_ms=2, max_concurrent="4")
        worker = stack.spawn("worker-0", ["worker", "--metrics-port", "-1"])
        stack.workers.append(worker)
        worker.wait_for_log("inflight partitions assigned", timeout=90)
        stack.start_gateway()
        yield stack
    finally:
        stack.stop()


def kill9(settings: BrokerSettings) -> None:
    """SIGKILL the broker (no clean shutdown), then let ``broker.stop`` reap it."""
    pid = int(BrokerPaths.of(settings).pid_file.read_text().strip())
    os.kill(pid, signal.SIGKILL)
    broker.stop(settings)


async def readiness(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get(f"{url}/readyz")).json()
    checks: dict[str, Any] = body["checks"]
    return checks


async def lag_sampled(client: httpx.AsyncClient, url: str, expected: bool) -> None:
    async def as_expected() -> bool:
        return bool((await readiness(client, url))["lag_sampled"]) is expected

    await eventually_async(
        as_expected, timeout=180, interval=0.5, message=f"lag_sampled {expected}"
    )


async def first_shed(client: httpx.AsyncClient, url: str) -> tuple[int, httpx.Response | None]:
    """POST until the gateway sheds; the number admitted before, and the 503 (None: never)."""
    admitted = 0
    for i in range(100):
        response = await client.post(
            f"{url}/v1/summaries",
            json={"document": document(500 + i), "max_output_tokens": SHORT},
            headers={**auth("key-zed"), "Accept": "application/json"},
        )
        if response.status_code == 503:
            return admitted, response
        assert response.status_code == 202, response.text
        admitted += 1
        # The arrival rate, not a wait for a condition: the queue grows one request a step.
        await asyncio.sleep(0.4)
    return admitted, None


def test_lag_sampling_recovers_after_broker_kill9_and_admission_sheds_again(
    own_broker: BrokerSettings, tmp_path: Path
) -> None:
    bootstrap = f"127.0.0.1:{own_broker.broker_port}"
    with stack_on(tmp_path, bootstrap) as stack:
        asyncio.run(_kill_and_recover(stack, own_broker))


async def _kill_and_recover(stack: Stack, own_broker: BrokerSettings) -> None:
    url = stack.gateway
    async with httpx.AsyncClient(timeout=60) as client:
        await lag_sampled(client, url, True)
        await asyncio.to_thread(kill9, own_broker)
        await lag_sampled(client, url, False)
        await asyncio.to_thread(broker.start, own_broker, 180)
        try:
            await lag_sampled(client, url, True)
        except TimeoutError as exc:
            raise AssertionError(f"lag sampling never recovered\n{stack.logs()}") from exc
        checks = await readiness(client, url)
        assert checks["lag_sample_age_s"] < 60, checks  # the last good sample is a fresh one

        # Every new upstream call now waits 15 s for its first token: the queue grows as lag,
        # and admission must see it (a tier whose max queue wait is 4 s).
        stack.sim_config(ttft_ms=15_000)
        admitted, shed = await first_shed(client, url)
        assert shed is not None, f"never shed after {admitted} admitted\n{stack.logs()}"
        body = shed.json()
        assert body["code"] == "overloaded", body
        assert body["estimated_wait_s"] >= 4.0, body
        assert int(shed.headers["Retry-After"]) >= 1
        stack.sim_config(ttft_ms=20)
