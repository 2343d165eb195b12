"""Every topic sumstream uses, declared once: name, key, schema, partitions, retention."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.settings import KafkaSettings

DAY_MS = 24 * 60 * 60 * 1000
QUOTA_PARTITIONS = 3
# Keyed by user and read whole by every gateway and preprocess worker (pipeline/memory/).
PREFERENCES_PARTITIONS = 3
# Users' data keys, read whole by every process that seals or opens text (pipeline/memory/).
KEYS_PARTITIONS = 3


@dataclass(frozen=True)
class TopicSpec:
    """One topic: its short name, value schema and broker-side configuration."""

    short: str
    schema: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)

    def name(self, prefix: str) -> str:
        return f"{prefix}{self.short}"


def declared_topics(settings: KafkaSettings) -> list[TopicSpec]:
    """The topics (docs/architecture.md, "Topics"), sized from the settings."""
    work = settings.work_partitions
    stream = settings.stream_partitions
    specs = [
        TopicSpec("requests", "SummarizeRequest", work, {"retention.ms": str(7 * DAY_MS)}),
        TopicSpec("preprocessed", "InferenceJob", work, {"retention.ms": str(DAY_MS)}),
        TopicSpec("tokens", "TokenEvent", stream, {"retention.ms": str(DAY_MS)}),
        TopicSpec(
            "results",
            "SummaryResult",
            stream,
            {"cleanup.policy": "compact,delete", "retention.ms": str(30 * DAY_MS)},
        ),
        TopicSpec("control", "ControlEvent", work, {"retention.ms": str(DAY_MS)}),
        TopicSpec("dlq", "DeadLetter", 1, {"retention.ms": str(30 * DAY_MS)}),
        # A long document's plan and chunk summaries, keyed by the parent request and
        # co-partitioned with `requests` (docs/architecture.md, "Long documents").
        TopicSpec("chunks", "ChunkSummary", work, {"retention.ms": str(DAY_MS)}),
        # Chunk summaries kept for reuse, keyed by user and document hash (read back by key
        # within `chunk_reuse_window_s`).
        TopicSpec("reuse", "ChunkSummary", work, {"retention.ms": str(DAY_MS)}),
        # The per-user quota ledger (gateway/admission/quota.py). The broker stamps the time so
        # every reader evaluates with one clock per partition; 35 d covers a month's budget replay.
        # Its partition count must never change: a user's records must stay in one partition.
        TopicSpec(
            "quota",
            "QuotaEvent",
            QUOTA_PARTITIONS,
            {"retention.ms": str(35 * DAY_MS), "message.timestamp.type": "LogAppendTime"},
        ),
        # Each user's preferences, compacted: the last record per user, a tombstone forgets them.
        TopicSpec(
            "preferences", "UserPreferences", PREFERENCES_PARTITIONS, {"cleanup.policy": "compact"}
        ),
        # Users' data keys, compacted: never deleted by time; a tombstone shreds a key and so
        # makes every copy of the text it sealed unreadable (docs/architecture.md, "Forgetting").
        # Tombstones outlive every sealed copy (results: 30 d), so a reader that meets text
        # sealed with a shredded key knows it was shredded rather than waiting for it.
        TopicSpec(
            "keys",
            "DataKey",
            KEYS_PARTITIONS,
            {"cleanup.policy": "compact", "delete.retention.ms": str(31 * DAY_MS)},
        ),
    ]
    # Every topic takes whatever a producer may send (pipeline/core/sizes.py): a record the
    # producer accepts and the broker refuses would be lost after the stage had committed.
    largest = str(settings.sizes.topic_message_bytes)
    for spec in specs:
        spec.config["max.message.bytes"] = largest
        if settings.min_insync_replicas is not None:
            spec.config["min.insync.replicas"] = str(settings.min_insync_replicas)
    return specs


@dataclass(frozen=True)
class TopicNames:
    """Resolved topic names for one prefix."""

    requests: str
    preprocessed: str
    tokens: str
    results: str
    control: str
    dlq: str
    quota: str
    chunks: str
    reuse: str
    preferences: str = ""
    keys: str = ""

    @classmethod
    def from_settings(cls, settings: KafkaSettings) -> TopicNames:
        p = settings.topic_prefix
        short = (
            "requests",
            "preprocessed",
            "tokens",
            "results",
            "control",
            "dlq",
            "quota",
            "chunks",
            "reuse",
            "preferences",
            "keys",
        )
        return cls(**{s: f"{p}{s}" for s in short})
