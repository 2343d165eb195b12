"""Observability proven on running processes (issue 6): after 10 requests through the gateway, the
metrics of every process agree with the `results` topic, every metric deploy/ queries is in a
live scrape, and the logs are JSON lines with request ids and without documents or keys.

Two workers (all stages each), one gateway, the simulator, reached through the real-API code path
(an API key and a base URL), so an upstream key exists that must not leak.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.core.codec import codec
from pipeline.core.settings import KafkaSettings
from tests.deploy_files import Scrape, all_needs, missing
from tests.e2e.documents import document
from tests.harness import (
    BOOTSTRAP,
    Proc,
    Record,
    Stack,
    StreamResult,
    auth,
    collect,
    eventually,
    read_topic,
    running_stack,
    wait_for_balanced_group,
)

pytestmark = pytest.mark.e2e

N = 10
MAX_TOKENS = 40
CLIENT_KEY = "key-ann"
UPSTREAM_KEY = f"sk-ant-api03-h11-{uuid.uuid4().hex}"
# Every sentence of tests/e2e/documents.py has this; no log line may.
DOCUMENT_TEXT = re.compile(r"item \d+-\d+ noted \d+ cases")
STAGES = ("queue_wait", "preprocess", "inference_queue", "ttft", "generation", "total")
STAGES += ("time_to_first_token",)
WORKER_STAGES = {"preprocess", "inference", "postprocess"}


# Every probe below scrapes every process: twice a second leaves the cores to the processes.
SCRAPE_INTERVAL_S = 0.5


def wait_ready(proc: Proc) -> None:
    def ready() -> bool:
        proc.check_alive()
        return any("Worker]: Ready" in line for line in proc.log_lines())

    eventually(ready, timeout=120, message=f"{proc.name} to be ready")


@dataclass
class Traffic:
    documents: list[str]
    streams: list[StreamResult]
    results: list[dict[str, Any]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("observability"), workers=0, gateways=0) as s:
        s.extra_env.update(
            {"SUMSTREAM_ANTHROPIC_API_KEY": UPSTREAM_KEY, "SUMSTREAM_ANTHROPIC_BASE_URL": s.sim_url}
        )
        workers = [s.start_worker(), s.start_worker()]
        s.start_gateway()
        # Traffic only once the group is stable: a rebalance mid-run would re-deliver records,
        # and counters count a re-delivered terminal event again (the compacted topic does not).
        for worker in workers:
            wait_ready(worker)
        wait_for_balanced_group(workers, KafkaSettings().work_partitions)
        yield s


def read_results(stack: Stack) -> list[dict[str, Any]]:
    """Every SummaryResult in this stack's `results` topic, to its current end."""
    topic = f"{stack.prefix}results"
    consumer = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": f"obs-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10)
        ends = {}
        for p in meta.topics[topic].partitions:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > 0:
                ends[p] = high
    finally:
        consumer.close()

    def at_the_end(records: list[Record]) -> bool:
        # The topic is compacted: offsets may have gaps, so "read to the end" is by offset.
        last = {r.partition: r.offset for r in records}
        return all(last.get(p, -1) + 1 >= high for p, high in ends.items())

    records = read_topic(BOOTSTRAP, topic, at_the_end, timeout=30)
    return [codec().decode_as(r.value, "SummaryResult") for r in records]


def produce_poison(stack: Stack) -> None:
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    producer.produce(f"{stack.prefix}requests", key=b"poison-h11", value=b"not avro at all")
    assert producer.flush(10) == 0


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Traffic:
    docs = [document(9000 + i) for i in range(N)]
    # One upstream failure before the first token: a retry and an upstream error to count.
    stack.sim_config(fail_next=1)
    produce_poison(stack)

    async def send() -> list[StreamResult]:
        async with httpx.AsyncClient(timeout=120) as client:
            return list(
                await asyncio.gather(
                    *(
                        collect(
                            client,
                            "POST",
                            f"{stack.gateway}/v1/summaries",
                            json={"document": doc, "max_output_tokens": MAX_TOKENS},
                            headers=auth(CLIENT_KEY),
                        )
                        for doc in docs
                    )
                )
            )

    streams = asyncio.run(send())
    for stream in streams:
        assert stream.status_code == 200, stream.events
        assert stream.done["status"] == "COMPLETED", stream.done
    results = read_results(stack)
    return Traffic(docs, streams, results)


