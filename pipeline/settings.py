"""Process settings: one frozen object per process, read from ``SUMSTREAM_*`` variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class KafkaSettings(BaseSettings):
    """What every process needs to reach the broker and name the topics."""

    model_config = SettingsConfigDict(
        env_prefix="SUMSTREAM_", frozen=True, extra="ignore", env_file=".env"
    )

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "sumstream."
    # tokens and results MUST share this count (DESIGN.md section 2).
    stream_partitions: int = Field(default=6, ge=1)
    work_partitions: int = Field(default=6, ge=1)
    data_dir: Path = REPO_ROOT / ".data"


class BrokerSettings(KafkaSettings):
    """The local development broker (`sumstream broker`)."""

    broker_port: int = 9092
    controller_port: int = 9093
    broker_heap: str = "512m"
    java_home: Path | None = None
    kafka_pom: Path = REPO_ROOT / "deploy" / "kafka" / "pom.xml"


class WorkerSettings(KafkaSettings):
    """A Faust worker running any subset of the stages."""

    app_id: str = "sumstream"
    stages: str = "preprocess,inference,postprocess"
    web_port: int = 6066
    metrics_port: int = 9464
    anthropic_api_key: SecretStr | None = None
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
    tiers_file: Path = REPO_ROOT / "config" / "tiers.toml"
    prices_file: Path = REPO_ROOT / "config" / "prices.toml"


class SimulatorSettings(BaseSettings):
    """The Anthropic-compatible LLM simulator (`sumstream llm-sim`)."""

    model_config = SettingsConfigDict(env_prefix="SUMSTREAM_SIM_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8088
    ttft_ms: float = 200.0
    token_delay_ms: float = 10.0
    max_concurrent: int = 0  # 0 means unlimited
    error_rate: float = 0.0
    error_status: int = 529
    fault_at_token: int = 0  # 0 means never
    fault_kind: str = "error"  # error | drop
    retry_after_s: float = 1.0


@lru_cache(maxsize=1)
def kafka_settings() -> KafkaSettings:
    return KafkaSettings()


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process: ours, plus ``SUMSTREAM_*`` overrides."""
    import os

    env = dict(os.environ)
    env.update({f"SUMSTREAM_{k.upper()}": v for k, v in overrides.items()})
    return env
