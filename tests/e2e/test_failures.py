"""Failure contracts (docs/architecture.md, "Failure model") on real processes: simulator,
worker and gateway subprocesses on the real broker, faults injected through the simulator's
knobs, a TCP proxy between the worker and the simulator, and raw records on the topics.

One stack serves the whole module. Its worker runs the default retry budget (10 % of recent
requests + 3 retries per 10 s window); tests that spend retries wait for a fresh window first
(``budget``), so each one sees the whole floor. Figures are printed (``pytest -s``).

Scaled to the 2-core machine: the outage lasts 30 s as in the issue; 12 jobs queue behind the
open breaker.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from ulid import ULID

from pipeline.core.codec import codec
from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.admin import create_topics
from pipeline.kafka.lag import LagReader
from pipeline.llm.extractive import summarize
from tests.e2e.documents import document
from tests.e2e.faults import FlakyProxy, metric, sim_knobs
from tests.harness import (
    BOOTSTRAP,
    Proc,
    Stack,
    StreamResult,
    TierRow,
    auth,
    collect,
    end_offsets,
    eventually_async,
    produce_raw,
    read_topic,
    sse_events,
    write_tiers,
)

pytestmark = pytest.mark.e2e

MAX_TOKENS = 200  # beyond the longest summary of a 24-sentence document (~83 tokens)
DEFAULT_DEADLINE_S = 1.0  # + the tier's max_queue_wait_s = a request's deadline
QUICK_WAIT_S = 3.0  # the `quick` tier: a 4 s deadline
BUDGET_WINDOW_S = 10.0  # WorkerSettings.retry_budget_window_s (default)
BUDGET_MIN = 3  # WorkerSettings.retry_budget_min (default)
BUDGET_RATIO = 0.1  # WorkerSettings.retry_budget_ratio (default)
MAX_ATTEMPTS = 4  # WorkerSettings.max_attempts (default)
MAX_RESUMES = 3  # WorkerSettings.max_resumes (default)
BREAKER_THRESHOLD = 5  # WorkerSettings.breaker_failure_threshold (default)
BREAKER_RESET_S = 6.0
OUTAGE_S = 30.0
SDK = "x-sumstream-request-id"


def tiers_file(path: Path) -> Path:
    """The default tiers and `quick`, whose short max queue wait makes a short deadline."""
    tiers: dict[str, TierRow] = {
        "free": (10, 20_000, 8_000, 300, 1, 1.0, 30.0),
        "pro": (120, 400_000, 100_000, 1_024, 4, 100.0, 60.0),
        "enterprise": (1_200, 4_000_000, 400_000, 4_096, 16, 10_000.0, 120.0),
        "quick": (600, 400_000, 100_000, 1_024, 4, 100.0, QUICK_WAIT_S),
    }
    return write_tiers(path, tiers, reject=frozenset({"free"}))


class Env:
    """The module's stack and the proxy its worker reaches the simulator through."""

    def __init__(self, stack: Stack, proxy: FlakyProxy) -> None:
        self.stack = stack
        self.proxy = proxy
        self.last_retry_at = 0.0

    @property
    def worker(self) -> Proc:
        return self.stack.workers[0]

    @property
    def url(self) -> str:
        return self.stack.gateway

    @property
    def topics(self) -> TopicNames:
        return TopicNames.from_settings(KafkaSettings(topic_prefix=self.stack.prefix))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("failures")
    stack = Stack(
        tmp,
        extra_env={
            "SUMSTREAM_TIERS_FILE": str(tiers_file(tmp / "tiers.toml")),
            "SUMSTREAM_DEFAULT_DEADLINE_S": str(DEFAULT_DEADLINE_S),
            "SUMSTREAM_CANCEL_GRACE_S": "1",
            "SUMSTREAM_BREAKER_RESET_S": str(BREAKER_RESET_S),
            "SUMSTREAM_MAX_STREAMS_PER_USER": "32",
        },
    )
    proxy = FlakyProxy(stack.sim_port)
    proxy.start()
    # Only the worker reads this: its upstream calls go through the proxy.
    stack.extra_env["SUMSTREAM_LLM_SIM_URL"] = proxy.url
    try:
        create_topics(KafkaSettings(bootstrap_servers=BOOTSTRAP, topic_prefix=stack.prefix))
        stack.start_simulator()
        stack.start_worker()
        stack.start_gateway()
        yield Env(stack, proxy)
    finally:
        stack.stop()
        proxy.stop()


