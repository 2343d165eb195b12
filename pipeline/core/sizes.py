"""Every record size limit, derived from the one setting ``max_record_bytes``.

A record that one part would accept and the next cannot carry is a request that hangs: the
gateway's body and document limits, the encoded records the stages build, the producers' request
size, the topics' ``max.message.bytes`` and the consumers' fetch sizes all follow from here
(docs/architecture.md, "Record sizes").
"""

from __future__ import annotations

from dataclasses import dataclass

# What a record costs beyond its value: the key (request ids are at most 200 characters), the
# record and batch headers (61 bytes for a batch of one, ~20 per record) and a request header.
RECORD_OVERHEAD_BYTES = 1_024
# What an InferenceJob adds to its document: instructions (4,000 characters, at most 16,000
# bytes), the system prompt, the prompt template, map-reduce chunk instructions and the other
# fields. A document within ``max_record_bytes - JOB_OVERHEAD_BYTES`` that does not grow under
# normalisation always fits its job; one that grows (NFC can triple UTF-8) is measured by
# preprocess, which turns it away as ``input_too_large``.
JOB_OVERHEAD_BYTES = 24 * 1_024
# Kafka's own default (librdkafka's message.max.bytes, Faust's producer_max_request_size).
DEFAULT_MAX_RECORD_BYTES = 1_000_000
# The smallest sensible record limit: a document must have room beside the overhead.
MIN_RECORD_BYTES = 2 * JOB_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class RecordSizes:
    """The size limits of one deployment, all derived from ``max_record_bytes``."""

    # The largest encoded record value any stage produces (a job, a request, a dead letter).
    max_record_bytes: int

    def __post_init__(self) -> None:
        if self.max_record_bytes < MIN_RECORD_BYTES:
            raise ValueError(f"max_record_bytes must be at least {MIN_RECORD_BYTES}")

    @property
    def producer_request_bytes(self) -> int:
        """aiokafka's ``max_request_size`` and librdkafka's ``message.max.bytes``."""
        return self.max_record_bytes + RECORD_OVERHEAD_BYTES

    @property
    def topic_message_bytes(self) -> int:
        """Every topic's ``max.message.bytes``: whatever a producer may send, the topic takes."""
        return self.producer_request_bytes

    @property
    def fetch_bytes(self) -> int:
        """Consumers' per-partition fetch size: at least one whole record per fetch."""
        return max(self.topic_message_bytes, 1_048_576)

    @property
    def document_bytes(self) -> int:
        """The largest document (UTF-8) the gateway accepts: its job fits unless it grows."""
        return self.max_record_bytes - JOB_OVERHEAD_BYTES

    @property
    def body_bytes(self) -> int:
        """The largest HTTP request body: the SummarizeRequest it becomes must fit a record."""
        return self.max_record_bytes

    @property
    def dead_letter_value_bytes(self) -> int:
        """The largest encoded DeadLetter: the same limit as every record a stage produces."""
        return self.max_record_bytes
