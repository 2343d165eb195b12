"""The gateway's settings: one frozen object, read from ``SUMSTREAM_*`` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from pipeline.settings import REPO_ROOT, KafkaSettings


class GatewaySettings(KafkaSettings):
    """Everything `sumstream gateway` reads: listen address, ownership share, keys, limits."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Instance i of N owns the token/result partitions p with p % N == i (DESIGN.md section 2).
    instance_index: int = Field(default=0, ge=0)
    instance_count: int = Field(default=1, ge=1)

    keys_file: Path | None = REPO_ROOT / "config" / "keys.toml"
    # A development key mapped to user "dev", tier "pro"; never logged.
    dev_api_key: SecretStr | None = None
    tiers_file: Path = REPO_ROOT / "config" / "tiers.toml"

    max_document_bytes: int = Field(default=1_000_000, ge=1)
    # JSON escaping can grow a document; the body limit leaves room for it.
    max_body_overhead_bytes: int = Field(default=64 * 1024, ge=0)
    max_inflight: int = Field(default=2_000, ge=1)

    # How long start-up waits for the topics to appear in the broker's metadata.
    startup_wait_s: float = Field(default=10.0, ge=0)
    producer_linger_ms: int = Field(default=1, ge=0)
    ping_interval_s: float = Field(default=15.0, gt=0)
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
    idempotency_window_s: float = Field(default=24 * 3600.0, gt=0)
    max_index_entries: int = Field(default=100_000, ge=1)
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _index_in_range(self) -> GatewaySettings:
        if self.instance_index >= self.instance_count:
            raise ValueError("instance_index must be < instance_count")
        return self

    @property
    def max_body_bytes(self) -> int:
        return self.max_document_bytes * 2 + self.max_body_overhead_bytes