@pytest.fixture
async def budget(env: Env) -> AsyncIterator[None]:
    """A fresh retry-budget window: the floor retries of earlier tests have expired."""
    # The budget is a sliding window of time with no metric of its own: its state is the
    # time since the last retry, so here waiting out the window is the condition itself.
    wait = env.last_retry_at + BUDGET_WINDOW_S + 0.5 - time.monotonic()
    if wait > 0:
        await asyncio.sleep(wait)
    try:
        yield
    finally:
        env.last_retry_at = time.monotonic()


def expected(doc: str, max_tokens: int = MAX_TOKENS) -> str:
    return summarize(doc, max_tokens).strip()


def figures(name: str, **values: Any) -> None:
    print(f"\nFIGURES {name}: {json.dumps(values, sort_keys=True)}")


async def stream(
    env: Env, doc: str, key: str = "key-ann", *, max_tokens: int = MAX_TOKENS, **kwargs: Any
) -> StreamResult:
    async with httpx.AsyncClient(timeout=180) as client:
        return await collect(
            client,
            "POST",
            f"{env.url}/v1/summaries",
            json={"document": doc, "max_output_tokens": max_tokens},
            headers=auth(key),
            **kwargs,
        )


async def post_json(
    client: httpx.AsyncClient, env: Env, doc: str, key: str = "key-ann", **headers: str
) -> httpx.Response:
    return await client.post(
        f"{env.url}/v1/summaries",
        json={"document": doc, "max_output_tokens": MAX_TOKENS},
        headers={**auth(key), "Accept": "application/json", **headers},
    )


async def result_of(
    client: httpx.AsyncClient,
    env: Env,
    request_id: str,
    key: str = "key-ann",
    timeout_s: float = 90,
) -> dict[str, Any]:
    """Poll GET /v1/summaries/{id} until its result is there."""

    async def result() -> dict[str, Any] | None:
        got = await client.get(f"{env.url}/v1/summaries/{request_id}", headers=auth(key))
        if got.status_code == 202:
            return None
        if got.status_code != 200:
            raise RuntimeError(f"{got.status_code}: {got.text}")
        body: dict[str, Any] = got.json()
        return body

    return await eventually_async(result, timeout=timeout_s, message=f"result of {request_id}")


def sim_record(env: Env, request_id: str) -> dict[str, Any]:
    record: dict[str, Any] = env.stack.sim_stats()["requests"].get(
        request_id, {"attempts": 0, "statuses": [], "streams": []}
    )
    return record


def assert_seamless(result: StreamResult, doc: str) -> None:
    """One complete summary, token seqs strictly increasing without a gap."""
    assert result.status_code == 200, result.events
    seqs = result.seqs
    assert seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    done = result.done
    assert done["status"] == "COMPLETED", done
    assert not result.of("error"), result.of("error")
    assert result.text.strip() == expected(doc)
    assert done["summary"] == expected(doc)


def assert_error_then_done(result: StreamResult, code: str, *, partial: bool) -> dict[str, Any]:
    """The stream ends with `error` (``code``) and then `done`: it never just stops."""
    names = [e.event for e in result.events]
    assert names[-2:] == ["error", "done"], names
    error = result.of("error")[-1].data
    assert error["code"] == code, error
    assert error["partial"] is partial, error
    return result.done