def scrape_texts(stack: Stack) -> dict[str, str]:
    texts = {}
    for name, url in stack.metrics_urls().items():
        response = httpx.get(url, timeout=10)
        response.raise_for_status()
        texts[name] = response.text
    return texts


def workers_of(texts: dict[str, str]) -> list[str]:
    return [name for name in texts if name.startswith("worker-")]


def test_ten_requests_metrics_agree_with_the_results_topic(stack: Stack, traffic: Traffic) -> None:
    results = traffic.results
    assert len(results) == N
    assert {r["request_id"] for r in results} == {s.request_id for s in traffic.streams}
    for result in results:
        assert set(STAGES) <= set(result["latency_ms"]), result["latency_ms"]

    def counted() -> tuple[dict[str, str], Scrape] | None:
        texts = scrape_texts(stack)
        workers = Scrape.parse(*(texts[w] for w in workers_of(texts)))
        if workers.total("sumstream_requests_completed_total") < N:
            return None  # postprocess counts right after it writes the result
        return texts, workers

    texts, workers = eventually(
        counted, message="postprocess to count every result", interval=SCRAPE_INTERVAL_S
    )
    assert len(workers_of(texts)) == 2

    # Tokens and cost: the sums over the workers equal the sums over `results`, per tier/model.
    for metric, field in (
        ("sumstream_output_tokens_total", "output_tokens"),
        ("sumstream_input_tokens_total", "input_tokens"),
        ("sumstream_cost_micro_usd_total", "cost_micro_usd"),
    ):
        expected: dict[tuple[str, ...], float] = {}
        for r in results:
            key = (r["tier"], r["model"])
            expected[key] = expected.get(key, 0) + r["usage"][field]
        assert workers.by(metric, "tier", "model") == expected, metric
        assert workers.total(metric) > 0, metric
    total_output = sum(r["usage"]["output_tokens"] for r in results)
    # The upstream's own count agrees too.
    sim = Scrape.parse(texts["llm-sim"])
    assert sim.total("sumstream_sim_output_tokens_total") == total_output

    assert workers.by("sumstream_requests_completed_total", "status") == {("COMPLETED",): N}

    # Per-stage latency: one observation per result, and the same seconds as the breakdowns.
    for stage in STAGES:
        assert workers.total("sumstream_stage_duration_seconds_count", stage=stage) == N, stage
        seconds = workers.total("sumstream_stage_duration_seconds_sum", stage=stage)
        assert seconds == pytest.approx(sum(r["latency_ms"][stage] for r in results) / 1000)
    assert workers.total("sumstream_stage_duration_seconds_count", stage="upstream_ttft") == N
    assert workers.total("sumstream_inter_token_seconds_count") > 0

    # The injected upstream failure: one error, one retry, one more attempt than requests.
    assert workers.total("sumstream_upstream_errors_total") == 1
    assert workers.total("sumstream_retries_total") == 1
    assert workers.total("sumstream_upstream_attempts_total") == N + 1
    assert sum(r["usage"]["attempts"] for r in results) == N + 1
    # The poison record went to the dead-letter topic.
    assert workers.total("sumstream_dead_letters_total", stage="preprocess") == 1

    gateway_name = next(n for n in texts if n.startswith("gateway-"))
    gateway = Scrape.parse(texts[gateway_name])
    assert gateway.total("sumstream_gateway_requests_total", outcome="accepted") == N
    assert gateway.total("sumstream_gateway_overhead_seconds_count") >= N
    assert gateway.total("sumstream_gateway_stream_ends_total", reason="done") == N

    # Lag: every process reports every stage; with the work done it drains to 0 everywhere.
    def drained() -> bool | None:
        texts = scrape_texts(stack)
        for name in [gateway_name, *workers_of(texts)]:
            scrape = Scrape.parse(texts[name])
            lag = scrape.by("sumstream_consumer_lag_records", "stage")
            assert {k[0] for k in lag} == WORKER_STAGES, (name, lag)
            if any(lag.values()):
                return None
        return True

    eventually(
        drained, message="consumer lag to drain to 0 in every process", interval=SCRAPE_INTERVAL_S
    )
    for name in workers_of(texts):
        scrape = Scrape.parse(texts[name])
        assert scrape.total("sumstream_circuit_breaker_state", upstream="anthropic") == 0, name
        assert scrape.total("sumstream_inference_inflight") == 0, name

    def closed() -> bool:
        gateway = Scrape.parse(scrape_texts(stack)[gateway_name])
        return gateway.total("sumstream_gateway_sse_clients") == 0

    eventually(closed, message="every SSE stream to be closed", interval=SCRAPE_INTERVAL_S)


