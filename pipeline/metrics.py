"""Every Prometheus metric a worker exports, declared once (DESIGN.md section 7).

Labels stay bounded: stage, tier, model, outcome, error type. Per-user figures live in the
results topic and the usage API, never in labels.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)

RECORDS_PROCESSED = Counter(
    "sumstream_records_processed_total", "Records a stage handled", ["stage", "outcome"]
)
DEAD_LETTERS = Counter(
    "sumstream_dead_letters_total", "Records sent to the dead-letter topic", ["stage", "error_type"]
)
STAGE_SECONDS = Histogram(
    "sumstream_stage_duration_seconds",
    "Time a request spent in each stage (queue wait, preprocess, ttft, total...)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_SECONDS = Histogram(
    "sumstream_inter_token_seconds",
    "Gap between consecutive upstream tokens of one stream",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
REQUESTS_COMPLETED = Counter(
    "sumstream_requests_completed_total", "Requests that reached a final result", ["tier", "status"]
)
INPUT_TOKENS = Counter("sumstream_input_tokens_total", "Input tokens billed", ["tier", "model"])
OUTPUT_TOKENS = Counter("sumstream_output_tokens_total", "Output tokens billed", ["tier", "model"])
COST_MICRO_USD = Counter(
    "sumstream_cost_micro_usd_total", "Cost billed in micro-USD", ["tier", "model"]
)
UPSTREAM_ATTEMPTS = Counter(
    "sumstream_upstream_attempts_total", "Calls made to the model API", ["kind"]
)
UPSTREAM_ERRORS = Counter(
    "sumstream_upstream_errors_total", "Failed upstream calls by error type", ["error_type"]
)
RETRIES = Counter("sumstream_retries_total", "Upstream retries and resumes", ["reason"])
RETRY_BUDGET_EXHAUSTED = Counter(
    "sumstream_retry_budget_exhausted_total", "Retries refused by the retry budget"
)
BREAKER_STATE = Gauge(
    "sumstream_circuit_breaker_state",
    "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open",
    ["upstream"],
)
INFLIGHT = Gauge("sumstream_inference_inflight", "Upstream streams in flight")
QUEUED = Gauge("sumstream_inference_queued", "Jobs waiting in the fair scheduler")
CONSUMER_LAG = Gauge(
    "sumstream_consumer_lag_records", "Records not yet consumed, per stage", ["stage"]
)