async def calm(env: Env, below_s: float = 0.5) -> None:
    """Wait until the gateway's estimated queue wait is below ``below_s``."""

    def estimated_wait_s() -> float:
        text = httpx.get(f"{env.url}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("sumstream_gateway_estimated_wait_seconds "):
                return float(line.split()[1])
        raise AssertionError("no estimated wait in the gateway's /metrics")

    await eventually_async(
        lambda: estimated_wait_s() < below_s, timeout=60, message="an idle pipeline"
    )


def breaker_state(env: Env) -> float:
    return metric(env.worker, "sumstream_circuit_breaker_state", upstream="llm-sim")


def breaker_log(env: Env) -> list[tuple[str, str]]:
    """(previous, new) state of every breaker transition the worker logged."""
    return [
        (r["previous_state"], r["state"])
        for r in env.worker.records()
        if r.get("logger") == "sumstream.breaker" and "previous_state" in r
    ]


# -- 1. errors before the first token ----------------------------------------------------------


async def test_upstream_errors_before_the_first_token_are_retried(env: Env, budget: None) -> None:
    # 429 with retry-after 2 s: the retry waits at least that long, where the backoff alone
    # would wait at most retry_base_s (0.25 s).
    doc = document(1429)
    with sim_knobs(env.stack, fail_next=1, error_status=429, retry_after_s=2.0):
        result = await stream(env, doc)
    assert_seamless(result, doc)
    assert result.done["usage"]["attempts"] == 2
    assert sim_record(env, result.request_id)["statuses"] == [429, 200]
    assert result.done["latency_ms"]["ttft"] >= 2_000

    for status in (529, 500):
        doc = document(1000 + status)
        with sim_knobs(env.stack, fail_next=1, error_status=status, retry_after_s=0.0):
            result = await stream(env, doc)
        assert_seamless(result, doc)
        assert result.done["usage"]["attempts"] == 2
        assert sim_record(env, result.request_id)["statuses"] == [status, 200]
        # Both attempts are billed; the failed one had no tokens.
        assert result.done["usage"]["output_tokens"] == len(result.seqs)


# -- 3. errors after the first token: resume ---------------------------------------------------


@pytest.mark.parametrize("kind", ["error", "drop"])
async def test_a_fault_mid_stream_resumes_into_one_seamless_summary(env: Env, kind: str) -> None:
    doc = document(3000 + len(kind))
    with sim_knobs(env.stack, fault_at_token=10, fault_kind=kind, fault_times=1):
        result = await stream(env, doc)
    assert_seamless(result, doc)
    done = result.done
    record = sim_record(env, result.request_id)
    streams = record["streams"]
    assert [s["ended"] for s in streams] == ["fault", "completed"], record
    # The second call continued the text already streamed (assistant prefill).
    assert streams[0]["prefill_chars"] == 0 and streams[1]["prefill_chars"] > 0
    assert done["usage"]["attempts"] == 2
    # Usage of both attempts: every token the simulator sent, and both prompts.
    assert done["usage"]["output_tokens"] == sum(s["tokens"] for s in streams)
    clean = await stream(env, doc)
    assert clean.done["usage"]["attempts"] == 1
    assert done["usage"]["input_tokens"] > 2 * clean.done["usage"]["input_tokens"] - 5
    assert done["cost"]["micro_usd"] > clean.done["cost"]["micro_usd"]


async def test_resumes_exhausted_end_with_a_partial_error_and_keep_the_text(env: Env) -> None:
    doc = document(3100)
    with sim_knobs(env.stack, fault_at_token=10, fault_kind="error", fault_times=-1):
        result = await stream(env, doc)
    done = assert_error_then_done(result, "upstream_unavailable", partial=True)
    assert done["status"] == "PARTIAL"
    assert done["usage"]["attempts"] == 1 + MAX_RESUMES
    # The text so far is kept in the result, and it is what the client was sent.
    assert len(result.seqs) == 10 * (1 + MAX_RESUMES)
    assert done["summary"] == result.text.strip()
    assert expected(doc).startswith(done["summary"])
    assert len(done["summary"]) < len(expected(doc))
    seqs = result.seqs
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


# -- 5. deadline -------------------------------------------------------------------------------


async def test_a_passed_deadline_closes_the_call_and_keeps_the_text(env: Env) -> None:
    doc = document(5000)
    # `quick` sheds above 3 s of estimated queue wait: start from an idle pipeline.
    await calm(env)
    # deadline = created + 3 s (the tier's max queue wait) + 1 s; the summary takes ~8 s.
    with sim_knobs(env.stack, token_delay_ms=100):
        result = await stream(env, doc, "key-zed")
    done = assert_error_then_done(result, "deadline_exceeded", partial=True)
    assert done["status"] == "PARTIAL"
    assert 0 < len(done["summary"]) < len(expected(doc))
    assert done["summary"] == result.text.strip()
    assert expected(doc).startswith(done["summary"])
    [upstream] = sim_record(env, result.request_id)["streams"]
    assert upstream["ended"] == "client_closed"
    deadline_ms = done["created_at"] + (QUICK_WAIT_S + DEFAULT_DEADLINE_S) * 1000
    late_ms = upstream["ended_at"] - deadline_ms
    figures("deadline", upstream_closed_after_deadline_ms=late_ms)
    assert -50 <= late_ms <= 1_000


# -- 6. cancellation ---------------------------------------------------------------------------


def control_event(env: Env, request_id: str) -> dict[str, Any]:
    key = request_id.encode()
    [record] = [
        r
        for r in read_topic(
            BOOTSTRAP, env.topics.control, lambda rs: any(r.key == key for r in rs), 30
        )
        if r.key == key
    ]
    return codec().decode_as(record.value, "ControlEvent")


def assert_cancelled_upstream(
    env: Env, request_id: str, done: dict[str, Any], tokens_seen: int, reason: str
) -> None:
    assert done["status"] == "CANCELLED", done
    assert done["cost"]["micro_usd"] > 0  # the usage so far is billed
    assert tokens_seen <= done["usage"]["output_tokens"]
    cancel = control_event(env, request_id)
    assert cancel["reason"] == reason
    [upstream] = sim_record(env, request_id)["streams"]
    assert upstream["ended"] == "client_closed"
    assert upstream["tokens"] < 60  # stopped, far from the end of the summary (~83 tokens)
    assert done["usage"]["output_tokens"] <= upstream["tokens"]
    closed_after_ms = upstream["ended_at"] - cancel["created_at"]
    figures(f"cancel_{reason}", upstream_closed_after_control_ms=closed_after_ms)
    assert closed_after_ms <= 1_000


async def test_delete_cancels_closes_the_upstream_at_once_and_bills_the_usage(env: Env) -> None:
    doc = document(6000)
    result = StreamResult(0)
    with sim_knobs(env.stack, token_delay_ms=60):
        async with (
            httpx.AsyncClient(timeout=60) as client,
            client.stream(
                "POST",
                f"{env.url}/v1/summaries",
                json={"document": doc, "max_output_tokens": MAX_TOKENS},
                headers=auth(),
            ) as response,
        ):
            result.status_code = response.status_code
            deleted = False
            async for event in sse_events(response):
                result.events.append(event)
                if event.event == "done":
                    break
                if not deleted and len(result.seqs) >= 5:
                    url = f"{env.url}/v1/summaries/{result.request_id}"
                    answer = await client.delete(url, headers=auth())
                    assert answer.status_code == 202, answer.text
                    deleted = True
            # Tokens stop: nothing more arrives for it.
            late = await client.get(f"{env.url}/v1/summaries/{result.request_id}", headers=auth())
    done = assert_error_then_done(result, "cancelled", partial=True)
    assert late.json()["status"] == "CANCELLED"
    assert late.json()["usage"] == done["usage"]
    assert_cancelled_upstream(env, result.request_id, done, len(result.seqs), "client")


async def test_a_client_that_disconnects_and_does_not_come_back_is_cancelled(env: Env) -> None:
    doc = document(6100)
    with sim_knobs(env.stack, token_delay_ms=60):
        first = await stream(env, doc, stop_after_tokens=3)
        async with httpx.AsyncClient(timeout=60) as client:
            # The gateway waits 1 s (SUMSTREAM_CANCEL_GRACE_S) for a reconnect, then cancels.
            done = await result_of(client, env, first.request_id)
    assert_cancelled_upstream(env, first.request_id, done, 3, "disconnect")


# -- 1. a connection error before the first token ----------------------------------------------


async def test_a_connection_error_before_the_first_token_is_retried(env: Env, budget: None) -> None:
    doc = document(1100)
    errors_before = metric(
        env.worker, "sumstream_upstream_errors_total", error_type="connection_error"
    )
    refused_before = env.proxy.refused
    env.proxy.cut(refuse_next=2)
    result = await stream(env, doc)
    assert_seamless(result, doc)
    assert env.proxy.refused - refused_before == 2
    errors = (
        metric(env.worker, "sumstream_upstream_errors_total", error_type="connection_error")
        - errors_before
    )
    assert errors >= 2
    # Two calls never reached the simulator; the third did, once.
    assert result.done["usage"]["attempts"] == 1 + errors
    assert sim_record(env, result.request_id)["statuses"] == [200]


# -- 1. an outage under 20 concurrent requests: the retry budget against the SDK's default -----


async def sdk_default_attempts(env: Env, count: int) -> list[int]:
    """Attempts per call of the plain SDK (max_retries=2, its default) against the outage."""
    ids = [f"sdk-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]
    async with anthropic.AsyncAnthropic(
        base_url=env.stack.sim_url, api_key="k", max_retries=2
    ) as sdk:

        async def call(request_id: str) -> None:
            with pytest.raises(anthropic.APIStatusError):
                await sdk.messages.create(
                    model="claude-haiku-4-5",
                    max_tokens=MAX_TOKENS,
                    messages=[{"role": "user", "content": document(7000)}],
                    extra_headers={SDK: request_id},
                )

        await asyncio.gather(*(call(i) for i in ids))
    return [sim_record(env, i)["attempts"] for i in ids]


async def test_an_outage_costs_at_most_the_retry_budget(env: Env, budget: None) -> None:
    count = 20
    docs = [document(2000 + i) for i in range(count)]
    env.stack.sim_config(fail_all=True, error_status=529, retry_after_s=1.0)
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            streams = [
                asyncio.create_task(
                    collect(
                        client,
                        "POST",
                        f"{env.url}/v1/summaries",
                        json={"document": doc, "max_output_tokens": MAX_TOKENS},
                        headers=auth(),
                    )
                )
                for doc in docs
            ]
            sdk = await sdk_default_attempts(env, count)
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - started)))
            env.stack.sim_config(fail_all=False)
            recovered = time.monotonic()
            results = await asyncio.gather(*streams)
    finally:
        env.stack.sim_config(fail_all=False, retry_after_s=1.0, error_status=529)
    elapsed = time.monotonic() - started

    ours = [sim_record(env, r.request_id)["attempts"] for r in results]
    completed = [r for r in results if r.done["status"] == "COMPLETED"]
    windows = int(elapsed // BUDGET_WINDOW_S) + 1
    bound = count + int(BUDGET_RATIO * count) + BUDGET_MIN * windows
    figures(
        "outage",
        requests=count,
        outage_s=OUTAGE_S,
        elapsed_s=round(elapsed, 1),
        drained_after_recovery_s=round(time.monotonic() - recovered, 1),
        pipeline_attempts=sum(ours),
        pipeline_attempts_per_request=round(sum(ours) / count, 2),
        pipeline_max_per_request=max(ours),
        budget_bound=bound,
        sdk_default_attempts=sum(sdk),
        sdk_attempts_per_request=round(sum(sdk) / count, 2),
        completed=len(completed),
        failed=count - len(completed),
    )
    assert sdk == [3] * count  # max_retries=2: three attempts each, 60 in all
    assert max(ours) <= MAX_ATTEMPTS
    assert sum(ours) <= bound < sum(sdk)
    for doc, result in zip(docs, results, strict=True):
        assert result.status_code == 200
        done = result.done
        if done["status"] == "COMPLETED":
            assert_seamless(result, doc)
            # Within its deadline (enterprise: 120 s max queue wait + 1 s).
            assert done["completed_at"] - done["created_at"] < 121_000
        else:
            done = assert_error_then_done(result, "upstream_unavailable", partial=False)
            assert done["status"] == "FAILED"
            assert result.of("error")[-1].data["retriable"] is True
    assert completed, "after recovery the requests still waiting succeed"


# -- 2. the circuit breaker --------------------------------------------------------------------


async def test_the_breaker_opens_pauses_consumption_probes_and_drains_the_backlog(
    env: Env, budget: None
) -> None:
    await eventually_async(lambda: breaker_state(env) == 0, timeout=60, message="breaker closed")
    lag = LagReader(
        KafkaSettings(bootstrap_servers=BOOTSTRAP, topic_prefix=env.stack.prefix),
        {"inference": env.stack.app_id},
    )
    transitions_before = len(breaker_log(env))
    env.stack.sim_config(fail_all=True, error_status=500)
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            trip = [
                await post_json(client, env, document(8000 + i), "key-ben")
                for i in range(BREAKER_THRESHOLD)
            ]
            assert all(r.status_code == 202 for r in trip), [r.text for r in trip]
            await eventually_async(
                lambda: breaker_state(env) == 2, timeout=30, message="breaker open"
            )
            attempts_when_open = env.stack.sim_stats()["attempts"]

            # While it is open the worker takes no job: they wait in Kafka, as lag.
            held = [await post_json(client, env, document(8100 + i), "key-ben") for i in range(12)]
            assert all(r.status_code == 202 for r in held), [r.text for r in held]
            lags = [0]

            async def jobs_wait_in_kafka() -> bool:
                lags.append((await lag.read_async())["inference"])
                return max(lags) >= 10

            # Within the breaker's reset time, while nothing may take jobs off the queue.
            await eventually_async(
                jobs_wait_in_kafka, timeout=BREAKER_RESET_S, message="jobs held in Kafka"
            )
            peak = max(lags)
            transitions = breaker_log(env)[transitions_before:]
            if not any(new == "half_open" for _, new in transitions):
                # Nothing went upstream while it was open.
                assert env.stack.sim_stats()["attempts"] == attempts_when_open
            # A half-open probe fails and opens it again.
            await eventually_async(
                lambda: ("half_open", "open") in breaker_log(env)[transitions_before:],
                timeout=BREAKER_RESET_S + 10,
                message="a failed probe",
            )
            env.stack.sim_config(fail_all=False)
            await eventually_async(
                lambda: ("half_open", "closed") in breaker_log(env)[transitions_before:],
                timeout=BREAKER_RESET_S + 10,
                message="a probe that closes it",
            )
            assert breaker_state(env) == 0
            ids = [r.json()["id"] for r in trip + held]
            results = [await result_of(client, env, i, "key-ben") for i in ids]
    finally:
        env.stack.sim_config(fail_all=False, error_status=529)
    drained_to: list[int] = []

    async def backlog_drained() -> bool:
        # Offsets are committed every commit interval: the lag follows the results shortly.
        drained_to.append((await lag.read_async())["inference"])
        return drained_to[-1] == 0

    await eventually_async(backlog_drained, timeout=30, message="the backlog drained")
    drained = drained_to[-1]
    log = breaker_log(env)[transitions_before:]
    figures(
        "breaker",
        peak_inference_lag=peak,
        transitions=[f"{a}->{b}" for a, b in log],
        statuses=[r["status"] for r in results],
        lag_after=drained,
    )
    assert peak >= 10, "jobs waited in Kafka while the breaker was open"
    assert log[0] == ("closed", "open")
    assert ("open", "half_open") in log
    # No job lost: every request has its result; the ones held in Kafka mostly never failed.
    assert len(results) == len(ids)
    for result in results:
        assert result["status"] in ("COMPLETED", "FAILED"), result
        if result["status"] == "FAILED":
            assert result["error"]["code"] == "upstream_unavailable"
    failed_probes = log.count(("half_open", "open"))
    held_ids = {r.json()["id"] for r in held}
    held_done = [r for r in results if r["id"] in held_ids and r["status"] == "COMPLETED"]
    assert len(held_done) >= len(held) - failed_probes
    assert drained == 0


# -- 8. poison records -------------------------------------------------------------------------


async def test_poison_on_every_input_topic_goes_to_the_dlq_and_the_stages_go_on(env: Env) -> None:
    topics = env.topics
    unknown = b"\xc3\x01" + bytes(range(8)) + b"\x02\x04"  # a fingerprint nobody wrote
    job_id = str(ULID())
    invalid = {
        topics.requests: codec().encode(
            "SummarizeRequest", {"request_id": "", "user_id": "", "document": "x", "created_at": 1}
        ),
        topics.preprocessed: codec().encode(
            "InferenceJob",
            {
                "request_id": job_id,
                "user_id": "ann",
                "tier": "enterprise",
                "model": "claude-haiku-4-5",
                "prompt": "<document>x</document>",
                "max_output_tokens": 0,
                "deadline_ms": 1,
                "created_at": 1,
            },
        ),
        topics.tokens: codec().encode(
            "TokenEvent", {"request_id": "01J0000000000000000000000Z", "seq": 0, "kind": "DELTA"}
        ),
        topics.control: codec().encode(
            "ControlEvent", {"request_id": "", "action": "CANCEL", "created_at": 1}
        ),
    }
    stages = {
        topics.requests: "preprocess",
        topics.preprocessed: "inference",
        topics.tokens: "postprocess",
        topics.control: "control",
    }
    produced: dict[tuple[str, int, int], tuple[bytes, str]] = {}
    for topic in stages:
        for value, error_type in [
            (b"\x00garbage, not a record", "undecodable_record"),
            (unknown, "unknown_schema"),
            (invalid[topic], "invalid_record"),
        ]:
            key = job_id.encode() if topic == topics.preprocessed else b"poison"
            where = produce_raw(BOOTSTRAP, topic, key, value)
            produced[(topic, *where)] = (value, error_type)

    # Every stage goes on: a request after the poison is preprocessed, streamed, cancelled
    # through `control` and finalised by postprocess.
    doc = document(8800)
    with sim_knobs(env.stack, token_delay_ms=50):
        async with httpx.AsyncClient(timeout=60) as client:
            accepted = await post_json(client, env, doc)
            request_id = accepted.json()["id"]
            await eventually_async(
                lambda: bool(sim_record(env, request_id)["streams"]),
                timeout=30,
                message="the upstream call",
            )
            await client.delete(f"{env.url}/v1/summaries/{request_id}", headers=auth())
            cancelled = await result_of(client, env, request_id)
            after = await stream(env, document(8801), max_tokens=30)
    assert cancelled["status"] == "CANCELLED"
    assert after.done["summary"] == expected(document(8801), 30)

    letters = [
        codec().decode_as(r.value, "DeadLetter")
        for r in read_topic(BOOTSTRAP, topics.dlq, lambda rs: len(rs) >= len(produced))
    ]
    found = {(d["origin_topic"], d["origin_partition"], d["origin_offset"]): d for d in letters}
    assert set(found) == set(produced)
    for where, (value, error_type) in produced.items():
        letter = found[where]
        assert letter["value"] == value  # kept byte for byte
        assert letter["error_type"] == error_type, letter
        assert letter["stage"] == stages[where[0]]
        assert letter["error"]
    # The client of the invalid job still gets an end.
    async with httpx.AsyncClient(timeout=60) as client:
        rejected = await result_of(client, env, job_id)
    assert rejected["status"] == "REJECTED"


# -- 9. bad HTTP input ------------------------------------------------------------------------


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["code"], body
    return body


async def test_bad_http_input_is_a_problem_and_produces_nothing(env: Env) -> None:
    url = f"{env.url}/v1/summaries"
    ok = {"document": "A short document to summarize.", "max_output_tokens": 5}
    before = end_offsets(BOOTSTRAP, env.topics.requests)
    async with httpx.AsyncClient(timeout=60) as client:
        owned = (await post_json(client, env, document(9000))).json()["id"]
        malformed = await client.post(
            url,
            content=b'{"document": "x",',
            headers={**auth(), "Content-Type": "application/json"},
        )
        assert_problem(malformed, 400)
        for body in ({"document": 42}, {"document": "x", "max_output_tokens": "many"}, ["x"]):
            assert_problem(await client.post(url, json=body, headers=auth()), 422)
        for document_ in ("", "   \n\t "):
            assert_problem(
                await client.post(url, json={"document": document_}, headers=auth()), 422
            )
        huge = {"document": "word " * 220_000}  # 1.1 MB, over the 1 MB document limit
        assert_problem(await client.post(url, json=huge, headers=auth()), 413)
        missing = await client.post(url, json=ok)
        assert_problem(missing, 401)
        assert_problem(await client.post(url, json=ok, headers=auth("key-nobody")), 401)
        assert_problem(
            await client.post(url, json=ok, headers={"Authorization": "Basic eDp5"}), 401
        )
        # Another user's request looks unknown, whatever the method.
        mine = f"{url}/{owned}"
        for method, path in (("GET", mine), ("GET", f"{mine}/events"), ("DELETE", mine)):
            other = await client.request(method, path, headers=auth("key-ben"))
            assert_problem(other, 404)
            unknown = await client.request(method, f"{url}/{ULID()}", headers=auth("key-ben"))
            assert_problem(unknown, 404)
            assert other.json()["detail"].split()[:2] == unknown.json()["detail"].split()[:2]
        # The free tier allows 10 requests a minute.
        answers = [
            await client.post(
                url, json=ok, headers={**auth("key-fay"), "Accept": "application/json"}
            )
            for _ in range(12)
        ]
    codes = [a.status_code for a in answers]
    assert codes == [202] * 10 + [429, 429], codes
    limited = assert_problem(answers[-1], 429)
    assert float(answers[-1].headers["Retry-After"]) > 0
    assert limited["code"] == "rate_limited"
    # Only the 11 accepted requests reached Kafka.
    assert end_offsets(BOOTSTRAP, env.topics.requests) - before == 11


def test_fuzzing_the_live_api_from_its_openapi_spec_gives_no_server_error(env: Env) -> None:
    """schemathesis against the running gateway (the unit fuzz runs it without Kafka)."""
    schema = schemathesis.openapi.from_url(f"{env.url}/openapi.json", timeout=10)
    calls: list[tuple[str, int]] = []
    for found in schema.get_all_operations():
        operation = found.ok()
        modes = [GenerationMode.POSITIVE]
        if list(operation.iter_parameters()) or list(operation.body):
            modes.append(GenerationMode.NEGATIVE)  # only these have invalid input to make
        for mode in modes:

            @given(case=operation.as_strategy(mode))
            @settings(
                max_examples=6,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def check(case: schemathesis.Case) -> None:
                label = case.operation.label
                for headers in (auth(), {}):
                    response = case.call(base_url=env.url, headers=headers, timeout=60)
                    calls.append((label, response.status_code))
                    assert response.status_code < 500, (label, response.text[:500])
                    if response.status_code >= 400:
                        [media] = response.headers.get("content-type", [""])
                        assert media.startswith("application/problem+json"), (label, media)

            check()
    figures("fuzz", calls=len(calls), statuses=sorted({status for _, status in calls}))
    assert len({label for label, _ in calls}) >= 6


# -- 10. Idempotency-Key ---------------------------------------------------------------------


async def test_the_same_idempotency_key_gives_the_same_request_one_call_and_one_charge(
    env: Env,
) -> None:
    key = "key-light-5"
    doc = document(10_000)
    idem = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}
    before = end_offsets(BOOTSTRAP, env.topics.requests)
    async with httpx.AsyncClient(timeout=60) as client:
        usage_before = (await client.get(f"{env.url}/v1/usage", headers=auth(key))).json()
        first, second = await asyncio.gather(
            post_json(client, env, doc, key, **idem), post_json(client, env, doc, key, **idem)
        )
        assert first.status_code == second.status_code == 202, (first.text, second.text)
        request_id = first.json()["id"]
        assert second.json()["id"] == request_id
        replays = [r.headers.get("Idempotent-Replayed") for r in (first, second)]
        assert replays.count("true") == 1, replays  # the other one created it
        streamed = await collect(
            client,
            "POST",
            f"{env.url}/v1/summaries",
            json={"document": doc, "max_output_tokens": MAX_TOKENS},
            headers={**auth(key), **idem},
        )
        assert streamed.request_id == request_id
        assert streamed.headers.get("idempotent-replayed") == "true"
        assert_seamless(streamed, doc)
        cost = streamed.done["cost"]["micro_usd"]

        async def charged() -> dict[str, Any]:
            body: dict[str, Any] = (
                await client.get(f"{env.url}/v1/usage", headers=auth(key))
            ).json()
            return body

        async def charged_once() -> dict[str, Any] | None:
            usage = await charged()
            return usage if usage["cost_micro_usd"] != usage_before["cost_micro_usd"] else None

        usage = await eventually_async(charged_once, timeout=30, message="the charge settled")
    assert end_offsets(BOOTSTRAP, env.topics.requests) - before == 1
    assert sim_record(env, request_id)["attempts"] == 1
    assert usage["requests"] - usage_before["requests"] == 1
    assert usage["cost_micro_usd"] - usage_before["cost_micro_usd"] == cost > 0