def test_every_metric_the_dashboard_and_alerts_read_is_in_a_live_scrape(
    stack: Stack, traffic: Traffic
) -> None:
    assert traffic.results
    texts = scrape_texts(stack)
    assert set(texts) >= {"llm-sim", "worker-0", "worker-1"}
    scrape = Scrape.parse(*texts.values())
    need = all_needs()
    assert len(need.metrics) >= 15
    problems = missing(need, scrape)
    assert not problems, "deploy/ reads what no process exports:\n" + "\n".join(problems)


def test_every_response_carries_the_gateway_overhead(traffic: Traffic) -> None:
    for stream in traffic.streams:
        overhead = float(stream.headers["x-sumstream-overhead-ms"])
        assert overhead >= 0
        assert stream.headers["server-timing"] == f"gateway;dur={overhead:.2f}"


def stage_of(line: dict[str, Any]) -> str | None:
    if line.get("stage"):
        return str(line["stage"])
    logger = str(line.get("logger", ""))
    suffix = logger.rsplit(".", 1)[-1]
    return suffix if suffix in WORKER_STAGES else None


def test_logs_are_json_with_request_ids_and_carry_no_document_or_key(
    stack: Stack, traffic: Traffic
) -> None:
    assert traffic.results
    everything = "\n".join("\n".join(p.log_lines()) for p in stack.procs)
    assert everything.strip()
    # No document text, no key (the client's or the upstream's), whatever the process.
    leaked = DOCUMENT_TEXT.findall(everything)
    assert not leaked, f"document text in the logs: {leaked[:3]}"
    assert any(DOCUMENT_TEXT.search(doc) for doc in traffic.documents)  # the probe works
    assert UPSTREAM_KEY not in everything
    assert UPSTREAM_KEY[:24] not in everything
    assert CLIENT_KEY not in everything

    structured = [p for p in stack.procs if p.name.startswith(("gateway-", "worker-"))]
    lines: dict[str, list[dict[str, Any]]] = {}
    for proc in structured:
        parsed = []
        for raw in proc.log_lines():
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                pytest.fail(f"{proc.name} wrote a line that is not JSON: {raw[:200]}")
            assert {"ts", "level", "logger", "msg"} <= set(line), raw[:200]
            parsed.append(line)
        lines[proc.name] = parsed

    gateway_lines = [x for name, ls in lines.items() if name.startswith("gateway-") for x in ls]
    worker_lines = [x for name, ls in lines.items() if name.startswith("worker-") for x in ls]
    for stream in traffic.streams:
        rid = stream.request_id
        assert any(x.get("request_id") == rid for x in gateway_lines), f"gateway: no {rid}"
        stages = {stage_of(x) for x in worker_lines if x.get("request_id") == rid}
        assert stages >= WORKER_STAGES, f"{rid} has log lines from stages {stages} only"
