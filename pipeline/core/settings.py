"""Process settings: one frozen object per process, read from ``SUMSTREAM_*`` variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.core.resources import (
    DEFAULT_PRICES_FILE,
    DEFAULT_PRODUCERS_FILE,
    DEFAULT_TIERS_FILE,
)
from pipeline.core.sizes import DEFAULT_MAX_RECORD_BYTES, MIN_RECORD_BYTES, RecordSizes

# The source checkout; only meaningful when IN_CHECKOUT (an installed wheel has no such root).
REPO_ROOT = Path(__file__).resolve().parents[2]
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file()
# Broker files, Faust state and logs: <checkout>/.data as always, or a per-user directory for an
# installed wheel so that every cwd shares one broker and one state (docs/operations.md).
DEFAULT_DATA_DIR = (
    REPO_ROOT / ".data" if IN_CHECKOUT else Path.home() / ".local" / "share" / "sumstream"
)


class KafkaSettings(BaseSettings):
    """What every process needs to reach the broker and name the topics."""

    model_config = SettingsConfigDict(
        env_prefix="SUMSTREAM_",
        frozen=True,
        extra="ignore",
        env_file=".env",
        populate_by_name=True,
    )

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "sumstream."
    # tokens and results MUST share this count (docs/architecture.md, "Partitioning").
    stream_partitions: int = Field(default=6, ge=1)
    work_partitions: int = Field(default=6, ge=1)
    data_dir: Path = DEFAULT_DATA_DIR
    # How every client reaches the cluster (pipeline/kafka/connection.py builds them all).
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] = "PLAIN"
    sasl_username: str | None = None
    # With OAUTHBEARER: a bearer token, sent as is.
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    # Every consumer tail's fetch wait (and the Faust workers', whose own default is 1500 ms):
    # a record that arrives while a fetch for other partitions is parked at the broker waits
    # for it. 50 ms bounds that wait; an idle consumer then costs ~3 % of a core (10 ms: ~10 %).
    fetch_max_wait_ms: int = Field(default=50, ge=0)
    # The producing systems that may write `requests`, and the one this process signs as
    # (None: the command's own, e.g. "gateway", "replay", "demo") (pipeline/core/producers.py).
    producers_file: Path = DEFAULT_PRODUCERS_FILE
    producer: str | None = None
    # The largest encoded record value; every other size limit derives from it
    # (pipeline/core/sizes.py, docs/architecture.md "Record sizes").
    max_record_bytes: int = Field(default=DEFAULT_MAX_RECORD_BYTES, ge=MIN_RECORD_BYTES)
    # Replicas of every topic sumstream and Faust create, and the replicas a write with
    # acks=all must reach (None: the broker's default). A 3-node cluster takes 3 and 2
    # (docs/architecture.md, "Production Kafka").
    replication_factor: int = Field(default=1, ge=1)
    min_insync_replicas: int | None = Field(default=None, ge=1)

    @property
    def sizes(self) -> RecordSizes:
        """Every size limit of the deployment, derived from ``max_record_bytes``."""
        return RecordSizes(self.max_record_bytes)


class BrokerSettings(KafkaSettings):
    """The local development broker (`sumstream broker`)."""

    broker_port: int = 9092
    controller_port: int = 9093
    # Nodes of the local cluster (combined broker+controller roles); node i listens on
    # broker_port + 2i and controller_port + 2i (pipeline/ops/broker_install.py).
    broker_nodes: int = Field(default=1, ge=1, le=9)
    broker_heap: str = "512m"
    java_home: Path | None = None
    # Not package data: `sumstream broker` outside a checkout needs SUMSTREAM_KAFKA_POM.
    kafka_pom: Path = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
    # None means <data_dir>/kafka/jars; a second broker (tests) may share the first one's jars.
    jars_dir: Path | None = None
    broker_stop_timeout_s: float = Field(default=30.0, gt=0)
    # The JVM's full tiered JIT (C2): the broker's steady state costs ~25 % less CPU per record
    # than with C1 only (docs/architecture.md, "The broker's JIT"). The test command sets
    # "-XX:TieredStopAtLevel=1" instead, which starts 2-3x faster on a busy 2-core machine.
    broker_jvm_opts: str = ""


class WorkerSettings(KafkaSettings):
    """A Faust worker running any subset of the stages."""

    app_id: str = "sumstream"
    stages: str = "preprocess,inference,postprocess"
    web_port: int = 6066
    metrics_port: int = 9464
    # Loopback only by default: /metrics names users and models. "0.0.0.0" exposes it.
    metrics_host: str = "127.0.0.1"
    # The SDK's own variable works too, so an existing ANTHROPIC_API_KEY switches to the real API.
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("SUMSTREAM_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"),
    )
    anthropic_base_url: str | None = None
    llm_sim_url: str = "http://127.0.0.1:8088"
    default_model: str = "claude-haiku-4-5"
    max_streams: int = Field(default=64, ge=1)
    max_streams_per_user: int = Field(default=8, ge=1)
    max_attempts: int = Field(default=4, ge=1)
    retry_budget_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    max_resumes: int = Field(default=3, ge=0)
    default_deadline_s: float = Field(default=120.0, gt=0)
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_reset_s: float = Field(default=5.0, gt=0)
    tiers_file: Path = DEFAULT_TIERS_FILE
    prices_file: Path = DEFAULT_PRICES_FILE
    # The gateway's keys table (the same variables): preprocess takes each user's tier from it.
    keys_file: Path | None = REPO_ROOT / "config" / "keys.toml"
    dev_api_key: SecretStr | None = None
    # How long preprocess remembers a request id, to dead-letter a later record that reuses
    # it: as long as `requests` keeps records (7 days).
    request_ids_retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    # Inference engine (pipeline/worker/inference/): scheduler bound, retry timing and budget,
    # HTTP timeouts.
    # Jobs a worker holds beyond its running streams. Kept small: jobs held here have left the
    # log, so the gateway's lag-based admission cannot see them; the fair scheduler only needs
    # a window of waiting jobs to choose from.
    max_queued: int = Field(default=32, ge=1)
    retry_base_s: float = Field(default=0.25, gt=0)
    retry_cap_s: float = Field(default=8.0, gt=0)
    retry_budget_window_s: float = Field(default=10.0, gt=0)
    retry_budget_min: int = Field(default=3, ge=0)
    # The upstream limiter (docs/architecture.md, "Rate limits and adaptive concurrency"):
    # streams a worker starts with (it doubles per round trip until the first 429), the
    # limit of the whole fleet split by partition share (0: max_streams per process, unsplit),
    # and the sources whose jobs the scheduler serves first when both wait.
    upstream_initial_concurrency: int = Field(default=4, ge=1)
    upstream_max_concurrency: int = Field(default=0, ge=0)
    priority_sources: str = "gateway"
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_read_timeout_s: float = Field(default=60.0, gt=0)
    # How long the worker's producer waits to fill a batch: more records per produce request,
    # fewer syscalls; coalescing keeps the text flowing meanwhile (docs/architecture.md,
    # "Coalesced token records").
    producer_linger_ms: float = Field(default=0.0, ge=0)
    # Coalescing under load (docs/architecture.md, "Coalesced token records"): up to
    # `coalesce_light_runs` running requests every delta goes at once; beyond, a run's next
    # record waits after its previous one, up to `coalesce_max_hold_ms` at `coalesce_full_runs`.
    coalesce_light_runs: int = Field(default=8, ge=0)
    coalesce_full_runs: int = Field(default=48, ge=1)
    coalesce_max_hold_ms: float = Field(default=25.0, ge=0)
    # Stages and the Faust app (pipeline/worker/app.py, preprocess.py, postprocess.py).
    # Tokens one model call may hold (prompt + output); longer documents are split (map-reduce).
    model_budget_tokens: int = Field(default=150_000, ge=1_000)
    # Ask the upstream's count_tokens for a long document's tokens (docs/architecture.md,
    # "Long documents"); unset: when a real API key is configured (the simulator counts too).
    count_tokens_upstream: bool | None = None
    # A long document summarized again by the same user within this many seconds reuses its
    # chunk summaries (docs/architecture.md, "Long documents"); 0 turns reuse off.
    chunk_reuse_window_s: float = Field(default=3600.0, ge=0)
    # A killed worker's partitions move after this long without heartbeats
    # (Faust's default is 60 s).
    session_timeout_s: float = Field(default=10.0, gt=0)
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    commit_interval_s: float = Field(default=1.0, gt=0)
    # Finished requests stay marked in the in-flight table this long so replayed jobs are skipped.
    inflight_done_retention_s: float = Field(default=600.0, gt=0)
    # Requests whose partial text postprocess keeps in memory before it re-reads from `tokens`.
    postprocess_max_open: int = Field(default=10_000, ge=1)
    log_level: str = "info"
    log_json: bool = True


class SimulatorSettings(BaseSettings):
    """The Anthropic-compatible LLM simulator (`sumstream llm-sim`).

    Every field from ``ttft_ms`` on is a knob that ``POST /_sim/config`` can change at run time.
    """

    model_config = SettingsConfigDict(env_prefix="SUMSTREAM_SIM_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8088, ge=0, le=65535)
    log_level: str = "warning"
    # Bearer token for /_sim/*; required off loopback (pipeline/llm/simulator/operator.py).
    admin_token: SecretStr | None = None
    # Per-request records kept for GET /_sim/stats; the oldest request ids go first.
    max_records: int = Field(default=10_000, ge=1)
    ttft_ms: float = Field(default=200.0, ge=0)
    token_delay_ms: float = Field(default=10.0, ge=0)
    max_concurrent: int = Field(default=0, ge=0)  # 0 means unlimited; beyond it 429
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)  # failures before the first token
    error_status: int = 529  # 429, or 500..599 (529 overloaded_error, others api_error)
    seed: int = 0  # seeds the error_rate draws
    fail_next: int = Field(default=0, ge=0)  # the next N requests fail with error_status
    fail_all: bool = False  # an outage: every request fails until turned off
    fault_at_token: int = Field(default=0, ge=0)  # 0 means never
    fault_kind: Literal["error", "drop"] = "error"
    fault_times: int = Field(default=-1, ge=-1)  # streams that get the fault; -1 means all
    retry_after_s: float = Field(default=1.0, ge=0)
    # Every model's context window in tokens (0: each model's own, 200k); beyond it 400.
    context_window_tokens: int = Field(default=0, ge=0)
    # Per-minute buckets like the API's (pipeline/llm/simulator/limits.py); 0 means unlimited.
    requests_per_minute: int = Field(default=0, ge=0)
    tokens_per_minute: int = Field(default=0, ge=0)
    input_tokens_per_minute: int = Field(default=0, ge=0)
    output_tokens_per_minute: int = Field(default=0, ge=0)
    # Prompt caching (pipeline/llm/simulator/cache.py): the shortest prefix that is cached.
    cache_min_tokens: int = Field(default=1024, ge=1)
    # Keep every call's prompt text per request id (GET /_sim/stats): isolation tests read it.
    record_prompts: bool = False

    @field_validator("error_status")
    @classmethod
    def _known_status(cls, status: int) -> int:
        if status != 429 and not 500 <= status <= 599:
            raise ValueError("error_status must be 429 or 500..599")
        return status


@lru_cache(maxsize=1)
def kafka_settings() -> KafkaSettings:
    return KafkaSettings()


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process: ours, plus ``SUMSTREAM_*`` overrides."""
    import os

    env = dict(os.environ)
    env.update({f"SUMSTREAM_{k.upper()}": v for k, v in overrides.items()})
    return env
