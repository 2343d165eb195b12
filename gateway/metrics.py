"""The gateway's Prometheus metrics, named ``sumstream_gateway_*`` (docs/architecture.md).

Labels stay bounded: outcome is an error code or "accepted"/"idempotent_replay".
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "sumstream_gateway_requests_total", "POST /v1/summaries answers by outcome", ["outcome"]
)
SSE_CLIENTS = Gauge("sumstream_gateway_sse_clients", "Open SSE streams")
OVERHEAD_SECONDS = Histogram(
    "sumstream_gateway_overhead_seconds",
    "Gateway time from request arrival to response start (auth, validation, admission, produce)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
STREAMS = Counter(
    "sumstream_gateway_streams_total", "SSE streams by how they were served", ["source"]
)
STREAM_ENDS = Counter(
    "sumstream_gateway_stream_ends_total", "SSE streams by how they ended", ["reason"]
)
CANCELS = Counter("sumstream_gateway_cancels_total", "Cancel events produced", ["reason"])
ADMISSION = Counter(
    "sumstream_gateway_admission_total",
    "Admission verdicts: admitted, degraded, shed, rate_limit, token_limit, budget, "
    "inflight_bound, user_inflight_bound, duplicate (an Idempotency-Key another request holds)",
    ["verdict"],
)
ESTIMATED_WAIT = Gauge(
    "sumstream_gateway_estimated_wait_seconds",
    "Estimated queue wait of a new request, from consumer lag and throughput",
)
QUEUE_DEPTH = Gauge(
    "sumstream_gateway_queue_depth", "Requests waiting in the log (preprocess + inference lag)"
)
LAG_SAMPLE_AGE = Gauge(
    "sumstream_gateway_lag_sample_age_seconds",
    "Seconds since the last good consumer-lag sample; admission's estimate is stale past"
    " SUMSTREAM_LAG_STALE_AFTER_S",
)
THROUGHPUT = Gauge(
    "sumstream_gateway_throughput_per_second", "Results written per second (rolling window)"
)
SETTLED = Counter(
    "sumstream_gateway_settled_total", "Results settled in the quota ledger", ["outcome"]
)
CONNECTIONS_REFUSED = Counter(
    "sumstream_gateway_connections_refused_total",
    "Connections closed before their request reached the app: head_too_large, too_many_headers,"
    " head_timeout, too_many_connections",
    ["reason"],
)
