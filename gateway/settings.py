"""The gateway's settings: one frozen object, read from ``SUMSTREAM_*`` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from pipeline.core.resources import DEFAULT_TIERS_FILE
from pipeline.core.settings import REPO_ROOT, KafkaSettings


class GatewaySettings(KafkaSettings):
    """Everything `sumstream gateway` reads: listen address, ownership share, keys, limits."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Instance i of N owns the token/result partitions p with p % N == i
    # (docs/architecture.md, "Partitioning").
    instance_index: int = Field(default=0, ge=0)
    instance_count: int = Field(default=1, ge=1)

    keys_file: Path | None = REPO_ROOT / "config" / "keys.toml"
    # A development key mapped to user "dev", tier "pro"; never logged.
    dev_api_key: SecretStr | None = None
    # When set, GET /metrics needs `Authorization: Bearer <token>` (Prometheus `authorization`).
    metrics_token: SecretStr | None = None
    # Signs stream tokens, the browser's credential for one request's events
    # (gateway/http/streamtoken.py); every gateway of a deployment needs the same one.
    stream_token_secret: SecretStr | None = None
    stream_token_ttl_s: float = Field(default=300.0, gt=0)
    # The largest WebSocket message (/v1/ws); a bigger one closes the socket with 1009.
    max_ws_message_bytes: int | None = Field(default=None, ge=1024)
    tiers_file: Path = DEFAULT_TIERS_FILE

    # A lower document limit than the one max_record_bytes implies (pipeline/core/sizes.py);
    # None: that one. Never higher: a larger document's job could not be produced.
    max_document_bytes: int | None = Field(default=None, ge=1)
    # JSON escaping can grow a document; the body limit leaves room for it (within the record
    # limit, which the SummarizeRequest must fit).
    max_body_overhead_bytes: int = Field(default=64 * 1024, ge=0)
    # An SSE connection lasts at most this long, then ends with `error` stream_timeout (resume
    # with Last-Event-ID) + `done`: a request nobody finishes never holds a client for ever.
    # Longer than any tier's queue wait plus the workers' default deadline.
    max_stream_lifetime_s: float = Field(default=900.0, gt=0)
    # Requests accepted here and not finished yet; beyond it, 503 (a last bound for this
    # process when the lag figures are stale and admission fails open).
    max_inflight: int = Field(default=2_000, ge=1)
    # One user's share of max_inflight (429 beyond it), so one client cannot hold the bound.
    user_inflight_share: float = Field(default=0.25, gt=0, le=1)

    # Admission (gateway/admission/controller.py). The Faust app id is the stages' consumer group,
    # whose lag is the queue; the same variable (SUMSTREAM_APP_ID) the workers read.
    app_id: str = "sumstream"
    lag_interval_s: float = Field(default=1.0, gt=0)
    # Without a lag sample this recent, the estimate is unknown and admission fails open...
    lag_stale_after_s: float = Field(default=10.0, gt=0)
    # Without one this long, new work is shed (503) instead; 0 fails open for good.
    lag_fail_closed_after_s: float = Field(default=120.0, ge=0)
    # Consecutive failed lag samples after which the lag clients are closed and rebuilt.
    lag_rebuild_after: int = Field(default=3, ge=1)
    # Completions per second assumed while none were measured (after idle).
    min_throughput_per_s: float = Field(default=1.0, gt=0)
    # Degradation above degrade_at x the tier's max_queue_wait_s, when either is set:
    # switch to a cheaper model and/or cut max output tokens by a ratio.
    degrade_model: str | None = Field(default=None, min_length=1)
    degrade_output_ratio: float | None = Field(default=None, gt=0, lt=1)
    degrade_at: float = Field(default=0.5, gt=0, le=1)
    # The quota ledger (gateway/admission/quota.py) and the consumer group that settles results.
    quota_timeout_s: float = Field(default=5.0, gt=0)
    quota_start_timeout_s: float = Field(default=120.0, gt=0)
    # A new settle group starts this far back in `results` (within the month).
    settle_backfill_s: float = Field(default=3_600.0, ge=0)

    # How long start-up waits for the topics to appear in the broker's metadata.
    startup_wait_s: float = Field(default=10.0, ge=0)
    producer_linger_ms: int = Field(default=1, ge=0)
    ping_interval_s: float = Field(default=15.0, gt=0)
    # SO_SNDBUF of client connections (the kernel doubles it). Loopback and fast links
    # autotune up to 4 MB a connection: a client that stops reading would hold that much
    # kernel memory before the per-client queue below is even used. None: the OS default.
    socket_send_buffer_bytes: int | None = Field(default=131_072, ge=4_096)
    send_timeout_s: float = Field(default=30.0, gt=0)
    cancel_grace_s: float = Field(default=10.0, ge=0)
    # Events kept per live request for quick reconnects, and per-client queue bound.
    stream_buffer_events: int = Field(default=4_096, ge=16)
    client_queue_events: int = Field(default=1_024, ge=1)
    max_tracked_streams: int = Field(default=5_000, ge=1)
    # Finished streams stay in memory this long for quick reconnects; later, the log serves.
    finished_retention_s: float = Field(default=60.0, ge=0)
    # How long a stream waits for the missing pieces (last tokens, the result) before it
    # reads them from the log or ends with an explicit error.
    result_grace_s: float = Field(default=2.0, gt=0)
    result_timeout_s: float = Field(default=60.0, gt=0)
    reader_idle_timeout_s: float = Field(default=300.0, gt=0)
    # Looking up an id the gateway does not hold in memory reads its partitions from the time
    # in the id, and no further than these windows after it (docs/architecture.md, "The
    # gateway"): a request record is written when its id is minted, a result before the
    # request's deadline. An id older than the results' retention, or from the future, is
    # unknown without reading anything, so a forged id cannot make the gateway scan a log.
    lookup_request_window_s: float = Field(default=300.0, gt=0)
    lookup_result_window_s: float = Field(default=6 * 3600.0, gt=0)
    lookup_max_age_s: float = Field(default=30 * 24 * 3600.0, gt=0)
    idempotency_window_s: float = Field(default=24 * 3600.0, gt=0)
    max_index_entries: int = Field(default=100_000, ge=1)
    log_level: str = "INFO"
    # Connection bounds, enforced before a request reaches the app (gateway/http/protocol.py):
    # request-head bytes (request line + headers) and header fields, the time to send a head
    # (which also closes connections that never send one), and open connections.
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    max_headers: int = Field(default=100, ge=8)
    header_timeout_s: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=2_048, ge=1)

    @model_validator(mode="after")
    def _index_in_range(self) -> GatewaySettings:
        if self.instance_index >= self.instance_count:
            raise ValueError("instance_index must be < instance_count")
        return self

    @model_validator(mode="after")
    def _document_fits_a_record(self) -> GatewaySettings:
        largest = self.sizes.document_bytes
        if self.max_document_bytes is not None and self.max_document_bytes > largest:
            raise ValueError(
                f"max_document_bytes must be at most {largest} with max_record_bytes "
                f"{self.max_record_bytes} (raise max_record_bytes instead)"
            )
        return self

    @property
    def document_limit_bytes(self) -> int:
        """The largest document (UTF-8 bytes) accepted: its request and job fit a record."""
        if self.max_document_bytes is None:
            return self.sizes.document_bytes
        return self.max_document_bytes

    @property
    def settle_group(self) -> str:
        """The consumer group in which the gateways settle results (one settler a partition)."""
        return f"{self.topic_prefix}gateway-settle"

    @property
    def ws_message_limit_bytes(self) -> int:
        """The largest WebSocket message: a submit carries a document, like a POST body."""
        return self.max_ws_message_bytes or self.max_body_bytes

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: room for JSON escaping, never beyond a record."""
        escaped = self.document_limit_bytes * 2 + self.max_body_overhead_bytes
        return min(escaped, self.sizes.body_bytes)
